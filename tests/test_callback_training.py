"""TARCallback inside fastai training set-ups: half precision and mixed precision (the loss scaler sees the penalty),
gradient accumulation (the same update as one big batch), gradient checkpointing, nn.DataParallel (replicas pool into
the original module), DistributedDataParallel (two processes match one), and torch.compile'd models."""
import os
import platform
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.amp import GradScaler, autocast
from torch.nn.parallel import DistributedDataParallel
from fastai.text.all import Callback, CrossEntropyLossFlat, GradientAccumulation, L, Learner, MixedPrecision, SGD

from fastai_tar import TARCallback

from conftest import (Capture, LossSpy, NO_BF16_ENV, far, hook_ids, lm_dls, penalty, probe_bf16_autocast_lstm,
                      quiet_fit, ref_ar, ref_penalty, ref_tar, require_bf16_autocast, restore_torch_state, tiny_lm,
                      torch_state)
from models import CheckpointLM, NoDropoutLSTMLM, cpu_replicas, first_grads, flat_params, zero_loss


# --- gradient checkpointing ------------------------------------------------------------------------------------------
def test_checkpointing_non_reentrant_gives_the_plain_gradient():
    "The penalty is taken outside the checkpointed region: the gradient is the one of the same model without it."
    plain = first_grads(CheckpointLM(), TARCallback(2., 1.))
    ckpt = first_grads(CheckpointLM(reentrant=False), TARCallback(2., 1.))
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-6)
    off = first_grads(CheckpointLM(), TARCallback(0., 0.))
    assert (plain - off).abs().max() > 1e-3  # the penalty's share of the gradient is far above the tolerance


def test_checkpointing_reentrant_is_an_error_naming_the_fix():
    "use_reentrant=True runs the module without gradient: an error at the first batch, never a penalty without effect."
    model, spy = CheckpointLM(reentrant=True), LossSpy()
    hooks = hook_ids(model)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1.), spy])
    with pytest.raises(RuntimeError, match=r'use_reentrant=True.*use use_reentrant=False'): quiet_fit(learn)
    assert spy.rows == [] and len(learn.tar.history) == 0  # nothing recorded as if it had been applied
    assert hook_ids(model) == hooks


# --- half precision and mixed precision; the suite's own torch-state and bf16 checks ---------------------------------
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
    model, cbs = NoDropoutLSTMLM(), []
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
    model, tar, grab, after = NoDropoutLSTMLM(), TARCallback(2., 1.), LossSpy(stop=2), ScaledLoss()
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
    model = NoDropoutLSTMLM()
    # drawn from the RNG NoDropoutLSTMLM seeded: the same model every call
    model.lstm = NoBF16LSTM(8, 16, batch_first=True)
    return model


def test_mixed_precision_fit_that_raises_leaves_autocast():
    "A forward that raises inside a mixed-precision fit leaves autocast: the next fit runs as if nothing had happened."
    before = torch_state()
    reference = sgd_step(no_bf16_lm(), lm_dls(), [TARCallback(seq_dim=1)])
    with pytest.raises(RuntimeError, match='primitive descriptor'):
        sgd_step(no_bf16_lm(), lm_dls(), [TARCallback(seq_dim=1), CPUMixedPrecision()])
    assert torch_state() == before
    after = sgd_step(no_bf16_lm(), lm_dls(), [TARCallback(seq_dim=1)])  # raises if autocast is still on
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


# --- gradient accumulation -------------------------------------------------------------------------------------------
def sgd_step(model, dls, cbs):
    "The parameter change of one epoch of plain SGD (lr=1: the step is the gradient) of `model` on `dls`."
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=cbs)
    before = flat_params(model)
    quiet_fit(learn, lr=1.)
    return flat_params(model) - before


def sgd_update(alpha, beta, bs, n_acc=None, n=6):
    "The parameter change of one SGD step on `n` sequences, in micro-batches of `bs` when `n_acc` is set."
    cbs = [TARCallback(alpha, beta)] + ([GradientAccumulation(n_acc)] if n_acc else [])
    return sgd_step(NoDropoutLSTMLM(), lm_dls(n=n, bs=bs), cbs)


