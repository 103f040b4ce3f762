"""What the penalty reads and its value: the tensor as it left the module (an in-place change afterwards is an error,
never the changed value), every call of a read module in the training forward (one-step calls joined into a sequence,
calls without grad skipped), whatever a callback before ours makes of `learn.pred`, and AR on outputs with no time
axis. Each value is checked against float64 references on activations the test captures with its own hooks."""
import copy
import warnings

import pytest
import torch
from torch import nn
from fastai.text.all import SGD, Callback, CrossEntropyLossFlat, DataLoaders, Learner

from fastai_tar import TARCallback
from conftest import VOCAB, Capture, LossSpy, far, lm_dls, penalty, quiet_fit, ref_ar, ref_penalty, ref_tar


def fit_batches(model, cbs, dls=None, n=1, loss_func=None, **kw):
    "Fit `model` for `n` training batches with `cbs`; the learner and its `LossSpy`."
    spy = LossSpy(stop=n)
    learn = Learner(dls or lm_dls(n=4 * n), model, loss_func=loss_func or CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[*cbs, spy], **kw)
    torch.manual_seed(1)
    quiet_fit(learn, lr=1e-3)
    return learn, spy


def flat_params(model): return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


# --- 1. in-place ops after the read module -------------------------------------------------------------------------
class InPlaceAfterGRU(nn.Module):
    "A GRU whose output the forward changes in place before the head."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.gru, self.head = nn.Embedding(VOCAB, 8), nn.GRU(8, 12, batch_first=True), nn.Linear(12, VOCAB)

    def forward(self, x):
        out, _ = self.gru(self.emb(x))
        out += 1.  # autograd allows it: GRU's backward does not need its output
        return self.head(out)


class ReLUAfterDropout(nn.Module):
    "An LSTM, then nn.Dropout, then nn.ReLU(inplace=True) on the dropout's output."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True)
        self.drop, self.act, self.head = nn.Dropout(0.3), nn.ReLU(inplace=True), nn.Linear(12, VOCAB)

    def forward(self, x): return self.head(self.act(self.drop(self.rnn(self.emb(x))[0])))


@pytest.mark.parametrize('make, kw, name', [
    (InPlaceAfterGRU, dict(alpha=0., beta=1.), 'gru'),
    (ReLUAfterDropout, dict(alpha=2., beta=0., ar_modules='drop'), 'drop'),
], ids=['GRU then +=', 'Dropout then ReLU(inplace=True)'])
def test_in_place_change_after_the_read_module_is_an_error_naming_it(make, kw, name):
    "Never the changed value: a RuntimeError naming the in-place change and the module, before any step."
    model = make()
    before = flat_params(model)
    with pytest.raises(RuntimeError, match='in place') as e: fit_batches(model, [TARCallback(**kw)])
    assert name in str(e.value)
    assert torch.equal(flat_params(model), before)  # raised before backward: no step was taken


# --- 2. an RNN called once per time step ---------------------------------------------------------------------------
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


def zero_loss(pred, *yb): return pred.float().sum() * 0


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


# --- 9. a callback before ours derives learn.pred from the output --------------------------------------------------
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


# --- 11. a no-grad burn-in call of the read module -----------------------------------------------------------------
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


# --- 12. outputs without a time axis -------------------------------------------------------------------------------
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
