"""TARCallback inside real fastai training set-ups (issue 4): half precision, gradient accumulation, wrapped
models, the callback's lifecycle, export, memory, and modules called several times in one forward."""
import gc
import os
import socket
import weakref
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.amp import GradScaler, autocast
from fastai.text.all import (AWD_LSTM, SGD, CancelFitException, Callback, CrossEntropyLossFlat, DataLoaders, Datasets,
                             GradientAccumulation, ItemGetter, L, Learner, MixedPrecision, get_text_classifier,
                             load_learner)

from fastai_tar import TARCallback
from conftest import VOCAB, tiny_config, tiny_lm


@pytest.fixture(autouse=True)
def one_thread():
    "Models this small run ~100x slower on two contended OpenMP threads than on one."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm_dls(n=16, bs=4, sl=12, seed=0, rows=slice(None)):
    "In-memory LM DataLoaders, y = x shifted by one, training on `rows`; Datasets, so that `export()` can empty them."
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(2, VOCAB, (n * (sl + 1),), generator=g).view(n, sl + 1)
    items = list(zip(stream[:, :-1], stream[:, 1:]))
    dsets = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n))[rows], list(range(bs))])
    return dsets.dataloaders(bs=bs, shuffle=False, device='cpu', num_workers=0)


class LSTMLM(nn.Module):
    "Embedding -> nn.LSTM -> Linear: no dropout, so two runs on the same data are the same computation."
    def __init__(self, emb=8, n_hid=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.lstm, self.head = nn.Embedding(VOCAB, emb), nn.LSTM(emb, n_hid, batch_first=True), \
            nn.Linear(n_hid, VOCAB)

    def forward(self, x): return self.head(self.lstm(self.emb(x))[0])


class Grab(Callback):
    "Keep (loss, loss_grad) of each training batch once every callback has edited it; stop after `n` batches."
    order = 50

    def __init__(self, n=1): self.n, self.rows = n, []

    def after_loss(self):
        if self.training: self.rows.append((self.learn.loss.detach().clone(), self.learn.loss_grad.detach().clone()))

    def after_batch(self):
        if self.training and len(self.rows) >= self.n: raise CancelFitException()

    @property
    def added(self): return [(g - l).item() for l, g in self.rows]


class Capture:
    "The test's own forward hook on `module`: the outputs it produced (or only weakrefs), and the hooks it carried."
    def __init__(self, module, keep=True):
        self.keep, self.outputs, self.refs, self.hooks_seen = keep, [], [], []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inp, out):
        h = out[0] if isinstance(out, tuple) else out  # (output, state) of an RNN, (outs, pad) of a SentenceEncoder
        self.hooks_seen.append(len(module._forward_hooks))
        self.refs.append(weakref.ref(h))
        if self.keep: self.outputs.append(h.detach())

    def alive(self):
        gc.collect()
        return [r for r in self.refs if r() is not None]


def fit(learn, n_epoch=1, lr=1e-2, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, lr, **kw)


def hook_ids(model):
    "Every forward (pre-)hook on every module of `model`."
    return {(name, kind, hid) for name, m in model.named_modules()
            for kind, hooks in (('fwd', m._forward_hooks), ('pre', m._forward_pre_hooks)) for hid in hooks}


def ref_sums(h, valid=None):
    "float64 (sum of squares, their count, sum of squared steps, their count) of batch-first `h` over valid steps."
    h = h.double()
    valid = torch.ones(h.shape[:2], dtype=torch.bool) if valid is None else valid
    pairs = valid[:, 1:] & valid[:, :-1]
    sq = (h.pow(2).sum(-1) * valid).sum()
    d2 = ((h[:, 1:] - h[:, :-1]).pow(2).sum(-1) * pairs).sum()
    return sq, valid.sum() * h.shape[-1], d2, pairs.sum() * h.shape[-1]


def ref_penalty(alpha, beta, *parts):
    "alpha*AR + beta*TAR pooled over `parts` ((h, valid) pairs): total sums over total counts, in float64."
    sq, n_sq, d2, n_d2 = (sum(x) for x in zip(*(ref_sums(*p) for p in parts)))
    return (alpha * sq / n_sq + beta * d2 / n_d2).item()


