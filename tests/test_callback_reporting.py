"""Seeing and steering the penalty: fit-table columns (one set per callback, CSVLogger, trackers, Recorder's train
metrics), the validation metrics (`valid_metrics=True`), the per-batch history and its plot, schedules as used per
batch, per-layer columns, and `repr`; each checked against references computed here from the model's own tensors."""
import io
import math

import matplotlib
matplotlib.use('Agg')  # headless, as on a CI machine
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.text.all import (SGD, CrossEntropyLossFlat, CSVLogger, Learner, ModelResetter, SaveModelCallback,
                             SchedCos, SchedLin, SchedNo, ShowGraphCallback, accuracy, combine_scheds)
from fastprogress.fastprogress import ConsoleMasterBar
from matplotlib.figure import Figure

import fastai_tar.callback
from fastai_tar import TARCallback
from conftest import (VOCAB, AliveAfterBatch, Boom, Capture, LossSpy, hook_ids, lm_dls, penalty, quiet_fit, ref_ar,
                      ref_penalty, ref_tar, tiny_lm)
from models import CheckpointLM

BS, SL, N_TRAIN, N_VALID = 4, 8, 12, 10  # 3 training batches; validation batches of 4, 4 and 2 sequences
N_BATCHES, N_VALID_BATCHES = math.ceil(N_TRAIN / BS), math.ceil(N_VALID / BS)


def tiny_learner(tar, cbs=(), metrics=(), seed=0):
    "A fastai AWD-LSTM language model with TARCallback only (it strips the (logits, raw, dropped) tuple)."
    learn = Learner(lm_dls(N_TRAIN, BS, SL, n_valid=N_VALID), tiny_lm(seed), loss_func=CrossEntropyLossFlat(),
                    metrics=list(metrics), cbs=[ModelResetter(), tar, *cbs])
    torch.manual_seed(seed + 1)  # the same dropout masks for runs built the same way
    return learn


def smooth(losses, beta=0.98):
    "fastai's `AvgSmoothLoss` after each of `losses`: the debiased exponential moving average."
    val, out = 0., []
    for i, l in enumerate(losses, 1):
        val = beta * val + (1 - beta) * l
        out.append(val / (1 - beta ** i))
    return out


# --- fit table ---------------------------------------------------------------------------------------------
def test_fit_table_shows_weighted_epoch_means_and_plain_losses(capsys):
    tar, spy = TARCallback(), LossSpy()
    learn = tiny_learner(tar, cbs=[spy], metrics=[accuracy])
    mets = list(learn.metrics)
    enc = learn.model[0]
    last_rnn, dropped = Capture(enc.rnns[-1]), Capture(learn.model[1].output_dp)
    learn.fit(2, 1e-2)
    out = capsys.readouterr().out
    rec = learn.recorder
    names, values = rec.metric_names, [list(v) for v in rec.values]
    assert names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'accuracy', 'time']

    h = tar.history
    assert len(h) == 2 * N_BATCHES
    # each batch: alpha * AR of the dropped output and beta * TAR of the last layer's raw output, by hand
    np.testing.assert_allclose(h['ar'], [2 * ref_ar(d) for d in dropped.train_outputs], rtol=1e-5)
    np.testing.assert_allclose(h['tar'], [1 * ref_tar(r) for r in last_rnn.train_outputs], rtol=1e-5)
    assert spy.added == [penalty(a + t) for a, t in zip(h['ar'], h['tar'])]  # what went into loss_grad
    np.testing.assert_array_equal(h['loss'], np.float32(spy.plain))  # the plain loss, penalty left out

    for e in range(2):
        epoch = h.iloc[e * N_BATCHES:(e + 1) * N_BATCHES]
        train_loss, valid_loss, train_ar, train_tar, acc = values[e]
        assert train_ar == pytest.approx(epoch['ar'].mean(), rel=1e-6)
        assert train_tar == pytest.approx(epoch['tar'].mean(), rel=1e-6)
        # train_loss is fastai's smoothed loss of the plain per-batch losses
        assert train_loss == pytest.approx(smooth(h['loss'])[(e + 1) * N_BATCHES - 1], rel=1e-6)
        row = '  '.join(f'{v:.6f}' for v in values[e])
        assert row.replace('  ', ' ') in ' '.join(out.split()), "the epoch's row as ProgressCallback prints it"
    assert ' '.join(names) in ' '.join(out.split())
    assert [id(m) for m in learn.metrics] == [id(m) for m in mets]

    # valid_loss is the plain validation loss: what learn.validate() gives without any penalty column
    assert learn.validate() == [pytest.approx(values[-1][1], rel=1e-6), pytest.approx(values[-1][4])]
    assert len(tar.history) == 2 * N_BATCHES  # validate() runs before_fit/after_fit but keeps the last fit's record
    assert [id(m) for m in learn.metrics] == [id(m) for m in mets]


