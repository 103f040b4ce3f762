"""TARCallback's hooks in set-ups that stress them (issue 11): gradient checkpointing, a bare PackedSequence output,
`learn.summary()`, interrupts, other callbacks' forwards, two callbacks, bad arguments, listing callbacks."""
import copy
import io
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from fastai.learner import _loop
from fastai.text.all import (SGD, CancelBatchException, CancelEpochException, CancelFitException,
                             CancelTrainException, Callback, CrossEntropyLossFlat, DataLoaders, Learner)

from fastai_tar import TARCallback
from conftest import (SL, VOCAB, Capture, LossSpy, far, hook_ids, lm_dls, penalty, quiet_fit, ref_ar, ref_penalty,
                      ref_tar, tiny_lm)


class LM(nn.Module):
    "Embedding -> nn.LSTM -> Linear, no dropout; the LSTM optionally under torch.utils.checkpoint."
    def __init__(self, reentrant=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.lstm, self.head = nn.Embedding(VOCAB, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, VOCAB)
        self.reentrant = reentrant

    def forward(self, x):
        e = self.emb(x)
        if self.reentrant is None: return self.head(self.lstm(e)[0])
        return self.head(checkpoint(lambda t: self.lstm(t)[0], e, use_reentrant=self.reentrant))


class GradSpy(Callback):
    "The gradient of every parameter after the first training batch's backward; then the fit stops."
    order = 50
    def after_backward(self): self.grads = torch.cat([p.grad.flatten().clone() for p in self.learn.model.parameters()])
    def after_batch(self):
        if self.training: raise CancelFitException()


def first_grads(model, tar, cbs=()):
    spy = GradSpy()
    quiet_fit(Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=[tar, *cbs, spy]))
    return spy.grads


# --- gradient checkpointing --------------------------------------------------------------------------------------
def test_checkpointing_non_reentrant_gives_the_plain_gradient():
    "The penalty is taken outside the checkpointed region: the gradient is the one of the same model without it."
    plain = first_grads(LM(), TARCallback(2., 1.))
    ckpt = first_grads(LM(reentrant=False), TARCallback(2., 1.))
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-6)
    off = first_grads(LM(), TARCallback(0., 0.))
    assert (plain - off).abs().max() > 1e-3  # the penalty's share of the gradient is far above the tolerance


def test_checkpointing_reentrant_is_an_error_naming_the_fix():
    "use_reentrant=True runs the module without gradient: an error at the first batch, never a penalty without effect."
    model, spy = LM(reentrant=True), LossSpy()
    hooks = hook_ids(model)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1.), spy])
    with pytest.raises(RuntimeError, match=r'use_reentrant=True.*use use_reentrant=False'): quiet_fit(learn)
    assert spy.rows == [] and len(learn.tar.history) == 0  # nothing recorded as if it had been applied
    assert hook_ids(model) == hooks


# --- a module that returns a bare PackedSequence -------------------------------------------------------------------
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


# --- summary, show_training_loop, learn.cbs --------------------------------------------------------------------------
def test_summary_and_listing_callbacks_change_nothing():
    learn = Learner(lm_dls(), tiny_lm(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(valid_metrics=True))
    quiet_fit(learn)
    history, hooks, metrics = learn.tar.history, hook_ids(learn.model), list(learn.metrics)
    places, text = learn.tar.places, repr(learn.tar)
    assert len(history) == len(learn.dls.train)
    assert 'LSTM' in learn.summary()
    pd.testing.assert_frame_equal(learn.tar.history, history)
    assert hook_ids(learn.model) == hooks and list(learn.metrics) == metrics
    assert learn.tar.places == places and repr(learn.tar) == text  # what the fit read: the model's output
    with redirect_stdout(io.StringIO()) as out: learn.show_training_loop()
    assert len(out.getvalue().splitlines()) == len(_loop)  # one line per event: our repr is one line
    assert 'TARCallback(alpha=2.0, beta=1.0, valid_metrics=True): AR dropped (output[2])' in out.getvalue()
    assert '\n' not in repr(learn.cbs)


# --- hooks left behind ---------------------------------------------------------------------------------------------
class Raise(Callback):
    "Raise `exc` in before_batch of the `at`-th training batch, after TARCallback's before_batch."
    order = 10
    def __init__(self, exc, at=2): self.exc, self.at, self.n = exc, at, 0
    def before_batch(self):
        if not self.training: return
        self.n += 1
        if self.n == self.at: raise self.exc


class InterruptingHead(nn.Linear):
    "A head that raises KeyboardInterrupt in the `at`-th forward, after the LSTM ran (Ctrl-C in forward)."
    def __init__(self, at): super().__init__(16, VOCAB); self.at, self.n = at, 0
    def forward(self, x):
        self.n += 1
        if self.n == self.at: raise KeyboardInterrupt
        return super().forward(x)


def lifecycle(model=None):
    model = model or LM()
    cap = Capture(model.lstm, keep=False)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback())
    return learn, cap, hook_ids(model)


