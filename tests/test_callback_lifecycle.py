"""State around the fit: an error of ours inside fastai's mixed-precision window leaves autocast as it was, a model
returning the contract in training and plain logits in eval trains and validates with `valid_metrics=True`, and after
a Ctrl-C mid-fit the next `validate()` or forward gives fastai's `RNNRegularizer` its coefficients back and leaves no
penalty column in `learn.metrics`. No hook or activation outlives a batch or a fit, whether it ends normally, by an
exception, a fastai cancel or a Ctrl-C, by `remove_cb`; validation, `get_preds`, `summary()` add and keep nothing;
copies, saves and `export`/`load_learner` carry no state of ours; a Learner with its own `one_batch` is hooked."""
import copy
import io
import pickle
import warnings
from contextlib import redirect_stdout

import pandas as pd
import pytest
import torch
from torch import nn
from torch.amp import GradScaler
from fastai.learner import _loop
from fastai.text.all import (AWD_LSTM, Callback, CancelBatchException, CancelEpochException, CancelFitException,
                             CancelTrainException, CrossEntropyLossFlat, L, Learner, MixedPrecision, ModelResetter,
                             RNNRegularizer, SaveModelCallback, SGD, TextLearner, accuracy, language_model_learner,
                             load_learner)

from fastai_tar import TARCallback
from fastai_tar.report import PenaltyColumn

from conftest import (AliveAfterBatch, Boom, Capture, LossSpy, SL, VOCAB, hook_ids, lm_dls, penalty, quiet_fit, ref_ar,
                      ref_penalty, ref_tar, tiny_config, tiny_lm, torch_state)
from models import CheckpointLM, GRULM, LMModel7, NoDropoutLSTMLM, NoRNN, VocabLSTMLM, fit_with


# --- 13. our error inside fastai's mixed-precision window ----------------------------------------------------------
class CPUAutocastWindow(MixedPrecision):
    """fastai's MixedPrecision on CPU bf16 autocast, with fastai's own window: entered in before_batch, left in
    after_loss, so an exception between them leaves it entered unless the one who raised closes it. bf16 needs no
    scaler. (The suite's CPUMixedPrecision closes autocast when the forward ends: an error in after_loss would be
    outside its window.)"""
    def __init__(self): super().__init__(amp_mode='bf16')

    def before_fit(self):
        self.autocast, self.scales = torch.autocast('cpu', dtype=torch.bfloat16), L()
        self.learn.scaler = GradScaler('cpu', enabled=False)


@pytest.mark.parametrize('why', ['schedule turns negative', 'in-place change'])
def test_our_error_inside_a_mixed_precision_window_leaves_autocast_as_it_was(why):
    if why == 'in-place change': model, tar, exc, msg = GRULM(in_place=True), TARCallback(), RuntimeError, 'in place'
    else: model, tar, exc, msg = GRULM(), TARCallback(beta=lambda pct: abs(pct - .5) - .1), ValueError, 'beta'
    learn = Learner(lm_dls(n=16), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[CPUAutocastWindow(), tar])
    before = torch_state()
    with pytest.raises(exc, match=msg): quiet_fit(learn)  # the schedule: -0.1 at the third batch of four
    assert torch_state() == before  # the autouse clean_torch_state fixture checks it too, after the test


# --- 14. valid_metrics with plain logits in eval -------------------------------------------------------------------
class ContractInTraining(nn.Module):
    "(logits, raw, dropped) in training, from its LSTM; the logits alone in eval."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(12, VOCAB)

    def forward(self, x):
        raw, _ = self.rnn(self.emb(x))
        dropped = self.drop(raw)
        logits = self.head(dropped)
        return (logits, raw, dropped) if self.training else logits


def test_valid_metrics_with_plain_logits_in_eval_trains_and_validates():
    model = ContractInTraining()
    raw, drop = Capture(model.rnn), Capture(model.drop)
    spy = LossSpy()
    learn = Learner(lm_dls(n=8, n_valid=4), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[TARCallback(valid_metrics=True), spy])
    torch.manual_seed(1)
    quiet_fit(learn, 2)
    assert len(learn.recorder.values) == 2  # both epochs validated
    assert len(spy.added) == 4
    assert spy.added == [penalty(2 * ref_ar(d) + ref_tar(r)) for r, d in zip(raw.train_outputs, drop.train_outputs)]
    assert len(spy.valid_added) == 2 and set(spy.valid_added) == {0.}


