"""AR and TAR as pure functions of an activation tensor: torch only, no fastai.

`ar_penalty(h)` is `h.pow(2).mean()` and `tar_penalty(h)` is `(h[:,1:]-h[:,:-1]).pow(2).mean()`
(Merity et al., AWD-LSTM), with a padding mask, any time axis, float32 accumulation for half
inputs and exact zeros where nothing is valid. Each is a sum over valid elements divided by
their count; the `*_sum_count` forms return both so that callers can pool several calls, steps
or ranks into one mean. The sums are custom autograd functions that keep nothing for backward
but their inputs, work in blocks of at most `CHUNK_NUMEL` elements with scratch buffers of one
block (so that temporaries stay small whatever the size of `h`), and write the gradient directly.
Gradients are correct to any order (a backward that builds a graph uses differentiable ops), forward-mode
AD has a `jvp`, and under `torch.func` transforms or inside `torch.compile` the penalties are the plain
expression, with the same mask and accumulation semantics, so that transforms and compilers see ops they know.
Dtypes: float64 (accumulated in float64), float32, float16, bfloat16 and the float8 formats with a zero
and a sign (accumulated in float32, the gradient rounded once to `h`'s dtype); others raise a TypeError.
"""
import math

import torch
from torch import Tensor

from .arg_docs import add_arg_docs

__all__ = ['ar_penalty', 'tar_penalty', 'ar_sum_count', 'tar_sum_count', 'mean_of']

# Elements per block. Eager PyTorch pays a few microseconds per op, so blocks must be large for
# that to stay small against the memory traffic (2**18 is ~1.5x slower, 2**21 no faster); the
# scratch buffers stay a bounded 4 MB of float32 each, not a copy of the whole activation.
CHUNK_NUMEL = 1 << 20
# Longest row whose float32 vector norm stays within ~1e-7 of the exact sum of squares.
ROW_MAX = 1 << 16


# The floating dtypes with arithmetic kernels; float8 formats with a zero and a sign only convert, so their sums
# and gradients are computed in float32 and rounded once. (float8_e8m0fnu, a scale format, has neither zero nor
# sign, and packed float4 no conversion kernel: no gradient could be stored in them.)
_ARITH = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FLOAT8 = ('float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2', 'float8_e5m2fnuz')
SUPPORTED_DTYPES = _ARITH + tuple(getattr(torch, d) for d in _FLOAT8 if hasattr(torch, d))


def _acc_dtype(h: Tensor) -> torch.dtype:
    "float64 stays float64; float32, half and float8 inputs accumulate in float32."
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _check(h, mask, seq_dim) -> int:
    "Validate the arguments; return `seq_dim` as a non-negative index."
    if not isinstance(h, Tensor): raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in SUPPORTED_DTYPES:
        names = ', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)
        raise TypeError(f"h must be a floating point tensor of dtype {names}; got {h.dtype}: pass h.float()")
    if h.dim() < 2: raise ValueError(f"h must have a time and a feature dimension, got shape {tuple(h.shape)}")
    is_int = isinstance(seq_dim, int) and not isinstance(seq_dim, bool)
    if not is_int or not -h.dim() <= seq_dim < h.dim() or seq_dim % h.dim() == h.dim() - 1:
        raise ValueError(f"seq_dim={seq_dim} must name a dimension of h other than the last (features); "
                         f"h has shape {tuple(h.shape)}: use 1 for batch-first, 0 for sequence-first")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True where the position is real data), "
                            f"got {getattr(mask, 'dtype', type(mask).__name__)}: pass mask.bool()")
        if mask.shape != h.shape[:-1]:
            raise ValueError(f"mask must have the shape of h without its last (feature) dimension, "
                             f"{tuple(h.shape[:-1])}, got {tuple(mask.shape)}")
        if mask.device != h.device: raise ValueError(f"mask is on {mask.device} but h is on {h.device}")
    return seq_dim % h.dim()