@pytest.mark.parametrize('kw, columns', [
    (dict(alpha=0.), ['train_tar']),
    (dict(beta=0.), ['train_ar']),
    (dict(alpha=0., beta=0.), []),
    (dict(show_columns=False), []),
])
def test_columns_only_for_terms_that_are_on(kw, columns):
    tar, spy = TARCallback(**kw), LossSpy()
    learn = tiny_learner(tar, cbs=[spy])
    quiet_fit(learn)
    assert learn.recorder.metric_names == ['epoch', 'train_loss', 'valid_loss', *columns, 'time']
    h = tar.history
    for kind, coef in (('ar', 'alpha'), ('tar', 'beta')):
        if kw.get(coef) == 0.: assert (h[kind] == 0).all() and (h[coef] == 0).all()
    assert spy.added == [penalty(a + t) for a, t in zip(h['ar'], h['tar'])]


def test_csv_logger_and_show_graph_see_the_columns(tmp_path, monkeypatch):
    graphs = []  # what ShowGraphCallback asks the progress bar to draw (the console bar draws nothing)
    monkeypatch.setattr(ConsoleMasterBar, 'update_graph', lambda self, g, *a, **k: graphs.append(g), raising=True)
    learn = tiny_learner(TARCallback(valid_metrics=True), cbs=[CSVLogger(), ShowGraphCallback()])
    learn.path = tmp_path
    learn.fit(2, 1e-2)
    rec = learn.recorder
    names = ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'valid_ar', 'valid_tar', 'time']
    assert rec.metric_names == names
    log = learn.csv_logger.read_log()
    assert list(log.columns) == names
    np.testing.assert_allclose(log[names[1:-1]].to_numpy(), np.array(rec.values), rtol=1e-6)
    assert len(graphs) == 2
    (train_x, train_y), (valid_x, valid_y) = graphs[-1]
    assert [float(v) for v in valid_y] == [v[1] for v in rec.values]  # the valid_loss column, not a penalty
    assert list(train_y) == rec.losses


def test_recorder_with_train_metrics_gets_train_and_valid_pairs():
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar, metrics=[accuracy])
    learn.recorder.train_metrics = True
    valid_out = Capture(learn.model[0])
    quiet_fit(learn)
    names = learn.recorder.metric_names
    assert names == ['epoch', 'train_loss', 'train_ar', 'train_tar', 'train_accuracy',
                     'valid_loss', 'valid_ar', 'valid_tar', 'valid_accuracy', 'time']
    row = dict(zip(names[1:-1], learn.recorder.values[-1]))
    h = tar.history
    assert row['train_ar'] == pytest.approx(h['ar'].mean(), rel=1e-6)
    assert row['train_tar'] == pytest.approx(h['tar'].mean(), rel=1e-6)
    hs = valid_out.valid_outputs
    assert row['valid_ar'] == pytest.approx(ref_penalty(1., 0., *hs), rel=1e-5)  # AR pooled over the batches
    assert row['valid_tar'] > 0 and row['valid_tar'] != pytest.approx(row['train_tar'])


