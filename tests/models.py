"""Test models and helpers shared by several test files: the fastai book's chapter 12 `LMModel7` and its data's
sizes, small LSTM language models, fit helpers that record the loss and the model's output, and a loss of 0 (so that
loss_grad is the added penalty itself)."""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from fastai.text.all import Callback, CancelFitException, CrossEntropyLossFlat, Learner, Module, SGD

from conftest import LossSpy, VOCAB, lm_dls, quiet_fit


def first_batch(model, cbs, dls=None, seed=1):
    "loss and loss_grad of one training batch; reseeded so that every run draws the same dropout masks."
    spy = LossSpy(stop=1)
    learn = Learner(dls or lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=list(cbs) + [spy])
    torch.manual_seed(seed)
    quiet_fit(learn, lr=1e-3)
    return spy.train[0]


# A classifier batch as fastai builds one: longest first, whole bptt chunks of padding first, the rest of a
# sequence's padding after it. Rows real at each chunk start form a prefix of the batch (SentenceEncoder's
# `real_bs` assumes so); padding crosses chunk boundaries (rows 2 and 3) and ends some rows (rows 1 to 3).
BPTT, LENGTHS = 4, [12, 10, 7, 3]


def encoded_batch(cap):
    "The SentenceEncoder's (outs, valid) of the one training batch, checked to be what fastai means it to be."
    (outs, valid), = [(h, v) for h, v, training in cap.records if training]
    assert valid.sum(1).tolist() == LENGTHS and (~valid[:, :BPTT]).any() and (~valid[:, -1]).any()
    assert (outs.abs().sum(-1)[valid] > 0).all()  # every real token went through the LSTM: no zero row as 'valid'
    return outs, valid


class NoRNN(Module):
    "No nn.RNN module: two tanh layers with dropout, returning fastai's contract with per-layer lists."
    def __init__(self, vocab_sz, n=16):
        self.e, self.l1, self.l2, self.d, self.o = (nn.Embedding(vocab_sz, n), nn.Linear(n, n), nn.Linear(n, n),
                                                     nn.Dropout(0.4), nn.Linear(n, vocab_sz))

    def forward(self, x):
        r1 = torch.tanh(self.l1(self.e(x))); d1 = self.d(r1)
        r2 = torch.tanh(self.l2(d1)); d2 = self.d(r2)
        return self.o(d2), [r1, r2], [d1, d2]


class Outputs(Callback):
    "The model's whole output in training, before any callback strips it (after_pred, first)."
    order = -100
    def before_fit(self): self.outs = []
    def after_pred(self):
        if self.training: self.outs.append(self.pred)


def fit_with(dls, model, *cbs, n_epoch=1):
    spy, outs = LossSpy(), Outputs()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[*cbs, spy, outs])
    torch.manual_seed(1)
    quiet_fit(learn, n_epoch)
    return learn, spy, outs.outs


class VocabLSTMLM(Module):
    "Embedding, nn.LSTM, Linear: no contract, so the LSTM is hooked"
    def __init__(self, vocab_sz, n=16):
        self.e, self.rnn, self.o = nn.Embedding(vocab_sz, n), nn.LSTM(n, n, batch_first=True), nn.Linear(n, vocab_sz)
    def forward(self, x): return self.o(self.rnn(self.e(x))[0])


class CheckpointLM(nn.Module):
    "Embedding -> nn.LSTM -> Linear, no dropout; the LSTM optionally under torch.utils.checkpoint."
    def __init__(self, reentrant=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.lstm, self.head = nn.Embedding(VOCAB, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, VOCAB)
        self.reentrant = reentrant

    def forward(self, x):
        e = self.emb(x)
        if self.reentrant is None: return self.head(self.lstm(e)[0])
        return self.head(checkpoint(lambda t: self.lstm(t)[0], e, use_reentrant=self.reentrant))


class FirstBatchGrads(Callback):
    "The gradient of every parameter after the first training batch's backward; then the fit stops."
    order = 50
    def after_backward(self): self.grads = torch.cat([p.grad.flatten().clone() for p in self.learn.model.parameters()])
    def after_batch(self):
        if self.training: raise CancelFitException()


def first_grads(model, tar, cbs=()):
    spy = FirstBatchGrads()
    quiet_fit(Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=[tar, *cbs, spy]))
    return spy.grads


