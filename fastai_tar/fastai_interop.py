"""Everything fastai-specific in one place: its text models' places and layouts, its RNN contract
`(logits, raw, dropped)`, its `RNNCallback` / `RNNRegularizer`, and its losses.

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
import warnings
from dataclasses import dataclass

from fastai.callback.rnn import RNNCallback, RNNRegularizer
from fastai.losses import BaseLoss
from fastai.text.models.awdlstm import AWD_LSTM, RNNDropout, WeightDropout
from fastai.text.models.core import LinearDecoder, PoolingLinearClassifier, SentenceEncoder
from torch import Tensor, nn

__all__ = ['Contract', 'TupleLossError', 'FastaiRegularizerSwitch', 'certain_contract', 'check_loss_input',
           'fastai_places', 'fastai_layout', 'fastai_output', 'is_fastai_classifier', 'is_fastai_text_model',
           'rnn_callback_output', 'describe', 'has_contract_form', 'RECURRENT']

# Modules whose outputs can be fastai's `raw`: watched in a forward to tell a real contract from any 3-tuple.
RECURRENT = (nn.RNNBase, nn.RNNCellBase, AWD_LSTM)
_BATCH_FIRST = (AWD_LSTM, SentenceEncoder, RNNDropout)  # fastai's text modules are batch-first


def is_fastai_text_model(model: nn.Module) -> bool:
    "A model built of fastai's text heads, which return the contract (`get_language_model`, `get_text_classifier`)."
    return any(isinstance(m, (LinearDecoder, PoolingLinearClassifier)) for m in model.modules())


def is_fastai_classifier(model: nn.Module) -> bool:
    "A fastai text classifier: its `SentenceEncoder` output carries the padding mask that its contract lacks."
    return any(isinstance(m, SentenceEncoder) for m in model.modules())


def fastai_layout(module: nn.Module) -> tuple[nn.Module, int] | None:
    "`(the module whose layout counts, time axis)` for fastai's text modules running their own forward; else None."
    if isinstance(module, WeightDropout) and type(module).forward is WeightDropout.forward: return module.module, None
    for cls in _BATCH_FIRST:
        if isinstance(module, cls) and type(module).forward is cls.forward: return module, 1
    return None


def fastai_output(module: nn.Module, output) -> tuple[Tensor, Tensor] | None:
    "`(h, mask)` of a fastai classifier's `SentenceEncoder` output `(outs, padding)`; None for other modules."
    if not isinstance(module, SentenceEncoder): return None
    h, pad = output
    return h, ~pad


def _named(model, cls):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def fastai_places(model: nn.Module, all_layers: bool) -> tuple[list, list, str] | None:
    "(TAR places, AR places, why) as `(name, module)` lists for fastai's text models; None for other models."
    encoders = _named(model, SentenceEncoder)
    if encoders:  # classifier: the encoder output is the last layer's raw output with its padding mask
        if all_layers:
            raise ValueError("all_layers=True needs the per-layer outputs of an AWD_LSTM, but a classifier's "
                             "SentenceEncoder joins its bptt chunks only at its output: use all_layers=False")
        return encoders[-1:], encoders[-1:], "found: fastai's classifier encoder, with its padding mask"
    awd = _named(model, AWD_LSTM)
    if not awd: return None
    name, enc = awd[-1]
    decoders = _named(model, LinearDecoder)
    last_dropped = [(f'{n}.output_dp' if n else 'output_dp', d.output_dp) for n, d in decoders[-1:]]
    if not all_layers: return [(name, enc)], last_dropped or [(name, enc)], "found: fastai's AWD_LSTM"
    prefix = f'{name}.' if name else ''
    tar = [(f'{prefix}rnns.{i}', r) for i, r in enumerate(enc.rnns)]
    ar = [(f'{prefix}hidden_dps.{i}', d) for i, d in enumerate(enc.hidden_dps)][:-1]
    return tar, ar + (last_dropped or tar[-1:]), "found: each layer of fastai's AWD_LSTM"


# --- the contract ----------------------------------------------------------------------------------------
@dataclass
class Contract:
    "A model's `(logits, raw, dropped)`, with `raw` and `dropped` as lists of one tensor per layer."
    logits: Tensor
    raw: list
    dropped: list
    per_layer: bool  # the model returned lists (one tensor per layer), not single tensors
    producers: list  # per layer, the recurrent module whose output `raw` is (None where unknown)


def _layers(x) -> list | None:
    if isinstance(x, Tensor): return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x): return list(x)
    return None


def describe(x) -> str:
    "A short description of a model output for messages: `tuple of 3 (float32 tensor (4, 12, 30), ...)`"
    if isinstance(x, Tensor): return f"{x.dtype} tensor {tuple(x.shape)}"
    if isinstance(x, (list, tuple)): return f"{type(x).__name__} of {len(x)} ({', '.join(map(describe, x))})"
    return type(x).__name__


def _why_not_form(pred, strict: bool) -> str | None:
    "Why `pred` has not the contract's form; None when it has. `strict`: the recognition rule, else the forced one."
    if not isinstance(pred, (tuple, list)): return f"it is a {describe(pred)}, not a tuple of three"
    if len(pred) != 3: return f"it has {len(pred)} items, not three"
    logits, raw, dropped = pred
    if not isinstance(logits, Tensor) or logits.dim() == 0 or (strict and not logits.is_floating_point()):
        return f"its first item (the logits) is a {describe(logits)}"
    raws, drops, min_dim = _layers(raw), _layers(dropped), 3 if strict else 2
    for i, name, x, xs in ((1, 'raw', raw, raws), (2, 'dropped', dropped, drops)):
        if xs is None or not all(t.is_floating_point() and t.dim() >= min_dim for t in xs):
            return f"item {i} ({name}) is a {describe(x)}, not a float tensor of at least {min_dim} dims or a list " \
                   "of them"
    if len(raws) != len(drops): return f"raw has {len(raws)} layers and dropped {len(drops)}"
    if not strict: return None
    for i, (r, d) in enumerate(zip(raws, drops)):
        if r.shape != d.shape: return f"raw and dropped differ in shape at layer {i}: {describe(r)}, {describe(d)}"
        if logits.shape[0] not in r.shape[:2] or logits.dim() >= 3 and logits.shape[1] not in r.shape[:2]:
            return f"raw's leading dims {tuple(r.shape[:2])} are not the logits' {tuple(logits.shape[:2])}"
    return None


# The autograd nodes of a dropout: `nn.Dropout`'s, and fastai's `RNNDropout`, a product with a mask
_DROPOUT_NODES = ('NativeDropoutBackward0', 'FusedDropoutBackward0', 'MulBackward0')


def has_contract_form(pred) -> bool:
    "Whether `pred` has the form of fastai's `(logits, raw, dropped)`, whatever made it"
    return _why_not_form(pred, strict=True) is None


def _made_from(dropped: Tensor, raw: Tensor) -> bool:
    "`dropped` is `raw` (a dropout in eval, or none), or a dropout of it: one op, a dropout's or a mask product"
    if dropped is raw: return True
    node = dropped.grad_fn
    return raw.grad_fn is not None and type(node).__name__ in _DROPOUT_NODES and \
        any(f is raw.grad_fn for f, _ in node.next_functions)


def certain_contract(
    pred,  # the model's whole output
    model: nn.Module,  # the learner's model
    recurrent_outputs: dict,  # id of each tensor a recurrent module returned in this forward -> that module
    contract: bool | None,  # `TARCallback(contract=...)`
    known: bool | None = None,  # what the first training forward showed: a contract for certain, or not
) -> tuple[Contract | None, str]:
    "`(Contract, '')` when `pred` is fastai's `(logits, raw, dropped)` for certain (see the module), else `(None, why)`"
    if contract is False: return None, "TARCallback(contract=False) leaves tuples to the loss"
    why = _why_not_form(pred, strict=not contract)
    if why is not None:
        if contract:
            raise TypeError(f"TARCallback(contract=True) cannot read the model's output as fastai's (logits, raw, "
                            f"dropped): {why}")
        return None, f"it is not read as fastai's (logits, raw, dropped): {why}"
    logits, raw, dropped = pred
    raws, drops = _layers(raw), _layers(dropped)
    producers = [recurrent_outputs.get(id(r)) for r in raws]
    if known is False and not contract:  # outside training the graph that showed where `dropped` came from is gone
        return None, "it is not read as fastai's (logits, raw, dropped): the first training batch's output was not it"
    if not contract and not known and not is_fastai_text_model(model):
        if None in producers:
            return None, ("it is not read as fastai's (logits, raw, dropped): its raw item is not the output of a "
                          "recurrent module (nn.LSTM, nn.GRU, nn.RNN, fastai's AWD_LSTM) in this forward")
        if not all(_made_from(d, r) for d, r in zip(drops, raws)):
            return None, ("it is not read as fastai's (logits, raw, dropped): its dropped item is not raw or a dropout "
                          "of it")
    return Contract(logits, raws, drops, per_layer=not isinstance(raw, Tensor), producers=producers), ''


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


def rnn_callback_output(learn, pred):
    "fastai's `RNNCallback`, kept on a learner, has split the tuple already: put it back together for reading"
    rnn = next((cb for cb in learn.cbs if isinstance(cb, RNNCallback)), None)
    return pred if rnn is None or isinstance(pred, (tuple, list)) else (pred, rnn.raw_out, rnn.out)


class FastaiRegularizerSwitch:
    "fastai's `TextLearner` adds `RNNRegularizer(alpha=2, beta=1)`: it is off during fit, so the penalty counts once"
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

    def warn_if_places_differ(self, reads, places: str):
        "The RNNRegularizer switched off would have read the last layer's dropped (AR) and raw (TAR) outputs."
        moved = any(r.source == 'named' for r in reads) or len(reads) > len({r.kind for r in reads})  # or all_layers
        if not self.silenced or self.warned_places or not moved: return
        warnings.warn(f"TARCallback regularizes {places}, where the RNNRegularizer it switches off would have used AR "
                      "on the last layer's dropped output (output[2]) and TAR on its raw output (output[1]): because "
                      "of modules=, ar_modules= or all_layers=True", stacklevel=2)
        self.warned_places = True
