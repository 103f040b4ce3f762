"""CUDA checks, for a GPU machine (`scripts/gpu_check.sh` runs them there): every test skips where torch sees no CUDA
device, as on CI. About 30 s on an H200, most of it the float64 references of the 30M-element inputs on the CPU.

1. The penalty functions on CUDA float32, bfloat16 and float16 inputs (with and without a padding mask, sequence-first,
   a step of more than `CHUNK_NUMEL` elements, 30M elements): each value and gradient against a float64 reference of
   the same values computed on the CPU, and nothing saved for backward beyond the inputs.
2. `TARCallback` training tiny LSTM language models on CUDA: each batch's added penalty equals a float64 reference of
   the activations the test captures with its own hooks, and the callback causes no host-device sync per batch.

How the sync check works: torch's sync debug mode (`torch.cuda.set_sync_debug_mode('warn')`) makes every operation
that blocks the host on the device (`.item()`, `.cpu()`, a blocking copy, `torch.cuda.synchronize` in a kernel's
host code, ...) emit a warning as it happens. Two test callbacks, ordered just before and just after `TARCallback`,
switch the mode on at each batch's `before_batch` and off at its `after_batch`, so the window holds every event of the
callback, its forward hooks and the backward of its penalty, but not fastai's own per-epoch work (the Recorder,
the fit table). Inside the window the model, the loss and the optimizer may sync too: each warning is recorded with
the Python stack it was raised from (in the autograd thread as well), and counts against the callback only when a
frame of that stack is in the `fastai_tar` package (fastai's WeightDropout ignores warnings around its LSTM call, so the
callback's hook objects are wrapped to let sync warnings through). A control test makes the callback sync on purpose
(an `.item()` in `after_loss` and in its forward hooks) and checks that the window catches each in every training
batch, so that a pass means "looked and found none". The first training batch (which settles what the callback reads)
and the later ones are asserted apart.

`FASTAI_TAR_GPU_TEST_DEVICE=cpu` runs the same tests on the CPU, to check the test code itself where there is no GPU
(the sync checks then only check their bookkeeping: on the CPU nothing syncs, and the control emulates its sync).
"""
import math
import os
import threading
import traceback
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from fastai.text.all import SGD, Callback, CrossEntropyLossFlat, Learner, ModelResetter

import fastai_tar
import fastai_tar.callback
import fastai_tar.capture
import fastai_tar.functional as F
from fastai_tar import TARCallback
from fastai_tar.tools.bench import saved_bytes
from conftest import BS, SL, VOCAB, Capture, LossSpy, lm_dls, penalty, quiet_fit, ref_ar, ref_penalty, ref_tar, \
    tiny_lm

DEVICE = torch.device(os.environ.get('FASTAI_TAR_GPU_TEST_DEVICE', 'cuda'))
ON_CUDA = DEVICE.type == 'cuda'
pytestmark = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False): these tests run on a GPU "
                                       "machine, see scripts/gpu_check.sh")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VALUE_RTOL = 1e-6  # every sum accumulates in float32 (or float64) over inputs that float64 holds exactly
HAS_FUSED = hasattr(F, 'ar_tar_sum_count')


@contextmanager
def cpu_threads():
    "All the CPU's cores for the float64 references (the conftest runs tests on one), put back after."
    n = torch.get_num_threads()
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    try: yield
    finally: torch.set_num_threads(n)


