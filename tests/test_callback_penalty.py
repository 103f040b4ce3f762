"""What the penalty reads and its value: the tensor as it left the module (an in-place change afterwards is an error,
never the changed value), every call of a read module in the training forward (one-step calls joined into a sequence,
calls without grad skipped), whatever a callback before ours makes of `learn.pred`, and AR on outputs with no time
axis; a batch of one sequence or of one step, a padded classifier batch and a PackedSequence count only real
positions; a SentenceEncoder's TAR spans its bptt chunks; the penalty is the one of the forward that reaches the loss.
Each value is checked against float64 references on activations the test captures with its own hooks."""
import copy
import warnings

import pytest
import torch
from torch import nn
from fastai.text.all import (AWD_LSTM, Callback, CrossEntropyLossFlat, DataLoaders, Learner, SGD, get_text_classifier,
                             rnn_cbs)

from fastai_tar import Place, TARCallback

from conftest import (Capture, LossSpy, PAD, SL, VOCAB, clas_dls, far, lm_dls, penalty, quiet_fit, ref_ar, ref_penalty,
                      ref_tar, tiny_config, tiny_lm)
from models import (BPTT, LENGTHS, CheckpointLM, GRULM, NoDropoutLSTMLM, PlainLM, VocabLSTMLM, encoded_batch,
                    first_batch, first_grads, fit_with, flat_params, zero_loss)


PLAIN = PlainLM(VOCAB)  # embedding -> LSTM -> dropout -> linear


def fit_batches(model, cbs, dls=None, n=1, loss_func=None, **kw):
    "Fit `model` for `n` training batches with `cbs`; the learner and its `LossSpy`."
    spy = LossSpy(stop=n)
    learn = Learner(dls or lm_dls(n=4 * n), model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[*cbs, spy], **kw)
    torch.manual_seed(1)
    quiet_fit(learn, lr=1e-3)
    return learn, spy


# --- 1. in-place ops after the read module ----------------------------------------------------------------------------
class ReLUAfterDropout(nn.Module):
    "An LSTM, then nn.Dropout, then nn.ReLU(inplace=True) on the dropout's output."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True)
        self.drop, self.act, self.head = nn.Dropout(0.3), nn.ReLU(inplace=True), nn.Linear(12, VOCAB)

    def forward(self, x): return self.head(self.act(self.drop(self.rnn(self.emb(x))[0])))


@pytest.mark.parametrize('make, kw, name', [
    (lambda: GRULM(in_place=True), dict(alpha=0., beta=1.), 'rnn'),
    (ReLUAfterDropout, dict(alpha=2., beta=0., ar_modules='drop'), 'drop'),
], ids=['GRU then +=', 'Dropout then ReLU(inplace=True)'])
def test_in_place_change_after_the_read_module_is_an_error_naming_it(make, kw, name):
    "Never the changed value: a RuntimeError naming the in-place change and the module, before any step."
    model = make()
    before = flat_params(model)
    with pytest.raises(RuntimeError, match='in place') as e: fit_batches(model, [TARCallback(**kw)])
    assert f'reads {name} (' in str(e.value)  # the module, by its name
    assert torch.equal(flat_params(model), before)  # raised before backward: no step was taken


# --- 2. an RNN called once per time step ------------------------------------------------------------------------------
class StepDecoder(nn.Module):
    "A decoder loop: an nn.GRU fed one step at a time (or an nn.GRUCell), its state carried by hand; no dropout."
    def __init__(self, cell=False):
        super().__init__()
        torch.manual_seed(0)
        self.cell, self.emb, self.head = cell, nn.Embedding(VOCAB, 8), nn.Linear(12, VOCAB)
        self.rnn = nn.GRUCell(8, 12) if cell else nn.GRU(8, 12, batch_first=True)

    def forward(self, x):
        e, h, outs = self.emb(x), None, []
        for t in range(x.shape[1]):
            if self.cell: h = o = self.rnn(e[:, t], h)
            else: o, h = self.rnn(e[:, t:t + 1], h)
            outs.append(o if self.cell else o[:, 0])
        return self.head(torch.stack(outs, 1))


