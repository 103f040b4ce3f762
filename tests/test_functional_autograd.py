"""Higher-order gradients, `torch.func`, forward-mode AD, float8 and strided/compiled inputs of
`fastai_tar.functional`, against references written here with plain float64 tensor ops."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, jacrev, jvp, vmap

import fastai_tar.functional as tf
from fastai_tar.tools.bench import saved_bytes
from fastai_tar.functional import ar_penalty, ar_sum_count, tar_penalty, tar_sum_count

FUNCS = {'ar': ar_penalty, 'tar': tar_penalty, 'ar_sum': lambda *a: ar_sum_count(*a)[0],
         'tar_sum': lambda *a: tar_sum_count(*a)[0]}


# --- references: products with a float mask, every op differentiable to any order ---------------------------
def ref_ar(h, mask=None, seq_dim=1, mean=True):
    x = h.double()
    m = torch.ones(x.shape[:-1], dtype=x.dtype) if mask is None else mask.to(x.dtype)
    total = (x * x * m.unsqueeze(-1)).sum()
    return total / (m.sum() * x.shape[-1]).clamp(min=1) if mean else total


def ref_tar(h, mask=None, seq_dim=1, mean=True):
    x = h.double().movedim(seq_dim, 0)
    m = torch.ones(x.shape[:-1], dtype=x.dtype) if mask is None else mask.movedim(seq_dim, 0).to(x.dtype)
    d, pairs = x[1:] - x[:-1], m[1:] * m[:-1]
    total = (d * d * pairs.unsqueeze(-1)).sum()
    return total / (pairs.sum() * x.shape[-1]).clamp(min=1) if mean else total


REFS = {'ar': ref_ar, 'tar': ref_tar, 'ar_sum': lambda *a: ref_ar(*a, mean=False),
        'tar_sum': lambda *a: ref_tar(*a, mean=False)}


@pytest.fixture
def small_blocks(monkeypatch):
    "The lean node in blocks of 7 elements: the small tensors below cross block and piece boundaries"
    monkeypatch.setattr(tf, 'CHUNK_NUMEL', 7)
    monkeypatch.setattr(tf, 'SMALL_NUMEL', -1)


def data(shape, masked, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(shape, dtype=dtype, generator=g)
    mask = (torch.rand(shape[:-1], generator=g) < 0.7) if masked else None
    return h, mask


# --- any derivative order ------------------------------------------------------------------------------------
@pytest.mark.parametrize('seq_dim,shape', [(1, (2, 6, 3)), (0, (6, 2, 3)), (2, (2, 2, 5, 2))])
@pytest.mark.parametrize('masked', [False, True])
def test_gradgradcheck(seq_dim, shape, masked, small_blocks):
    h, mask = data(shape, masked)
    h.requires_grad_()
    for f in FUNCS.values():
        assert torch.autograd.gradgradcheck(lambda x: f(x, mask, seq_dim), (h,))


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_create_graph_gives_the_first_order_gradient(dtype, small_blocks):
    "With `create_graph=True` the gradient is the one the lean backward gives, and stays attached to the graph"
    h, mask = data((3, 8, 4), True, dtype=dtype)
    h.requires_grad_()
    for f in FUNCS.values():
        lean, = torch.autograd.grad(f(h, mask), h)
        graph, = torch.autograd.grad(f(h, mask), h, create_graph=True)
        assert graph.requires_grad and not lean.requires_grad
        torch.testing.assert_close(graph, lean, rtol=1e-6 if dtype != torch.bfloat16 else 2 ** -8, atol=1e-12)


def lstm_data(seed=0):
    torch.manual_seed(seed)
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    return lstm, x, mask


@pytest.mark.parametrize('name', ['ar', 'tar'])
def test_gradient_penalty_on_the_input_through_an_lstm(name, small_blocks):
    "d/dparams of |d penalty / d x|^2 (a WGAN-GP style gradient penalty) matches the plain formula"
    lstm, x, mask = lstm_data()
    params = list(lstm.parameters())

    def gp_grads(f):
        out, _ = lstm(x)
        gx, = torch.autograd.grad(f(out, mask), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), params)
    for ours, ref in zip(gp_grads(FUNCS[name]), gp_grads(REFS[name])):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


def test_hessian_vector_product_through_an_lstm(small_blocks):
    lstm, x, mask = lstm_data(1)
    params = list(lstm.parameters())
    v = [torch.randn_like(p) for p in params]

    def hvp(ar, tar):
        out, _ = lstm(x)
        loss = 2 * ar(out, mask) + tar(out, mask)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
    for ours, ref in zip(hvp(ar_penalty, tar_penalty), hvp(ref_ar, ref_tar)):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    # and torch's own double-backward helper agrees
    h = lstm(x)[0].detach()
    u = torch.randn_like(h)
    _, ours = torch.autograd.functional.hvp(lambda t: tar_penalty(t, mask), h, u)
    _, ref = torch.autograd.functional.hvp(lambda t: ref_tar(t, mask), h, u)
    torch.testing.assert_close(ours, ref)


def test_first_order_saves_only_inputs():
    "Requesting a first-order gradient keeps nothing for backward but the inputs, as before"
    h, mask = data((4, 9, 6), True, dtype=torch.float32)
    h.requires_grad_()
    for f in FUNCS.values():
        assert saved_bytes(f, h, mask) == 0


# --- torch.func and forward-mode AD ------------------------------------------------------------------------
def assert_per_sample_grads(f, ref, h, mask):
    "Per-sample gradients through `vmap(grad(...))`, one penalty per sequence of the batch, against `ref`'s"
    per_sample = vmap(grad(lambda x, m: f(x[None], None if m is None else m[None])),
                      in_dims=(0, None if mask is None else 0))
    expected = torch.stack([grad(lambda x: ref(x[None], None if mask is None else mask[i:i + 1]))(h[i])
                            for i in range(len(h))])
    torch.testing.assert_close(per_sample(h, mask), expected)


@pytest.mark.parametrize('name', list(FUNCS))
@pytest.mark.parametrize('masked', [False, True])
def test_torch_func(name, masked, small_blocks):
    f, ref = FUNCS[name], REFS[name]
    h, mask = data((3, 7, 4), masked, seed=2)
    torch.testing.assert_close(grad(lambda x: f(x, mask))(h), grad(lambda x: ref(x, mask))(h))
    torch.testing.assert_close(jacrev(lambda x: f(x, mask))(h), jacrev(lambda x: ref(x, mask))(h))
    assert_per_sample_grads(f, ref, h, mask)
    # second order through torch.func: the Hessian's action on a direction
    u = torch.randn_like(h)
    hess_u = jvp(grad(lambda x: f(x, mask)), (h,), (u,))[1]
    torch.testing.assert_close(hess_u, jvp(grad(lambda x: ref(x, mask)), (h,), (u,))[1])
    # forward mode, through torch.func and through torch.autograd.forward_ad (which calls our `jvp`)
    val, tangent = jvp(lambda x: f(x, mask), (h,), (u,))
    ref_val, ref_tangent = jvp(lambda x: ref(x, mask), (h,), (u,))
    torch.testing.assert_close((val, tangent), (ref_val, ref_tangent))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(h, u), mask))
    torch.testing.assert_close((out.primal, out.tangent), (ref_val, ref_tangent))


# --- dtypes ------------------------------------------------------------------------------------------------
FLOAT8 = [getattr(torch, d) for d in ('float8_e4m3fn', 'float8_e5m2', 'float8_e4m3fnuz', 'float8_e5m2fnuz')
          if hasattr(torch, d)]


@pytest.mark.parametrize('dtype', FLOAT8, ids=str)
@pytest.mark.parametrize('masked', [False, True])
def test_float8_forward_and_backward(dtype, masked, small_blocks):
    "float8 is summed in float32 and its gradient rounded once to float8: within float8's unit roundoff"
    h, mask = data((3, 8, 4), masked, seed=3, dtype=torch.float32)
    h = h.to(dtype).requires_grad_()
    ulp = torch.finfo(dtype).eps  # twice the unit roundoff
    for name, f in FUNCS.items():
        val = f(h, mask)
        assert val.dtype == torch.float32
        torch.testing.assert_close(val.double(), REFS[name](h.float(), mask), rtol=1e-6, atol=1e-7)
        g, = torch.autograd.grad(val, h)
        assert g.dtype == dtype
        hd = h.detach().double().requires_grad_()
        want, = torch.autograd.grad(REFS[name](hd, mask), hd)
        torch.testing.assert_close(g.double(), want, rtol=ulp, atol=torch.finfo(dtype).smallest_normal)


@pytest.mark.parametrize('dtype', [getattr(torch, d) for d in ('float8_e8m0fnu', 'float4_e2m1fn_x2')
                                   if hasattr(torch, d)], ids=str)
def test_unsupported_floating_dtypes_rejected_up_front(dtype):
    h = torch.empty(2, 5, 3, dtype=dtype)
    for f in FUNCS.values():
        with pytest.raises(TypeError, match=f'float32.*float8_e4m3fn.*; got {dtype}: pass h.float'): f(h)


# --- strided inputs, eagerly and compiled ----------------------------------------------------------------------
def strided_inputs():
    "Layouts a compiled graph can hand over, each with the same batch-first values"
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 8, 6, generator=g)  # bs x sl x n_hid
    return {
        'contiguous': base,
        # nn.LSTM(batch_first=True) under inductor: sequence-first storage, strides (H, B*H, 1)
        'lstm-inductor': base.transpose(0, 1).contiguous().transpose(0, 1),
        'features-strided': torch.stack([base, base], -1)[..., 0],
        'channels-last-like': base.permute(2, 0, 1).contiguous().permute(1, 2, 0),
        'expanded': base[:1].expand(5, 8, 6),  # stride 0 along the batch
    }


@pytest.mark.parametrize('layout', list(strided_inputs()))
def test_strided_inputs(layout, small_blocks):
    h = strided_inputs()[layout]
    mask = torch.rand(5, 8, generator=torch.Generator().manual_seed(5)) < 0.7
    for name, f in FUNCS.items():
        for m in (None, mask):
            x = h.detach().clone().requires_grad_() if layout == 'contiguous' else h.detach().requires_grad_()
            torch.testing.assert_close(f(x, m).double(), REFS[name](h, m), rtol=1e-6, atol=1e-7)
            g, = torch.autograd.grad(f(x, m), x)
            hd = h.detach().double().requires_grad_()
            want, = torch.autograd.grad(REFS[name](hd, m), hd)
            torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-7)


def test_compiled_aot_eager_one_graph_same_values():
    """Inside a compiled function the penalties trace as plain ops (no graph break: fullgraph) for every layout,
    and give the eager values and gradients (aot_eager traces forward and backward as inductor does, without
    generating code; the other layouts are covered eagerly above)"""
    mask = torch.rand(5, 8, generator=torch.Generator().manual_seed(6)) < 0.7
    hs = strided_inputs()
    cases = [(hs['lstm-inductor'], mask, 1, 'lstm-inductor'), (hs['expanded'], None, 1, 'expanded'),
             (hs['lstm-inductor'].transpose(0, 1), mask.t(), 0, 'sequence-first')]
    torch.compiler.reset()
    with torch._dynamo.config.patch(recompile_limit=len(cases)):  # each layout compiles once
        for h, m, seq_dim, layout in cases:
            def both(h, m): return 2 * ar_penalty(h, m, seq_dim) + tar_penalty(h, m, seq_dim)
            compiled = torch.compile(both, backend='aot_eager', fullgraph=True)
            x = h.detach().requires_grad_()
            eager, = torch.autograd.grad(val := both(x, m), x)
            comp, = torch.autograd.grad(cval := compiled(x, m), x)
            torch.testing.assert_close(cval, val, msg=layout)
            torch.testing.assert_close(comp, eager, msg=layout)


def test_compiled_dynamic_shapes_compile_once():
    "Batch and sequence sizes that change from call to call compile once per mask variant (no recompile per shape)"
    def both(h, m): return 2 * ar_penalty(h, m) + tar_penalty(h, m)
    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(both, backend='aot_eager', fullgraph=True, dynamic=True)
    for bs, sl in ((4, 7), (3, 7), (2, 5)):
        for m in (None, torch.rand(bs, sl) < .7):
            h = torch.randn(bs, sl, 5, requires_grad=True)
            got, want = compiled(h, m), both(h, m)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(want, h)[0])
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == 2  # with and without a mask


def test_compiled_inductor():
    """Default backend, on a batch-first view of sequence-first storage (strides (H, B*H, 1), what inductor hands a
    hook on `nn.LSTM(batch_first=True)`): the eager value and gradients"""
    if not any(shutil.which(c) for c in ('g++', 'c++', 'clang++')): pytest.skip('inductor needs a C++ compiler')
    torch.manual_seed(7)
    lin = nn.Linear(4, 6)
    x = torch.randn(10, 3, 4)  # sl x bs x features
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = mask[2, :3] = False

    def loss(x):
        out = torch.tanh(lin(x)).transpose(0, 1)  # bs x sl x n_hid, sequence-first in memory
        return 2 * ar_penalty(out, mask) + tar_penalty(out, mask)
    compiled = torch.compile(loss, fullgraph=True)
    want = loss(x)
    want_grads = torch.autograd.grad(want, list(lin.parameters()))
    got = compiled(x)
    got_grads = torch.autograd.grad(got, list(lin.parameters()))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads): torch.testing.assert_close(a, b)


# --- channels-first outputs and the fused pair, on every path ------------------------------------------------
def fused_both(h, mask=None, seq_dim=1, feature_dim=-1):
    "2*AR + TAR of one tensor, through the fused pair (one node)"
    (a, na), (t, nt) = tf.ar_tar_sum_count(h, h, mask, mask, seq_dim, feature_dim)
    return 2 * tf.mean_of(a, na) + tf.mean_of(t, nt)


CF = {  # batch x features x time, the mask batch x time
    'ar': (lambda h, m, sd, fd: ar_penalty(h, m, sd, fd), lambda h, m: ref_ar(h.transpose(1, 2), m)),
    'tar': (lambda h, m, sd, fd: tar_penalty(h, m, sd, fd), lambda h, m: ref_tar(h.transpose(1, 2), m)),
    'fused': (lambda h, m, sd, fd: fused_both(h, m, sd, fd),
              lambda h, m: 2 * ref_ar(h.transpose(1, 2), m) + ref_tar(h.transpose(1, 2), m)),
}


@pytest.mark.parametrize('name', list(CF))
@pytest.mark.parametrize('masked', [False, True])
def test_channels_first_on_every_path(name, masked, small_blocks):
    """Eager (blocked), gradgradcheck, torch.func (grad, jacrev, vmap, jvp), forward AD, with the axes given as a
    numpy integer and a 0-d tensor; and a compiled graph (with int axes: a tensor axis would be data to dynamo)"""
    ours, ref = CF[name]
    f = lambda x, m: ours(x, m, torch.tensor(-1), np.int64(1))
    g = torch.Generator().manual_seed(9)
    h = torch.randn(3, 4, 7, dtype=torch.float64, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.7 if masked else None
    torch.testing.assert_close(f(h, mask), ref(h, mask))
    torch.testing.assert_close(grad(lambda x: f(x, mask))(h), grad(lambda x: ref(x, mask))(h))
    x = h.clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(f(x, mask), x)[0], grad(lambda x: ref(x, mask))(h))
    assert torch.autograd.gradgradcheck(lambda x: f(x, mask), (x,))
    torch.testing.assert_close(jacrev(lambda x: f(x, mask))(h), jacrev(lambda x: ref(x, mask))(h))
    assert_per_sample_grads(f, ref, h, mask)
    u = torch.randn_like(h)
    torch.testing.assert_close(jvp(lambda x: f(x, mask), (h,), (u,)), jvp(lambda x: ref(x, mask), (h,), (u,)))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = fwAD.unpack_dual(f(fwAD.make_dual(h, u), mask))
    torch.testing.assert_close((out.primal, out.tangent), jvp(lambda x: ref(x, mask), (h,), (u,)))
    torch.compiler.reset()
    compiled = torch.compile(lambda x: ours(x, mask, 2, 1), backend='aot_eager', fullgraph=True)
    x = h.clone().requires_grad_()
    val = compiled(x)
    torch.testing.assert_close(val, ref(h, mask))
    torch.testing.assert_close(torch.autograd.grad(val, x)[0], grad(lambda x: ref(x, mask))(h))


def test_fused_pair_second_order_with_two_tensors(small_blocks):
    "A gradient penalty through AR of one tensor and TAR of another, both made by one LSTM: the plain formula's"
    lstm, x, mask = lstm_data(2)
    params = list(lstm.parameters())

    def gp_grads(pair):
        out, _ = lstm(x)
        dropped = out * 0.5
        loss = pair(dropped, out)
        gx, = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), params)

    def ours(d, r):
        (a, na), (t, nt) = tf.ar_tar_sum_count(d, r, mask, mask)
        return 2 * tf.mean_of(a, na) + tf.mean_of(t, nt)
    for got, want in zip(gp_grads(ours), gp_grads(lambda d, r: 2 * ref_ar(d, mask) + ref_tar(r, mask))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
