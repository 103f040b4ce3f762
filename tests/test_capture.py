"""The capture alone (`fastai_tar.capture`): which forward's calls are recorded (the learner's own, not a callback's),
what hooks left over from an interrupted fit do, copies and pickles of a hooked model, activations freed with
`forget`, watched modules kept or swapped by `watch`; how `read_tensors` reads the calls of one module (one-step calls
joined in call order, whole sequences apart, a mix refused, calls without grad skipped, in-place changes refused); and
`term_sums` against float64 references."""
import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from fastai.text.all import AWD_LSTM, Callback, CrossEntropyLossFlat, Learner, get_text_classifier

from fastai_tar import capture
from fastai_tar.capture import Call, ForwardCapture, read_tensors, term_sums
from fastai_tar.plan import Read

from conftest import VOCAB, lm_dls, quiet_fit, ref_sums, tiny_config


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


class StandIn:
    "A stand-in for a Learner: its own method calls the model, with `self` the learner (as fastai's `_do_one_batch`)."
    def __init__(self, model): self.model = model
    def forward(self, x): return self.model(x)


def other_caller(m, x): return m(x)  # a forward run by someone else (a callback, a user)


def no_hooks(m): return not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


class Stale:
    def __init__(self): self.n = 0
    def __call__(self): self.n += 1


# --- which forward is recorded -----------------------------------------------------------------------------------
def test_the_learners_own_forward_is_recorded_and_others_ignored_inside_fastais_loop(monkeypatch):
    monkeypatch.setattr(capture, '_in_fastai_loop', lambda: True)  # as inside fastai's training loop
    m, cap, stale = model(), ForwardCapture(), Stale()
    learn = StandIn(m)
    cap.open(learn, stale)
    cap.watch([m[1]])
    x1, x2 = torch.randn(2, 3), torch.randn(5, 3)
    out1 = learn.forward(x1)
    other_caller(m, x2)  # a callback's forward: not recorded, and the learner's forward stays the last one
    fwd = cap.forward
    assert fwd.output is out1 and len(fwd.calls) == 1 and fwd.of(1) == []
    (c,) = fwd.of(0)
    torch.testing.assert_close(c.output, torch.tanh(m[0](x1)))
    assert c.group == 0 and c.module is m[1] and c.grad_enabled and c.version == c.output._version
    with torch.no_grad(): learn.forward(x2)
    assert not cap.forward.calls[0].grad_enabled and cap.forward.output.shape == (5, 2)
    assert cap.is_open and stale.n == 0
    cap.close()
    assert no_hooks(m) and not cap.is_open and cap.forward is None


class Snoop(Callback):
    "A callback that runs a forward of its own on the batch after the learner's, and sees what the capture holds then."
    def __init__(self, cap): self.cap, self.seen = cap, []
    def before_fit(self): self.cap.open(self.learn, lambda: None)
    def before_batch(self): self.cap.watch([self.learn.model[1]])
    def after_pred(self):
        if not self.training: return
        fwd = self.cap.forward
        self.learn.model(self.learn.xb[0][:2])  # inside fastai's loop, not the learner's own forward
        self.seen.append((fwd, self.cap.forward, [c.output.shape[0] for c in self.cap.forward.calls], self.pred))
    def after_batch(self): self.cap.forget()
    def after_fit(self): self.cap.close()


def test_in_a_fastai_fit_a_callbacks_forward_is_not_recorded():
    dls = lm_dls()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Tanh(), nn.Linear(4, VOCAB))
    cap = ForwardCapture()
    snoop = Snoop(cap)
    quiet_fit(Learner(dls, m, loss_func=CrossEntropyLossFlat(), cbs=snoop))
    assert len(snoop.seen) == len(dls.train)
    for before, after, sizes, pred in snoop.seen:
        assert after is before and before.output is pred and sizes == [dls.bs]
    assert no_hooks(m)