class GradSpy(Callback):
    "The gradient of the recurrent weights after each training backward."
    order = 50
    def __init__(self): self.grads = []
    def after_backward(self): self.grads.append(self.learn.model.rnn.weight_hh_l0.grad.detach().clone())


def test_gru_fed_one_step_at_a_time_gives_tar_over_the_steps_with_its_gradient():
    model = StepDecoder()
    twin, cap = copy.deepcopy(model), Capture(model.rnn)
    grads = GradSpy()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        learn, spy = fit_batches(model, [TARCallback(alpha=2., beta=3.), grads], loss_func=zero_loss)
    seq = torch.cat([h for h in cap.train_outputs], 1)  # the calls' (bs, 1, hid) outputs in call order
    assert seq.shape[1] == 12
    expected = ref_penalty(2., 3., seq)
    assert spy.added == [penalty(expected)] and far(ref_penalty(2., 0., seq), expected)  # TAR is not 0
    assert not [x for x in w if 'length 1' in str(x.message)]  # the joined sequence is 12 steps long
    # the gradient of the reference penalty, by hand on an untouched copy of the model
    steps = []
    twin.rnn.register_forward_hook(lambda m, i, o: steps.append(o[0]))
    twin(learn.dls.train.one_batch()[0])
    h = torch.cat(steps, 1).double()
    (2 * h.pow(2).mean() + 3 * (h[:, 1:] - h[:, :-1]).pow(2).mean()).backward()
    torch.testing.assert_close(grads.grads[0], twin.rnn.weight_hh_l0.grad.float(), rtol=1e-4, atol=1e-6)


def test_gru_cell_unrolled_by_hand_gives_tar_over_the_steps():
    model = StepDecoder(cell=True)
    cap = Capture(model.rnn)
    _, spy = fit_batches(model, [TARCallback(alpha=2., beta=3., modules='rnn', ar_modules='rnn')], n=2)
    seqs = [torch.stack(cap.train_outputs[i:i + 12], 1) for i in (0, 12)]  # 12 calls of (bs, hid) per batch
    assert len(cap.train_outputs) == 24
    assert spy.added == [penalty(ref_penalty(2., 3., s)) for s in seqs]
    assert min(ref_tar(s) for s in seqs) > 1e-3


class CellLM(nn.Module):
    "An LSTMCell run step by step: each call returns (h, c) of shape (bs, hidden), with no time axis."
    def __init__(self):
        super().__init__()
        self.emb, self.cell, self.head = nn.Embedding(VOCAB, 6), nn.LSTMCell(6, 8), nn.Linear(8, VOCAB)
    def forward(self, x):
        e, state, hs = self.emb(x), None, []
        for t in range(x.shape[1]):
            state = self.cell(e[:, t], state)
            hs.append(state[0])
        return self.head(torch.stack(hs, 1))


def test_a_cell_called_once_per_step_is_one_sequence():
    "Each call of an LSTMCell is one step, (bs, hidden): joined in call order, TAR runs over the steps."
    model, spy = CellLM(), LossSpy(stop=1)
    cap = Capture(model.cell)
    quiet_fit(Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(modules='cell'), spy]))
    steps = torch.stack(cap.outputs[:SL], 1)  # the first batch's calls
    assert spy.added[0] == penalty(ref_penalty(2., 1., steps))


# --- 9. a callback before ours derives learn.pred from the output -----------------------------------------------------
class LSTMLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn, self.head = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True), nn.Linear(12, VOCAB)

    def forward(self, x): return self.head(self.rnn(self.emb(x))[0])


class ViewLM(LSTMLM):
    "Returns a view of the head's output (as tsfast's models do)."
    def forward(self, x): return super().forward(x)[:, :]


class DerivePred(Callback):
    "Ordered before TARCallback: a temperature, or a truncated-backprop warm-up that drops the first steps."
    order = 0
    def __init__(self, how): self.how = how

    def after_pred(self):
        if self.how == 'temperature': self.learn.pred = self.pred / 2
        else:
            self.learn.pred = self.pred[:, 4:]
            self.learn.yb = (self.y[:, 4:],)


