"""TARCallback with fastai as fastai users use it: the same training as fastai's `RNNCallback` + `RNNRegularizer` on
fastai's AWD-LSTM and on the fastai book's chapter 12 `LMModel7` (plain `Learner`, `TextLearner`, fastai's
`RNNCallback` kept), `language_model_learner` and `text_classifier_learner` with the penalty counted once (fastai's
`RNNRegularizer` switched off, with a warning), fastai's `(logits, raw, dropped)` contract with per-layer lists and on
models without an RNN module, and losses as users write them: a tuple reaching a loss that takes a tensor is our
error, a loss that takes the tuple (or subclasses a torch loss taking `(logits, aux)`) gets it, with `contract=None`
and `contract=False` alike, and the penalty is added on top."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from fastai.text.all import (AWD_LSTM, Callback, CrossEntropyLossFlat, Learner, ModelResetter, Module, RNNCallback,
                             RNNRegularizer, SGD, TextLearner, get_language_model, language_model_learner, rnn_cbs,
                             text_classifier_learner)

from fastai_tar import TARCallback, TupleLossError

from conftest import (Capture, LossSpy, VOCAB, clas_dls, far, hook_ids, lm_dls, penalty, quiet_fit, ref_penalty,
                      tiny_config, tiny_lm)
from models import (BOOK_BS, BOOK_NH, BOOK_SL, BPTT, LENGTHS, NoRNN, PlainLM, encoded_batch, first_batch, fit_with,
                    lmmodel7)


# --- losses: a tuple reaches the loss only where the loss takes it ---------------------------------------------------
class PairLM(PlainLM):
    "A model returning (logits, raw): not the contract."
    def forward(self, x):
        raw = self.rnn(self.i_h(x))[0]
        return self.h_o(self.drop(raw)), raw


def test_a_tuple_reaching_a_tensor_loss_is_our_error_not_an_attribute_error(book_dls):
    learn = Learner(book_dls, PairLM(len(book_dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    with pytest.raises(TupleLossError, match=r"tuple of 2 .* reach the loss CrossEntropyLossFlat.*it has 2 items, not "
                                             r"three\. Return only the logits"):
        quiet_fit(learn)
    learn = Learner(book_dls, lmmodel7(book_dls), loss_func=nn.CrossEntropyLoss(),
                    cbs=[ModelResetter(), TARCallback(contract=False)])
    with pytest.raises(TupleLossError,
                       match=r"CrossEntropyLoss.*TARCallback\(contract=False\) leaves tuples to the loss"):
        quiet_fit(learn)
    assert hook_ids(learn.model) == set()


def test_a_loss_that_takes_the_tuple_keeps_working(book_dls):
    "contract=False hands LMModel7's tuple to the user's loss; a tuple the rule does not recognise reaches it anyway."
    seen = []
    def tuple_loss(pred, y):
        seen.append(type(pred))
        return CrossEntropyLossFlat()(pred[0], y) + 0.5 * pred[1].pow(2).mean()
    spy = LossSpy()
    learn = Learner(book_dls, lmmodel7(book_dls), loss_func=tuple_loss,
                    cbs=[ModelResetter(), spy, TARCallback(modules='rnn', ar_modules='drop', contract=False)])
    quiet_fit(learn)
    assert set(seen) == {tuple} and min(spy.added) > 1e-3  # the loss got the tuple, the hooks the activations
    seen.clear()
    quiet_fit(Learner(book_dls, PairLM(len(book_dls.vocab)), loss_func=tuple_loss, cbs=TARCallback()))
    assert set(seen) == {tuple}


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


# --- equality with fastai's RNNCallback/RNNRegularizer, language_model_learner, text_classifier_learner --------------
@pytest.mark.parametrize('alpha,beta', [(2., 1.), (0., 3.), (1.5, 0.)])
def test_loss_grad_matches_fastai_rnn_cbs(alpha, beta):
    "One batch of a fastai AWD-LSTM LM: TARCallback alone gives fastai's RNNCallback+RNNRegularizer loss_grad."
    loss_fa, grad_fa = first_batch(tiny_lm(), rnn_cbs(alpha, beta))
    loss_us, grad_us = first_batch(tiny_lm(), [TARCallback(alpha, beta)])
    assert loss_us == pytest.approx(loss_fa.item(), abs=1e-6)  # the loss saw only the logits
    assert grad_us.item() == pytest.approx(grad_fa.item(), abs=1e-5)
    assert grad_us.item() - loss_us.item() > 1e-4  # the penalty is not negligible: the test can fail


def test_language_model_learner_counts_penalty_once():
    "fastai's TextLearner adds RNNRegularizer(2, 1): with TARCallback the penalty is added once, with one warning."
    def make(**kw):
        torch.manual_seed(0)
        return language_model_learner(lm_dls(), AWD_LSTM, config=tiny_config(), pretrained=False, **kw)
    learn, grab = make(cbs=TARCallback()), LossSpy(stop=1)
    reg = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        torch.manual_seed(1)
        quiet_fit(learn, lr=1e-3, cbs=grab)
    said = [str(x.message) for x in w if 'RNNRegularizer' in str(x.message)][0]
    assert said.count('alpha=0') == 2 and 'language_model_learner(' in said  # says how
    assert len([x for x in w if 'RNNRegularizer' in str(x.message)]) == 1
    assert (reg.alpha, reg.beta) == (2., 1.)  # the learner is left as it was found

    plain, grab_fa = make(), LossSpy(stop=1)  # fastai's own regularizer alone: the penalty counted once
    torch.manual_seed(1)
    quiet_fit(plain, lr=1e-3, cbs=grab_fa)
    once = grab_fa.added[0]
    assert once > 1e-4
    assert grab.added[0] == pytest.approx(once, rel=1e-4)


def test_warns_once_over_several_fits():
    torch.manual_seed(0)
    learn = language_model_learner(lm_dls(n=4), AWD_LSTM, config=tiny_config(), pretrained=False, cbs=TARCallback())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        for _ in range(3): quiet_fit(learn, lr=1e-3)
    assert len([x for x in w if 'RNNRegularizer' in str(x.message)]) == 1


def test_text_classifier_learner_counts_penalty_once_over_real_tokens():
    "fastai's own classifier learner (RNNCallback + RNNRegularizer(2, 1)): the penalty is ours, once, on real tokens."
    dls = clas_dls(LENGTHS, seq_len=BPTT)
    torch.manual_seed(0)
    learn = text_classifier_learner(dls, AWD_LSTM, seq_len=BPTT, config=tiny_config(clas=True), pretrained=False,
                                    loss_func=CrossEntropyLossFlat(), cbs=TARCallback(alpha=3., beta=4.))
    reg = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer))
    cap, spy = Capture(learn.model[0]), LossSpy(stop=1)
    # the warning names the learner that added the regularizer: a classifier's
    with pytest.warns(UserWarning, match=r"switches off fastai's RNNRegularizer.*text_classifier_learner\(\.\.\., "
                                         r"alpha=0\., beta=0\.\)"):
        quiet_fit(learn, cbs=spy)
    outs, valid = encoded_batch(cap)
    expected = ref_penalty(3., 4., (outs, valid))
    assert spy.added[0] == penalty(expected)
    # fastai's own term on the same tensors: counting it as well (or instead) would miss the tolerance
    fastai = (2 * outs.float().pow(2).mean() + 1 * (outs[:, 1:] - outs[:, :-1]).float().pow(2).mean()).item()
    assert far(expected + fastai, expected) and far(fastai, expected)
    assert (reg.alpha, reg.beta) == (2., 1.)  # given back after the fit


# --- fastai's contract on models without an RNN module and with two callbacks ----------------------------------------
def test_per_layer_coefficients_on_a_contract_model_without_an_rnn_module(book_dls):
    "alpha/beta lists count the layers the first forward returns, as the README's rule says"
    torch.manual_seed(0)
    _, spy, outs = fit_with(book_dls, NoRNN(len(book_dls.vocab)),
                            TARCallback(alpha=[2., 0.], beta=[0., 1.], all_layers=True, contract=True))
    expected = [ref_penalty(2., 0., d[0]) + ref_penalty(0., 1., r[1]) for _, r, d in outs]
    assert spy.added == [penalty(e) for e in expected] and min(expected) > 1e-3


def test_two_callbacks_on_a_contract_model_both_read_the_output(book_dls):
    "The first callback hands the loss the logits; the second still reads dropped and raw, not the LSTM it finds"
    c1, c2 = TARCallback(0., 1.), TARCallback(2., 0.)
    _, spy, outs = fit_with(book_dls, lmmodel7(book_dls), ModelResetter, c1, c2)
    assert [t.name for t in c2.reads] == ['dropped', 'raw']
    expected = [ref_penalty(2., 1., d) - ref_penalty(0., 1., d) + ref_penalty(0., 1., r) for _, r, d in outs]
    assert spy.added == [penalty(e) for e in expected]


# --- the fastai book's chapter 12: the same training as fastai's RNNCallback + RNNRegularizer ------------------------
def train(learn, n_epoch=3, **kw):
    """A multi-epoch one-cycle fit as in the chapter (wd=0.1), reseeded so that every run draws the same dropout masks;
    per training batch (loss, loss_grad) after every callback's after_loss, the final weights, the warnings."""
    spy = LossSpy()
    learn.add_cb(spy)
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(n_epoch, 1e-2, wd=0.1, **kw)
    return spy, [p.detach().clone() for p in learn.model.parameters()], [str(x.message) for x in w]


