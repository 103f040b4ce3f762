"""Seeing and steering the penalty (issue 5): fit-table columns, validation smoothness, history and plot,
schedules, several layers and `repr`, each checked against references computed here from the model's own tensors."""
import gc
import io
import math
import weakref

import matplotlib
matplotlib.use('Agg')  # headless, as on a CI machine
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.text.all import (Callback, CrossEntropyLossFlat, CSVLogger, DataLoaders, Learner, ModelResetter,
                             SaveModelCallback, SchedCos, SchedLin, SchedNo, ShowGraphCallback, accuracy,
                             combine_scheds)
from fastprogress.fastprogress import ConsoleMasterBar
from matplotlib.figure import Figure

from fastai_tar import TARCallback
from conftest import VOCAB, tiny_lm

BS, SL, N_TRAIN, N_VALID = 4, 8, 12, 10  # 3 training batches; validation batches of 4, 4 and 2 sequences


def make_dls(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (N_TRAIN + N_VALID, SL + 1), generator=g)
    items = list(zip(x[:, :-1], x[:, 1:]))
    return DataLoaders.from_dsets(items[:N_TRAIN], items[N_TRAIN:], bs=BS, shuffle=False, device='cpu', num_workers=0)


def tiny_learner(tar, cbs=(), metrics=(), seed=0):
    "A fastai AWD-LSTM language model with TARCallback only (it strips the (logits, raw, dropped) tuple)."
    learn = Learner(make_dls(), tiny_lm(seed), loss_func=CrossEntropyLossFlat(), metrics=list(metrics),
                    cbs=[ModelResetter(), tar, *cbs])
    torch.manual_seed(seed + 1)  # the same dropout masks for runs built the same way
    return learn


def quiet_fit(learn, n_epoch=1, **kw):
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, 1e-2, **kw)


N_BATCHES = math.ceil(N_TRAIN / BS)


def ar64(h): return h.double().pow(2).mean().item()
def tar64(h): h = h.double(); return (h[:, 1:] - h[:, :-1]).pow(2).mean().item()
def hooks_of(model): return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Outputs:
    "The test's own forward hook: what `module` returned in training (float64 copies) and in evaluation."
    def __init__(self, module):
        self.train, self.valid = [], []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inp, out):
        h = out[0] if isinstance(out, tuple) else out  # an RNN's (output, state)
        (self.train if module.training else self.valid).append(h.detach().double().clone())


class LossSpy(Callback):
    "After TARCallback's after_loss: the plain loss, what was added to loss_grad, and fastai's pct_train."
    order, run_valid = TARCallback.order + 1, False

    def before_fit(self): self.plain, self.added, self.pct = [], [], []

    def after_loss(self):
        self.plain.append(self.learn.loss.item())
        self.added.append((self.learn.loss_grad - self.learn.loss).item())
        self.pct.append(self.learn.pct_train)


def penalty(expected):
    "`loss_grad - loss` is read from two float32 numbers near the loss: a few ulps of it are the limit."
    return pytest.approx(expected, rel=1e-5, abs=1e-6)


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
    last_rnn, dropped = Outputs(enc.rnns[-1]), Outputs(learn.model[1].output_dp)
    learn.fit(2, 1e-2)
    out = capsys.readouterr().out
    rec = learn.recorder
    names, values = rec.metric_names, [list(v) for v in rec.values]
    assert names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'accuracy', 'time']

    h = tar.history
    assert len(h) == 2 * N_BATCHES
    # each batch: alpha * AR of the dropped output and beta * TAR of the last layer's raw output, by hand
    np.testing.assert_allclose(h['ar'], [2 * ar64(d) for d in dropped.train], rtol=1e-5)
    np.testing.assert_allclose(h['tar'], [1 * tar64(r) for r in last_rnn.train], rtol=1e-5)
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
    valid_out = Outputs(learn.model[0])
    quiet_fit(learn)
    names = learn.recorder.metric_names
    assert names == ['epoch', 'train_loss', 'train_ar', 'train_tar', 'train_accuracy',
                     'valid_loss', 'valid_ar', 'valid_tar', 'valid_accuracy', 'time']
    row = dict(zip(names[1:-1], learn.recorder.values[-1]))
    h = tar.history
    assert row['train_ar'] == pytest.approx(h['ar'].mean(), rel=1e-6)
    assert row['train_tar'] == pytest.approx(h['tar'].mean(), rel=1e-6)
    hs = valid_out.valid
    assert row['valid_ar'] == pytest.approx(sum(x.pow(2).sum().item() for x in hs) / sum(x.numel() for x in hs),
                                            rel=1e-5)
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


