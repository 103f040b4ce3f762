"""Shared test helpers: tiny fastai text models and in-memory data (small enough for 2 CPU cores), the float64
references every penalty is checked against, and the test's own hooks and spies."""
import gc
import os
import random
import weakref
from functools import cache, partial

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from fastai.text.all import (AWD_LSTM, CancelFitException, Callback, DataLoaders, Datasets, ItemGetter,
                             awd_lstm_clas_config, awd_lstm_lm_config, get_language_model, pad_input_chunk)
from fastai.text.models.core import SentenceEncoder

from fastai_tar.book import human_numbers_dls

VOCAB, BS, SL = 30, 4, 12
PAD = 1  # fastai's padding token id (`xxpad`); the data below never uses 0 or 1 as a token
RTOL, ATOL = 1e-5, 1e-6  # a penalty read as loss_grad - loss: two float32 numbers near the loss


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    "Tiny models on 2 cores: a second intra-op thread only adds contention (a 10 ms fit took 2 s with two)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- global torch state: no test may leave it behind -------------------------------------------------------------
def _autocast_nesting():
    "How many autocast contexts are open (torch has no getter: one level up and back down)."
    n = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return n


def _set_autocast_nesting(n):
    now = _autocast_nesting()
    for _ in range(now - n): torch.autocast_decrement_nesting()
    for _ in range(n - now): torch.autocast_increment_nesting()
    if n == 0: torch.clear_autocast_cache()  # what leaving the outermost autocast does


