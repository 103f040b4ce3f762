"""What the plan reads and in which layout, and how `learn.tar.places` says so: a tuple that is not fastai's
`(logits, raw, dropped)` reaches the loss untouched, `all_layers` means one thing on every learner, the time axis
comes from the user (`seq_dim`, `feature_dim`) or from a module whose layout is known (else an error asks for it),
a model changed between fits is planned again, and a time axis of length 1 is said; sequence-first and packed
outputs, custom modules named by name, integer-like `seq_dim`, models with nothing to regularize, and `places` before
the first batch. Values are checked against float64 references on activations the test captures with its own hooks."""
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from fastai.text.all import (AWD_LSTM, CrossEntropyLossFlat, DataLoaders, Learner, Module, ModelResetter, SGD,
                             TextLearner, language_model_learner)

from fastai_tar import Place, TARCallback

from conftest import (Capture, LossSpy, SL, VOCAB, far, hook_ids, lm_dls, penalty, quiet_fit, ref_ar, ref_penalty,
                      ref_tar, tiny_config, tiny_lm)
from models import AWDGlue, CheckpointLM, PlainLM, WordLM, first_batch, lmmodel7


def fit_batches(learn_or_model, cbs=(), n=1, dls=None, **kw):
    "Fit for `n` training batches (a learner, or a model with `cbs` on a new Learner); the learner, its `LossSpy`."
    spy = LossSpy(stop=n)
    kw.setdefault('loss_func', CrossEntropyLossFlat())
    learn = learn_or_model if isinstance(learn_or_model, Learner) else Learner(
        dls or lm_dls(n=4 * n), learn_or_model, opt_func=SGD, cbs=list(cbs), **kw)
    torch.manual_seed(1)
    quiet_fit(learn, lr=1e-3, cbs=spy)
    return learn, spy


def place(learn, kind, name):
    "The one line of `learn.tar.places` about the `kind` ('AR' or 'TAR') term reading `name`."
    lines = [l for l in learn.tar.places.splitlines() if re.search(rf'\b{kind}\b', l) and name in l]
    assert len(lines) == 1, learn.tar.places
    return lines[0]


def fit_warnings(learn, n=1, **kw):
    "fit_batches, and every warning's message."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        _, spy = fit_batches(learn, n=n, **kw)
    return spy, [str(x.message) for x in w]


class LSTMLM(nn.Module):
    "Embedding -> nn.LSTM (batch first) -> Linear, no dropout."
    def __init__(self, rnn=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(12, VOCAB)
        self.rnn = rnn or nn.LSTM(8, 12, batch_first=True)

    def forward(self, x): return self.head(self.rnn(self.emb(x))[0])


# --- 3. a 3-tuple that is not the contract -------------------------------------------------------------------------
class SeqVAE(nn.Module):
    "A sequence VAE returning (recon, mu, logvar), all batch x time x ...; z = mu, so the model is deterministic."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.GRU(8, 12, batch_first=True)
        self.mu, self.logvar, self.dec = nn.Linear(12, 6), nn.Linear(12, 6), nn.Linear(6, VOCAB)

    def forward(self, x):
        h = self.rnn(self.emb(x))[0]
        mu, logvar = self.mu(h), self.logvar(h)
        return self.dec(mu), mu, logvar


class VAELoss:
    "Reconstruction + KL: it needs the whole tuple; keeps what it was given."
    def __init__(self): self.seen = []

    def __call__(self, pred, y):
        self.seen.append(pred)
        recon, mu, logvar = pred
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
        return CrossEntropyLossFlat()(recon, y) + kl


@pytest.mark.parametrize('kw', [dict(alpha=0., beta=0.), dict(modules='rnn'), dict()],
                         ids=['alpha=beta=0', "modules='rnn'", 'default'])
def test_a_vae_tuple_is_not_the_contract_and_reaches_the_loss(kw):
    model, loss = SeqVAE(), VAELoss()
    cap = Capture(model.rnn)
    _, spy = fit_batches(model, [TARCallback(**kw)], n=2, loss_func=loss)
    assert len(loss.seen) == 2 and all(isinstance(p, tuple) and len(p) == 3 for p in loss.seen)
    a, b = kw.get('alpha', 2.), kw.get('beta', 1.)
    assert spy.added == [penalty(ref_penalty(a, b, h) if a or b else 0.) for h in cap.train_outputs]  # the GRU


# --- 4. all_layers -------------------------------------------------------------------------------------------------
class ListLM(nn.Module):
    "Two LSTM layers with dropout after each, returning per-layer lists (logits, [raw0, raw1], [dropped0, dropped1])."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 12), nn.Linear(12, VOCAB)
        self.rnns = nn.ModuleList([nn.LSTM(12, 12, batch_first=True) for _ in range(2)])
        self.drops = nn.ModuleList([nn.Dropout(0.3) for _ in range(2)])

    def forward(self, x):
        h, raws, drops = self.emb(x), [], []
        for rnn, drop in zip(self.rnns, self.drops):
            raws.append(rnn(h)[0])
            drops.append(h := drop(raws[-1]))
        return self.head(h), raws, drops

    def reset(self): pass  # no state; fastai's ModelResetter calls it