class Boom(Callback):
    def after_batch(self):
        if self.training and self.iter == 1: raise RuntimeError('boom')


def test_fit_that_raised_leaves_no_stale_column():
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar, metrics=[accuracy])
    mets = [id(m) for m in learn.metrics]
    with pytest.raises(RuntimeError, match='boom'): quiet_fit(learn, cbs=Boom())
    assert len(tar.history) == 2  # the batches the failed fit trained on
    assert hooks_of(learn.model) == 0
    with learn.no_bar(): res = learn.validate()
    assert len(res) == 2  # valid_loss, accuracy: no penalty column left from the failed fit
    assert [id(m) for m in learn.metrics] == mets
    quiet_fit(learn)
    assert learn.recorder.metric_names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'accuracy',
                                           'valid_ar', 'valid_tar', 'time']
    assert len(learn.recorder.values[-1]) == 7 and None not in learn.recorder.values[-1]
    assert [id(m) for m in learn.metrics] == mets


def test_tracker_callbacks_can_monitor_a_penalty_column(tmp_path):
    learn = tiny_learner(TARCallback(valid_metrics=True), cbs=[SaveModelCallback(monitor='valid_tar', comp=np.less, fname='m')])
    learn.path = tmp_path
    quiet_fit(learn, 3)
    col = learn.recorder.metric_names[1:].index('valid_tar')
    assert learn.save_model.best == min(v[col] for v in learn.recorder.values)


# --- validation smoothness ---------------------------------------------------------------------------------------
def test_valid_metrics_are_the_pooled_unweighted_penalty_of_the_validation_set():
    tar = TARCallback(alpha=2., beta=3., valid_metrics=True)
    learn = tiny_learner(tar)
    raw, dropped = Outputs(learn.model[0]), Outputs(learn.model[1].output_dp)
    quiet_fit(learn, 2)
    names, last = learn.recorder.metric_names, learn.recorder.values[-1]
    assert names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'valid_ar', 'valid_tar', 'time']
    n_valid_batches = math.ceil(N_VALID / BS)
    assert len(raw.valid) == 2 * n_valid_batches
    hs, ds = raw.valid[-n_valid_batches:], dropped.valid[-n_valid_batches:]  # the last epoch's validation
    assert [h.shape[0] for h in hs] == [4, 4, 2]
    # pooled over the whole validation set: one sum over every element (pair) over one count, coefficients left out
    ref_ar = sum(d.pow(2).sum().item() for d in ds) / sum(d.numel() for d in ds)
    d2 = [(h[:, 1:] - h[:, :-1]).pow(2) for h in hs]
    ref_tar = sum(d.sum().item() for d in d2) / sum(d.numel() for d in d2)
    row = dict(zip(names[1:-1], last))
    assert row['valid_ar'] == pytest.approx(ref_ar, rel=1e-5)
    assert row['valid_tar'] == pytest.approx(ref_tar, rel=1e-5)
    assert np.mean([tar64(h) for h in hs]) != pytest.approx(ref_tar, rel=1e-4)  # a mean of batch means differs


def test_valid_metrics_add_nothing_to_the_loss():
    runs = []
    for valid_metrics in (False, True):
        tar = TARCallback(valid_metrics=valid_metrics)
        learn = tiny_learner(tar)
        quiet_fit(learn)
        runs.append(([v[:4] for v in learn.recorder.values], tar.history))
    (values_off, hist_off), (values_on, hist_on) = runs
    assert values_on == values_off  # train_loss, valid_loss, train_ar, train_tar: the same numbers
    pd.testing.assert_frame_equal(hist_on, hist_off)