# (name, read, write) of each process-wide setting a test could change and forget. A test that raised inside
# fastai's MixedPrecision once left CPU autocast on, and every later LSTM of the session ran in bf16.
TORCH_STATE = [
    *[(f'autocast {d}', partial(torch.is_autocast_enabled, d), partial(torch.set_autocast_enabled, d))
      for d in ('cpu', 'cuda')],
    *[(f'autocast {d} dtype', partial(torch.get_autocast_dtype, d), partial(torch.set_autocast_dtype, d))
      for d in ('cpu', 'cuda')],
    ('autocast cache', torch.is_autocast_cache_enabled, torch.set_autocast_cache_enabled),
    # an autocast entered and never left also stays counted: its weight cache would then never be cleared
    ('autocast nesting', _autocast_nesting, _set_autocast_nesting),
    ('default dtype', torch.get_default_dtype, torch.set_default_dtype),
    ('grad mode', torch.is_grad_enabled, torch.set_grad_enabled),
    ('anomaly detection', torch.is_anomaly_enabled, torch.set_anomaly_enabled),
    ('deterministic algorithms', lambda: (torch.are_deterministic_algorithms_enabled(),
                                          torch.is_deterministic_algorithms_warn_only_enabled()),
     lambda v: torch.use_deterministic_algorithms(v[0], warn_only=v[1])),
    ('cudnn flags', lambda: (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                             torch.backends.cudnn.deterministic),
     lambda v: setattr(torch.backends.cudnn, 'enabled', v[0]) or setattr(torch.backends.cudnn, 'benchmark', v[1])
     or setattr(torch.backends.cudnn, 'deterministic', v[2])),
    ('mkldnn enabled', lambda: torch.backends.mkldnn.enabled, lambda v: setattr(torch.backends.mkldnn, 'enabled', v)),
    ('float32 matmul precision', torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    ('num threads', torch.get_num_threads, torch.set_num_threads),
]


def torch_state() -> dict:
    "The current value of every setting in `TORCH_STATE`."
    return {name: read() for name, read, _ in TORCH_STATE}


def restore_torch_state(before: dict) -> list:
    "Put back every setting of `before` (from `torch_state`) that differs now; the `(name, left, restored)` of each."
    changed = [(name, read(), before[name]) for name, read, _ in TORCH_STATE if read() != before[name]]
    write = {name: w for name, _, w in TORCH_STATE}
    for name, _, value in changed: write[name](value)
    return changed


@pytest.fixture(autouse=True)
def clean_torch_state():
    """Each test starts from the same global torch state and the same random streams, and fails if it left a
    setting changed (after putting it back, so that the next test is not hit too). The random streams are only put
    back: a test may draw from them, but the next one should not depend on how much it drew."""
    before = torch_state()
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(rngs[0]); random.setstate(rngs[1]); np.random.set_state(rngs[2])
    changed = restore_torch_state(before)
    if changed:
        pytest.fail("the test left global torch state behind (now restored): " +
                    "; ".join(f"{name} = {now!r}, was {was!r}" for name, now, was in changed), pytrace=False)


# --- what this CPU can do ----------------------------------------------------------------------------------------
NO_BF16_ENV = 'FASTAI_TAR_TEST_NO_BF16'  # set to 1 to run the suite as on a CPU without bf16 (the skips show)


def probe_bf16_autocast_lstm():
    """None if an LSTM runs forward and backward under CPU bf16 autocast here, else why not. oneDNN needs
    AVX-512 with bf16 (or AMX) for it; on an AVX2-only CPU it raises 'could not create a primitive descriptor
    for the LSTM forward propagation primitive'."""
    with torch.random.fork_rng(), torch.enable_grad():
        lstm, x = torch.nn.LSTM(4, 4, batch_first=True), torch.randn(2, 3, 4)
        try:
            with torch.autocast('cpu', dtype=torch.bfloat16): out = lstm(x)[0]
            out.float().sum().backward()
        except RuntimeError as e:
            return f"this CPU cannot run an LSTM under bf16 autocast: {str(e).splitlines()[0]}"
    if out.dtype != torch.bfloat16: return f"bf16 autocast ran an LSTM in {out.dtype}"
    return None


@cache
def bf16_autocast_unsupported():
    "`probe_bf16_autocast_lstm`, once per session, or the reason given by the environment variable `NO_BF16_ENV`."
    if os.environ.get(NO_BF16_ENV, '') not in ('', '0'):
        return f"{NO_BF16_ENV} is set: running as on a CPU without bf16"
    return probe_bf16_autocast_lstm()


def require_bf16_autocast():
    "Skip the calling test, with the reason, where an LSTM cannot run under CPU bf16 autocast."
    reason = bf16_autocast_unsupported()
    if reason: pytest.skip(reason)


# --- models and data ---------------------------------------------------------------------------------------------
def tiny_config(clas=False, **kw):
    "An AWD-LSTM config a few hundred parameters wide; dropout stays on (weight_p=0 breaks ModelResetter)."
    cfg = (awd_lstm_clas_config if clas else awd_lstm_lm_config).copy()
    cfg.update(emb_sz=8, n_hid=12, n_layers=2, **kw)
    return cfg


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return get_language_model(AWD_LSTM, VOCAB, config=tiny_config(**kw))


def _vocab(): return [f'w{i}' for i in range(VOCAB)]


@pytest.fixture(scope='module')
def book_dls():
    """The fastai book's chapter 12 data, tiny: the numbers 1 to 300 in words, 8 streams of 8 tokens
    (14 batches an epoch)."""
    return human_numbers_dls(upto=300, bs=8, sl=8)


def lm_dls(n=16, bs=BS, sl=SL, seed=0, n_valid=None, rows=slice(None)):
    """In-memory language-model DataLoaders, y = x shifted by one token: training on the sequences `rows` of the
    first `n`, validation on `n_valid` further sequences, or (None) on the first `bs`. Built from `Datasets`, so
    that `learn.export()` can empty them; `dls.vocab` as fastai's text learners expect."""
    n_all = n + (n_valid or 0)
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(PAD + 1, VOCAB, (n_all * (sl + 1),), generator=g).view(n_all, sl + 1)
    items = list(zip(stream[:, :-1], stream[:, 1:]))
    valid = list(range(n, n_all)) if n_valid else list(range(bs))
    dsets = Datasets(items, [[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n))[rows], valid])
    dls = dsets.dataloaders(bs=bs, shuffle=False, device='cpu', num_workers=0)
    dls.vocab = _vocab()
    return dls


