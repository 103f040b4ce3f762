"TARCallback's core contract (issue 2): the penalty fastai defines, applied once, on any batch, training only."
import warnings

import pytest
import torch
from torch import nn
from fastai.text.all import (AWD_LSTM, CrossEntropyLossFlat, DataLoaders, Learner, RNNRegularizer,
                             get_text_classifier, language_model_learner, rnn_cbs, text_classifier_learner)

from fastai_tar import TARCallback
from conftest import (SL, VOCAB, Capture, LossSpy, clas_dls, far, hook_ids, lm_dls, penalty, quiet_fit,
                      ref_ar, ref_penalty, ref_tar, tiny_config, tiny_lm)


def first_batch(model, cbs, dls=None, seed=1):
    "loss and loss_grad of one training batch; reseeded so that every run draws the same dropout masks."
    spy = LossSpy(stop=1)
    learn = Learner(dls or lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=list(cbs) + [spy])
    torch.manual_seed(seed)
    quiet_fit(learn, lr=1e-3)
    return spy.train[0]


@pytest.mark.parametrize('alpha,beta', [(2., 1.), (0., 3.), (1.5, 0.)])
def test_loss_grad_matches_fastai_rnn_cbs(alpha, beta):
    "One batch of a fastai AWD-LSTM LM: TARCallback alone gives fastai's RNNCallback+RNNRegularizer loss_grad."
    loss_fa, grad_fa = first_batch(tiny_lm(), rnn_cbs(alpha, beta))
    loss_us, grad_us = first_batch(tiny_lm(), [TARCallback(alpha, beta)])
    assert loss_us == pytest.approx(loss_fa.item(), abs=1e-6)  # the loss saw only the logits
    assert grad_us.item() == pytest.approx(grad_fa.item(), abs=1e-5)
    assert grad_us.item() - loss_us.item() > 1e-4  # the penalty is not negligible: the test can fail


def test_bs1_is_regularized_unlike_fastai():
    "fastai's `len(h)>1` guard skips TAR at bs=1; ours applies it (checked against the reference formula)."
    dls = lm_dls(bs=1)
    model = tiny_lm()
    cap = Capture(model[0])
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=5.)], dls=dls)
    assert cap.outputs[0].shape[0] == 1
    assert (grad - loss).item() == penalty(5 * ref_tar(cap.outputs[0]))
    loss_fa, grad_fa = first_batch(tiny_lm(), rnn_cbs(0., 5.), dls=dls)
    assert grad_fa == loss_fa  # fastai's defect this plugin fixes


def test_sl1_gives_zero_tar_not_nan():
    dls = lm_dls(sl=1)
    loss, grad = first_batch(tiny_lm(), [TARCallback(alpha=0., beta=1.)], dls=dls)
    assert torch.isfinite(grad) and grad == loss
    _, grad_fa = first_batch(tiny_lm(), rnn_cbs(0., 1.), dls=dls)
    assert torch.isnan(grad_fa)  # fastai's defect: the mean of an empty difference


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
    assert [str(x.message) for x in w if 'RNNRegularizer' in str(x.message)][0].count('alpha=0') == 2  # says how
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


# A classifier batch as fastai builds one: longest first, whole bptt chunks of padding first, the rest of a
# sequence's padding after it. Rows real at each chunk start form a prefix of the batch (SentenceEncoder's
# `real_bs` assumes so); padding crosses chunk boundaries (rows 2 and 3) and ends some rows (rows 1 to 3).
BPTT, LENGTHS = 4, [12, 10, 7, 3]


def encoded_batch(cap):
    "The SentenceEncoder's (outs, valid) of the one training batch, checked to be what fastai means it to be."
    (outs, valid), = [(h, v) for h, v, training in cap.records if training]
    assert valid.sum(1).tolist() == LENGTHS and (~valid[:, :BPTT]).any() and (~valid[:, -1]).any()
    assert (outs.abs().sum(-1)[valid] > 0).all()  # every real token went through the LSTM: no zero row as 'valid'
    return outs, valid


def classifier_batch(cbs, dls):
    "What `cbs` added to the first batch's loss of a fresh tiny classifier, and its SentenceEncoder's (outs, valid)."
    torch.manual_seed(0)
    m = get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=BPTT, config=tiny_config(clas=True))
    cap = Capture(m[0])
    loss, grad = first_batch(m, cbs, dls=dls)
    return (grad - loss).item(), *encoded_batch(cap)


def test_classifier_padding_changes_nothing():
    "TAR/AR of a padded classifier batch equal the reference over the real tokens only; fastai's counts padding."
    dls = clas_dls(LENGTHS, seq_len=BPTT)
    added, outs, valid = classifier_batch([TARCallback(alpha=0., beta=4.)], dls)
    assert added == penalty(4 * ref_tar(outs, valid))
    added_fa, _, _ = classifier_batch(rnn_cbs(0., 4.), dls)
    assert added_fa != pytest.approx(added, rel=1e-3)  # padding counted there

    # AR is a mean over the real positions only
    added, outs, valid = classifier_batch([TARCallback(alpha=3., beta=0.)], dls)
    assert added == penalty(3 * ref_ar(outs, valid))
    assert far(3 * ref_ar(outs), 3 * ref_ar(outs, valid))  # the padded positions would count otherwise


