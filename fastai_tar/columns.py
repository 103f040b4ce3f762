"Fit-table columns for the penalty: fastai `Metric`s whose values `TARCallback` computes."
from fastai.learner import Metric

__all__ = ['PenaltyColumn', 'column_layout']


class PenaltyColumn(Metric):
    "A column named `name` in the table `fit` prints and in `learn.recorder.values`, read from `value_fn`"
    def __init__(self,
        name: str,  # column header before the Recorder's own prefix, e.g. 'train_tar'
        value_fn,  # callable returning the value to log now; the callback keeps the running sums
    ):
        self._name, self.value_fn = name, value_fn

    # The callback resets and accumulates its own sums: the Recorder resets validation metrics
    # in `before_validate`, which would wipe a training column before it is printed.
    def reset(self): pass
    def accumulate(self, learn): pass

    @property
    def value(self): return self.value_fn()

    @property
    def name(self): return self._name


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
