"""fastai's RNN contract (issue 10): a model returning `(logits, raw, dropped)` trains with TARCallback alone exactly as
with fastai's RNNCallback + RNNRegularizer, on the fastai book's chapter 12 model and data and on fastai's AWD-LSTM."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from fastai.text.all import (AWD_LSTM, Callback, CrossEntropyLossFlat, Learner, Module, ModelResetter, RNNCallback,
                             RNNRegularizer, TextLearner, get_language_model, language_model_learner, rnn_cbs)

from fastai_tar import TARCallback
from fastai_tar.tools.book import human_numbers_dls
from fastai_tar.contract import TupleLossError, read_contract
from conftest import LossSpy, hook_ids, penalty, quiet_fit, ref_penalty, tiny_config

BS, SL, NH = 8, 8, 16


@pytest.fixture(scope='module')
def dls():
    "The chapter's data at a tiny size: the numbers 1 to 300 in words, 8 streams of 8 tokens (14 batches an epoch)."
    return human_numbers_dls(upto=300, bs=BS, sl=SL)


class LMModel7(Module):
    "The fastai book's chapter 12 LMModel7, as printed there (`bs` as an argument instead of a global)."
    def __init__(self, vocab_sz, n_hidden, n_layers, p, bs=BS):
        self.i_h = nn.Embedding(vocab_sz, n_hidden)
        self.rnn = nn.LSTM(n_hidden, n_hidden, n_layers, batch_first=True)
        self.drop = nn.Dropout(p)
        self.h_o = nn.Linear(n_hidden, vocab_sz)
        self.h_o.weight = self.i_h.weight
        self.h = [torch.zeros(n_layers, bs, n_hidden) for _ in range(2)]

    def forward(self, x):
        raw, h = self.rnn(self.i_h(x), self.h)
        out = self.drop(raw)
        self.h = [h_.detach() for h_ in h]
        return self.h_o(out), raw, out

    def reset(self):
        for h in self.h: h.zero_()


def lmmodel7(dls, seed=0): torch.manual_seed(seed); return LMModel7(len(dls.vocab), NH, 2, 0.4)


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


# --- the fastai book's chapter 12 --------------------------------------------------------------------------------
def test_book_lmmodel7_plain_learner_matches_rnn_callback_and_regularizer(dls):
    "The issue's first case (it crashed in the loss): ModelResetter + TARCallback(2, 1) is the book's recipe."
    fastai = train(Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(),
                           cbs=[ModelResetter, RNNCallback, RNNRegularizer(alpha=2, beta=1)]))
    learn = Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(), cbs=[ModelResetter, TARCallback(2, 1)])
    ours = train(learn)
    assert_same_training(ours, fastai)
    assert ours[2] == [] and hook_ids(learn.model) == set()
    assert learn.tar.places == "AR dropped (output[2]): alpha=2.0\nTAR raw (output[1]): beta=1.0"
    with learn.no_bar(): preds, _ = learn.get_preds()  # predictions are the logits too
    assert preds.shape == (len(dls.valid) * BS, SL, len(dls.vocab))


def test_book_lmmodel7_text_learner_matches_fastai(dls):
    "The issue's second case (AR moved to the raw output, 1.9e-2 off): TextLearner's own RNNRegularizer(2, 1)."
    fastai = train(TextLearner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat()))
    ours = train(TextLearner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(2, 1)))
    assert_same_training(ours, fastai)
    assert len(ours[2]) == 1 and "switches off fastai's RNNRegularizer" in ours[2][0]  # the places are the same


def test_book_lmmodel7_with_fastai_rnn_callback_kept(dls):
    "RNNCallback strips the tuple before TARCallback sees it: the terms are read from what it keeps."
    fastai = train(Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs(2., 1.)))
    ours = train(Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(),
                         cbs=[ModelResetter(), RNNCallback(), TARCallback(2., 1.)]))
    assert_same_training(ours, fastai)


def test_book_lmmodel7_with_named_modules_matches_fastai(dls):
    "The issue's third case (it crashed too): modules named, the tuple is still stripped; hooks read the same tensors."
    fastai = train(Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs(2., 1.)), n_epoch=2)
    ours = train(Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(),
                         cbs=[ModelResetter(), TARCallback(2., 1., modules='rnn', ar_modules='drop')]), n_epoch=2)
    assert_same_training(ours, fastai)


# --- fastai's own AWD-LSTM language model --------------------------------------------------------------------------
def awd_lm(dls, seed=0):
    torch.manual_seed(seed)
    return get_language_model(AWD_LSTM, len(dls.vocab), config=tiny_config())


def test_awd_lstm_lm_plain_learner_matches_fastai(dls):
    fastai = train(Learner(dls, awd_lm(dls), loss_func=CrossEntropyLossFlat(), cbs=rnn_cbs(2., 1.)), n_epoch=2)
    ours = train(Learner(dls, awd_lm(dls), loss_func=CrossEntropyLossFlat(), cbs=[ModelResetter(), TARCallback()]),
                 n_epoch=2)
    assert_same_training(ours, fastai)


def test_awd_lstm_language_model_learner_matches_fastai(dls):
    def make(**kw):
        torch.manual_seed(0)
        return language_model_learner(dls, AWD_LSTM, config=tiny_config(), pretrained=False, **kw)
    fastai, ours = train(make(), n_epoch=2), train(make(cbs=TARCallback()), n_epoch=2)
    assert_same_training(ours, fastai)
    assert len(ours[2]) == 1  # the switch-off warning only: the places are RNNRegularizer's


# --- per-layer lists ---------------------------------------------------------------------------------------------
class ListLM(Module):
    "Two LSTM layers with dropout after each, returning per-layer lists, as fastai v1's AWD-LSTM did."
    def __init__(self, vocab_sz, nh=NH, p=0.3):
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


def test_per_layer_lists_last_layer_by_default_as_fastai(dls):
    fastai = train(Learner(dls, list_lm(dls), loss_func=CrossEntropyLossFlat(),
                           cbs=[RNNCallback(), RNNRegularizer(2., 1.)]),
                   n_epoch=2)
    ours = train(Learner(dls, list_lm(dls), loss_func=CrossEntropyLossFlat(), cbs=TARCallback()), n_epoch=2)
    assert_same_training(ours, fastai)


def test_per_layer_lists_all_layers_regularizes_each_layer(dls):
    preds, spy, tar = PredSpy(), LossSpy(), TARCallback(alpha=2., beta=1., all_layers=True)
    learn = Learner(dls, list_lm(dls), loss_func=CrossEntropyLossFlat(), cbs=[tar, preds, spy])
    quiet_fit(learn)
    refs = [sum(ref_penalty(2., 0., d) + ref_penalty(0., 1., r) for r, d in zip(raws, drops))
            for raws, drops in preds.preds]  # 2*AR(dropped[i]) + TAR(raw[i]) over both layers
    assert spy.added == [penalty(v) for v in refs]
    assert [c for c in tar.history.columns if ':' in c] == ['ar:dropped.0', 'ar:dropped.1', 'tar:raw.0', 'tar:raw.1']


# --- a model on the contract with no nn.RNN module ----------------------------------------------------------------
class CellLM(Module):
    "A GRUCell unrolled by hand: nothing for the structural search to find, the contract says where."
    def __init__(self, vocab_sz, nh=NH, p=0.3, contract=True):
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


def test_contract_model_without_rnn_module_matches_fastai(dls):
    def make(cbs):
        torch.manual_seed(0)
        return Learner(dls, CellLM(len(dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=cbs)
    assert_same_training(train(make(TARCallback()), n_epoch=2),
                         train(make([RNNCallback(), RNNRegularizer(2., 1.)]), n_epoch=2))


def test_without_contract_or_rnn_module_the_search_error_comes_at_the_first_batch(dls):
    learn = Learner(dls, CellLM(len(dls.vocab), contract=False), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    with pytest.raises(ValueError, match='found nothing to regularize in CellLM'): quiet_fit(learn)
    assert hook_ids(learn.model) == set()


# --- where AR and TAR read, visible before training -----------------------------------------------------------------
class PlainLM(Module):
    "LMModel7 without the contract: its forward returns the logits only."
    def __init__(self, vocab_sz): self.i_h, self.rnn, self.drop, self.h_o = (
        nn.Embedding(vocab_sz, NH), nn.LSTM(NH, NH, batch_first=True), nn.Dropout(0.4), nn.Linear(NH, vocab_sz))
    def forward(self, x): return self.h_o(self.drop(self.rnn(self.i_h(x))[0]))


def test_places_before_training_name_both_candidates_and_the_fit_settles_them(dls):
    learn = Learner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(), cbs=[ModelResetter(), TARCallback()])
    candidates = ("if the model's forward returns fastai's (logits, raw, dropped):\n"
                  "  AR dropped (output[2]): alpha=2.0\n  TAR raw (output[1]): beta=1.0\n"
                  "otherwise, found from the model's structure:\n"
                  "  AR rnn (LSTM): alpha=2.0\n  TAR rnn (LSTM): beta=1.0")
    assert learn.tar.places == candidates
    plain = Learner(dls, PlainLM(len(dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    assert plain.tar.places == candidates  # before a forward, a model's output is not known
    quiet_fit(plain)
    assert plain.tar.places == "AR rnn (LSTM): alpha=2.0\nTAR rnn (LSTM): beta=1.0"  # AR on the raw LSTM output
    named = Learner(dls, PlainLM(len(dls.vocab)), loss_func=CrossEntropyLossFlat(),
                    cbs=TARCallback(modules='rnn', ar_modules='drop'))
    assert named.tar.places == "AR drop (Dropout): alpha=2.0\nTAR rnn (LSTM): beta=1.0"  # named: nothing to decide
    assert TARCallback().places == "found when attached to a learner"


def test_places_that_differ_from_the_switched_off_regularizer_warn_once_naming_both(dls):
    learn = TextLearner(dls, lmmodel7(dls), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(modules='rnn'))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        quiet_fit(learn); quiet_fit(learn)
    moved = [str(x.message) for x in w if 'would have used' in str(x.message)]
    assert len(moved) == 1
    assert 'AR rnn (LSTM)' in moved[0] and 'TAR rnn (LSTM)' in moved[0] and 'output[2]' in moved[0]


# --- what is recognised, and tuples that are not the contract --------------------------------------------------------
B, T, H, V = 4, 5, 6, 7
t = lambda *shape, dtype=torch.float32: torch.zeros(shape, dtype=dtype)


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
    (t(B, T, V), t(B + 1, T, H), t(B + 1, T, H)),  # another batch size
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


class PairLM(PlainLM):
    "A model returning (logits, raw): not the contract."
    def forward(self, x):
        raw = self.rnn(self.i_h(x))[0]
        return self.h_o(self.drop(raw)), raw


def test_a_tuple_reaching_a_tensor_loss_is_our_error_not_an_attribute_error(dls):
    learn = Learner(dls, PairLM(len(dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    with pytest.raises(TupleLossError, match=r"tuple of 2 .* reach the loss CrossEntropyLossFlat.*it has 2 items, not "
                                             r"three\. Return only the logits"):
        quiet_fit(learn)
    learn = Learner(dls, lmmodel7(dls), loss_func=nn.CrossEntropyLoss(),
                    cbs=[ModelResetter(), TARCallback(contract=False)])
    with pytest.raises(TupleLossError,
                       match=r"CrossEntropyLoss.*TARCallback\(contract=False\) leaves tuples to the loss"):
        quiet_fit(learn)
    assert hook_ids(learn.model) == set()


def test_a_loss_that_takes_the_tuple_keeps_working(dls):
    "contract=False hands LMModel7's tuple to the user's loss; a tuple the rule does not recognise reaches it anyway."
    seen = []
    def tuple_loss(pred, y):
        seen.append(type(pred))
        return CrossEntropyLossFlat()(pred[0], y) + 0.5 * pred[1].pow(2).mean()
    spy = LossSpy()
    learn = Learner(dls, lmmodel7(dls), loss_func=tuple_loss,
                    cbs=[ModelResetter(), spy, TARCallback(modules='rnn', ar_modules='drop', contract=False)])
    quiet_fit(learn)
    assert set(seen) == {tuple} and min(spy.added) > 1e-3  # the loss got the tuple, the hooks the activations
    seen.clear()
    quiet_fit(Learner(dls, PairLM(len(dls.vocab)), loss_func=tuple_loss, cbs=TARCallback()))
    assert set(seen) == {tuple}