def test_recorder_with_train_metrics_and_no_valid_metrics_shows_none_for_validation():
    learn = tiny_learner(TARCallback(), metrics=[accuracy])
    learn.recorder.train_metrics = True
    quiet_fit(learn)
    names = learn.recorder.metric_names
    assert names[:4] == ['epoch', 'train_loss', 'train_ar', 'train_tar'] and names[6:8] == ['valid_ar', 'valid_tar']
    row = dict(zip(names[1:-1], learn.recorder.values[-1]))
    assert row['valid_ar'] is None and row['valid_tar'] is None  # not computed: valid_metrics=False
    assert row['train_ar'] > 0


def test_recorder_without_validation_logging_warns_about_valid_metrics():
    learn = tiny_learner(TARCallback(valid_metrics=True))
    learn.recorder.train_metrics, learn.recorder.valid_metrics = True, False
    with pytest.warns(UserWarning, match=r'valid_metrics=True\) has no column'): quiet_fit(learn)
    assert learn.recorder.metric_names == ['epoch', 'train_loss', 'train_ar', 'train_tar', 'time']
    assert len(learn.recorder.values[-1]) == 3


def test_fit_that_raised_leaves_no_stale_column():
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar, metrics=[accuracy])
    mets = [id(m) for m in learn.metrics]
    with pytest.raises(RuntimeError, match='boom'): quiet_fit(learn, cbs=Boom(RuntimeError('boom'), at=2))
    assert len(tar.history) == 2  # the batches the failed fit trained on
    with learn.no_bar(): res = learn.validate()  # the failed fit's hooks and columns go here
    assert hook_ids(learn.model) == set()
    assert len(res) == 2  # valid_loss, accuracy: no penalty column left from the failed fit
    assert [id(m) for m in learn.metrics] == mets
    quiet_fit(learn)
    assert learn.recorder.metric_names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'accuracy',
                                           'valid_ar', 'valid_tar', 'time']
    assert len(learn.recorder.values[-1]) == 7 and None not in learn.recorder.values[-1]
    assert [id(m) for m in learn.metrics] == mets


def test_tracker_callbacks_can_monitor_a_penalty_column(tmp_path):
    learn = tiny_learner(TARCallback(valid_metrics=True),
                         cbs=[SaveModelCallback(monitor='valid_tar', comp=np.less, fname='m')])
    learn.path = tmp_path
    quiet_fit(learn, 3)
    col = learn.recorder.metric_names[1:].index('valid_tar')
    assert learn.save_model.best == min(v[col] for v in learn.recorder.values)


# --- validation smoothness ---------------------------------------------------------------------------------------
def test_valid_metrics_are_the_pooled_unweighted_penalty_of_the_validation_set():
    tar = TARCallback(alpha=2., beta=3., valid_metrics=True)
    learn = tiny_learner(tar)
    raw, dropped = Capture(learn.model[0]), Capture(learn.model[1].output_dp)
    quiet_fit(learn, 2)
    names, last = learn.recorder.metric_names, learn.recorder.values[-1]
    assert names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'valid_ar', 'valid_tar', 'time']
    assert len(raw.valid_outputs) == 2 * N_VALID_BATCHES
    hs, ds = raw.valid_outputs[-N_VALID_BATCHES:], dropped.valid_outputs[-N_VALID_BATCHES:]  # the last epoch's
    assert [h.shape[0] for h in hs] == [4, 4, 2]
    # pooled over the whole validation set: one sum over every element (pair) over one count, coefficients left out
    pooled_ar, pooled_tar = ref_penalty(1., 0., *ds), ref_penalty(0., 1., *hs)
    row = dict(zip(names[1:-1], last))
    assert row['valid_ar'] == pytest.approx(pooled_ar, rel=1e-5)
    assert row['valid_tar'] == pytest.approx(pooled_tar, rel=1e-5)
    assert np.mean([ref_tar(h) for h in hs]) != pytest.approx(pooled_tar, rel=1e-4)  # a mean of batch means differs