def awd_parts(model):
    "fastai's AWD-LSTM LM: each layer's dropped output (hidden_dps[0], then output_dp) and raw output."
    enc = model[0]
    return [enc.hidden_dps[0], model[1].output_dp], list(enc.rnns)


@pytest.mark.parametrize('arch', ['per-layer lists', 'AWD-LSTM'])
def test_all_layers_is_the_same_on_a_learner_and_on_a_text_learner(arch):
    "Per batch the same penalty on both learners: 2*AR of each layer's dropped output + TAR of each raw one."
    if arch == 'AWD-LSTM':
        plain_model = tiny_lm()
        torch.manual_seed(0)
        text = language_model_learner(lm_dls(n=8), AWD_LSTM, config=tiny_config(), pretrained=False, opt_func=SGD,
                                      cbs=TARCallback(all_layers=True))
        drops, raws = awd_parts(plain_model)
    else:
        plain_model = ListLM()
        text = TextLearner(lm_dls(n=8), ListLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                           cbs=TARCallback(all_layers=True))
        drops, raws = plain_model.drops, plain_model.rnns
    plain = Learner(lm_dls(n=8), plain_model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[ModelResetter(), TARCallback(all_layers=True)])
    drops, raws = [Capture(m) for m in drops], [Capture(m) for m in raws]
    _, spy = fit_batches(plain, n=2)
    spy_text, _ = fit_warnings(text, n=2)
    expected = [sum(2 * ref_ar(d.train_outputs[i]) + ref_tar(r.train_outputs[i]) for d, r in zip(drops, raws))
                for i in range(2)]
    assert spy.added == [penalty(e) for e in expected]
    np.testing.assert_allclose(spy_text.added, spy.added, rtol=0, atol=1e-6)


class BookLM(nn.Module):
    "The book's LMModel7 without its carried state: (logits, raw, dropped) with single tensors, a 2-layer LSTM."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.i_h, self.rnn = nn.Embedding(VOCAB, 12), nn.LSTM(12, 12, 2, batch_first=True)
        self.drop, self.h_o = nn.Dropout(0.3), nn.Linear(12, VOCAB)

    def forward(self, x):
        raw, _ = self.rnn(self.i_h(x))
        out = self.drop(raw)
        return self.h_o(out), raw, out


def test_all_layers_on_a_contract_model_of_single_tensors_is_an_error():
    with pytest.raises(ValueError, match='all_layers'): fit_batches(BookLM(), [TARCallback(all_layers=True)])


# --- 5. layouts ----------------------------------------------------------------------------------------------------
class BatchFirstLSTM(nn.LSTM):
    "An nn.LSTM subclass built with batch_first=False whose own forward is batch-first in and out."
    def forward(self, x, hx=None):
        out, hx = super().forward(x.transpose(0, 1), hx)
        return out.transpose(0, 1), hx


def test_an_lstm_subclass_with_its_own_forward_asks_for_seq_dim():
    with pytest.raises(ValueError, match='seq_dim') as e:
        fit_batches(LSTMLM(BatchFirstLSTM(8, 12)), [TARCallback()])
    assert 'rnn' in str(e.value)
    model = LSTMLM(BatchFirstLSTM(8, 12))  # AR needs no time axis
    cap = Capture(model.rnn)
    _, spy = fit_batches(model, [TARCallback(alpha=2., beta=0.)])
    assert spy.added == [penalty(2 * ref_ar(cap.train_outputs[0]))]


@pytest.mark.parametrize('seq_dim', [1, np.int64(1), -2])
def test_an_lstm_subclass_with_its_own_forward_reads_the_users_seq_dim(seq_dim):
    model = LSTMLM(BatchFirstLSTM(8, 12))
    cap = Capture(model.rnn)
    learn, spy = fit_batches(model, [TARCallback(seq_dim=seq_dim)], n=2)
    hs = cap.train_outputs
    assert hs[0].shape == (4, 12, 12) and far(ref_tar(hs[0], seq_dim=0), ref_tar(hs[0]))  # bs == sl: axes tell apart
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in hs]
    assert re.search(rf'time axis (1|{int(seq_dim)})\b', place(learn, 'TAR', 'rnn'))  # -2 as given, or as 1


class SeqFirstContract(nn.Module):
    "The book's contract from a sequence-first nn.LSTM: raw and dropped are time x batch x features."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(12, VOCAB)

    def forward(self, x):
        raw, _ = self.rnn(self.emb(x).transpose(0, 1))
        dropped = self.drop(raw)
        return self.head(dropped).transpose(0, 1), raw, dropped


@pytest.mark.parametrize('sl', [12, 4])  # bs != sl, and bs == sl
def test_contract_from_a_sequence_first_lstm_reads_tar_along_dim_0(sl):
    model = SeqFirstContract()
    raw, drop = Capture(model.rnn), Capture(model.drop)
    learn, spy = fit_batches(model, [TARCallback()], n=2, dls=lm_dls(n=8, sl=sl))
    pairs = list(zip(raw.train_outputs, drop.train_outputs))
    assert pairs[0][0].shape[:2] == (sl, 4)
    assert far(ref_tar(pairs[0][0], seq_dim=1), ref_tar(pairs[0][0], seq_dim=0))
    assert spy.added == [penalty(2 * ref_ar(d) + ref_tar(r, seq_dim=0)) for r, d in pairs]
    line = place(learn, 'TAR', 'raw')
    assert 'time axis 0' in line and "fastai's (logits, raw, dropped)" in line


