"""AR and TAR as pure functions of an activation tensor: torch only, no fastai.

`ar_penalty(h)` is `h.pow(2).mean()` and `tar_penalty(h)` is `(h[:,1:]-h[:,:-1]).pow(2).mean()`
(Merity et al., AWD-LSTM), with a padding mask, any time and feature axes, float32 accumulation for half
inputs and exact zeros where nothing is valid. Each is a sum over valid elements divided by
their count; the `*_sum_count` forms return both so that callers can pool several calls, steps
or ranks into one mean, and `ar_tar_sum_count` takes both terms of a layer at once (AR of the dropped output,
TAR of the raw one, or both of the same tensor) in a single autograd node.
That node keeps nothing for backward but its inputs. It works in blocks of at most about `CHUNK_NUMEL` elements,
with two ATen ops per block and term each way, in scratch buffers that each thread makes once and reuses (a fresh
buffer per call would page-fault on every call), and it writes one gradient per tensor: AR and TAR of the same
tensor share it.
Gradients are correct to any order (a backward that builds a graph uses differentiable ops), forward-mode
AD has a `jvp`, and under `torch.func` transforms or inside `torch.compile` the penalties are the plain
expression, with the same mask and accumulation semantics, so that transforms and compilers see ops they know.
Dtypes: float64 (accumulated in float64), float32, float16, bfloat16 and the float8 formats with a zero
and a sign (accumulated in float32, the gradient rounded once to `h`'s dtype); others raise a TypeError.
"""
import functools
import math
import numbers
import operator
import threading

import torch
from torch import Tensor

from .arg_docs import add_arg_docs

__all__ = ['ar_penalty', 'tar_penalty', 'ar_sum_count', 'tar_sum_count', 'ar_tar_sum_count', 'mean_of']

# Elements per block. Eager PyTorch pays a few microseconds per op, so blocks must be large for that to stay small
# against the memory traffic, but a block's temporaries should stay in the core's cache: against compiled code,
# 2**17 (0.5 MB of float32) was best or within 5% of the best from 64x70x400 to 16x512x1024 (2**20: 10-30% slower).
CHUNK_NUMEL = 1 << 17
# On a GPU one kernel per op over the whole tensor: there, thousands of small launches cost far more than the memory
# traffic, and the caching allocator makes a fresh temporary free (measured on an H200: blocks of 2**17 made AR+TAR
# 5-60x slower than fastai's two expressions).
GPU_CHUNK_NUMEL = 1 << 62
# Longest row whose float32 vector norm stays within ~1e-7 of the exact sum of squares.
ROW_MAX = 1 << 16
# Up to this many elements a tensor's penalty costs its ops' fixed costs more than its memory traffic: a float32/64
# tensor without a mask takes autograd's own nodes (AR `h.square().sum()`, TAR the `mse_loss` sum of two views of `h`),
# which run their backward without Python and keep only `h` (measured on the CPU: 118 us against the node's 169 us
# forward and backward at 4x8x8; even at 2**16, and the node ahead from 2**17 on).
SMALL_NUMEL = 1 << 16


# The floating dtypes with arithmetic kernels; float8 formats with a zero and a sign only convert, so their sums
# and gradients are computed in float32 and rounded once. (float8_e8m0fnu, a scale format, has neither zero nor
# sign, and packed float4 no conversion kernel: no gradient could be stored in them.)
_ARITH = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FLOAT8 = ('float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2', 'float8_e5m2fnuz')
SUPPORTED_DTYPES = _ARITH + tuple(getattr(torch, d) for d in _FLOAT8 if hasattr(torch, d))


def _acc_dtype(h: Tensor) -> torch.dtype:
    "float64 stays float64; float32, half and float8 inputs accumulate in float32."
    return torch.float64 if h.dtype == torch.float64 else torch.float32