@pytest.mark.parametrize('how', ['temperature', 'warm-up slice'])
def test_a_callback_before_ours_deriving_pred_keeps_the_penalty_of_the_module(how):
    model = ViewLM()
    cap = Capture(model.rnn)
    cb = DerivePred(how)
    assert cb.order < TARCallback.order
    _, spy = fit_batches(model, [TARCallback(), cb], n=2)
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs] and len(spy.added) == 2


class Flatten(Callback):
    "A callback before ours that replaces learn.pred by a tensor made from the model's output"
    order = 0
    def after_pred(self): self.learn.pred = self.pred.view(-1, self.pred.shape[-1])


def test_a_callback_that_derives_pred_from_the_output_keeps_the_penalty(book_dls):
    torch.manual_seed(0)
    model = VocabLSTMLM(len(book_dls.vocab))
    cap = Capture(model.rnn)
    _, spy, _ = fit_with(book_dls, model, TARCallback(), Flatten())
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in cap.train_outputs]


# --- 11. a no-grad burn-in call of the read module --------------------------------------------------------------------
class BurnIn(LSTMLM):
    "Warms the state up with a call under no_grad, then runs the training call from that state."
    def forward(self, x):
        e = self.emb(x)
        with torch.no_grad(): _, state = self.rnn(e)
        return self.head(self.rnn(e, state)[0])


def test_a_call_without_grad_is_skipped_and_the_call_with_grad_penalized():
    model = BurnIn()
    cap = Capture(model.rnn)
    _, spy = fit_batches(model, [TARCallback(alpha=2., beta=1.)], n=2)
    calls = cap.train_outputs
    assert len(calls) == 4  # burn-in, training call; per batch
    assert spy.added == [penalty(ref_penalty(2., 1., h)) for h in calls[1::2]]
    assert far(ref_penalty(2., 1., calls[0], calls[1]), ref_penalty(2., 1., calls[1]))  # pooling both would show


# --- 12. outputs without a time axis ----------------------------------------------------------------------------------
def clas_batches(n=2, seed=0):
    "Token sequences labelled 0/1, batch 4, 12 steps."
    g = torch.Generator().manual_seed(seed)
    items = list(zip(torch.randint(2, VOCAB, (4 * n, 12), generator=g), torch.arange(4 * n) % 2))
    return DataLoaders.from_dsets(items, items[:4], bs=4, shuffle=False, device='cpu', num_workers=0)


class ManyToOne(nn.Module):
    "The last step of an LSTM, dropped out: a (batch, features) output; optionally returned as a 2-D contract."
    def __init__(self, contract=False):
        super().__init__()
        torch.manual_seed(0)
        self.contract, self.emb, self.rnn = contract, nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(12, 2)

    def forward(self, x):
        last = self.rnn(self.emb(x))[0][:, -1]
        dropped = self.drop(last)
        return (self.head(dropped), last, dropped) if self.contract else self.head(dropped)


def test_many_to_one_ar_on_a_2d_output_needs_no_time_axis():
    model = ManyToOne()
    rnn, drop = Capture(model.rnn), Capture(model.drop)
    _, spy = fit_batches(model, [TARCallback(alpha=2., beta=1., modules='rnn', ar_modules='drop')], clas_batches(), n=2)
    assert all(d.dim() == 2 for d in drop.train_outputs)
    expected = [2 * d.double().pow(2).mean().item() + ref_tar(h) for h, d in zip(rnn.train_outputs, drop.train_outputs)]
    assert spy.added == [penalty(e) for e in expected]


def test_contract_true_with_2d_raw_and_dropped_gives_ar():
    model = ManyToOne(contract=True)
    drop = Capture(model.drop)
    _, spy = fit_batches(model, [TARCallback(alpha=2., beta=0., contract=True)], clas_batches(), n=2)
    assert spy.added == [penalty(2 * ref_ar(d.unsqueeze(1))) for d in drop.train_outputs]  # mean of d**2
    assert min(spy.added) > 1e-3