# --- 15. Ctrl-C mid-fit on a TextLearner ---------------------------------------------------------------------------
def interrupt_forward(model, at=2):
    "A forward pre-hook that raises KeyboardInterrupt at the model's `at`-th training forward; its handle."
    calls = []
    def hook(m, args):
        if m.training: calls.append(1)
        if len(calls) == at: raise KeyboardInterrupt()
    return model.register_forward_pre_hook(hook)


def metric_names(learn): return [getattr(m, 'name', type(m).__name__) for m in learn.metrics]


@pytest.mark.parametrize('where', ['after_batch', 'forward'])
@pytest.mark.parametrize('then', ['validate', 'forward'])
def test_after_ctrl_c_the_next_validate_or_forward_gives_fastai_its_regularizer_back(where, then):
    torch.manual_seed(0)
    learn = language_model_learner(lm_dls(n=8), AWD_LSTM, config=tiny_config(), pretrained=False, opt_func=SGD,
                                   cbs=TARCallback())
    reg = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer))
    names = metric_names(learn)
    handle = interrupt_forward(learn.model) if where == 'forward' else None
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the switch-off warning
        quiet_fit(learn, cbs=Boom(KeyboardInterrupt(), at=2) if where == 'after_batch' else [])
    if handle: handle.remove()
    if then == 'validate':
        with learn.no_bar(), learn.no_logging(): learn.validate()
    else:
        learn.model.eval()
        with torch.no_grad(): learn.model(learn.dls.valid.one_batch()[0])
    assert (reg.alpha, reg.beta) == (2., 1.)
    assert metric_names(learn) == names


# --- validation and get_preds add and keep nothing -------------------------------------------------------------------
def test_validation_and_get_preds_add_nothing_and_keep_nothing():
    learn = Learner(lm_dls(), tiny_lm(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback())
    spy = LossSpy()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3, cbs=spy)
        assert spy.valid_added and max(map(abs, spy.valid_added)) == 0.
        assert min(spy.added) > 1e-4  # the same spy sees the penalty in training: it can tell
        preds, targs = learn.get_preds()
        learn.validate(cbs=spy)
    assert preds.shape == (len(learn.dls.valid_ds), SL, VOCAB)  # the loss and get_preds saw only the logits
    assert len(spy.valid_added) == 2 * len(learn.dls.valid) and max(map(abs, spy.valid_added)) == 0.
    assert hook_ids(learn.model) == set()
    assert learn.tar._batch == {}


# --- summary(), cancelled fits, plain logits in eval, a Learner's own one_batch --------------------------------------
def test_summary_and_a_fit_cancelled_before_training_keep_the_last_fits_places_and_history(book_dls):
    torch.manual_seed(0)
    learn, _, _ = fit_with(book_dls, NoRNN(len(book_dls.vocab)), TARCallback(2., 1., all_layers=True, contract=True))
    history, places = learn.tar.history, learn.tar.places
    assert 'ar:dropped.1' in history.columns and 'dropped.1' in places
    learn.summary()

    class CancelAtStart(Callback):
        order = -50
        def before_train(self): raise CancelFitException()
    learn.fit(1, cbs=CancelAtStart())
    pd.testing.assert_frame_equal(learn.tar.history, history)
    assert learn.tar.places == places


class PlainInEval(LMModel7):
    "Returns the contract in training, the logits alone in eval (as some users' models do)"
    def forward(self, x):
        out = super().forward(x)
        return out if self.training else out[0]


def test_a_model_returning_plain_logits_in_eval_validates_and_predicts(book_dls):
    torch.manual_seed(0)
    learn, spy, outs = fit_with(book_dls, PlainInEval(len(book_dls.vocab), 16, 2, 0.4), ModelResetter, TARCallback())
    assert len(learn.recorder.values) == 1  # the fit's validation ran
    preds, _ = learn.get_preds()
    assert preds.shape[-1] == len(book_dls.vocab)
    assert spy.added == [penalty(ref_penalty(2., 1., d) - ref_penalty(0., 1., d) + ref_penalty(0., 1., r))
                         for _, r, d in outs]


class OwnOneBatch(Learner):
    "A Learner subclass whose one_batch is its own (fastai's body, no super())"
    def one_batch(self, i, b):
        self.iter = i
        b = self._set_device(b)
        self._split(b)
        self._with_events(self._do_one_batch, 'batch', CancelBatchException)


