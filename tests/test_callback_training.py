"""TARCallback inside real fastai training set-ups (issue 4): half precision, gradient accumulation, wrapped
models, the callback's lifecycle, export, memory, and modules called several times in one forward."""
import os
import pickle
import platform
import socket
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.amp import GradScaler, autocast
from fastai.text.all import (AWD_LSTM, SGD, CancelFitException, Callback, CrossEntropyLossFlat, GradientAccumulation,
                             L, Learner, MixedPrecision, RNNRegularizer, get_text_classifier, language_model_learner,
                             load_learner)

from fastai_tar import TARCallback
from fastai_tar.columns import PenaltyColumn
from conftest import (NO_BF16_ENV, PAD, VOCAB, AliveAfterBatch, Boom, Capture, LossSpy, clas_dls, far, hook_ids,
                      lm_dls, penalty, probe_bf16_autocast_lstm, quiet_fit, ref_ar, ref_penalty, ref_tar,
                      require_bf16_autocast, restore_torch_state, tiny_config, tiny_lm, torch_state)


class LSTMLM(nn.Module):
    "Embedding -> nn.LSTM -> Linear: no dropout, so two runs on the same data are the same computation."
    def __init__(self, emb=8, n_hid=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.lstm, self.head = nn.Embedding(VOCAB, emb), nn.LSTM(emb, n_hid, batch_first=True), \
            nn.Linear(n_hid, VOCAB)

    def forward(self, x): return self.head(self.lstm(self.emb(x))[0])


def flat_params(model): return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def zero_loss(pred, *yb):
    "A float32 loss of 0 (fastai's Recorder fails on a half loss): loss_grad is then the added penalty itself."
    return pred.float().sum() * 0


# --- mixed precision ---------------------------------------------------------------------------------------------
class RecordingScaler(GradScaler):
    "A CPU GradScaler that keeps what it is asked to scale."
    def __init__(self, events, **kw): super().__init__('cpu', **kw); self.events, self.seen = events, []

    def scale(self, outputs):
        self.events.append('scaler.scale'); self.seen.append(outputs.detach().clone())
        return super().scale(outputs)


class CPUMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision with CPU autocast (bf16: oneDNN has no fp16 LSTM) and an enabled CPU GradScaler.
    fastai enters autocast in before_batch and leaves it in after_loss, so a forward that raises never leaves it
    (no event follows an exception) and the rest of the process runs in bf16. Here autocast covers each batch's
    model forward only, entered by a forward pre-hook and left by an `always_call` forward hook, which torch runs
    even when the forward raises. The loss is computed outside, on the float32 `pred` of fastai's after_pred: the
    losses used here run in float32 under autocast anyway. The scaler events are fastai's own code."""
    def __init__(self, scaler=None, **kw):
        super().__init__(**kw)
        self.cpu_scaler, self._hooks, self._armed, self._inside = scaler, [], False, False

    def before_fit(self):  # fastai's before_fit builds the CUDA ones
        self.autocast, self.scales = autocast('cpu', dtype=torch.bfloat16), L()
        self.learn.scaler = self.cpu_scaler or GradScaler('cpu', init_scale=2. ** 8)
        # Registered per fit, not per batch: a hook that removed hooks would break torch's loop over them.
        self._remove_hooks()  # left by a fit that raised
        model = self.learn.model
        self._hooks = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave,
                                                                                                 always_call=True)]

    def before_batch(self): self._armed = True  # only the batch's own forward: after a failed fit the hooks stay inert
    def after_loss(self): pass  # autocast was left when the forward ended
    def after_fit(self): super().after_fit(); self._remove_hooks()

    def _enter(self, *_):
        if not self._armed: return
        self._armed, self._inside = False, True
        self.autocast.__enter__()

    def _leave(self, *_):
        if not self._inside: return
        self._inside = False
        self.autocast.__exit__(None, None, None)

    def _remove_hooks(self):
        for h in self._hooks: h.remove()
        self._hooks = []