# --- batch edges, classifier padding and packed sequences against float64 references ----------------------------------
def test_bs1_is_regularized_unlike_fastai():
    "fastai's `len(h)>1` guard skips TAR at bs=1; ours applies it (checked against the reference formula)."
    dls = lm_dls(bs=1)
    model = tiny_lm()
    cap = Capture(model[0])
    loss, grad = first_batch(model, [TARCallback(alpha=0., beta=5.)], dls=dls)
    assert cap.outputs[0].shape[0] == 1
    assert (grad - loss).item() == penalty(5 * ref_tar(cap.outputs[0]))
    loss_fa, grad_fa = first_batch(tiny_lm(), rnn_cbs(0., 5.), dls=dls)
    assert grad_fa == loss_fa  # fastai's defect this plugin fixes


def test_sl1_gives_zero_tar_not_nan():
    dls = lm_dls(sl=1)
    loss, grad = first_batch(tiny_lm(), [TARCallback(alpha=0., beta=1.)], dls=dls)
    assert torch.isfinite(grad) and grad == loss
    _, grad_fa = first_batch(tiny_lm(), rnn_cbs(0., 1.), dls=dls)
    assert torch.isnan(grad_fa)  # fastai's defect: the mean of an empty difference


def classifier_batch(cbs, dls):
    "What `cbs` added to the first batch's loss of a fresh tiny classifier, and its SentenceEncoder's (outs, valid)."
    torch.manual_seed(0)
    m = get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=BPTT, config=tiny_config(clas=True))
    cap = Capture(m[0])
    loss, grad = first_batch(m, cbs, dls=dls)
    return (grad - loss).item(), *encoded_batch(cap)


def test_classifier_padding_changes_nothing():
    "TAR/AR of a padded classifier batch equal the reference over the real tokens only; fastai's counts padding."
    dls = clas_dls(LENGTHS, seq_len=BPTT)
    added, outs, valid = classifier_batch([TARCallback(alpha=0., beta=4.)], dls)
    assert added == penalty(4 * ref_tar(outs, valid))
    added_fa, _, _ = classifier_batch(rnn_cbs(0., 4.), dls)
    assert added_fa != pytest.approx(added, rel=1e-3)  # padding counted there

    # AR is a mean over the real positions only
    added, outs, valid = classifier_batch([TARCallback(alpha=3., beta=0.)], dls)
    assert added == penalty(3 * ref_ar(outs, valid))
    assert far(3 * ref_ar(outs), 3 * ref_ar(outs, valid))  # the padded positions would count otherwise


class PackedGRU(nn.Module):
    "Runs a GRU on a PackedSequence: token 0 marks padding at the end of each sequence."
    def __init__(self, hidden=10):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(VOCAB, 6), nn.GRU(6, hidden, batch_first=True), nn.Linear(hidden, 2)

    def forward(self, x):
        lengths = (x != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(x), lengths, batch_first=True, enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.out(h.sum(1))


def test_packed_sequence_against_reference_on_unpadded_steps():
    x = torch.randint(1, VOCAB, (4, SL))
    lengths = [SL, 7, 3, 1]
    for i, n in enumerate(lengths): x[i, n:] = 0
    y = torch.tensor([0, 1, 1, 0])
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=4, shuffle=False, device='cpu', num_workers=0)
    torch.manual_seed(0)
    model = PackedGRU()
    cap = Capture(model.rnn)
    loss, grad = first_batch(model, [TARCallback(alpha=1., beta=2.)], dls=dls)
    (h, valid), = cap.parts  # unpacked: `valid` from the PackedSequence's lengths
    assert valid.sum(1).tolist() == lengths
    assert (grad - loss).item() == penalty(ref_penalty(1., 2., (h, valid)))
    assert far(ref_penalty(1., 2., h), ref_penalty(1., 2., (h, valid)))  # the padded steps would count otherwise


# --- a mask for any model: mask=, a function of the batch -------------------------------------------------------------
def padded_lm_dls(lengths=(SL, 9, 5, 2)):
    "Language-model batches whose sequences end in padding (PAD) after `lengths` real tokens; y is x shifted"
    g = torch.Generator().manual_seed(3)
    x = torch.randint(PAD + 1, VOCAB, (len(lengths), SL + 1), generator=g)
    for i, n in enumerate(lengths): x[i, n:] = PAD
    items = list(zip(x[:, :-1], x[:, 1:]))
    dls = DataLoaders.from_dsets(items, items, bs=len(lengths), shuffle=False, device='cpu', num_workers=0)
    dls.vocab = [f'w{i}' for i in range(VOCAB)]
    return dls


