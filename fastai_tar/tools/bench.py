"""Measure AR+TAR speed and memory against fastai's expressions, or the callback's cost in a training epoch.

Each row times, forward+backward on the same tensors: fastai's `RNNRegularizer` expressions (AR on a
dropped copy, TAR on the raw tensor), ours (`ar_tar_sum_count`, as the callback calls it), and one `h.clone()`, the
memory-traffic floor. The three take turns within every repeat, so that load on the machine hits them
alike, and are reported as medians. After all rows, the same expressions under `torch.compile` (the
strongest peer), and ours compiled, are timed for each row, their first call, which compiles, apart.
The bytes each keeps saved for backward beyond its inputs are counted with
`torch.autograd.graph.saved_tensors_hooks`. The rows are timed in a child process whose glibc keeps the memory
it frees (`KEEP_FREED`): otherwise each call's timing depends on what the allocator happened to return to the
system before it, by up to 2x at these sizes; `--allocator default` times them with glibc's defaults instead.
`--train` instead times training epochs with no penalty, with `TARCallback` and with a peer: AWD-LSTM
language-model epochs on synthetic text (the peer: fastai's `RNNRegularizer`), and a small time-series LSTM
classifier (the peer: fastai's expressions in a hand-written forward hook), where the penalty's fixed costs show.
"""
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .cli import UsageError, check_writable
from ..functional import ar_tar_sum_count, mean_of

__all__ = ['SHAPES', 'QUICK_SHAPES', 'fastai_penalty', 'our_penalty', 'saved_bytes', 'compile_naive', 'bench_row',
           'compiled_columns', 'bench_table', 'format_table', 'format_compile', 'train_epochs', 'SmallTSModel',
           'ts_train_epochs', 'format_train', 'KEEP_FREED', 'run']

SHAPES = [(64, 70, 400), (64, 70, 1152), (16, 512, 1024), (8, 2048, 2048)]  # bs x sl x n_hid
QUICK_SHAPES = [(4, 12, 16), (2, 30, 24)]
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
ALPHA, BETA = 2., 1.  # the AWD-LSTM / fastai defaults
COMPILE_BACKEND = 'inductor'  # torch.compile's default backend, the one a user gets


def fastai_penalty(raw, dropped, alpha=ALPHA, beta=BETA):
    "fastai's `RNNRegularizer.after_loss`: AR on the dropped output, TAR on the raw output (batch-first)"
    return alpha * dropped.float().pow(2).mean() + beta * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean()


def our_penalty(raw, dropped, alpha=ALPHA, beta=BETA):
    "The same penalty from `fastai_tar.functional`, as `TARCallback` takes it: both terms in one call, then the means"
    (ar, n_ar), (tar, n_tar) = ar_tar_sum_count(dropped, raw)
    return mean_of(ar, n_ar, alpha) + mean_of(tar, n_tar, beta)


def saved_bytes(
    fn,  # called as `fn(*inputs)`; builds an autograd graph
    *inputs,  # tensors (or None) that `fn` may keep for backward for free: they exist anyway
) -> int:
    "Bytes of the tensors `fn(*inputs)` keeps for backward beyond the storage of `inputs`, counted as they are saved"
    own = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    kept = {}  # storage address -> size: a storage saved twice (or through two views) counts once

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own: kept[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)  # noqa: F841 -- holding the graph keeps every saved storage alive while we count
        return sum(kept.values())


def _sync(device: torch.device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def _time_grad(fn, raw, dropped, device) -> float:
    "Seconds for `fn(raw, dropped)` and the gradients of both inputs"
    _sync(device)
    start = time.perf_counter()
    grads = torch.autograd.grad(fn(raw, dropped), (raw, dropped))
    _sync(device)
    secs = time.perf_counter() - start
    del grads  # freed after the clock stopped, for ours and fastai's alike
    return secs


def _time_clone(h, device) -> float:
    _sync(device)
    start = time.perf_counter()
    copy = h.clone()
    _sync(device)
    secs = time.perf_counter() - start
    del copy
    return secs


def compile_naive(raw, dropped, device, backend=None, penalty=fastai_penalty) -> tuple:
    """`torch.compile` of `penalty` (fastai's expressions), compiled for these tensors by a first forward+backward
    call, and that call's seconds; or None and why it failed (no C++ compiler, a Python the compiler does not
    support)"""
    torch.compiler.reset()  # each compiles afresh: its time is a first compile, not a recompile
    try:
        fn = torch.compile(penalty, backend=backend or COMPILE_BACKEND, dynamic=False)
        # nor a hit in inductor's on-disk caches, which an earlier bench filled (then a compile takes ~0.1 s)
        import torch._inductor.config as inductor_config
        with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "dynamo_pgo force disabled by ... force_disable_caches"
            return fn, _time_grad(fn, raw, dropped, device)
    except Exception as e:  # the bench reports a compiler that cannot run here and goes on with the other columns
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]  # dynamo's first line names the backend only
        return None, f'{type(e).__name__}: ' + ' '.join(lines[:2])[:300]