@pytest.mark.parametrize('mode', ['bf16 model', 'fp16 model', 'bf16 autocast'])
def test_half_activations_penalty_in_float32(mode):
    "Half activations: the added penalty equals the float64 formula on the very half tensors to float32 rounding."
    model, cbs = LSTMLM(), []
    if mode == 'bf16 autocast':
        require_bf16_autocast()
        cbs.append(CPUMixedPrecision())
    else: model = model.to(torch.bfloat16 if mode == 'bf16 model' else torch.float16)
    cap, grab = Capture(model.lstm), LossSpy(stop=1)
    learn = Learner(lm_dls(), model, loss_func=zero_loss, opt_func=SGD, cbs=cbs + [TARCallback(2., 1.), grab])
    quiet_fit(learn)
    h = cap.outputs[0]
    assert h.dtype == (torch.float16 if mode == 'fp16 model' else torch.bfloat16)
    assert grab.train[0][1].item() == pytest.approx(ref_penalty(2., 1., h), rel=1e-6)
    # TAR alone, against what the test rules out: steps taken in half precision (fastai's RNNRegularizer).
    tar = ref_tar(h)
    assert learn.tar.history['tar'][0] == pytest.approx(tar, rel=1e-6)
    half_steps = (h[:, 1:] - h[:, :-1]).float().pow(2).mean().item()
    assert abs(half_steps - tar) > 1e-5 * tar
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the backward in half ran too


class ScaledLoss(Callback):
    "Keep loss_grad as backward saw it."
    order = 50
    def __init__(self): self.seen = []
    def after_backward(self): self.seen.append(self.learn.loss_grad.detach().clone())


def test_mixed_precision_scales_loss_with_penalty():
    "Under fastai's MixedPrecision the penalty joins loss_grad in after_loss, before before_backward scales it."
    require_bf16_autocast()
    events, scale = [], 2. ** 8
    scaler = RecordingScaler(events, init_scale=scale)
    model, tar, grab, after = LSTMLM(), TARCallback(2., 1.), LossSpy(stop=2), ScaledLoss()
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[tar, CPUMixedPrecision(scaler), grab, after])
    tar_after_loss = tar.after_loss
    tar.after_loss = lambda: (events.append('tar.after_loss'), tar_after_loss())
    before = flat_params(model)
    quiet_fit(learn)
    assert events == ['tar.after_loss', 'scaler.scale'] * 2
    assert all(h.dtype == torch.bfloat16 for h in cap.outputs)  # autocast did run the LSTM in bf16
    assert len(grab.train) == len(cap.outputs) == len(scaler.seen) == len(after.seen) == 2
    for (loss, _), h, unscaled, scaled in zip(grab.train, cap.outputs, scaler.seen, after.seen):
        pen = ref_penalty(2., 1., h)
        assert pen > 1e-3
        assert unscaled.item() == pytest.approx(loss.item() + pen, rel=1e-6)  # the scaler saw the penalty
        assert scaled.item() == pytest.approx(scale * unscaled.item(), rel=1e-6)
    assert not torch.equal(flat_params(model), before)  # the scaler let the steps through


class NoBF16LSTM(nn.LSTM):
    "An nn.LSTM that fails under CPU autocast as oneDNN's does on a CPU without bf16 (AVX2 only), and works outside."
    def forward(self, *args):
        if torch.is_autocast_enabled('cpu'):
            raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")
        return super().forward(*args)


def no_bf16_lm():
    model = LSTMLM()
    model.lstm = NoBF16LSTM(8, 16, batch_first=True)  # drawn from the RNG LSTMLM seeded: the same model every call
    return model


def test_mixed_precision_fit_that_raises_leaves_autocast():
    "A forward that raises inside a mixed-precision fit leaves autocast: the next fit runs as if nothing had happened."
    before = torch_state()
    reference = sgd_step(no_bf16_lm(), lm_dls(), [TARCallback()])
    with pytest.raises(RuntimeError, match='primitive descriptor'):
        sgd_step(no_bf16_lm(), lm_dls(), [TARCallback(), CPUMixedPrecision()])
    assert torch_state() == before
    after = sgd_step(no_bf16_lm(), lm_dls(), [TARCallback()])  # raises if autocast is still on
    assert torch.equal(after, reference)


