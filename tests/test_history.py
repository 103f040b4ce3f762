"The per-batch history frame and its plot (`fastai_tar/history.py`)."
import io
from types import SimpleNamespace

import matplotlib
matplotlib.use('Agg')  # headless, as on a CI machine
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from fastai_tar.history import history_frame, plot_history, rows_to_cpu

T = lambda kind, name: SimpleNamespace(kind=kind, name=name)


def rows_for(terms, coefs, losses=None):
    "History rows as the callback records them: loss and terms are tensors, coefficients floats."
    losses = losses if losses is not None else [3. - 0.1 * i for i in range(len(terms))]
    return [(i, torch.tensor(l), torch.tensor(t, dtype=torch.float32), c)
            for i, (l, t, c) in enumerate(zip(losses, terms, coefs))]


def test_one_module_per_kind():
    targets = [T('ar', '1.output_dp'), T('tar', '0')]
    terms = [[0.02, 0.001], [0.01, 0.003], [0., 0.002]]
    coefs = [[2., 0.], [2., 0.5], [2., 1.]]
    df = history_frame(rows_for(terms, coefs), targets)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta']
    assert df['iter'].tolist() == [0, 1, 2]
    np.testing.assert_allclose(df['loss'], [3., 2.9, 2.8], rtol=1e-6)
    np.testing.assert_allclose(df['ar'], [0.02, 0.01, 0.], rtol=1e-6)
    np.testing.assert_allclose(df['tar'], [0.001, 0.003, 0.002], rtol=1e-6)
    assert df['alpha'].tolist() == [2., 2., 2.] and df['beta'].tolist() == [0., 0.5, 1.]


def test_per_batch_loss_is_the_mean_of_an_unreduced_loss():
    rows = [(0, torch.tensor([1., 3.]), torch.tensor([0., 0.]), [0., 0.])]
    assert history_frame(rows, [T('ar', 'a'), T('tar', 't')])['loss'].tolist() == [2.]


def test_several_modules_get_their_own_columns():
    targets = [T('ar', '0.hidden_dps.0'), T('ar', '1.output_dp'), T('tar', '0.rnns.0'), T('tar', '0.rnns.1')]
    terms = [[0.1, 0.2, 0.01, 0.02], [0.3, 0.4, 0.03, 0.04]]
    coefs = [[2., 2., 0.5, 1.], [2., 2., 0.5, 1.]]  # AR shares alpha, TAR has one beta per layer
    df = history_frame(rows_for(terms, coefs), targets)
    assert list(df.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta',
                                'ar:0.hidden_dps.0', 'ar:1.output_dp',
                                'tar:0.rnns.0', 'tar:0.rnns.1', 'beta:0.rnns.0', 'beta:0.rnns.1']
    np.testing.assert_allclose(df['ar'], [0.3, 0.7], rtol=1e-6)
    np.testing.assert_allclose(df['tar'], [0.03, 0.07], rtol=1e-6)
    np.testing.assert_allclose(df['tar:0.rnns.1'], [0.02, 0.04], rtol=1e-6)
    assert df['alpha'].tolist() == [2., 2.]
    assert df['beta'].isna().all()  # no single beta was used: the per-module columns say which
    assert df['beta:0.rnns.0'].tolist() == [0.5, 0.5] and df['beta:0.rnns.1'].tolist() == [1., 1.]


def test_rows_moved_to_cpu_in_one_go_keep_their_values():
    targets = [T('ar', 'a'), T('tar', 't')]
    rows = rows_for([[0.02, 0.001], [0.01, 0.003]], [[2., 1.], [2., 1.]])
    moved = rows_to_cpu(rows)
    assert [r[0] for r in moved] == [0, 1] and [r[3] for r in moved] == [[2., 1.], [2., 1.]]
    assert all(r[1].device.type == 'cpu' and r[1].dim() == 0 for r in moved)
    pd.testing.assert_frame_equal(history_frame(moved, targets), history_frame(rows, targets))
    assert rows_to_cpu([]) == []


def test_no_batch_gives_the_columns_and_no_rows():
    df = history_frame([], [T('ar', 'a'), T('tar', 't')])
    assert list(df.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta'] and len(df) == 0


def test_plot_draws_loss_and_weighted_terms_headless():
    targets = [T('ar', 'a'), T('tar', 't')]
    terms = [[0.02 / (i + 1), 0.001 * i] for i in range(8)]
    df = history_frame(rows_for(terms, [[2., 1.]] * 8), targets)
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


def test_plot_leaves_out_a_term_that_is_off_and_uses_a_given_axes():
    import matplotlib.pyplot as plt
    df = history_frame(rows_for([[0., 0.01]] * 3, [[0., 1.]] * 3), [T('ar', 'a'), T('tar', 't')])
    fig, ax = plt.subplots()
    assert plot_history(df, ax=ax) is fig
    assert [l.get_label() for a in fig.axes for l in a.get_lines()] == ['loss', 'tar (weighted)']


def test_plot_without_history_says_to_fit_first():
    with pytest.raises(ValueError, match='fit'): plot_history(history_frame([], [T('ar', 'a'), T('tar', 't')]))
