"Fit-table columns for the penalty: fastai `Metric`s whose values `TARCallback` computes."
from fastai.learner import Metric

__all__ = ['PenaltyColumn']


class PenaltyColumn(Metric):
    "A column named `name` in the table `fit` prints and in `learn.recorder.values`, read from `value_fn`"
    def __init__(self,
        name: str,  # column header, e.g. 'train_tar'
        value_fn,  # callable returning the epoch's value; the callback keeps the running sums
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