def test_torch_state_check_names_and_restores_what_a_test_left():
    "The autouse `clean_torch_state` fixture's check: each changed setting is named, then put back."
    before = torch_state()
    torch.autocast('cpu', dtype=torch.float16).__enter__()  # what fastai's MixedPrecision left after a failed forward
    torch.set_autocast_enabled('cuda', True)
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(torch.get_num_threads() + 1)
    changed = restore_torch_state(before)
    assert torch_state() == before
    assert {name for name, _, _ in changed} == {'autocast cpu', 'autocast cpu dtype', 'autocast nesting',
                                                 'autocast cuda', 'default dtype', 'grad mode',
                                                 'deterministic algorithms', 'num threads'}
    assert ('autocast cpu', True, False) in changed
    assert restore_torch_state(before) == []


def test_bf16_probe_finds_what_onednn_reports():
    "The probe never skips the bf16 tests where oneDNN can run them (its failure is shown by the test below)."
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported(): pytest.skip("oneDNN reports no bf16 on this CPU")
    assert probe_bf16_autocast_lstm() is None


@pytest.mark.slow
def test_mixed_precision_tests_skip_with_reason_on_a_cpu_without_bf16(tmp_path):
    """The tests that need bf16 autocast skip, with the reason, on a CPU without bf16, and the rest of the file's
    mixed-precision tests pass: simulated by capping oneDNN at AVX2 (x86), which makes oneDNN refuse a bf16 LSTM
    exactly as on an AVX2-only CPU, or else by the test suite's own switch."""
    x86 = platform.machine().lower() in ('x86_64', 'amd64')
    env = {k: v for k, v in os.environ.items() if k != NO_BF16_ENV}
    env.update(OMP_NUM_THREADS='1', **({'ONEDNN_MAX_CPU_ISA': 'AVX2'} if x86 else {NO_BF16_ENV: '1'}))
    tests = ['test_half_activations_penalty_in_float32', 'test_mixed_precision_scales_loss_with_penalty',
             'test_mixed_precision_fit_that_raises_leaves_autocast']
    run = subprocess.run([sys.executable, '-m', 'pytest', __file__, '-q', '-rs', '-p', 'no:cacheprovider',
                          '--basetemp', str(tmp_path), '-k', ' or '.join(tests)],
                         cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '3 passed, 2 skipped' in run.stdout, run.stdout
    reason = 'this CPU cannot run an LSTM under bf16 autocast: could not create a primitive descriptor' if x86 \
        else f'{NO_BF16_ENV} is set'
    assert reason in run.stdout, run.stdout


# --- gradient accumulation ---------------------------------------------------------------------------------------
def sgd_step(model, dls, cbs):
    "The parameter change of one epoch of plain SGD (lr=1: the step is the gradient) of `model` on `dls`."
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=cbs)
    before = flat_params(model)
    quiet_fit(learn, lr=1.)
    return flat_params(model) - before


def sgd_update(alpha, beta, bs, n_acc=None, n=6):
    "The parameter change of one SGD step on `n` sequences, in micro-batches of `bs` when `n_acc` is set."
    cbs = [TARCallback(alpha, beta)] + ([GradientAccumulation(n_acc)] if n_acc else [])
    return sgd_step(LSTMLM(), lm_dls(n=n, bs=bs), cbs)


def test_gradient_accumulation_matches_one_big_batch():
    "fastai's GradientAccumulation over 3 micro-batches of 2 takes the step of one batch of 6, penalty included."
    big, acc = sgd_update(2., 1., bs=6), sgd_update(2., 1., bs=2, n_acc=6)
    tol = 1e-5 * big.abs().max().item()
    torch.testing.assert_close(acc, big, rtol=0, atol=tol)
    # Not true by construction: the penalty moves the step by far more than the tolerance, so adding it
    # after GradientAccumulation's rescaling (k times over) would fail the check above.
    assert (big - sgd_update(0., 0., bs=6)).abs().max().item() > 1000 * tol


# --- lifecycle: no hook and no activation of ours survives a fit, however it ends ---------------------------------
def lifecycle_learner(**kw):
    "A learner whose LSTM carries the test's own weakref hook; returns (learn, capture, hooks before any fit)."
    model = LSTMLM()
    cap = Capture(model.lstm, keep=False)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback(**kw))
    return learn, cap, hook_ids(model)