def close(value, expected):
    "The tolerance of a penalty read as loss_grad - loss: two float32 numbers near the loss."
    return value == pytest.approx(expected, rel=1e-5, abs=1e-6)


def far(wrong, expected):
    "`wrong` misses `close`'s tolerance by more than 10x: a check with `close` can tell it from `expected`."
    return abs(wrong - expected) > 10 * (1e-5 * abs(expected) + 1e-6)


def flat_params(model): return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def zero_loss(pred, *yb):
    "A float32 loss of 0 (fastai's Recorder fails on a half loss): loss_grad is then the added penalty itself."
    return pred.float().sum() * 0


# --- mixed precision ---------------------------------------------------------------------------------------------
class RecordingScaler(GradScaler):
    "A CPU GradScaler that keeps what it is asked to scale."
    def __init__(self, events, **kw): super().__init__('cpu', **kw); self.events, self.seen = events, []

    def scale(self, outputs):
        self.events.append('scaler.scale'); self.seen.append(outputs.detach().clone())
        return super().scale(outputs)


class CPUMixedPrecision(MixedPrecision):
    "fastai's MixedPrecision with CPU autocast (bf16: oneDNN has no fp16 LSTM) and an enabled CPU GradScaler."
    def __init__(self, scaler=None, **kw): super().__init__(**kw); self.cpu_scaler = scaler

    def before_fit(self):  # fastai's before_fit builds the CUDA ones; every other event is fastai's own code
        self.autocast, self.scales = autocast('cpu', dtype=torch.bfloat16), L()
        self.learn.scaler = self.cpu_scaler or GradScaler('cpu', init_scale=2. ** 8)


@pytest.mark.parametrize('mode', ['bf16 model', 'fp16 model', 'bf16 autocast'])
def test_half_activations_penalty_in_float32(mode):
    "Half activations: the added penalty equals the float64 formula on the very half tensors to float32 rounding."
    model, cbs = LSTMLM(), []
    if mode == 'bf16 autocast': cbs.append(CPUMixedPrecision())
    else: model = model.to(torch.bfloat16 if mode == 'bf16 model' else torch.float16)
    cap, grab = Capture(model.lstm), Grab()
    learn = Learner(lm_dls(), model, loss_func=zero_loss, opt_func=SGD, cbs=cbs + [TARCallback(2., 1.), grab])
    fit(learn)
    h = cap.outputs[0]
    assert h.dtype == (torch.float16 if mode == 'fp16 model' else torch.bfloat16)
    assert grab.rows[0][1].item() == pytest.approx(ref_penalty(2., 1., (h, None)), rel=1e-6)
    # TAR alone, against what the test rules out: steps taken in half precision (fastai's RNNRegularizer).
    _, _, d2, n = ref_sums(h)
    tar = (d2 / n).item()
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
    events, scale = [], 2. ** 8
    scaler = RecordingScaler(events, init_scale=scale)
    model, tar, grab, after = LSTMLM(), TARCallback(2., 1.), Grab(n=2), ScaledLoss()
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[tar, CPUMixedPrecision(scaler), grab, after])
    tar_after_loss = tar.after_loss
    tar.after_loss = lambda: (events.append('tar.after_loss'), tar_after_loss())
    before = flat_params(model)
    fit(learn)
    assert events == ['tar.after_loss', 'scaler.scale'] * 2
    assert all(h.dtype == torch.bfloat16 for h in cap.outputs)  # autocast did run the LSTM in bf16
    assert len(grab.rows) == len(cap.outputs) == len(scaler.seen) == len(after.seen) == 2
    for (loss, _), h, unscaled, scaled in zip(grab.rows, cap.outputs, scaler.seen, after.seen):
        penalty = ref_penalty(2., 1., (h, None))
        assert penalty > 1e-3
        assert unscaled.item() == pytest.approx(loss.item() + penalty, rel=1e-6)  # the scaler saw the penalty
        assert scaled.item() == pytest.approx(scale * unscaled.item(), rel=1e-6)
    assert not torch.equal(flat_params(model), before)  # the scaler let the steps through