def _pair_mask(mask: Tensor, seq_dim: int) -> Tensor:
    "A pair (t, t+1) counts only when both of its positions are real data."
    n = mask.shape[seq_dim] - 1
    return mask.narrow(seq_dim, 0, n) & mask.narrow(seq_dim, 1, n)


def _valid_pairs(h: Tensor, mask: Tensor | None, seq_dim: int) -> Tensor | None:
    "The pair mask of `h`'s steps; None without a mask, or with no pair to mask"
    return _pair_mask(mask, seq_dim) if mask is not None and h.shape[seq_dim] > 1 else None


def _ar_count(h, mask, seq_dim=None):  # (seq_dim unused: the signature of `_tar_count`)
    return h.numel() if mask is None else mask.sum() * h.shape[-1]


def _tar_count(h, mask, seq_dim):
    n_pairs = h.shape[seq_dim] - 1
    if n_pairs <= 0: return 0
    if mask is None: return h.numel() // h.shape[seq_dim] * n_pairs
    return _pair_mask(mask, seq_dim).sum() * h.shape[-1]


# --- cutting `h` into blocks --------------------------------------------------------------------------
def _plan(h: Tensor, seq_dim: int):
    """Time steps per block, the pieces along one other dim when a single step exceeds `CHUNK_NUMEL`, and the
    elements of a block with the two extra steps TAR's backward reads (the size of the scratch buffers)."""
    step_numel = h.numel() // max(h.shape[seq_dim], 1)
    if step_numel <= CHUNK_NUMEL:
        steps = max(1, CHUNK_NUMEL // max(step_numel, 1))
        return steps, [None], (min(steps, h.shape[seq_dim]) + 2) * step_numel
    other = max((d for d in range(h.dim()) if d != seq_dim), key=lambda d: h.shape[d])
    size = h.shape[other]
    per = max(1, CHUNK_NUMEL * size // step_numel)
    return 1, [(other, b, min(per, size - b)) for b in range(0, size, per)], 3 * step_numel // size * per


def _cut(x: Tensor | None, piece) -> Tensor | None:
    "`x` narrowed to one piece along the other dim; masks, which lack the feature dim, keep it whole there."
    if x is None or piece is None or piece[0] >= x.dim(): return x
    return x.narrow(*piece)


def _spans(start: int, stop: int, step: int):
    return [(a, min(step, stop - a)) for a in range(start, stop, step)]


def _rows(m: Tensor | None, seq_dim: int, a: int, k: int) -> Tensor | None:
    "Mask slice broadcastable against the matching slice of `h`."
    return None if m is None else m.narrow(seq_dim, a, k).unsqueeze(-1)


def _steps(x: Tensor, seq_dim: int, n: int) -> tuple:
    "The shape of `x` with `n` steps along `seq_dim`"
    return x.shape[:seq_dim] + (n,) + x.shape[seq_dim + 1:]


class _Scratch:
    "Buffers made once per call and reused by every block: a fresh allocation per block would fault in new pages"
    def __init__(self, numel: int, dtype, device):
        self.numel, self.dtype, self.device, self.bufs = numel, dtype, device, {}

    def __call__(self, name: str, shape) -> Tensor:
        "A contiguous `shape` view of buffer `name`"
        n = math.prod(shape)
        if name not in self.bufs or self.bufs[name].numel() < n:
            self.bufs[name] = torch.empty(max(n, self.numel), dtype=self.dtype, device=self.device)
        return self.bufs[name][:n].view(shape)

    def acc(self, x: Tensor) -> Tensor:
        "`x` in the accumulation dtype: itself for float32/float64, a copy into buffer 'x' for half"
        return x if x.dtype == self.dtype else self('x', x.shape).copy_(x)


def _total(parts, h: Tensor, acc) -> Tensor:
    # Each part is an accurate sum over one block, and `torch.sum` adds the parts by cascade (pairwise)
    # summation: the total stays within float32 rounding however many blocks there are.
    if not parts: return torch.zeros((), dtype=acc, device=h.device)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _row_squares(x: Tensor, out: Tensor) -> Tensor:
    "`out` = sum of `x**2` along the last dim: one pass, accurate, no temporary the size of `x`."
    # A row's vector norm is a short vectorised float32 sum (unlike one norm of the whole tensor,
    # which drifts by ~1e-3 on 30M elements); beyond ROW_MAX elements a cascade sum keeps it exact.
    if x.shape[-1] <= ROW_MAX: return torch.linalg.vector_norm(x, dim=-1, out=out).square_()
    return torch.sum(x.square(), dim=-1, out=out)


def _scaled_diff(w: Tensor, a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    "`out = 2*w*(a-b)` in a single kernel: aten's `mse_loss_backward` (reduction none) is exactly that."
    # (its functional form zero-fills a fresh output first; the `out=` form writes once)
    return torch.ops.aten.mse_loss_backward.grad_input(w, a, b, 0, grad_input=out)


def _write(out: Tensor, fn, *args, scratch: _Scratch, zero: Tensor | None = None):
    """`fn(*args, out=out)`, zeroed where `zero` is True, through a float32 buffer when `out` is half or float8 (a
    mixed-dtype `out=` makes a temporary, and float8 has no arithmetic kernels)"""
    res = fn(*args, out=out if out.dtype == scratch.dtype else scratch('out', out.shape))
    if zero is not None: res.masked_fill_(zero, 0)  # a fill, not a product: padding may hold inf
    return res if res is out else out.copy_(res)


def _blocked_sum(h: Tensor, weights: Tensor | None, seq_dim: int, n: int, block_rows) -> Tensor:
    "Sum over blocks of steps `a..a+k-1` (of `n`) of `block_rows(scratch, h_piece, a, k)`, rows weighted by a mask."
    steps, pieces, numel = _plan(h, seq_dim)
    acc, parts = _acc_dtype(h), []
    scratch = _Scratch(numel, acc, h.device)
    for p in pieces:
        hp, wp = _cut(h, p), _cut(weights, p)
        for a, k in _spans(0, n, steps):
            rows = block_rows(scratch, hp, a, k)
            # fill, not multiply: padding may hold inf or NaN (fp16 overflow), and 0*inf is NaN
            if wp is not None: rows.masked_fill_(~wp.narrow(seq_dim, a, k), 0)
            parts.append(rows.sum())
    return _total(parts, h, acc)


# --- the autograd functions ---------------------------------------------------------------------------
def _fill(x: Tensor, m: Tensor | None) -> Tensor:
    "`x` with zeros where the (time-step) mask `m` is False: a fill, not a product, as padding may hold inf or NaN"
    return x if m is None else x.masked_fill(~m.unsqueeze(-1), 0)


class _PenaltySum(torch.autograd.Function):
    """Base of the two sums: `forward` is blocked and lean, and saves nothing but `h` and `mask`. First-order
    backward is blocked as well; when autograd records a graph of the backward (`create_graph=True`, a gradient
    penalty, a Hessian-vector product) the gradient is instead that of `plain`, the same sum in differentiable
    torch ops, so that it is correct to any order. `jvp` gives forward-mode AD."""
    @staticmethod
    def setup_context(ctx, inputs, output):
        h, mask, seq_dim, mean = inputs
        ctx.save_for_backward(h, mask)
        ctx.save_for_forward(h, mask)
        ctx.seq_dim, ctx.mean = seq_dim, mean

    @classmethod
    def scale(cls, g: Tensor, h: Tensor, mask, seq_dim: int, mean: bool) -> Tensor:
        "The incoming gradient (or tangent) of the sum: `g`, divided by the count for a mean"
        return mean_of(g, cls.count(h, mask, seq_dim)) if mean else g

    @classmethod
    def backward(cls, ctx, g):
        h, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # the engine enables grad mode in backward exactly when create_graph=True
            with torch.enable_grad():
                total = cls.plain(h, mask, ctx.seq_dim)
            grad, = torch.autograd.grad(total, h, cls.scale(g, h, mask, ctx.seq_dim, ctx.mean), create_graph=True)
        else: grad = cls.blocked_grad(h, mask, ctx.seq_dim, cls.scale(g, h, mask, ctx.seq_dim, ctx.mean))
        return grad, None, None, None

    @classmethod
    def jvp(cls, ctx, h_t, *_):
        h, mask = ctx.saved_tensors
        return cls.scale(cls.tangent(h, h_t, mask, ctx.seq_dim), h, mask, ctx.seq_dim, ctx.mean)


class _SquareSum(_PenaltySum):
    "sum(h**2 * mask), or its mean over valid elements"
    count = staticmethod(_ar_count)

    @staticmethod
    def plain(h, mask, seq_dim):
        return _fill(h.to(_acc_dtype(h)), mask).square().sum()

    @staticmethod
    def tangent(h, h_t, mask, seq_dim):
        acc = _acc_dtype(h)
        return 2 * _fill(h.to(acc) * h_t.to(acc), mask).sum()

    @staticmethod
    def forward(h, mask, seq_dim, mean):
        def block_rows(scratch, hp, a, k):
            x = scratch.acc(hp.narrow(seq_dim, a, k))
            return _row_squares(x, scratch('rows', x.shape[:-1]))
        total = _blocked_sum(h, mask, seq_dim, h.shape[seq_dim], block_rows)
        return mean_of(total, _ar_count(h, mask, seq_dim)) if mean else total

    @staticmethod
    def blocked_grad(h, mask, sd, w):
        w = 2 * w
        # (a 0-dim float32 scale keeps a half `h` half; float8 has no multiplication kernel and takes the blocks)
        if mask is None and h.dtype in _ARITH: return h * w
        steps, pieces, numel = _plan(h, sd)
        grad, scratch = torch.empty_like(h), _Scratch(numel, _acc_dtype(h), h.device)
        for p in pieces:
            hp, mp, gp = _cut(h, p), _cut(mask, p), _cut(grad, p)
            for a, k in _spans(0, h.shape[sd], steps):
                _write(gp.narrow(sd, a, k), torch.mul, scratch.acc(hp.narrow(sd, a, k)), w, scratch=scratch,
                       zero=None if mp is None else ~_rows(mp, sd, a, k))
        return grad


class _SquaredDiffSum(_PenaltySum):
    "sum over t of (h[t+1]-h[t])**2 * pair_mask[t] along `seq_dim`, or its mean"
    count = staticmethod(_tar_count)

    @staticmethod
    def plain(h, mask, seq_dim):
        pairs = _valid_pairs(h, mask, seq_dim)
        return _fill(torch.diff(h.to(_acc_dtype(h)), dim=seq_dim), pairs).square().sum()

    @staticmethod
    def tangent(h, h_t, mask, seq_dim):
        acc = _acc_dtype(h)
        pairs = _valid_pairs(h, mask, seq_dim)
        d, d_t = torch.diff(h.to(acc), dim=seq_dim), torch.diff(h_t.to(acc), dim=seq_dim)
        return 2 * _fill(d * d_t, pairs).sum()

    @staticmethod
    def forward(h, mask, seq_dim, mean):
        pairs = _valid_pairs(h, mask, seq_dim)

        def block_rows(scratch, hp, a, k):
            # differences are taken in float32 (or float64): in half precision they would round (fp16: overflow)
            x = scratch.acc(hp.narrow(seq_dim, a, k + 1))
            d = torch.sub(x.narrow(seq_dim, 1, k), x.narrow(seq_dim, 0, k), out=scratch('d', _steps(x, seq_dim, k)))
            return _row_squares(d, scratch('rows', d.shape[:-1]))
        total = _blocked_sum(h, pairs, seq_dim, h.shape[seq_dim] - 1, block_rows)
        return mean_of(total, _tar_count(h, mask, seq_dim)) if mean else total

    @staticmethod
    def blocked_grad(h, mask, sd, w):
        # d/dh[t] of sum_t d_t**2, d_t = h[t+1]-h[t], is 2*(d_{t-1} - d_t) with d_{-1} = d_{T-1} = 0: the first
        # and last steps see one difference, the others two. Each block makes u = 2*w*d once for its steps.
        T = h.shape[sd]
        if T < 2: return torch.zeros_like(h)
        pairs = _valid_pairs(h, mask, sd)
        steps, pieces, numel = _plan(h, sd)
        grad, scratch = torch.empty_like(h), _Scratch(numel, _acc_dtype(h), h.device)
        for p in pieces:
            hp, pp, gp = _cut(h, p), _cut(pairs, p), _cut(grad, p)
            for a, k in _spans(0, T, steps):
                lo, hi = max(a - 1, 0), min(a + k, T - 1)  # steps a..a+k-1 need the differences lo..hi-1
                n = hi - lo
                x = scratch.acc(hp.narrow(sd, lo, n + 1))
                u = _scaled_diff(w, x.narrow(sd, 1, n), x.narrow(sd, 0, n), out=scratch('u', _steps(x, sd, n)))
                if pp is not None: u.masked_fill_(~_rows(pp, sd, lo, n), 0)  # a fill: padding may hold inf
                first = max(a, 1)  # steps first..hi-1 see two differences: grad[t] = u[t-1] - u[t]
                if hi > first:
                    m = hi - first
                    _write(gp.narrow(sd, first, m), torch.sub, u.narrow(sd, first - 1 - lo, m),
                           u.narrow(sd, first - lo, m), scratch=scratch)
                if a == 0: gp.narrow(sd, 0, 1).copy_(u.narrow(sd, 0, 1).neg())  # one step: a small temporary
                if a + k == T: gp.narrow(sd, T - 1, 1).copy_(u.narrow(sd, T - 2 - lo, 1))
        return grad


# --- public API -------------------------------------------------------------------------------------
def _apply(fn, h: Tensor, mask, seq_dim: int, mean: bool) -> Tensor:
    "`fn` on `h`: the lean blocked function eagerly, its plain expression where a compiler or torch.func transforms"
    # Inside `torch.compile` the plain expression is traced, so that the compiler fuses it into the user's graph
    # (the blocked code's `out=` writes into scratch buffers would break the graph). Under `torch.func` (grad, vmap,
    # jacrev, jvp) it is composed of ops that every transform knows. The test is cheap, and `is_compiling()` comes
    # first so that the compiler reads a constant and never sees the functorch query.
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        total = fn.plain(h, mask, seq_dim)
        return mean_of(total, fn.count(h, mask, seq_dim)) if mean else total
    return fn.apply(h, mask, seq_dim, mean)


@add_arg_docs
def ar_sum_count(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> tuple[Tensor, Tensor | int]:
    "Sum of `h**2` over valid positions and the number of summed elements."
    seq_dim = _check(h, mask, seq_dim)
    return _apply(_SquareSum, h, mask, seq_dim, False), _ar_count(h, mask)


@add_arg_docs
def tar_sum_count(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> tuple[Tensor, Tensor | int]:
    "Sum of `(h[t+1]-h[t])**2` over valid pairs along `seq_dim` and the number of summed elements."
    seq_dim = _check(h, mask, seq_dim)
    return _apply(_SquaredDiffSum, h, mask, seq_dim, False), _tar_count(h, mask, seq_dim)


@add_arg_docs
def mean_of(total: Tensor, count: Tensor | int) -> Tensor:
    "`total / count`, and exactly 0 (not NaN) where nothing was counted: then `total` is 0 as well."
    if isinstance(count, Tensor): return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)


@add_arg_docs
def ar_penalty(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> Tensor:
    "Activation Regularization: the mean of `h**2` over valid positions (float32 for half and float8 input)."
    # The mean is taken inside the autograd function, which recounts the mask in backward: nothing
    # but `h` and `mask` is kept for backward.
    return _apply(_SquareSum, h, mask, _check(h, mask, seq_dim), True)


@add_arg_docs
def tar_penalty(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> Tensor:
    "Temporal Activation Regularization: the mean of `(h[t+1]-h[t])**2` over valid pairs along `seq_dim`."
    return _apply(_SquaredDiffSum, h, mask, _check(h, mask, seq_dim), True)