class NoDropoutLSTMLM(nn.Module):
    "Embedding -> nn.LSTM -> Linear: no dropout, so two runs on the same data are the same computation."
    def __init__(self, emb=8, n_hid=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.lstm, self.head = nn.Embedding(VOCAB, emb), nn.LSTM(emb, n_hid, batch_first=True), \
            nn.Linear(n_hid, VOCAB)

    def forward(self, x): return self.head(self.lstm(self.emb(x))[0])


BOOK_BS, BOOK_SL, BOOK_NH = 8, 8, 16


class LMModel7(Module):
    "The fastai book's chapter 12 LMModel7, as printed there (`bs` as an argument instead of a global)."
    def __init__(self, vocab_sz, n_hidden, n_layers, p, bs=BOOK_BS):
        self.i_h = nn.Embedding(vocab_sz, n_hidden)
        self.rnn = nn.LSTM(n_hidden, n_hidden, n_layers, batch_first=True)
        self.drop = nn.Dropout(p)
        self.h_o = nn.Linear(n_hidden, vocab_sz)
        self.h_o.weight = self.i_h.weight
        self.h = [torch.zeros(n_layers, bs, n_hidden) for _ in range(2)]

    def forward(self, x):
        raw, h = self.rnn(self.i_h(x), self.h)
        out = self.drop(raw)
        self.h = [h_.detach() for h_ in h]
        return self.h_o(out), raw, out

    def reset(self):
        for h in self.h: h.zero_()


def lmmodel7(dls, seed=0): torch.manual_seed(seed); return LMModel7(len(dls.vocab), BOOK_NH, 2, 0.4)


class PlainLM(Module):
    "LMModel7 without the contract: its forward returns the logits only."
    def __init__(self, vocab_sz): self.i_h, self.rnn, self.drop, self.h_o = (
        nn.Embedding(vocab_sz, BOOK_NH), nn.LSTM(BOOK_NH, BOOK_NH, batch_first=True), nn.Dropout(0.4),
        nn.Linear(BOOK_NH, vocab_sz))
    def forward(self, x): return self.h_o(self.drop(self.rnn(self.i_h(x))[0]))


def cpu_replicas(module, n):
    """What `nn.parallel.replicate` makes for `n` GPUs, on the CPU: every submodule copied by
    `_replicate_for_data_parallel` (sharing the original's hook dicts), its parameters as non-leaf views."""
    copies = [{m: m._replicate_for_data_parallel() for m in module.modules()} for _ in range(n)]
    for memo in copies:
        for m, r in memo.items():
            for name, child in m._modules.items(): r._modules[name] = None if child is None else memo[child]
            for name, p in m._parameters.items(): setattr(r, name, None if p is None else p.view_as(p))
    return [memo[module] for memo in copies]


def flat_params(model): return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def zero_loss(pred, *yb):
    "A float32 loss of 0 (fastai's Recorder fails on a half loss): loss_grad is then the added penalty itself."
    return pred.float().sum() * 0


class GRULM(nn.Module):
    "Embedding -> nn.GRU -> Linear; `in_place` adds to the GRU's output in place (an error of ours to raise)."
    def __init__(self, in_place=False):
        super().__init__()
        torch.manual_seed(0)
        self.in_place, self.emb, self.rnn = in_place, nn.Embedding(VOCAB, 8), nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, x):
        h = self.rnn(self.emb(x))[0]
        if self.in_place: h += 1.
        return self.head(h)


# --- the AR/TAR paper's own code (salesforce/awd-lstm-lm, `locked_dropout.py`, `weight_drop.py`, `model.py`),
# as written there up to what torch 2 needs (WeightDrop keeps its raw weight as a parameter and sets a plain tensor on
# the module), and a fastai glue around it --------------------------------------------------------------------------
class LockedDropout(nn.Module):
    "awd-lstm-lm's variational dropout: one mask per sequence, the same at every step (time x batch x features)."
    def forward(self, x, dropout=0.5):
        if not self.training or not dropout: return x
        m = x.data.new(1, x.size(1), x.size(2)).bernoulli_(1 - dropout)
        return m.div(1 - dropout).expand_as(x) * x