def assert_same_training(ours, fastai):
    "Per-batch loss_grad within 1e-6 over the whole fit, the same final weights; the penalty mattered."
    (spy, weights, _), (spy_fa, weights_fa, _) = ours, fastai
    grads, grads_fa = [g.item() for _, g in spy.train], [g.item() for _, g in spy_fa.train]
    assert len(grads) == len(grads_fa) >= 28
    np.testing.assert_allclose(grads, grads_fa, rtol=0, atol=1e-6)
    for w, w_fa in zip(weights, weights_fa): torch.testing.assert_close(w, w_fa, rtol=0, atol=1e-6)
    assert min(spy_fa.added) > 1e-3  # fastai's penalty is in every batch: a misplaced term would show


def test_book_lmmodel7_plain_learner_matches_rnn_callback_and_regularizer(book_dls):
    "The issue's first case (it crashed in the loss): ModelResetter + TARCallback(2, 1) is the book's recipe."
    fastai = train(Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(),
                           cbs=[ModelResetter, RNNCallback, RNNRegularizer(alpha=2, beta=1)]))
    learn = Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(),
                    cbs=[ModelResetter, TARCallback(2, 1)])
    ours = train(learn)
    assert_same_training(ours, fastai)
    assert ours[2] == [] and hook_ids(learn.model) == set()
    contract = "fastai's (logits, raw, dropped)"
    assert learn.tar.places == (f"AR dropped (output[2]): alpha=2.0; {contract}\n"
                                f"TAR raw (output[1]): beta=1.0; time axis 1 (batch_first=True); {contract}")
    with learn.no_bar(): preds, _ = learn.get_preds()  # predictions are the logits too
    assert preds.shape == (len(book_dls.valid) * BOOK_BS, BOOK_SL, len(book_dls.vocab))