def test_valid_metrics_add_nothing_to_the_loss():
    "valid_metrics=True reads the validation activations but adds nothing to the validation loss_grad."
    runs = []
    for valid_metrics in (False, True):
        tar, spy = TARCallback(valid_metrics=valid_metrics), LossSpy()
        learn = tiny_learner(tar, cbs=[spy])
        quiet_fit(learn)
        runs.append(([v[:4] for v in learn.recorder.values], tar.history, spy, learn.recorder.values[-1]))
    (values_off, hist_off, _, _), (values_on, hist_on, spy, last) = runs
    assert values_on == values_off  # train_loss, valid_loss, train_ar, train_tar: the same numbers
    pd.testing.assert_frame_equal(hist_on, hist_off)
    # valid_loss is fastai's copy of the loss taken before after_loss: only loss_grad shows what a callback added
    assert spy.valid_added == [0.] * N_VALID_BATCHES
    assert last[-2] > 0 and last[-1] > 0  # valid_ar, valid_tar: the validation activations were read
    assert min(spy.added) > 1e-4  # the same spy sees the penalty in training: it can tell


def test_valid_metrics_keep_no_activation_after_each_batch():
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar)
    caps = [Capture(learn.model[0], keep=False), Capture(learn.model[0].rnns[-1], keep=False)]
    probe = AliveAfterBatch(caps)
    quiet_fit(learn, cbs=probe)
    assert learn.recorder.values[-1][-1] > 0  # valid_tar was computed from those activations
    assert probe.phases == ['train'] * N_BATCHES + ['valid'] * N_VALID_BATCHES
    assert [len(c.refs) for c in caps] == [N_BATCHES + N_VALID_BATCHES] * 2
    assert probe.alive == [0] * (N_BATCHES + N_VALID_BATCHES)


def test_valid_metrics_not_computed_in_get_preds_or_validate(monkeypatch):
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar)
    # The LM returns (logits, raw, dropped): the callback reads the terms there, then sums them in `term_sums`.
    seen, term_sums = [], fastai_tar.hooks.term_sums
    monkeypatch.setattr(fastai_tar.hooks, 'term_sums', lambda parts: seen.append(learn.training) or term_sums(parts))
    quiet_fit(learn)
    assert set(seen) == {True, False}  # computed in training and validation
    seen.clear()
    with learn.no_bar():
        preds, _ = learn.get_preds()
        learn.validate()
        learn.get_preds(inner=True)
    assert preds.shape == (N_VALID, SL, VOCAB)
    assert seen == [] and hook_ids(learn.model) == set()  # nothing hooked, nothing computed


# --- history and plot -------------------------------------------------------------------------------------------
def test_history_is_one_row_per_training_batch_of_the_last_fit_and_plots_headless():
    tar = TARCallback()
    learn = tiny_learner(tar)
    quiet_fit(learn, 1)
    quiet_fit(learn, 2)
    h = tar.history
    assert isinstance(h, pd.DataFrame)
    assert list(h.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta']
    assert h['iter'].tolist() == list(range(2 * N_BATCHES))
    assert (h['alpha'] == 2.).all() and (h['beta'] == 1.).all()
    assert matplotlib.get_backend().lower() == 'agg'
    fig = learn.tar.plot()
    assert isinstance(fig, Figure)
    ax, pen = fig.axes
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), h['loss'])
    np.testing.assert_allclose(pen.get_lines()[1].get_ydata(), h['tar'])
    buf = io.BytesIO(); fig.savefig(buf, format='png')
    assert buf.getvalue()[:4] == b'\x89PNG'


def test_history_moves_to_the_host_once_per_epoch_and_keeps_one_buffer():
    "No per-batch transfer and no tensor per batch: rows reach the host arrays only when a training epoch ends."
    from fastai.callback.core import Callback

    class Watch(Callback):
        order = 100
        def before_fit(self): self.seen = []
        def after_batch(self):
            if self.training:
                log = self.learn.tar.log
                self.seen.append((sum(len(g.values) for g in log.segments), log._n_buf, id(log._buf)))
    tar, watch = TARCallback(), Watch()
    learn = tiny_learner(tar, cbs=[watch])
    quiet_fit(learn, 2)
    per_epoch = [watch.seen[:N_BATCHES], watch.seen[N_BATCHES:]]
    assert [v for v, _, _ in per_epoch[0]] == [0] * N_BATCHES  # nothing on the host during the first epoch
    assert [v for v, _, _ in per_epoch[1]] == [3 * N_BATCHES] * N_BATCHES  # loss, ar, tar of each first-epoch batch
    assert [n for _, n, _ in watch.seen] == list(range(1, N_BATCHES + 1)) * 2
    assert len({b for _, _, b in per_epoch[0]}) == 1  # one buffer per epoch, not a tensor per batch
    assert len(tar.history) == 2 * N_BATCHES and tar.log._buf is None