# --- gradient accumulation ---------------------------------------------------------------------------------------
def sgd_step(model, dls, cbs):
    "The parameter change of one epoch of plain SGD (lr=1: the step is the gradient) of `model` on `dls`."
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=cbs)
    before = flat_params(model)
    fit(learn, lr=1.)
    return flat_params(model) - before


def sgd_update(alpha, beta, bs, n_acc=None, n=6):
    "The parameter change of one SGD step on `n` sequences, in micro-batches of `bs` when `n_acc` is set."
    cbs = [TARCallback(alpha, beta)] + ([GradientAccumulation(n_acc)] if n_acc else [])
    return sgd_step(LSTMLM(), lm_dls(n=n, bs=bs), cbs)


def test_gradient_accumulation_matches_one_big_batch():
    "fastai's GradientAccumulation over 3 micro-batches of 2 takes the step of one batch of 6, penalty included."
    big, acc = sgd_update(2., 1., bs=6), sgd_update(2., 1., bs=2, n_acc=6)
    tol = 1e-5 * big.abs().max().item()
    torch.testing.assert_close(acc, big, rtol=0, atol=tol)
    # Not true by construction: the penalty moves the step by far more than the tolerance, so adding it
    # after GradientAccumulation's rescaling (k times over) would fail the check above.
    assert (big - sgd_update(0., 0., bs=6)).abs().max().item() > 1000 * tol


# --- lifecycle: no hook and no activation of ours survives a fit, however it ends ---------------------------------
class Boom(Callback):
    "Raise `exc` in after_batch of the `at`-th training batch."
    def __init__(self, exc, at=2): self.exc, self.at, self.n = exc, at, 0

    def after_batch(self):
        if not self.training: return
        self.n += 1
        if self.n == self.at: raise self.exc


def lifecycle_learner(**kw):
    "A learner whose LSTM carries the test's own weakref hook; returns (learn, capture, hooks before any fit)."
    model = LSTMLM()
    cap = Capture(model.lstm, keep=False)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback(**kw))
    return learn, cap, hook_ids(model)


def assert_clean(learn, cap, hooks):
    "No hook of ours left on the model and no activation kept; and the callback did hook while it ran."
    assert hook_ids(learn.model) == hooks
    assert cap.refs and max(cap.hooks_seen) > 1  # TARCallback's hook sat next to ours during the forward
    assert cap.alive() == []


def test_no_hook_or_activation_after_normal_fit():
    learn, cap, hooks = lifecycle_learner(valid_metrics=True)
    fit(learn)
    assert_clean(learn, cap, hooks)


@pytest.mark.parametrize('exc', [RuntimeError('boom'), CancelFitException()], ids=['error', 'cancel_fit'])
def test_no_hook_or_activation_after_fit_is_interrupted(exc):
    "Another callback raising in after_batch (an error, or CancelFitException) leaves nothing behind."
    learn, cap, hooks = lifecycle_learner()
    if isinstance(exc, CancelFitException): fit(learn, cbs=Boom(exc))
    else:
        with pytest.raises(RuntimeError, match='boom'): fit(learn, cbs=Boom(exc))
    assert len(cap.refs) == 2
    assert_clean(learn, cap, hooks)
    grab = Grab()  # the next fit still applies the penalty
    fit(learn, cbs=grab)
    assert grab.added[0] > 1e-3


def test_no_hook_after_exception_in_forward():
    "A forward pass that raises after the hooked module ran: the always-call root hook still removes ours."
    class Fails(nn.Module):
        def forward(self, x): raise ValueError('bad forward')
    learn, cap, hooks = lifecycle_learner()
    learn.model.head = Fails()
    with pytest.raises(ValueError, match='bad forward'): fit(learn)
    assert_clean(learn, cap, hooks)


def test_ten_fits_leave_nothing_behind():
    learn, cap, hooks = lifecycle_learner(valid_metrics=True)
    for _ in range(10):
        fit(learn)
        assert hook_ids(learn.model) == hooks
    assert_clean(learn, cap, hooks)
    assert [m.name for m in learn.metrics] == []  # the fit-table columns went with each fit
    assert len(learn.tar.history) == len(learn.dls.train)  # the history is the last fit's


