"""What the penalty did, for the user: the per-batch history, its plot, and the fit table's columns of AR and TAR.

The history lives in compact host arrays, one segment per plan a fit read by (a plan settled again mid-fit, or a
model swapped in, starts a new segment and keeps the rows before it). Within an epoch the rows stay where the model
is, in one buffer that doubles when full: no host sync per batch, one transfer per epoch (`flush`)."""
import warnings
from array import array
from functools import partial

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.learner import Metric

from .functional import mean_of
from .plan import KINDS

__all__ = ['PenaltyColumn', 'column_layout', 'drop_columns', 'PenaltyHistory', 'PenaltyReport', 'plot_history']


# --- fit-table columns -----------------------------------------------------------------------------------------------
class PenaltyColumn(Metric):
    "A column named `name` in the table `fit` prints and in `learn.recorder.values`, read from `value_fn`"
    def __init__(self,
        name: str,  # column header before the Recorder's own prefix, e.g. 'train_tar'
        value_fn,  # callable returning the value to log now; the callback keeps the running sums
    ):
        self._name, self.value_fn = name, value_fn

    # The report resets and accumulates its own sums: the Recorder resets validation metrics in `before_validate`,
    # which would wipe a training column before it is printed.
    def reset(self): pass
    def accumulate(self, learn): pass

    @property
    def value(self): return self.value_fn()

    @property
    def name(self): return self._name

    # pickled without its callback's sums (`learn.export()` mid-fit): empty until its callback takes it out
    def __reduce__(self): return (PenaltyColumn, (self._name, _nothing))


def column_layout(
    train_kinds: list,  # kinds (`plan.KINDS`) with a training column: the terms that are on
    valid_kinds: list,  # kinds with a validation column: [] unless `valid_metrics=True`
    train_metrics: bool,  # the Recorder's `train_metrics`: metrics are also logged after training
    valid_metrics: bool,  # the Recorder's `valid_metrics`: metrics are logged after validation
) -> tuple[list, list]:
    """Columns before and after the user's metrics, as `(name, kind, phase)`; phase None: the phase logging it.

    The Recorder logs the metric list after validation (its default), after training, or after both, and
    in the last case names every column twice, `train_<name>` and `valid_<name>`. The columns are laid out
    so that the table always reads `train_ar`/`train_tar` (weighted, training) and `valid_ar`/`valid_tar`.
    """
    if train_metrics and valid_metrics:  # one column per kind, read as the training or the validation value
        kinds = valid_kinds + [k for k in train_kinds if k not in valid_kinds]
        return [(k, k, None) for k in kinds], []
    if train_metrics: return [(f'train_{k}', k, 'train') for k in train_kinds], []  # nothing logs validation
    if valid_metrics:
        return [(f'train_{k}', k, 'train') for k in train_kinds], [(f'valid_{k}', k, 'valid') for k in valid_kinds]
    return [], []  # the Recorder logs no metric at all


class _DropColumnsAfterFit(Callback):
    "Keeps the Recorder's table aligned after `remove_cb` mid-fit: the columns show nothing, and go when the fit ends"
    order = 100
    def __init__(self, columns): self.columns = columns
    def after_fit(self):
        _take_out(self.learn, self.columns)
        self.learn.remove_cb(self)


def _nothing(): return None


def _take_out(learn, columns: list):
    learn.metrics = [m for m in learn.metrics if not any(m is c for c in columns)]  # (by identity)


def drop_columns(
    learn,  # the learner whose metrics hold the columns
    columns: list,  # the columns `PenaltyReport.add_columns` added
    fit_running: bool,  # a fit is running: its table keeps the columns, empty, until it ends
):
    "Take the columns out of `learn.metrics`, or, mid-fit, empty them and take them out when the fit ends"
    if fit_running and columns:
        for c in columns: c.value_fn = _nothing
        learn.add_cb(_DropColumnsAfterFit(columns))
    else: _take_out(learn, columns)


# --- history ---------------------------------------------------------------------------------------------------------
class _Segment:
    "The rows of one plan's reads: the iteration, the plain loss, each read's weighted term and its coefficient"
    def __init__(self, reads):
        self.reads, self.iters, self.values, self.coefs = list(reads), array('q'), array('f'), array('d')

    def arrays(self) -> tuple:
        n, k = len(self.iters), len(self.reads)
        return (np.frombuffer(self.iters, dtype=np.int64), np.frombuffer(self.values, np.float32).reshape(n, 1 + k),
                np.frombuffer(self.coefs, np.float64).reshape(n, k))

    def frame(self) -> pd.DataFrame:
        iters, values, coefs = self.arrays()
        terms = values[:, 1:].astype(np.float64)
        df = pd.DataFrame({'iter': iters, 'loss': values[:, 0]})
        idx = {k: [i for i, r in enumerate(self.reads) if r.kind == k] for k in KINDS}
        for kind in KINDS: df[kind] = terms[:, idx[kind]].sum(axis=1)
        extra = {}
        for kind, coef in ((k, v.coef_arg) for k, v in KINDS.items()):
            c = coefs[:, idx[kind]]
            shared = c.shape[1] > 0 and (c == c[:, :1]).all()
            df[coef] = c[:, 0] if shared else np.nan
            if len(idx[kind]) > 1:
                extra.update({f'{kind}:{self.reads[i].name}': terms[:, i] for i in idx[kind]})
                if not shared: extra.update({f'{coef}:{self.reads[i].name}': coefs[:, i] for i in idx[kind]})
        return pd.concat([df, pd.DataFrame(extra)], axis=1) if extra else df


