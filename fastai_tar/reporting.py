"What the penalty did, for the user: the per-batch history and the fit table's epoch-mean columns of AR and TAR."
import warnings
from functools import partial

import torch

from .columns import PenaltyColumn, column_layout
from .functional import mean_of
from .history import PenaltyHistory

__all__ = ['PenaltyReport']


class PenaltyReport:
    "The history rows and fit-table columns of one `TARCallback`, which sends it the batches' terms and sums."
    def __init__(self):
        self.log, self.valid_sums, self.epoch_start, self.columns = PenaltyHistory(0), {}, None, []
        self.targets, self.train_targets = [], []  # what is reported, and those of them that train
        self.log_targets = []  # what the rows of `log` hold: a fit that never trained keeps the last one's
        self.fresh = False  # a fit began: its history starts at its first training epoch

    def new_fit(self):
        # Not a new `log` yet: `learn.summary()` sends before_fit too (outside the lock) and must keep the last fit's.
        self.fresh, self.epoch_start = True, None

    def use(self, targets, train_targets):
        "Report `targets`: at `before_fit`, or at a fit's first forward (the contract read), before any row is logged."
        self.targets, self.train_targets = targets, train_targets
        if not self.fresh: self._new_log()

    def before_train(self):
        if self.fresh: self._new_log()
        self.epoch_start = len(self.log)

    def _new_log(self):
        self.log, self.log_targets, self.fresh = PenaltyHistory(len(self.targets)), self.targets, False

    def after_train(self): self.log.flush()  # one transfer per epoch: no per-batch tensor stays on the device

    def before_validate(self): self.valid_sums = {}

    def record(self, it, loss, weighted, coefs):
        "One history row, which also feeds the fit table's epoch means. No `.item()`: no device sync per batch."
        zero = None if len(weighted) == len(self.targets) else loss.new_zeros((), dtype=torch.float32)
        self.log.add(it, loss, [weighted[t].detach() if t in weighted else zero for t in self.targets], coefs)

    def add_valid(self, stats):
        "Add a validation batch's (sum, count) of each target."
        for t, (s, n) in stats.items():
            s0, n0 = self.valid_sums.get(t, (0., 0))
            self.valid_sums[t] = (s0 + s.detach(), n0 + n)

    def add_columns(self,
        learn,  # the learner whose Recorder prints the fit table
        suffix: str,  # '' for the first `TARCallback`, `_2`, ... for the next ones
        show_columns: bool,  # `TARCallback(show_columns=...)`: the weighted training terms
        valid_metrics: bool,  # `TARCallback(valid_metrics=...)`: the unweighted validation penalty
        train_kinds: list,  # the kinds whose coefficient can be non-zero in training
        all_kinds: list,  # every kind: each is measured in validation
    ):
        rec = getattr(learn, 'recorder', None)
        if rec is None: return
        train_kinds = train_kinds if show_columns else []
        valid_kinds = all_kinds if valid_metrics else []
        if valid_kinds and not rec.valid_metrics:
            warnings.warn("TARCallback(valid_metrics=True) has no column to show: the Recorder logs no validation "
                          "metrics (Recorder(valid_metrics=False))", stacklevel=2)
        before, after = column_layout(train_kinds, valid_kinds, rec.train_metrics, rec.valid_metrics)
        col = lambda name, kind, phase: PenaltyColumn(name + suffix, partial(self.column_value, learn, kind, phase))
        before, after = [col(*c) for c in before], [col(*c) for c in after]
        self.columns = before + after
        learn.metrics = before + list(learn.metrics) + after

    def drop_columns(self, learn):
        learn.metrics = [m for m in learn.metrics if not any(m is c for c in self.columns)]
        self.columns = []

    def column_value(self, learn, kind, phase):
        "Epoch mean of the weighted training term, or the unweighted validation penalty; None where not computed."
        if phase is None: phase = 'train' if learn.training else 'valid'  # the Recorder logs both phases
        if phase == 'train':
            idx = [i for i, t in enumerate(self.targets) if t.kind == kind and t in self.train_targets]
            means = None if self.epoch_start is None else self.log.term_means(self.epoch_start)
            return None if not idx or means is None else float(means[idx].sum())
        means = [mean_of(s, n) for t, (s, n) in self.valid_sums.items() if t.kind == kind]
        return sum(means).item() if means else None

    def frame(self):
        "One row per training batch of the last fit: see `PenaltyHistory.frame`"
        return self.log.frame(self.log_targets)
