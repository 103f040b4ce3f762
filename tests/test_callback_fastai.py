"""fastai and torch losses as users write them: a loss subclassing a torch loss that takes the model's `(logits, aux)`
tuple gets the tuple, with `contract=None` and `contract=False` alike, and the penalty is added on top."""
import pytest
import torch
from torch import nn
from fastai.text.all import SGD, Callback, Learner

from fastai_tar import TARCallback
from conftest import VOCAB, Capture, LossSpy, lm_dls, penalty, quiet_fit, ref_penalty


class AuxCE(nn.CrossEntropyLoss):
    "A torch loss subclass taking (logits, aux): cross-entropy plus a small penalty of its own on aux."
    def forward(self, pred, y):
        logits, aux = pred
        return super().forward(logits.flatten(0, 1), y.flatten()) + 0.1 * aux.pow(2).mean()


class AuxLM(nn.Module):
    "Returns (logits, the GRU's output)."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.head = nn.Embedding(VOCAB, 8), nn.GRU(8, 12, batch_first=True), nn.Linear(12, VOCAB)

    def forward(self, x):
        h = self.rnn(self.emb(x))[0]
        return self.head(h), h


class Batches(Callback):
    "Each training batch's model output and target, before any callback changes them."
    order = -100
    def __init__(self): self.seen = []
    def after_pred(self):
        if self.training: self.seen.append(([p.detach().clone() for p in self.pred], self.y.clone()))


@pytest.mark.parametrize('contract', [None, False])
def test_a_torch_loss_subclass_taking_logits_and_aux_gets_the_tuple(contract):
    model, batches, spy = AuxLM(), Batches(), LossSpy(stop=2)
    cap = Capture(model.rnn)
    learn = Learner(lm_dls(n=8), model, loss_func=AuxCE(), opt_func=SGD,
                    cbs=[TARCallback(contract=contract), batches, spy])
    torch.manual_seed(1)
    quiet_fit(learn, lr=1e-3)
    assert spy.plain == [pytest.approx(AuxCE()(tuple(p), y).item(), rel=1e-6) for p, y in batches.seen]
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs] and len(spy.added) == 2