def test_remove_cb_mid_session():
    "learn.remove_cb(learn.tar) between fits: no hook then, and the next fit adds nothing."
    learn, cap, hooks = lifecycle_learner()
    fit(learn)
    learn.remove_cb(learn.tar)
    assert hook_ids(learn.model) == hooks and not hasattr(learn, 'tar')
    n_seen, grab = len(cap.hooks_seen), Grab()
    fit(learn, cbs=grab)
    assert grab.added == [0.]
    assert max(cap.hooks_seen[n_seen:]) == 1  # only the test's own hook ran in that forward
    assert_clean(learn, cap, hooks)


# --- memory: no activation outlives its batch ---------------------------------------------------------------------
class AliveAfterBatch(Callback):
    "After every batch (and every callback's after_batch), count the captured activations still alive."
    order = 60

    def __init__(self, caps): self.caps, self.alive, self.phases = caps, [], []

    def after_batch(self):
        gc.collect()
        self.alive.append(sum(r() is not None for c in self.caps for r in c.refs))
        self.phases.append('train' if self.training else 'valid')


def test_no_activation_outlives_its_batch():
    "fastai AWD-LSTM LM, TAR on the encoder and AR on the output dropout, training and validation metrics."
    model = tiny_lm()
    caps = [Capture(model[0], keep=False), Capture(model[1].output_dp, keep=False)]
    probe = AliveAfterBatch(caps)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(valid_metrics=True), probe])
    fit(learn)
    assert probe.phases == ['train'] * 2 + ['valid']  # both phases captured (valid_metrics) and were checked
    assert [len(c.refs) for c in caps] == [3, 3]
    assert probe.alive == [0, 0, 0]
    row = dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))
    assert row['valid_ar'] > 0 and row['valid_tar'] > 0  # the validation activations were read before they went


# --- export -------------------------------------------------------------------------------------------------------
def test_export_load_learner_predict_and_fine_tune(tmp_path):
    learn = Learner(lm_dls(), LSTMLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback(2., 1.),
                    path=tmp_path)
    fit(learn)
    learn.export('tar.pkl')
    with pytest.warns(UserWarning, match='pickle'): loaded = load_learner(tmp_path / 'tar.pkl')
    assert isinstance(loaded.tar, TARCallback) and loaded.tar is not learn.tar
    dl = lm_dls(seed=1).valid
    preds, _ = loaded.get_preds(dl=dl)
    torch.testing.assert_close(preds, learn.get_preds(dl=dl)[0], rtol=0, atol=0)
    assert hook_ids(loaded.model) == set()

    loaded.dls = lm_dls(seed=2)  # fine-tuning the loaded learner applies the penalty again
    cap, grab = Capture(loaded.model.lstm), Grab()
    fit(loaded, cbs=grab)
    assert close(grab.added[0], ref_penalty(2., 1., (cap.outputs[0], None)))
    assert grab.added[0] > 1e-3
    assert hook_ids(loaded.model) == {('lstm', 'fwd', cap.handle.id)}  # the test's own hook only


# --- modules called several times in one forward --------------------------------------------------------------------
def test_sentence_encoder_tar_spans_bptt_chunks():
    "A classifier's SentenceEncoder runs the AWD_LSTM once per bptt chunk: TAR covers the joined sequence."
    bptt, sl, pad = 4, 12, 1
    x = torch.randint(2, VOCAB, (3, sl), generator=torch.Generator().manual_seed(0))
    x[1, :bptt], x[2, :2 * bptt] = pad, pad  # padded first and longest first, as fastai's classifier batches
    y = torch.tensor([0, 1, 0])
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=3, shuffle=False, device='cpu', num_workers=0)
    torch.manual_seed(0)
    model = get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=bptt, config=tiny_config(clas=True), max_len=sl)
    cap, grab = Capture(model[0].module), Grab()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(1., 4.), grab])
    fit(learn)
    assert [t.module for t in learn.tar.targets] == [model[0]] * 2  # hooked: the encoder, not the AWD_LSTM
    chunks = cap.outputs
    assert [c.shape[:2] for c in chunks] == [(1, bptt), (2, bptt), (3, bptt)]
    joined = torch.cat([nn.functional.pad(c, (0, 0, 0, 0, 0, 3 - len(c))) for c in chunks], 1)
    valid = x != pad
    expected = ref_penalty(1., 4., (joined, valid))
    assert close(grab.added[0], expected)
    # The pairs across chunk boundaries count: chunks taken one by one give another number.
    by_chunk = ref_penalty(1., 4., *[(c, valid[:len(c), i * bptt:(i + 1) * bptt]) for i, c in enumerate(chunks)])
    assert far(by_chunk, expected)


