"Tests of `fastai_tar.functional` against float64 references written here, independently of the module."
from contextlib import contextmanager

import sys

import numpy as np

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.profiler import profile

import fastai_tar.functional as tf
from fastai_tar.tools.bench import fastai_penalty, saved_bytes
from fastai_tar.functional import ar_penalty, ar_sum_count, mean_of, tar_penalty, tar_sum_count

HALF = (torch.bfloat16, torch.float16)


# --- references: selection by boolean indexing in float64, differentiable -----------------------------
def ref_ar(h, mask=None):
    "mean of h**2 over the positions where `mask` is True"
    x = h.double()
    if mask is not None: x = x[mask]  # (n_valid, features)
    return (x ** 2).mean() if x.numel() else x.sum() * 0


def ref_tar(h, mask=None, seq_dim=1):
    "mean of (h[t+1]-h[t])**2 over t, batch and features, only where both h[t] and h[t+1] are real data"
    x = h.double().movedim(seq_dim, 0)
    d = x[1:] - x[:-1]
    if mask is not None:
        m = mask.movedim(seq_dim, 0)
        d = d[m[1:] & m[:-1]]
    return (d ** 2).mean() if d.numel() else d.sum() * 0


@contextmanager
def chunk_numel(n):
    """Run the lean node with blocks of `n` elements, so that small tensors cross block (and piece) boundaries: small
    tensors too, which otherwise take autograd's own nodes (`SMALL_NUMEL`)"""
    old, tf.CHUNK_NUMEL, small, tf.SMALL_NUMEL = tf.CHUNK_NUMEL, n, tf.SMALL_NUMEL, -1
    try: yield
    finally: tf.CHUNK_NUMEL, tf.SMALL_NUMEL = old, small


def grads(f, h, *args):
    x = h.detach().requires_grad_()
    f(x, *args).backward()
    return x.grad


# --- values and gradients against the references ---------------------------------------------------------
@st.composite
def cases(draw):
    ndim = draw(st.sampled_from([3, 3, 4]))
    shape = tuple(draw(st.integers(1, 6)) for _ in range(ndim - 1)) + (draw(st.integers(1, 5)),)
    seq_dim = draw(st.integers(0, ndim - 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, *HALF]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape[::-1], generator=g).permute(*range(ndim - 1, -1, -1))  # a non-contiguous view
    if draw(st.booleans()): h = h.contiguous()
    mask = torch.rand(shape[:-1], generator=g) < draw(st.sampled_from([0.3, 0.8])) if draw(st.booleans()) else None
    chunk = draw(st.sampled_from([1, 3, 10, 1 << 20]))  # 1: one element per block, so every step is cut in pieces
    return h.to(dtype), mask, seq_dim, chunk


@settings(max_examples=80, deadline=None)
@given(cases())
def test_matches_float64_reference(case):
    h, mask, seq_dim, chunk = case
    out_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    # Half inputs: the reference sees the same half values; ours accumulates (and subtracts) in float32,
    # so it matches to float32 rounding, not to half rounding.
    tol = dict(rtol=1e-12, atol=1e-12) if h.dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    # The gradient is computed in float32 and rounded once to h's dtype: within its unit roundoff.
    gtol = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-7),
            torch.bfloat16: dict(rtol=2 ** -8, atol=1e-7), torch.float16: dict(rtol=2 ** -11, atol=1e-7)}[h.dtype]
    with chunk_numel(chunk):
        for ours, ref in ((ar_penalty, lambda x: ref_ar(x, mask)), (tar_penalty, lambda x: ref_tar(x, mask, seq_dim))):
            val = ours(h, mask, seq_dim)
            assert val.dtype == out_dtype
            torch.testing.assert_close(val.double(), ref(h), **tol)
            g = grads(ours, h, mask, seq_dim)
            assert g.dtype == h.dtype and g.shape == h.shape
            torch.testing.assert_close(g.double(), grads(ref, h.double()), **gtol)


@st.composite
def axes_cases(draw):
    "Any feature axis (channels-first time series among them), any other time axis, given as any integer-like value"
    ndim = draw(st.sampled_from([2, 3, 3, 4]))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    fd, sd = draw(st.permutations(range(ndim)))[:2]
    as_given = draw(st.sampled_from([int, lambda i: i - ndim, np.int64, torch.tensor]))  # negative, numpy, 0-d
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    h = torch.randn(shape, generator=g).to(dtype)
    mask_shape = shape[:fd] + shape[fd + 1:]
    mask = torch.rand(mask_shape, generator=g) < 0.7 if draw(st.booleans()) else None
    return h, mask, sd, fd, as_given(sd), as_given(fd), draw(st.sampled_from([1, 7, 1 << 20]))


