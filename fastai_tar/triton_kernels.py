"""AR and TAR on a GPU in one Triton kernel each way, as `torch.library` operators: `fastai_tar::ar_tar_sums` (both
sums and counts, masks included, in one launch and a deterministic second stage) and `fastai_tar::ar_tar_grads` (one
launch that recomputes from the inputs: nothing is saved for backward but them). `torch.compile` traces them without a
graph break. Their CPU kernels are the eager code of `fastai_tar.functional`, except under `TRITON_INTERPRET=1`,
where they run the Triton kernels in Triton's interpreter: the kernels' logic is tested on a CPU.

Imported by `fastai_tar.functional` only where Triton is installed (it ships with PyTorch's CUDA builds).
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import functional as F

__all__ = ['ar_tar_sums', 'ar_tar_grads', 'INTERPRET']

INTERPRET = os.environ.get('TRITON_INTERPRET', '') == '1'  # the CPU kernels run the Triton kernels, interpreted
ROWS = 8  # rows (steps of a sequence) per program; each program loops over the features in blocks


@triton.jit
def _sums_kernel(a_ptr, am_ptr, t_ptr, tm_ptr, part_ptr, cnt_ptr,
                 a_rows, a_T, t_rows, t_T, F_a, F_t, n_a_blocks, part_stride,
                 a_sl, a_st, a_sf, am_sl, am_st, t_sl, t_st, t_sf, tm_sl, tm_st,
                 HAS_AM: tl.constexpr, HAS_TM: tl.constexpr, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    "One program: ROWS rows of AR's tensor (the first n_a_blocks programs) or of TAR's; a partial sum and count each"
    pid = tl.program_id(0)
    if pid < n_a_blocks:  # AR: the squares of the rows' features, where the mask says the row is real
        r = pid * ROWS + tl.arange(0, ROWS)
        live = r < a_rows
        l, s = r // a_T, r % a_T
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for f0 in range(0, F_a, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            x = tl.load(a_ptr + l[:, None] * a_sl + s[:, None] * a_st + f[None, :] * a_sf,
                        mask=live[:, None] & (f < F_a)[None, :], other=0.).to(tl.float32)
            acc += tl.sum(x * x, axis=1)
        if HAS_AM:  # a fill, not a product: padding may hold inf or NaN
            live = live & (tl.load(am_ptr + l * am_sl + s * am_st, mask=live, other=0) != 0)
        tl.store(part_ptr + pid, tl.sum(tl.where(live, acc, 0.), axis=0))
        tl.store(cnt_ptr + pid, tl.sum(live.to(tl.int64), axis=0) * F_a)
    else:  # TAR: the squared differences of each step and the next, where both are real
        b = pid - n_a_blocks
        r = b * ROWS + tl.arange(0, ROWS)
        l, s = r // t_T, r % t_T
        live = (r < t_rows) & (s < t_T - 1)
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for f0 in range(0, F_t, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            at = t_ptr + l[:, None] * t_sl + s[:, None] * t_st + f[None, :] * t_sf
            m = live[:, None] & (f < F_t)[None, :]
            d = tl.load(at + t_st, mask=m, other=0.).to(tl.float32) - tl.load(at, mask=m, other=0.).to(tl.float32)
            acc += tl.sum(d * d, axis=1)
        if HAS_TM:
            here = tl.load(tm_ptr + l * tm_sl + s * tm_st, mask=live, other=0)
            live = live & (here != 0) & (tl.load(tm_ptr + l * tm_sl + (s + 1) * tm_st, mask=live, other=0) != 0)
        tl.store(part_ptr + part_stride + b, tl.sum(tl.where(live, acc, 0.), axis=0))
        tl.store(cnt_ptr + part_stride + b, tl.sum(live.to(tl.int64), axis=0) * F_t)


@triton.jit
def _grads_kernel(a_ptr, am_ptr, t_ptr, tm_ptr, ga_ptr, gt_ptr, g_ptr,
                  a_rows, a_T, t_rows, t_T, F_a, F_t, n_a_blocks,
                  a_sl, a_st, a_sf, am_sl, am_st, t_sl, t_st, t_sf, tm_sl, tm_st,
                  HAS_A: tl.constexpr, HAS_T: tl.constexpr, SAME: tl.constexpr, HAS_AM: tl.constexpr,
                  HAS_TM: tl.constexpr, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    """d(g[0] * AR sum + g[1] * TAR sum) of each row, written once in the input's dtype: AR's rows first (unless
    SAME: one tensor, both terms in one gradient), then TAR's. The outputs are contiguous (rows, F)."""
    pid = tl.program_id(0)
    if pid < n_a_blocks:  # AR of its own tensor: 2 * g * x where the row is real
        r = pid * ROWS + tl.arange(0, ROWS)
        live = r < a_rows
        l, s = r // a_T, r % a_T
        wa = 2 * tl.load(g_ptr).to(tl.float32)
        if HAS_AM: live = live & (tl.load(am_ptr + l * am_sl + s * am_st, mask=r < a_rows, other=0) != 0)
        for f0 in range(0, F_a, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            m = (r < a_rows)[:, None] & (f < F_a)[None, :]
            x = tl.load(a_ptr + l[:, None] * a_sl + s[:, None] * a_st + f[None, :] * a_sf, mask=m, other=0.)
            g = tl.where(live[:, None], wa * x.to(tl.float32), 0.)
            tl.store(ga_ptr + r[:, None] * F_a + f[None, :], g.to(ga_ptr.dtype.element_ty), mask=m)
    else:  # TAR's tensor: u[s-1] - u[s], u[s] = 2 * g * (x[s+1] - x[s]) where the pair is real; AR too if SAME
        b = pid - n_a_blocks
        r = b * ROWS + tl.arange(0, ROWS)
        rows = r < t_rows
        l, s = r // t_T, r % t_T
        wt = 2 * tl.load(g_ptr + 1).to(tl.float32)
        nxt = rows & (s < t_T - 1)  # the pair (s, s+1) exists
        prv = rows & (s > 0)  # the pair (s-1, s) exists
        if HAS_TM:
            here = tl.load(tm_ptr + l * tm_sl + s * tm_st, mask=rows, other=0) != 0
            nxt = nxt & here & (tl.load(tm_ptr + l * tm_sl + (s + 1) * tm_st, mask=nxt, other=0) != 0)
            prv = prv & here & (tl.load(tm_ptr + l * tm_sl + (s - 1) * tm_st, mask=prv, other=0) != 0)
        if SAME:
            wa = 2 * tl.load(g_ptr).to(tl.float32)
            real = rows
            if HAS_AM: real = rows & (tl.load(am_ptr + l * am_sl + s * am_st, mask=rows, other=0) != 0)
        for f0 in range(0, F_t, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            fm = (f < F_t)[None, :]
            at = t_ptr + l[:, None] * t_sl + s[:, None] * t_st + f[None, :] * t_sf
            x = tl.load(at, mask=rows[:, None] & fm, other=0.).to(tl.float32)
            up = tl.load(at + t_st, mask=nxt[:, None] & fm, other=0.).to(tl.float32)
            down = tl.load(at - t_st, mask=prv[:, None] & fm, other=0.).to(tl.float32)
            g = tl.where(prv[:, None], wt * (x - down), 0.) - tl.where(nxt[:, None], wt * (up - x), 0.)
            if SAME: g += tl.where(real[:, None], wa * x, 0.)
            tl.store(gt_ptr + r[:, None] * F_t + f[None, :], g.to(gt_ptr.dtype.element_ty), mask=rows[:, None] & fm)


def _block_f(*fs) -> int: return min(triton.next_power_of_2(max(*fs, 1)), 256)


def _grid(n_a_blocks, n_t_blocks):
    return lambda meta: (n_a_blocks + n_t_blocks,)


def _args(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd):
    """Both terms in the functional's canonical layouts, (sequences, steps, features) views and (sequences, steps)
    masks, which the kernels read through their strides; a 1x1x1 stand-in where a term has no tensor"""
    dummy = torch.zeros(1, 1, 1, device=(tar_h if ar_h is None else ar_h).device)
    a = dummy if ar_h is None else F._canonical(ar_h, None, ar_fd)
    t = dummy if tar_h is None else F._canonical(tar_h, sd, tar_fd)
    am = None if ar_h is None else F._canonical_mask(ar_mask, None, ar_fd)
    tm = None if tar_h is None else F._canonical_mask(tar_mask, sd, tar_fd)
    return a, t, am, tm


def _mask_strides(m):
    return (0, 0) if m is None else (m.stride(0), m.stride(1))


def _launch_sums(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd) -> tuple[Tensor, Tensor]:
    a, t, am, tm = _args(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd)
    a_rows = 0 if ar_h is None else a.shape[0] * a.shape[1]
    t_rows = 0 if tar_h is None else t.shape[0] * t.shape[1]
    na, nt = triton.cdiv(a_rows, ROWS), triton.cdiv(t_rows, ROWS)
    width = max(na, nt, 1)
    part = torch.zeros(2, width, dtype=torch.float32, device=a.device)
    cnt = torch.zeros(2, width, dtype=torch.int64, device=a.device)
    (am_sl, am_st), (tm_sl, tm_st) = _mask_strides(am), _mask_strides(tm)
    if na + nt:
        wrap_triton(_sums_kernel)[_grid(na, nt)](
            a, a if am is None else am, t, t if tm is None else tm, part, cnt,
            a_rows, a.shape[1], t_rows, t.shape[1], a.shape[2], t.shape[2], na, width,
            a.stride(0), a.stride(1), a.stride(2), am_sl, am_st, t.stride(0), t.stride(1), t.stride(2), tm_sl, tm_st,
            HAS_AM=am is not None, HAS_TM=tm is not None, ROWS=ROWS, BLOCK_F=_block_f(a.shape[2], t.shape[2]))
    return part.sum(1), cnt.sum(1)  # the second stage: a tree in one kernel each, the same order every time


def _launch_grads(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, g) -> tuple[Tensor, Tensor]:
    same = ar_h is not None and ar_h is tar_h
    a, t, am, tm = _args(None if same else ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd)
    if same: am = F._canonical_mask(ar_mask, sd, ar_fd)  # AR's mask on TAR's rows
    a_rows = 0 if ar_h is None or same else a.shape[0] * a.shape[1]
    t_rows = 0 if tar_h is None else t.shape[0] * t.shape[1]
    ga = torch.empty(a.shape, dtype=a.dtype, device=a.device) if a_rows else None
    gt = torch.empty(t.shape, dtype=t.dtype, device=t.device) if t_rows else None
    na, nt = triton.cdiv(a_rows, ROWS), triton.cdiv(t_rows, ROWS)
    (am_sl, am_st), (tm_sl, tm_st) = _mask_strides(am), _mask_strides(tm)
    if na + nt:
        wrap_triton(_grads_kernel)[_grid(na, nt)](
            a, a if am is None else am, t, t if tm is None else tm, a if ga is None else ga, t if gt is None else gt,
            g, a_rows, a.shape[1], t_rows, t.shape[1], a.shape[2], t.shape[2], na,
            a.stride(0), a.stride(1), a.stride(2), am_sl, am_st, t.stride(0), t.stride(1), t.stride(2), tm_sl, tm_st,
            HAS_A=ar_h is not None, HAS_T=tar_h is not None, SAME=same, HAS_AM=am is not None,
            HAS_TM=tm is not None, ROWS=ROWS, BLOCK_F=_block_f(a.shape[2], t.shape[2]))
    ar_grad = None if ga is None else F._uncanonical(ga, ar_h, None, ar_fd)
    tar_grad = None if gt is None else F._uncanonical(gt, tar_h, sd, tar_fd)
    return ar_grad, tar_grad


# --- the operators ---------------------------------------------------------------------------------------------------
@triton_op('fastai_tar::ar_tar_sums', mutates_args=())
def ar_tar_sums(ar_h: Tensor | None, tar_h: Tensor | None, ar_mask: Tensor | None, tar_mask: Tensor | None,
                sd: int, ar_fd: int, tar_fd: int) -> tuple[Tensor, Tensor]:
    "`(sums, counts)`: AR's and TAR's sums of squares (float32) and what they counted (int64), each of shape (2,)"
    return _launch_sums(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd)


@triton_op('fastai_tar::ar_tar_grads', mutates_args=())
def ar_tar_grads(ar_h: Tensor | None, tar_h: Tensor | None, ar_mask: Tensor | None, tar_mask: Tensor | None,
                 sd: int, ar_fd: int, tar_fd: int, g: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of `g[0] * AR sum + g[1] * TAR sum`: of AR's tensor and of TAR's (AR's is empty where it is TAR's
    tensor itself, whose one gradient then has both terms, or where a term has no tensor)"""
    ar_grad, tar_grad = _launch_grads(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, g)
    return (g.new_empty(0) if ar_grad is None else ar_grad), (g.new_empty(0) if tar_grad is None else tar_grad)


@ar_tar_sums.register_kernel('cpu')
def _sums_cpu(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd):
    "On the CPU: the functional's eager node, or under TRITON_INTERPRET=1 the kernel, interpreted"
    if INTERPRET: return _launch_sums(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd)
    with torch.no_grad(): ar, tar = F._ArTarSums.apply(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, False)
    n_ar = 0 if ar_h is None else int(F._ar_count(ar_h, ar_mask, ar_fd))
    n_tar = 0 if tar_h is None else int(F._tar_count(tar_h, tar_mask, sd, tar_fd))
    return torch.stack([ar.float(), tar.float()]), torch.tensor([n_ar, n_tar])


@ar_tar_grads.register_kernel('cpu')
def _grads_cpu(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, g):
    "On the CPU: the functional's eager node's backward, or under TRITON_INTERPRET=1 the kernel, interpreted"
    if INTERPRET: ar_grad, tar_grad = _launch_grads(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, g)
    else:
        xs = {id(x): x.detach().requires_grad_() for x in (ar_h, tar_h) if x is not None}
        ar_x, tar_x = (None if x is None else xs[id(x)] for x in (ar_h, tar_h))
        with torch.enable_grad():
            ar, tar = F._ArTarSums.apply(ar_x, tar_x, ar_mask, tar_mask, sd, ar_fd, tar_fd, False)
            grads = dict(zip(xs, torch.autograd.grad((ar, tar), list(xs.values()), (g[0], g[1]), allow_unused=True)))
        ar_grad = None if ar_h is None or ar_h is tar_h else grads[id(ar_h)]
        tar_grad = None if tar_h is None else grads[id(tar_h)]
    return (g.new_empty(0) if ar_grad is None else ar_grad), (g.new_empty(0) if tar_grad is None else tar_grad)


def _setup(ctx, inputs, output):
    ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd = inputs
    ctx.save_for_backward(ar_h, tar_h, ar_mask, tar_mask)  # nothing else: the backward recomputes from them
    ctx.axes, ctx.same = (sd, ar_fd, tar_fd), ar_h is not None and ar_h is tar_h


def _backward(ctx, g_sums, g_counts):
    ar_h, tar_h, ar_mask, tar_mask = ctx.saved_tensors
    sd, ar_fd, tar_fd = ctx.axes
    nothing = (None,) * 5
    if torch.is_grad_enabled():  # create_graph=True: the plain expressions' gradient, correct to any order
        ar_grad = None if ar_h is None else torch.autograd.grad(
            F._plain_ar(ar_h, ar_mask, ar_fd), ar_h, g_sums[0], create_graph=True)[0]
        tar_grad = None if tar_h is None else torch.autograd.grad(
            F._plain_tar(tar_h, tar_mask, sd, tar_fd), tar_h, g_sums[1], create_graph=True)[0]
        return ((ar_grad + tar_grad), None, *nothing) if ctx.same else (ar_grad, tar_grad, *nothing)
    ar_grad, tar_grad = ar_tar_grads(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, g_sums)
    if ctx.same: return tar_grad, None, *nothing
    return (None if ar_h is None else ar_grad), (None if tar_h is None else tar_grad), *nothing


ar_tar_sums.register_autograd(_backward, setup_context=_setup)
