"""AR and TAR as pure functions of an activation tensor: torch only, no fastai.

`ar_penalty(h)` is `h.pow(2).mean()` and `tar_penalty(h)` is `(h[:,1:]-h[:,:-1]).pow(2).mean()`
(Merity et al., AWD-LSTM), with a padding mask, any time axis, float32 accumulation for half
inputs and exact zeros where nothing is valid. Each is a sum over valid elements divided by
their count; the `*_sum_count` forms return both so that callers can pool several calls, steps
or ranks into one mean. The sums are custom autograd functions that keep nothing for backward
but their inputs, work in time chunks so that temporaries stay small, and write the gradient
in one pass.
"""
import torch
from torch import Tensor

__all__ = ['ar_penalty', 'tar_penalty', 'ar_sum_count', 'tar_sum_count']

# Elements per chunk: small enough for the temporaries to stay in cache, large enough that the
# per-op overhead of eager PyTorch stays small against the memory traffic.
CHUNK_NUMEL = 1 << 17


def _acc_dtype(h: Tensor) -> torch.dtype:
    "float64 stays float64; float32 and half inputs accumulate in float32."
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _check(h, mask, seq_dim) -> int:
    "Validate the arguments; return `seq_dim` as a non-negative index."
    if not isinstance(h, Tensor): raise TypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"h must be a floating point tensor, got dtype {h.dtype}: pass h.float()")
    if h.dim() < 2: raise ValueError(f"h must have a time and a feature dimension, got shape {tuple(h.shape)}")
    if not -h.dim() <= seq_dim < h.dim() - 1:
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


def _steps_per_chunk(h: Tensor, seq_dim: int) -> int:
    return max(1, CHUNK_NUMEL * h.shape[seq_dim] // max(h.numel(), 1))


def _chunk(x: Tensor, seq_dim: int, start: int, length: int, dtype) -> Tensor:
    "A time slice of `x` as `dtype`: a view for float32/float64 input, a small copy for half."
    return x.narrow(seq_dim, start, length).to(dtype)


def _sum_parts(parts, dtype) -> Tensor:
    # Each part is an accurate (cascade) float32 sum of one chunk; adding the parts in float64
    # keeps the total within float32 rounding however many chunks there are.
    if not parts: return torch.zeros((), dtype=dtype)
    return torch.stack(parts).double().sum().to(dtype)


class _SquareSum(torch.autograd.Function):
    "sum(h**2 * mask); saves only its inputs."
    @staticmethod
    def forward(ctx, h, mask, seq_dim):
        ctx.save_for_backward(h, mask)
        ctx.seq_dim, acc = seq_dim, _acc_dtype(h)
        step, parts = _steps_per_chunk(h, seq_dim), []
        for a in range(0, h.shape[seq_dim], step):
            k = min(step, h.shape[seq_dim] - a)
            x = _chunk(h, seq_dim, a, k, acc)
            sq = x * x
            if mask is not None: sq.mul_(mask.narrow(seq_dim, a, k).unsqueeze(-1))
            parts.append(sq.sum())
        return _sum_parts(parts, acc).to(h.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        h, mask = ctx.saved_tensors
        grad = h * (2 * g)
        if mask is not None: grad.mul_(mask.unsqueeze(-1))
        return grad, None, None


class _SquaredDiffSum(torch.autograd.Function):
    "sum over t of (h[t+1]-h[t])**2 * pair_mask[t] along `seq_dim`; saves only its inputs."
    @staticmethod
    def forward(ctx, h, mask, seq_dim):
        ctx.save_for_backward(h, mask)
        ctx.seq_dim, acc = seq_dim, _acc_dtype(h)
        n, step, parts = h.shape[seq_dim] - 1, _steps_per_chunk(h, seq_dim), []
        pairs = _pair_mask(mask, seq_dim) if mask is not None and n > 0 else None
        for a in range(0, n, step):
            k = min(step, n - a)
            d = _chunk(h, seq_dim, a + 1, k, acc) - _chunk(h, seq_dim, a, k, acc)
            if pairs is not None: d.mul_(pairs.narrow(seq_dim, a, k).unsqueeze(-1))
            parts.append(d.square_().sum())
        return _sum_parts(parts, acc).to(h.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        # d/dh[t] of sum_t d_t**2 with d_t = h[t+1]-h[t] is 2*(d_{t-1} - d_t), d_{-1} = d_{T-1} = 0.
        h, mask = ctx.saved_tensors
        sd, acc, T = ctx.seq_dim, _acc_dtype(h), h.shape[ctx.seq_dim]
        pairs = _pair_mask(mask, sd) if mask is not None and T > 1 else None
        grad, step, scale = torch.empty_like(h), _steps_per_chunk(h, sd), 2 * g
        for a in range(0, T, step):
            k = min(step, T - a)
            # dd holds d_{a-1} .. d_{a+k-1}, zero where t is outside 0..T-2
            lo, hi = max(a - 1, 0), min(a + k, T - 1)
            shape = list(h.shape); shape[sd] = k + 1
            dd = h.new_zeros(shape, dtype=acc)
            inner = dd.narrow(sd, lo - (a - 1), hi - lo)
            torch.sub(_chunk(h, sd, lo + 1, hi - lo, acc), _chunk(h, sd, lo, hi - lo, acc), out=inner)
            inner.mul_(scale if pairs is None else pairs.narrow(sd, lo, hi - lo).unsqueeze(-1) * scale)
            torch.sub(dd.narrow(sd, 0, k), dd.narrow(sd, 1, k), out=grad.narrow(sd, a, k))
        return grad, None, None


def ar_sum_count(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; any floating dtype
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> tuple[Tensor, Tensor | int]:
    "Sum of `h**2` over valid positions and the number of summed elements."
    seq_dim = _check(h, mask, seq_dim)
    count = h.numel() if mask is None else mask.sum() * h.shape[-1]
    return _SquareSum.apply(h, mask, seq_dim), count


def tar_sum_count(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; any floating dtype
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> tuple[Tensor, Tensor | int]:
    "Sum of `(h[t+1]-h[t])**2` over valid pairs along `seq_dim` and the number of summed elements."
    seq_dim = _check(h, mask, seq_dim)
    n_pairs = h.shape[seq_dim] - 1
    if n_pairs <= 0: count = 0
    elif mask is None: count = h.numel() // h.shape[seq_dim] * n_pairs
    else: count = _pair_mask(mask, seq_dim).sum() * h.shape[-1]
    return _SquaredDiffSum.apply(h, mask, seq_dim), count


def mean_of(total: Tensor, count: Tensor | int) -> Tensor:
    "`total / count`, and exactly 0 (not NaN) where nothing was counted: then `total` is 0 as well."
    if isinstance(count, Tensor): return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)


def ar_penalty(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; any floating dtype
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> Tensor:
    "Activation Regularization: the mean of `h**2` over valid positions (float32 for half input)."
    return mean_of(*ar_sum_count(h, mask, seq_dim))


def tar_penalty(
    h: Tensor,  # activations, e.g. `bs x sl x n_hid`; any floating dtype
    mask: Tensor | None = None,  # bool, shaped like `h` without its last dim; True where real data
    seq_dim: int = 1,  # the time axis: 1 for batch-first, 0 for sequence-first
) -> Tensor:
    "Temporal Activation Regularization: the mean of `(h[t+1]-h[t])**2` over valid pairs along `seq_dim`."
    return mean_of(*tar_sum_count(h, mask, seq_dim))
