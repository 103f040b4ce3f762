"""What the library knows of a module from its class alone: its role (recurrent, dropout), the layout of its output,
the item of its output that is the activation, and the state argument that chains one call to the next.

Only what is certain counts: torch's own recurrent modules and dropouts, and fastai's text modules, each running its
class's own forward (a subclass with a forward of its own is a module of unknown layout). fastai's classes are looked
up in `sys.modules`: a model built of them has imported fastai already, and this module never imports it. Torch only.
"""
import sys

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ['fastai_class', 'is_recurrent', 'is_dropout', 'layout', 'activation_item', 'state_tensors', 'first_tensor']

_STOCK_RNN = {nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward}
_STOCK_CELL = {nn.RNNCell.forward, nn.LSTMCell.forward, nn.GRUCell.forward}
_FASTAI = {'AWD_LSTM': 'fastai.text.models.awdlstm', 'RNNDropout': 'fastai.text.models.awdlstm',
           'WeightDropout': 'fastai.text.models.awdlstm', 'SentenceEncoder': 'fastai.text.models.core',
           'LinearDecoder': 'fastai.text.models.core', 'PoolingLinearClassifier': 'fastai.text.models.core'}


def fastai_class(name: str) -> type | None:
    "fastai's text class `name` where fastai's text models are loaded; None where they are not (no model uses them)"
    return getattr(sys.modules.get(_FASTAI[name]), name, None)


def _is(module, name: str, own_forward: bool = False) -> bool:
    cls = fastai_class(name)
    return cls is not None and isinstance(module, cls) and (not own_forward or type(module).forward is cls.forward)


def is_recurrent(module: nn.Module) -> bool:
    "A recurrent module: torch's RNNs and cells, fastai's `AWD_LSTM` and its classifier's `SentenceEncoder`"
    return isinstance(module, (nn.RNNBase, nn.RNNCellBase)) or _is(module, 'AWD_LSTM') or _is(module, 'SentenceEncoder')


def is_dropout(module: nn.Module) -> bool:
    "A dropout module: torch's (`nn.Dropout` and its kin) and fastai's `RNNDropout`"
    return isinstance(module, nn.modules.dropout._DropoutNd) or _is(module, 'RNNDropout')


def _inner(module):
    "The module whose forward makes the output: fastai's `WeightDropout` runs the module it wraps"
    return module.module if _is(module, 'WeightDropout', own_forward=True) else module


def layout(module: nn.Module) -> tuple[int, bool, str] | None:
    "`(time axis, one step per call, why)` where the module's class makes it certain; else None"
    module = _inner(module)
    forward = type(module).forward
    if forward in _STOCK_RNN: return (1 if module.batch_first else 0), False, f"batch_first={module.batch_first}"
    if forward in _STOCK_CELL: return 1, True, "a cell: one step per call"
    if any(_is(module, n, own_forward=True) for n in ('AWD_LSTM', 'SentenceEncoder', 'RNNDropout')):
        return 1, False, "fastai's text modules are batch-first"
    return None


def activation_item(module: nn.Module) -> tuple | None:
    """`(item, masked)` where the module's class says which item of its output is the activation: 0 for an RNN's
    `(output, state)`, an LSTM cell's `(h, c)` and a fastai classifier's `(outs, padding)` (`masked`: item 1 is the
    padding), None (the whole output) for other cells, dropouts and fastai's `AWD_LSTM`. None where it does not say."""
    if _is(module, 'SentenceEncoder', own_forward=True): return 0, True
    inner = _inner(module)
    forward = type(inner).forward
    if forward in _STOCK_RNN or forward is nn.LSTMCell.forward: return 0, False
    if forward in _STOCK_CELL or is_dropout(inner) or _is(inner, 'AWD_LSTM', own_forward=True): return None, False
    return None


def first_tensor(x):
    "The first tensor of an output: itself, or the first one of nested tuples and lists (a state `(h, c)`)"
    while isinstance(x, (tuple, list)) and not isinstance(x, PackedSequence) and x: x = x[0]
    return x if isinstance(x, (Tensor, PackedSequence)) else None


def state_tensors(module: nn.Module, args: tuple, kwargs: dict, output) -> tuple | None:
    """`(state in, state out)` of a call, each as its first tensor, for the modules whose state is an argument (torch's
    RNNs and cells: `hx`): a call whose state in is an earlier call's state out continues that call's sequence.
    None for other modules (fastai's keep their state inside)."""
    forward = type(_inner(module)).forward
    if forward not in _STOCK_RNN and forward not in _STOCK_CELL: return None
    hx = args[1] if len(args) > 1 else kwargs.get('hx')
    out = output[1] if forward in _STOCK_RNN else output
    return first_tensor(hx), first_tensor(out)