def test_a_learner_subclass_with_its_own_one_batch_keeps_the_hooks(book_dls):
    torch.manual_seed(0)
    model = VocabLSTMLM(len(book_dls.vocab))
    cap, spy = Capture(model.rnn), LossSpy()
    learn = OwnOneBatch(book_dls, model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(), spy])
    quiet_fit(learn)
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs] and len(spy.added) > 0


# --- hooks left by exits outside our events, exceptions, fastai cancels, summary() -----------------------------------
def test_summary_and_listing_callbacks_change_nothing():
    learn = Learner(lm_dls(), tiny_lm(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(valid_metrics=True))
    quiet_fit(learn)
    history, hooks, metrics = learn.tar.history, hook_ids(learn.model), list(learn.metrics)
    places, text = learn.tar.places, repr(learn.tar)
    assert len(history) == len(learn.dls.train)
    assert 'LSTM' in learn.summary()
    pd.testing.assert_frame_equal(learn.tar.history, history)
    assert hook_ids(learn.model) == hooks and list(learn.metrics) == metrics
    assert learn.tar.places == places and repr(learn.tar) == text  # what the fit read: the model's output
    with redirect_stdout(io.StringIO()) as out: learn.show_training_loop()
    assert len(out.getvalue().splitlines()) == len(_loop)  # one line per event: our repr is one line
    assert 'TARCallback(alpha=2.0, beta=1.0, valid_metrics=True): AR dropped (output[2])' in out.getvalue()
    assert '\n' not in repr(learn.cbs)


class Raise(Callback):
    "Raise `exc` in before_batch of the `at`-th training batch, after TARCallback's before_batch."
    order = 10
    def __init__(self, exc, at=2): self.exc, self.at, self.n = exc, at, 0
    def before_batch(self):
        if not self.training: return
        self.n += 1
        if self.n == self.at: raise self.exc


class InterruptingHead(nn.Linear):
    "A head that raises KeyboardInterrupt in the `at`-th forward, after the LSTM ran (Ctrl-C in forward)."
    def __init__(self, at): super().__init__(16, VOCAB); self.at, self.n = at, 0
    def forward(self, x):
        self.n += 1
        if self.n == self.at: raise KeyboardInterrupt
        return super().forward(x)


def lifecycle(model=None):
    model = model or CheckpointLM()
    cap = Capture(model.lstm, keep=False)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback())
    return learn, cap, hook_ids(model)


def copies_and_saves(model):
    "deepcopy and torch.save/torch.load of the model work, and the copies carry no state of ours."
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randint(2, VOCAB, (2, SL))
    for m in (twin, loaded): torch.testing.assert_close(m(x), model(x))


@pytest.mark.parametrize('where, exc', [('forward', KeyboardInterrupt()), ('before_batch', KeyboardInterrupt()),
                                        ('before_batch', RuntimeError('boom'))],
                         ids=['interrupt_in_forward', 'interrupt_in_before_batch', 'error_in_before_batch'])
def test_hooks_left_by_an_exit_outside_our_events_are_inert_and_go_at_the_next_forward(where, exc):
    """KeyboardInterrupt in forward (torch's always_call hooks run for `Exception` only) or any exception in a later
    callback's before_batch ends fit with no event of ours (fastai's `_with_events` has no `finally`): the hooks left
    copy and pickle, and the next forward outside fastai's loop removes them, keeping nothing."""
    model = CheckpointLM()
    if where == 'forward': model.head = InterruptingHead(at=2)
    learn, cap, hooks = lifecycle(model)
    with pytest.raises(type(exc)): quiet_fit(learn, cbs=Raise(exc) if where == 'before_batch' else None)
    cap.handle.remove()  # the test's own hook keeps weakrefs, which torch.save cannot pickle
    assert hook_ids(learn.model) != set()  # ours are still there: no event of ours ran
    copies_and_saves(learn.model)
    assert hook_ids(learn.model) == set()  # copies_and_saves ran the model: that forward removed ours
    assert cap.alive() == []  # and nothing of the forwards is kept
    cap.handle = learn.model.lstm.register_forward_hook(cap.hook)
    hooks, grab = hook_ids(learn.model), LossSpy(stop=1)
    quiet_fit(learn, cbs=grab)  # the next fit regularizes and leaves nothing
    assert grab.added[0] > 1e-3
    assert hook_ids(learn.model) == hooks and cap.alive() == []