class ChannelsFirst(nn.Module):
    "A custom block returning batch x features x time, as tsai's LSTMPlus backbone does."
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 12, batch_first=True)

    def forward(self, x): return self.lstm(x)[0].transpose(1, 2)


class ChannelsFirstLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.body, self.head = nn.Embedding(VOCAB, 8), ChannelsFirst(), nn.Linear(12, VOCAB)

    def forward(self, x): return self.head(self.body(self.emb(x)).transpose(1, 2))


def test_channels_first_output_with_seq_dim_2_and_feature_dim_1():
    model = ChannelsFirstLM()
    cap = Capture(model.body)
    learn, spy = fit_batches(model, [TARCallback(modules='body', seq_dim=2, feature_dim=1)], n=2)
    hs = [h.transpose(1, 2) for h in cap.train_outputs]  # batch x time x features for the reference
    assert far(ref_tar(cap.train_outputs[0]), ref_tar(hs[0]))  # TAR across features would show
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in hs]
    line = place(learn, 'TAR', 'body')
    assert 'time axis 2' in line and 'named by you' in line


# --- 6. the model changed between fits -----------------------------------------------------------------------------
class Stack(nn.Module):
    "LSTM layers in a ModuleList, run in order; no dropout."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(12, VOCAB)
        self.rnns = nn.ModuleList([nn.LSTM(8, 12, batch_first=True)])

    def forward(self, x):
        h = self.emb(x)
        for rnn in self.rnns: h = rnn(h)[0]
        return self.head(h)


def refit_after(learn, change, new):
    "Fit, `change` the model, fit twice more: the second fit's spy, its warnings, the third's, and `new`'s outputs."
    fit_batches(learn)
    change()
    cap = Capture(new())
    spy, warned = fit_warnings(learn, n=2)
    _, warned_again = fit_warnings(learn)
    return spy, [m for m in warned if 'changed' in m], [m for m in warned_again if 'changed' in m], cap


def test_a_layer_appended_between_fits_is_read_and_said_once():
    model = Stack()
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback())
    spy, warned, warned_again, cap = refit_after(
        learn, lambda: model.rnns.append(nn.LSTM(12, 12, batch_first=True)), lambda: model.rnns[1])
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs[:2]]
    assert len(warned) == 1 and warned_again == []
    place(learn, 'TAR', 'rnns.1')  # the plan says so


@pytest.mark.parametrize('kw', [dict(), dict(modules='rnn')], ids=['found', "modules='rnn'"])
def test_a_layer_swapped_between_fits_is_read_and_said_once(kw):
    model = LSTMLM()
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback(**kw))
    def swap(): torch.manual_seed(2); model.rnn = nn.GRU(8, 12, batch_first=True)
    spy, warned, warned_again, cap = refit_after(learn, swap, lambda: model.rnn)
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs[:2]]
    assert len(warned) == 1 and warned_again == []


# --- 8. a time axis of length 1 ------------------------------------------------------------------------------------
def test_a_time_axis_of_length_1_warns_once_per_fit_and_tar_is_0():
    learn = Learner(lm_dls(n=12, sl=1), LSTMLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=TARCallback(alpha=0., beta=1.))
    spy, warned = fit_warnings(learn, n=3)
    assert spy.added == [0., 0., 0.]
    assert len([m for m in warned if 'length 1' in m]) == 1


# --- layouts read from the module, custom modules by name, nothing to regularize -------------------------------------
class SeqFirstLSTM(nn.Module):
    "A plain language model on `nn.LSTM(batch_first=False)`: the time axis is 0 inside."
    def __init__(self, hidden=10):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(VOCAB, 6), nn.LSTM(6, hidden), nn.Linear(hidden, VOCAB)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x).transpose(0, 1))
        return self.out(h.transpose(0, 1))


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


# --- a bare PackedSequence output; the user's seq_dim ----------------------------------------------------------------
class BarePacked(nn.Module):
    "A GRU that returns its PackedSequence alone, not inside an (output, state) tuple."
    def __init__(self): super().__init__(); self.gru = nn.GRU(6, 10, batch_first=True)
    def forward(self, packed): return self.gru(packed)[0]


class PackedClassifier(nn.Module):
    "Token 0 pads the end of each sequence; the GRU runs on the packed batch."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.out = nn.Embedding(VOCAB, 6), BarePacked(), nn.Linear(10, 2)

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(x), (x != 0).sum(1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed), batch_first=True, total_length=x.shape[1])
        return self.out(h.sum(1))