def assert_clean(learn, cap, hooks):
    "No hook of ours left on the model and no activation kept; and the callback did hook while it ran."
    assert hook_ids(learn.model) == hooks
    assert cap.refs and max(cap.hooks_seen) > 1  # TARCallback's hook sat next to ours during the forward
    assert cap.alive() == []


def test_no_hook_or_activation_after_normal_fit():
    learn, cap, hooks = lifecycle_learner(valid_metrics=True)
    quiet_fit(learn)
    assert_clean(learn, cap, hooks)


@pytest.mark.parametrize('exc', [RuntimeError('boom'), CancelFitException()], ids=['error', 'cancel_fit'])
def test_no_hook_or_activation_after_fit_is_interrupted(exc):
    "Another callback raising in after_batch (an error, or CancelFitException) leaves nothing behind."
    learn, cap, hooks = lifecycle_learner()
    if isinstance(exc, CancelFitException): quiet_fit(learn, cbs=Boom(exc))
    else:
        with pytest.raises(RuntimeError, match='boom'): quiet_fit(learn, cbs=Boom(exc))
    assert len(cap.refs) == 2
    assert_clean(learn, cap, hooks)
    grab = LossSpy(stop=1)  # the next fit still applies the penalty
    quiet_fit(learn, cbs=grab)
    assert grab.added[0] > 1e-3


def test_no_hook_after_exception_in_forward():
    "A forward pass that raises after the hooked module ran: the always-call root hook still removes ours."
    class Fails(nn.Module):
        def forward(self, x): raise ValueError('bad forward')
    learn, cap, hooks = lifecycle_learner()
    learn.model.head = Fails()
    with pytest.raises(ValueError, match='bad forward'): quiet_fit(learn)
    assert_clean(learn, cap, hooks)


def test_ten_fits_leave_nothing_behind():
    learn, cap, hooks = lifecycle_learner(valid_metrics=True)
    for _ in range(10):
        quiet_fit(learn)
        assert hook_ids(learn.model) == hooks
    assert_clean(learn, cap, hooks)
    assert [m.name for m in learn.metrics] == []  # the fit-table columns went with each fit
    assert len(learn.tar.history) == len(learn.dls.train)  # the history is the last fit's


def test_remove_cb_mid_session():
    "learn.remove_cb(learn.tar) between fits: no hook then, and the next fit adds nothing."
    learn, cap, hooks = lifecycle_learner()
    quiet_fit(learn)
    learn.remove_cb(learn.tar)
    assert hook_ids(learn.model) == hooks and not hasattr(learn, 'tar')
    n_seen, grab = len(cap.hooks_seen), LossSpy(stop=1)
    quiet_fit(learn, cbs=grab)
    assert grab.added == [0.]
    assert max(cap.hooks_seen[n_seen:]) == 1  # only the test's own hook ran in that forward
    assert_clean(learn, cap, hooks)


@pytest.mark.parametrize('exc', [KeyboardInterrupt(), RuntimeError('boom')], ids=['interrupt', 'error'])
@pytest.mark.parametrize('attached', ['learner', 'fit'])
def test_remove_cb_after_a_failed_fit_gives_the_learner_back(exc, attached):
    """A fit that raised never reaches after_fit. Removing the callback then (by hand, or fastai's `added_cbs` for
    `fit(cbs=...)`) gives fastai's RNNRegularizer its (2, 1) back and takes the penalty columns out of the table."""
    torch.manual_seed(0)
    tar = TARCallback(valid_metrics=True)
    learn = language_model_learner(lm_dls(n=8), AWD_LSTM, config=tiny_config(), pretrained=False,
                                   cbs=tar if attached == 'learner' else None)
    reg, hooks = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer)), hook_ids(learn.model)
    columns = []  # what the table held while the fit ran
    boom = Boom(exc, at=1)
    boom.before_batch = lambda: columns.append([m.name for m in learn.metrics])
    with warnings.catch_warnings(), pytest.raises(type(exc)):
        warnings.simplefilter('ignore')  # the one about switching fastai's regularizer off
        quiet_fit(learn, cbs=[boom] + ([tar] if attached == 'fit' else []))
    assert columns == [['train_ar', 'train_tar', 'valid_ar', 'valid_tar']]
    if attached == 'learner':
        assert (reg.alpha, reg.beta) == (0., 0.)  # still off: the state remove_cb must undo
        learn.remove_cb(learn.tar)
    assert not hasattr(learn, 'tar') and tar not in learn.cbs
    assert (reg.alpha, reg.beta) == (2., 1.)
    assert not any(isinstance(m, PenaltyColumn) for m in learn.metrics)
    assert hook_ids(learn.model) == hooks
    with learn.no_bar(): assert len(learn.validate()) == 1  # [valid_loss]: no penalty column left behind


