"""Where the contract read, the hooks and the history meet (a review of the merged callback): `summary()` and
cancelled fits keep the last fit's places and history, per-layer coefficients on a contract model without an RNN
module, two callbacks on one contract model, models that return plain logits in eval, callbacks that derive
`learn.pred` from the output, Learner subclasses with their own `one_batch`, and errors about coefficients."""
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.text.all import (CancelBatchException, CancelFitException, Callback, CrossEntropyLossFlat, Learner,
                             Module, ModelResetter)

from fastai_tar import TARCallback
from fastai_tar.tools.book import human_numbers_dls
from conftest import Capture, LossSpy, penalty, quiet_fit, ref_penalty
from test_contract import LMModel7, lmmodel7


@pytest.fixture(scope='module')
def dls(): return human_numbers_dls(upto=300, bs=8, sl=8)


class NoRNN(Module):
    "No nn.RNN module: two tanh layers with dropout, returning fastai's contract with per-layer lists."
    def __init__(self, vocab_sz, n=16):
        self.e, self.l1, self.l2, self.d, self.o = (nn.Embedding(vocab_sz, n), nn.Linear(n, n), nn.Linear(n, n),
                                                     nn.Dropout(0.4), nn.Linear(n, vocab_sz))

    def forward(self, x):
        r1 = torch.tanh(self.l1(self.e(x))); d1 = self.d(r1)
        r2 = torch.tanh(self.l2(d1)); d2 = self.d(r2)
        return self.o(d2), [r1, r2], [d1, d2]


class Outputs(Callback):
    "The model's whole output in training, before any callback strips it (after_pred, first)."
    order = -100
    def before_fit(self): self.outs = []
    def after_pred(self):
        if self.training: self.outs.append(self.pred)


def fit_with(dls, model, *cbs, n_epoch=1):
    spy, outs = LossSpy(), Outputs()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[*cbs, spy, outs])
    torch.manual_seed(1)
    quiet_fit(learn, n_epoch)
    return learn, spy, outs.outs


def test_summary_and_a_fit_cancelled_before_training_keep_the_last_fits_places_and_history(dls):
    torch.manual_seed(0)
    learn, _, _ = fit_with(dls, NoRNN(len(dls.vocab)), TARCallback(2., 1., all_layers=True))
    history, places = learn.tar.history, learn.tar.places
    assert 'ar:dropped.1' in history.columns and 'dropped.1' in places
    learn.summary()

    class CancelAtStart(Callback):
        order = -50
        def before_train(self): raise CancelFitException()
    learn.fit(1, cbs=CancelAtStart())
    pd.testing.assert_frame_equal(learn.tar.history, history)
    assert learn.tar.places == places


def test_per_layer_coefficients_on_a_contract_model_without_an_rnn_module(dls):
    "alpha/beta lists count the layers the first forward returns, as the README's rule says"
    torch.manual_seed(0)
    _, spy, outs = fit_with(dls, NoRNN(len(dls.vocab)), TARCallback(alpha=[2., 0.], beta=[0., 1.], all_layers=True))
    expected = [ref_penalty(2., 0., d[0]) + ref_penalty(0., 1., r[1]) for _, r, d in outs]
    assert spy.added == [penalty(e) for e in expected] and min(expected) > 1e-3


def test_two_callbacks_on_a_contract_model_both_read_the_output(dls):
    "The first callback hands the loss the logits; the second still reads dropped and raw, not the LSTM it finds"
    c1, c2 = TARCallback(0., 1.), TARCallback(2., 0.)
    _, spy, outs = fit_with(dls, lmmodel7(dls), ModelResetter, c1, c2)
    assert [t.name for t in c2.targets] == ['dropped', 'raw']
    expected = [ref_penalty(2., 1., d) - ref_penalty(0., 1., d) + ref_penalty(0., 1., r) for _, r, d in outs]
    assert spy.added == [penalty(e) for e in expected]


class PlainInEval(LMModel7):
    "Returns the contract in training, the logits alone in eval (as some users' models do)"
    def forward(self, x):
        out = super().forward(x)
        return out if self.training else out[0]


def test_a_model_returning_plain_logits_in_eval_validates_and_predicts(dls):
    torch.manual_seed(0)
    learn, spy, outs = fit_with(dls, PlainInEval(len(dls.vocab), 16, 2, 0.4), ModelResetter, TARCallback())
    assert len(learn.recorder.values) == 1  # the fit's validation ran
    preds, _ = learn.get_preds()
    assert preds.shape[-1] == len(dls.vocab)
    assert spy.added == [penalty(ref_penalty(2., 1., d) - ref_penalty(0., 1., d) + ref_penalty(0., 1., r))
                         for _, r, d in outs]


class LSTMLM(Module):
    "Embedding, nn.LSTM, Linear: no contract, so the LSTM is hooked"
    def __init__(self, vocab_sz, n=16):
        self.e, self.rnn, self.o = nn.Embedding(vocab_sz, n), nn.LSTM(n, n, batch_first=True), nn.Linear(n, vocab_sz)
    def forward(self, x): return self.o(self.rnn(self.e(x))[0])


class Flatten(Callback):
    "A callback before ours that replaces learn.pred by a tensor made from the model's output"
    order = 0
    def after_pred(self): self.learn.pred = self.pred.view(-1, self.pred.shape[-1])


def test_a_callback_that_derives_pred_from_the_output_keeps_the_penalty(dls):
    torch.manual_seed(0)
    model = LSTMLM(len(dls.vocab))
    cap = Capture(model.rnn)
    _, spy, _ = fit_with(dls, model, TARCallback(), Flatten())
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs]


class OwnOneBatch(Learner):
    "A Learner subclass whose one_batch is its own (fastai's body, no super())"
    def one_batch(self, i, b):
        self.iter = i
        b = self._set_device(b)
        self._split(b)
        self._with_events(self._do_one_batch, 'batch', CancelBatchException)


def test_a_learner_subclass_with_its_own_one_batch_keeps_the_hooks(dls):
    torch.manual_seed(0)
    model = LSTMLM(len(dls.vocab))
    cap, spy = Capture(model.rnn), LossSpy()
    learn = OwnOneBatch(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(), spy])
    quiet_fit(learn)
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs] and len(spy.added) > 0


def test_coefficient_errors_name_the_modules_and_empty_lists_fail_at_construction(dls):
    learn = Learner(dls, LSTMLM(len(dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(alpha=[1., 2.]))
    with pytest.raises(ValueError, match=r'alpha has 2 coefficients but .*modules names 1'):
        quiet_fit(learn)
    for kw in (dict(alpha=[]), dict(beta=())):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}=.* has no coefficient"): TARCallback(**kw)