def _inputs(shape, dtype, device, seed):
    "The raw activation and AWD-LSTM's dropped copy of it (output dropout p=0.1: a separate tensor, as in the model)"
    g = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
    keep = torch.rand(shape, generator=g, device=device) >= 0.1
    return raw, (raw.detach() * keep / 0.9).requires_grad_()


def _medians(measure: dict, repeats: int) -> dict:
    "Median milliseconds of each `measure` callable, the callables taking turns"
    times = {k: [] for k in measure}
    for i in range(1 + repeats):  # the first round warms up
        for k, f in measure.items():
            # The second of two back-to-back calls is timed: it finds the memory its own kind of call
            # freed, as in a training loop, not what the previous column left.
            f()
            secs = f()
            if i >= 1: times[k].append(secs)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def bench_row(
    shape: tuple,  # bs x sl x n_hid
    dtype: torch.dtype = torch.float32,  # activation dtype
    repeats: int = 20,  # timed repeats; the medians are reported
    device='cpu',  # where the tensors live
    seed: int = 0,
) -> dict:
    "One table row: median milliseconds and saved bytes of fastai's expressions, ours and a clone"
    device = torch.device(device)
    raw, dropped = _inputs(shape, dtype, device, seed)
    ms = _medians({'fastai': lambda: _time_grad(fastai_penalty, raw, dropped, device),
                   'ours': lambda: _time_grad(our_penalty, raw, dropped, device),
                   'clone': lambda: _time_clone(raw, device)}, repeats)
    return dict(shape=list(shape), dtype=str(dtype).replace('torch.', ''), fastai_ms=ms['fastai'], ours_ms=ms['ours'],
                clone_ms=ms['clone'], speedup=ms['fastai'] / ms['ours'], ours_per_clone=ms['ours'] / ms['clone'],
                fastai_saved_bytes=saved_bytes(fastai_penalty, raw, dropped),
                ours_saved_bytes=saved_bytes(our_penalty, raw, dropped))


def compiled_columns(
    row: dict,  # a `bench_row` result, whose shape and dtype are compiled for
    repeats: int = 20,
    device='cpu',
    seed: int = 0,
) -> dict:
    """`row` with the median milliseconds of fastai's expressions under `torch.compile` and the seconds of that
    compile, and of ours compiled (as in a user's compiled model: the penalties trace as the same plain expressions).
    On one thread ours (eager) takes turns with them too, and `ours_per_compiled` compares the two timed in turns:
    load on the machine then hits both alike. (With more threads, the compiled kernels' spinning OpenMP threads
    would slow the eager ops: there it compares with the eager phase's `ours_ms`.)"""
    device = torch.device(device)
    raw, dropped = _inputs(tuple(row['shape']), DTYPES[row['dtype']], device, seed)
    compiled, compile_s = compile_naive(raw, dropped, device)
    if compiled is None:
        return dict(row, compiled_ms=None, ours_compiled_ms=None, ours_per_compiled=None, ours_in_turns_ms=None,
                    compile_s=None, compile_error=compile_s)
    ours = compile_naive(raw, dropped, device, penalty=our_penalty)[0]
    measure = {'compiled': lambda: _time_grad(compiled, raw, dropped, device),
               'ours': lambda: _time_grad(ours, raw, dropped, device)}
    in_turns = torch.get_num_threads() == 1
    if in_turns: measure['eager'] = lambda: _time_grad(our_penalty, raw, dropped, device)
    ms = _medians(measure, repeats)
    return dict(row, compiled_ms=ms['compiled'], ours_compiled_ms=ms['ours'],
                ours_per_compiled=(ms['eager'] if in_turns else row['ours_ms']) / ms['compiled'],
                ours_in_turns_ms=ms.get('eager'), compile_s=compile_s, compile_error=None)