def test_exception_in_forward_removes_hooks_at_once():
    class Fails(nn.Module):
        def forward(self, x): raise ValueError('bad forward')
    learn, cap, hooks = lifecycle()
    learn.model.head = Fails()
    with pytest.raises(ValueError, match='bad forward'): quiet_fit(learn)
    assert hook_ids(learn.model) == hooks and cap.alive() == []


@pytest.mark.parametrize('exc', [CancelBatchException, CancelTrainException, CancelEpochException, CancelFitException])
def test_fastai_cancel_exceptions_in_before_batch_leave_nothing(exc):
    learn, cap, hooks = lifecycle()
    quiet_fit(learn, n_epoch=2, cbs=Raise(exc()))
    assert hook_ids(learn.model) == hooks and cap.alive() == []
    assert max(cap.hooks_seen) > 1  # our hooks did run next to the test's own


# --- no hook or activation left after fits, interruptions, remove_cb, export -----------------------------------------
def lifecycle_learner(**kw):
    "A learner whose LSTM carries the test's own weakref hook; returns (learn, capture, hooks before any fit)."
    model = NoDropoutLSTMLM()
    cap = Capture(model.lstm, keep=False)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=TARCallback(**kw))
    return learn, cap, hook_ids(model)


def assert_clean(learn, cap, hooks):
    "No hook of ours left on the model and no activation kept; and the callback did hook while it ran."
    assert hook_ids(learn.model) == hooks
    assert cap.refs and max(cap.hooks_seen) > 1  # TARCallback's hook sat next to ours during the forward
    assert cap.alive() == []


def test_no_hook_or_activation_after_normal_fit():
    learn, cap, hooks = lifecycle_learner(valid_metrics=True)
    quiet_fit(learn)
    assert_clean(learn, cap, hooks)


@pytest.mark.parametrize('exc', [RuntimeError('boom'), CancelFitException()], ids=['error', 'cancel_fit'])
def test_no_hook_or_activation_after_fit_is_interrupted(exc):
    """Another callback raising in after_batch (an error, or CancelFitException) leaves no activation; after an error,
    which no event of ours follows, the model's own hooks go at the next forward (or validate, fit, remove_cb)."""
    learn, cap, hooks = lifecycle_learner()
    if isinstance(exc, CancelFitException): quiet_fit(learn, cbs=Boom(exc))
    else:
        with pytest.raises(RuntimeError, match='boom'): quiet_fit(learn, cbs=Boom(exc))
        assert cap.alive() == []
        with torch.no_grad(): learn.model(learn.dls.one_batch()[0])
    assert len(cap.refs) == 2 + (not isinstance(exc, CancelFitException))
    assert_clean(learn, cap, hooks)
    grab = LossSpy(stop=1)  # the next fit still applies the penalty
    quiet_fit(learn, cbs=grab)
    assert grab.added[0] > 1e-3


def test_no_hook_after_exception_in_forward():
    "A forward pass that raises after the hooked module ran: the always-call root hook still removes ours."
    class Fails(nn.Module):
        def forward(self, x): raise ValueError('bad forward')
    learn, cap, hooks = lifecycle_learner()
    learn.model.head = Fails()
    with pytest.raises(ValueError, match='bad forward'): quiet_fit(learn)
    assert_clean(learn, cap, hooks)


def test_ten_fits_leave_nothing_behind():
    learn, cap, hooks = lifecycle_learner(valid_metrics=True)
    for _ in range(10):
        quiet_fit(learn)
        assert hook_ids(learn.model) == hooks
    assert_clean(learn, cap, hooks)
    assert [m.name for m in learn.metrics] == []  # the fit-table columns went with each fit
    assert len(learn.tar.history) == len(learn.dls.train)  # the history is the last fit's


def test_remove_cb_mid_session():
    "learn.remove_cb(learn.tar) between fits: no hook then, and the next fit adds nothing."
    learn, cap, hooks = lifecycle_learner()
    quiet_fit(learn)
    learn.remove_cb(learn.tar)
    assert hook_ids(learn.model) == hooks and not hasattr(learn, 'tar')
    n_seen, grab = len(cap.hooks_seen), LossSpy(stop=1)
    quiet_fit(learn, cbs=grab)
    assert grab.added == [0.]
    assert max(cap.hooks_seen[n_seen:]) == 1  # only the test's own hook ran in that forward
    assert_clean(learn, cap, hooks)