def test_book_lmmodel7_text_learner_matches_fastai(book_dls):
    "The issue's second case (AR moved to the raw output, 1.9e-2 off): TextLearner's own RNNRegularizer(2, 1)."
    fastai = train(TextLearner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat()))
    ours = train(TextLearner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(2, 1)))
    assert_same_training(ours, fastai)
    assert len(ours[2]) == 1 and "switches off fastai's RNNRegularizer" in ours[2][0]  # the places are the same


def test_book_lmmodel7_with_fastai_rnn_callback_kept(book_dls):
    "RNNCallback strips the tuple before TARCallback sees it: the terms are read from what it keeps."
    fastai = train(Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs(2., 1.)))
    ours = train(Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(),
                         cbs=[ModelResetter(), RNNCallback(), TARCallback(2., 1.)]))
    assert_same_training(ours, fastai)


def test_book_lmmodel7_with_named_modules_matches_fastai(book_dls):
    "The issue's third case (it crashed too): modules named, the tuple is still stripped; hooks read the same tensors."
    fastai = train(Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs(2., 1.)),
                   n_epoch=2)
    ours = train(Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(),
                         cbs=[ModelResetter(), TARCallback(2., 1., modules='rnn', ar_modules='drop')]), n_epoch=2)
    assert_same_training(ours, fastai)


