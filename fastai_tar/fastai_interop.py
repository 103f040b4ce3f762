"""Everything that leans on fastai's internals, in one place: its RNN contract `(logits, raw, dropped)`, its losses, its
`RNNCallback` / `RNNRegularizer`, and its training loop (which forward is the learner's own, whether a fit is
running, the validation context, the autocast window `MixedPrecision` opens).

**The contract.** fastai's text models (`LinearDecoder`, `PoolingLinearClassifier`) and the fastai book's chapter 12
models (`LMModel7`) return `(logits, raw, dropped)`: `raw` is the last RNN layer's output, `dropped` the same after
dropout, each a tensor or a list with one tensor per layer. A 3-tuple is read as the contract only when that is
certain (`certain_contract`):
- it has the contract's form: float logits; `raw` and `dropped` float tensors of at least (batch, time, features)
  dims, or lists of them of one length, `raw[i]` shaped like `dropped[i]`, with the logits' batch size and, where the
  logits have a time dim, their length; and
- the model is a fastai text model, or `raw` (each layer of it) is the output of a recurrent module in that same
  forward, and `dropped` is `raw` or one dropout of it (a dropout's autograd node, or fastai's mask product).
Outside training, where no graph shows where `dropped` came from, the first training batch's decision holds.
`TARCallback(contract=True)` reads any 3-tuple of a tensor and two float tensors (or lists of them) of at least 2 dims;
`contract=False` none. Every other tuple reaches the loss as the model returned it.
"""
import sys
import warnings

import torch
from fastai.callback.rnn import RNNCallback, RNNRegularizer
from fastai.learner import Learner
from fastai.losses import BaseLoss
from fastai.text.models.core import LinearDecoder, PoolingLinearClassifier
from fastai.torch_core import find_bs
from torch import Tensor, nn

from .module_facts import first_tensor, is_recurrent
from .plan import Contract, describe, unwrap_model

__all__ = ['TupleLossError', 'FastaiRegularizerSwitch', 'certain_contract', 'batch_contract', 'no_contract',
           'check_loss_input', 'rnn_callback_output', 'learner_forward', 'fit_running', 'in_validation_context',
           'batch_size', 'autocast_state', 'restore_autocast']


# --- the contract ----------------------------------------------------------------------------------------------------
def _layers(x) -> list | None:
    if isinstance(x, Tensor): return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x): return list(x)
    return None


def _why_not_form(pred, strict: bool) -> tuple[str | None, list | None, list | None]:
    """`(why not, raw layers, dropped layers)`: why `pred` has not the contract's form (None when it has), and its
    items as lists of layers. `strict`: the recognition rule, else the one `contract=True` forces."""
    if not isinstance(pred, (tuple, list)): return f"it is a {describe(pred)}, not a tuple of three", None, None
    if len(pred) != 3: return f"it has {len(pred)} items, not three", None, None
    logits, raw, dropped = pred
    if not isinstance(logits, Tensor) or logits.dim() == 0 or (strict and not logits.is_floating_point()):
        return f"its first item (the logits) is a {describe(logits)}", None, None
    raws, drops, min_dim = _layers(raw), _layers(dropped), 3 if strict else 2
    for i, name, x, xs in ((1, 'raw', raw, raws), (2, 'dropped', dropped, drops)):
        for t in xs or [None]:  # (a loop, not `all(...)`: this runs at every batch)
            if t is None or not t.is_floating_point() or t.dim() < min_dim:
                return (f"item {i} ({name}) is a {describe(x)}, not a float tensor of at least {min_dim} dims or a "
                        "list of them", None, None)
    if len(raws) != len(drops): return f"raw has {len(raws)} layers and dropped {len(drops)}", None, None
    if strict:
        for i, (r, d) in enumerate(zip(raws, drops)):
            if r.shape != d.shape:
                return f"raw and dropped differ in shape at layer {i}: {describe(r)}, {describe(d)}", None, None
            if logits.shape[0] not in r.shape[:2] or logits.dim() >= 3 and logits.shape[1] not in r.shape[:2]:
                return f"raw's leading dims {tuple(r.shape[:2])} are not the logits' {tuple(logits.shape[:2])}", \
                    None, None
    return None, raws, drops


# The autograd nodes of a dropout: `nn.Dropout`'s, and fastai's `RNNDropout`, a product with a mask
_DROPOUT_NODES = ('NativeDropoutBackward0', 'FusedDropoutBackward0', 'MulBackward0')


def has_contract_form(pred) -> bool:
    "Whether `pred` has the form of fastai's `(logits, raw, dropped)`, whatever made it"
    return _why_not_form(pred, strict=True)[0] is None