class PenaltyHistory:
    """Per training batch: the iteration, the plain loss, each read's weighted term and its coefficient: 8 bytes for
    the iteration, 4 for the loss, 4 per term and 8 per coefficient (36 bytes a batch for one AR and one TAR)."""
    def __init__(self):
        self.segments = []
        self._buf, self._n_buf = None, 0  # rows not yet flushed, on the model's device
        self._rows = ()  # the buffer's rows as views, made once per buffer: a row is written without indexing it

    def __len__(self): return sum(len(s.iters) for s in self.segments)

    @property
    def nbytes(self) -> int:
        "Bytes the rows take on the host (the arrays' items, without their spare capacity)"
        return sum(a.itemsize * len(a) for s in self.segments for a in (s.iters, s.values, s.coefs))

    def use(self, reads):
        "The rows from now on hold the terms of `reads`: a new segment where they differ from the last one's"
        if self.segments and self.segments[-1].reads == list(reads): return
        self.flush()
        self.segments.append(_Segment(reads))

    def add(self,
        it: int,  # the training iteration (`learn.train_iter`)
        loss: torch.Tensor,  # the plain loss; an unreduced loss is recorded as its mean
        terms: list,  # one weighted 0-d tensor per read of the segment, detached
        coefs: list,  # one float coefficient per read
    ):
        "Record one batch without reading a value back from the device: one kernel writes the row into the buffer"
        # as a plain tensor: fastai's losses are TensorBase, whose every op goes through Python (`__torch_function__`)
        loss = loss.as_subclass(torch.Tensor).detach()
        if self._buf is None or self._n_buf == len(self._buf):
            grown = loss.new_empty((max(64, 2 * self._n_buf), 1 + len(terms)), dtype=torch.float32)
            if self._buf is not None: grown[:self._n_buf] = self._buf
            self._buf, self._rows = grown, grown.unbind(0)
        torch.stack([loss if loss.dim() == 0 else loss.float().mean(), *terms], out=self._rows[self._n_buf])
        self._n_buf += 1
        seg = self.segments[-1]
        seg.iters.append(it)
        seg.coefs.extend(coefs)

    def flush(self):
        "Move the rows still on the device to the host arrays: one transfer"
        if self._n_buf: self.segments[-1].values.frombytes(self._buf[:self._n_buf].cpu().numpy().tobytes())
        self._buf, self._n_buf, self._rows = None, 0, ()

    def kind_means(self,
        start: int,  # the first row of the span, e.g. the epoch's first batch
        reads: list,  # the reads to count
    ) -> dict:
        "kind -> the mean over the rows from `start` on of the weighted terms of `reads` of that kind"
        self.flush()
        sums, n, row = {}, 0, 0
        for s in self.segments:
            rows = len(s.iters)
            if row + rows > start:
                values = s.arrays()[1][max(start - row, 0):, 1:].astype(np.float64)
                n += len(values)
                for i, r in enumerate(s.reads):
                    if r in reads: sums[r.kind] = sums.get(r.kind, 0.) + values[:, i].sum()
            row += rows
        return {k: v / n for k, v in sums.items()} if n else {}

    def frame(self) -> pd.DataFrame:
        "One row per training batch: iter, loss, ar, tar, alpha, beta (the weighted terms and the coefficients used)"
        self.flush()
        frames = [s.frame() for s in self.segments if len(s.iters)]
        if not frames: return pd.DataFrame(columns=['iter', 'loss', *KINDS, *(k.coef_arg for k in KINDS.values())])
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def plot_history(
    df: pd.DataFrame,  # `PenaltyHistory.frame`'s output
    ax=None,  # a matplotlib Axes to draw on; None makes a new figure
):
    "Plot the plain loss (left axis) and the weighted AR and TAR terms (right axis) against the training iteration."
    import matplotlib.pyplot as plt
    if not len(df): raise ValueError("learn.tar.plot() has nothing to draw: no training batch was recorded; "
                                     "call learn.fit first")
    # constrained layout leaves room for the twin axis's label on the right, also in `fig.savefig(...)`
    if ax is None: _, ax = plt.subplots(figsize=(6, 4), layout='constrained')
    lines = ax.plot(df['iter'], df['loss'], color='C0', label='loss')
    ax.set_xlabel('iteration'); ax.set_ylabel('loss'); ax.set_title('loss and weighted AR/TAR')
    # The penalty is usually orders of magnitude below the loss: on the loss's axis it would be a flat line.
    pen = ax.twinx()
    for kind, color in zip(KINDS, ('C1', 'C2')):
        if df[kind].abs().sum() > 0: lines += pen.plot(df['iter'], df[kind], color=color, label=f'{kind} (weighted)')
    pen.set_ylabel('weighted penalty')
    ax.legend(lines, [l.get_label() for l in lines])
    return ax.figure