def padded_dls(lengths=(SL, 7, 3, 1)):
    x = torch.randint(2, VOCAB, (len(lengths), SL), generator=torch.Generator().manual_seed(0))
    for i, n in enumerate(lengths): x[i, n:] = 0
    items = list(zip(x, torch.tensor([0, 1] * (len(lengths) // 2))))
    return DataLoaders.from_dsets(items, items, bs=len(items), shuffle=False, device='cpu', num_workers=0)


def test_bare_packed_sequence_is_unpacked():
    model, spy = PackedClassifier(), LossSpy(stop=1)
    cap = Capture(model.rnn)  # the test's own reading: unpacked, `valid` from the lengths
    quiet_fit(Learner(padded_dls(), model, loss_func=CrossEntropyLossFlat(),
                      cbs=[TARCallback(1., 2., modules='rnn'), spy]))
    (h, valid), = cap.parts
    assert valid.sum(1).tolist() == [SL, 7, 3, 1]
    expected = ref_penalty(1., 2., (h, valid))
    assert spy.added[0] == penalty(expected)
    assert far(ref_penalty(1., 2., h), expected)  # the padded steps would count otherwise


def test_bare_packed_sequence_rejects_a_contradicting_seq_dim():
    "seq_dim=0 would difference rows of different sequences: the unpacked tensor is batch-first, and says so."
    learn = Learner(padded_dls(), PackedClassifier(), loss_func=CrossEntropyLossFlat(),
                    cbs=TARCallback(1., 2., modules='rnn', seq_dim=0))
    with pytest.raises(ValueError, match=r"seq_dim=0 contradicts the time axis of rnn's PackedSequence"):
        quiet_fit(learn)


class SeqFirstMix(nn.Module):
    "A custom sequence-first module: (sl, bs, features) out of a linear mix, named by the user with seq_dim=0."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix, self.out = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, VOCAB)
    def forward(self, x): return self.out(torch.tanh(self.mix(self.emb(x).transpose(0, 1)))).transpose(0, 1)


@pytest.mark.parametrize('seq_dim', [0, np.int64(0), torch.tensor(0), -3], ids=['int', 'numpy', 'torch', 'negative'])
def test_any_integer_seq_dim(seq_dim):
    model, spy = SeqFirstMix(), LossSpy(stop=1)
    cap = Capture(model.mix)
    quiet_fit(Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(),
                      cbs=[TARCallback(0., 2., modules='mix', seq_dim=seq_dim), spy]))
    expected = 2 * ref_tar(cap.outputs[0], seq_dim=0)
    assert spy.added[0] == penalty(expected)
    assert far(2 * ref_tar(cap.outputs[0], seq_dim=1), expected)


def test_a_seq_dim_that_contradicts_the_modules_layout_is_an_error_naming_both():
    """A stock nn.LSTM(batch_first=True) is certain of its time axis: seq_dim=0 would take TAR across the batch. The
    error names both axes; a seq_dim that agrees is taken."""
    learn = Learner(lm_dls(), CheckpointLM(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(0., 1., seq_dim=0))
    with pytest.raises(ValueError, match=r"seq_dim=0 contradicts the time axis of lstm's output \(LSTM\), which is 1 "
                                         r"\(batch_first=True\)"):
        quiet_fit(learn)
    model, spy = CheckpointLM(), LossSpy(stop=1)
    cap = Capture(model.lstm)
    quiet_fit(Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(0., 1., seq_dim=1), spy]))
    assert spy.added[0] == penalty(ref_tar(cap.outputs[0], seq_dim=1))


def test_a_seq_dim_the_output_lacks_is_an_error():
    spy = LossSpy()
    learn = Learner(lm_dls(), CheckpointLM(), loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(seq_dim=5), spy])
    with pytest.raises(ValueError, match=r"along time axis 5 \(seq_dim=5, yours\), but its output has shape"):
        quiet_fit(learn)
    assert spy.rows == []


# --- places before the first training batch --------------------------------------------------------------------------
def test_places_before_training_name_both_candidates_and_the_fit_settles_them(book_dls):
    "Before a forward, what the structure says; the fit settles it: AR on the dropout that receives the LSTM's output"
    learn = Learner(book_dls, lmmodel7(book_dls), loss_func=CrossEntropyLossFlat(),
                    cbs=[ModelResetter(), TARCallback()])
    candidates = ("if the model's forward returns fastai's (logits, raw, dropped):\n"
                  "  AR dropped (output[2]): alpha=2.0\n  TAR raw (output[1]): beta=1.0\n"
                  "otherwise, found from the model's structure:\n"
                  "  AR the dropout that takes the output TAR reads, else that output: alpha=2.0\n"
                  "  TAR the last RNN module, rnn (LSTM): beta=1.0\n(settled at the first training batch)")
    assert learn.tar.places == candidates
    plain = Learner(book_dls, PlainLM(len(book_dls.vocab)), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    assert plain.tar.places == candidates  # before a forward, a model's output is not known
    quiet_fit(plain)
    found = "time axis 1 (batch_first=True); found: the last RNN module"
    assert plain.tar.places == ("AR drop (Dropout): alpha=2.0; found: the dropout that takes the output of rnn\n"
                                f"TAR rnn (LSTM): beta=1.0; {found}")
    named = Learner(book_dls, PlainLM(len(book_dls.vocab)), loss_func=CrossEntropyLossFlat(),
                    cbs=TARCallback(modules='rnn', ar_modules='drop'))
    quiet_fit(named)
    assert named.tar.places == ("AR drop (Dropout): alpha=2.0; named by you\n"
                                "TAR rnn (LSTM): beta=1.0; time axis 1 (batch_first=True); named by you")
    assert TARCallback().places == "found when attached to a learner"


# --- what a hostile review found: each read is what the rule says, or the callback says why not --------------------
def _series_dls(n=8, sl=6, n_in=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randn(sl, n_in, generator=g), torch.randn(1, generator=g)) for _ in range(n)]
    return DataLoaders.from_dsets(items, items[:4], bs=4, shuffle=False, device='cpu', num_workers=0)


