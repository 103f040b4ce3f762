"""TARCallback on `torch.compile`d models (issue 14): the default inductor backend trains with the eager model's
penalty, the hooks add no graph break or recompile to a model that compiles to one graph, and a callback attached
after compiling says why its hooks are not called and what to do. Models stay tiny: inductor compiles take seconds."""
import os
import shutil

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch import nn
from torch._dynamo.utils import counters
from fastai.text.all import (AWD_LSTM, SGD, CrossEntropyLossFlat, Learner, get_language_model,
                             get_text_classifier)

from fastai_tar import TARCallback
from conftest import VOCAB, Capture, LossSpy, clas_dls, lm_dls, penalty, quiet_fit, ref_penalty, tiny_config

# inductor writes C++ for the CPU: it needs a compiler, which a machine may not have
CXX = shutil.which(os.environ.get('CXX', 'g++')) or shutil.which('clang++')
needs_cxx = pytest.mark.skipif(CXX is None, reason="inductor's CPU backend needs a C++ compiler (g++/clang++)")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    "Each test compiles from nothing and counts its own graphs."
    torch._dynamo.reset(); counters.clear()
    yield
    torch._dynamo.reset()


class RNNLM(nn.Module):
    "Embedding -> nn.LSTM/nn.GRU (batch-first, or sequence-first inside) -> Linear; no dropout."
    def __init__(self, cls=nn.LSTM, batch_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(16, VOCAB)
        self.rnn = cls(8, 16, batch_first=batch_first)

    def forward(self, x):
        e = self.emb(x) if self.batch_first else self.emb(x).transpose(0, 1)
        h = self.rnn(e)[0]
        return self.head(h if self.batch_first else h.transpose(0, 1))


def awd_lm():
    torch.manual_seed(0)
    return get_language_model(AWD_LSTM, VOCAB, config={**tiny_config(), 'n_layers': 1})


def padded_classifier():
    torch.manual_seed(0)
    return get_text_classifier(AWD_LSTM, VOCAB, 2, seq_len=12, config=tiny_config(clas=True))


def loss_grads(make, dls, backend=None, n=3, mode=None, **tar):
    "Per-batch loss_grad of the first `n` training batches, the model compiled with `backend` (None: eager)."
    model, spy = make(), LossSpy(stop=n)
    learn = Learner(dls, model if backend is None else torch.compile(model, backend=backend, mode=mode),
                    loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=[TARCallback(2., 1., **tar), spy])
    torch.manual_seed(1)  # the same dropout masks in both runs (inductor draws them as eager does: fallback_random)
    with inductor_config.patch(fallback_random=True): quiet_fit(learn)
    return [g.item() for _, g in spy.train], spy.added


CASES = {
    'lstm_batch_first': (lambda: RNNLM(nn.LSTM, True), lm_dls),
    'gru_seq_first': (lambda: RNNLM(nn.GRU, False), lm_dls),
    'awd_lstm_lm': (awd_lm, lm_dls),
}


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize('case', list(CASES))
def test_inductor_trains_with_the_eager_penalty(case):
    make, dls = CASES[case]
    eager, added = loss_grads(make, dls())
    compiled, _ = loss_grads(make, dls(), backend='inductor')
    assert compiled == [pytest.approx(g, abs=1e-5) for g in eager]
    assert min(added) > 1e-3  # the penalty is far above the tolerance: a compiled run without it would fail


@needs_cxx
@pytest.mark.slow
@pytest.mark.parametrize('mode', ['reduce-overhead', 'max-autotune'])
def test_inductor_modes_train_with_the_eager_penalty(mode):
    "torch.compile's other modes on a CPU (CUDA graphs and GEMM autotuning do not apply there, the rest does)"
    make, dls = CASES['lstm_batch_first']
    eager, added = loss_grads(make, dls(), n=2)
    compiled, _ = loss_grads(make, dls(), backend='inductor', mode=mode, n=2)
    assert compiled == [pytest.approx(g, abs=1e-5) for g in eager] and min(added) > 1e-3


@pytest.mark.slow
def test_compiled_padded_classifier_gets_the_eager_penalty():
    "fastai's classifier (SentenceEncoder, padding mask) through dynamo and AOTAutograd (aot_eager: no C++ needed)."
    dls = lambda: clas_dls([12, 10, 7, 3], seq_len=12)
    eager, added = loss_grads(padded_classifier, dls(), n=1)
    compiled, _ = loss_grads(padded_classifier, dls(), backend='aot_eager', n=1)
    assert compiled == [pytest.approx(g, abs=1e-5) for g in eager] and added[0] > 1e-3


def dynamo_counts(with_tar):
    "Graphs, frames, graph breaks and recompiles of a 2-epoch fit of an nn.LSTM LM that compiles to one graph."
    torch._dynamo.reset(); counters.clear()
    spy = LossSpy()
    learn = Learner(lm_dls(n=10), torch.compile(RNNLM(), backend='aot_eager'), loss_func=CrossEntropyLossFlat(),
                    opt_func=SGD, cbs=[TARCallback()] if with_tar else [])
    with torch._dynamo.config.patch(allow_rnn=True): quiet_fit(learn, 2, cbs=spy)
    assert [x.shape[0] for x, _ in learn.dls.train] == [4, 4, 2]  # the last batch is smaller: torch's own recompile
    got = {k: sum(counters[k].values()) for k in ('graph_break', 'unimplemented', 'recompiles')}
    got.update(frames=counters['frames']['total'], graphs=counters['stats']['unique_graphs'])
    return got, spy.added


def test_no_added_graph_break_or_recompile_on_a_one_graph_model():
    """nn.LSTM compiles to one graph with allow_rnn=True; the hooks' append is traced into it, so the callback adds
    neither a graph break nor a recompile over two epochs (train and validation, a smaller last batch)."""
    without, _ = dynamo_counts(False)
    assert without['graph_break'] == without['unimplemented'] == 0  # the model does compile cleanly
    with_tar, added = dynamo_counts(True)
    assert with_tar == without
    assert len(added) == 6 and min(added) > 1e-3  # and the penalty was applied at every batch


def test_callback_attached_after_compiling_says_why_and_what_to_do():
    "dynamo does not re-trace for hooks added later: our error names the cause and the fix, which then works."
    model = RNNLM()
    learn = Learner(lm_dls(), torch.compile(model, backend='aot_eager'), loss_func=CrossEntropyLossFlat(), opt_func=SGD)
    with torch._dynamo.config.patch(allow_rnn=True):
        quiet_fit(learn)  # traced without our hooks
        learn.add_cb(TARCallback(2., 1.))
        with pytest.raises(RuntimeError, match=r"compiled \(torch.compile\).*traced before.*torch.compiler.reset\(\)"):
            quiet_fit(learn)
        torch.compiler.reset()
        cap, spy = Capture(model.rnn), LossSpy(stop=1)
        quiet_fit(learn, cbs=spy)
    assert spy.added[0] == penalty(ref_penalty(2., 1., cap.outputs[0]))