# --- schedules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kw', [
    dict(alpha=SchedLin(0, 2)),
    dict(beta=SchedCos(1., 0.)),
    dict(beta=combine_scheds([0.5, 0.5], [SchedNo(0., 0.), SchedLin(0., 1.)])),
    dict(alpha=lambda pct: 0.5 + pct, beta=SchedLin(0., 2.)),
], ids=['SchedLin', 'SchedCos', 'combine_scheds', 'callable'])
def test_schedule_value_used_is_the_history_and_the_schedule_at_pct_train(kw):
    tar, spy = TARCallback(**kw), LossSpy()
    learn = tiny_learner(tar, cbs=[spy])
    raw, dropped = Capture(learn.model[0]), Capture(learn.model[1].output_dp)
    quiet_fit(learn, 2)
    h, total = tar.history, 2 * N_BATCHES
    pcts = [i / total for i in range(total)]  # fastai's pct_train at batch i: over both epochs
    assert spy.pct == pytest.approx(pcts)
    at = lambda c, p: float(c(p)) if callable(c) else c
    alphas = [at(kw.get('alpha', 2.), p) for p in pcts]
    betas = [at(kw.get('beta', 1.), p) for p in pcts]
    assert len(set(alphas + betas)) > 2  # the schedule moved
    np.testing.assert_allclose(h['alpha'], alphas, rtol=1e-6)
    np.testing.assert_allclose(h['beta'], betas, rtol=1e-6)
    ref = [a * ref_ar(d) + b * ref_tar(r)
           for a, b, d, r in zip(alphas, betas, dropped.train_outputs, raw.train_outputs)]
    assert spy.added == [penalty(v) for v in ref]


def test_readme_warm_up_one_liner():
    tar = TARCallback(beta=SchedLin(0., 1.))  # the README's line: TAR warms up from 0 to 1 over the fit
    learn = tiny_learner(tar)
    quiet_fit(learn, 2)
    h, total = tar.history, 2 * N_BATCHES
    np.testing.assert_allclose(h['beta'], [i / total for i in range(total)], rtol=1e-6)
    assert h['tar'][0] == 0 and (h['tar'][1:] > 0).all()
    assert (h['alpha'] == 2.).all()


def test_schedule_going_negative_during_fit_raises_and_unhooks():
    tar = TARCallback(beta=lambda pct: abs(pct - 0.5) - 0.1)  # fine at 0 and 1, negative around the middle
    learn = tiny_learner(tar)
    with pytest.raises(ValueError, match=r'beta must be a finite number >= 0.*got -0.1'): quiet_fit(learn, 2)
    assert hook_ids(learn.model) == set()
    assert 0 < len(tar.history) < 2 * N_BATCHES


# --- several layers ---------------------------------------------------------------------------------------------
def test_all_layers_regularizes_each_awd_lstm_layer():
    tar, spy = TARCallback(all_layers=True), LossSpy()
    learn = tiny_learner(tar, cbs=[spy])
    enc = learn.model[0]
    rnn0, rnn1, hd0, out_dp = (Capture(m) for m in (enc.rnns[0], enc.rnns[1], enc.hidden_dps[0],
                                                    learn.model[1].output_dp))
    quiet_fit(learn)
    h = tar.history
    assert list(h.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta', 'ar:0.hidden_dps.0',
                               'ar:1.output_dp', 'tar:0.rnns.0', 'tar:0.rnns.1']
    refs = {'ar:0.hidden_dps.0': [2 * ref_ar(x) for x in hd0.train_outputs],
            'ar:1.output_dp': [2 * ref_ar(x) for x in out_dp.train_outputs],
            'tar:0.rnns.0': [ref_tar(x) for x in rnn0.train_outputs],
            'tar:0.rnns.1': [ref_tar(x) for x in rnn1.train_outputs]}
    for col, ref in refs.items(): np.testing.assert_allclose(h[col], ref, rtol=1e-5)
    total = np.sum(list(refs.values()), axis=0)
    assert spy.added == [penalty(v) for v in total]
    np.testing.assert_allclose(h['ar'] + h['tar'], total, rtol=1e-5)


