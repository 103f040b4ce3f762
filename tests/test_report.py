"""What the penalty did, for the user (`fastai_tar.report`): the per-batch history (`PenaltyHistory`), its segments
(a plan settled again mid-fit keeps the rows before it), its frame and plot, and the fit-table columns."""
import io
import pickle
import tracemalloc
from types import SimpleNamespace

import matplotlib
matplotlib.use('Agg')  # headless, as on a CI machine
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from fastai.learner import Metric, mk_metric

from fastai_tar import report
from fastai_tar.report import PenaltyColumn, PenaltyHistory, column_layout, plot_history

T = lambda kind, name: SimpleNamespace(kind=kind, name=name)


AR_TAR = [T('ar', 'a'), T('tar', 't')]


def log_of(terms, coefs, losses=None, flush_every=None, reads=AR_TAR):
    "A history filled as the callback fills it: loss and terms are tensors, coefficients floats."
    losses = losses if losses is not None else [3. - 0.1 * i for i in range(len(terms))]
    log = PenaltyHistory()
    log.use(reads)
    for i, (l, t, c) in enumerate(zip(losses, terms, coefs)):
        log.add(i, torch.tensor(l), torch.tensor(t, dtype=torch.float32), c)
        if flush_every and (i + 1) % flush_every == 0: log.flush()
    return log


def test_one_module_per_kind():
    targets = [T('ar', '1.output_dp'), T('tar', '0')]
    terms = [[0.02, 0.001], [0.01, 0.003], [0., 0.002]]
    coefs = [[2., 0.], [2., 0.5], [2., 1.]]
    df = log_of(terms, coefs, reads=targets).frame()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta']
    assert df['iter'].tolist() == [0, 1, 2]
    np.testing.assert_allclose(df['loss'], [3., 2.9, 2.8], rtol=1e-6)
    np.testing.assert_allclose(df['ar'], [0.02, 0.01, 0.], rtol=1e-6)
    np.testing.assert_allclose(df['tar'], [0.001, 0.003, 0.002], rtol=1e-6)
    assert df['alpha'].tolist() == [2., 2., 2.] and df['beta'].tolist() == [0., 0.5, 1.]


def test_per_batch_loss_is_the_mean_of_an_unreduced_loss():
    log = PenaltyHistory()
    log.use(AR_TAR)
    log.add(0, torch.tensor([1., 3.]), torch.tensor([0., 0.]), [0., 0.])
    assert log.frame()['loss'].tolist() == [2.]


def test_several_modules_get_their_own_columns():
    targets = [T('ar', '0.hidden_dps.0'), T('ar', '1.output_dp'), T('tar', '0.rnns.0'), T('tar', '0.rnns.1')]
    terms = [[0.1, 0.2, 0.01, 0.02], [0.3, 0.4, 0.03, 0.04]]
    coefs = [[2., 2., 0.5, 1.], [2., 2., 0.5, 1.]]  # AR shares alpha, TAR has one beta per layer
    df = log_of(terms, coefs, reads=targets).frame()
    assert list(df.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta',
                                'ar:0.hidden_dps.0', 'ar:1.output_dp',
                                'tar:0.rnns.0', 'tar:0.rnns.1', 'beta:0.rnns.0', 'beta:0.rnns.1']
    np.testing.assert_allclose(df['ar'], [0.3, 0.7], rtol=1e-6)
    np.testing.assert_allclose(df['tar'], [0.03, 0.07], rtol=1e-6)
    np.testing.assert_allclose(df['tar:0.rnns.1'], [0.02, 0.04], rtol=1e-6)
    assert df['alpha'].tolist() == [2., 2.]
    assert df['beta'].isna().all()  # no single beta was used: the per-module columns say which
    assert df['beta:0.rnns.0'].tolist() == [0.5, 0.5] and df['beta:0.rnns.1'].tolist() == [1., 1.]


def test_flushing_in_any_pattern_keeps_every_row_in_order():
    "Rows flushed once per 'epoch', never, or after every batch, with the buffer growing past its first size."
    targets = [T('ar', 'a'), T('tar', 't')]
    n = 150  # more than the first buffer holds
    terms = [[0.01 * i, 0.001 * i] for i in range(n)]
    coefs = [[2., 1. * i / n] for i in range(n)]
    losses = [3. - 0.01 * i for i in range(n)]
    frames = [log_of(terms, coefs, losses, flush_every=k, reads=targets).frame() for k in (None, 1, 7, 100)]
    for df in frames[1:]: pd.testing.assert_frame_equal(df, frames[0])
    df = frames[0]
    assert df['iter'].tolist() == list(range(n))
    np.testing.assert_allclose(df['loss'], losses, rtol=1e-6)
    np.testing.assert_allclose(df['tar'], [t for _, t in terms], rtol=1e-6)
    assert df['beta'].tolist() == [c for _, c in coefs]


