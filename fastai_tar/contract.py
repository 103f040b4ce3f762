"""fastai's RNN contract: a model whose forward returns `(logits, raw, dropped)`.

fastai's text models (`LinearDecoder`, `PoolingLinearClassifier`) and the fastai book's chapter 12 models
(`LMModel7`) return it for fastai's `RNNCallback`: `raw` is the last RNN layer's output, `dropped` the same after
dropout, each a tensor or a list with one tensor per layer. `TARCallback` hands the loss the logits and, where
no module is named, reads TAR from `raw` and AR from `dropped`: the places `RNNRegularizer` uses.

What is recognised as the contract (`read_contract`), narrowly, so that other tuples reach the loss untouched:
- a tuple (or list) of three whose first item, the logits, is a floating-point tensor;
- `raw` and `dropped` each a floating-point tensor of at least 3 dims (batch, time, features), or lists of such
  tensors of the same non-zero length (one per layer, last layer last);
- `raw[i]` and `dropped[i]` of the same shape, their first dim the logits' batch size and, where the logits
  have a time dim too (a language model: 3 dims or more), their second dim its length.

Anything else is not the contract. `TARCallback(contract=True)` reads any 3-tuple of a tensor and two float
tensors (or lists of them) of at least 2 dims; `contract=False` leaves every tuple to the loss (for a loss that
takes one). The contract is batch-first, as fastai defines it: TAR differences dim 1.
"""
from dataclasses import dataclass

from fastai.losses import BaseLoss
from fastai.text.models.core import SentenceEncoder
from torch import Tensor, nn

from .functional import ar_sum_count, tar_sum_count
from .targets import Target, unwrap_model

__all__ = ['Contract', 'OutputTarget', 'TupleLossError', 'read_contract', 'reads_output', 'output_targets',
           'output_sums', 'check_loss_input']


@dataclass
class Contract:
    "A model's `(logits, raw, dropped)`, with `raw` and `dropped` as lists of one tensor per layer."
    logits: Tensor
    raw: list
    dropped: list
    per_layer: bool  # the model returned lists (one tensor per layer), not single tensors


def _layers(x) -> list | None:
    if isinstance(x, Tensor): return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x): return list(x)
    return None


def _describe(x) -> str:
    if isinstance(x, Tensor): return f"{x.dtype} tensor {tuple(x.shape)}"
    if isinstance(x, (list, tuple)): return f"{type(x).__name__} of {len(x)} ({', '.join(map(_describe, x))})"
    return type(x).__name__


def _why_not(pred, strict: bool) -> str | None:
    "Why `pred` is not the contract; None when it is. `strict`: the recognition rule, else the forced reading."
    if not isinstance(pred, (tuple, list)): return f"it is a {_describe(pred)}, not a tuple of three"
    if len(pred) != 3: return f"it has {len(pred)} items, not three"
    logits, raw, dropped = pred
    if not isinstance(logits, Tensor) or logits.dim() == 0 or (strict and not logits.is_floating_point()):
        return f"its first item (the logits) is a {_describe(logits)}"
    raws, drops, min_dim = _layers(raw), _layers(dropped), 3 if strict else 2
    for i, name, x, xs in ((1, 'raw', raw, raws), (2, 'dropped', dropped, drops)):
        if xs is None or not all(t.is_floating_point() and t.dim() >= min_dim for t in xs):
            return f"item {i} ({name}) is a {_describe(x)}, not a float tensor of at least {min_dim} dims or a list " \
                   "of them"
    if len(raws) != len(drops): return f"raw has {len(raws)} layers and dropped {len(drops)}"
    if not strict: return None
    for i, (r, d) in enumerate(zip(raws, drops)):
        if r.shape != d.shape: return f"raw and dropped differ in shape at layer {i}: {_describe(r)}, {_describe(d)}"
        if r.shape[0] != logits.shape[0] or (logits.dim() >= 3 and r.shape[1] != logits.shape[1]):
            return f"raw's batch and time dims {tuple(r.shape[:2])} are not the logits' {tuple(logits.shape[:2])}"
    return None