# --- arguments ---------------------------------------------------------------------------------------
def _axis(value, name: str) -> int:
    "An integer-like axis (int, numpy integer, 0-d integer tensor), not yet checked against a shape"
    if type(value) is int: return value  # the common case, first: this runs at every call
    # bools are integers to Python (`operator.index(True)` is 1), but an axis given as one is a mistake (numpy's
    # bool has no `__index__`)
    if isinstance(value, bool) or isinstance(value, Tensor) and value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    if isinstance(value, numbers.Integral): return int(value)  # (what dynamo traces for a numpy integer)
    try: return operator.index(value)
    except TypeError: raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def _check(h, mask, seq_dim, feature_dim, tar: bool, names=('h', 'mask')) -> tuple[int, int]:
    """Validate one term's arguments; return `(seq_dim, feature_dim)` as non-negative indices of `h`'s dims, where
    `seq_dim` is only checked against the shape for TAR (AR has no time axis, and returns None for it)"""
    h_name, mask_name = names
    if not isinstance(h, Tensor): raise TypeError(f"{h_name} must be a torch.Tensor, got {type(h).__name__}")
    if h.dtype not in SUPPORTED_DTYPES:
        dtypes = ', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)
        raise TypeError(f"{h_name} must be a floating point tensor of dtype {dtypes}; got {h.dtype}: pass "
                        f"{h_name}.float()")
    # (plain ints, the common case, without a call: this runs at every batch)
    sd = seq_dim if type(seq_dim) is int else _axis(seq_dim, 'seq_dim')
    fd, n = feature_dim if type(feature_dim) is int else _axis(feature_dim, 'feature_dim'), h.dim()
    if n < (2 if tar else 1):
        raise ValueError(f"TAR's {h_name} must have a time and a feature dimension, got shape {tuple(h.shape)}" if tar
                         else f"AR's {h_name} must have a feature dimension, got a 0-d tensor")
    if not -n <= fd < n:
        raise ValueError(f"feature_dim={fd} is not a dimension of {h_name}, of shape {tuple(h.shape)}")
    fd %= n
    if tar:
        if not -n <= sd < n:
            raise ValueError(f"seq_dim={sd} is not a dimension of {h_name}, of shape {tuple(h.shape)}: use 1 for "
                             "batch-first, 0 for sequence-first")
        if sd % n == fd:
            raise ValueError(f"seq_dim={seq_dim} and feature_dim={feature_dim} both name dimension {fd} of {h_name} "
                             f"(shape {tuple(h.shape)}): TAR needs a time axis other than the feature axis")
        sd %= n
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{mask_name} must be a bool tensor (True where the position is real data), "
                            f"got {getattr(mask, 'dtype', type(mask).__name__)}: pass {mask_name}.bool()")
        want = h.shape[:fd] + h.shape[fd + 1:]
        if mask.shape != want:
            raise ValueError(f"{mask_name} must have the shape of {h_name} without its feature dimension "
                             f"(feature_dim={feature_dim}), {tuple(want)}, got {tuple(mask.shape)}")
        if mask.device != h.device: raise ValueError(f"{mask_name} is on {mask.device} but {h_name} is on {h.device}")
    return (sd if tar else None), fd


def _mask_axis(seq_dim: int, feature_dim: int) -> int:
    "The index of the time axis in a mask, which lacks the feature dim"
    return seq_dim - (seq_dim > feature_dim)


def _pairs(mask: Tensor, axis: int) -> Tensor:
    "A pair (t, t+1) counts only when both of its positions are real data."
    n = mask.shape[axis] - 1
    return mask.narrow(axis, 0, n) & mask.narrow(axis, 1, n)


def _ar_count(h, mask, fd):
    return h.numel() if mask is None else mask.sum() * h.shape[fd]


def _tar_count(h, mask, sd, fd):
    n_pairs = h.shape[sd] - 1
    if n_pairs <= 0: return 0
    if mask is None: return h.numel() // h.shape[sd] * n_pairs
    return _pairs(mask, _mask_axis(sd, fd)).sum() * h.shape[fd]


# --- plain expressions: for torch.func, torch.compile and derivatives of any order ----------------------------
def _fill(x: Tensor, void: Tensor | None, fd: int) -> Tensor:
    "`x` with zeros where `void` (a mask without the feature dim) is True: a fill, as padding may hold inf or NaN"
    return x if void is None else x.masked_fill(void.unsqueeze(fd), 0)


def _plain_ar(h, mask, fd):
    return _fill(h.to(_acc_dtype(h)), None if mask is None else ~mask, fd).square().sum()


def _pair_void(mask, sd, fd):
    "True where a pair along `sd` has a padded end; None without a mask or a pair"
    return None if mask is None or mask.shape[_mask_axis(sd, fd)] < 2 else ~_pairs(mask, _mask_axis(sd, fd))


_SMALL_DTYPES = (torch.float32, torch.float64)  # no conversion to accumulate in: autograd's own nodes keep only views


def _plain_tar(h, mask, sd, fd):
    if mask is None and h.dtype in _SMALL_DTYPES:  # the sum of squared differences of two views: nothing else is kept
        n = max(h.shape[sd] - 1, 0)  # (no pair: empty views, whose sum is a 0 with a gradient)
        return _mse_sum(h.narrow(sd, h.shape[sd] - n, n), h.narrow(sd, 0, n))
    void = _pair_void(mask, sd, fd)  # (a sequence of one step: no pair, and `diff` is empty)
    return _fill(torch.diff(h.to(_acc_dtype(h)), dim=sd), void, fd).square().sum()