def test_a_forward_outside_fastais_loop_with_hooks_left_over_closes_them_and_calls_on_stale():
    m, cap, stale = model(), ForwardCapture(), Stale()
    cap.open(StandIn(m), stale)
    cap.watch([m[1]])
    other_caller(m, torch.randn(2, 3))  # after a fit that a Ctrl-C ended: no event of ours followed
    assert stale.n == 1 and not cap.is_open and cap.forward is None and cap.handles == [] and no_hooks(m)
    other_caller(m, torch.randn(2, 3))
    assert stale.n == 1  # once


def test_the_learners_forward_outside_fastais_loop_is_recorded():
    "validate(), get_preds(): the learner's own forward, with fastai's loop only partly on the stack"
    m, cap, stale = model(), ForwardCapture(), Stale()
    learn = StandIn(m)
    cap.open(learn, stale)
    cap.watch([m[1]])
    out = learn.forward(torch.randn(2, 3))
    assert cap.forward.output is out and stale.n == 0 and cap.is_open
    cap.close()


class Raising(nn.Module):
    def forward(self, x): raise KeyError('boom')


def test_a_forward_that_raises_closes_the_hooks_and_calls_on_stale():
    m, cap, stale = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Raising()), ForwardCapture(), Stale()
    learn = StandIn(m)
    cap.open(learn, stale)
    cap.watch([m[1]])
    with pytest.raises(KeyError, match='boom'): learn.forward(torch.randn(2, 3))
    assert stale.n == 1 and not cap.is_open and cap.forward is None and no_hooks(m)


def test_copies_and_pickles_of_a_hooked_model_carry_inert_taps(monkeypatch):
    monkeypatch.setattr(capture, '_in_fastai_loop', lambda: True)
    m, cap, stale = model(), ForwardCapture(), Stale()
    cap.open(StandIn(m), stale)
    cap.watch([m[1]])
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        taps = list(twin[1]._forward_hooks.values()) + list(twin._forward_hooks.values()) + \
            list(twin._forward_pre_hooks.values())
        assert len(taps) == 3 and all(t.capture is None for t in taps)
        StandIn(twin).forward(torch.randn(2, 3))
        assert cap.forward is None and cap.current is None  # the original's capture saw nothing of it
    assert cap.is_open and stale.n == 0
    cap.close()


def test_forget_frees_the_activations_and_watch_keeps_or_swaps_the_hooks():
    m, cap = model(), ForwardCapture()
    learn = StandIn(m)
    cap.open(learn, lambda: None)
    cap.watch([m[1]])
    learn.forward(torch.randn(2, 3))
    ref = weakref.ref(cap.forward.calls[0].output)
    cap.forget()
    gc.collect()
    assert ref() is None and cap.forward is None
    tap = list(m[1]._forward_hooks.values())
    cap.watch([m[1]])  # the same modules: the same hook, no new registration
    assert list(m[1]._forward_hooks.values()) == tap and cap.is_open and m._forward_hooks and m._forward_pre_hooks
    cap.watch([m[0]])  # other modules: the old hook goes
    assert not m[1]._forward_hooks and len(m[0]._forward_hooks) == 1
    cap.close()
    assert no_hooks(m)


# --- read_tensors ------------------------------------------------------------------------------------------------
def tar_read(module, seq_dim=1, steps=False, axes_given=False):
    return Read('tar', 'rnn', module, 1., 'named', 'named by you', seq_dim=seq_dim, steps=steps,
                axis_why='test', axes_given=axes_given)


def calls_of(module, outputs, grad=True):
    "Calls as the capture records them: the version counter of each output's first tensor when it was returned"
    return [Call(0, module, o, capture._first_tensor(o)._version, grad) for o in outputs]


def run_steps(gru, x):
    "A decoder feeding a GRU one step at a time"
    h, outs = None, []
    for t in range(x.shape[1]):
        out, h = gru(x[:, t:t + 1], h)
        outs.append((out, h))
    return outs


