"""State around the fit: an error of ours inside fastai's mixed-precision window leaves autocast as it was, a model
returning the contract in training and plain logits in eval trains and validates with `valid_metrics=True`, and after
a Ctrl-C mid-fit the next `validate()` or forward gives fastai's `RNNRegularizer` its coefficients back and leaves no
penalty column in `learn.metrics`."""
import warnings

import pytest
import torch
from torch import nn
from torch.amp import GradScaler
from fastai.text.all import (AWD_LSTM, SGD, CrossEntropyLossFlat, L, Learner, MixedPrecision, RNNRegularizer,
                             language_model_learner)

from fastai_tar import TARCallback
from conftest import VOCAB, Boom, Capture, LossSpy, lm_dls, penalty, quiet_fit, ref_ar, ref_tar, tiny_config, \
    torch_state


# --- 13. our error inside fastai's mixed-precision window ----------------------------------------------------------
class CPUAutocastWindow(MixedPrecision):
    """fastai's MixedPrecision on CPU bf16 autocast, with fastai's own window: entered in before_batch, left in
    after_loss, so an exception between them leaves it entered unless the one who raised closes it. bf16 needs no
    scaler. (The suite's CPUMixedPrecision closes autocast when the forward ends: an error in after_loss would be
    outside its window.)"""
    def __init__(self): super().__init__(amp_mode='bf16')

    def before_fit(self):
        self.autocast, self.scales = torch.autocast('cpu', dtype=torch.bfloat16), L()
        self.learn.scaler = GradScaler('cpu', enabled=False)


class GRULM(nn.Module):
    "Embedding -> nn.GRU -> Linear; `in_place` adds to the GRU's output in place (an error of ours to raise)."
    def __init__(self, in_place=False):
        super().__init__()
        torch.manual_seed(0)
        self.in_place, self.emb, self.rnn = in_place, nn.Embedding(VOCAB, 8), nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, x):
        h = self.rnn(self.emb(x))[0]
        if self.in_place: h += 1.
        return self.head(h)


@pytest.mark.parametrize('why', ['schedule turns negative', 'in-place change'])
def test_our_error_inside_a_mixed_precision_window_leaves_autocast_as_it_was(why):
    if why == 'in-place change': model, tar, exc, msg = GRULM(in_place=True), TARCallback(), RuntimeError, 'in place'
    else: model, tar, exc, msg = GRULM(), TARCallback(beta=lambda pct: abs(pct - .5) - .1), ValueError, 'beta'
    learn = Learner(lm_dls(n=16), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[CPUAutocastWindow(), tar])
    before = torch_state()
    with pytest.raises(exc, match=msg): quiet_fit(learn)  # the schedule: -0.1 at the third batch of four
    assert torch_state() == before  # the autouse clean_torch_state fixture checks it too, after the test


# --- 14. valid_metrics with plain logits in eval -------------------------------------------------------------------
class ContractInTraining(nn.Module):
    "(logits, raw, dropped) in training, from its LSTM; the logits alone in eval."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(12, VOCAB)

    def forward(self, x):
        raw, _ = self.rnn(self.emb(x))
        dropped = self.drop(raw)
        logits = self.head(dropped)
        return (logits, raw, dropped) if self.training else logits


def test_valid_metrics_with_plain_logits_in_eval_trains_and_validates():
    model = ContractInTraining()
    raw, drop = Capture(model.rnn), Capture(model.drop)
    spy = LossSpy()
    learn = Learner(lm_dls(n=8, n_valid=4), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[TARCallback(valid_metrics=True), spy])
    torch.manual_seed(1)
    quiet_fit(learn, 2)
    assert len(learn.recorder.values) == 2  # both epochs validated
    assert len(spy.added) == 4
    assert spy.added == [penalty(2 * ref_ar(d) + ref_tar(r)) for r, d in zip(raw.train_outputs, drop.train_outputs)]
    assert len(spy.valid_added) == 2 and set(spy.valid_added) == {0.}


# --- 15. Ctrl-C mid-fit on a TextLearner ---------------------------------------------------------------------------
def interrupt_forward(model, at=2):
    "A forward pre-hook that raises KeyboardInterrupt at the model's `at`-th training forward; its handle."
    calls = []
    def hook(m, args):
        if m.training: calls.append(1)
        if len(calls) == at: raise KeyboardInterrupt()
    return model.register_forward_pre_hook(hook)


def metric_names(learn): return [getattr(m, 'name', type(m).__name__) for m in learn.metrics]


@pytest.mark.parametrize('where', ['after_batch', 'forward'])
@pytest.mark.parametrize('then', ['validate', 'forward'])
def test_after_ctrl_c_the_next_validate_or_forward_gives_fastai_its_regularizer_back(where, then):
    torch.manual_seed(0)
    learn = language_model_learner(lm_dls(n=8), AWD_LSTM, config=tiny_config(), pretrained=False, opt_func=SGD,
                                   cbs=TARCallback())
    reg = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer))
    names = metric_names(learn)
    handle = interrupt_forward(learn.model) if where == 'forward' else None
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the switch-off warning
        quiet_fit(learn, cbs=Boom(KeyboardInterrupt(), at=2) if where == 'after_batch' else [])
    if handle: handle.remove()
    if then == 'validate':
        with learn.no_bar(), learn.no_logging(): learn.validate()
    else:
        learn.model.eval()
        with torch.no_grad(): learn.model(learn.dls.valid.one_batch()[0])
    assert (reg.alpha, reg.beta) == (2., 1.)
    assert metric_names(learn) == names
