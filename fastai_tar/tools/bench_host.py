"""What the callback costs the host per training batch, where the tensor work is negligible: the regime of a GPU running
a small model, which waits on Python calls and kernel launches.

Used by `fastai-tar bench --host`. A tiny model returning fastai's `(logits, raw, dropped)` (an LSTM of 8 units, 4
sequences of 8 tokens) trains with no penalty (fastai's `RNNCallback` alone, which hands the loss the logits), with
fastai's `RNNCallback` + `RNNRegularizer(2, 1)`, and with `TARCallback(2, 1)`; the three take turns epoch by epoch,
and each training batch is timed from the first callback's before_batch to the last one's after_batch, in the CPU
time of the thread (`time.thread_time`: what other processes do shows less), as medians. The Python calls one
steady-state training batch makes are
counted with `sys.setprofile`: inside `fastai_tar` for ours, inside `fastai/callback/rnn.py` for fastai's pair, on that
model and on one that returns its logits only (the LSTM and its dropout then read through hooks).
"""
import os
import statistics
import sys
import time

import torch
from torch import nn

__all__ = ['HostModel', 'host_cost', 'calls_per_batch', 'format_host']


class HostModel(nn.Module):
    "Embedding -> LSTM -> Dropout -> Linear, returning fastai's (logits, raw, dropped), or the logits alone"
    def __init__(self, vocab: int = 30, n_hid: int = 8, contract: bool = True):
        super().__init__()
        self.contract = contract
        self.emb, self.rnn = nn.Embedding(vocab, n_hid), nn.LSTM(n_hid, n_hid, batch_first=True)
        self.drop, self.head = nn.Dropout(0.4), nn.Linear(n_hid, vocab)

    def forward(self, x):
        raw = self.rnn(self.emb(x))[0]
        dropped = self.drop(raw)
        return (self.head(dropped), raw, dropped) if self.contract else self.head(dropped)


def _dls(batches: int, bs: int, sl: int, vocab: int, seed: int):
    from fastai.data.core import DataLoaders
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (batches * bs, sl + 1), generator=g)
    items = list(zip(x[:, :-1], x[:, 1:]))
    return DataLoaders.from_dsets(items, items[:bs], bs=bs, shuffle=False, device='cpu', num_workers=0)


def _variants(contract: bool) -> dict:
    from fastai.callback.rnn import RNNCallback, RNNRegularizer
    from ..callback import TARCallback
    strip = [RNNCallback] if contract else []
    return {'no penalty': lambda: [c() for c in strip],
            'fastai RNNCallback + RNNRegularizer': lambda: [RNNCallback(), RNNRegularizer(alpha=2., beta=1.)],
            'TARCallback': lambda: [TARCallback(alpha=2., beta=1.)]}


def _learner(dls, cbs, seed: int, contract: bool):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    torch.manual_seed(seed)
    return Learner(dls, HostModel(contract=contract), loss_func=CrossEntropyLossFlat(), cbs=cbs)


def host_cost(
    epochs: int = 30,  # timed epochs per variant, after one warm-up epoch
    batches: int = 32,  # training batches per epoch
    bs: int = 4, sl: int = 8, vocab: int = 30,  # the batch of the tiny model
    seed: int = 0,
) -> dict:
    "Median CPU microseconds of a training batch of each variant (before_batch to after_batch), and what each adds"
    from fastai.callback.core import Callback

    class Start(Callback):
        order = -1000  # first in before_batch
        def before_batch(self): self.learn.batch_start = time.thread_time()

    class Timer(Callback):
        order = 1000  # last in after_batch
        def before_fit(self): self.t = []
        def after_batch(self):  # this thread's CPU time: what other processes on the machine do shows less
            if self.training: self.t.append((time.thread_time() - self.learn.batch_start) * 1e6)

    dls = _dls(batches, bs, sl, vocab, seed)
    learners = {name: _learner(dls, [*cbs(), Start(), Timer()], seed, True) for name, cbs in _variants(True).items()}
    times = {name: [] for name in learners}
    for epoch in range(epochs + 1):  # in turns, so that load on the machine hits each alike
        for name, learn in learners.items():
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
            if epoch: times[name] += learn.timer.t
    us = {k: statistics.median(v) for k, v in times.items()}
    added = {k: v - us['no penalty'] for k, v in us.items() if k != 'no penalty'}
    return dict(epochs=epochs, batches=batches, bs=bs, sl=sl, n_hid=8, threads=torch.get_num_threads(), us=us,
                added_us=added, ratio=added['TARCallback'] / added['fastai RNNCallback + RNNRegularizer'],
                calls={'contract': calls_per_batch(True), 'hooks': calls_per_batch(False)})