@pytest.mark.parametrize('exc', [KeyboardInterrupt(), RuntimeError('boom')], ids=['interrupt', 'error'])
@pytest.mark.parametrize('attached', ['learner', 'fit'])
def test_remove_cb_after_a_failed_fit_gives_the_learner_back(exc, attached):
    """A fit that raised never reaches after_fit. Removing the callback then (by hand, or fastai's `added_cbs` for
    `fit(cbs=...)`) gives fastai's RNNRegularizer its (2, 1) back and takes the penalty columns out of the table."""
    torch.manual_seed(0)
    tar = TARCallback(valid_metrics=True)
    learn = language_model_learner(lm_dls(n=8), AWD_LSTM, config=tiny_config(), pretrained=False,
                                   cbs=tar if attached == 'learner' else None)
    reg, hooks = next(cb for cb in learn.cbs if isinstance(cb, RNNRegularizer)), hook_ids(learn.model)
    columns = []  # what the table held while the fit ran
    boom = Boom(exc, at=1)
    boom.before_batch = lambda: columns.append([m.name for m in learn.metrics])
    with warnings.catch_warnings(), pytest.raises(type(exc)):
        warnings.simplefilter('ignore')  # the one about switching fastai's regularizer off
        quiet_fit(learn, cbs=[boom] + ([tar] if attached == 'fit' else []))
    assert columns == [['train_ar', 'train_tar', 'valid_ar', 'valid_tar']]
    if attached == 'learner':
        assert (reg.alpha, reg.beta) == (0., 0.)  # still off: the state remove_cb must undo
        learn.remove_cb(learn.tar)
    assert not hasattr(learn, 'tar') and tar not in learn.cbs
    assert (reg.alpha, reg.beta) == (2., 1.)
    assert not any(isinstance(m, PenaltyColumn) for m in learn.metrics)
    assert hook_ids(learn.model) == hooks
    with learn.no_bar(): assert len(learn.validate()) == 1  # [valid_loss]: no penalty column left behind


def test_no_activation_outlives_its_batch():
    "fastai AWD-LSTM LM, TAR on the encoder and AR on the output dropout, training and validation metrics."
    model = tiny_lm()
    caps = [Capture(model[0], keep=False), Capture(model[1].output_dp, keep=False)]
    probe = AliveAfterBatch(caps)
    learn = Learner(lm_dls(n=8), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(valid_metrics=True), probe])
    quiet_fit(learn)
    assert probe.phases == ['train'] * 2 + ['valid']  # both phases captured (valid_metrics) and were checked
    assert [len(c.refs) for c in caps] == [3, 3]
    assert probe.alive == [0, 0, 0]
    row = dict(zip(learn.recorder.metric_names[1:], learn.recorder.values[-1]))
    assert row['valid_ar'] > 0 and row['valid_tar'] > 0  # the validation activations were read before they went


def test_export_load_learner_predict_and_fine_tune(tmp_path):
    learn = Learner(lm_dls(), NoDropoutLSTMLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=TARCallback(2., 1.), path=tmp_path)
    quiet_fit(learn)
    learn.export('tar.pkl')
    with pytest.warns(UserWarning, match='pickle'): loaded = load_learner(tmp_path / 'tar.pkl')
    assert isinstance(loaded.tar, TARCallback) and loaded.tar is not learn.tar
    dl = lm_dls(seed=1).valid
    preds, _ = loaded.get_preds(dl=dl)
    torch.testing.assert_close(preds, learn.get_preds(dl=dl)[0], rtol=0, atol=0)
    assert hook_ids(loaded.model) == set()

    loaded.dls = lm_dls(seed=2)  # fine-tuning the loaded learner applies the penalty again
    cap, grab = Capture(loaded.model.lstm), LossSpy(stop=1)
    quiet_fit(loaded, cbs=grab)
    assert grab.added[0] == penalty(ref_penalty(2., 1., cap.outputs[0]))
    assert grab.added[0] > 1e-3
    assert hook_ids(loaded.model) == {('lstm', 'fwd', cap.handle.id)}  # the test's own hook only