# --- fastai's AWD-LSTM: the same training as language_model_learner --------------------------------------------------
def awd_lm(dls, seed=0):
    torch.manual_seed(seed)
    return get_language_model(AWD_LSTM, len(dls.vocab), config=tiny_config())


def test_awd_lstm_lm_plain_learner_matches_fastai(book_dls):
    fastai = train(Learner(book_dls, awd_lm(book_dls), loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs(2., 1.)),
                   n_epoch=2)
    ours = train(Learner(book_dls, awd_lm(book_dls), loss_func=CrossEntropyLossFlat(),
                         cbs=[ModelResetter(), TARCallback()]), n_epoch=2)
    assert_same_training(ours, fastai)


def test_awd_lstm_language_model_learner_matches_fastai(book_dls):
    def make(**kw):
        torch.manual_seed(0)
        return language_model_learner(book_dls, AWD_LSTM, config=tiny_config(), pretrained=False, **kw)
    fastai, ours = train(make(), n_epoch=2), train(make(cbs=TARCallback()), n_epoch=2)
    assert_same_training(ours, fastai)
    assert len(ours[2]) == 1  # the switch-off warning only: the places are RNNRegularizer's


# --- fastai's contract with per-layer lists --------------------------------------------------------------------------
class ListLM(Module):
    "Two LSTM layers with dropout after each, returning per-layer lists, as fastai v1's AWD-LSTM did."
    def __init__(self, vocab_sz, nh=BOOK_NH, p=0.3):
        self.emb = nn.Embedding(vocab_sz, nh)
        self.rnns = nn.ModuleList([nn.LSTM(nh, nh, batch_first=True) for _ in range(2)])
        self.drops = nn.ModuleList([nn.Dropout(p) for _ in range(2)])
        self.head = nn.Linear(nh, vocab_sz)

    def forward(self, x):
        h, raws, drops = self.emb(x), [], []
        for rnn, drop in zip(self.rnns, self.drops):
            h, _ = rnn(h)
            raws.append(h)
            h = drop(h)
            drops.append(h)
        return self.head(h), raws, drops


class PredSpy(Callback):
    "Each training batch's (raw, dropped) lists, before any callback's after_pred."
    order = -20

    def __init__(self): self.preds = []

    def after_pred(self):
        if self.training: self.preds.append([[t.detach().clone() for t in o] for o in self.pred[1:]])


def list_lm(dls): torch.manual_seed(0); return ListLM(len(dls.vocab))


def test_per_layer_lists_last_layer_by_default_as_fastai(book_dls):
    fastai = train(Learner(book_dls, list_lm(book_dls), loss_func=CrossEntropyLossFlat(),
                           cbs=[RNNCallback(), RNNRegularizer(2., 1.)]), n_epoch=2)
    ours = train(Learner(book_dls, list_lm(book_dls), loss_func=CrossEntropyLossFlat(), cbs=TARCallback()), n_epoch=2)
    assert_same_training(ours, fastai)


def test_per_layer_lists_all_layers_regularizes_each_layer(book_dls):
    preds, spy, tar = PredSpy(), LossSpy(), TARCallback(alpha=2., beta=1., all_layers=True)
    learn = Learner(book_dls, list_lm(book_dls), loss_func=CrossEntropyLossFlat(), cbs=[tar, preds, spy])
    quiet_fit(learn)
    refs = [sum(ref_penalty(2., 0., d) + ref_penalty(0., 1., r) for r, d in zip(raws, drops))
            for raws, drops in preds.preds]  # 2*AR(dropped[i]) + TAR(raw[i]) over both layers
    assert spy.added == [penalty(v) for v in refs]
    assert [c for c in tar.history.columns if ':' in c] == ['ar:dropped.0', 'ar:dropped.1', 'tar:raw.0', 'tar:raw.1']