# --- the report: history, columns, validation sums -------------------------------------------------------------------
class PenaltyReport:
    "The history rows and fit-table columns of one `TARCallback`, which sends it the batches' terms and sums."
    def __init__(self):
        self.log, self.valid_sums, self.epoch_start = PenaltyHistory(), {}, None
        self.reads, self.train_reads = [], []  # what is reported, and those of them that train
        self.fresh = False  # a fit began: its history starts at its first training epoch

    def new_fit(self):
        # Not a new history yet: `learn.summary()` sends before_fit too (outside the lock) and must keep the last fit's
        self.fresh, self.epoch_start = True, None

    def use(self, reads, train_reads):
        "Report `reads` from now on (a plan settled, or settled again mid-fit: the rows before it stay)"
        self.reads, self.train_reads = reads, train_reads
        if self.fresh: self.log, self.fresh = PenaltyHistory(), False
        self.log.use(reads)

    def before_train(self):
        if self.fresh and self.reads: self.log, self.fresh = PenaltyHistory(), False
        if self.reads: self.log.use(self.reads)
        self.epoch_start = len(self.log)

    def after_train(self): self.log.flush()  # one transfer per epoch: no per-batch tensor stays on the device
    def before_validate(self): self.valid_sums = {}

    def record(self, it, loss, weighted: dict, coefs: list):
        "One history row, which also feeds the fit table's epoch means. No `.item()`: no device sync per batch."
        zero = None if len(weighted) == len(self.reads) else loss.new_zeros((), dtype=torch.float32)
        terms = []
        for r in self.reads: terms.append(weighted[r].detach() if r in weighted else zero)  # (no comprehension's call)
        self.log.add(it, loss, terms, coefs)

    def add_valid(self, stats):
        "Add a validation batch's (sum, count) of each read (by its kind and name: a model swapped in reads alike)"
        for r, (s, n) in stats.items():
            s0, n0 = self.valid_sums.get((r.kind, r.name), (0., 0))
            self.valid_sums[r.kind, r.name] = (s0 + s.detach(), n0 + n)

    def add_columns(self,
        learn,  # the learner whose Recorder prints the fit table
        suffix: str,  # '' for the first `TARCallback`, `_2`, ... for the next ones
        show_columns: bool,  # `TARCallback(show_columns=...)`: the weighted training terms
        valid_metrics: bool,  # `TARCallback(valid_metrics=...)`: the unweighted validation penalty
        train_kinds: list,  # the kinds whose coefficient can be non-zero in training
    ) -> list:
        "Add the columns to `learn.metrics`; returns them"
        rec = getattr(learn, 'recorder', None)
        if rec is None: return []
        train_kinds = train_kinds if show_columns else []
        valid_kinds = list(KINDS) if valid_metrics else []
        if valid_kinds and not rec.valid_metrics:
            warnings.warn("TARCallback(valid_metrics=True) has no column to show: the Recorder logs no validation "
                          "metrics (Recorder(valid_metrics=False))", stacklevel=2)
        before, after = column_layout(train_kinds, valid_kinds, rec.train_metrics, rec.valid_metrics)
        col = lambda name, kind, phase: PenaltyColumn(name + suffix, partial(self.column_value, learn, kind, phase))
        before, after = [col(*c) for c in before], [col(*c) for c in after]
        learn.metrics = before + list(learn.metrics) + after
        return before + after

    def column_value(self, learn, kind, phase):
        "Epoch mean of the weighted training term, or the unweighted validation penalty; None where not computed."
        if phase is None: phase = 'train' if learn.training else 'valid'  # the Recorder logs both phases
        if phase == 'train':
            if self.epoch_start is None: return None
            return self.log.kind_means(self.epoch_start, self.train_reads).get(kind)
        means = [mean_of(*s) for (k, _), s in self.valid_sums.items() if k == kind]
        return sum(means).item() if means else None

    def frame(self) -> pd.DataFrame: return self.log.frame()
