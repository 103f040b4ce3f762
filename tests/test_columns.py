"Fit-table columns: `PenaltyColumn` and where the columns go for each Recorder set-up (`fastai_tar/columns.py`)."
import pytest
from fastai.learner import Metric, mk_metric

from fastai_tar.columns import PenaltyColumn, column_layout


def test_penalty_column_is_a_metric_read_when_logged():
    box = [1.5]
    col = PenaltyColumn('train_tar', lambda: box[0])
    assert isinstance(col, Metric) and mk_metric(col) is col  # `learn.metrics = [...]` keeps it as it is
    assert col.name == 'train_tar' and col.value == 1.5
    box[0] = 2.5
    col.reset(); col.accumulate(learn=None)  # the Recorder's calls leave the callback's sums alone
    assert col.value == 2.5


@pytest.mark.parametrize('train_metrics, valid_metrics, before, after', [
    # fastai's default: metrics are logged after validation, names as given
    (False, True, [('train_ar', 'ar', 'train'), ('train_tar', 'tar', 'train')],
     [('valid_ar', 'ar', 'valid'), ('valid_tar', 'tar', 'valid')]),
    # both: the Recorder logs each metric twice and prefixes train_/valid_ itself
    (True, True, [('ar', 'ar', None), ('tar', 'tar', None)], []),
    # training only: names as given, validation never logged
    (True, False, [('train_ar', 'ar', 'train'), ('train_tar', 'tar', 'train')], []),
    # no metric logged at all: a column would shift the table
    (False, False, [], []),
])
def test_layout_per_recorder_setup(train_metrics, valid_metrics, before, after):
    assert column_layout(['ar', 'tar'], ['ar', 'tar'], train_metrics, valid_metrics) == (before, after)


def test_layout_only_for_terms_that_are_on():
    assert column_layout(['tar'], [], False, True) == ([('train_tar', 'tar', 'train')], [])
    assert column_layout([], [], False, True) == ([], [])
    # alpha=0 with validation metrics: AR of held-out text is still reported, unweighted
    assert column_layout(['tar'], ['ar', 'tar'], False, True) == (
        [('train_tar', 'tar', 'train')], [('valid_ar', 'ar', 'valid'), ('valid_tar', 'tar', 'valid')])
    # with train_metrics=True a kind on in either phase gets its pair of columns
    assert column_layout(['tar'], ['ar', 'tar'], True, True) == ([('ar', 'ar', None), ('tar', 'tar', None)], [])
    assert column_layout(['tar'], [], True, True) == ([('tar', 'tar', None)], [])