# --- memory: no activation outlives its batch ---------------------------------------------------------------------
def test_no_activation_outlives_its_batch():
    "fastai AWD-LSTM LM, TAR on the encoder and AR on the output dropout, training and validation metrics."
    model = tiny_lm()
    caps = [Capture(model[0], keep=False), Capture(model[1].output_dp, keep=False)]
    probe = AliveAfterBatch(caps)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(valid_metrics=True), probe])
    quiet_fit(learn)
    assert probe.phases == ['train'] * 2 + ['valid']  # both phases captured (valid_metrics) and were checked
    assert [len(c.refs) for c in caps] == [3, 3]
    assert probe.alive == [0, 0, 0]
    row = dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))
    assert row['valid_ar'] > 0 and row['valid_tar'] > 0  # the validation activations were read before they went


# --- export -------------------------------------------------------------------------------------------------------
def test_export_load_learner_predict_and_fine_tune(tmp_path):
    learn = Learner(lm_dls(), LSTMLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback(2., 1.),
                    path=tmp_path)
    quiet_fit(learn)
    learn.export('tar.pkl')
    with pytest.warns(UserWarning, match='pickle'): loaded = load_learner(tmp_path / 'tar.pkl')
    assert isinstance(loaded.tar, TARCallback) and loaded.tar is not learn.tar
    dl = lm_dls(seed=1).valid
    preds, _ = loaded.get_preds(dl=dl)
    torch.testing.assert_close(preds, learn.get_preds(dl=dl)[0], rtol=0, atol=0)
    assert hook_ids(loaded.model) == set()

    loaded.dls = lm_dls(seed=2)  # fine-tuning the loaded learner applies the penalty again
    cap, grab = Capture(loaded.model.lstm), LossSpy(stop=1)
    quiet_fit(loaded, cbs=grab)
    assert grab.added[0] == penalty(ref_penalty(2., 1., cap.outputs[0]))
    assert grab.added[0] > 1e-3
    assert hook_ids(loaded.model) == {('lstm', 'fwd', cap.handle.id)}  # the test's own hook only


def test_export_keeps_no_per_batch_history(tmp_path):
    "learn.export() pickles the callback without its per-batch rows; the learner that exported keeps them."
    learn = Learner(lm_dls(n=96, bs=1), LSTMLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=TARCallback(2., 1.), path=tmp_path)
    quiet_fit(learn)
    before = learn.tar.history
    assert len(before) == 96
    learn.export('with_tar.pkl')
    pd.testing.assert_frame_equal(learn.tar.history, before)
    with pytest.warns(UserWarning, match='pickle'): loaded = load_learner(tmp_path / 'with_tar.pkl')
    assert len(loaded.tar.history) == 0 and list(loaded.tar.history.columns) == list(before.columns)
    # The callback's share of the file is less than its rows would take even as one compact DataFrame.
    learn.remove_cb(learn.tar)
    learn.export('without_tar.pkl')
    callback_bytes = (tmp_path / 'with_tar.pkl').stat().st_size - (tmp_path / 'without_tar.pkl').stat().st_size
    assert callback_bytes < len(pickle.dumps(before))