def clas_dls(lengths, seq_len, seed=0):
    """In-memory classifier DataLoaders batched as fastai batches text: one batch of sequences of `lengths`, longest
    first (fastai's `SortedDL`), padded by fastai's `pad_input_chunk` (whole `seq_len` chunks of padding first).
    Labels alternate 0, 1; `dls.vocab` and `dls.c` as `text_classifier_learner` reads them."""
    assert list(lengths) == sorted(lengths, reverse=True), "fastai sorts a classifier batch longest first"
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randint(PAD + 1, VOCAB, (n,), generator=g), torch.tensor(i % 2)) for i, n in enumerate(lengths)]
    pad = partial(pad_input_chunk, pad_idx=PAD, pad_first=True, seq_len=seq_len)
    dls = DataLoaders.from_dsets(items, items, bs=len(items), shuffle=False, before_batch=pad, device='cpu',
                                 num_workers=0)
    dls.vocab, dls.c = _vocab(), 2
    return dls


# --- float64 references -----------------------------------------------------------------------------------------
def ref_sums(h, valid=None, seq_dim=1):
    """float64 (sum of squares, its count, sum of squared steps, its count) of `h` over its real positions.
    `valid` (shape h.shape[:-1], True = real) keeps a position for AR and a pair of neighbours along `seq_dim`
    for TAR only when both are real; every feature counts."""
    h = h.detach().double().movedim(seq_dim, -2)
    valid = torch.ones(h.shape[:-1], dtype=torch.bool) if valid is None else valid.movedim(seq_dim, -1)
    pairs = valid[..., 1:] & valid[..., :-1]
    sq = (h.pow(2).sum(-1) * valid).sum()
    d2 = ((h[..., 1:, :] - h[..., :-1, :]).pow(2).sum(-1) * pairs).sum()
    return sq, valid.sum() * h.shape[-1], d2, pairs.sum() * h.shape[-1]


def ref_penalty(alpha, beta, *parts, seq_dim=1):
    """alpha*AR + beta*TAR of the same activations pooled over `parts` (tensors, or (h, valid) pairs): the total
    sums over the total counts, as for a module called several times in one forward, in float64. A zero
    coefficient leaves its term out (as the callback does), so that an empty TAR does not turn it into NaN."""
    parts = [p if isinstance(p, tuple) else (p, None) for p in parts]
    assert all(h.is_floating_point() for h, _ in parts), "pass (h, valid) pairs, not h and valid"
    sq, n_sq, d2, n_d2 = (sum(x) for x in zip(*(ref_sums(h, v, seq_dim) for h, v in parts)))
    return float((alpha * sq / n_sq if alpha else 0.) + (beta * d2 / n_d2 if beta else 0.))


def ref_ar(h, valid=None, seq_dim=1):
    "Merity's AR in float64: the mean of h**2 over the real positions of `h`."
    return ref_penalty(1., 0., (h, valid), seq_dim=seq_dim)


def ref_tar(h, valid=None, seq_dim=1):
    "Merity's TAR in float64: the mean of (h[t+1]-h[t])**2 over the pairs of real steps of `h`."
    return ref_penalty(0., 1., (h, valid), seq_dim=seq_dim)


def penalty(expected):
    "The added penalty is read as loss_grad - loss, two float32 numbers near the loss: a few ulps of it are the limit."
    return pytest.approx(expected, rel=RTOL, abs=ATOL)


def far(wrong, expected):
    "`wrong` misses `penalty`'s tolerance by more than 10x: a check with `penalty` can tell it from `expected`."
    return abs(wrong - expected) > 10 * (RTOL * abs(expected) + ATOL)