def bench_table(shapes=SHAPES, dtypes=('float32', 'bfloat16'), repeats: int = 20, device='cpu') -> list[dict]:
    "`bench_row` for every shape and dtype, then its compiled column"
    rows = [bench_row(tuple(s), DTYPES[d], repeats, device) for d in dtypes for s in shapes]
    # Compiled kernels run on an OpenMP thread pool whose idle threads keep spinning: timed in turns with the eager
    # columns on 2 cores, they made ours 5-10x slower. So every compiled column is timed after all the eager ones.
    return [compiled_columns(r, repeats, device) for r in rows]


def _bytes(n: int) -> str:
    for unit in ('B', 'KB', 'MB'):
        if n < 1000 or unit == 'MB': return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000


def format_table(rows: list[dict]) -> str:
    "The rows as a Markdown table; '-' where `torch.compile` could not run"
    head = ['shape', 'dtype', 'fastai ms', 'compiled ms', 'ours ms', 'clone ms', 'speed-up', 'ours/compiled',
            'ours/clone', 'fastai saved', 'ours saved', 'ours compiled ms']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(['---'] * 2 + ['---:'] * 10) + '|']
    for r in rows:
        compiled = r.get('compiled_ms') is not None
        cells = ['x'.join(map(str, r['shape'])), r['dtype'], f"{r['fastai_ms']:.2f}",
                 f"{r['compiled_ms']:.2f}" if compiled else '-', f"{r['ours_ms']:.2f}", f"{r['clone_ms']:.2f}",
                 f"{r['speedup']:.1f}x", f"{r['ours_per_compiled']:.2f}" if compiled else '-',
                 f"{r['ours_per_clone']:.1f}", _bytes(r['fastai_saved_bytes']), _bytes(r['ours_saved_bytes']),
                 f"{r['ours_compiled_ms']:.2f}" if compiled else '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_compile(rows: list[dict]) -> str:
    "The seconds `torch.compile` spent on each row's first call, or why it could not run"
    done = [f"{'x'.join(map(str, r['shape']))} {r['dtype']} {r['compile_s']:.1f} s" for r in rows
            if r.get('compile_s') is not None]
    failed = sorted({r['compile_error'] for r in rows if r.get('compile_error')})
    lines = [f"compiled = torch.compile(backend={COMPILE_BACKEND!r}) of fastai's expressions (ours compiled: of ours, "
             "as inside a compiled model), timed after all eager columns and after a first call"
             + ("; ours/compiled compares ours timed in turns with compiled" if any(
                 r.get('ours_in_turns_ms') is not None for r in rows) else '')
             + "; that first call (compiling forward and backward) took: " + (', '.join(done) or 'none ran')]
    lines += [f'torch.compile could not run here: {e}' for e in failed]
    return '\n'.join(lines)


# --- a training epoch ---------------------------------------------------------------------------------
TRAIN_PRESETS = {  # AR/TAR read 32x70x400 activations, as in an AWD-LSTM LM of emb_sz 400; ~1.5 s an epoch on 2 cores
    'default': dict(epochs=6, bs=32, bptt=70, vocab=2000, emb_sz=400, n_hid=512, n_layers=2, batches=8),
    'quick': dict(epochs=2, bs=8, bptt=12, vocab=50, emb_sz=8, n_hid=16, n_layers=2, batches=4),
}
TS_PRESETS = {  # tsai's LSTM on 3 variables x 100 steps, hidden 64, batch 64: ~0.35 s an epoch on one core
    'default': dict(epochs=8, bs=64, c_in=3, seq_len=100, n_hid=64, batches=32),
    'quick': dict(epochs=2, bs=8, c_in=3, seq_len=12, n_hid=8, batches=4),
}


def synthetic_tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    "`n` token ids from a random first-order Markov chain (4 successors per token): text with structure to learn"
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab, (vocab, 4), generator=g)
    picks = torch.randint(4, (n,), generator=g).tolist()
    toks, cur = [], 0
    for p in picks: cur = int(successors[cur, p]); toks.append(cur)
    return torch.tensor(toks)