def test_one_step_calls_are_joined_in_call_order_with_their_gradient():
    torch.manual_seed(0)
    gru, x = nn.GRU(3, 4, batch_first=True), torch.randn(2, 5, 3)
    outs = run_steps(gru, x)
    (h, mask, sd), = read_tensors(tar_read(gru), calls_of(gru, outs), training=True)
    assert sd == 1 and mask is None and h.shape == (2, 5, 4)
    assert torch.equal(h, torch.cat([o for o, _ in outs], 1))
    torch.testing.assert_close(h, gru(x)[0])  # the sequence the calls made
    h.pow(2).sum().backward()
    assert gru.weight_hh_l0.grad.abs().sum() > 0


def test_cell_calls_gain_a_time_axis_and_are_joined():
    torch.manual_seed(0)
    cell, x = nn.GRUCell(3, 4), torch.randn(2, 5, 3)
    h, outs = None, []
    for t in range(5):
        h = cell(x[:, t], h)
        outs.append(h)
    (got, _, sd), = read_tensors(tar_read(cell, steps=True), calls_of(cell, outs), training=True)
    assert sd == 1 and torch.equal(got, torch.stack(outs, 1))


def test_whole_sequence_calls_stay_apart_and_a_mix_is_refused():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    a, b = lstm(torch.randn(2, 5, 3)), lstm(torch.randn(2, 6, 3))
    parts = read_tensors(tar_read(lstm), calls_of(lstm, [a, b]), training=True)
    assert [p[0] for p in parts] == [a[0], b[0]] and [p[2] for p in parts] == [1, 1]
    steps = lstm(torch.randn(2, 1, 3))
    with pytest.raises(ValueError,
                       match=r"cannot tell how the 3 calls of rnn in one forward relate: 1 return one step"):
        read_tensors(tar_read(lstm), calls_of(lstm, [a, steps, b]), training=True)
    other = lstm(torch.randn(3, 1, 3))
    with pytest.raises(ValueError, match=r"cannot join the one-step calls of rnn.*differ"):
        read_tensors(tar_read(lstm), calls_of(lstm, [steps, other]), training=True)
    ar = Read('ar', 'rnn', lstm, 2., 'named', 'named by you')  # AR reads each call, no time axis needed
    parts = read_tensors(ar, calls_of(lstm, [a, steps, b]), training=True)
    assert [p[0] for p in parts] == [a[0], steps[0], b[0]] and {p[2] for p in parts} == {None}


def test_calls_without_grad_are_skipped_in_training_and_an_error_when_all_lack_it():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    with torch.no_grad(): burn_in = lstm(torch.randn(2, 5, 3))
    real = lstm(torch.randn(2, 5, 3))
    calls = calls_of(lstm, [burn_in], grad=False) + calls_of(lstm, [real])
    assert [p[0] for p in read_tensors(tar_read(lstm), calls, training=True)] == [real[0]]
    assert [p[0] for p in read_tensors(tar_read(lstm), calls, training=False)] == [burn_in[0], real[0]]
    with pytest.raises(RuntimeError, match=r"rnn \(LSTM\) ran only without gradient.*use_reentrant=False"):
        read_tensors(tar_read(lstm), calls[:1], training=True)


def test_an_in_place_change_after_the_module_is_refused():
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, batch_first=True)
    out = gru(torch.randn(2, 5, 3))
    calls = calls_of(gru, [out])
    out[0].add_(1.)  # `out += x` after the module
    with pytest.raises(RuntimeError, match=r"changed in place after it left the module \(its autograd history now "
                                           r"ends in AddBackward0"):
        read_tensors(tar_read(gru), calls, training=True)