def test_gradient_accumulation_matches_one_big_batch():
    "fastai's GradientAccumulation over 3 micro-batches of 2 takes the step of one batch of 6, penalty included."
    big, acc = sgd_update(2., 1., bs=6), sgd_update(2., 1., bs=2, n_acc=6)
    tol = 1e-5 * big.abs().max().item()
    torch.testing.assert_close(acc, big, rtol=0, atol=tol)
    # Not true by construction: the penalty moves the step by far more than the tolerance, so adding it
    # after GradientAccumulation's rescaling (k times over) would fail the check above.
    assert (big - sgd_update(0., 0., bs=6)).abs().max().item() > 1000 * tol


# --- nn.DataParallel, torch.compile, DistributedDataParallel ---------------------------------------------------------
@pytest.mark.parametrize('names', [None, ('module.lstm', 'lstm'), ('lstm', 'module.lstm')],
                         ids=['found', 'prefixed_tar', 'prefixed_ar'])
def test_data_parallel_model_hooks_inner_modules(names):
    "Through nn.DataParallel the inner LSTM is found, or named with or without the wrapper's 'module.' prefix."
    inner = NoDropoutLSTMLM()
    model = nn.DataParallel(inner)  # without GPUs it calls the module directly: the wrapping is what is tested
    kw = {} if names is None else dict(modules=[names[0]], ar_modules=[names[1]])
    cap, grab = Capture(inner.lstm), LossSpy(stop=1)
    hooks = hook_ids(model)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1., **kw), grab])
    quiet_fit(learn)
    assert [(t.kind, t.name, t.module) for t in learn.tar.reads] == [('ar', 'lstm', inner.lstm),
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
        assert [(t.kind, t.name, t.module) for t in learn.tar.reads] == [('ar', 'dropped', None), ('tar', 'raw', None)]
        assert hook_ids(model) == hooks
        assert spy.added[0] == penalty(2 * ref_ar(dropped.outputs[0]) + ref_tar(raw.outputs[0]))
        runs.append(spy.train[0])
    (loss, grad), (loss_c, grad_c) = runs
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grad_c.item() == pytest.approx(grad.item(), rel=1e-6)
    assert (grad - loss).item() > 1e-4


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
    inner = NoDropoutLSTMLM()
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
    quiet_fit(Learner(lm_dls(), NoDropoutLSTMLM(), loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1.), plain]))
    assert spy.added[0] == penalty(plain.added[0])


def _ddp_rank(rank, world, port, out):
    "One process of the DistributedDataParallel run: its half of the batch, one step; writes its update."
    torch.set_num_threads(1)
    loopback = next(n for _, n in socket.if_nameindex() if n.startswith('lo'))  # 'lo' on Linux, 'lo0' on macOS
    os.environ['GLOO_SOCKET_IFNAME'] = loopback  # gloo talks over 127.0.0.1 only
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = DistributedDataParallel(NoDropoutLSTMLM())
        half = lm_dls(n=4, bs=2, rows=slice(2 * rank, 2 * rank + 2))
        tar = TARCallback(2., 1., modules=['module.lstm'], ar_modules=['lstm'])  # names with and without 'module.'
        update = sgd_step(model, half, [tar])
        found = [(t.name, t.module is model.module.lstm) for t in tar.reads]
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
    whole = sgd_step(NoDropoutLSTMLM(), lm_dls(n=4, bs=4), [TARCallback(2., 1., modules=['lstm'])])
    tol = 1e-5 * whole.abs().max().item()
    for r in ranks:
        assert r['found'] == [('lstm', True), ('lstm', True)] and r['hooks'] == 0
        torch.testing.assert_close(r['update'], whole, rtol=0, atol=tol)
    # The penalty moves the step by far more than the tolerance: the check above sees it.
    off = sgd_step(NoDropoutLSTMLM(), lm_dls(n=4, bs=4), [TARCallback(0., 0.)])
    assert (whole - off).abs().max().item() > 1000 * tol