def _epoch_timer(device):
    "A callback that keeps the wall and CPU seconds of each training phase: no validation, no fit set-up"
    from fastai.callback.core import Callback

    class EpochTimer(Callback):
        order = -100  # runs first in before_train and in after_train: the window holds every batch
        def __init__(self): self.wall_s, self.cpu_s = [], []
        def before_train(self): _sync(device); self.start = time.perf_counter(), time.process_time()
        def after_train(self):
            _sync(device)
            self.wall_s.append(time.perf_counter() - self.start[0])
            self.cpu_s.append(time.process_time() - self.start[1])
    return EpochTimer()


def _timed_epochs(learners: dict, epochs: int, seed: int) -> dict:
    "Median wall and CPU seconds per epoch of each learner (each has an `EpochTimer`), and overheads over the first's"
    from fastai.torch_core import set_seed
    # Variants take turns epoch by epoch, so that load on the machine hits them alike.
    for epoch in range(epochs + 1):
        for learn in learners.values():
            set_seed(seed + epoch)
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    # the first epoch of each variant warms up (allocator, caches, lazy initialisation) and is left out
    wall = {name: statistics.median(learn.epoch_timer.wall_s[1:]) for name, learn in learners.items()}
    cpu = {name: statistics.median(learn.epoch_timer.cpu_s[1:]) for name, learn in learners.items()}
    base = next(iter(learners))
    return dict(epoch_s=wall, epoch_cpu_s=cpu, overhead_pct={k: 100 * (v / wall[base] - 1) for k, v in wall.items()},
                overhead_cpu_pct={k: 100 * (v / cpu[base] - 1) for k, v in cpu.items()})


def train_epochs(
    epochs: int = 6,  # timed epochs per variant, after one warm-up epoch
    bs: int = 32,  # sequences per batch
    bptt: int = 70,  # tokens per sequence
    vocab: int = 2000,  # vocabulary size of the synthetic text
    emb_sz: int = 400,  # AWD-LSTM sizes; AR/TAR read activations of emb_sz features
    n_hid: int = 512,
    n_layers: int = 2,
    batches: int = 8,  # training batches per epoch
    seed: int = 42,  # same weights, batches and dropout masks for every variant
    device='cpu',  # where the model trains
) -> dict:
    "Median seconds of an AWD-LSTM LM's training epoch (no validation): no penalty, `TARCallback`, `RNNRegularizer`"
    device = torch.device(device)
    from fastai.callback.rnn import ModelResetter, RNNCallback, RNNRegularizer
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.text.all import AWD_LSTM, awd_lstm_lm_config, get_language_model
    from fastai.text.data import LMDataLoader
    from fastai.torch_core import set_seed
    from ..callback import TARCallback

    n_train = bs * (batches * bptt + 1)
    toks = synthetic_tokens(n_train + bs * (2 * bptt + 1), vocab, seed)
    # num_workers=0: batches of tensors in memory need no worker, and fastai's default forks one per core each
    # epoch, which Python >= 3.12 warns about in a process with threads
    train = LMDataLoader([toks[:n_train]], bs=bs, seq_len=bptt, shuffle=True, num_workers=0)
    valid = LMDataLoader([toks[n_train:]], bs=bs, seq_len=bptt, num_workers=0)
    cfg = awd_lstm_lm_config.copy()
    cfg.update(emb_sz=emb_sz, n_hid=n_hid, n_layers=n_layers)
    variants = {'no penalty': lambda: [RNNCallback()],
                'TARCallback': lambda: [TARCallback(alpha=ALPHA, beta=BETA)],
                'fastai RNNRegularizer': lambda: [RNNCallback(), RNNRegularizer(alpha=ALPHA, beta=BETA)]}
    learners = {}
    for name, cbs in variants.items():
        set_seed(seed)
        model = get_language_model(AWD_LSTM, vocab, config=cfg)
        learners[name] = Learner(DataLoaders(train, valid, device=device), model, loss_func=CrossEntropyLossFlat(),
                                 cbs=[ModelResetter(), _epoch_timer(device), *cbs()])
    title = (f"AWD-LSTM LM (emb_sz={emb_sz}, n_hid={n_hid}, n_layers={n_layers}, vocab={vocab}), {batches} batches "
             f"of {bs}x{bptt} tokens per epoch, synthetic text; median of {epochs} epochs")
    return dict(title=title, epochs=epochs, bs=bs, bptt=bptt, vocab=vocab, emb_sz=emb_sz, n_hid=n_hid,
                n_layers=n_layers, batches=batches, device=str(device), **_timed_epochs(learners, epochs, seed))