# --- the test's own hooks and callbacks ---------------------------------------------------------------------------
def hook_ids(model):
    "Every forward (pre-)hook on every module of `model`."
    return {(name, kind, hid) for name, m in model.named_modules()
            for kind, hooks in (('fwd', m._forward_hooks), ('pre', m._forward_pre_hooks)) for hid in hooks}


def quiet_fit(learn, n_epoch=1, lr=1e-2, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, lr, **kw)


class Capture:
    """The test's own forward hook on `module`: each output as `(h, valid)` (detached; `valid` says which positions
    are real where the output carries it: a SentenceEncoder's padding mask, a PackedSequence's lengths), whether
    the module was training, a weakref to `h` and how many forward hooks the module carried. keep=False keeps
    only the weakrefs."""
    def __init__(self, module, keep=True):
        self.keep, self.records, self.refs, self.hooks_seen = keep, [], [], []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inp, out):
        self.hooks_seen.append(len(module._forward_hooks))
        h, valid = out, None
        if isinstance(module, SentenceEncoder): h, valid = out[0], ~out[1]  # (outs, pad_mask)
        elif isinstance(out, tuple) and not isinstance(out, PackedSequence): h = out[0]  # an RNN's (output, state)
        self.refs.append(weakref.ref(h.data if isinstance(h, PackedSequence) else h))
        if not self.keep: return
        if isinstance(h, PackedSequence):
            h, lengths = pad_packed_sequence(h, batch_first=True)
            valid = torch.arange(h.shape[1])[None] < lengths[:, None]
        self.records.append((h.detach().clone(), valid, module.training))  # a copy: later in-place ops leave it

    @property
    def parts(self): return [(h, v) for h, v, _ in self.records]
    @property
    def outputs(self): return [h for h, _, _ in self.records]
    @property
    def train_outputs(self): return [h for h, _, training in self.records if training]
    @property
    def valid_outputs(self): return [h for h, _, training in self.records if not training]

    def alive(self):
        gc.collect()
        return [r for r in self.refs if r() is not None]


class LossSpy(Callback):
    """After every callback's after_loss, in training and validation: the plain loss and loss_grad of each batch
    (what a callback added is their difference) and fastai's pct_train; cancels the fit after `stop` training
    batches."""
    order, run_valid = 50, True

    def __init__(self, stop=None): self.stop, self.rows = stop, []

    def after_loss(self):
        pct = self.learn.pct_train if self.training else None
        self.rows.append((self.training, self.learn.loss.detach().clone(), self.learn.loss_grad.detach().clone(), pct))

    def after_batch(self):
        if self.training and self.stop and len(self.train) >= self.stop: raise CancelFitException()

    @property
    def train(self): return [(loss, grad) for training, loss, grad, _ in self.rows if training]
    @property
    def plain(self): return [loss.item() for loss, _ in self.train]
    @property
    def added(self): return [(grad - loss).item() for loss, grad in self.train]
    @property
    def pct(self): return [pct for training, _, _, pct in self.rows if training]
    @property
    def valid_added(self): return [(grad - loss).item() for training, loss, grad, _ in self.rows if not training]


class Boom(Callback):
    "Raise `exc` in after_batch of the `at`-th training batch."
    def __init__(self, exc, at=2): self.exc, self.at, self.n = exc, at, 0

    def after_batch(self):
        if not self.training: return
        self.n += 1
        if self.n == self.at: raise self.exc


class AliveAfterBatch(Callback):
    "After every batch (and every earlier callback's after_batch), count the activations `caps` saw that are alive"
    order = 60

    def __init__(self, caps): self.caps, self.alive, self.phases = caps, [], []

    def after_batch(self):
        gc.collect()
        self.alive.append(sum(r() is not None for c in self.caps for r in c.refs))
        self.phases.append('train' if self.training else 'valid')