def by_pad(xb, yb): return xb[0] != PAD


def test_a_mask_from_the_batch_counts_real_steps_for_ar_and_real_pairs_for_tar():
    model = copy.deepcopy(PLAIN)
    raws, drops = Capture(model.rnn), Capture(model.drop)
    dls = padded_lm_dls()
    _, spy = fit_batches(model, [TARCallback(mask=by_pad)], dls=dls)
    real = dls.one_batch()[0] != PAD
    expected = ref_penalty(2., 0., (drops.outputs[0], real)) + ref_penalty(0., 1., (raws.outputs[0], real))
    assert spy.added == [penalty(expected)]
    unmasked = ref_penalty(2., 0., drops.outputs[0]) + ref_penalty(0., 1., raws.outputs[0])
    assert far(unmasked, expected)


def test_a_mask_that_does_not_fit_names_both_shapes():
    with pytest.raises(ValueError, match=r"mask= of shape \(4, 11\) does not fit 'drop', a tensor \(4, 12, 16\).*its "
                                         r"batch x time is \(4, 12\)"):
        fit_batches(copy.deepcopy(PLAIN), [TARCallback(mask=lambda xb, yb: by_pad(xb, yb)[:, 1:])],
                    dls=padded_lm_dls())
    with pytest.raises(TypeError, match=r"TARCallback\(mask=\.\.\.\) must give a bool batch x time tensor.*int64"):
        fit_batches(copy.deepcopy(PLAIN), [TARCallback(mask=lambda xb, yb: xb[0])], dls=padded_lm_dls())
    with pytest.raises(TypeError, match=r"TARCallback\(mask=\.\.\.\) is called as mask\(xb, yb\), xb and yb tuples, "
                                        r"which the function given cannot take"):
        fit_batches(copy.deepcopy(PLAIN), [TARCallback(mask=lambda xb: xb[0] != 0)], dls=padded_lm_dls())
    with pytest.raises(TypeError, match=r"mask= takes a function of the batch"): TARCallback(mask=torch.ones(2, 2))


def test_a_mask_beside_the_classifiers_padding_is_and_ed_with_it():
    "Both say which steps are real: a step counts where both do (here the mask also drops each text's first token)"
    dls = clas_dls(LENGTHS, seq_len=BPTT)
    def not_first(xb, yb):
        m = xb[0] != PAD
        first = m.int().argmax(1)  # pad_first: the first real token of each text
        m[torch.arange(len(m)), first] = False
        return m
    added, outs, valid = classifier_batch([TARCallback(alpha=1., beta=2., mask=not_first)], dls)
    mine = not_first((dls.one_batch()[0],), None)
    assert added == penalty(ref_penalty(1., 2., (outs, valid & mine)))
    assert far(ref_penalty(1., 2., (outs, valid)), ref_penalty(1., 2., (outs, valid & mine)))


def test_validation_metrics_use_the_mask_too():
    model = copy.deepcopy(PLAIN)
    raws = Capture(model.rnn)
    dls = padded_lm_dls()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=TARCallback(mask=by_pad, valid_metrics=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    real = dls.one_batch()[0] != PAD
    names = learn.recorder.metric_names[1:-1]
    valid_tar = learn.recorder.values[0][names.index('valid_tar')]
    assert valid_tar == pytest.approx(ref_tar(raws.valid_outputs[0], real), rel=1e-5)


# --- the forward that reaches the loss, not another forward in the same batch -----------------------------------------
class ExtraForward(Callback):
    "Runs the model on other inputs in before_batch, as adversarial training or a consistency loss does."
    def __init__(self, order, grad=True): self.order, self.grad = order, grad
    def before_batch(self):
        if not self.training: return
        with torch.set_grad_enabled(self.grad): self.other = self.learn.model(self.learn.xb[0].flip(1))


@pytest.mark.parametrize('order,grad', [(10, True), (10, False), (0, True)])
def test_penalty_of_the_forward_that_reaches_the_loss(order, grad):
    "Another forward in the same batch, before or after our before_batch: the training forward's activation is used."
    model, spy = CheckpointLM(), LossSpy(stop=1)
    cap = Capture(model.lstm)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(),
                    cbs=[TARCallback(2., 1.), ExtraForward(order, grad), spy])
    quiet_fit(learn)
    other, train = cap.outputs
    assert spy.added[0] == penalty(ref_penalty(2., 1., train))
    assert far(ref_penalty(2., 1., other), ref_penalty(2., 1., train))
    # and the gradient is the one without the extra forward
    with_extra = first_grads(CheckpointLM(), TARCallback(2., 1.), [ExtraForward(order, grad)])
    torch.testing.assert_close(with_extra, first_grads(CheckpointLM(), TARCallback(2., 1.)), rtol=0, atol=1e-7)