def _made_from(dropped: Tensor, raw: Tensor) -> bool:
    """`dropped` is `raw` (a dropout in eval, or none), or a dropout of it: one op, a dropout's or a product with a mask
    that carries no gradient (a learned gate, `raw * sigmoid(g)`, is no dropout)"""
    if dropped is raw: return True
    node = dropped.grad_fn
    if raw.grad_fn is None or type(node).__name__ not in _DROPOUT_NODES: return False
    inputs = [f for f, _ in node.next_functions if f is not None]
    return len(inputs) == 1 and inputs[0] is raw.grad_fn


def _is_fastai_text_model(model: nn.Module) -> bool:
    return any(isinstance(m, (LinearDecoder, PoolingLinearClassifier)) for m in model.modules())


def recurrent_outputs(fwd, modules=None) -> dict:
    """id of the first tensor each call of a recurrent module returned in the forward -> (that module, its version
    then); `modules`: only theirs (the plan's producers of raw, known once the contract is settled)"""
    found = {}
    for c in () if fwd is None else fwd.calls:  # (a loop, not a comprehension: this runs at every batch)
        if c[0] in modules if modules is not None else is_recurrent(c[0]):  # (modules compare by identity)
            v = c[4]
            found[id(first_tensor(c[3]))] = (c[0], v.get(0) if isinstance(v, dict) else v)
    return found


def _silent_rnn(model: nn.Module, produced: dict) -> str:
    "Where the model has recurrent modules that no call showed: a wrapper calling their forward skips their hooks"
    if produced or not any(is_recurrent(m) for m in model.modules()): return ''
    return (" (the model's recurrent modules ran no hook in this forward: a wrapper that calls their forward directly, "
            "as awd-lstm-lm's WeightDrop does, skips hooks: pass contract=True, or name the wrapper in modules=)")


def certain_contract(
    pred,  # the model's whole output
    model: nn.Module,  # the learner's model
    fwd,  # the forward (`capture.Forward`), watched on the model's recurrent modules; None where none was captured
    contract: bool | None,  # `TARCallback(contract=...)`
    known: bool | None = None,  # what the first training forward showed: a contract for certain, or not
    producers: list | None = None,  # where it was: the modules that returned raw then (None where none did)
) -> tuple[Contract | None, str]:
    "`(Contract, '')` when `pred` is fastai's `(logits, raw, dropped)` for certain (see the module), else `(None, why)`"
    if contract is False: return None, "TARCallback(contract=False) leaves tuples to the loss"
    why, raws, drops = _why_not_form(pred, strict=not contract)
    if why is not None:
        if contract:
            raise TypeError(f"TARCallback(contract=True) cannot read the model's output as fastai's (logits, raw, "
                            f"dropped): {why}")
        return None, f"it is not read as fastai's (logits, raw, dropped): {why}"
    if known is False and not contract:  # outside training the graph that showed where `dropped` came from is gone
        return None, "it is not read as fastai's (logits, raw, dropped): the first training batch's output was not it"
    produced = recurrent_outputs(fwd, producers)
    found, versions = [], []
    for r in raws:  # (a loop, not comprehensions: this runs at every batch)
        p, v = produced.get(id(r), (None, None))
        found.append(p); versions.append(v)
    if not contract and not known and not _is_fastai_text_model(unwrap_model(model)):
        if None in found:
            return None, ("it is not read as fastai's (logits, raw, dropped): its raw item is not the output of a "
                          "recurrent module (nn.LSTM, nn.GRU, nn.RNN, fastai's AWD_LSTM) in this forward"
                          + _silent_rnn(model, produced))
        if not all(_made_from(d, r) for d, r in zip(drops, raws)):
            return None, ("it is not read as fastai's (logits, raw, dropped): its dropped item is not raw or a dropout "
                          "of it")
    if producers is not None and found != producers:
        return None, ("it is not read as fastai's (logits, raw, dropped): its raw item is not the output of the module "
                      "that returned it at the first training batch")
    for r, p, version in zip(raws, found, versions):  # each raw as it left its RNN: an in-place op would change TAR
        if version is not None and r._version != version:
            raise RuntimeError(f"TARCallback reads TAR from the model's raw output, the output of {type(p).__name__}, "
                               "but it was changed in place after the module returned it: make that op out-of-place "
                               "(`raw = raw + x`)")
    return Contract(pred[0], raws, drops, per_layer=not isinstance(pred[1], Tensor), producers=found), ''