class TwoPassLSTM(LSTMLM):
    "One nn.LSTM run twice per forward, on the first 5 steps and on the other 7: a reused module."
    def forward(self, x):
        e = self.emb(x)
        return self.head(torch.cat([self.lstm(e[:, :5])[0], self.lstm(e[:, 5:])[0]], 1))


def test_named_module_called_twice_pools_both_calls():
    "The penalty of a module called twice is the sums of both calls over their total count, not the last call's."
    model = TwoPassLSTM()
    cap, grab = Capture(model.lstm), Grab()
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1., modules='lstm'), grab])
    fit(learn)
    a, b = cap.outputs
    assert (a.shape[1], b.shape[1]) == (5, 7)
    pooled = ref_penalty(2., 1., (a, None), (b, None))
    assert close(grab.added[0], pooled)
    last_only = ref_penalty(2., 1., (b, None))
    mean_of_means = (ref_penalty(2., 1., (a, None)) + last_only) / 2
    assert far(last_only, pooled) and far(mean_of_means, pooled)


# --- wrapped models ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('names', [None, ('module.lstm', 'lstm'), ('lstm', 'module.lstm')],
                         ids=['found', 'prefixed_tar', 'prefixed_ar'])
def test_data_parallel_model_hooks_inner_modules(names):
    "Through nn.DataParallel the inner LSTM is found, or named with or without the wrapper's 'module.' prefix."
    inner = LSTMLM()
    model = nn.DataParallel(inner)  # without GPUs it calls the module directly: the wrapping is what is tested
    kw = {} if names is None else dict(modules=[names[0]], ar_modules=[names[1]])
    cap, grab = Capture(inner.lstm), Grab()
    hooks = hook_ids(model)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(2., 1., **kw), grab])
    fit(learn)
    assert [(t.kind, t.name, t.module) for t in learn.tar.targets] == [('ar', 'lstm', inner.lstm),
                                                                        ('tar', 'lstm', inner.lstm)]
    assert close(grab.added[0], ref_penalty(2., 1., (cap.outputs[0], None)))
    assert hook_ids(model) == hooks


# --- multi-process data parallel: fastai's distrib_ctx calls .cuda(), so DDP is driven directly, on gloo/CPU ----
def _ddp_rank(rank, world, port, out):
    "One process of the DistributedDataParallel run: its half of the batch, one step; writes its update."
    torch.set_num_threads(1)
    loopback = next(n for _, n in socket.if_nameindex() if n.startswith('lo'))  # 'lo' on Linux, 'lo0' on macOS
    os.environ['GLOO_SOCKET_IFNAME'] = loopback  # gloo talks over 127.0.0.1 only
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        model = DistributedDataParallel(LSTMLM())
        half = lm_dls(n=4, bs=2, rows=slice(2 * rank, 2 * rank + 2))
        tar = TARCallback(2., 1., modules=['module.lstm'], ar_modules=['lstm'])  # names with and without 'module.'
        update = sgd_step(model, half, [tar])
        found = [(t.name, t.module is model.module.lstm) for t in tar.targets]
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
    whole = sgd_step(LSTMLM(), lm_dls(n=4, bs=4), [TARCallback(2., 1., modules=['lstm'])])
    tol = 1e-5 * whole.abs().max().item()
    for r in ranks:
        assert r['found'] == [('lstm', True), ('lstm', True)] and r['hooks'] == 0
        torch.testing.assert_close(r['update'], whole, rtol=0, atol=tol)
    # The penalty moves the step by far more than the tolerance: the check above sees it.
    off = sgd_step(LSTMLM(), lm_dls(n=4, bs=4), [TARCallback(0., 0.)])
    assert (whole - off).abs().max().item() > 1000 * tol