def _mse_sum(a: Tensor, b: Tensor) -> Tensor:
    "The sum of `(a - b)**2`: aten's `mse_loss` (reduction 2, sum), without the Python of `F.mse_loss`"
    return torch.ops.aten.mse_loss(a, b, 2)


def _tangent_ar(h, h_t, mask, fd):
    acc = _acc_dtype(h)
    return 2 * _fill(h.to(acc) * h_t.to(acc), None if mask is None else ~mask, fd).sum()


def _tangent_tar(h, h_t, mask, sd, fd):
    acc = _acc_dtype(h)
    void = _pair_void(mask, sd, fd)
    return 2 * _fill(torch.diff(h.to(acc), dim=sd) * torch.diff(h_t.to(acc), dim=sd), void, fd).sum()


# --- the blocked computation, on a canonical (sequences, time, features) view ---------------------------------
def _canonical(h: Tensor, sd: int | None, fd: int) -> Tensor:
    """`h` as (L, T, F): features last, time before them and every other dim flattened in front (AR, which has no
    time axis, takes any two dims before the features: T = 1 where `h` is not 3-D). A view, except for the rare
    layouts whose leading dims cannot be merged (then a copy)."""
    x = h.movedim(fd, -1) if fd != h.dim() - 1 else h
    if sd is None: return x if x.dim() == 3 else x.reshape(math.prod(x.shape[:-1]), 1, x.shape[-1])
    ms = _mask_axis(sd, fd)
    if ms != x.dim() - 2: x = x.movedim(ms, -2)
    return x if x.dim() == 3 else x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:])


def _canonical_mask(mask: Tensor | None, sd: int | None, fd: int) -> Tensor | None:
    "The mask of `_canonical(h, sd, fd)`: (L, T)"
    if mask is None: return None
    if sd is None: return mask if mask.dim() == 2 else mask.reshape(-1, 1)
    ms = _mask_axis(sd, fd)
    m = mask.movedim(ms, -1) if ms != mask.dim() - 1 else mask
    return m.reshape(math.prod(m.shape[:-1]), m.shape[-1])


def _uncanonical(g: Tensor, h: Tensor, sd: int | None, fd: int) -> Tensor:
    "The (L, T, F) gradient `g` as a tensor shaped like `h` (a view)"
    if h.dim() == 3 and fd == 2 and sd in (None, 1): return g  # `h` was (L, T, F) already
    shape = h.shape[:fd] + h.shape[fd + 1:] + (h.shape[fd],)  # `h` with its features moved last
    if sd is None: return g.view(shape).movedim(-1, fd)
    ms = _mask_axis(sd, fd)
    moved = shape[:ms] + shape[ms + 1:-1] + (shape[ms], shape[-1])  # and then its time axis before them
    return g.view(moved).movedim(-2, ms).movedim(-1, fd)


def _blocks(L: int, T: int, F: int, device: torch.device) -> tuple:
    """`(l0, nl, t0, k)` blocks of sequences `l0..l0+nl-1`, steps `t0..t0+k-1`: whole sequences where one fits. A block
    has at most `CHUNK_NUMEL` steps (rows), as many elements unless one step is larger; on a GPU, all of it."""
    return _block_list(L, T, max(F, 1), CHUNK_NUMEL if device.type == 'cpu' else GPU_CHUNK_NUMEL)