def _mse(p, y): return ((p.squeeze(-1) - y.squeeze(-1)) ** 2).mean()


class _NormTuple(Module):
    """(prediction, rnn output, its LayerNorm or a learned gate of it): a tuple of the contract's form whose third item
    is no dropout of raw"""
    def __init__(self, third='norm'):
        self.rnn, self.norm, self.head = nn.GRU(3, 5, batch_first=True), nn.LayerNorm(5), nn.Linear(5, 1)
        self.gate, self.third = nn.Linear(5, 5), third

    def forward(self, x):
        e = self.rnn(x)[0]
        return self.head(e[:, -1]), e, self.norm(e) if self.third == 'norm' else e * torch.sigmoid(self.gate(e))


@pytest.mark.parametrize('third', ['norm', 'gate'])  # a gate is a product like fastai's RNNDropout, but learned
def test_a_layer_norm_is_no_dropout_the_tuple_reaches_the_loss_in_training_and_validation(third):
    seen = []
    def aux_loss(p, y):
        seen.append(type(p))
        pred, e, n = p
        return _mse(pred, y) + 0.5 * (e - n).pow(2).mean()
    torch.manual_seed(0)
    learn = Learner(_series_dls(), _NormTuple(third), loss_func=aux_loss, cbs=TARCallback(alpha=0., beta=0.))
    with pytest.warns(UserWarning, match=r"has the form of fastai's \(logits, raw, dropped\), but"):
        quiet_fit(learn)
    assert set(seen) == {tuple}  # training and validation alike: the auxiliary term is never stripped


class _SeqFirstOwn(nn.LSTM):
    "An nn.LSTM subclass with a forward of its own (sequence-first in and out)"
    def forward(self, x, hx=None): return super().forward(x, hx)


class _SubclassContract(Module):
    def __init__(self): self.rnn, self.drop, self.head = _SeqFirstOwn(3, 5), nn.Dropout(0.3), nn.Linear(5, 1)
    def forward(self, x):
        raw = self.rnn(x.transpose(0, 1))[0]  # time x batch x features
        dropped = self.drop(raw)
        return self.head(dropped[-1]), raw, dropped


def test_a_contract_from_an_rnn_of_unknown_layout_asks_for_seq_dim():
    torch.manual_seed(0)
    learn = Learner(_series_dls(), _SubclassContract(), loss_func=_mse, cbs=TARCallback())
    with pytest.raises(ValueError, match=r"time axis of raw \(_SeqFirstOwn\).*Pass seq_dim="): quiet_fit(learn)
    spy, model = LossSpy(stop=1), _SubclassContract()
    cap = Capture(model.rnn)
    quiet_fit(Learner(_series_dls(), model, loss_func=_mse, cbs=[TARCallback(alpha=0., seq_dim=0), spy]))
    assert spy.added[0] == penalty(ref_tar(cap.outputs[0], seq_dim=0))  # along time, not across the batch


class _EncoderCell(Module):
    "A sequence-first encoder LSTM and a decoder cell stepping 4 times"
    def __init__(self): self.enc, self.cell, self.head = nn.LSTM(3, 5), nn.LSTMCell(5, 5), nn.Linear(5, 1)
    def forward(self, x):
        out, (h, c) = self.enc(x.transpose(0, 1))
        state = (h[0], c[0])
        for _ in range(4): state = self.cell(out[-1], state)
        return self.head(state[0])


@pytest.mark.parametrize('seq_dim', [0, 1])
def test_a_cells_steps_are_joined_along_the_users_seq_dim(seq_dim):
    torch.manual_seed(0)
    model, spy = _EncoderCell(), LossSpy(stop=1)
    cap = Capture(model.cell)
    learn = Learner(_series_dls(), model, loss_func=_mse,
                    cbs=[TARCallback(alpha=0., modules='cell', seq_dim=seq_dim), spy])
    quiet_fit(learn)
    steps = torch.stack(cap.outputs[:4], seq_dim)  # the first batch's four steps
    assert spy.added[0] == penalty(ref_tar(steps, seq_dim=seq_dim))
    assert "a cell's steps" in learn.tar.places


def test_arguments_changed_after_construction_are_read_and_checked():
    torch.manual_seed(0)
    model = _EncoderCell()
    tar, spy = TARCallback(alpha=0., beta=[1.], modules=['cell']), LossSpy()
    learn = Learner(_series_dls(), model, loss_func=_mse, cbs=[tar, spy])
    cap = Capture(model.cell)
    quiet_fit(learn)
    plan = tar.hooks.plan
    tar.beta[0] = 7.  # changed in place: a coefficient, read at every batch; what is read stays
    spy.rows.clear()
    n = len(cap.outputs)
    quiet_fit(learn)
    assert tar.hooks.plan is plan
    steps = torch.stack(cap.outputs[n:n + 4], 1)  # the second fit's first batch
    assert spy.added[0] == penalty(7 * ref_tar(steps))
    tar.beta, tar.modules = 5., {'cell': 1.}  # a contradiction assigned: refused at the next fit, naming both
    with pytest.raises(ValueError, match=r'beta=5.0 and modules=.*both give the coefficients'): quiet_fit(learn)