# --- modules called several times in one forward --------------------------------------------------------------------
def test_sentence_encoder_tar_spans_bptt_chunks():
    "A classifier's SentenceEncoder runs the AWD_LSTM once per bptt chunk: TAR covers the joined sequence."
    bptt, sl = 4, 12
    dls = clas_dls([sl, 8, 4], seq_len=bptt)  # rows 1 and 2 start one and two chunks late
    x, _ = dls.one_batch()
    torch.manual_seed(0)
    model = get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=bptt, config=tiny_config(clas=True), max_len=sl)
    cap, grab = Capture(model[0].module), LossSpy(stop=1)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(1., 4.), grab])
    quiet_fit(learn)
    assert [t.module for t in learn.tar.targets] == [model[0]] * 2  # hooked: the encoder, not the AWD_LSTM
    chunks = cap.outputs
    assert [c.shape[:2] for c in chunks] == [(1, bptt), (2, bptt), (3, bptt)]
    joined = torch.cat([nn.functional.pad(c, (0, 0, 0, 0, 0, 3 - len(c))) for c in chunks], 1)
    valid = x != PAD
    expected = ref_penalty(1., 4., (joined, valid))
    assert grab.added[0] == penalty(expected)
    # The pairs across chunk boundaries count: chunks taken one by one give another number.
    by_chunk = ref_penalty(1., 4., *[(c, valid[:len(c), i * bptt:(i + 1) * bptt]) for i, c in enumerate(chunks)])
    assert far(by_chunk, expected)


class TwoPassLSTM(LSTMLM):
    "One nn.LSTM run twice per forward, on the first 5 steps and on the other 7: a reused module."
    def forward(self, x):
        e = self.emb(x)
        return self.head(torch.cat([self.lstm(e[:, :5])[0], self.lstm(e[:, 5:])[0]], 1))


def test_named_module_called_twice_pools_both_calls():
    "The penalty of a module called twice is the sums of both calls over their total count, not the last call's."
    model = TwoPassLSTM()
    cap, grab = Capture(model.lstm), LossSpy(stop=1)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1., modules='lstm'), grab])
    quiet_fit(learn)
    a, b = cap.outputs
    assert (a.shape[1], b.shape[1]) == (5, 7)
    pooled = ref_penalty(2., 1., a, b)
    assert grab.added[0] == penalty(pooled)
    last_only = ref_penalty(2., 1., b)
    mean_of_means = (ref_penalty(2., 1., a) + last_only) / 2
    assert far(last_only, pooled) and far(mean_of_means, pooled)


# --- wrapped models ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('names', [None, ('module.lstm', 'lstm'), ('lstm', 'module.lstm')],
                         ids=['found', 'prefixed_tar', 'prefixed_ar'])
def test_data_parallel_model_hooks_inner_modules(names):
    "Through nn.DataParallel the inner LSTM is found, or named with or without the wrapper's 'module.' prefix."
    inner = LSTMLM()
    model = nn.DataParallel(inner)  # without GPUs it calls the module directly: the wrapping is what is tested
    kw = {} if names is None else dict(modules=[names[0]], ar_modules=[names[1]])
    cap, grab = Capture(inner.lstm), LossSpy(stop=1)
    hooks = hook_ids(model)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1., **kw), grab])
    quiet_fit(learn)
    assert [(t.kind, t.name, t.module) for t in learn.tar.targets] == [('ar', 'lstm', inner.lstm),
                                                                        ('tar', 'lstm', inner.lstm)]
    assert grab.added[0] == penalty(ref_penalty(2., 1., cap.outputs[0]))
    assert hook_ids(model) == hooks


def test_compiled_model_gets_the_penalty_of_the_plain_model():
    """torch.compile (eager backend: dynamo's tracing, no code generation) around a fastai LM: the callback reads its
    (logits, raw, dropped) output, outside the compiled graph."""
    runs = []
    for compiled in (False, True):
        model = tiny_lm()
        raw, dropped = Capture(model[0]), Capture(model[1].output_dp)
        hooks, spy = hook_ids(model), LossSpy(stop=1)
        learn = Learner(lm_dls(), torch.compile(model, backend='eager') if compiled else model,
                        loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1.), spy])
        torch.manual_seed(1)  # the same dropout masks in both runs
        quiet_fit(learn)
        assert [(t.kind, t.name, t.module) for t in learn.tar.targets] == [('ar', 'dropped', None),
                                                                           ('tar', 'raw', None)]
        assert hook_ids(model) == hooks
        assert spy.added[0] == penalty(2 * ref_ar(dropped.outputs[0]) + ref_tar(raw.outputs[0]))
        runs.append(spy.train[0])
    (loss, grad), (loss_c, grad_c) = runs
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grad_c.item() == pytest.approx(grad.item(), rel=1e-6)
    assert (grad - loss).item() > 1e-4