def batch_contract(
    output,  # the model's whole output, a tuple or a list
    model: nn.Module,  # the learner's model
    fwd,  # the forward (`capture.Forward`); None where none was captured
    contract: bool | None,  # `TARCallback(contract=...)`
    plan,  # the settled `plan.Plan`; None before the first training batch
    training: bool,  # a training batch
    say_once,  # the hooks' one-time warning, `say_once(key, message)`
) -> tuple[Contract | None, str]:
    "One batch's `certain_contract`: in training, a settled contract is checked exactly (the same modules return raw)"
    known = None if plan is None else plan.contract
    found, why = certain_contract(output, model, fwd, contract, known if not training or known else None,
                                  plan.producers if training and known else None)
    if training and found is None and has_contract_form(output):
        if known:
            raise TypeError(f"TARCallback: the first training batch's output was fastai's (logits, raw, dropped) for "
                            f"certain, but this one's is not ({why}): return the same kind of output every batch, or "
                            "pass contract=True")
        say_once('form', f"TARCallback: the model's output has the form of fastai's (logits, raw, dropped), but {why}, "
                 "so it goes to the loss as it is and AR/TAR read the modules found or named: see learn.tar.places. "
                 "Pass contract=True if it is fastai's contract")
    return found, why


def no_contract(
    output,  # the model's output, not fastai's (logits, raw, dropped)
    training: bool,  # a training batch
    say_once,  # the hooks' one-time warning, `say_once(key, message)`
):
    "A plan that reads fastai's (logits, raw, dropped), on a forward that did not return it: an error in training"
    if training:
        raise TypeError(f"TARCallback's plan reads the model's (logits, raw, dropped), settled at the first training "
                        f"batch, but this forward returned a {describe(output)}: return the same kind of output every "
                        "batch, or name the modules to read in modules= / ar_modules=")
    say_once('valid', "TARCallback(valid_metrics=True): the model returns no (logits, raw, dropped) in validation, so "
             "the validation penalty is not computed; name modules (modules=) to measure it there")

# --- losses ----------------------------------------------------------------------------------------------------------
class TupleLossError(TypeError):
    "A tuple from the model's forward reached a loss that takes a tensor."


def _takes_tensor_only(loss_func) -> bool:
    "fastai's and torch's own losses take tensors; a subclass with a `forward`/`__call__` of its own may take tuples"
    cls = type(loss_func)
    if isinstance(loss_func, nn.modules.loss._Loss): return cls.forward.__module__.startswith('torch.')
    if isinstance(loss_func, BaseLoss): return cls.__call__.__module__.startswith('fastai.')
    return getattr(loss_func, '__module__', None) == 'torch.nn.functional'


def check_loss_input(
    pred,  # what the loss is about to receive
    loss_func,  # the learner's loss
    why: str,  # why the tuple was not read as the contract (`certain_contract`)
):
    "Raise `TupleLossError` before a tuple reaches a loss that cannot take one, saying why and what to do."
    if not isinstance(pred, (tuple, list)) or not _takes_tensor_only(loss_func): return
    name = getattr(loss_func, '__name__', type(loss_func).__name__)
    raise TupleLossError(
        f"The model's forward returned a {describe(pred)}, which would reach the loss {name}, a loss that takes a "
        f"tensor: {why}. Return only the logits from forward, or fastai's (logits, raw, dropped) with raw the output "
        "of the last RNN layer (TARCallback then gives the loss the logits and reads TAR from raw, AR from dropped; "
        "TARCallback(contract=True) reads a 3-tuple the rule does not recognise), or use a loss that takes the tuple.")


# --- fastai's RNN callbacks ------------------------------------------------------------------------------------------
def rnn_callback_output(learn, pred):
    "fastai's `RNNCallback`, kept on a learner, has split the tuple already: put it back together for reading"
    rnn = next((cb for cb in learn.cbs if isinstance(cb, RNNCallback)), None)
    return pred if rnn is None or isinstance(pred, (tuple, list)) else (pred, rnn.raw_out, rnn.out)


