"""fastai's contract alone (`fastai_tar.fastai_interop.certain_contract`): which outputs are read as fastai's
`(logits, raw, dropped)` and which are not, and what `contract=True` reads."""
import pytest
import torch
from torch import nn
from fastai.text.models.core import LinearDecoder

from fastai_tar import TARCallback
from fastai_tar.fastai_interop import certain_contract


B, T, H, V = 4, 5, 6, 7


t = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype)


def read_contract(pred, force=None):
    "The contract as read from a fastai text model's output (which needs no check of where raw came from)"
    return certain_contract(pred, nn.Sequential(LinearDecoder(V, H)), {}, force)[0]


@pytest.mark.parametrize('pred, layers', [
    ((t(B, T, V), t(B, T, H), t(B, T, H)), 1),  # language model
    ((t(B, 2), t(B, T, H), t(B, T, H)), 1),  # classifier: logits without a time dim (PoolingLinearClassifier)
    ([t(B, T, V), t(B, T, H), t(B, T, H)], 1),  # a list
    ((t(B, T, V), [t(B, T, 3), t(B, T, H)], [t(B, T, 3), t(B, T, H)]), 2),  # per-layer lists
    ((t(B, T, V), t(B, T, H, dtype=torch.bfloat16), t(B, T, H, dtype=torch.bfloat16)), 1),
])
def test_recognised_as_the_contract(pred, layers):
    c = read_contract(pred)
    assert c.logits is pred[0] and len(c.raw) == len(c.dropped) == layers and c.per_layer == (layers > 1)


@pytest.mark.parametrize('pred', [
    (t(B, T, V), t(B, T, H)),  # two items
    (t(B, T, V), t(B, T, H), t(B, T, H), t(B)),  # four (a PackedSequence is a tuple of four)
    (t(B, T, V), t(B, H), t(B, H)),  # no time dim: a VAE's (x, mu, logvar), say
    (t(B, T, V), t(B + 1, T + 1, H), t(B + 1, T + 1, H)),  # another batch size and length
    (t(B, T, V), t(B, T + 1, H), t(B, T + 1, H)),  # another length than the logits
    (t(B, T, V), t(B, T, H), t(B, T, H + 1)),  # raw and dropped differ
    (t(B, T, V), [t(B, T, H)] * 2, [t(B, T, H)]),  # lists of different lengths
    (t(B, T, V), t(B, T, H, dtype=torch.long), t(B, T, H)),  # not floating point
    (t(B, T, V, dtype=torch.long), t(B, T, H), t(B, T, H)),
    (t(B, T, V), None, t(B, T, H)), (t(B, T, V), [], []), 'text', t(B, T, V), (t(), t(B, T, H), t(B, T, H)),
])
def test_not_recognised(pred):
    assert read_contract(pred) is None


def test_contract_true_reads_any_three_tensors_and_says_why_not():
    assert read_contract((t(B, V), t(B, H), t(B, H)), force=True) is not None  # 2-D raw: TAR along dim 1
    with pytest.raises(TypeError, match=r"contract=True.*2 items"): read_contract((t(B, V), t(B, H)), force=True)
    with pytest.raises(TypeError, match=r"contract takes None .* got 'yes'"): TARCallback(contract='yes')
