"""Where AR and TAR read (the model's `(logits, raw, dropped)` or hooked modules), and fastai's `RNNRegularizer`,
which `TARCallback` switches off during fit because it stands in for it."""
import warnings

from fastai.callback.rnn import RNNCallback, RNNRegularizer
from fastai.text.models.core import SentenceEncoder
from fastcore.basics import PrettyString

from .contract import OutputTarget, read_contract
from .schedule import describe_coef

__all__ = ['read_batch_contract', 'describe_places', 'FastaiRegularizerSwitch']


def read_batch_contract(
    learn,  # the learner, after the forward pass
    contract: bool | None,  # `TARCallback(contract=...)`
):
    "The batch's (logits, raw, dropped); fastai's RNNCallback, if kept, has already split it (last layer only)."
    if contract is False: return None
    for cb in learn.cbs:  # another TARCallback may have read it already and handed the loss the logits
        found = getattr(cb, '_batch_output', None)
        if found is not None and found.logits is learn.pred: return found
    rnn = next((cb for cb in learn.cbs if isinstance(cb, RNNCallback)), None)
    pred = learn.pred if rnn is None else (learn.pred, rnn.raw_out, rnn.out)
    return read_contract(pred, force=contract is True)


def describe_places(
    found: list,  # the targets read, or found from the model's structure
    nothing,  # the ValueError `find_targets` raised when `found` is empty
    undecided: bool,  # no module named and no forward seen yet: the contract may still be read
    contract: bool | None,  # `TARCallback(contract=...)`
    all_layers: bool, alpha, beta,  # `TARCallback`'s arguments of those names
) -> str:
    "Where AR and TAR read, one term a line; while `undecided` and the contract could be read, both candidates"
    lines = [repr(t) for t in found] or [f"nothing: {nothing}"]
    if undecided and (contract or contract is None and
                      not any(isinstance(t.module, SentenceEncoder) for t in found)):
        every = 'every layer of ' if all_layers else ''
        lines = [f"if the model's forward returns fastai's (logits, raw, dropped)"
                 f"{' with per-layer lists' if all_layers else ''}:",
                 f"  AR {every}dropped (output[2]): alpha={describe_coef(alpha)}",
                 f"  TAR {every}raw (output[1]): beta={describe_coef(beta)}",
                 "otherwise, found from the model's structure:"] + [f"  {line}" for line in lines]
    return PrettyString('\n'.join(lines))


class FastaiRegularizerSwitch:
    "fastai's `TextLearner` adds `RNNRegularizer(alpha=2, beta=1)`: switch it off so the penalty counts once."
    def __init__(self):
        self.silenced = []  # (the RNNRegularizer, its (alpha, beta)) to give back after the fit
        self.warned, self.warned_places = False, False  # each warning once per callback

    def silence(self, cbs):
        for cb in cbs:
            if isinstance(cb, RNNRegularizer) and (cb.alpha or cb.beta):
                if not any(c is cb for c, _ in self.silenced): self.silenced.append((cb, (cb.alpha, cb.beta)))
                cb.alpha = cb.beta = 0.
        if self.silenced and not self.warned:
            a, b = self.silenced[0][1]
            warnings.warn(f"TARCallback switches off fastai's RNNRegularizer(alpha={a}, beta={b}) during fit so that "
                          "AR/TAR is applied once; to silence this, create the learner with alpha=0, beta=0 "
                          "(language_model_learner(..., alpha=0., beta=0.)) or learn.remove_cb(RNNRegularizer)",
                          stacklevel=2)
            self.warned = True

    def restore(self):
        for cb, (a, b) in self.silenced: cb.alpha, cb.beta = a, b
        self.silenced = []

    def warn_if_places_differ(self, targets):
        "The RNNRegularizer switched off would have read the last layer's dropped (AR) and raw (TAR) outputs."
        if not self.silenced or self.warned_places: return
        same = all(isinstance(t, OutputTarget) and t.name in ('raw', 'dropped') or isinstance(t.module, SentenceEncoder)
                   for t in targets)
        if same: return
        warnings.warn("TARCallback regularizes " + '; '.join(map(repr, targets)) + ", where the RNNRegularizer "
                      "it switches off would have used AR on the last layer's dropped output (output[2]) and TAR on "
                      "its raw output (output[1]): because of modules=, ar_modules= or all_layers=True", stacklevel=2)
        self.warned_places = True