@settings(max_examples=60, deadline=None)
@given(axes_cases())
def test_feature_dim_matches_float64_reference(case):
    "feature_dim=: the references see `h` with its features moved last, and the mask with the time axis where it was"
    h, mask, sd, fd, sd_arg, fd_arg, chunk = case
    moved_sd = sd - (sd > fd)  # the time axis once the features are moved last
    tol = dict(rtol=1e-12, atol=1e-12) if h.dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    gtol = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-7),
            torch.bfloat16: dict(rtol=2 ** -8, atol=1e-7)}[h.dtype]
    refs = ((ar_penalty, lambda x: ref_ar(x.movedim(fd, -1), mask)),
            (tar_penalty, lambda x: ref_tar(x.movedim(fd, -1), mask, moved_sd)))
    with chunk_numel(chunk):
        for ours, ref in refs:
            f = lambda x: ours(x, mask, seq_dim=sd_arg, feature_dim=fd_arg)
            torch.testing.assert_close(f(h).double(), ref(h), **tol)
            g = grads(f, h)
            assert g.dtype == h.dtype and g.shape == h.shape
            torch.testing.assert_close(g.double(), grads(ref, h.double()), **gtol)


def test_channels_first_as_in_the_issue():
    "`tar_penalty(h, seq_dim=2, feature_dim=1)` of `batch x features x time` is TAR of its batch-first transpose"
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 6, 9, generator=g)  # batch x features x time
    mask = torch.rand(4, 9, generator=g) < 0.8  # batch x time
    torch.testing.assert_close(tar_penalty(h, mask, seq_dim=2, feature_dim=1).double(),
                               ref_tar(h.transpose(1, 2), mask), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ar_penalty(h, mask, feature_dim=1).double(), ref_ar(h.transpose(1, 2), mask),
                               rtol=1e-6, atol=1e-7)
    assert tar_sum_count(h, mask, 2, 1)[1] == (mask[:, 1:] & mask[:, :-1]).sum() * 6


# --- the fused pair ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('same', [False, True], ids=['dropped and raw', 'one tensor'])
@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('chunk', [5, 1 << 20])
def test_fused_pair_matches_float64_reference(dtype, same, masked, chunk):
    "AR of one tensor and TAR of another (or the same) in one node: sums, counts and gradients of the references"
    g = torch.Generator().manual_seed(6)
    raw = torch.randn(3, 8, 5, generator=g).to(dtype).requires_grad_()
    dropped = raw if same else torch.randn(3, 8, 5, generator=g).to(dtype).requires_grad_()
    ar_mask, tar_mask = (torch.rand(3, 8, generator=g) < 0.7, torch.rand(3, 8, generator=g) < 0.7) if masked \
        else (None, None)
    with chunk_numel(chunk):
        (a, na), (t, nt) = tf.ar_tar_sum_count(dropped, raw, ar_mask, tar_mask)
        assert a.grad_fn is t.grad_fn  # one autograd node
        loss = 2 * mean_of(a, na) + 3 * mean_of(t, nt)
        got = torch.autograd.grad(loss, [raw] if same else [dropped, raw])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(mean_of(a, na).double(), ref_ar(dropped, ar_mask), **tol)
    torch.testing.assert_close(mean_of(t, nt).double(), ref_tar(raw, tar_mask), **tol)
    d64, r64 = dropped.detach().double().requires_grad_(), raw.detach().double().requires_grad_()
    ref_loss = 2 * ref_ar(r64 if same else d64, ar_mask) + 3 * ref_tar(r64, tar_mask)
    want = torch.autograd.grad(ref_loss, [r64] if same else [d64, r64])
    gtol = {torch.float64: dict(rtol=1e-12, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-7),
            torch.bfloat16: dict(rtol=2 ** -8, atol=1e-7), torch.float16: dict(rtol=2 ** -10, atol=1e-7)}[dtype]
    for x, w in zip(got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x.double(), w, **gtol)