class SmallTSModel(nn.Module):
    "A small time-series classifier as tsai's LSTM: `batch x variables x steps` in, the last step's output to a head"
    def __init__(self, c_in: int = 3, n_hid: int = 64, c_out: int = 4):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(c_in, n_hid, batch_first=True), nn.Linear(n_hid, c_out)

    def forward(self, x): return self.fc(self.rnn(x.transpose(1, 2))[0][:, -1])


def _hooked_fastai_penalty(penalty=fastai_penalty):
    "`penalty` (fastai's two expressions) in a forward hook on the model's LSTM: what one would write by hand, the peer"
    from fastai.callback.core import Callback

    class HookedFastaiPenalty(Callback):
        def before_fit(self): self.handle = self.learn.model.rnn.register_forward_hook(self.keep)
        def after_fit(self): self.handle.remove()
        def keep(self, module, args, output): self.out = output[0]
        def after_loss(self):
            if self.training: self.learn.loss_grad = self.learn.loss_grad + penalty(self.out, self.out)
    return HookedFastaiPenalty()


def ts_train_epochs(
    epochs: int = 8,  # timed epochs per variant, after one warm-up epoch
    bs: int = 64,  # series per batch
    c_in: int = 3,  # variables per series
    seq_len: int = 100,  # steps per series
    n_hid: int = 64,  # LSTM units: AR and TAR read bs x seq_len x n_hid activations
    batches: int = 32,  # training batches per epoch
    seed: int = 42,
    device='cpu',
) -> dict:
    """Median seconds of a small time-series LSTM's training epoch (no validation): no penalty, `TARCallback()` (which
    finds the LSTM: AR and TAR of its output), and fastai's expressions in a hand-written forward hook, eager and
    under `torch.compile` (one fused kernel each way: what a penalty costs here at best)"""
    device = torch.device(device)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.torch_core import set_seed
    from ..callback import TARCallback

    g = torch.Generator().manual_seed(seed)
    n = bs * batches
    y = torch.randint(4, (n + bs,), generator=g)
    # random walks whose drift tells the class: something to learn
    x = (torch.randn(n + bs, c_in, seq_len, generator=g) + 0.1 * (y[:, None, None] - 1.5)).cumsum(-1) / 10
    items = list(zip(x, y))
    dls = DataLoaders(DataLoader(items[:n], bs=bs, shuffle=True, drop_last=True), DataLoader(items[n:], bs=bs),
                      device=device)
    variants = {'no penalty': list, 'TARCallback': lambda: [TARCallback()],
                'forward hook + fastai expressions': lambda: [_hooked_fastai_penalty()]}
    h = torch.randn(bs, seq_len, n_hid, device=device, requires_grad=True)
    compiled, first_call = compile_naive(h, h, device)  # compiled here, so that no epoch pays for it
    if compiled is not None:
        variants['forward hook + compiled fastai expressions'] = lambda: [_hooked_fastai_penalty(compiled)]
    learners = {}
    for name, cbs in variants.items():
        set_seed(seed)
        learners[name] = Learner(dls, SmallTSModel(c_in, n_hid), loss_func=nn.CrossEntropyLoss(),
                                 cbs=[_epoch_timer(device), *cbs()])
    title = (f"Time-series LSTM classifier ({c_in} variables x {seq_len} steps, n_hid={n_hid}; AR and TAR of the LSTM "
             f"output), {batches} batches of {bs} per epoch, synthetic series; median of {epochs} epochs")
    notes = [] if compiled is not None else [f"Note: no compiled variant: torch.compile failed here ({first_call})"]
    return dict(title=title, epochs=epochs, bs=bs, c_in=c_in, seq_len=seq_len, n_hid=n_hid, batches=batches,
                device=str(device), notes=notes, **_timed_epochs(learners, epochs, seed))


def format_train(res: dict) -> str:
    "The epoch times as a Markdown table, with the overhead over no penalty"
    lines = [res['title'], '', '| run | epoch s | overhead | epoch CPU s | CPU overhead |', '|---|---:|---:|---:|---:|']
    for k, s in res['epoch_s'].items():
        lines.append(f"| {k} | {s:.3f} | {res['overhead_pct'][k]:+.1f}% | {res['epoch_cpu_s'][k]:.3f} | "
                     f"{res['overhead_cpu_pct'][k]:+.1f}% |")
    return '\n'.join(lines + res.get('notes', []))


