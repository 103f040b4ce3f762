"""What leans on fastai's internals (`fastai_tar.fastai_interop`): which outputs are read as fastai's
`(logits, raw, dropped)` and which are not, what `contract=True` reads, and which forwards are the learner's own."""
import pytest
import torch
from torch import nn
from fastai.text.models.core import LinearDecoder

from fastai.text.all import Callback, CrossEntropyLossFlat, Learner

from fastai_tar import TARCallback
from fastai_tar.capture import Capture
from fastai_tar.fastai_interop import certain_contract, learner_forward

from conftest import VOCAB, lm_dls, quiet_fit


B, T, H, V = 4, 5, 6, 7


t = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype)


def read_contract(pred, force=None):
    "The contract as read from a fastai text model's output (which needs no check of where raw came from)"
    return certain_contract(pred, nn.Sequential(LinearDecoder(V, H)), None, force)[0]


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


# --- which forward is the learner's own ------------------------------------------------------------------------------
class StandIn:
    "A stand-in for a Learner: its own method calls the model, with `self` the learner (as fastai's `_do_one_batch`)."
    def __init__(self, model): self.model = model
    def forward(self, x): return self.model(x)


def other_caller(m, x): return m(x)  # a forward run by someone else (a callback, a user)


def test_outside_fastais_loop_the_learners_forward_counts_and_another_closes_left_over_hooks():
    m, stale = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), []
    learn = StandIn(m)
    cap = Capture()
    cap.accept = learner_forward(learn, lambda: stale.append(1) or cap.close())
    cap.open(m)
    cap.watch([m[1]])
    out = learn.forward(torch.randn(2, 3))  # validate(), get_preds(): fastai's loop only partly on the stack
    assert cap.forward.output is out and stale == [] and cap.is_open
    other_caller(m, torch.randn(2, 3))  # after a fit that a Ctrl-C ended: no event of ours followed
    assert stale == [1] and not cap.is_open and cap.forward is None
    other_caller(m, torch.randn(2, 3))
    assert stale == [1]  # once: the hooks are gone


class Snoop(Callback):
    "A callback that runs a forward of its own on the batch after the learner's, and sees what the capture holds then."
    def __init__(self): self.seen = []
    def before_fit(self):
        self.cap = Capture(learner_forward(self.learn, lambda: None))
        self.cap.open(self.learn.model)
        self.cap.watch([self.learn.model[1]])
    def after_pred(self):
        if not self.training: return
        fwd = self.cap.forward
        self.learn.model(self.learn.xb[0][:2])  # inside fastai's loop, not the learner's own forward
        self.seen.append((fwd, self.cap.forward, [c[3].shape[0] for c in self.cap.forward.calls], self.pred))
    def after_fit(self): self.cap.close()


def test_in_a_fastai_fit_only_the_learners_own_forward_counts():
    dls = lm_dls()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Tanh(), nn.Linear(4, VOCAB))
    snoop = Snoop()
    quiet_fit(Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=snoop))
    assert len(snoop.seen) == len(dls.train)
    for before, after, sizes, pred in snoop.seen:
        assert after is before and before.output is pred and sizes == [dls.bs]