class _TwoRNNs(Module):
    "A decoder GRU declared before the encoder LSTM: the last declared is the encoder"
    def __init__(self):
        self.dec, self.enc, self.head = nn.GRU(5, 5, batch_first=True), nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 1)
    def forward(self, x): return self.head(self.dec(self.enc(x)[0])[0][:, -1])


def test_the_last_of_several_rnn_modules_is_read_and_the_others_named():
    learn = Learner(_series_dls(), _TwoRNNs(), loss_func=_mse, cbs=TARCallback())
    with pytest.warns(UserWarning, match=r"found 2 recurrent modules and reads the last one, 'enc' \(dec too\)"):
        quiet_fit(learn)


def test_all_layers_on_one_multi_layer_lstm_is_refused():
    class Deep(Module):
        def __init__(self): self.rnn, self.head = nn.LSTM(3, 5, num_layers=2, batch_first=True), nn.Linear(5, 1)
        def forward(self, x): return self.head(self.rnn(x)[0][:, -1])
    learn = Learner(_series_dls(), Deep(), loss_func=_mse, cbs=TARCallback(all_layers=True))
    with pytest.raises(ValueError, match=r"all_layers=True reads every layer, but rnn is an RNN module of several"):
        quiet_fit(learn)


def test_valid_metrics_of_a_module_validation_never_calls_are_said_to_be_missing():
    class TrainOnly(Module):
        def __init__(self): self.rnn, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(3, 1)
        def forward(self, x):
            if self.training: x = x + 0 * self.rnn(x)[0].sum()
            return self.head(x[:, -1])
    learn = Learner(_series_dls(), TrainOnly(), loss_func=_mse, cbs=TARCallback(modules='rnn', valid_metrics=True))
    with pytest.warns(UserWarning, match=r'rnn \(GRU\) did not run in validation'): quiet_fit(learn)


# --- one candidate, or ask: each choice by identity, where one candidate exists --------------------------------------
def hand(alpha, beta, raw, dropped, seq_dim=1):
    "Merity's penalty by hand, in float64: AR of the dropped output, TAR of the raw one"
    raw, dropped = raw.detach().double(), dropped.detach().double()
    diff = raw.narrow(seq_dim, 1, raw.shape[seq_dim] - 1) - raw.narrow(seq_dim, 0, raw.shape[seq_dim] - 1)
    return float(alpha * dropped.pow(2).mean() + beta * diff.pow(2).mean())


def test_a_dropout_used_twice_reads_the_call_that_takes_the_rnn_output_and_asks_when_named():
    """PyTorch's word_language_model: `self.drop` runs on the embeddings and on the LSTM's output. By default AR reads
    the call whose input is the LSTM's output tensor; named, the module's two calls are not one sequence: the error
    lists both (the second by where its input came from), and `Place(call=1)` picks one."""
    model = WordLM()
    _, spy = fit_batches(model, [TARCallback()])
    raw, dropped, emb = model.record[0]
    assert spy.added == [penalty(hand(2., 1., raw, dropped))]
    both_calls = ref_penalty(2., 0., emb, dropped) + ref_tar(raw)  # what pooling every call of `drop` would give
    assert far(both_calls, spy.added[0])
    with pytest.raises(ValueError, match=r"'drop' \(Dropout\) ran 2 times in one forward.*call 1: input the output "
                                         r"of 'rnn' \(LSTM\).*ar_modules=Place\('drop', call=i\)"):
        fit_batches(WordLM(), [TARCallback(ar_modules='drop')])
    model = WordLM()
    learn, spy = fit_batches(model, [TARCallback(ar_modules=Place('drop', call=1))])
    raw, dropped, _ = model.record[0]
    assert spy.added == [penalty(hand(2., 1., raw, dropped))]
    assert place(learn, 'AR', 'drop') == "AR drop (Dropout, call 1): alpha=2.0; named by you"


def test_awd_lstm_lm_locked_dropout_four_calls_three_widths_is_asked_about_and_picked():
    """The AR/TAR paper's own model: one LockedDropout called four times a forward (input, between layers, output),
    its LSTMs behind WeightDrop, sequence-first. Named, the four calls are listed; the last call and the last layer,
    named with `seq_dim=0`, give `main.py`'s own penalty (`dropped_rs_hidden[-1]`, `rs_hidden[-1]`)."""
    with pytest.raises(ValueError, match=r"'model.lockdrop' \(LockedDropout\) ran 4 times in one forward.*call 0: "
                                         r"input torch.float32 tensor \(12, 4, 8\).*call 1: input the output of "
                                         r"'model.rnns.0' \(WeightDrop\).*call 3: input the output of 'model.rnns.2'"):
        fit_batches(AWDGlue(VOCAB, contract=False), [TARCallback(ar_modules='model.lockdrop', modules='model.rnns.2',
                                                                 seq_dim=0)])
    model = AWDGlue(VOCAB, contract=False)
    _, spy = fit_batches(model, [TARCallback(ar_modules=Place('model.lockdrop', call=-1), modules='model.rnns.2',
                                             seq_dim=0)])
    raw, dropped = model.record[0]
    assert spy.added == [penalty(hand(2., 1., raw, dropped, seq_dim=0))]