# --- command line -----------------------------------------------------------------------------------
def _shapes(text: str) -> list[tuple]:
    "'64x70x400,8x2048x2048' -> [(64, 70, 400), (8, 2048, 2048)]"
    try: shapes = [tuple(int(n) for n in s.lower().split('x')) for s in text.split(',') if s.strip()]
    except ValueError: shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 or s[1] < 2 for s in shapes):
        raise UsageError(f"--shapes {text!r}: give bs x sl x n_hid triples such as 64x70x400,8x2048x2048 "
                         "(sl >= 2, all >= 1)")
    return shapes


def _device(name: str | None) -> torch.device:
    "The --device, checked by making a tensor and a random generator there, as the bench does"
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
        torch.empty(0, device=device)  # fails for a device index that does not exist
        torch.Generator(device=device)  # refuses 'meta', whose tensors hold no data to time
    # RuntimeError: not a device name, no such device; AssertionError, NotImplementedError: torch was built
    # without that backend ('Torch not compiled with CUDA enabled')
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        why = str(e).strip().splitlines()[0].rstrip('.') if str(e).strip() else type(e).__name__
        raise UsageError(f"--device {name!r} cannot run the bench here ({why}): use 'cpu' or 'cuda'") from None
    return device


def _json_path(text: str) -> Path:
    "The --json file, checked before the bench runs: not a folder, in a folder that exists and takes new files"
    path = Path(text).expanduser()
    if path.is_dir(): raise UsageError(f"--json {text!r} is a folder: give a file name such as {text}/bench.json")
    check_writable(path.parent, f'--json {text!r}')
    try:
        if path.exists(): open(path, 'a').close()  # an existing file can be replaced; appending nothing keeps it
    except OSError as e:
        raise UsageError(f"--json {text!r}: cannot write there ({e.strerror or e}): give a place you can write in") \
            from None
    return path


def _environment(device) -> dict:
    return dict(torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), python=platform.python_version())


SMALL_NUMEL = 2 ** 20  # below this many elements per tensor a row times per-call overhead more than memory traffic


def _caveats(rows: list[dict], repeats: int) -> list[str]:
    "Notes on rows whose numbers do not mean what the default table's do"
    notes = []
    small = ['x'.join(map(str, r['shape'])) for r in rows if math.prod(r['shape']) < SMALL_NUMEL]
    if small:
        notes.append(f"Note: {', '.join(dict.fromkeys(small))} hold fewer than {SMALL_NUMEL:,} elements: their times "
                     "are mostly per-call overhead (Python, autograd, kernel launches), so speed-ups there, below 1x "
                     "too, say nothing about real activations; the default shapes measure those.")
    if repeats < 10: notes.append(f"Note: {repeats} repeat(s): medians of so few are noisy; the default is 20.")
    return notes


# glibc keeps what it frees (no mmap'd chunks, no trimming of the heap): in the same process, a call then never pays
# page faults for memory an earlier call gave back to the system, and the rows compare the code, not that history
KEEP_FREED = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'
_CHILD_FUNCTIONS = ('bench_table', 'train_epochs', 'ts_train_epochs')


def _keeps_freed() -> bool:
    "This process was started with `KEEP_FREED` (glibc reads its tunables at start only)"
    return KEEP_FREED in os.environ.get('GLIBC_TUNABLES', '')


def _measure(calls: list, allocator: str) -> list:
    """The results of `calls`, `(name, kwargs)` of this module's functions: in this process for `allocator='default'`
    or where it already keeps freed memory, else in a child process started with `KEEP_FREED`"""
    if allocator == 'default' or _keeps_freed():
        return [globals()[name](**kwargs) for name, kwargs in calls]
    package_parent = str(Path(__file__).resolve().parents[1])  # the child imports this very fastai_tar
    env = dict(os.environ, GLIBC_TUNABLES=KEEP_FREED,
               PYTHONPATH=os.pathsep.join([package_parent, *filter(None, [os.environ.get('PYTHONPATH')])]))
    spec = dict(calls=calls, threads=torch.get_num_threads(), backend=COMPILE_BACKEND)
    proc = subprocess.run([sys.executable, '-m', __name__], input=json.dumps(spec), capture_output=True, text=True,
                          env=env)
    if proc.returncode: raise RuntimeError(f"the bench's child process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def _child():
    "`python -m fastai_tar.bench`, as `_measure` runs it: the calls read from stdin, their results as JSON on stdout"
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec['threads'])
    global COMPILE_BACKEND
    COMPILE_BACKEND = spec['backend']
    assert all(name in _CHILD_FUNCTIONS for name, _ in spec['calls'])
    results = [globals()[name](**kwargs) for name, kwargs in spec['calls']]
    print(json.dumps(results))


