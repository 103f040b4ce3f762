"Tests of `fastai_tar.functional` against float64 references written here, independently of the module."
from contextlib import contextmanager

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
    "Run with blocks of `n` elements, so that small tensors cross block (and piece) boundaries."
    old, tf.CHUNK_NUMEL = tf.CHUNK_NUMEL, n
    try: yield
    finally: tf.CHUNK_NUMEL = old


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


@pytest.mark.parametrize('seq_dim,shape', [(1, (3, 9, 5)), (0, (9, 3, 5)), (1, (2, 9, 3, 4)), (2, (2, 3, 9, 4))])
@pytest.mark.parametrize('masked', [False, True])
def test_gradcheck(seq_dim, shape, masked):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    mask = (torch.rand(shape[:-1], generator=g) < 0.7) if masked else None
    with chunk_numel(7):  # several blocks and pieces
        for f in (ar_penalty, tar_penalty, lambda *a: ar_sum_count(*a)[0], lambda *a: tar_sum_count(*a)[0]):
            assert torch.autograd.gradcheck(lambda x: f(x, mask, seq_dim), (h,))


def test_pieces_along_features_and_long_rows(monkeypatch):
    "A time step larger than a block is cut along another dim; rows longer than ROW_MAX use the exact sum."
    h = torch.randn(2, 6, 9, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    for chunk in (4, 17):
        with chunk_numel(chunk):
            assert tf._plan(h, 1)[1][0][0] == 2  # the largest other dim, the features, is the one cut
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
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


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


@pytest.mark.parametrize('f', [ar_penalty, tar_penalty, ar_sum_count, tar_sum_count])
@pytest.mark.parametrize('kw,err,text', [
    (dict(h=H, mask=torch.ones(2, 5)), TypeError, 'mask must be a bool'),  # a float mask
    (dict(h=H, mask=torch.ones(2, 5, dtype=torch.long)), TypeError, 'mask must be a bool'),
    (dict(h=H, mask=torch.ones(2, 5, 3, dtype=torch.bool)), ValueError, r'shape of h without its last.*\(2, 5\)'),
    (dict(h=H, mask=torch.ones(5, 2, dtype=torch.bool)), ValueError, r'got \(5, 2\)'),
    (dict(h=H, seq_dim=2), ValueError, 'seq_dim=2 must name a dimension of h other than the last'),  # features
    (dict(h=H, seq_dim=-1), ValueError, 'seq_dim=-1 must name'),
    (dict(h=H, seq_dim=3), ValueError, 'seq_dim=3 must name'),
    (dict(h=H, seq_dim=1.), ValueError, 'seq_dim=1.0 must name'),
    (dict(h=torch.ones(2, 5, 3, dtype=torch.long)), TypeError, 'floating point.*h.float'),
    (dict(h=H[0, 0]), ValueError, 'time and a feature dimension'),  # 1-D: no time axis
    (dict(h=H.tolist()), TypeError, 'h must be a torch.Tensor, got list'),
], ids=['float mask', 'long mask', 'mask with features', 'mask transposed', 'seq_dim on features',
        'seq_dim -1', 'seq_dim out of range', 'seq_dim float', 'integer h', '1-D h', 'list h'])
def test_bad_input(f, kw, err, text):
    with pytest.raises(err, match=text): f(**kw)