def test_text_classifier_learner_counts_penalty_once_over_real_tokens():
    "fastai's own classifier learner (RNNCallback + RNNRegularizer(2, 1)): the penalty is ours, once, on real tokens."
    dls = clas_dls(LENGTHS, seq_len=BPTT)
    torch.manual_seed(0)
    learn = text_classifier_learner(dls, AWD_LSTM, seq_len=BPTT, config=tiny_config(clas=True), pretrained=False,
                                    loss_func=CrossEntropyLossFlat(), cbs=TARCallback(alpha=3., beta=4.))
    reg = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer))
    cap, spy = Capture(learn.model[0]), LossSpy(stop=1)
    with pytest.warns(UserWarning, match="switches off fastai's RNNRegularizer"): quiet_fit(learn, cbs=spy)
    outs, valid = encoded_batch(cap)
    expected = ref_penalty(3., 4., (outs, valid))
    assert spy.added[0] == penalty(expected)
    # fastai's own term on the same tensors: counting it as well (or instead) would miss the tolerance
    fastai = (2 * outs.float().pow(2).mean() + 1 * (outs[:, 1:] - outs[:, :-1]).float().pow(2).mean()).item()
    assert far(expected + fastai, expected) and far(fastai, expected)
    assert (reg.alpha, reg.beta) == (2., 1.)  # given back after the fit


class SeqFirstLSTM(nn.Module):
    "A plain language model on `nn.LSTM(batch_first=False)`: the time axis is 0 inside."
    def __init__(self, hidden=10):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(VOCAB, 6), nn.LSTM(6, hidden), nn.Linear(hidden, VOCAB)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x).transpose(0, 1))
        return self.out(h.transpose(0, 1))


class PackedGRU(nn.Module):
    "Runs a GRU on a PackedSequence: token 0 marks padding at the end of each sequence."
    def __init__(self, hidden=10):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(VOCAB, 6), nn.GRU(6, hidden, batch_first=True), nn.Linear(hidden, 2)

    def forward(self, x):
        lengths = (x != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.out(h.sum(1))


def test_seq_first_lstm_against_awd_lstm_reference():
    "nn.LSTM(batch_first=False) is found on its own; TAR is the AWD-LSTM reference code's (h[1:]-h[:-1]) formula."
    torch.manual_seed(0)
    model = SeqFirstLSTM()
    cap = Capture(model.rnn)
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=2.)])
    h = cap.outputs[0].double()  # sl x bs x n_hid
    assert h.shape[0] == SL
    ref = (h[1:] - h[:-1]).pow(2).mean()  # salesforce awd-lstm-lm main.py
    assert (grad - loss).item() == penalty(2 * ref.item())
    assert ref.item() == pytest.approx(ref_tar(h, seq_dim=0), rel=1e-12)  # the shared reference reads axis 0 alike


def test_packed_sequence_against_reference_on_unpadded_steps():
    x = torch.randint(1, VOCAB, (4, SL))
    lengths = [SL, 7, 3, 1]
    for i, n in enumerate(lengths): x[i, n:] = 0
    y = torch.tensor([0, 1, 1, 0])
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=4, shuffle=False, device='cpu', num_workers=0)
    torch.manual_seed(0)
    model = PackedGRU()
    cap = Capture(model.rnn)
    loss, grad = first_batch(model, [TARCallback(alpha=1., beta=2.)], dls=dls)
    (h, valid), = cap.parts  # unpacked: `valid` from the PackedSequence's lengths
    assert valid.sum(1).tolist() == lengths
    assert (grad - loss).item() == penalty(ref_penalty(1., 2., (h, valid)))
    assert far(ref_penalty(1., 2., h), ref_penalty(1., 2., (h, valid)))  # the padded steps would count otherwise


def test_validation_and_get_preds_add_nothing_and_keep_nothing():
    learn = Learner(lm_dls(), tiny_lm(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    spy = LossSpy()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=spy)
        assert spy.valid_added and max(map(abs, spy.valid_added)) == 0.
        assert min(spy.added) > 1e-4  # the same spy sees the penalty in training: it can tell
        preds, targs = learn.get_preds()
        learn.validate(cbs=spy)
    assert preds.shape == (len(learn.dls.valid_ds), SL, VOCAB)  # the loss and get_preds saw only the logits
    assert len(spy.valid_added) == 2 * len(learn.dls.valid) and max(map(abs, spy.valid_added)) == 0.
    assert hook_ids(learn.model) == set()
    assert learn.tar._stats == {}


@pytest.mark.parametrize('bad', [-1., float('nan'), float('inf'), 'big', None])
def test_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match='beta'): TARCallback(beta=bad)
    with pytest.raises(ValueError, match='alpha'): TARCallback(alpha=bad)


def test_nothing_to_regularize_says_what_it_looked_for():
    model = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, VOCAB))
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    with pytest.raises(ValueError, match=r"AWD_LSTM.*nn.LSTM.*modules="):
        quiet_fit(learn)
    assert hook_ids(model) == set()


def test_custom_module_by_name():
    "A module named in `modules=` is regularized with `seq_dim` telling its time axis."
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.out = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, VOCAB)
        def forward(self, x): return self.out(torch.tanh(self.mix(self.emb(x))))
    torch.manual_seed(0)
    model = Conv()
    cap = Capture(model.mix)
    with pytest.raises(ValueError, match=r"time axis of mix \(Linear\)'s output.*Pass seq_dim="):
        first_batch(model, [TARCallback(alpha=0., beta=2., modules='mix')])
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=2., modules='mix', seq_dim=1)])
    assert (grad - loss).item() == penalty(2 * ref_tar(cap.outputs[0]))
    assert ref_tar(cap.outputs[0]) > 1e-4