class AliveAfterBatch(Callback):
    "After every callback's after_batch in validation: is any activation the model produced still referenced?"
    order, run_train = 100, False

    def __init__(self, module):
        self.refs, self.alive = [], []
        module.register_forward_hook(lambda m, i, o: self.refs.append(weakref.ref(o[0] if isinstance(o, tuple) else o)))

    def after_batch(self):
        gc.collect()
        self.alive.append(sum(r() is not None for r in self.refs))
        self.refs = []


def test_valid_metrics_keep_no_activation_after_each_batch():
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar)
    probes = [AliveAfterBatch(learn.model[0]), AliveAfterBatch(learn.model[0].rnns[-1])]
    quiet_fit(learn, cbs=probes)
    assert learn.recorder.values[-1][-1] > 0  # valid_tar was computed from those activations
    for p in probes: assert p.alive == [0] * math.ceil(N_VALID / BS)


def test_valid_metrics_not_computed_in_get_preds_or_validate():
    tar = TARCallback(valid_metrics=True)
    learn = tiny_learner(tar)
    seen = []  # (training, how many forward hooks the encoder carries) at each forward
    learn.model[0].register_forward_hook(lambda m, i, o: seen.append((m.training, len(m._forward_hooks))))
    quiet_fit(learn)
    assert set(seen) == {(True, 2), (False, 2)}  # TARCallback's hook next to ours: in training and validation
    seen.clear()
    with learn.no_bar():
        preds, _ = learn.get_preds()
        learn.validate()
        learn.get_preds(inner=True)
    assert preds.shape == (N_VALID, SL, VOCAB)
    assert seen and set(seen) == {(False, 1)}  # only ours: nothing hooked, nothing computed


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
    raw, dropped = Outputs(learn.model[0]), Outputs(learn.model[1].output_dp)
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
    ref = [a * ar64(d) + b * tar64(r) for a, b, d, r in zip(alphas, betas, dropped.train, raw.train)]
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
    assert hooks_of(learn.model) == 0
    assert 0 < len(tar.history) < 2 * N_BATCHES


@pytest.mark.parametrize('kw, arg', [
    (dict(alpha=-1.), 'alpha'), (dict(beta=float('nan')), 'beta'), (dict(alpha='2'), 'alpha'),
    (dict(beta=SchedLin(1., -1.)), 'beta'), (dict(alpha=[1., -1.]), 'alpha'),
    (dict(modules={'0.rnns.0': -1.}), 'beta'), (dict(ar_modules={'1.output_dp': float('inf')}), 'alpha'),
])
def test_bad_coefficients_rejected_at_construction(kw, arg):
    with pytest.raises(ValueError, match=rf'^{arg} must be a finite number >= 0'): TARCallback(**kw)


# --- several layers ---------------------------------------------------------------------------------------------
def test_all_layers_regularizes_each_awd_lstm_layer():
    tar, spy = TARCallback(all_layers=True), LossSpy()
    learn = tiny_learner(tar, cbs=[spy])
    enc = learn.model[0]
    rnn0, rnn1, hd0, out_dp = (Outputs(m) for m in (enc.rnns[0], enc.rnns[1], enc.hidden_dps[0],
                                                    learn.model[1].output_dp))
    quiet_fit(learn)
    h = tar.history
    assert list(h.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta', 'ar:0.hidden_dps.0',
                               'ar:1.output_dp', 'tar:0.rnns.0', 'tar:0.rnns.1']
    refs = {'ar:0.hidden_dps.0': [2 * ar64(x) for x in hd0.train],
            'ar:1.output_dp': [2 * ar64(x) for x in out_dp.train],
            'tar:0.rnns.0': [tar64(x) for x in rnn0.train], 'tar:0.rnns.1': [tar64(x) for x in rnn1.train]}
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
    rnn0, rnn1, out_dp = Outputs(enc.rnns[0]), Outputs(enc.rnns[1]), Outputs(learn.model[1].output_dp)
    quiet_fit(learn)
    h = tar.history
    assert list(h.columns) == ['iter', 'loss', 'ar', 'tar', 'alpha', 'beta',
                               'tar:0.rnns.0', 'tar:0.rnns.1', 'beta:0.rnns.0', 'beta:0.rnns.1']
    assert h['beta'].isna().all() and (h['beta:0.rnns.0'] == 0.5).all() and (h['beta:0.rnns.1'] == 2.).all()
    assert (h['alpha'] == 3.).all()  # the coefficient used, not the unused default alpha=2
    ref = [0.5 * tar64(a) + 2 * tar64(b) + 3 * ar64(d) for a, b, d in zip(rnn0.train, rnn1.train, out_dp.train)]
    assert spy.added == [penalty(v) for v in ref]
    np.testing.assert_allclose(h['tar:0.rnns.1'], [2 * tar64(b) for b in rnn1.train], rtol=1e-5)