def read_contract(
    pred,  # what the model's forward returned (or fastai's RNNCallback left: `(learn.pred, raw_out, out)`)
    force: bool = False,  # `TARCallback(contract=True)`: any 3-tuple of a tensor and two float tensors is read
) -> Contract | None:
    "`pred` as a `Contract` when it is fastai's `(logits, raw, dropped)` (see the module's rule), else None."
    why = _why_not(pred, strict=not force)
    if why is not None:
        if force:
            raise TypeError(f"TARCallback(contract=True) cannot read the model's output as fastai's (logits, raw, "
                            f"dropped): {why}")
        return None
    logits, raw, dropped = pred
    return Contract(logits, _layers(raw), _layers(dropped), per_layer=not isinstance(raw, Tensor))


@dataclass(eq=False)
class OutputTarget(Target):
    "A term read from the model's `(logits, raw, dropped)` output rather than hooked: `layer` indexes the list."
    layer: int = -1

    def __repr__(self):
        return super().__repr__().replace(' (NoneType)', f" (output[{1 if self.kind == 'tar' else 2}])", 1)


def output_targets(
    alpha,  # AR coefficient: a number, a schedule, or one per layer read
    beta,  # TAR coefficient: a number, a schedule, or one per layer read
    n_layers: int,  # how many layers the model's `raw` and `dropped` hold
    all_layers: bool,  # every layer, not only the last
) -> list[OutputTarget]:
    "AR of `dropped` and TAR of `raw`: the last layer, as fastai's RNNRegularizer, or each one, `dropped.0`, ..."
    layers = list(range(n_layers)) if all_layers else [n_layers - 1]
    targets = []
    for kind, base, coef, arg in (('ar', 'dropped', alpha, 'alpha'), ('tar', 'raw', beta, 'beta')):
        coefs = list(coef) if isinstance(coef, (list, tuple)) else [coef] * len(layers)
        if len(coefs) != len(layers):
            raise ValueError(f"{arg} has {len(coefs)} coefficients but TARCallback reads {len(layers)} layer(s) of "
                             f"the model's {base} output: give one per layer, or a single number")
        targets += [OutputTarget(kind, f'{base}.{i}' if all_layers else base, None, c, i)
                    for i, c in zip(layers, coefs)]
    return targets


def output_sums(target: OutputTarget, contract: Contract):
    "(sum, count) of the target's term on the batch's contract; the contract is batch-first."
    if target.kind == 'ar': return ar_sum_count(contract.dropped[target.layer], None, 1)
    return tar_sum_count(contract.raw[target.layer], None, 1)


class TupleLossError(TypeError):
    "A tuple from the model's forward reached a loss that takes a tensor."


def _takes_tensor_only(loss_func) -> bool:
    "fastai's flattened losses and torch's loss modules and functions take tensors; other callables may take tuples."
    return isinstance(loss_func, (BaseLoss, nn.modules.loss._Loss)) or \
        getattr(loss_func, '__module__', None) == 'torch.nn.functional'


def check_loss_input(
    pred,  # what the loss is about to receive
    loss_func,  # the learner's loss
    contract,  # `TARCallback`'s `contract` argument
):
    "Raise `TupleLossError` before a tuple reaches a loss that cannot take one, saying why and what to do."
    if not isinstance(pred, (tuple, list)) or not _takes_tensor_only(loss_func): return
    why = ("TARCallback(contract=False) leaves tuples to the loss" if contract is False else
           f"it is not read as fastai's (logits, raw, dropped) because {_why_not(pred, strict=True)}")
    name = getattr(loss_func, '__name__', type(loss_func).__name__)
    raise TupleLossError(
        f"The model's forward returned a {_describe(pred)}, which would reach the loss {name}, a loss that takes a "
        f"tensor: {why}. Return only the logits from forward, or fastai's (logits, raw, dropped) with raw and dropped "
        "batch-first (TARCallback then gives the loss the logits and reads TAR from raw, AR from dropped; "
        "TARCallback(contract=True) reads a 3-tuple the rule does not recognise), or use a loss that takes the tuple.")


def reads_output(
    model: nn.Module,  # the learner's model
    contract: Contract,  # what its forward returned
    all_layers: bool,  # `TARCallback(all_layers=...)`
    force: bool,  # `TARCallback(contract=True)`
) -> bool:
    """Whether the default places (no module named) are the contract's `raw`/`dropped`: yes, except for a fastai
    classifier, whose `SentenceEncoder` is hooked instead (the same tensor, with its padding mask, which the contract
    lacks), and for `all_layers=True` on single tensors (the layers are then found from the model's structure)."""
    if force: return True
    if any(isinstance(m, SentenceEncoder) for m in unwrap_model(model).modules()): return False
    return contract.per_layer or not all_layers