def test_explicit_modules_with_their_own_coefficients():
    spy = LossSpy()
    learn = tiny_learner(TARCallback(), cbs=[spy])  # built first: the modules below are this model's
    enc = learn.model[0]
    learn.remove_cb(learn.tar)
    tar = TARCallback(modules={enc.rnns[0]: 0.5, '0.rnns.1': 2.}, ar_modules={'1.output_dp': 3.})
    learn.add_cb(tar)
    rnn0, rnn1, out_dp = Capture(enc.rnns[0]), Capture(enc.rnns[1]), Capture(learn.model[1].output_dp)
    quiet_fit(learn)
    h = tar.history
    assert list(h.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta',
                               'tar:0.rnns.0', 'tar:0.rnns.1', 'beta:0.rnns.0', 'beta:0.rnns.1']
    assert h['beta'].isna().all() and (h['beta:0.rnns.0'] == 0.5).all() and (h['beta:0.rnns.1'] == 2.).all()
    assert (h['alpha'] == 3.).all()  # the coefficient used, not the unused default alpha=2
    ref = [0.5 * ref_tar(a) + 2 * ref_tar(b) + 3 * ref_ar(d)
           for a, b, d in zip(rnn0.train_outputs, rnn1.train_outputs, out_dp.train_outputs)]
    assert spy.added == [penalty(v) for v in ref]
    np.testing.assert_allclose(h['tar:0.rnns.1'], [2 * ref_tar(b) for b in rnn1.train_outputs], rtol=1e-5)


def test_sequences_of_coefficients_match_modules():
    tar, spy = TARCallback(alpha=[0.5], beta=[SchedLin(0., 1.), 1.], modules=['0.rnns.0', '0.rnns.1'],
                           ar_modules=['1.output_dp']), LossSpy()
    learn = tiny_learner(tar, cbs=[spy])
    enc = learn.model[0]
    rnn0, rnn1, out_dp = Capture(enc.rnns[0]), Capture(enc.rnns[1]), Capture(learn.model[1].output_dp)
    quiet_fit(learn)
    h, pcts = tar.history, [i / N_BATCHES for i in range(N_BATCHES)]
    np.testing.assert_allclose(h['beta:0.rnns.0'], pcts, rtol=1e-6)
    ref = [0.5 * ref_ar(d) + p * ref_tar(a) + ref_tar(b)
           for p, a, b, d in zip(pcts, rnn0.train_outputs, rnn1.train_outputs, out_dp.train_outputs)]
    assert spy.added == [penalty(v) for v in ref]


def test_default_stays_last_layer_only():
    learn = tiny_learner(TARCallback())
    quiet_fit(learn)
    assert [(r.kind, r.name) for r in learn.tar.reads] == [('ar', 'dropped'), ('tar', 'raw')]