class FastaiRegularizerSwitch:
    """fastai's `TextLearner` adds `RNNRegularizer(alpha=2, beta=1)`: off during the fit, so that the penalty counts
    once. What it switched off is kept with the callback, also in `learn.export()`: a learner exported mid-fit gives
    the coefficients back at its first event."""
    def __init__(self):
        self.silenced = []  # (the RNNRegularizer, its (alpha, beta)) to give back after the fit
        self.warned, self.warned_places = False, False  # each warning once per callback

    def silence(self, learn):
        for cb in learn.cbs:
            if isinstance(cb, RNNRegularizer) and (cb.alpha or cb.beta):
                if not any(c is cb for c, _ in self.silenced): self.silenced.append((cb, (cb.alpha, cb.beta)))
                cb.alpha = cb.beta = 0.
        if self.silenced and not self.warned:
            a, b = self.silenced[0][1]
            ctor = 'text_classifier_learner' if any(isinstance(m, PoolingLinearClassifier) for m in
                                                    learn.model.modules()) else 'language_model_learner'
            warnings.warn(f"TARCallback switches off fastai's RNNRegularizer(alpha={a}, beta={b}) during fit so that "
                          f"AR/TAR is applied once; to silence this, create the learner with alpha=0, beta=0 "
                          f"({ctor}(..., alpha=0., beta=0.)) or learn.remove_cb(RNNRegularizer)", stacklevel=2)
            self.warned = True

    def restore(self):
        for cb, (a, b) in self.silenced: cb.alpha, cb.beta = a, b
        self.silenced = []

    def warn_if_places_differ(self, reads):
        "The RNNRegularizer switched off would have read the last layer's dropped (AR) and raw (TAR) outputs."
        moved = any(r.source == 'named' for r in reads) or len(reads) > len({r.kind for r in reads})  # or all_layers
        if not self.silenced or self.warned_places or not moved: return
        warnings.warn(f"TARCallback regularizes {'; '.join(map(repr, reads))}, where the RNNRegularizer it switches "
                      "off would have used AR on the last layer's dropped output (output[2]) and TAR on its raw output "
                      "(output[1]): because of modules=, ar_modules= or all_layers=True", stacklevel=2)
        self.warned_places = True


# --- the training loop -----------------------------------------------------------------------------------------------
# Frames of fastai's training loop: `_with_events` runs every fit, epoch and batch
_LOOP = {Learner._with_events.__code__, Learner.one_batch.__code__, Learner._do_one_batch.__code__}
_TORCH_DIR = torch.__file__.rsplit('/', 1)[0]
_MAX_DEPTH = 20  # frames between the model's call and the learner's method: helpers, wrappers


def learner_forward(learn, on_stale):
    """The `accept` of the hooks on `learn.model`: a forward counts where the learner itself runs it (fastai's
    `_do_one_batch`, a subclass's `one_batch`, or a helper they call), not a callback's event: the nearest method of
    either on the stack decides. Outside fastai's loop the hooks are left over from a fit that an exception or a
    Ctrl-C ended, with no event of ours after it (fastai's `_with_events` has no `finally`): `on_stale()`."""
    from fastai.callback.core import Callback

    def accept(model) -> bool:
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR): f = f.f_back  # module call, compile, DDP
        for _ in range(_MAX_DEPTH):
            if f is None: break
            owner = f.f_locals.get('self') if 'self' in f.f_code.co_varnames else None
            if owner is learn: return True
            if isinstance(owner, Callback): return False
            f = f.f_back
        g = sys._getframe(1)
        while g is not None:
            if g.f_code in _LOOP: return False
            g = g.f_back
        on_stale()
        return False
    return accept


def fit_running(learn) -> bool:
    "A fit of `learn` is on the stack: `validate()` called from inside it must not undo the fit's set-up"
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is Learner._do_fit.__code__ and f.f_locals.get('self') is learn: return True
        f = f.f_back
    return False


def in_validation_context(learn) -> bool:
    "Inside `learn.validate()` / `get_preds()` / `predict()`: fastai holds the learner's lock there."
    locked = getattr(getattr(learn, 'lock', None), 'locked', None)
    return bool(locked and locked()) or hasattr(learn, 'gather_preds')


def batch_size(learn) -> int | None:
    "The batch's size as fastai counts it (`find_bs` of the targets, else of the inputs)"
    try: return find_bs(learn.yb) if learn.yb else find_bs(learn.xb)
    except Exception: return None


# --- the autocast window of MixedPrecision ---------------------------------------------------------------------------
_AUTOCAST_DEVICES = ('cpu', 'cuda')


def _autocast_depth() -> int:
    "How many autocast windows are open (torch has no getter: one level up and back down)"
    depth = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return depth


def autocast_state() -> tuple:
    "Everything an autocast window changes: per device enabled and dtype, the cache flag, the nesting depth"
    return ([(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES],
            torch.is_autocast_cache_enabled(), _autocast_depth())


def restore_autocast(state: tuple):
    "Leave autocast as `autocast_state` found it, as leaving the windows opened since would"
    devices, cache, depth = state
    for d, enabled, dtype in devices: torch.set_autocast_enabled(d, enabled); torch.set_autocast_dtype(d, dtype)
    torch.set_autocast_cache_enabled(cache)
    now = _autocast_depth()
    for _ in range(now - depth): torch.autocast_decrement_nesting()
    for _ in range(depth - now): torch.autocast_increment_nesting()
    if depth == 0 and now > 0: torch.clear_autocast_cache()
