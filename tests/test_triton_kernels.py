"""The Triton kernels (`fastai_tar.triton_kernels`) on the CPU, in Triton's interpreter: sums, counts and gradients of
`fastai_tar::ar_tar_sums` against float64 references, masks, layouts and dtypes included, nothing saved but the
inputs, and the plain gradient where a graph of the backward is asked for. They run where Triton is installed (PyTorch's
CUDA builds ship it; `pip install triton` on a CPU machine): in a child process started with `TRITON_INTERPRET=1`,
which Triton reads when a kernel is defined. On a GPU, `tests/test_gpu.py` runs the same operator compiled."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
if importlib.util.find_spec('triton') is None:
    pytestmark = pytest.mark.skip(reason="Triton is not installed (it ships with PyTorch's CUDA builds; on a CPU "
                                  "machine `pip install triton` lets its interpreter run these tests)")
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by test_the_kernels_pass_in_the_interpreter, in a "
                                 "child process with TRITON_INTERPRET=1")


@pytest.mark.skipif(INTERPRETED, reason='this is the child process')
def test_the_kernels_pass_in_the_interpreter():
    root = Path(__file__).parents[1]
    env = dict(os.environ, TRITON_INTERPRET='1',
               PYTHONPATH=os.pathsep.join([str(root), str(root / 'tests'), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__], cwd=root,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert ' passed' in last and '1 skipped' in last and 'failed' not in last, res.stdout[-2000:]  # (this test)


def ref(a, t, am, tm, sd=1, fd=-1):
    "float64 (AR sum, TAR sum, AR count, TAR count), by hand: features moved last, TAR's time axis before them"
    out = [0., 0., 0, 0]
    if a is not None:
        x = a.detach().double().movedim(fd, -1)
        keep = torch.ones(x.shape[:-1], dtype=torch.bool) if am is None else am
        out[0], out[2] = float((x.pow(2).sum(-1) * keep).sum()), int(keep.sum()) * x.shape[-1]
    if t is not None:
        x = t.detach().double().movedim(fd, -1)
        ms = sd - (sd > fd % t.dim())
        x = x.movedim(ms, -2)
        keep = torch.ones(x.shape[:-1], dtype=torch.bool) if tm is None else tm.movedim(ms, -1)
        pairs = keep[..., 1:] & keep[..., :-1]
        out[1] = float(((x[..., 1:, :] - x[..., :-1, :]).pow(2).sum(-1) * pairs).sum())
        out[3] = int(pairs.sum()) * x.shape[-1]
    return out


CASES = {  # name: (shape, sd, fd, masked, same)
    'batch-first': ((3, 9, 5), 1, -1, False, False), 'one tensor': ((3, 9, 5), 1, -1, False, True),
    'masked': ((3, 9, 5), 1, -1, True, False), 'masked one tensor': ((3, 9, 5), 1, -1, True, True),
    'sequence-first': ((9, 3, 5), 0, -1, True, True), 'channels-first': ((3, 5, 9), 2, 1, True, False),
    'wide': ((2, 4, 300), 1, -1, False, True), 'one step': ((3, 1, 5), 1, -1, False, True),
    '4-d': ((2, 3, 6, 4), 2, -1, True, True),
}


@interpreted
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('case', list(CASES))
def test_sums_counts_and_gradients_match_float64(case, dtype):
    from fastai_tar.triton_kernels import ar_tar_sums
    shape, sd, fd, masked, same = CASES[case]
    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    a = t if same else torch.randn(shape, generator=g).to(dtype).requires_grad_()
    mshape = tuple(n for i, n in enumerate(shape) if i != fd % len(shape))
    am, tm = (torch.rand(mshape, generator=g) < 0.7, torch.rand(mshape, generator=g) < 0.7) if masked else (None, None)
    if same: am = tm
    sums, counts = ar_tar_sums(a, t, am, tm, sd % len(shape), fd % len(shape), fd % len(shape))
    want = ref(a, t, am, tm, sd, fd)
    assert sums.dtype == torch.float32 and counts.tolist() == want[2:]
    torch.testing.assert_close(sums.double(), torch.tensor(want[:2], dtype=torch.float64), rtol=2e-6, atol=1e-6)
    xs = [t] if same else [a, t]
    got = torch.autograd.grad(2 * sums[0] + 3 * sums[1], xs)
    x64 = [x.detach().double().requires_grad_() for x in xs]
    a64, t64 = (x64[0], x64[0]) if same else x64
    want_grads = torch.autograd.grad(2 * _ar(a64, am, fd) + 3 * _tar(t64, tm, sd, fd), x64)
    # the interpreter rounds half to nearest as numpy does, a GPU likewise; one rounding of the float32 result
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6),
           torch.float16: dict(rtol=2 ** -9, atol=1e-6)}[dtype]
    for x, w in zip(got, want_grads):
        assert x.dtype == dtype and x.shape == w.shape
        torch.testing.assert_close(x.double(), w, **tol)


def _ar(x, m, fd):
    y = x.movedim(fd, -1).pow(2).sum(-1)
    return (y if m is None else y * m).sum()


def _tar(x, m, sd, fd):
    ms = sd - (sd > fd % x.dim())
    y = x.movedim(fd, -1).movedim(ms, -2)
    d = (y[..., 1:, :] - y[..., :-1, :]).pow(2).sum(-1)
    if m is None: return d.sum()
    mm = m.movedim(ms, -1)
    return (d * (mm[..., 1:] & mm[..., :-1])).sum()


@interpreted
def test_only_ar_or_only_tar_and_all_padding():
    from fastai_tar.triton_kernels import ar_tar_sums
    h = torch.randn(2, 5, 3, requires_grad=True)
    sums, counts = ar_tar_sums(h, None, None, None, -1, 2, -1)
    assert counts.tolist() == [30, 0] and sums[1] == 0
    sums, counts = ar_tar_sums(None, h, None, None, 1, -1, 2)
    assert counts.tolist() == [0, 24] and sums[0] == 0
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    sums, counts = ar_tar_sums(h, h, nothing, nothing, 1, 2, 2)
    assert sums.tolist() == [0., 0.] and counts.tolist() == [0, 0]
    h2 = h.detach().clone()
    h2[0, 2] = float('inf')  # padding may hold inf: it is filled, not multiplied
    pad = torch.ones(2, 5, dtype=torch.bool)
    pad[0, 2] = False
    sums, _ = ar_tar_sums(h2, h2, pad, pad, 1, 2, 2)
    assert torch.isfinite(sums).all()


@interpreted
def test_nothing_is_saved_but_the_inputs_and_a_graph_of_the_backward_is_the_plain_one():
    from fastai_tar.tools.bench import saved_bytes
    from fastai_tar.triton_kernels import ar_tar_sums
    t = torch.randn(3, 6, 4, requires_grad=True)
    a = torch.randn(3, 6, 4, requires_grad=True)
    m = torch.rand(3, 6) < 0.7
    assert saved_bytes(lambda t, a, m: ar_tar_sums(a, t, m, m, 1, 2, 2)[0].sum(), t, a, m) == 0
    sums, _ = ar_tar_sums(a, t, None, None, 1, 2, 2)
    g_t, = torch.autograd.grad(sums[1], t, create_graph=True)  # a graph of the backward: differentiable
    gg, = torch.autograd.grad(g_t.pow(2).sum(), t)
    t64 = t.detach().double().requires_grad_()
    g64, = torch.autograd.grad(_tar(t64, None, 1, -1), t64, create_graph=True)
    want, = torch.autograd.grad(g64.pow(2).sum(), t64)
    torch.testing.assert_close(gg.double(), want, rtol=1e-5, atol=1e-6)