# --- repr ----------------------------------------------------------------------------------------------------------
def test_repr_says_what_is_hooked_and_with_which_coefficients():
    tar = TARCallback(beta=SchedLin(0., 1.))
    assert repr(tar) == "TARCallback(alpha=2.0, beta=SchedLin(0.0, 1.0))"
    learn = tiny_learner(tar)
    before = ("TARCallback(alpha=2.0, beta=SchedLin(0.0, 1.0)): if the model's forward returns fastai's (logits, raw, "
              "dropped): AR dropped (output[2]): alpha=2.0; TAR raw (output[1]): beta=SchedLin(0.0, 1.0); otherwise, "
              "found from the model's structure: AR the dropout that takes the output TAR reads, else that output: "
              "alpha=2.0; TAR the last RNN module, 0 (AWD_LSTM): beta=SchedLin(0.0, 1.0); (settled at the first "
              "training batch)")
    assert repr(learn.tar) == before
    quiet_fit(learn)  # the LM returns (logits, raw, dropped): the fit read the terms there, not through hooks
    contract = "fastai's (logits, raw, dropped)"
    assert repr(learn.tar) == ("TARCallback(alpha=2.0, beta=SchedLin(0.0, 1.0)): "
                               f"AR dropped (output[2]): alpha=2.0; {contract}; TAR raw (output[1]): "
                               "beta=SchedLin(0.0, 1.0); "
                               f"time axis 1 (fastai's text modules are batch-first); {contract}")


def test_unattached_repr_shows_what_was_passed():
    "Every argument given, in the signature's order; defaults left out."
    tar = TARCallback(modules='x', ar_modules=[nn.LSTM(2, 2), 'y'], seq_dim=np.int64(0), show_columns=False)
    assert repr(tar) == ("TARCallback(alpha=2.0, beta=1.0, modules='x', ar_modules=[LSTM, 'y'], seq_dim=0, "
                         "show_columns=False)")
    assert repr(TARCallback(modules={'0.rnns.0': .5})) == "TARCallback(alpha=2.0, beta=1.0, modules={'0.rnns.0': 0.5})"
    assert repr(TARCallback(contract=False)) == "TARCallback(alpha=2.0, beta=1.0, contract=False)"


def test_repr_of_several_layers_and_a_term_that_is_off():
    learn = tiny_learner(TARCallback(alpha=0., all_layers=True, valid_metrics=True))
    quiet_fit(learn)
    found, axis = "found: each layer of fastai's AWD_LSTM", "time axis 1 (batch_first=True)"
    dropout = "found: the dropout that takes the output of"
    assert repr(learn.tar) == ("TARCallback(alpha=0.0, beta=1.0, all_layers=True, valid_metrics=True): "
                               f"AR 0.hidden_dps.0 (RNNDropout): alpha=0.0 (off in training); {dropout} 0.rnns.0; "
                               f"AR 1.output_dp (RNNDropout): alpha=0.0 (off in training); {dropout} 0.rnns.1; "
                               f"TAR 0.rnns.0 (WeightDropout): beta=1.0; {axis}; {found}; "
                               f"TAR 0.rnns.1 (WeightDropout): beta=1.0; {axis}; {found}")


def test_repr_of_a_set_up_that_cannot_hook_says_why():
    learn = tiny_learner(TARCallback(modules=['encoder.rnn'], ar_modules=['1.output_dp']))
    assert repr(learn.tar).startswith("TARCallback(alpha=2.0, beta=1.0, modules=['encoder.rnn'], "
                                      "ar_modules=['1.output_dp']): cannot hook: modules: "
                                      "no module named 'encoder.rnn'")
    assert '\n' not in repr(learn.tar)


# --- two callbacks: both sets of columns and both penalties -----------------------------------------------------------
def test_two_callbacks_keep_both_columns_and_both_penalties():
    model, spy = CheckpointLM(), LossSpy()
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[TARCallback(2., 0., modules='lstm'), TARCallback(0., 3., modules='lstm'), spy])
    quiet_fit(learn)
    names = learn.recorder.metric_names
    assert 'train_ar' in names and 'train_tar_2' in names and 'train_tar' not in names
    row = dict(zip(names[1:], learn.recorder.values[-1]))
    ars, tars = [2 * ref_ar(h) for h in cap.train_outputs], [3 * ref_tar(h) for h in cap.train_outputs]
    assert row['train_ar'] == pytest.approx(np.mean(ars), rel=1e-5)
    assert row['train_tar_2'] == pytest.approx(np.mean(tars), rel=1e-5)
    assert spy.added == [penalty(a + t) for a, t in zip(ars, tars)]
    assert learn.metrics == []  # each took its own columns out