def cpu_replicas(module, n):
    """What `nn.parallel.replicate` makes for `n` GPUs, on the CPU: every submodule copied by
    `_replicate_for_data_parallel` (sharing the original's hook dicts), its parameters as non-leaf views."""
    copies = [{m: m._replicate_for_data_parallel() for m in module.modules()} for _ in range(n)]
    for memo in copies:
        for m, r in memo.items():
            for name, child in m._modules.items(): r._modules[name] = None if child is None else memo[child]
            for name, p in m._parameters.items(): setattr(r, name, None if p is None else p.view_as(p))
    return [memo[module] for memo in copies]


class CPUDataParallel(nn.DataParallel):
    "nn.DataParallel's forward on `n` devices, played on the CPU: scatter, replicate, parallel_apply (threads), gather."
    def __init__(self, module, n=2): super().__init__(module); self.n = n

    def forward(self, x):
        chunks = x.chunk(self.n)
        replicas, grad = cpu_replicas(self.module, len(chunks)), torch.is_grad_enabled()
        def run(i):
            with torch.set_grad_enabled(grad): return replicas[i](chunks[i])  # grad mode is per thread
        with ThreadPoolExecutor(len(chunks)) as pool: return torch.cat(list(pool.map(run, range(len(chunks)))))


def test_data_parallel_replicas_pool_into_the_original_module():
    "DataParallel's replicas call our hook with a copy of the module: each half-batch pools into one penalty."
    inner = LSTMLM()
    model = CPUDataParallel(inner, n=2)
    cap, spy = Capture(inner.lstm), LossSpy(stop=1)
    hooks = hook_ids(model)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=[TARCallback(2., 1.), spy])
    before = flat_params(inner)
    quiet_fit(learn)
    assert [h.shape[0] for h in cap.outputs] == [2, 2]  # two replicas, each on half the batch of 4
    expected = ref_penalty(2., 1., *cap.outputs)
    assert spy.added[0] == penalty(expected)
    assert far(ref_penalty(2., 1., cap.outputs[0]), expected)  # one replica's half alone gives another number
    assert hook_ids(model) == hooks
    assert not torch.equal(flat_params(inner), before)  # the gradients reached the original parameters
    # the same as the model run whole, without replicas
    plain = LossSpy(stop=1)
    quiet_fit(Learner(lm_dls(), LSTMLM(), loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1.), plain]))
    assert spy.added[0] == penalty(plain.added[0])


# --- multi-process data parallel: fastai's distrib_ctx calls .cuda(), so DDP is driven directly, on gloo/CPU ----
def _ddp_rank(rank, world, port, out):
    "One process of the DistributedDataParallel run: its half of the batch, one step; writes its update."
    torch.set_num_threads(1)
    loopback = next(n for _, n in socket.if_nameindex() if n.startswith('lo'))  # 'lo' on Linux, 'lo0' on macOS
    os.environ['GLOO_SOCKET_IFNAME'] = loopback  # gloo talks over 127.0.0.1 only
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = DistributedDataParallel(LSTMLM())
        half = lm_dls(n=4, bs=2, rows=slice(2 * rank, 2 * rank + 2))
        tar = TARCallback(2., 1., modules=['module.lstm'], ar_modules=['lstm'])  # names with and without 'module.'
        update = sgd_step(model, half, [tar])
        found = [(t.name, t.module is model.module.lstm) for t in tar.targets]
        torch.save({'update': update, 'found': found, 'hooks': len(hook_ids(model))}, f'{out}/rank{rank}.pt')
    finally: dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process_on_whole_batch(tmp_path):
    "Two gloo processes, each on half the batch, take the step of one process on the whole batch, penalty included."
    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    whole = sgd_step(LSTMLM(), lm_dls(n=4, bs=4), [TARCallback(2., 1., modules=['lstm'])])
    tol = 1e-5 * whole.abs().max().item()
    for r in ranks:
        assert r['found'] == [('lstm', True), ('lstm', True)] and r['hooks'] == 0
        torch.testing.assert_close(r['update'], whole, rtol=0, atol=tol)
    # The penalty moves the step by far more than the tolerance: the check above sees it.
    off = sgd_step(LSTMLM(), lm_dls(n=4, bs=4), [TARCallback(0., 0.)])
    assert (whole - off).abs().max().item() > 1000 * tol