def test_the_dropout_that_takes_the_rnn_output_is_ars_by_default():
    "embedding -> nn.LSTM -> nn.Dropout -> Linear returning logits: AR reads the dropout's output (p=0.4), not raw"
    model = PlainLM(VOCAB)
    raws, drops = Capture(model.rnn), Capture(model.drop)
    learn, spy = fit_batches(model, [TARCallback()])
    expected = hand(2., 1., raws.outputs[0], drops.outputs[0])
    assert spy.added == [penalty(expected)] and far(hand(2., 1., raws.outputs[0], raws.outputs[0]), expected)
    assert place(learn, 'AR', 'drop') == "AR drop (Dropout): alpha=2.0; found: the dropout that takes the output of rnn"


def test_without_a_dropout_of_the_rnn_output_ar_reads_it_raw_and_says_so_once():
    learn = Learner(lm_dls(), LSTMLM(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    spy, warned = fit_warnings(learn, n=2)
    said = [m for m in warned if 'no dropout module takes the output of' in m]
    assert said == ["TARCallback: no dropout module takes the output of 'rnn' (LSTM), so AR reads it raw (Merity reads "
                    "AR after the output dropout): name the module to read in ar_modules=, or pass alpha=0 to leave AR "
                    "out"]
    _, warned = fit_warnings(learn)
    assert not [m for m in warned if 'no dropout module' in m]  # once per callback
    assert 'no dropout takes its output, so AR reads it raw' in place(learn, 'AR', 'rnn')


def test_naming_tars_module_leaves_ar_on_dropped(book_dls):
    "The book's LMModel7 with modules='rnn': AR stays on fastai's dropped output (its dropout's), not on raw"
    model = lmmodel7(book_dls)
    raws, drops = Capture(model.rnn), Capture(model.drop)
    learn = Learner(book_dls, model, loss_func=CrossEntropyLossFlat(), cbs=[ModelResetter(), TARCallback(
        modules='rnn')])
    _, spy = fit_batches(learn)
    expected = hand(2., 1., raws.outputs[0], drops.outputs[0])
    assert spy.added == [penalty(expected)] and far(hand(2., 1., raws.outputs[0], raws.outputs[0]), expected)
    assert place(learn, 'AR', 'dropped').startswith("AR dropped (output[2]): alpha=2.0")


class _EncoderCellDecoder(Module):
    "An nn.LSTM encoder and an nn.LSTMCell decoder stepping 3 times from its state"
    def __init__(self):
        self.enc, self.dec, self.head = nn.LSTM(3, 5, batch_first=True), nn.LSTMCell(5, 5), nn.Linear(5, 1)
    def forward(self, x):
        out, (h, c) = self.enc(x)
        state = (h[0], c[0])
        for _ in range(3): state = self.dec(out[:, -1], state)
        return self.head(state[0])


class _AWDEncoderLSTMDecoder(Module):
    "fastai's AWD_LSTM encoder and an nn.LSTM decoder"
    def __init__(self):
        self.enc, self.dec, self.head = AWD_LSTM(VOCAB, 8, 12, 2), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, VOCAB)
    def forward(self, x): return self.head(self.dec(self.enc(x))[0])
    def reset(self): self.enc.reset()


def test_every_recurrent_candidate_counts_and_the_others_are_named():
    "Cells and fastai's encoders count among several recurrent modules: the last is read, the warning names each"
    learn = Learner(_series_dls(), _EncoderCellDecoder(), loss_func=_mse, cbs=TARCallback())
    _, warned = fit_warnings(learn, dls=_series_dls())
    assert "TARCallback found 2 recurrent modules and reads the last one, 'dec' (enc too): name the one to read in " \
           "modules= (or pass all_layers=True to read each)" in warned
    learn = Learner(lm_dls(), _AWDEncoderLSTMDecoder(), loss_func=CrossEntropyLossFlat(),
                    cbs=[ModelResetter(), TARCallback()])
    _, warned = fit_warnings(learn)
    assert any("found 2 recurrent modules and reads the last one, 'dec' (enc too)" in m for m in warned)


class _TwoStreams(Module):
    "One LSTMCell stepping two streams in one loop, a0, b0, a1, b1, ...: two sequences of steps"
    def __init__(self): self.cell, self.head = nn.LSTMCell(3, 4), nn.Linear(8, 1)
    def forward(self, x):
        a = b = None
        for t in range(x.shape[1]): a, b = self.cell(x[:, t], a), self.cell(-x[:, t], b)
        return self.head(torch.cat([a[0], b[0]], -1))


def test_calls_that_do_not_chain_are_not_one_sequence():
    "Stream A's steps are not followed by stream B's: asked about; `call='all'` reads each stream's TAR apart"
    learn = Learner(_series_dls(), _TwoStreams(), loss_func=_mse, cbs=TARCallback(alpha=0.))
    with pytest.raises(ValueError, match=r"'cell' \(LSTMCell\) ran 12 times.*2 sequences of steps \(calls 0, 2, 4, "
                                         r"6, 8, 10; 1, 3, 5, 7, 9, 11\).*call='all'"):
        quiet_fit(learn)
    model, spy = _TwoStreams(), LossSpy(stop=1)
    cap = Capture(model.cell)
    quiet_fit(Learner(_series_dls(), model, loss_func=_mse, cbs=[TARCallback(alpha=0., modules=Place(
        'cell', call='all')), spy]))
    steps = cap.outputs[:12]  # the first batch's calls: h of a0, b0, a1, b1, ...
    a, b = torch.stack(steps[0::2], 1), torch.stack(steps[1::2], 1)
    expected = ref_penalty(0., 1., a, b)  # TAR within each stream, pooled
    assert spy.added[0] == penalty(expected) and far(ref_tar(torch.stack(steps, 1)), expected)


def test_contract_true_on_a_sequence_first_raw_asks_for_seq_dim_and_reads_it():
    """awd-lstm-lm's model in a fastai glue returning (logits, raw, dropped), time x batch x features, with
    contract=True (as the error text for the tuple suggests): the batch size refuses fastai's batch-first reading"""
    with pytest.raises(ValueError, match=r"TARCallback reads TAR from the model's raw \(output\[1\]\), a "
                                         r"torch.float32 tensor \(12, 4, 8\), as fastai's batch-first.*first axis "
                                         r"is not "
                                         r"the batch of 4: pass seq_dim="):
        fit_batches(AWDGlue(VOCAB), [TARCallback(contract=True)])
    model = AWDGlue(VOCAB)
    _, spy = fit_batches(model, [TARCallback(contract=True, seq_dim=0)])
    raw, dropped = model.record[0]
    assert spy.added == [penalty(hand(2., 1., raw, dropped, seq_dim=0))]


def test_a_seq_dim_that_contradicts_fastais_layout_is_an_error_naming_both():
    learn = Learner(lm_dls(), tiny_lm(), loss_func=CrossEntropyLossFlat(), cbs=[ModelResetter(), TARCallback(
        seq_dim=0)])
    with pytest.raises(ValueError, match=r"seq_dim=0 contradicts the time axis of raw's output \(AWD_LSTM\), which is "
                                         r"1 "
                                         r"\(fastai's text modules are batch-first\)"):
        quiet_fit(learn)


class _Gated(Module):
    "A gated pair: (gate, value), both batch x time x 4"
    def __init__(self): self.l = nn.Linear(3, 8)
    def forward(self, x): return tuple(self.l(x).chunk(2, -1))


class _PairModel(Module):
    def __init__(self): self.block, self.head = _Gated(), nn.Linear(4, 1)
    def forward(self, x):
        gate, value = self.block(x)
        return self.head(torch.sigmoid(gate) * value)[:, -1]


def test_several_tensors_in_a_named_output_are_asked_about_and_place_picks_one():
    learn = Learner(_series_dls(), _PairModel(), loss_func=_mse, cbs=TARCallback(modules='block', seq_dim=1))
    with pytest.raises(ValueError, match=r"'block' \(_Gated\) returns 2 float tensors.*modules=Place\('block', "
                                         r"item=...\), one of \[0, 1\]"):
        quiet_fit(learn)
    model, spy, seen = _PairModel(), LossSpy(stop=1), []
    model.block.register_forward_hook(lambda m, i, out: seen.append([o.detach().clone() for o in out]))
    learn = Learner(_series_dls(), model, loss_func=_mse, cbs=[TARCallback(modules=Place('block', item=1),
                                                                           seq_dim=1), spy])
    quiet_fit(learn)
    gate, value = seen[0]
    expected = hand(2., 1., value, value)  # no dropout takes the value: AR reads it too
    assert spy.added[0] == penalty(expected) and far(hand(2., 1., gate, gate), expected)
    assert place(learn, 'TAR', 'block') == "TAR block (_Gated, item 1): beta=1.0; time axis 1 (seq_dim=1, yours); " \
                                           "named by you"


def test_a_wrapper_that_calls_forward_directly_is_named_not_a_false_error():
    """awd-lstm-lm's WeightDrop calls its LSTM's forward directly, so the LSTM's hooks never fire: the error says so
    and names the wrapper; the tuple's error says the recurrent modules ran no hook, not that raw is no RNN output"""
    with pytest.raises(RuntimeError, match=r"reads model.rnns.2.module \(LSTM\) but it did not run through its hooks, "
                                           r"though 'model.rnns.2' \(WeightDrop\), which holds it, ran: it calls the "
                                           r"forward of 'model.rnns.2.module' directly.*Name 'model.rnns.2' in "
                                           r"modules="):
        fit_batches(AWDGlue(VOCAB, contract=False), [TARCallback()])
    with pytest.raises(TypeError, match=r"its raw item is not the output of a recurrent module.*the model's recurrent "
                                        r"modules ran no hook in this forward: a wrapper that calls their forward "
                                        r"directly, as awd-lstm-lm's WeightDrop does, skips hooks"):
        fit_batches(AWDGlue(VOCAB), [TARCallback()])