def copies_and_saves(model):
    "deepcopy and torch.save/torch.load of the model work, and the copies carry no state of ours."
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randint(2, VOCAB, (2, SL))
    for m in (twin, loaded): torch.testing.assert_close(m(x), model(x))


@pytest.mark.parametrize('where, exc', [('forward', KeyboardInterrupt()), ('before_batch', KeyboardInterrupt()),
                                        ('before_batch', RuntimeError('boom'))],
                         ids=['interrupt_in_forward', 'interrupt_in_before_batch', 'error_in_before_batch'])
def test_hooks_left_by_an_exit_outside_our_events_are_inert_and_go_at_the_next_forward(where, exc):
    """KeyboardInterrupt in forward (torch's always_call hooks run for `Exception` only) or any exception in a later
    callback's before_batch ends fit with no event of ours (fastai's `_with_events` has no `finally`): the hooks left
    copy and pickle, and the next forward outside fastai's loop removes them, keeping nothing."""
    model = LM()
    if where == 'forward': model.head = InterruptingHead(at=2)
    learn, cap, hooks = lifecycle(model)
    with pytest.raises(type(exc)): quiet_fit(learn, cbs=Raise(exc) if where == 'before_batch' else None)
    cap.handle.remove()  # the test's own hook keeps weakrefs, which torch.save cannot pickle
    assert hook_ids(learn.model) != set()  # ours are still there: no event of ours ran
    copies_and_saves(learn.model)
    assert hook_ids(learn.model) == set()  # copies_and_saves ran the model: that forward removed ours
    assert cap.alive() == []  # and nothing of the forwards is kept
    cap.handle = learn.model.lstm.register_forward_hook(cap.hook)
    hooks, grab = hook_ids(learn.model), LossSpy(stop=1)
    quiet_fit(learn, cbs=grab)  # the next fit regularizes and leaves nothing
    assert grab.added[0] > 1e-3
    assert hook_ids(learn.model) == hooks and cap.alive() == []


def test_exception_in_forward_removes_hooks_at_once():
    class Fails(nn.Module):
        def forward(self, x): raise ValueError('bad forward')
    learn, cap, hooks = lifecycle()
    learn.model.head = Fails()
    with pytest.raises(ValueError, match='bad forward'): quiet_fit(learn)
    assert hook_ids(learn.model) == hooks and cap.alive() == []


@pytest.mark.parametrize('exc', [CancelBatchException, CancelTrainException, CancelEpochException, CancelFitException])
def test_fastai_cancel_exceptions_in_before_batch_leave_nothing(exc):
    learn, cap, hooks = lifecycle()
    quiet_fit(learn, n_epoch=2, cbs=Raise(exc()))
    assert hook_ids(learn.model) == hooks and cap.alive() == []
    assert max(cap.hooks_seen) > 1  # our hooks did run next to the test's own


# --- other callbacks' forwards ---------------------------------------------------------------------------------------
class ExtraForward(Callback):
    "Runs the model on other inputs in before_batch, as adversarial training or a consistency loss does."
    def __init__(self, order, grad=True): self.order, self.grad = order, grad
    def before_batch(self):
        if not self.training: return
        with torch.set_grad_enabled(self.grad): self.other = self.learn.model(self.learn.xb[0].flip(1))


@pytest.mark.parametrize('order,grad', [(10, True), (10, False), (0, True)])
def test_penalty_of_the_forward_that_reaches_the_loss(order, grad):
    "Another forward in the same batch, before or after our before_batch: the training forward's activation is used."
    model, spy = LM(), LossSpy(stop=1)
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(),
                    cbs=[TARCallback(2., 1.), ExtraForward(order, grad), spy])
    quiet_fit(learn)
    other, train = cap.outputs
    assert spy.added[0] == penalty(ref_penalty(2., 1., train))
    assert far(ref_penalty(2., 1., other), ref_penalty(2., 1., train))
    # and the gradient is the one without the extra forward
    with_extra = first_grads(LM(), TARCallback(2., 1.), [ExtraForward(order, grad)])
    torch.testing.assert_close(with_extra, first_grads(LM(), TARCallback(2., 1.)), rtol=0, atol=1e-7)