def test_sequences_of_coefficients_match_modules():
    tar, spy = TARCallback(alpha=[0.5], beta=[SchedLin(0., 1.), 1.], modules=['0.rnns.0', '0.rnns.1'],
                           ar_modules=['1.output_dp']), LossSpy()
    learn = tiny_learner(tar, cbs=[spy])
    enc = learn.model[0]
    rnn0, rnn1, out_dp = Outputs(enc.rnns[0]), Outputs(enc.rnns[1]), Outputs(learn.model[1].output_dp)
    quiet_fit(learn)
    h, pcts = tar.history, [i / N_BATCHES for i in range(N_BATCHES)]
    np.testing.assert_allclose(h['beta:0.rnns.0'], pcts, rtol=1e-6)
    ref = [0.5 * ar64(d) + p * tar64(a) + tar64(b) for p, a, b, d in zip(pcts, rnn0.train, rnn1.train, out_dp.train)]
    assert spy.added == [penalty(v) for v in ref]


def test_default_stays_last_layer_only():
    learn = tiny_learner(TARCallback())
    assert [(t.kind, t.name) for t in learn.tar._find()] == [('ar', '1.output_dp'), ('tar', '0')]


# --- repr ----------------------------------------------------------------------------------------------------------
def test_repr_says_what_is_hooked_and_with_which_coefficients():
    tar = TARCallback(beta=SchedLin(0., 1.))
    assert repr(tar) == "TARCallback(alpha=2.0, beta=SchedLin(0.0, 1.0))\n  hooks: found when attached to a learner"
    learn = tiny_learner(tar)
    assert repr(learn.tar) == ("TARCallback(alpha=2.0, beta=SchedLin(0.0, 1.0))\n"
                               "  AR  1.output_dp (RNNDropout): alpha=2.0\n"
                               "  TAR 0 (AWD_LSTM): beta=SchedLin(0.0, 1.0)")
    quiet_fit(learn)
    assert repr(learn.tar).splitlines()[1:] == ["  AR  1.output_dp (RNNDropout): alpha=2.0",
                                                "  TAR 0 (AWD_LSTM): beta=SchedLin(0.0, 1.0)"]


def test_repr_of_several_layers_and_a_term_that_is_off():
    learn = tiny_learner(TARCallback(alpha=0., all_layers=True, valid_metrics=True))
    assert repr(learn.tar) == ("TARCallback(alpha=0.0, beta=1.0, all_layers=True, valid_metrics=True)\n"
                               "  AR  0.hidden_dps.0 (RNNDropout): alpha=0.0 (off in training)\n"
                               "  AR  1.output_dp (RNNDropout): alpha=0.0 (off in training)\n"
                               "  TAR 0.rnns.0 (WeightDropout): beta=1.0\n"
                               "  TAR 0.rnns.1 (WeightDropout): beta=1.0")


def test_repr_of_a_set_up_that_cannot_hook_says_why():
    learn = tiny_learner(TARCallback(modules=['encoder.rnn'], ar_modules=['1.output_dp']))
    assert repr(learn.tar).startswith("TARCallback(alpha=2.0, beta=1.0)\n  cannot hook: modules: no module named "
                                      "'encoder.rnn'")