class WeightDrop(nn.Module):
    "awd-lstm-lm's weight dropout: calls the wrapped module's `forward` directly, which skips its forward hooks."
    def __init__(self, module, weights, dropout=0.):
        super().__init__()
        self.module, self.weights, self.dropout = module, weights, dropout
        for name in weights:
            w = getattr(module, name)
            del module._parameters[name]
            module.register_parameter(name + '_raw', nn.Parameter(w.data))

    def _setweights(self):
        for name in self.weights:
            raw = getattr(self.module, name + '_raw')
            setattr(self.module, name, nn.functional.dropout(raw, p=self.dropout, training=self.training))

    def forward(self, *args):
        self._setweights()
        with torch.backends.cudnn.flags(enabled=False): return self.module.forward(*args)


class AWDRNNModel(nn.Module):
    """awd-lstm-lm's `RNNModel` (LSTM): sequence-first, one LockedDropout called four times per forward (the input, the
    hidden outputs between layers, the last output), each layer a WeightDrop(LSTM); returns what `return_h` does."""
    def __init__(self, ntoken, ninp=8, nhid=12, nlayers=3, dropout=0.4, dropouth=0.3, dropouti=0.65, wdrop=0.5):
        super().__init__()
        self.lockdrop, self.encoder = LockedDropout(), nn.Embedding(ntoken, ninp)
        self.rnns = nn.ModuleList([WeightDrop(nn.LSTM(ninp if l == 0 else nhid, nhid if l != nlayers - 1 else ninp, 1),
                                              ['weight_hh_l0'], dropout=wdrop) for l in range(nlayers)])
        self.decoder = nn.Linear(ninp, ntoken)
        self.dropout, self.dropouth, self.dropouti, self.nlayers = dropout, dropouth, dropouti, nlayers

    def forward(self, input, hidden=None):
        raw_output = self.lockdrop(self.encoder(input), self.dropouti)
        hidden = hidden or [None] * self.nlayers
        new_hidden, raw_outputs, outputs = [], [], []
        for l, rnn in enumerate(self.rnns):
            raw_output, new_h = rnn(raw_output, hidden[l])
            new_hidden.append(new_h)
            raw_outputs.append(raw_output)
            if l != self.nlayers - 1:
                raw_output = self.lockdrop(raw_output, self.dropouth)
                outputs.append(raw_output)
        output = self.lockdrop(raw_output, self.dropout)
        outputs.append(output)
        return output.view(output.size(0) * output.size(1), output.size(2)), new_hidden, raw_outputs, outputs


class AWDGlue(nn.Module):
    """awd-lstm-lm's model in a fastai Learner: batch-first tokens in, transposed for the sequence-first model; returns
    (logits, raw, dropped) of the last layer as its `main.py` reads them (`rs_hidden[-1]`, `dropped_rs_hidden[-1]`),
    both time x batch x features. `record` keeps them for the hand references."""
    def __init__(self, ntoken, contract=True):
        super().__init__()
        self.model, self.contract, self.record = AWDRNNModel(ntoken), contract, []

    def forward(self, x):
        out, _, raws, drops = self.model(x.t())
        logits = self.model.decoder(out).view(x.shape[1], x.shape[0], -1).transpose(0, 1)
        self.record.append((raws[-1], drops[-1]))
        return (logits, raws[-1], drops[-1]) if self.contract else logits


class WordLM(nn.Module):
    "PyTorch's word_language_model example: one `self.drop` on the embeddings and again on the LSTM's output."
    def __init__(self, ntoken=VOCAB, ninp=8, nhid=12, dropout=0.5):
        super().__init__()
        self.drop, self.encoder = nn.Dropout(dropout), nn.Embedding(ntoken, ninp)
        self.rnn, self.decoder = nn.LSTM(ninp, nhid, batch_first=True), nn.Linear(nhid, ntoken)
        self.record = []

    def forward(self, x):
        emb = self.drop(self.encoder(x))
        output, _ = self.rnn(emb)
        dropped = self.drop(output)
        self.record.append((output, dropped, emb))
        return self.decoder(dropped)