@functools.lru_cache(maxsize=256)  # a training loop asks for the same few shapes at every call
def _block_list(L: int, T: int, F: int, chunk: int) -> tuple:
    if T * F <= chunk:
        n = max(1, chunk // max(T * F, 1))
        n = -(-L // -(-L // n)) if L else n  # blocks of equal size: one shape of scratch views for all of them
        return tuple((l, min(n, L - l), 0, T) for l in range(0, L, n))
    k = max(1, chunk // F)  # a block is at least one step
    return tuple((l, 1, t, min(k, T - t)) for l in range(L) for t in range(0, T, k))


_local = threading.local()


def _scratch(name: str, shape, dtype, device, init=None) -> Tensor:
    """A contiguous `shape` view of this thread's buffer `name`, made once and only ever grown: its pages are faulted
    once, not at every call. The last view of each is kept, so that a training loop's next call finds it made;
    where `init` is given, it is called on a view when it is made, and what it returns is kept and returned instead.
    Per thread, so that replicas in threads (`nn.DataParallel`) never share one. On a GPU, whose blocks are whole
    tensors, a fresh tensor each time: the caching allocator reuses its memory, and none is held between calls."""
    if device.type != 'cpu':
        view = torch.empty(shape, dtype=dtype, device=device)
        return view if init is None else init(view)
    views = getattr(_local, 'views', None)  # key -> (shape, view)
    if views is None:
        views = _local.views = {}
        _local.bufs = {}
    key, shape = (name, dtype, device), tuple(shape)
    made = views.get(key)
    if made is not None and made[0] == shape: return made[1]
    n, buf = math.prod(shape), _local.bufs.get(key)
    if buf is None or buf.numel() < n: buf = _local.bufs[key] = torch.empty(n, dtype=dtype, device=device)
    view = buf[:n].view(shape)
    view = view if init is None else init(view)
    views[key] = (shape, view)
    return view


def _block(x: Tensor | None, l0: int, nl: int, t0: int, k: int) -> Tensor | None:
    "Sequences `l0..l0+nl-1`, steps `t0..t0+k-1` of a canonical tensor or mask (itself when that is all of it)"
    if x is None or l0 == 0 and t0 == 0 and nl == x.shape[0] and k == x.shape[1]: return x
    return x[l0:l0 + nl, t0:t0 + k]


def _in_acc(x: Tensor, acc) -> Tensor:
    "`x` in the accumulation dtype: itself, or (half, float8) converted into scratch"
    return x if x.dtype == acc else _scratch('x', x.shape, acc, x.device).copy_(x)


def _row_norms(x: Tensor, out: Tensor) -> None:
    "`out` = the 2-norm of each row (the last dim) of `x`"
    # A row's vector norm is a short vectorised sum (one norm of a whole tensor drifts by ~1e-3 on 30M float32
    # elements); beyond ROW_MAX elements a cascade sum keeps it exact.
    if x.shape[-1] <= ROW_MAX: torch.linalg.vector_norm(x, dim=-1, out=out)
    else: torch.sum(x.square(), dim=-1, out=out).sqrt_()


def _rows_total(rows: Tensor, void: Tensor | None) -> Tensor:
    "The sum of the squares of the row norms `rows` that `void` does not mark, as a 0-d tensor"
    rows.square_()
    if void is not None: rows.masked_fill_(void, 0)  # a fill, not a product: padding may hold inf or NaN
    return rows.sum()  # by cascade summation


def _sums(x: Tensor, ar_void, tar_void, ar: bool, tar: bool) -> tuple:
    "(AR sum, TAR sum) of the canonical `x`; None for a term not asked for. Voids: True where a row is left out."
    L, T, F = x.shape
    acc = _acc_dtype(x)
    # the row norms of each term go into one buffer, block by block, and are squared and added once at the end
    ar_rows = _scratch('ar', (L, T), acc, x.device) if ar else None
    tar_rows = _scratch('tar', (L, max(T - 1, 0)), acc, x.device) if tar else None
    tar_on = tar and T > 1
    # AR alone needs no scratch in the accumulation dtype, and so no blocks: one pass over the whole tensor
    blocks = _blocks(L, T, F, x.device) if tar_on or x.dtype != acc else ((0, L, 0, T),)
    for l0, nl, t0, k in blocks:
        n = min(k + 1, T - t0) if tar_on else k  # TAR's last pair of the block reads the next block's first step
        xb = _in_acc(_block(x, l0, nl, t0, n), acc)  # AR and TAR of the same tensor share one conversion
        if ar: _row_norms(xb if n == k else xb[:, :k], _block(ar_rows, l0, nl, t0, k))
        if tar_on and n > 1:
            d = torch.sub(xb[:, 1:], xb[:, :-1], out=_scratch('d', (nl, n - 1, F), acc, x.device))
            _row_norms(d, _block(tar_rows, l0, nl, t0, n - 1))
    return (_rows_total(ar_rows, ar_void) if ar else None), (_rows_total(tar_rows, tar_void) if tar else None)


# u_t = 2*g*(x[t+1]-x[t]) in one op (reduction none), written into scratch; looked up once, not at every block
_mse_loss_backward = torch.ops.aten.mse_loss_backward.grad_input


def _u_views(U: Tensor) -> tuple:
    """Zero the first step of each sequence of U (nl+1, T, F), and return its views that TAR's backward reads: where
    the u of the nl sequences go, then U flat from its start and from one step on, each the gradient's size"""
    U[:, 0].zero_()
    flat, n = U.view(-1), (U.shape[0] - 1) * U.shape[1] * U.shape[2]
    return U[:-1, 1:], flat[:n].view(U[:-1].shape), flat[U.shape[2]:n + U.shape[2]].view(U[:-1].shape)


def _tar_grad_block(x: Tensor, tar_void, g: Tensor, l0: int, nl: int, t0: int, k: int, out: Tensor):
    "`out` = the TAR gradient of the block's steps; returns those steps of `x` in the accumulation dtype"
    # d/dh[t] of sum_t g*d_t**2, d_t = h[t+1]-h[t], is u_{t-1} - u_t, with u_t = 2*g*d_t (aten's `mse_loss_backward`,
    # reduction none) and u_{-1} = u_{T-1} = 0. So u goes into a flat buffer U, one step behind, with zeros where no
    # pair is, and one subtraction of U and U one step on writes the block: two full passes.
    L, T, F = x.shape
    acc = out.dtype
    if k == T:  # whole sequences: U is (nl+1, T, F), the u of sequence l at [l, 1:], zeros at [:, 0], which the
        # next sequence's first step reads as its u_{-1} and this one's last as its u_{T-1}; as no other write
        # touches them, they are zeroed only where the view is made, not at every call of a training loop
        part, before, after = _scratch('u', (nl + 1, T, F), acc, x.device, init=_u_views)
        xs, lo = _in_acc(_block(x, l0, nl, 0, T), acc), 0
        pairs_void = _block(tar_void, l0, nl, 0, T - 1)
    else:  # a run of steps of one sequence: U is the u of the pairs t0-1 .. t0+k-1, zeros where none is
        lo, hi = max(t0 - 1, 0), min(t0 + k, T - 1)  # the pairs lo..hi-1 that exist
        U = _scratch('u_steps', (1, k + 1, F), acc, x.device)
        if t0 == 0: U[:, 0].zero_()
        if t0 + k == T: U[:, k].zero_()
        xs, part = _in_acc(x[l0:l0 + 1, lo:hi + 1], acc), U[:, lo - t0 + 1:hi - t0 + 1]
        before, after = U[:, :k], U[:, 1:]
        pairs_void = _block(tar_void, l0, 1, lo, hi - lo)
    _mse_loss_backward(g, xs[:, 1:], xs[:, :-1], 0, grad_input=part)
    if pairs_void is not None: part.masked_fill_(pairs_void[..., None], 0)  # a fill: padding may hold inf
    torch.sub(before, after, out=out)
    return xs if k == T else xs[:, t0 - lo:t0 - lo + k]


def _grad(x: Tensor, ar_void, tar_void, g_ar: Tensor | None, g_tar: Tensor | None) -> Tensor:
    """The gradient of `g_ar * AR sum + g_tar * TAR sum` (either may be None) of the canonical `x`, as a new
    contiguous (L, T, F) tensor of `x`'s dtype, written once, block by block"""
    L, T, F = x.shape
    acc = _acc_dtype(x)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    wa = None if g_ar is None else 2 * g_ar  # d/dh of g*h**2
    tar_on = g_tar is not None and T > 1
    for l0, nl, t0, k in _blocks(L, T, F, x.device):
        gb = _block(grad, l0, nl, t0, k)
        out = gb if x.dtype == acc else _scratch('g', gb.shape, acc, x.device)
        if tar_on:
            xa = _tar_grad_block(x, tar_void, g_tar, l0, nl, t0, k, out)
            if wa is not None:  # AR of the same tensor adds its term to the same gradient
                if ar_void is None: out.addcmul_(xa, wa)
                else:
                    a = torch.mul(xa, wa, out=_scratch('a', out.shape, acc, x.device))
                    out.add_(a.masked_fill_(_block(ar_void, l0, nl, t0, k)[..., None], 0))
        elif wa is not None:
            torch.mul(_in_acc(_block(x, l0, nl, t0, k), acc), wa, out=out)
            if ar_void is not None: out.masked_fill_(_block(ar_void, l0, nl, t0, k)[..., None], 0)
        else: out.zero_()  # TAR of a single step
        if out is not gb: gb.copy_(out)  # half and float8: rounded once
    return grad


def _ar_grad(h: Tensor, mask, fd: int, g: Tensor) -> Tensor:
    "AR's gradient alone"
    # Unmasked float32/float64, it is one product over the whole tensor, in `h`'s layout. Half and float8 take the
    # blocks, which multiply in float32 and round once: on a GPU a half product would round the scale to half first
    # (a mean's 1/count then falls among half's subnormals), and float8 has no multiplication kernel.
    if mask is None and h.dtype == _acc_dtype(h): return h * (2 * g)
    return _uncanonical(_grad(_canonical(h, None, fd), _void(mask, None, fd), None, g, None), h, None, fd)


def _void(mask, sd, fd, pairs=False):
    "Where the canonical rows are left out: padding (AR), or pairs with a padded end (TAR)"
    m = _canonical_mask(mask, sd, fd)
    if m is None or pairs and m.shape[1] < 2: return None
    return ~_pairs(m, 1) if pairs else ~m


# --- the autograd function ------------------------------------------------------------------------------
class _ArTarSums(torch.autograd.Function):
    """(AR sum, TAR sum) in one graph node. `forward` is blocked and lean, and saves nothing but its inputs.
    First-order backward is blocked as well, and writes one gradient where AR and TAR read the same tensor. When
    autograd records a graph of the backward (`create_graph=True`: a gradient penalty, a Hessian-vector product)
    the gradient is instead that of the plain expressions, so that it is correct to any order; `jvp` gives
    forward-mode AD. A term whose tensor is None has a sum of 0. Axes: TAR's `sd`, each term's feature dim."""
    # (`forward(ctx, ...)` rather than `setup_context`: `apply` then binds no signature, which cost ~20 us a call.
    # torch.func never sees this function: under its transforms the penalties are the plain expressions.)
    @staticmethod
    def forward(ctx, ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, mean):
        ctx.save_for_backward(ar_h, tar_h, ar_mask, tar_mask)
        ctx.save_for_forward(ar_h, tar_h, ar_mask, tar_mask)
        ctx.same, ctx.axes = ar_h is tar_h, (sd, ar_fd, tar_fd, mean)
        ctx.set_materialize_grads(False)  # an unused term's gradient stays None: nothing to compute for it
        if ctx.same:
            x = _canonical(tar_h, sd, tar_fd)
            ar, tar = _sums(x, _void(ar_mask, sd, ar_fd), _void(tar_mask, sd, tar_fd, True), True, True)
        else:
            ar = None if ar_h is None else \
                _sums(_canonical(ar_h, None, ar_fd), _void(ar_mask, None, ar_fd), None, True, False)[0]
            tar = None if tar_h is None else \
                _sums(_canonical(tar_h, sd, tar_fd), None, _void(tar_mask, sd, tar_fd, True), False, True)[1]
        if ar is None or tar is None: zero = torch.zeros((), device=(tar_h if ar_h is None else ar_h).device)
        return _means(zero if ar is None else ar, zero if tar is None else tar, ar_h, tar_h, ar_mask, tar_mask,
                      ctx.axes)

    @staticmethod
    def backward(ctx, g_ar, g_tar):
        ar_h, tar_h, ar_mask, tar_mask = ctx.saved_tensors
        sd, ar_fd, tar_fd, _ = ctx.axes
        if ar_h is None: g_ar = None
        if tar_h is None: g_tar = None
        g_ar, g_tar = _means(g_ar, g_tar, ar_h, tar_h, ar_mask, tar_mask, ctx.axes)  # the count is recounted
        if torch.is_grad_enabled():  # the engine enables grad mode in backward exactly when create_graph=True
            return _plain_backward(ctx, ar_h, tar_h, ar_mask, tar_mask, g_ar, g_tar)
        nothing = (None,) * 6
        if ctx.same:
            if g_ar is None and g_tar is None: return None, None, *nothing
            x = _canonical(tar_h, sd, tar_fd)
            grad = _grad(x, _void(ar_mask, sd, ar_fd), _void(tar_mask, sd, tar_fd, True), g_ar, g_tar)
            return _uncanonical(grad, tar_h, sd, tar_fd), None, *nothing  # one gradient for both terms
        ar_grad = None if g_ar is None or not ctx.needs_input_grad[0] else _ar_grad(ar_h, ar_mask, ar_fd, g_ar)
        tar_grad = None
        if g_tar is not None and ctx.needs_input_grad[1]:
            grad = _grad(_canonical(tar_h, sd, tar_fd), None, _void(tar_mask, sd, tar_fd, True), None, g_tar)
            tar_grad = _uncanonical(grad, tar_h, sd, tar_fd)
        return ar_grad, tar_grad, *nothing

    @staticmethod
    def jvp(ctx, ar_t, tar_t, *_):
        ar_h, tar_h, ar_mask, tar_mask = ctx.saved_tensors
        sd, ar_fd, tar_fd, _ = ctx.axes
        if ctx.same: tar_t = ar_t  # the one tensor's tangent arrives once
        zero = torch.zeros((), device=(tar_h if ar_h is None else ar_h).device)
        ar = zero if ar_h is None or ar_t is None else _tangent_ar(ar_h, ar_t, ar_mask, ar_fd)
        tar = zero if tar_h is None or tar_t is None else _tangent_tar(tar_h, tar_t, tar_mask, sd, tar_fd)
        return _means(ar, tar, ar_h, tar_h, ar_mask, tar_mask, ctx.axes)


def _plain_backward(ctx, ar_h, tar_h, ar_mask, tar_mask, g_ar, g_tar):
    "The gradients as a graph of differentiable ops: those of the plain expressions"
    sd, ar_fd, tar_fd, _ = ctx.axes

    def term_grad(plain, h, g):
        # each term by itself: one of two tensors may be made from the other (dropped from raw), and a gradient of
        # both terms at once would follow that path too
        with torch.enable_grad(): total = plain()
        return torch.autograd.grad(total, h, g, create_graph=True)[0]
    ar_grad = None if g_ar is None else term_grad(lambda: _plain_ar(ar_h, ar_mask, ar_fd), ar_h, g_ar)
    tar_grad = None if g_tar is None else term_grad(lambda: _plain_tar(tar_h, tar_mask, sd, tar_fd), tar_h, g_tar)
    if ctx.same: return (tar_grad if ar_grad is None else ar_grad if tar_grad is None else ar_grad + tar_grad), \
        None, None, None, None, None, None, None
    return ar_grad, tar_grad, None, None, None, None, None, None


def _means(ar, tar, ar_h, tar_h, ar_mask, tar_mask, axes):
    "`ar` and `tar` (sums, their gradients or tangents) divided by their counts when `axes` asks for means"
    sd, ar_fd, tar_fd, mean = axes
    if not mean: return ar, tar
    return (ar if ar is None or ar_h is None else mean_of(ar, _ar_count(ar_h, ar_mask, ar_fd)),
            tar if tar is None or tar_h is None else mean_of(tar, _tar_count(tar_h, tar_mask, sd, tar_fd)))


# --- public API -------------------------------------------------------------------------------------
def _plain_now() -> bool:
    "Inside `torch.compile` or `torch.func` transforms: the penalties are traced as their plain expressions"
    # A compiler then fuses them into the user's graph (the blocked code's `out=` writes into scratch buffers would
    # break the graph), and every `torch.func` transform (grad, vmap, jacrev, jvp) knows their ops. `is_compiling()`
    # comes first so that the compiler reads a constant and never sees the functorch query.
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _terms(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, mean: bool) -> tuple:
    """(AR, TAR) sums, or means, of checked arguments: on a GPU with Triton, one kernel each way; where traced by
    torch.func, the plain expressions; for small float32/64 tensors without masks, autograd's own nodes (no Python in
    backward, and they keep only the inputs and views of them); else one lean node"""
    h = tar_h if ar_h is None else ar_h
    # (`is_compiling()` first: a compiler reads a constant there, and traces the operator, never the queries after it)
    if h.is_cuda and h.dtype in _TRITON_DTYPES and (ar_h is None or tar_h is None or ar_h.dtype == tar_h.dtype) and \
            (torch.compiler.is_compiling() or not _functorch_or_forward_ad()) and _triton() is not None:
        sums, counts = _triton().ar_tar_sums(ar_h, tar_h, ar_mask, tar_mask, -1 if sd is None else sd,
                                              -1 if ar_fd is None else ar_fd, -1 if tar_fd is None else tar_fd)
        ar, tar = (None if ar_h is None else sums[0]), (None if tar_h is None else sums[1])
        if not mean: return ar, tar
        return (None if ar is None else mean_of(ar, counts[0])), (None if tar is None else mean_of(tar, counts[1]))
    small = ar_mask is None and tar_mask is None and \
        (ar_h is None or ar_h.numel() <= SMALL_NUMEL and ar_h.dtype in _SMALL_DTYPES) and \
        (tar_h is None or tar_h.numel() <= SMALL_NUMEL and tar_h.dtype in _SMALL_DTYPES)
    if small or _plain_now():
        ar = None if ar_h is None else ar_h.square().sum() if small else _plain_ar(ar_h, ar_mask, ar_fd)
        tar = None if tar_h is None else _plain_tar(tar_h, tar_mask, sd, tar_fd)
        return _means(ar, tar, ar_h, tar_h, ar_mask, tar_mask, (sd, ar_fd, tar_fd, mean)) if mean else (ar, tar)
    return _ArTarSums.apply(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, mean)


# float32 and half on a GPU: the kernels accumulate in float32 (float64 keeps its float64 node, float8 its node too)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _functorch_or_forward_ad() -> bool:
    "torch.func transforms, or forward-mode AD: the Triton operator has neither's rules (the lean node has a jvp)"
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


_TRITON = []  # `fastai_tar.triton_kernels`, or None where Triton is not installed: looked up at the first GPU call


def _triton():
    "`fastai_tar.triton_kernels`, where Triton is installed (PyTorch's CUDA builds ship it); else None"
    if not _TRITON:
        try: from . import triton_kernels
        except ImportError: triton_kernels = None
        _TRITON.append(triton_kernels)
    return _TRITON[0]


@add_arg_docs
def ar_tar_sum_count(
    ar_h: Tensor | None = None,  # AR's activations (the dropped output); None: no AR term
    tar_h: Tensor | None = None,  # TAR's activations (the raw output); None: no TAR term; may be `ar_h` itself
    ar_mask: Tensor | None = None,  # bool, `ar_h`'s shape without its feature dim; True on real data
    tar_mask: Tensor | None = None,  # bool, `tar_h`'s shape without its feature dim
    seq_dim: int = 1,  # TAR's time axis (AR needs none)
    feature_dim: int = -1,  # the feature axis of both tensors (channels-first time series: 1)
) -> tuple[tuple[Tensor, Tensor | int] | None, tuple[Tensor, Tensor | int] | None]:
    "((ar_sum, ar_count), (tar_sum, tar_count)) in one autograd node; None for a term whose tensor is None"
    ar_fd = sd = tar_fd = None
    if ar_h is not None: ar_fd = _check(ar_h, ar_mask, seq_dim, feature_dim, False, ('ar_h', 'ar_mask'))[1]
    if tar_h is not None: sd, tar_fd = _check(tar_h, tar_mask, seq_dim, feature_dim, True, ('tar_h', 'tar_mask'))
    if ar_h is None and tar_h is None: return None, None
    ar, tar = _terms(ar_h, tar_h, ar_mask, tar_mask, sd, ar_fd, tar_fd, False)
    # (the unmasked counts without a call: this runs at every batch)
    return (None if ar_h is None else (ar, ar_h.numel() if ar_mask is None else _ar_count(ar_h, ar_mask, ar_fd)),
            None if tar_h is None else (tar, tar_h.numel() // max(tar_h.shape[sd], 1) * max(tar_h.shape[sd] - 1, 0)
                                        if tar_mask is None else _tar_count(tar_h, tar_mask, sd, tar_fd)))


def _ar(h, mask, seq_dim, feature_dim, mean: bool) -> Tensor:
    return _terms(h, None, mask, None, None, _check(h, mask, seq_dim, feature_dim, False)[1], None, mean)[0]


def _tar(h, mask, seq_dim, feature_dim, mean: bool) -> Tensor:
    sd, fd = _check(h, mask, seq_dim, feature_dim, True)
    return _terms(None, h, None, mask, sd, None, fd, mean)[1]


@add_arg_docs
def ar_sum_count(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its feature dim; True where real data
    seq_dim: int = 1,  # ignored: AR has no time axis (kept so that AR and TAR take the same arguments)
    feature_dim: int = -1,  # the feature axis (channels-first: 1); `h` may be `batch x features`
) -> tuple[Tensor, Tensor | int]:
    "Sum of `h**2` over valid positions and the number of summed elements."
    return _ar(h, mask, seq_dim, feature_dim, False), _ar_count(h, mask, _axis(feature_dim, 'feature_dim') % h.dim())


@add_arg_docs
def tar_sum_count(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its feature dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first, 2 for `batch x features x time`
    feature_dim: int = -1,  # the feature axis (channels-first: 1)
) -> tuple[Tensor, Tensor | int]:
    "Sum of `(h[t+1]-h[t])**2` over valid pairs along `seq_dim` and the number of summed elements."
    return _tar(h, mask, seq_dim, feature_dim, False), _tar_count(h, mask, *_check(h, mask, seq_dim, feature_dim, True))


@add_arg_docs
def mean_of(
    total: Tensor,  # a sum, e.g. the first item of `ar_sum_count`
    count: Tensor | int,  # how many elements it summed
    weight: float = 1.,  # a factor, such as a penalty's coefficient: one op instead of a mean and a product
) -> Tensor:
    "`weight * total / count`, and exactly 0 (not NaN) where nothing was counted: then `total` is 0 as well."
    if isinstance(count, Tensor): return total * weight / count.clamp(min=1).to(total.dtype)
    return total * (weight / max(count, 1))


@add_arg_docs
def ar_penalty(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its feature dim; True where real data
    seq_dim: int = 1,  # ignored: AR has no time axis (kept so that AR and TAR take the same arguments)
    feature_dim: int = -1,  # the feature axis (channels-first: 1); `h` may be `batch x features`
) -> Tensor:
    "Activation Regularization: the mean of `h**2` over valid positions (float32 for half and float8 input)."
    # The mean is taken inside the autograd node, which recounts the mask in backward: nothing but `h` and `mask`
    # is kept for backward.
    return _ar(h, mask, seq_dim, feature_dim, True)


@add_arg_docs
def tar_penalty(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; float16/32/64, bfloat16 or float8 (e4m3fn(uz), e5m2(fnuz))
    mask: Tensor | None = None,  # bool, shaped like `h` without its feature dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first, 2 for `batch x features x time`
    feature_dim: int = -1,  # the feature axis (channels-first: 1)
) -> Tensor:
    "Temporal Activation Regularization: the mean of `(h[t+1]-h[t])**2` over valid pairs along `seq_dim`."
    return _tar(h, mask, seq_dim, feature_dim, True)