# --- 1. the functions -------------------------------------------------------------------------------------------------
def make_input(shape, dtype, seq_dim, masked, seed=0):
    """`h` on DEVICE (a leaf requiring grad) and its mask: lengths from full down to 0 along `seq_dim` (a row of
    padding only, a row of one step), the padding holding inf (an fp16 overflow) that must never reach a result."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, generator=g).to(dtype)
    mask = None
    if masked:
        n_seq, n_rows = shape[seq_dim], math.prod(shape[:-1]) // shape[seq_dim]
        lengths = torch.randint(0, n_seq + 1, (n_rows,), generator=g)
        lengths[:3] = torch.tensor([n_seq, 0, 1])[:n_rows]
        valid = torch.arange(n_seq)[None] < lengths[:, None]  # (rows, steps)
        other = [s for d, s in enumerate(shape[:-1]) if d != seq_dim]
        mask = valid.view(*other, n_seq).movedim(-1, seq_dim).contiguous()
        h[~mask] = float('inf')
        mask = mask.to(DEVICE)
    return h.to(DEVICE).requires_grad_(), mask


def reference(h, mask, seq_dim):
    """float64, on the CPU, of `h`'s own values: {'ar'|'tar': (sum, count, gradient of the sum)}; padding is filled
    with 0 before anything is computed, as the functions promise (so inf there changes nothing)."""
    with cpu_threads():
        x = h.detach().cpu().double().requires_grad_()
        valid = torch.ones(h.shape[:-1], dtype=torch.bool) if mask is None else mask.cpu()
        xm, vm = x.movedim(seq_dim, -2), valid.movedim(seq_dim, -1)
        xm = xm.masked_fill(~vm[..., None], 0)
        pairs = vm[..., 1:] & vm[..., :-1]
        ar = (xm.pow(2).sum(-1) * vm).sum()
        tar = ((xm[..., 1:, :] - xm[..., :-1, :]).pow(2).sum(-1) * pairs).sum()
        ar_g, = torch.autograd.grad(ar, x, retain_graph=True)
        tar_g, = torch.autograd.grad(tar, x)
    n = h.shape[-1]
    return {'ar': (ar.item(), int(vm.sum()) * n, ar_g), 'tar': (tar.item(), int(pairs.sum()) * n, tar_g)}


def check_grad(got, want, dtype, what, scale=None):
    """`got` (in `h`'s dtype) against the float64 `want`: float32 within 1e-6 relative (and 1e-6 of the largest, for
    TAR's cancelling differences); half dtypes, whose gradient is rounded once, within one unit of that rounding.
    `scale` replaces `|want|` in the relative bound (for a gradient summed by autograd from two rounded ones)."""
    assert got.dtype == dtype, f"{what}: gradient of dtype {got.dtype}, not {dtype}"
    with cpu_threads():
        got = got.detach().cpu().double()
        fi = torch.finfo(dtype)
        rtol = 1e-6 if dtype == torch.float32 else fi.eps
        atol = 1e-6 * float(want.abs().max()) + (0 if dtype == torch.float32 else fi.smallest_normal * fi.eps)
        err, bound = (got - want).abs(), rtol * (want.abs() if scale is None else scale) + atol
        bad = ~(err <= bound)  # NaN counts as bad
        if bad.any():
            i = int(torch.where(bad.flatten())[0][0])
            pytest.fail(f"{what}: {int(bad.sum())} of {got.numel()} gradient elements off (rtol={rtol:g}, "
                        f"atol={atol:g}); first at flat index {i}: got {float(got.flatten()[i]):.9g}, "
                        f"want {float(want.flatten()[i]):.9g}", pytrace=False)


CASES = {  # name: (shape, seq_dim, masked)
    'small': ((4, 12, 16), 1, False),
    'small masked': ((4, 12, 16), 1, True),
    'sequence-first masked': ((12, 4, 16), 0, True),
    'step over CHUNK_NUMEL, rows over ROW_MAX': ((2, 3, 600_000), 1, True),
    '30M': ((8, 2048, 1832), 1, False),
    '30M masked': ((8, 2048, 1832), 1, True),
}


@pytest.mark.parametrize('dtype', DTYPES, ids=lambda d: str(d).replace('torch.', ''))
@pytest.mark.parametrize('case', list(CASES))
def test_functions_match_float64_reference_on_cuda(case, dtype):
    shape, sd, masked = CASES[case]
    h, mask = make_input(shape, dtype, sd, masked)
    ref = reference(h, mask, sd)
    assert ref['ar'][1] > 0 and ref['tar'][1] > 0 and ref['tar'][0] > 0
    for kind, mean_fn, sum_count_fn in (('ar', F.ar_penalty, F.ar_sum_count), ('tar', F.tar_penalty, F.tar_sum_count)):
        s_ref, n_ref, g_ref = ref[kind]
        # the mean
        out = mean_fn(h, mask, sd)
        assert out.device == h.device and out.dtype == torch.float32
        assert out.item() == pytest.approx(s_ref / n_ref, rel=VALUE_RTOL), f"{kind}_penalty value"
        g, = torch.autograd.grad(out, h)
        check_grad(g, g_ref / n_ref, dtype, f"{kind}_penalty")
        # the sum and its count
        s, n = sum_count_fn(h, mask, sd)
        assert int(n) == n_ref, f"{kind}_sum_count count"
        assert s.item() == pytest.approx(s_ref, rel=VALUE_RTOL), f"{kind}_sum_count sum"
        g, = torch.autograd.grad(s, h)
        check_grad(g, g_ref, dtype, f"{kind}_sum_count")
        # nothing kept for backward beyond h and its mask
        assert saved_bytes(lambda x, m: mean_fn(x, m, sd), h, mask) == 0, f"{kind}_penalty saves tensors"
        assert saved_bytes(lambda x, m: sum_count_fn(x, m, sd)[0], h, mask) == 0, f"{kind}_sum_count saves tensors"
    if HAS_FUSED:  # AR and TAR in one call, as the callback makes them: of two tensors (AWD-LSTM's dropped and raw)
        h2, mask2 = make_input(shape, dtype, sd, masked, seed=1)
        ref2 = reference(h2, mask2, sd)
        (a, na), (t, nt) = F.ar_tar_sum_count(h, h2, mask, mask2, seq_dim=sd)
        assert (int(na), int(nt)) == (ref['ar'][1], ref2['tar'][1]), "ar_tar_sum_count counts"
        assert a.item() == pytest.approx(ref['ar'][0], rel=VALUE_RTOL), "ar_tar_sum_count AR sum"
        assert t.item() == pytest.approx(ref2['tar'][0], rel=VALUE_RTOL), "ar_tar_sum_count TAR sum"
        g, g2 = torch.autograd.grad(a + t, (h, h2))
        check_grad(g, ref['ar'][2], dtype, "ar_tar_sum_count, AR's tensor")
        check_grad(g2, ref2['tar'][2], dtype, "ar_tar_sum_count, TAR's tensor")
        fused = lambda x, y, m, m2: sum(s for s, _ in F.ar_tar_sum_count(x, y, m, m2, seq_dim=sd))
        assert saved_bytes(fused, h, h2, mask, mask2) == 0, "ar_tar_sum_count saves tensors"
        # and of one tensor (a model without a dropped output): half gradients may then be rounded twice, each term's
        # and their sum (autograd adds the two in h's dtype), so the bound is one rounding of each of the three
        (a, _), (t, _) = F.ar_tar_sum_count(h, h, mask, mask, seq_dim=sd)
        g, = torch.autograd.grad(a + t, h)
        with cpu_threads():
            ga, gt = ref['ar'][2], ref['tar'][2]
            both, scale = ga + gt, ga.abs() + gt.abs() + (ga + gt).abs()
        check_grad(g, both, dtype, "ar_tar_sum_count of one tensor", scale=scale if dtype != torch.float32 else None)


# --- 2. training with TARCallback -------------------------------------------------------------------------------------
SYNC_MSG = 'synchronizing CUDA operation'
PKG_DIR = os.path.realpath(os.path.dirname(fastai_tar.__file__)) + os.sep


class SyncLog:
    "The syncs that torch's sync debug mode reports while a window is open: the batch, the thread and the stack"
    def __init__(self):
        self.batch, self.batches, self.events = None, [], []

    def show(self, message, category, filename, lineno, file=None, line=None):
        "`warnings.showwarning` inside `watch`: a sync warning is recorded, any other passed on"
        if SYNC_MSG not in str(message): return self.passed_on(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if os.path.realpath(f.filename).startswith(PKG_DIR)]
        self.events.append(dict(batch=self.batch, thread=threading.current_thread().name, ours=ours, stack=stack))

    @contextmanager
    def watch(self):
        with warnings.catch_warnings():
            warnings.filterwarnings('always', message=f'.*{SYNC_MSG}')  # every one, not once per place
            self.passed_on, warnings.showwarning = warnings.showwarning, self.show
            try: yield self
            finally:
                if ON_CUDA: torch.cuda.set_sync_debug_mode(0)

    def ours(self, first_train=False):
        "The syncs with a frame of fastai_tar on their stack: in the first training batch, or in all the others"
        first = next((b for b in self.batches if b[0] == 'train'), None)
        return [e for e in self.events if e['ours'] and (e['batch'] == first) == first_train]

    def others(self): return [e for e in self.events if not e['ours']]

    @staticmethod
    def describe(events) -> str:
        return '\n'.join(f"  batch {e['batch']}, thread {e['thread']!r}: " +
                         ' <- '.join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in e['ours'][::-1])
                         for e in events[:20])


@contextmanager
def hooks_let_sync_warnings_through():
    """fastai's WeightDropout ignores UserWarnings around its LSTM call, where the callback's hook on that LSTM runs:
    the callback's hook object (`capture._Tap`) is wrapped so that a sync warning raised in it is seen all the same."""
    tap = getattr(fastai_tar.capture, '_Tap', None)
    if tap is None: yield; return  # the capture was redone: its hooks are then seen wherever no filter hides them
    real = tap.__call__

    def call(self, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings('always', message=f'.*{SYNC_MSG}')
            return real(self, *args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tap, '__call__', call)
        yield


class SyncWindowOpen(Callback):
    "Just before TARCallback in every event: opens the window at before_batch"
    order, run_valid = TARCallback.order - 0.5, True
    def __init__(self, log): self.log = log

    def before_batch(self):
        self.log.batch = ('train' if self.training else 'valid', self.epoch, self.iter)
        self.log.batches.append(self.log.batch)
        if ON_CUDA: torch.cuda.set_sync_debug_mode('warn')


class SyncWindowClose(Callback):
    "Just after TARCallback in every event: closes the window at after_batch"
    order, run_valid = TARCallback.order + 0.5, True
    def __init__(self, log): self.log = log

    def after_batch(self):
        if ON_CUDA: torch.cuda.set_sync_debug_mode(0)
        self.log.batch = None


class PackedLSTM(nn.Module):
    """A one-layer LSTM language model fed a PackedSequence: rows of lengths SL, SL-3, ... (at least 2), padding after;
    longest first, so that neither packing nor unpacking reorders the rows (which moves indices between devices)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.head = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True), nn.Linear(12, VOCAB)

    def forward(self, x):
        lengths = torch.tensor([max(2, x.shape[1] - 3 * i) for i in range(x.shape[0])])  # on the CPU, as packing wants
        packed = pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=True)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.head(out)


def awd_lstm_setup():
    "fastai's AWD-LSTM LM: AR of the dropped output, TAR of the last layer's raw output"
    model = tiny_lm()
    return model, [ModelResetter()], {'dropped': model[1].output_dp, 'raw': model[0].rnns[-1]}


def packed_setup():
    "AR and TAR of a PackedSequence's real steps: the callback unpacks it and masks the padding"
    model = PackedLSTM()
    return model, [], {'h': model.rnn}


SETUPS = {'AWD-LSTM float32': (awd_lstm_setup, False), 'AWD-LSTM bf16 autocast': (awd_lstm_setup, True),
          'packed LSTM float32': (packed_setup, False)}
ALPHA, BETA, N_TRAIN, N_VALID = 2., 1., 5 * BS, 2 * BS  # 5 training batches an epoch, 2 validation batches


def cuda_fit(setup, bf16, epochs=2, extra=()):
    """Fit on DEVICE with TARCallback (valid_metrics too), the test's captures and spy, and the sync window open
    around every batch; returns the spy, the captures and the sync log."""
    model, cbs, watch = SETUPS[setup][0]()
    caps = {k: Capture(m) for k, m in watch.items()}
    spy, log = LossSpy(), SyncLog()
    dls = lm_dls(N_TRAIN, BS, SL, n_valid=N_VALID).to(DEVICE)
    learn = Learner(dls, model.to(DEVICE), loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[*cbs, TARCallback(alpha=ALPHA, beta=BETA, valid_metrics=True), spy, SyncWindowOpen(log),
                         SyncWindowClose(log), *extra])
    if bf16: learn.to_bf16()
    torch.manual_seed(1)
    with log.watch(), hooks_let_sync_warnings_through(): quiet_fit(learn, epochs, lr=1e-2)
    for c in caps.values(): c.handle.remove()
    return learn, spy, caps, log


def expected_penalties(setup, caps):
    "float64 references, on the CPU, of the captured training activations, one per training batch"
    cpu = lambda c: [(h.cpu(), None if v is None else v.cpu()) for h, v, training in c.records if training]
    if setup.startswith('AWD'):
        return [ALPHA * ref_ar(d) + BETA * ref_tar(r) for (d, _), (r, _) in zip(cpu(caps['dropped']), cpu(caps['raw']))]
    return [ref_penalty(ALPHA, BETA, part) for part in cpu(caps['h'])]


@pytest.fixture(scope='module')
def fits():
    "Each setup fitted once (2 epochs), shared by the tests that read it"
    done = {}
    def get(setup):
        if setup not in done:
            if SETUPS[setup][1] and not ON_CUDA: pytest.skip("bf16 autocast through fastai's MixedPrecision needs CUDA")
            done[setup] = cuda_fit(setup, SETUPS[setup][1])
        return done[setup]
    return get


@pytest.mark.parametrize('setup', list(SETUPS))
def test_training_penalty_matches_float64_reference(fits, setup):
    "Each training batch adds alpha*AR + beta*TAR of the activations it read (the spy reads loss_grad - loss)"
    learn, spy, caps, log = fits(setup)
    assert next(learn.model.parameters()).device.type == DEVICE.type
    expected = expected_penalties(setup, caps)
    assert len(expected) == len(spy.added) == 2 * N_TRAIN // BS
    assert spy.added == [penalty(e) for e in expected]
    assert min(expected) > 1e-4  # a penalty to see, not a zero that any code would match
    print(f"{setup}: read {', '.join(f'{k} {c.records[0][0].dtype}' for k, c in caps.items())}; penalties "
          f"{min(expected):.4g} to {max(expected):.4g}")


@pytest.mark.parametrize('setup', list(SETUPS))
def test_no_host_device_sync_per_batch(fits, setup):
    """No sync from the callback in any batch after the first training batch (training and validation batches:
    hooks, after_pred, after_loss, the penalty's backward, after_batch); the model's own syncs, if any, are listed
    for information and do not count."""
    learn, spy, caps, log = fits(setup)
    assert len(log.batches) == 2 * (N_TRAIN + N_VALID) // BS  # every batch ran inside a window
    ours = log.ours()
    others = log.others()
    print(f"{setup}: {len(log.batches)} batches watched; {len(others)} sync(s) in them from outside fastai_tar "
          f"(model, loss, optimizer); from fastai_tar: {len(log.ours(True))} in the first training batch, "
          f"{len(ours)} after it")
    assert not ours, f"{len(ours)} host-device sync(s) from fastai_tar after the first training batch:\n" + \
        SyncLog.describe(ours)


@pytest.mark.parametrize('setup', list(SETUPS))
def test_no_host_device_sync_in_first_training_batch(fits, setup):
    "Settling the plan at the first training batch does not sync either"
    learn, spy, caps, log = fits(setup)
    ours = log.ours(first_train=True)
    assert not ours, f"{len(ours)} host-device sync(s) from fastai_tar in the first training batch:\n" + \
        SyncLog.describe(ours)


def test_sync_window_catches_a_sync_in_the_callback(monkeypatch):
    """Control: with a host read (`.item()`) put into the callback's after_loss and into its forward hooks, every
    training batch shows a sync from fastai_tar in each, so that the tests above look where a sync would be."""
    def syncing(fn):
        def wrapped(*args):
            out = fn(*args)
            if isinstance(out, torch.Tensor):
                if out.is_cuda: out.sum().item()
                else: warnings.warn(f"called a {SYNC_MSG} (emulated: this run has no GPU)")
            return out
        return wrapped
    monkeypatch.setattr(fastai_tar.callback, 'mean_of', syncing(fastai_tar.callback.mean_of))
    record = fastai_tar.capture.Forward

    def syncing_record(args, kwargs, output, *rest):  # the record of each forward the hooks keep
        syncing(lambda o: o[0] if isinstance(o, tuple) else o)(output)
        return record(args, kwargs, output, *rest)
    monkeypatch.setattr(fastai_tar.capture, 'Forward', syncing_record)
    learn, spy, caps, log = cuda_fit('AWD-LSTM float32', False, epochs=1)
    train = {b for b in log.batches if b[0] == 'train'}
    assert len(train) == N_TRAIN // BS

    def caught(where, name):
        return {e['batch'] for e in log.events
                if any(f.name == name and f.filename.endswith(where) for f in e['ours'])}
    assert caught('callback.py', 'after_loss') == train
    assert caught('capture.py', '__call__') >= train  # the hooks, in validation batches too


# --- 3. the Triton kernels on a GPU: one each way, traced by torch.compile --------------------------------------------
needs_triton = pytest.mark.skipif(not ON_CUDA or F._triton() is None,
                                  reason="the Triton kernels run on CUDA where Triton is installed")


@needs_triton
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_a_gpu_takes_one_triton_kernel_each_way(dtype):
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator(device=DEVICE).manual_seed(0)
    raw = torch.randn(64, 70, 400, device=DEVICE, generator=g).to(dtype).requires_grad_()
    dropped = torch.randn(64, 70, 400, device=DEVICE, generator=g).to(dtype).requires_grad_()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        (a, na), (t, nt) = F.ar_tar_sum_count(dropped, raw)
        (F.mean_of(a, na, 2.) + F.mean_of(t, nt, 1.)).backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == 'CUDA']
    assert sum('_sums_kernel' in n for n in names) == 1 and sum('_grads_kernel' in n for n in names) == 1, names
    r64, d64 = raw.detach().double().cpu(), dropped.detach().double().cpu()
    assert (F.mean_of(a, na) / ref_ar(d64) - 1).abs().item() < 1e-6
    assert (F.mean_of(t, nt) / ref_tar(r64) - 1).abs().item() < 1e-6


@needs_triton
def test_torch_compile_traces_the_triton_operator_without_a_graph_break():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset(); counters.clear()
    h = torch.randn(8, 50, 64, device=DEVICE, requires_grad=True)

    def penalty_of(h):
        (a, na), (t, nt) = F.ar_tar_sum_count(h, h)
        return F.mean_of(a, na, 2.) + F.mean_of(t, nt, 1.)
    compiled = torch.compile(penalty_of, fullgraph=True)
    got = compiled(h)
    assert sum(counters['graph_break'].values()) == 0
    torch.testing.assert_close(got, penalty_of(h), rtol=1e-6, atol=1e-7)
    g1, = torch.autograd.grad(got, h)
    g2, = torch.autograd.grad(penalty_of(h), h)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