def calls_per_batch(
    contract: bool = True,  # the model returns fastai's (logits, raw, dropped); else its logits, read through hooks
    at: int = 5,  # the training batch counted: a steady one
) -> dict:
    "Python calls one training batch makes: of `fastai_tar` for TARCallback, of fastai's RNN callbacks for theirs"
    from fastai.callback import rnn as fastai_rnn
    from fastai.callback.core import Callback
    import fastai_tar
    ours_dir, theirs = os.path.dirname(os.path.abspath(fastai_tar.__file__)), os.path.abspath(fastai_rnn.__file__)
    tools = os.path.dirname(os.path.abspath(__file__))  # the bench's own model is not the package's work

    class Count(Callback):
        order = -1000
        def __init__(self, where): self.where, self.n, self.calls, self.functions = where, 0, 0, set()
        def before_batch(self):
            if not self.training: return
            self.n += 1
            if self.n == at: sys.setprofile(self.profile)
        def profile(self, frame, event, arg):
            f = frame.f_code.co_filename
            if event == 'call' and (f.startswith(self.where) and not f.startswith(tools) if os.path.isdir(self.where)
                                    else f == self.where):
                self.calls += 1
                self.functions.add((f, frame.f_code.co_name))
        def after_batch(self): sys.setprofile(None)  # (at order -1000: the batch's other after_batch ran before)

    class Stop(Callback):
        order = 1000
        def after_batch(self): sys.setprofile(None)

    res, dls = {}, _dls(at + 2, 4, 8, 30, 0)
    runs = (('TARCallback', ours_dir), ('fastai RNNCallback + RNNRegularizer', theirs))  # fastai's need the contract
    for name, where in runs if contract else runs[:1]:
        count = Count(where)
        learn = _learner(dls, [*_variants(contract)[name](), count, Stop()], 0, contract)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        res[name] = dict(calls=count.calls, functions=len(count.functions),
                         modules=len({f for f, _ in count.functions}))
    return res


def format_host(res: dict) -> str:
    "The host cost as Markdown tables"
    head = (f"host cost per training batch: a tiny model returning (logits, raw, dropped) (LSTM of {res['n_hid']} "
            f"units, {res['bs']} x {res['sl']} tokens), {res['batches']} batches an epoch, median of {res['epochs']} "
            f"epochs, {res['threads']} thread(s)")
    lines = [head, '', '| run | CPU us per batch | added over no penalty |', '|---|---:|---:|']
    for k, v in res['us'].items():
        added = '' if k == 'no penalty' else f"{res['added_us'][k]:+.0f} us"
        lines.append(f"| {k} | {v:.0f} | {added} |")
    lines += ['', f"TARCallback's cost over fastai's pair: {res['ratio']:.2f}x", '',
              '| Python calls per training batch | model returns the contract | model returns logits (hooks) |',
              '|---|---:|---:|']
    said = lambda c: f"{c['calls']} ({c['functions']} functions, {c['modules']} modules)" if c else '-'
    for k in res['calls']['contract']:
        lines.append(f"| {k} | {said(res['calls']['contract'][k])} | {said(res['calls']['hooks'].get(k))} |")
    return '\n'.join(lines)