# --- contract models without an RNN module ---------------------------------------------------------------------------
class ContractCellLM(Module):
    "A GRUCell unrolled by hand: nothing for the structural search to find, the contract says where."
    def __init__(self, vocab_sz, nh=BOOK_NH, p=0.3, contract=True):
        self.emb, self.cell, self.drop = nn.Embedding(vocab_sz, nh), nn.GRUCell(nh, nh), nn.Dropout(p)
        self.head, self.contract = nn.Linear(nh, vocab_sz), contract

    def forward(self, x):
        e = self.emb(x)
        h, outs = e.new_zeros(x.shape[0], self.cell.hidden_size), []
        for t in range(x.shape[1]):
            h = self.cell(e[:, t], h)
            outs.append(h)
        raw = torch.stack(outs, 1)
        dropped = self.drop(raw)
        return (self.head(dropped), raw, dropped) if self.contract else self.head(dropped)


@pytest.mark.parametrize('tar, contract', [(lambda: TARCallback(contract=True), True),
                                           (lambda: TARCallback(ar_modules='drop'), False)],
                         ids=['contract=True', 'cell steps'])
def test_contract_model_without_rnn_module_matches_fastai(book_dls, tar, contract):
    """raw is stacked by hand, not returned by a recurrent module: the contract is not certain, so it is read only
    with contract=True. A model returning the logits alone gets the same: its cell is found, the cell's one-step
    calls are joined into raw for TAR, and AR is named on the dropout."""
    def make(cbs, contract=True):
        torch.manual_seed(0)
        return Learner(book_dls, ContractCellLM(len(book_dls.vocab), contract=contract),
                       loss_func=CrossEntropyLossFlat(), cbs=cbs)
    assert_same_training(train(make(tar(), contract), n_epoch=2),
                         train(make([RNNCallback(), RNNRegularizer(2., 1.)]), n_epoch=2))


def test_without_contract_or_rnn_module_the_search_error_comes_at_the_first_batch(book_dls):
    class MLP(Module):
        def __init__(self, vocab_sz):
            self.emb, self.head = nn.Embedding(vocab_sz, BOOK_NH), nn.Linear(BOOK_NH, vocab_sz)
        def forward(self, x): return self.head(torch.tanh(self.emb(x)))
    learn = Learner(book_dls, MLP(len(book_dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    with pytest.raises(ValueError, match='found nothing to regularize in MLP'): quiet_fit(learn)
    assert hook_ids(learn.model) == set()


# --- the RNNRegularizer switched off: places that differ are said ----------------------------------------------------
def test_places_that_differ_from_the_switched_off_regularizer_warn_once_naming_both(book_dls):
    learn = TextLearner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(modules='rnn'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        quiet_fit(learn); quiet_fit(learn)
    moved = [str(x.message) for x in w if 'would have used' in str(x.message)]
    assert len(moved) == 1
    assert 'AR rnn (LSTM)' in moved[0] and 'TAR rnn (LSTM)' in moved[0] and 'output[2]' in moved[0]


def test_the_loss_gets_the_logits_as_a_callback_before_ours_left_them(book_dls):
    "A temperature applied to the contract's logits by an earlier callback reaches the loss: ours hands on pred[0]"
    class Temperature(Callback):
        order = 0
        def after_pred(self):
            if self.training: self.learn.pred = (self.pred[0] * 10., *self.pred[1:])
    seen = []
    def loss(pred, y):
        seen.append(pred.detach().clone())
        return CrossEntropyLossFlat()(pred, y)
    outs = []
    class Output(Callback):
        order = -10
        def after_pred(self):
            if self.training: outs.append(self.pred[0].detach().clone())
    learn = Learner(book_dls, lmmodel7(book_dls), loss_func=loss,
                    cbs=[ModelResetter(), Output(), Temperature(), TARCallback(alpha=0., beta=0.), LossSpy(stop=1)])
    quiet_fit(learn)
    torch.testing.assert_close(seen[0], outs[0] * 10.)