HISTORY_BATCHES = {'default': 2000, 'quick': 200}  # `--history`: training batches of the measured fit
HISTORY_FRAME_ROWS = 1_000_000


def run(args) -> int:
    quick = args.quick
    repeats = args.repeats if args.repeats is not None else (3 if quick else 20)
    if repeats < 1: raise UsageError(f"--repeats must be >= 1, got {repeats}")
    shapes = _shapes(args.shapes) if args.shapes else (QUICK_SHAPES if quick else SHAPES)
    dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
    if not dtypes:
        raise UsageError(f"--dtypes {args.dtypes!r} names no dtype: give at least one of {', '.join(DTYPES)}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad: raise UsageError(f"--dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    device = _device(args.device)
    if args.threads is not None and args.threads < 1: raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if (args.train or args.host) and args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    json_path = _json_path(args.json) if args.json else None
    if args.threads is not None: torch.set_num_threads(args.threads)
    env = _environment(device)
    if args.history and args.host: raise UsageError("--history and --host measure different things: pass one of them")
    kept = args.allocator == 'keep' and not args.history and not args.host
    env['allocator'] = f'GLIBC_TUNABLES={KEEP_FREED}' if kept else 'default'
    print(f"fastai-tar bench: torch {env['torch']}, {env['device']} ({env['cpu']}), threads={env['threads']}")
    if kept:
        print(f"allocator: timed {'in this process, started' if _keeps_freed() else 'in a child process'} with "
              f"GLIBC_TUNABLES={KEEP_FREED} (glibc keeps the memory it frees, so that no call pays page faults for "
              "what an earlier one gave back; --allocator default for glibc's defaults)")
    elif not args.history and not args.host: print("allocator: glibc's defaults (--allocator default)")
    if args.host:
        from .bench_host import format_host, host_cost
        res = host_cost(epochs=args.epochs or (3 if quick else 30))
        print(format_host(res))
        out = dict(environment=env, host=res)
    elif args.history:
        from .bench_history import format_history, frame_seconds, history_cost
        res = history_cost(HISTORY_BATCHES['quick' if quick else 'default'])
        res['frame_rows'], res['frame_s'] = HISTORY_FRAME_ROWS, frame_seconds(HISTORY_FRAME_ROWS)
        print(format_history(res))
        out = dict(environment=env, history=res)
    elif args.train:
        preset, ts_preset = (dict(p['quick' if quick else 'default']) for p in (TRAIN_PRESETS, TS_PRESETS))
        if args.epochs is not None: preset['epochs'] = ts_preset['epochs'] = args.epochs
        res, ts_res = _measure([('train_epochs', dict(preset, device=str(device))),
                                ('ts_train_epochs', dict(ts_preset, device=str(device)))], args.allocator)
        print(format_train(res))
        print()
        print(format_train(ts_res))
        if quick: print("Note: --quick times tiny models, whose epochs are mostly fastai's per-batch overhead: the "
                        "overheads above say nothing about a real model's; run without --quick for those.")
        out = dict(environment=env, train=res, train_small=ts_res)
    else:
        rows, = _measure([('bench_table', dict(shapes=[list(s) for s in shapes], dtypes=dtypes, repeats=repeats,
                                                device=str(device)))], args.allocator)
        print(f"AR (alpha={ALPHA:g}, on a dropped copy) + TAR (beta={BETA:g}, on the raw tensor), forward+backward, "
              f"median of {repeats} repeats; saved = bytes kept for backward beyond the inputs")
        print(format_table(rows))
        print(format_compile(rows))
        for note in _caveats(rows, repeats): print(note)
        out = dict(environment=env, repeats=repeats, rows=rows)
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == '__main__': _child()