def test_export_keeps_no_per_batch_history(tmp_path):
    "learn.export() pickles the callback without its per-batch rows; the learner that exported keeps them."
    learn = Learner(lm_dls(n=96, bs=1), NoDropoutLSTMLM(), loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=TARCallback(2., 1.), path=tmp_path)
    quiet_fit(learn)
    before = learn.tar.history
    assert len(before) == 96
    learn.export('with_tar.pkl')
    pd.testing.assert_frame_equal(learn.tar.history, before)
    with pytest.warns(UserWarning, match='pickle'): loaded = load_learner(tmp_path / 'with_tar.pkl')
    assert len(loaded.tar.history) == 0 and list(loaded.tar.history.columns) == list(before.columns)
    # The callback's share of the file is less than its rows would take even as one compact DataFrame.
    learn.remove_cb(learn.tar)
    learn.export('without_tar.pkl')
    callback_bytes = (tmp_path / 'with_tar.pkl').stat().st_size - (tmp_path / 'without_tar.pkl').stat().st_size
    assert callback_bytes < len(pickle.dumps(before))


# --- fit-level state: what a re-settle, a mid-fit change, a model swap or an export keeps -----------------------------
def text_learner(*cbs, **kw):
    "A TextLearner on the book's LMModel7 at the tiny data's batch size: fastai adds its RNNRegularizer(2, 1)"
    torch.manual_seed(0)
    return TextLearner(lm_dls(), LMModel7(VOCAB, 16, 2, 0.4, bs=4), loss_func=CrossEntropyLossFlat(), cbs=list(cbs),
                       **kw)


class RawDropped(Callback):
    "The raw and dropped outputs of each training batch, as the model returned them (first after the forward)"
    order = -100
    def before_fit(self): self.seen = []
    def after_pred(self):
        if self.training: self.seen.append((self.pred[1].detach().clone(), self.pred[2].detach().clone()))


def test_a_callback_added_mid_fit_switches_fastais_regularizer_off_and_counts_once():
    "TARCallback added from another callback's before_epoch on a TextLearner: from then on the penalty is ours alone"
    class AddLater(Callback):
        def before_epoch(self):
            if self.epoch == 1: self.learn.add_cb(TARCallback(alpha=2., beta=1.))
    spy, seen = LossSpy(), RawDropped()
    learn = text_learner(AddLater(), spy, seen)
    reg = next(c for c in learn.cbs if isinstance(c, RNNRegularizer))
    with pytest.warns(UserWarning, match='added during a fit'): quiet_fit(learn, 2)
    n = len(learn.dls.train)
    ours = [ref_penalty(2., 0., d) + ref_tar(r) for r, d in seen.seen[n:]]
    assert spy.added[n:] == [penalty(e) for e in ours]  # once: fastai's RNNRegularizer was switched off
    assert (reg.alpha, reg.beta) == (2., 1.) and len(learn.tar.history) == n  # given back after the fit
    assert spy.added[:n] == [penalty(2 * ref_ar(d) + ref_tar(r)) for r, d in seen.seen[:n]]  # fastai's own before


def test_two_callbacks_reading_the_same_term_of_the_same_place_are_refused_naming_both():
    learn = text_learner(TARCallback())
    learn.add_cb(TARCallback())  # a notebook cell run twice
    with pytest.raises(ValueError, match=r"Two TARCallbacks read (AR|TAR) of '(dropped|raw)', so the penalty would "
                                         r"count twice: TARCallback\(alpha=2.0, beta=1.0\).*Remove one"):
        quiet_fit(learn)
    learn = text_learner(TARCallback())
    with pytest.raises(ValueError, match='Two TARCallbacks read'): quiet_fit(learn, cbs=TARCallback())
    learn = text_learner(TARCallback(alpha=0.), TARCallback(beta=0.))  # one term each: both count, once each
    spy, seen = LossSpy(stop=1), RawDropped()
    quiet_fit(learn, cbs=[spy, seen])
    raw, dropped = seen.seen[0]
    assert spy.added[0] == penalty(2 * ref_ar(dropped) + ref_tar(raw))


def test_a_coefficient_set_mid_fit_keeps_the_history_and_the_columns():
    class WarmUp(Callback):
        def before_batch(self):
            if self.training and self.learn.train_iter == 6: self.learn.tar.beta = 3.
    learn = text_learner(TARCallback(), WarmUp(), alpha=0., beta=0.)
    spy, seen = LossSpy(), RawDropped()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=[spy, seen])
    n = len(learn.dls.train)
    h = learn.tar.history
    assert len(h) == 2 * n and h['iter'].tolist() == list(range(2 * n))  # every row kept
    assert h['beta'].tolist() == [1.] * 6 + [3.] * (2 * n - 6)
    assert spy.added[6] == penalty(2 * ref_ar(seen.seen[6][1]) + 3 * ref_tar(seen.seen[6][0]))
    assert all(None not in row[2:4] for row in learn.recorder.values)  # train_ar, train_tar in every epoch