def test_output_forms_packed_classifier_and_bad_outputs():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4)  # sequence-first, but a PackedSequence is unpacked batch-first
    x = torch.randn(3, 5, 3)
    packed = lstm(pack_padded_sequence(x, torch.tensor([5, 2, 1]), batch_first=True))
    (h, mask, sd), = read_tensors(tar_read(lstm, seq_dim=0), calls_of(lstm, [packed]), training=True)
    assert sd == 1 and h.shape == (3, 5, 4)
    assert mask.tolist() == [[True] * 5, [True, True] + [False] * 3, [True] + [False] * 4]
    with pytest.raises(ValueError, match=r"seq_dim=0 contradicts the time axis of rnn's PackedSequence"):
        read_tensors(tar_read(lstm, seq_dim=0, axes_given=True), calls_of(lstm, [packed]), training=True)
    unbatched = lstm(torch.randn(5, 3))  # (L, H): its time axis is 0
    assert read_tensors(tar_read(lstm, seq_dim=1), calls_of(lstm, [unbatched]), training=True)[0][2] == 0
    with pytest.raises(ValueError, match=r"along time axis 3 \(test\), but its output has shape \(3, 5, 4\)"):
        read_tensors(tar_read(lstm, seq_dim=3), calls_of(lstm, [lstm(x)]), training=True)

    enc = get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))[0]
    h, pad = torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, :2] = True
    (got, mask, sd), = read_tensors(tar_read(enc), calls_of(enc, [(h, pad)]), training=False)
    assert got is h and torch.equal(mask, ~pad) and sd == 1

    ident = nn.Identity()
    for bad in ({'h': h}, torch.ones(3, 5, dtype=torch.long), torch.tensor(1.)):
        with pytest.raises(TypeError, match=r'cannot read the output of Identity'):
            read_tensors(tar_read(ident), [Call(0, ident, bad, None, True)], training=True)


# --- term_sums ---------------------------------------------------------------------------------------------------
def close(got, expected):
    s, n = got
    torch.testing.assert_close(s.double(), expected[0], rtol=1e-5, atol=1e-6)
    assert int(n) == int(expected[1])


def test_term_sums_match_float64_references():
    torch.manual_seed(0)
    a, t, t2 = torch.randn(3, 6, 4), torch.randn(3, 6, 4), torch.randn(3, 7, 4)
    valid = torch.rand(3, 6) > 0.3
    ar, tar = Read('ar', 'drop', None, 2., 'found', ''), Read('tar', 'rnn', None, 1., 'found', '', seq_dim=1)
    stats = term_sums({ar: [(a, valid, None)], tar: [(t, None, 1)]})  # one AR and one TAR: fused
    close(stats[ar], ref_sums(a, valid)[:2])
    close(stats[tar], ref_sums(t)[2:])
    stats = term_sums({tar: [(t, valid, 1), (t2, None, 1)]})  # two calls pooled: total sums over total counts
    r1, r2 = ref_sums(t, valid), ref_sums(t2)
    close(stats[tar], (r1[2] + r2[2], r1[3] + r2[3]))
    seq_first = t.transpose(0, 1)
    close(term_sums({tar: [(seq_first, None, 0)]})[tar], ref_sums(seq_first, seq_dim=0)[2:])
    assert term_sums({ar: [], tar: [(t, None, 1)]}).keys() == {tar}  # a read with nothing to read adds nothing


def test_term_sums_channels_first():
    "seq_dim=2, feature_dim=1 (batch x features x time): the same sums as the batch-first tensor"
    torch.manual_seed(0)
    h = torch.randn(3, 4, 6)
    ar = Read('ar', 'b', None, 2., 'named', '', feature_dim=1)
    tar = Read('tar', 'b', None, 1., 'named', '', seq_dim=2, feature_dim=1)
    stats = term_sums({ar: [(h, None, None)], tar: [(h, None, 2)]})
    expected = ref_sums(h.movedim(1, -1))
    close(stats[ar], expected[:2])
    close(stats[tar], expected[2:])