# --- calls that span chunks or repeat: a SentenceEncoder over bptt chunks, a module called twice ----------------------
def test_sentence_encoder_tar_spans_bptt_chunks():
    "A classifier's SentenceEncoder runs the AWD_LSTM once per bptt chunk: TAR covers the joined sequence."
    bptt, sl = 4, 12
    dls = clas_dls([sl, 8, 4], seq_len=bptt)  # rows 1 and 2 start one and two chunks late
    x, _ = dls.one_batch()
    torch.manual_seed(0)
    model = get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=bptt, config=tiny_config(clas=True), max_len=sl)
    cap, grab = Capture(model[0].module), LossSpy(stop=1)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[TARCallback(1., 4.), grab])
    quiet_fit(learn)
    assert [t.module for t in learn.tar.reads] == [model[0]] * 2  # hooked: the encoder, not the AWD_LSTM
    chunks = cap.outputs
    assert [c.shape[:2] for c in chunks] == [(1, bptt), (2, bptt), (3, bptt)]
    joined = torch.cat([nn.functional.pad(c, (0, 0, 0, 0, 0, 3 - len(c))) for c in chunks], 1)
    valid = x != PAD
    expected = ref_penalty(1., 4., (joined, valid))
    assert grab.added[0] == penalty(expected)
    # The pairs across chunk boundaries count: chunks taken one by one give another number.
    by_chunk = ref_penalty(1., 4., *[(c, valid[:len(c), i * bptt:(i + 1) * bptt]) for i, c in enumerate(chunks)])
    assert far(by_chunk, expected)


class TwoPassLSTM(NoDropoutLSTMLM):
    "One nn.LSTM run twice per forward, on the first 5 steps and on the other 7: a reused module."
    def forward(self, x):
        e = self.emb(x)
        return self.head(torch.cat([self.lstm(e[:, :5])[0], self.lstm(e[:, 5:])[0]], 1))


def test_a_module_called_twice_is_asked_about_and_call_all_pools_both_calls():
    """Two calls that do not chain are not one sequence: the error names both; `Place(call='all')` reads both, the sums
    of both calls over their total count, not the last call's."""
    learn = Learner(lm_dls(), TwoPassLSTM(), loss_func=CrossEntropyLossFlat(), cbs=TARCallback(2., 1., modules='lstm'))
    with pytest.raises(ValueError, match=r"'lstm' \(LSTM\) ran 2 times in one forward.*call 0: .*call 1: .*"
                                         r"modules=Place\('lstm', call=i\)"):
        quiet_fit(learn)
    model = TwoPassLSTM()
    cap, grab = Capture(model.lstm), LossSpy(stop=1)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(),
                    cbs=[TARCallback(2., 1., modules=Place('lstm', call='all'), ar_modules=Place('lstm', call='all')),
                         grab])
    quiet_fit(learn)
    a, b = cap.outputs
    assert (a.shape[1], b.shape[1]) == (5, 7)
    pooled = ref_penalty(2., 1., a, b)
    assert grab.added[0] == penalty(pooled)
    last_only = ref_penalty(2., 1., b)
    mean_of_means = (ref_penalty(2., 1., a) + last_only) / 2
    assert far(last_only, pooled) and far(mean_of_means, pooled)