class EMA(Callback):
    "A model average swapped in for validation and back, as fastai users port timm's ModelEma"
    order = 60
    def before_fit(self): self.ema = copy.deepcopy(self.learn.model)
    def after_step(self):
        with torch.no_grad():
            for p, q in zip(self.ema.parameters(), self.learn.model.parameters()): p.lerp_(q, 0.1)
    def before_validate(self): self.saved, self.learn.model = self.learn.model, self.ema
    def after_validate(self): self.learn.model = self.saved


def test_a_model_swapped_in_for_validation_keeps_the_history_columns_and_contract():
    learn = text_learner(TARCallback(valid_metrics=True), EMA(), metrics=accuracy)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3)
    assert not [x for x in w if 'settled again' in str(x.message)]
    n = len(learn.dls.train)
    assert learn.tar.history['iter'].tolist() == list(range(3 * n))  # every epoch's rows
    names = learn.recorder.metric_names[1:-1]
    for row in learn.recorder.values:  # train_ar, train_tar, valid_ar, valid_tar in every epoch
        assert all(row[names.index(c)] is not None for c in ('train_ar', 'train_tar', 'valid_ar', 'valid_tar'))


def test_remove_cb_mid_fit_keeps_the_table_aligned_and_trackers_working(tmp_path):
    "The columns stay until the fit ends, empty; `SaveModelCallback(monitor='accuracy')` still finds accuracy"
    class Remove(Callback):
        def before_epoch(self):
            if self.epoch == 1: self.learn.remove_cb(self.learn.tar)
    model = NoDropoutLSTMLM()
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=tmp_path,
                    cbs=[TARCallback(), Remove(), SaveModelCallback(monitor='accuracy', fname='best')])
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3)
    names = learn.recorder.metric_names
    assert names == ['epoch', 'train_loss', 'valid_loss', 'train_ar', 'train_tar', 'accuracy', 'time']
    values = learn.recorder.values
    assert [len(v) for v in values] == [5] * 3 and values[0][2] is not None
    assert [v[2:4] for v in values[1:]] == [[None, None]] * 2  # removed: nothing to show
    assert all(0 <= v[4] <= 1 for v in values)  # accuracy under its own header
    assert not [m for m in learn.metrics if isinstance(m, PenaltyColumn)] and not hasattr(learn, 'tar')
    assert [type(c).__name__ for c in learn.cbs if 'Drop' in type(c).__name__] == []


class ExportInFit(Callback):
    "`learn.export()` from a callback's after_fit ordered before ours: the fit's state is still set up"
    order = 0
    def after_fit(self): self.learn.export('in_fit.pkl')


def test_a_learner_exported_mid_fit_gives_back_what_the_fit_set_up_at_its_first_event(tmp_path):
    learn = text_learner(TARCallback(), ExportInFit(), metrics=accuracy, path=tmp_path)
    learn.dls = lm_dls()  # Datasets-based loaders, which `export` can empty
    quiet_fit(learn)
    with pytest.warns(UserWarning, match='pickle'): loaded = load_learner(tmp_path / 'in_fit.pkl')
    reg = next(c for c in loaded.cbs if isinstance(c, RNNRegularizer))
    stale = [m for m in loaded.metrics if isinstance(m, PenaltyColumn)]
    assert all(c.value is None for c in stale)  # exported mid-fit: empty, and named in the callback's state
    loaded.dls = lm_dls()
    with loaded.no_bar(): loaded.validate()  # its first event
    assert (reg.alpha, reg.beta) == (2., 1.) and not [m for m in loaded.metrics if isinstance(m, PenaltyColumn)]
    loaded.model(lm_dls().one_batch()[0])  # inert hooks go at the first forward
    assert hook_ids(loaded.model) == set()
    spy = LossSpy(stop=1)
    quiet_fit(loaded, cbs=spy)  # and the loaded learner trains with the penalty once
    assert (reg.alpha, reg.beta) == (2., 1.) and spy.added[0] > 1e-4
