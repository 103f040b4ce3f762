"TARCallback's core contract (issue 2): the penalty fastai defines, applied once, on any batch, training only."
import warnings

import pytest
import torch
from torch import nn
from fastai.text.all import (AWD_LSTM, CancelFitException, Callback, CrossEntropyLossFlat, DataLoaders, Learner,
                             RNNRegularizer, get_text_classifier, language_model_learner, rnn_cbs)

from fastai_tar import TARCallback
from conftest import BS, SL, VOCAB, lm_dls, tiny_config, tiny_lm


class GrabLoss(Callback):
    "Keep the first training batch's loss and loss_grad, then stop."
    order = 50  # after every callback that edits loss_grad

    def after_loss(self):
        if not self.training: return
        self.plain, self.total = self.learn.loss.detach().clone(), self.learn.loss_grad.detach().clone()
        raise CancelFitException()


class Capture(Callback):
    "Forward hooks of the test's own, to build references from the very tensors the model produced."
    def __init__(self, modules): self.modules, self.outputs = modules, []

    def before_fit(self):
        self.handles = [m.register_forward_hook(lambda m, i, o: self.outputs.append(o)) for m in self.modules]

    def after_fit(self):
        for h in self.handles: h.remove()


def first_batch(model, cbs, dls=None, seed=1):
    "loss and loss_grad of one training batch; reseeded so that every run draws the same dropout masks."
    grab = GrabLoss()
    learn = Learner(dls or lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=list(cbs) + [grab])
    torch.manual_seed(seed)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return grab.plain, grab.total


def penalty(expected):
    "The added penalty is read as loss_grad - loss, two float32 numbers near the loss: one ulp of it is the limit."
    return pytest.approx(expected, rel=1e-5, abs=1e-6)


def ref_tar(h, valid=None):
    "Merity's TAR in float64 on batch-first `h`: mean over features and over pairs whose two steps are valid."
    h = h.double()
    d2 = (h[:, 1:] - h[:, :-1]).pow(2).sum(-1)
    if valid is None: return d2.mean() / h.shape[-1]
    pairs = valid[:, 1:] & valid[:, :-1]
    return (d2 * pairs).sum() / (pairs.sum() * h.shape[-1])


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
    cap = Capture([model[0]])
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=5.), cap], dls=dls)
    assert cap.outputs[0].shape[0] == 1
    assert (grad - loss).item() == penalty(5 * ref_tar(cap.outputs[0].detach()).item())
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
    learn, grab = make(cbs=TARCallback()), GrabLoss()
    reg = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        torch.manual_seed(1)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=grab)
    assert [str(x.message) for x in w if 'RNNRegularizer' in str(x.message)][0].count('alpha=0') == 2  # says how
    assert len([x for x in w if 'RNNRegularizer' in str(x.message)]) == 1
    assert (reg.alpha, reg.beta) == (2., 1.)  # the learner is left as it was found

    plain, grab_fa = make(), GrabLoss()  # fastai's own regularizer alone: the penalty counted once
    torch.manual_seed(1)
    with plain.no_bar(), plain.no_logging(): plain.fit(1, 1e-3, cbs=grab_fa)
    once = (grab_fa.total - grab_fa.plain).item()
    assert once > 1e-4
    assert (grab.total - grab.plain).item() == pytest.approx(once, rel=1e-4)


def test_warns_once_over_several_fits():
    torch.manual_seed(0)
    learn = language_model_learner(lm_dls(n=4), AWD_LSTM, config=tiny_config(), pretrained=False, cbs=TARCallback())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging():
            for _ in range(3): learn.fit(1, 1e-3)
    assert len([x for x in w if 'RNNRegularizer' in str(x.message)]) == 1


def clas_batch(pad_idx=1):
    "Two sequences of different lengths, padded at the start as fastai's classifier batches are."
    g = torch.Generator().manual_seed(3)
    x = torch.randint(2, VOCAB, (3, 2 * SL), generator=g)
    x[0, :SL + 3] = pad_idx   # crosses a bptt chunk boundary
    x[1, :2] = pad_idx
    return x, torch.tensor([0, 1, 0])