def test_fused_pair_terms_and_shapes():
    "A None tensor gives a None term; AR may read a 2-D output while TAR reads a channels-first one"
    g = torch.Generator().manual_seed(7)
    raw = torch.randn(2, 4, 6, generator=g, requires_grad=True)  # batch x features x time
    last = torch.randn(2, 4, generator=g, requires_grad=True)  # batch x features: a many-to-one output
    assert tf.ar_tar_sum_count() == (None, None)
    ar, tar = tf.ar_tar_sum_count(last, raw, seq_dim=2, feature_dim=1)
    torch.testing.assert_close(mean_of(*ar).double(), ref_ar(last))
    torch.testing.assert_close(mean_of(*tar).double(), ref_tar(raw.transpose(1, 2)))
    assert ar[1] == 8 and tar[1] == 2 * 5 * 4
    only_tar = tf.ar_tar_sum_count(tar_h=raw, seq_dim=2, feature_dim=1)
    assert only_tar[0] is None and torch.equal(only_tar[1][0], tar[0])
    only_ar = tf.ar_tar_sum_count(ar_h=last)
    assert only_ar[1] is None and torch.equal(only_ar[0][0], ar[0])
    # one term used: the other gets no gradient work, and the gradients are those of that term alone
    ga, = torch.autograd.grad(ar[0], last)
    torch.testing.assert_close(ga, 2 * last.detach())
    with pytest.raises(ValueError, match='ar_mask must have the shape of ar_h'):
        tf.ar_tar_sum_count(last, raw, ar_mask=torch.ones(2, 6, dtype=torch.bool), seq_dim=2, feature_dim=1)
    with pytest.raises(ValueError, match='seq_dim=1 and feature_dim=1 both name dimension 1 of tar_h'):
        tf.ar_tar_sum_count(last, raw, feature_dim=1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_fused_pair_saves_nothing_and_writes_one_gradient(dtype, monkeypatch):
    monkeypatch.setattr(tf, 'SMALL_NUMEL', -1)  # the lean node, whatever the size
    raw = torch.randn(4, 9, 6).to(dtype).requires_grad_()
    dropped = torch.randn(4, 9, 6).to(dtype).requires_grad_()
    mask = torch.rand(4, 9) < 0.7

    def both(r, d, m): return sum(s for s, _ in tf.ar_tar_sum_count(d, r, m, m))
    assert saved_bytes(both, raw, dropped, mask) == 0
    assert saved_bytes(lambda r, m: sum(s for s, _ in tf.ar_tar_sum_count(r, r, m, m)), raw, mask) == 0
    # AR and TAR of one tensor: one gradient, not two summed by autograd
    (a, _), (t, _) = tf.ar_tar_sum_count(raw, raw)
    loss = a + t
    with profile() as prof: torch.autograd.grad(loss, raw)
    assert [e.name for e in prof.events() if e.name in ('aten::add', 'aten::add_')] == []


def test_fused_pair_near_constant_sequences():
    "Small steps on large values, 30M elements, AR and TAR of one tensor: within 1e-6 of float64, value and gradient"
    g = torch.Generator().manual_seed(8)
    h = torch.randn(30, 1000, 1000, generator=g).mul_(1e-3).cumsum_(1).add_(100.).requires_grad_()
    (a, na), (t, nt) = tf.ar_tar_sum_count(h, h)
    ar_ref = h.detach().double().square().sum().item()
    d = h.detach()[:, 1:].double() - h.detach()[:, :-1].double()
    tar_ref = d.square().sum().item()
    assert abs(a.item() / ar_ref - 1) < 1e-6 and abs(t.item() / tar_ref - 1) < 1e-6
    grad, = torch.autograd.grad(t, h)
    # d/dh[t] = 2*(d[t-1] - d[t]): compared on the steps, where it is largest relative to the rounding of h
    want = torch.zeros(h.shape, dtype=torch.float64)
    want[:, 1:] += 2 * d
    want[:, :-1] -= 2 * d
    del d
    err = (grad.double() - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-6


@pytest.mark.parametrize('seq_dim,shape', [(1, (3, 9, 5)), (0, (9, 3, 5)), (1, (2, 9, 3, 4)), (2, (2, 3, 9, 4))])
@pytest.mark.parametrize('masked', [False, True])
def test_gradcheck(seq_dim, shape, masked):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    mask = (torch.rand(shape[:-1], generator=g) < 0.7) if masked else None
    with chunk_numel(7):  # several blocks and pieces
        for f in (ar_penalty, tar_penalty, lambda *a: ar_sum_count(*a)[0], lambda *a: tar_sum_count(*a)[0]):
            assert torch.autograd.gradcheck(lambda x: f(x, mask, seq_dim), (h,))


def test_runs_of_steps_and_long_rows(monkeypatch):
    "A sequence larger than a block is cut into runs of steps (one at least); rows over ROW_MAX take the exact sum."
    h = torch.randn(2, 6, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    for chunk in (4, 17, 20):  # one step per block (a step is larger than the block), one, two steps
        with chunk_numel(chunk):
            assert {k for *_, k in tf._blocks(2, 6, 9, h.device)} == {max(1, chunk // 9)}
            # a GPU takes the whole tensor in one block
            assert tf._blocks(2, 6, 9, torch.device('cuda')) == ((0, 2, 0, 6),)
            for row_max in (2, 1 << 16):
                monkeypatch.setattr(tf, 'ROW_MAX', row_max)
                for m in (None, mask):
                    torch.testing.assert_close(ar_penalty(h, m), ref_ar(h, m))
                    torch.testing.assert_close(tar_penalty(h, m), ref_tar(h, m))
                    torch.testing.assert_close(grads(tar_penalty, h, m), grads(ref_tar, h, m))
                    torch.testing.assert_close(grads(ar_penalty, h, m), grads(ref_ar, h, m))


def test_layouts_agree():
    "Batch-first and sequence-first layouts of the same activations give the same penalty."
    h = torch.randn(4, 7, 5)
    mask = torch.rand(4, 7) < 0.7
    torch.testing.assert_close(tar_penalty(h, mask), tar_penalty(h.transpose(0, 1), mask.t(), seq_dim=0))
    torch.testing.assert_close(tar_penalty(h, mask, seq_dim=-2), tar_penalty(h, mask, seq_dim=1))
    torch.testing.assert_close(ar_penalty(h, mask), ar_penalty(h.transpose(0, 1), mask.t(), seq_dim=0))


def test_matches_fastai_expression_without_mask():
    "Without padding, ours is fastai's `RNNRegularizer` math (beta*TAR of raw + alpha*AR of dropped)."
    g = torch.Generator().manual_seed(1)
    raw, dropped = torch.randn(3, 8, 6, generator=g), torch.randn(3, 8, 6, generator=g)
    torch.testing.assert_close(2 * ar_penalty(dropped) + tar_penalty(raw), fastai_penalty(raw, dropped))


# --- pooling several calls into one mean -----------------------------------------------------------------
def test_sum_count_pools_into_one_mean():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 5, 3, generator=g), torch.randn(3, 8, 3, generator=g)
    ma, mb = torch.rand(2, 5, generator=g) < 0.7, torch.rand(3, 8, generator=g) < 0.7
    for f, ref in ((ar_sum_count, ref_ar), (tar_sum_count, ref_tar)):
        (sa, na), (sb, nb) = f(a, ma), f(b, mb)
        # the reference: all valid terms of both calls in one mean
        if f is ar_sum_count: terms = torch.cat([a[ma].flatten(), b[mb].flatten()]).double() ** 2
        else: terms = torch.cat([((x[:, 1:] - x[:, :-1])[m[:, 1:] & m[:, :-1]]).flatten()
                                 for x, m in ((a, ma), (b, mb))]).double() ** 2
        torch.testing.assert_close(mean_of(sa + sb, na + nb).double(), terms.mean())
        assert int(na + nb) == terms.numel()
        (s, n) = f(a)  # no mask: an int count
        assert isinstance(n, int) and n == (a.numel() if f is ar_sum_count else 2 * 4 * 3)


def test_mean_of_nothing_is_zero():
    for count in (0, torch.tensor(0)):
        assert mean_of(torch.tensor(0.), count).item() == 0.


# --- edge shapes: exactly zero, working backward ------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_sl1_and_all_padding_give_exact_zero(dtype):
    one_step = torch.randn(4, 1, 3).to(dtype).requires_grad_()
    tar = tar_penalty(one_step)
    assert tar.item() == 0. and tar.dtype == torch.float32 and tar_sum_count(one_step)[1] == 0
    tar.backward()
    assert torch.equal(one_step.grad, torch.zeros_like(one_step))
    assert ar_penalty(one_step).item() > 0  # AR still sees the single step

    h = torch.randn(4, 6, 3).to(dtype).requires_grad_()
    none = torch.zeros(4, 6, dtype=torch.bool)
    isolated = torch.zeros(4, 6, dtype=torch.bool)
    isolated[:, ::2] = True  # real positions, but never two in a row: no valid pair
    for mask, f in ((none, ar_penalty), (none, tar_penalty), (isolated, tar_penalty)):
        h.grad = None
        val = f(h, mask)
        assert val.item() == 0. and not val.isnan()
        val.backward()
        assert torch.equal(h.grad, torch.zeros_like(h))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('bad', [float('inf'), float('nan')])
def test_non_finite_padding_adds_nothing(dtype, bad):
    "Padding may hold inf or NaN (an fp16 overflow): masked out, it changes neither the value nor the gradient."
    torch.manual_seed(0)
    clean = torch.randn(3, 7, 4).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = mask[2, :2] = False
    dirty = clean.clone()
    dirty[~mask] = bad
    for f, ref in ((ar_penalty, ref_ar), (tar_penalty, ref_tar)):
        want = ref(clean.double(), mask)
        grads = []
        for h in (clean, dirty):
            h = h.clone().requires_grad_()
            val = f(h, mask)
            val.backward()
            assert val.item() == pytest.approx(want.item(), rel=1e-6)
            assert torch.isfinite(h.grad).all()
            grads.append(h.grad)
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize('shape', [(0, 5, 3), (2, 0, 3), (2, 5, 0)], ids=['bs=0', 'sl=0', 'no features'])
def test_empty_tensors_give_zero(shape):
    h = torch.randn(shape, requires_grad=True)
    for mask in (None, torch.ones(shape[:-1], dtype=torch.bool)):
        val = ar_penalty(h, mask) + tar_penalty(h, mask)
        assert val.item() == 0.
        h.grad = None
        val.backward()
        assert h.grad.shape == h.shape


def test_bs1_is_regularized():
    "fastai's `if len(h)>1` tests the batch size and skips TAR for bs=1; ours does not"
    h = torch.tensor([[[0.], [1.], [3.]]])  # bs=1, sl=3, one feature: steps of 1 and 2
    assert tar_penalty(h).item() == pytest.approx((1 + 4) / 2)
    assert tar_penalty(h, torch.tensor([[True, True, False]])).item() == pytest.approx(1.)


# --- precision ---------------------------------------------------------------------------------------------
def test_difference_taken_in_float32():
    "Differences of half values are exact in float32; in half they overflow (fp16) or round (bf16)"
    # fp16: +-40000 is representable, the 80000 step is not (max 65504): a half subtraction gives inf
    h = torch.tensor([[[40000.], [-40000.], [40000.]]], dtype=torch.float16)
    assert (h[:, 1:] - h[:, :-1]).float().pow(2).mean().isinf()  # what computing the difference in half does
    assert tar_penalty(h).item() == pytest.approx(80000. ** 2, rel=1e-6)
    # bf16 keeps 8 significant bits: 1 - 2**-10 rounds to 1, so each squared step is 0.2% too large
    h = torch.tensor([[[1.], [2 ** -10], [1.]]], dtype=torch.bfloat16)
    exact = (1 - 2 ** -10) ** 2
    assert abs((h[:, 1:] - h[:, :-1]).float().pow(2).mean().item() / exact - 1) > 1e-3
    assert tar_penalty(h).item() == pytest.approx(exact, rel=1e-7)


def test_30m_elements_within_1e6_of_float64():
    "Summing 30M float32 squares: ours stays within 1e-6 of float64, where one float32 vector norm drifts"
    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, 1000, 1000, generator=g).add_(0.5)  # 30M elements, positive mean: errors don't cancel
    n = h.numel()
    ar_ref = h.double().square().sum().item() / n
    assert abs(torch.linalg.vector_norm(h).item() ** 2 / n / ar_ref - 1) > 1e-6  # the case is hard enough
    assert abs(ar_penalty(h).item() / ar_ref - 1) < 1e-6
    # a random walk along time: small steps on large values, as in smooth activations
    h = torch.randn(30, 1000, 1000, generator=g).mul_(0.01).cumsum_(1).add_(10.)
    tar_ref = (h[:, 1:].double() - h[:, :-1].double()).square_().mean().item()
    assert abs(tar_penalty(h).item() / tar_ref - 1) < 1e-6


# --- memory ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('masked', [False, True])
def test_nothing_saved_for_backward_but_inputs(dtype, masked):
    raw, dropped = (torch.randn(4, 9, 6).to(dtype).requires_grad_() for _ in range(2))
    mask = torch.rand(4, 9) < 0.7 if masked else None
    for f in (ar_penalty, tar_penalty, lambda h, m: ar_sum_count(h, m)[0], lambda h, m: tar_sum_count(h, m)[0]):
        assert saved_bytes(f, raw, mask) == 0
    # The counter sees what fastai's expressions keep: the float32 difference (and, for half input, a
    # float32 copy of the dropped output for AR).
    expected = 4 * 4 * 8 * 6 + (4 * 4 * 9 * 6 if dtype != torch.float32 else 0)
    assert saved_bytes(fastai_penalty, raw, dropped) == expected


def _largest_allocation(fn) -> int:
    with profile(profile_memory=True) as prof: fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)  # its own, not its callees'


def test_temporaries_bounded_by_a_block():
    "A half input is never copied whole to float32: the largest allocation is one block, or the gradient itself"
    h = torch.randn(16, 40, 32).bfloat16().requires_grad_()
    step = 16 * 32  # elements per time step
    with chunk_numel(4 * step):
        block_bytes = 4 * (4 * step + 2 * step)  # float32: a block and the two steps around it TAR's backward reads
        for f in (ar_penalty, tar_penalty):
            out = []
            assert _largest_allocation(lambda: out.append(f(h))) <= block_bytes
            assert _largest_allocation(out[0].backward) <= max(block_bytes, h.numel() * h.element_size())
    # the measure sees a whole float32 copy where there is one
    assert _largest_allocation(lambda: fastai_penalty(h, h)) >= 4 * h.numel()


# --- bad input: clear errors ---------------------------------------------------------------------------------
H = torch.randn(2, 5, 3)
ALL = [ar_penalty, tar_penalty, ar_sum_count, tar_sum_count]


@pytest.mark.parametrize('f', ALL)
@pytest.mark.parametrize('kw,err,text', [
    (dict(h=H, mask=torch.ones(2, 5)), TypeError, 'mask must be a bool'),  # a float mask
    (dict(h=H, mask=torch.ones(2, 5, dtype=torch.long)), TypeError, 'mask must be a bool'),
    (dict(h=H, mask=torch.ones(2, 5, 3, dtype=torch.bool)), ValueError,
     r'shape of h without its feature dimension \(feature_dim=-1\), \(2, 5\)'),
    (dict(h=H, mask=torch.ones(5, 2, dtype=torch.bool)), ValueError, r'got \(5, 2\)'),
    (dict(h=H, mask=torch.ones(2, 5, dtype=torch.bool), seq_dim=2, feature_dim=1), ValueError,
     r'shape of h without its feature dimension \(feature_dim=1\), \(2, 3\), got \(2, 5\)'),
    (dict(h=H, feature_dim=3), ValueError, r'feature_dim=3 is not a dimension of h, of shape \(2, 5, 3\)'),
    (dict(h=H, feature_dim=1.), TypeError, r'feature_dim must be an integer, got 1.0 \(float\)'),
    (dict(h=H, feature_dim=True), TypeError, 'feature_dim must be an integer, got the bool True'),
    (dict(h=H, seq_dim=1.), TypeError, r'seq_dim must be an integer, got 1.0 \(float\)'),
    (dict(h=H, seq_dim=False), TypeError, 'seq_dim must be an integer, got the bool False'),
    (dict(h=H, seq_dim=torch.tensor(True)), TypeError, 'seq_dim must be an integer, got the bool'),
    (dict(h=H, seq_dim=torch.tensor(1.)), TypeError, 'seq_dim must be an integer'),
    (dict(h=torch.ones(2, 5, 3, dtype=torch.long)), TypeError, 'floating point.*h.float'),
    (dict(h=H[0, 0, 0]), ValueError, 'dimension'),  # 0-d: no feature axis, no time axis
    (dict(h=H.tolist()), TypeError, 'h must be a torch.Tensor, got list'),
], ids=['float mask', 'long mask', 'mask with features', 'mask transposed', 'channels-first mask without time',
        'feature_dim out of range', 'feature_dim float', 'feature_dim bool', 'seq_dim float', 'seq_dim bool',
        'seq_dim bool tensor', 'seq_dim float tensor', 'integer h', '0-d h', 'list h'])
def test_bad_input(f, kw, err, text):
    with pytest.raises(err, match=text): f(**kw)


@pytest.mark.parametrize('f', [tar_penalty, tar_sum_count])
@pytest.mark.parametrize('kw,text', [
    (dict(seq_dim=2), r"seq_dim=2 and feature_dim=-1 both name dimension 2 of h \(shape \(2, 5, 3\)\)"),
    (dict(seq_dim=-1), 'seq_dim=-1 and feature_dim=-1 both name dimension 2'),
    (dict(seq_dim=1, feature_dim=1), 'seq_dim=1 and feature_dim=1 both name dimension 1'),
    (dict(seq_dim=3), r'seq_dim=3 is not a dimension of h, of shape \(2, 5, 3\)'),
    (dict(seq_dim=-4), 'seq_dim=-4 is not a dimension of h'),
], ids=['on features', 'on features, negative', 'feature_dim on time', 'out of range', 'out of range, negative'])
def test_bad_time_axis_for_tar(f, kw, text):
    with pytest.raises(ValueError, match=text): f(H, **kw)
    with pytest.raises(ValueError, match='TAR.s h must have a time and a feature dimension'): f(H[0, 0])  # 1-D


@pytest.mark.parametrize('f', [ar_penalty, ar_sum_count])
def test_ar_ignores_seq_dim(f):
    "AR has no time axis: any integer seq_dim is accepted and changes nothing; (batch, features) and (features,) work"
    want = f(H)
    for sd in (2, -1, 3, 99, -7, np.int64(5)):
        torch.testing.assert_close(f(H, seq_dim=sd), want)
    many_to_one = H[:, -1]  # a many-to-one model's dropped output: (batch, features)
    mask = torch.tensor([True, False])
    got = f(many_to_one, mask)
    torch.testing.assert_close(mean_of(*got) if f is ar_sum_count else got, ref_ar(many_to_one, mask).float())
    got = f(many_to_one[0])
    torch.testing.assert_close(mean_of(*got) if f is ar_sum_count else got, ref_ar(many_to_one[0]).float())


# --- small tensors: autograd's own nodes ---------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_small_tensors_take_autograds_own_nodes_keep_only_views_and_run_no_python_in_backward(dtype):
    "Up to SMALL_NUMEL elements, float32/64 without a mask: the reference's values and gradients, any order"
    g = torch.Generator().manual_seed(9)
    raw = torch.randn(4, 8, 8, generator=g).to(dtype).requires_grad_()
    dropped = torch.randn(4, 8, 8, generator=g).to(dtype).requires_grad_()
    (a, na), (t, nt) = tf.ar_tar_sum_count(dropped, raw)
    assert a.grad_fn is not t.grad_fn and type(t.grad_fn).__name__ == 'MseLossBackward0'
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(mean_of(a, na).double(), ref_ar(dropped), **tol)
    torch.testing.assert_close(mean_of(t, nt).double(), ref_tar(raw), **tol)
    assert saved_bytes(lambda r, d: sum(s for s, _ in tf.ar_tar_sum_count(d, r)), raw, dropped) == 0
    calls = []
    loss = 2 * mean_of(a, na) + 3 * mean_of(t, nt)
    sys.setprofile(lambda frame, event, arg: calls.append(frame.f_code.co_filename) if event == 'call' else None)
    try: got = torch.autograd.grad(loss, [dropped, raw])
    finally: sys.setprofile(None)
    assert not [f for f in calls if 'fastai_tar' in f]  # backward: C++ alone
    d64, r64 = dropped.detach().double().requires_grad_(), raw.detach().double().requires_grad_()
    want = torch.autograd.grad(2 * ref_ar(d64) + 3 * ref_tar(r64), [d64, r64])
    for x, w in zip(got, want): torch.testing.assert_close(x.double(), w, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(lambda h: tar_penalty(h) + ar_penalty(h), (raw,))
    big = torch.randn(tf.SMALL_NUMEL + 1, 2, dtype=dtype, requires_grad=True)  # one element more: the lean node
    (a, _), (t, _) = tf.ar_tar_sum_count(big, big, seq_dim=0)
    assert a.grad_fn is t.grad_fn