# --- two callbacks ---------------------------------------------------------------------------------------------------
def test_two_callbacks_keep_both_columns_and_both_penalties():
    model, spy = LM(), LossSpy()
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[TARCallback(2., 0., modules='lstm'), TARCallback(0., 3., modules='lstm'), spy])
    quiet_fit(learn)
    names = learn.recorder.metric_names
    assert 'train_ar' in names and 'train_tar_2' in names and 'train_tar' not in names
    row = dict(zip(names[1:], learn.recorder.values[-1]))
    ars, tars = [2 * ref_ar(h) for h in cap.train_outputs], [3 * ref_tar(h) for h in cap.train_outputs]
    assert row['train_ar'] == pytest.approx(np.mean(ars), rel=1e-5)
    assert row['train_tar_2'] == pytest.approx(np.mean(tars), rel=1e-5)
    assert spy.added == [penalty(a + t) for a, t in zip(ars, tars)]
    assert learn.metrics == []  # each took its own columns out


# --- arguments -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kw, exc, msg', [
    (dict(modules=[]), ValueError, r"^modules=\[\] names no module: give a module, a name"),
    (dict(ar_modules={}), ValueError, r"^ar_modules=\{\} names no module"),
    (dict(modules=5), TypeError, r"^modules takes a module, a name from model.named_modules\(\).*; got int 5"),
    (dict(modules=['lstm', 2.]), TypeError, r"^modules takes .*; got float 2.0"),
    (dict(alpha={'lstm2': 2.}), TypeError, r"^alpha=\{'lstm2': 2.0\}: coefficients per module go in ar_modules="),
    (dict(beta={'lstm': 1.}), TypeError, r"^beta=.*go in modules="),
    (dict(alpha=[1., 2.], modules=['lstm']), ValueError, r"^alpha has 2 coefficients but modules names 1 modules"),
    (dict(seq_dim='a'), TypeError, r"^seq_dim takes an integer.*got str 'a'"),
    (dict(seq_dim=True), TypeError, r"^seq_dim takes an integer.*got bool True"),
    (dict(seq_dim=1.), TypeError, r"^seq_dim takes an integer.*got float 1.0"),
    (dict(all_layers='yes'), TypeError, r"^all_layers must be True or False, got 'yes'"),
])
def test_bad_arguments_fail_at_construction(kw, exc, msg):
    with pytest.raises(exc, match=msg): TARCallback(**kw)


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


def test_the_users_seq_dim_wins_over_the_modules_layout():
    "seq_dim is the user's word on the time axis, also for a stock nn.LSTM (batch_first=True): TAR then runs along it."
    model, spy = LM(), LossSpy(stop=1)
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(0., 1., seq_dim=0), spy])
    quiet_fit(learn)
    assert spy.added[0] == penalty(ref_tar(cap.outputs[0], seq_dim=0))
    assert 'time axis 0 (seq_dim=0, yours)' in learn.tar.places


def test_a_seq_dim_the_output_lacks_is_an_error():
    spy = LossSpy()
    learn = Learner(lm_dls(), LM(), loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(seq_dim=5), spy])
    with pytest.raises(ValueError, match=r"along time axis 5 \(seq_dim=5, yours\), but its output has shape"):
        quiet_fit(learn)
    assert spy.rows == []


class CellLM(nn.Module):
    "An LSTMCell run step by step: each call returns (h, c) of shape (bs, hidden), with no time axis."
    def __init__(self):
        super().__init__()
        self.emb, self.cell, self.head = nn.Embedding(VOCAB, 6), nn.LSTMCell(6, 8), nn.Linear(8, VOCAB)
    def forward(self, x):
        e, state, hs = self.emb(x), None, []
        for t in range(x.shape[1]):
            state = self.cell(e[:, t], state)
            hs.append(state[0])
        return self.head(torch.stack(hs, 1))


def test_a_cell_called_once_per_step_is_one_sequence():
    "Each call of an LSTMCell is one step, (bs, hidden): joined in call order, TAR runs over the steps."
    model, spy = CellLM(), LossSpy(stop=1)
    cap = Capture(model.cell)
    quiet_fit(Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(modules='cell'), spy]))
    steps = torch.stack(cap.outputs[:SL], 1)  # the first batch's calls
    assert spy.added[0] == penalty(ref_penalty(2., 1., steps))


def test_unknown_names_fail_in_before_fit_and_missing_modules_are_named_once():
    spy = LossSpy()
    learn = Learner(lm_dls(), LM(), loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(ar_modules={'lstm2': 2.}), spy])
    with pytest.raises(ValueError, match=r"ar_modules: no module named 'lstm2'"): quiet_fit(learn)
    assert spy.rows == []
    model = LM()
    model.unused = nn.LSTM(8, 8)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=TARCallback(modules='unused'))
    with pytest.raises(RuntimeError, match=r"TARCallback reads unused \(LSTM\) but the learner's forward did not call"):
        quiet_fit(learn)