def test_classifier_padding_changes_nothing():
    "TAR/AR of a padded classifier batch equal the reference over the real tokens only; fastai's counts padding."
    x, y = clas_batch()
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=3, shuffle=False, device='cpu', num_workers=0)

    def model():
        torch.manual_seed(0)
        return get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=SL, config=tiny_config(clas=True), max_len=10 * SL)
    m = model()
    cap = Capture([m[0]])
    loss, grad = first_batch(m, [TARCallback(alpha=0., beta=4.), cap], dls=dls)
    outs, pad = cap.outputs[0]
    valid = ~pad
    assert (~valid).any()
    assert (grad - loss).item() == penalty(4 * ref_tar(outs.detach(), valid).item())
    loss_fa, grad_fa = first_batch(model(), rnn_cbs(0., 4.), dls=dls)
    assert (grad_fa - loss_fa).item() != pytest.approx((grad - loss).item(), rel=1e-3)  # padding counted there

    # AR is a mean over the real positions only
    loss, grad = first_batch(model(), [TARCallback(alpha=3., beta=0.)], dls=dls)
    ar_ref = (outs.detach().double().pow(2).sum(-1) * valid).sum() / (valid.sum() * outs.shape[-1])
    assert (grad - loss).item() == penalty(3 * ar_ref.item())


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
    cap = Capture([model.rnn])
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=2.), cap])
    h = cap.outputs[0][0].detach().double()  # sl x bs x n_hid
    assert h.shape[0] == SL
    ref = (h[1:] - h[:-1]).pow(2).mean()  # salesforce awd-lstm-lm main.py
    assert (grad - loss).item() == penalty(2 * ref.item())


def test_packed_sequence_against_reference_on_unpadded_steps():
    x = torch.randint(1, VOCAB, (4, SL))
    lengths = [SL, 7, 3, 1]
    for i, n in enumerate(lengths): x[i, n:] = 0
    y = torch.tensor([0, 1, 1, 0])
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=4, shuffle=False, device='cpu', num_workers=0)
    torch.manual_seed(0)
    model = PackedGRU()
    cap = Capture([model.rnn])
    loss, grad = first_batch(model, [TARCallback(alpha=1., beta=2.), cap], dls=dls)
    data = cap.outputs[0][0]
    h, lens = nn.utils.rnn.pad_packed_sequence(data, batch_first=True)
    seqs = [h[i, :n].detach().double() for i, n in enumerate(lens.tolist())]
    d2 = torch.cat([(s[1:] - s[:-1]).pow(2).flatten() for s in seqs])
    sq = torch.cat([s.pow(2).flatten() for s in seqs])
    assert (grad - loss).item() == penalty((1 * sq.mean() + 2 * d2.mean()).item())


def hooks_of(model): return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class ReportPenalty(Callback):
    "Records loss_grad - loss of every validation batch and predict/get_preds batch."
    order = 50
    def __init__(self): self.diffs = []
    def after_loss(self):
        if not self.training: self.diffs.append((self.learn.loss_grad - self.learn.loss).abs().item())


def test_validation_and_get_preds_add_nothing_and_keep_nothing():
    learn = Learner(lm_dls(), tiny_lm(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    report = ReportPenalty()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=report)
        assert report.diffs and max(report.diffs) == 0.
        preds, targs = learn.get_preds()
        learn.validate(cbs=report)
    assert preds.shape == (len(learn.dls.valid_ds), SL, VOCAB)  # the loss and get_preds saw only the logits
    assert max(report.diffs) == 0.
    assert hooks_of(learn.model) == 0
    assert learn.tar._stats == {}


@pytest.mark.parametrize('bad', [-1., float('nan'), float('inf'), 'big', None])
def test_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match='beta'): TARCallback(beta=bad)
    with pytest.raises(ValueError, match='alpha'): TARCallback(alpha=bad)


def test_nothing_to_regularize_says_what_it_looked_for():
    model = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, VOCAB))
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    with pytest.raises(ValueError, match=r"AWD_LSTM.*nn.LSTM.*modules="):
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert hooks_of(model) == 0


def test_custom_module_by_name():
    "A module named in `modules=` is regularized with `seq_dim` telling its time axis."
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.out = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, VOCAB)
        def forward(self, x): return self.out(torch.tanh(self.mix(self.emb(x))))
    torch.manual_seed(0)
    model = Conv()
    cap = Capture([model.mix])
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=2., modules='mix'), cap])
    assert (grad - loss).item() == penalty(2 * ref_tar(cap.outputs[0].detach()).item())
    assert ref_tar(cap.outputs[0].detach()).item() > 1e-4