def test_kind_means_are_the_means_of_the_rows_since_start_over_segments():
    log = log_of([[1., 10.], [3., 20.], [5., 60.]], [[2., 1.]] * 3)
    assert log.kind_means(0, AR_TAR) == pytest.approx({'ar': 3., 'tar': 30.})
    assert log.kind_means(1, AR_TAR) == pytest.approx({'ar': 4., 'tar': 40.})
    assert log.kind_means(1, AR_TAR[1:]) == pytest.approx({'tar': 40.})  # only the reads that train
    assert log.kind_means(3, AR_TAR) == {}
    two = [T('tar', 'x'), T('tar', 'y')]  # settled again mid-fit: two TAR reads from now on
    log.use(two)
    log.add(3, torch.tensor(1.), torch.tensor([7., 13.]), [1., 1.])
    assert log.kind_means(2, AR_TAR + two) == pytest.approx({'ar': 2.5, 'tar': 40.})  # (60 + (7 + 13)) / 2 rows
    df = log.frame()
    assert df['iter'].tolist() == [0, 1, 2, 3] and df['tar'].tolist() == [10., 20., 60., 20.]
    assert df['ar'].tolist()[:3] == [1., 3., 5.] and df['tar:x'].isna().tolist() == [True] * 3 + [False]


def test_a_row_costs_36_bytes_for_one_ar_and_one_tar_term():
    "iter (8) + loss (4) + 2 terms (4 each) + 2 coefficients (8 each), counted two ways: items and allocations."
    n = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        log = log_of([[0.1, 0.01]] * n, [[2., 1.]] * n, [2.] * n, flush_every=1000)
        after = tracemalloc.take_snapshot()
    finally: tracemalloc.stop()
    assert log.nbytes == 36 * n
    where = [tracemalloc.Filter(True, report.__file__)]
    grown = sum(d.size_diff for d in after.filter_traces(where).compare_to(before.filter_traces(where), 'filename'))
    assert 36 * n <= grown <= 1.2 * 36 * n  # the arrays' spare capacity is all that comes on top


def test_no_batch_gives_the_columns_and_no_rows():
    df = PenaltyHistory().frame()
    assert list(df.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta'] and len(df) == 0


def test_plot_draws_loss_and_weighted_terms_headless():
    targets = [T('ar', 'a'), T('tar', 't')]
    terms = [[0.02 / (i + 1), 0.001 * i] for i in range(8)]
    df = log_of(terms, [[2., 1.]] * 8, reads=targets).frame()
    fig = plot_history(df)
    assert isinstance(fig, Figure)
    ax, pen = fig.axes  # the loss on the left axis, the much smaller penalties on a twin axis
    (loss,), lines = ax.get_lines(), pen.get_lines()
    np.testing.assert_allclose(loss.get_ydata(), df['loss'])
    assert [l.get_label() for l in lines] == ['ar (weighted)', 'tar (weighted)']
    np.testing.assert_allclose(lines[1].get_ydata(), df['tar'])
    np.testing.assert_allclose(lines[0].get_xdata(), df['iter'])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['loss', 'ar (weighted)', 'tar (weighted)']
    buf = io.BytesIO(); fig.savefig(buf, format='png')
    assert buf.getvalue()[:8] == b'\x89PNG\r\n\x1a\n'


def test_saved_plot_keeps_every_label_inside_the_figure():
    df = log_of([[0.02, 0.001 * i] for i in range(8)], [[2., 1.]] * 8).frame()
    fig = plot_history(df)
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # in inches, around every artist incl. the right label
    w, h = fig.get_size_inches()
    assert 0 <= box.x0 and box.x1 <= w and 0 <= box.y0 and box.y1 <= h, (box.bounds, (w, h))
    assert fig.axes[1].get_ylabel() == 'weighted penalty'


def test_plot_leaves_out_a_term_that_is_off_and_uses_a_given_axes():
    import matplotlib.pyplot as plt
    df = log_of([[0., 0.01]] * 3, [[0., 1.]] * 3).frame()
    fig, ax = plt.subplots()
    assert plot_history(df, ax=ax) is fig
    assert [l.get_label() for a in fig.axes for l in a.get_lines()] == ['loss', 'tar (weighted)']


def test_plot_without_history_says_to_fit_first():
    with pytest.raises(ValueError, match='fit'): plot_history(PenaltyHistory().frame())


# --- fit-table columns ------------------------------------------------------------------------------------------
def test_penalty_column_is_a_metric_read_when_logged():
    box = [1.5]
    col = PenaltyColumn('train_tar', lambda: box[0])
    assert isinstance(col, Metric) and mk_metric(col) is col  # `learn.metrics = [...]` keeps it as it is
    assert col.name == 'train_tar' and col.value == 1.5
    box[0] = 2.5
    col.reset(); col.accumulate(learn=None)  # the Recorder's calls leave the callback's sums alone
    assert col.value == 2.5
    assert pickle.loads(pickle.dumps(col)).value is None  # exported without the callback's sums: empty


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
