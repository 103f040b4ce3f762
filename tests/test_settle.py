"""What each term reads, by one rule: one candidate, or ask (`fastai_tar.settle`; the types in `fastai_tar.plan`).

Settled from one watched forward: the default places (fastai's language model and classifier, the recurrent module
not inside another, several of them), AR on the dropout that receives what TAR reads (by identity), the calls of a
module run several times (one sequence of steps, or ask), the item of an output (the class's, the only float tensor,
or ask), the axes (yours, checked against what a class makes certain), fastai's contract's items, names, wrappers and
modules whose hooks do not fire; what `places` shows before the first forward, and a plan read on a copy of its
model."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from fastai.text.all import AWD_LSTM, get_text_classifier

from fastai_tar.capture import Capture
from fastai_tar.plan import Contract, NothingToRegularize, Place, Request, fingerprint, structure, unwrap_model
from fastai_tar.settle import describe_candidates, settle, settle_watch
from fastai_tar.schedule import may_be_on

from conftest import VOCAB, tiny_config, tiny_lm
from models import AWDGlue, WordLM


def request(alpha=2., beta=1., modules=None, ar_modules=None, all_layers=False, seq_dim=None, feature_dim=None,
            contract=None):
    return Request.of(alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim, contract, may_be_on)


def settled(model, *x, contract=None, batch_size=None, **kw):
    "The plan settled from one training forward of `model` on `x`, watched as TARHooks watches it"
    req = request(**kw)
    cap = Capture()
    cap.open(model)
    cap.watch(settle_watch(model, req))
    try:
        out = model(*x)
        return settle(model, req, cap.forward, contract(out) if callable(contract) else contract, batch_size)
    finally: cap.close()


def places(plan): return [(r.kind, r.name, r.source) for r in plan.reads]


def tokens(bs=4, sl=12): return torch.randint(2, VOCAB, (bs, sl))


class Chain(nn.Module):
    "Embedding -> modules in order; the output is the last module's (its first item for an RNN)"
    def __init__(self, *mods):
        super().__init__()
        self.emb, self.mods = nn.Embedding(VOCAB, 8), nn.ModuleList(mods)
    def forward(self, x):
        h = self.emb(x)
        for m in self.mods:
            h = m(h)
            if isinstance(h, tuple): h = h[0]
        return h


# --- the default places -----------------------------------------------------------------------------------------------
def test_fastai_language_model_reads_the_encoder_and_the_dropout_that_receives_its_output():
    model = tiny_lm()
    plan = settled(model, tokens())
    assert places(plan) == [('ar', '1.output_dp', 'found'), ('tar', '0', 'found')]
    ar, tar = plan.reads
    assert ar.module is model[1].output_dp and ar.via is tar and tar.module is model[0]
    assert "fastai's AWD_LSTM" in tar.why and 'takes the output of 0' in ar.why
    assert (tar.seq_dim, tar.steps, tar.axes_given) == (1, False, False) and 'batch-first' in tar.axis_why
    assert plan.notes == []


def test_all_layers_reads_each_awd_lstm_layer_and_the_dropout_of_each():
    model = tiny_lm()
    plan = settled(model, tokens(), all_layers=True)
    assert places(plan) == [('ar', '0.hidden_dps.0', 'found'), ('ar', '1.output_dp', 'found'),
                            ('tar', '0.rnns.0', 'found'), ('tar', '0.rnns.1', 'found')]
    assert [r.module for r in plan.reads] == [model[0].hidden_dps[0], model[1].output_dp, *model[0].rnns]
    assert [r.seq_dim for r in plan.reads if r.kind == 'tar'] == [1, 1]  # the LSTM inside each WeightDropout
    plan = settled(Chain(nn.LSTM(8, 4), nn.GRU(4, 5, batch_first=True)), tokens(), all_layers=True)
    assert [(r.kind, r.name) for r in plan.reads] == [('ar', 'mods.0'), ('ar', 'mods.1'), ('tar', 'mods.0'),
                                                       ('tar', 'mods.1')]
    assert [r.seq_dim for r in plan.reads if r.kind == 'tar'] == [0, 1] and 'every RNN module' in plan.reads[2].why
    with pytest.raises(ValueError, match=r"all_layers=True reads every layer, but mods.0 is an RNN module of several"):
        settled(Chain(nn.LSTM(8, 4, 2)), tokens(), all_layers=True)


def test_a_classifier_reads_its_encoder_with_the_padding_mask_for_both_terms():
    model = get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))
    plan = settled(model, tokens())
    assert places(plan) == [('ar', '0', 'found'), ('tar', '0', 'found')]
    assert all(r.masked and r.item == 0 for r in plan.reads) and plan.notes == []  # fastai's dropped is its raw
    with pytest.raises(ValueError, match='SentenceEncoder joins its bptt chunks'):
        settled(model, tokens(), all_layers=True)


def test_ar_reads_the_dropout_that_receives_what_tar_reads_else_that_tensor_and_says_so():
    plan = settled(Chain(nn.LSTM(8, 6, batch_first=True), nn.Dropout(0.5), nn.Linear(6, VOCAB)), tokens())
    assert places(plan) == [('ar', 'mods.1', 'found'), ('tar', 'mods.0', 'found')] and plan.notes == []
    plan = settled(Chain(nn.LSTM(8, 6, batch_first=True), nn.Linear(6, 6), nn.Dropout(0.5)), tokens())
    assert places(plan) == [('ar', 'mods.0', 'found'), ('tar', 'mods.0', 'found')]  # the dropout gets another tensor
    assert [k for k, _ in plan.notes] == ['ar raw'] and "no dropout module takes the output of 'mods.0'" in \
        plan.notes[0][1]
    assert settled(Chain(nn.LSTM(8, 6, batch_first=True)), tokens(), alpha=0.).notes == []  # AR off: nothing to say

    class TwoDropouts(nn.Module):
        def __init__(self): super().__init__(); self.e, self.rnn, self.d1, self.d2 = (
            nn.Embedding(VOCAB, 4), nn.GRU(4, 4, batch_first=True), nn.Dropout(0.1), nn.Dropout(0.2))
        def forward(self, x): h = self.rnn(self.e(x))[0]; return self.d1(h) + self.d2(h)
    with pytest.raises(ValueError, match=r"2 dropouts take it \('d1' \(Dropout\), 'd2' \(Dropout\)\).*ar_modules="):
        settled(TwoDropouts(), tokens())

    class MonteCarlo(nn.Module):  # one dropout taking the RNN output twice: two masks, two candidates
        def __init__(self): super().__init__(); self.e, self.rnn, self.drop = (
            nn.Embedding(VOCAB, 4), nn.GRU(4, 4, batch_first=True), nn.Dropout(0.5))
        def forward(self, x): h = self.rnn(self.e(x))[0]; return (self.drop(h) + self.drop(h)) / 2
    with pytest.raises(ValueError, match=r"drop \(Dropout\) takes that output 2 times in one forward \(calls 0, 1\).*"
                                         r"ar_modules=Place\('drop', call=1\)"):
        settled(MonteCarlo(), tokens())
    plan = settled(MonteCarlo(), tokens(), ar_modules=Place('drop', call=1))
    assert places(plan) == [('ar', 'drop', 'named'), ('tar', 'rnn', 'found')] and plan.reads[0].call == 1


def test_several_recurrent_modules_read_the_last_and_say_so_naming_every_one():
    class EncoderCell(nn.Module):
        def __init__(self): super().__init__(); self.enc, self.dec = nn.LSTM(3, 5, batch_first=True), nn.LSTMCell(5, 5)
        def forward(self, x):
            out, (h, c) = self.enc(x)
            state = (h[0], c[0])
            for _ in range(3): state = self.dec(out[:, -1], state)
            return state[0]
    plan = settled(EncoderCell(), torch.randn(2, 6, 3))
    assert [r.name for r in plan.reads] == ['dec', 'dec'] and plan.reads[1].others == ('enc',)
    assert ('several', "TARCallback found 2 recurrent modules and reads the last one, 'dec' (enc too): name the one "
            "to read in modules= (or pass all_layers=True to read each)") in plan.notes
    assert not any(k == 'several' for k, _ in settled(EncoderCell(), torch.randn(2, 6, 3), modules='enc').notes)


def test_nothing_to_regularize_says_what_it_looked_for():
    with pytest.raises(NothingToRegularize, match=r"AWD_LSTM.*nn.LSTM/GRU/RNN.*modules="):
        settled(nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3))


# --- which call -------------------------------------------------------------------------------------------------------
def test_a_module_run_several_times_is_read_only_as_one_sequence_or_where_you_pick():
    model = WordLM()
    plan = settled(model, tokens())  # by default the dropout whose input is the LSTM's output: its second call
    (ar, tar) = plan.reads
    assert ar.name == 'drop' and ar.via is tar and ar.call is None
    with pytest.raises(ValueError, match=r"'drop' \(Dropout\) ran 2 times in one forward.*call 0: input torch.float32 "
                                         r"tensor \(4, 12, 8\).*call 1: input the output of 'rnn' \(LSTM\).*"
                                         r"ar_modules=Place\('drop', call=i\)"):
        settled(model, tokens(), ar_modules='drop')
    plan = settled(model, tokens(), ar_modules=Place('drop', call=1))
    assert plan.reads[0].call == 1 and 'call 1' in repr(plan.reads[0])
    with pytest.raises(ValueError, match=r"ran 2 times in this forward, so Place\(call=5\) picks a call it did not"):
        settled(model, tokens(), ar_modules=Place('drop', call=5))


class TwoStreams(nn.Module):
    "One GRUCell stepping two streams in one loop: a0, b0, a1, b1, ..."
    def __init__(self): super().__init__(); self.cell = nn.GRUCell(3, 4)
    def forward(self, x):
        a = b = None
        for t in range(x.shape[1]): a, b = self.cell(x[:, t], a), self.cell(-x[:, t], b)
        return a + b


def test_calls_that_chain_are_one_sequence_and_two_chains_are_asked_about():
    cell = nn.GRUCell(3, 4)
    chain = nn.Sequential()
    chain.cell = cell
    chain.forward = lambda x: [h := None] and [h := cell(x[:, t], h) for t in range(x.shape[1])][-1]
    assert places(settled(chain, torch.randn(2, 5, 3))) == [('ar', 'cell', 'found'), ('tar', 'cell', 'found')]
    with pytest.raises(ValueError, match=r"'cell' \(GRUCell\) ran 10 times.*2 sequences of steps \(calls 0, 2, 4, 6, "
                                         r"8; 1, 3, 5, 7, 9\).*call='all'"):
        settled(TwoStreams(), torch.randn(2, 5, 3))
    plan = settled(TwoStreams(), torch.randn(2, 5, 3), modules=Place('cell', call='all'))
    assert plan.reads[1].call == 'all' and plan.reads[1].steps


# --- which item -------------------------------------------------------------------------------------------------------
class Gated(nn.Module):
    def __init__(self, out='tuple'): super().__init__(); self.l, self.out = nn.Linear(3, 8), out
    def forward(self, x):
        a, b = self.l(x).chunk(2, -1)
        return {'gate': a, 'value': b, 'n': 2} if self.out == 'dict' else (a, b)


def test_an_output_with_several_tensors_asks_which_and_place_picks_it():
    model = nn.Sequential()
    model.block = Gated()
    with pytest.raises(ValueError, match=r"'block' \(Gated\) returns 2 float tensors.*modules=Place\('block', "
                                         r"item=...\), one of \[0, 1\]"):
        settled(model, torch.randn(2, 6, 3), modules='block', seq_dim=1)
    plan = settled(model, torch.randn(2, 6, 3), modules=Place('block', item=1), seq_dim=1)
    assert plan.reads[1].item == 1 and 'item 1' in repr(plan.reads[1])
    model.block = Gated('dict')
    plan = settled(model, torch.randn(2, 6, 3), modules=Place('block', item='value'), seq_dim=1)
    assert plan.reads[1].item == 'value'
    with pytest.raises(TypeError, match=r"item 'n' of 'block' \(Gated\)'s output is a int"):
        settled(model, torch.randn(2, 6, 3), modules=Place('block', item='n'), seq_dim=1)


def test_the_only_float_tensor_of_an_output_is_read():
    class OutAndStates(nn.Module):  # tsfast's RNN: (output, [hidden per layer])
        def __init__(self): super().__init__(); self.gru = nn.GRU(3, 4, batch_first=True)
        def forward(self, x): out, h = self.gru(x); return out, [h]
    model = nn.Sequential()
    model.rnn = OutAndStates()
    plan = settled(model, torch.randn(2, 6, 3), modules='rnn', seq_dim=1)
    assert plan.reads[1].item == 0 and 'item' in repr(plan.reads[1])


# --- axes -------------------------------------------------------------------------------------------------------------
def test_your_seq_dim_is_checked_against_a_layout_the_class_makes_certain():
    with pytest.raises(ValueError, match=r"seq_dim=0 contradicts the time axis of 0's output \(AWD_LSTM\), which is 1 "
                                         r"\(fastai's text modules are batch-first\)"):
        settled(tiny_lm(), tokens(), seq_dim=0)
    model = Chain(nn.LSTM(8, 4))
    assert settled(model, tokens(), seq_dim=0).reads[1].seq_dim == 0  # agrees: taken
    with pytest.raises(ValueError, match=r"seq_dim=1 contradicts the time axis of mods.0's output \(LSTM\)"):
        settled(model, tokens(), seq_dim=1)
    cell = settled(TwoStreams(), torch.randn(2, 5, 3), modules=Place('cell', call='all'), seq_dim=0).reads[1]
    assert (cell.seq_dim, cell.steps) == (0, True)  # a cell's steps are joined along yours


def test_a_module_of_unknown_layout_asks_for_seq_dim_unless_tar_is_off():
    model = nn.Sequential()
    model.mix = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"cannot tell the time axis of mix \(Linear\)'s output for TAR.*seq_dim="):
        settled(model, torch.randn(2, 5, 3), modules='mix')
    plan = settled(model, torch.randn(2, 5, 3), modules='mix', beta=0.)
    assert [r.kind for r in plan.reads] == ['ar', 'tar'] and plan.reads[1].seq_dim is None  # TAR reads nothing


def test_a_packed_sequence_is_read_batch_first_whatever_its_module():
    class Packed(nn.Module):
        def __init__(self): super().__init__(); self.gru = nn.GRU(3, 4)
        def forward(self, x, lengths): return self.gru(pack_padded_sequence(x, lengths, enforce_sorted=False))[0]

    class Model(nn.Module):
        def __init__(self): super().__init__(); self.rnn = Packed()
        def forward(self, x, lengths): return self.rnn(x, lengths)
    model = Model()
    plan = settled(model, torch.randn(5, 2, 3), torch.tensor([5, 3]), modules='rnn')
    assert plan.reads[1].seq_dim == 1 and 'PackedSequence' in plan.reads[1].axis_why


# --- fastai's contract ------------------------------------------------------------------------------------------------
def contract_of(model, per_layer=False, producer=True):
    def make(out):
        logits, raw, dropped = out
        rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
        return Contract(logits, [raw], [dropped], per_layer, [rnns[-1] if producer else None])
    return make


class BookLM(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.emb, self.rnn, self.drop = nn.Embedding(VOCAB, 6), nn.LSTM(6, 6, batch_first=batch_first), nn.Dropout(0.2)
    def forward(self, x):
        raw = self.rnn(self.emb(x))[0]
        d = self.drop(raw)
        return d.sum(-1), raw, d


def test_a_contract_is_read_from_the_output_in_the_layout_of_the_module_that_returned_raw():
    model = BookLM(batch_first=False)
    plan = settled(model, tokens().t(), contract=contract_of(model))
    assert places(plan) == [('ar', 'dropped', 'contract'), ('tar', 'raw', 'contract')] and plan.contract
    assert plan.reads[1].seq_dim == 0 and plan.watch == [model.rnn]
    plan = settled(model, tokens().t(), contract=contract_of(model), modules='rnn')  # AR stays on dropped
    assert places(plan) == [('ar', 'dropped', 'contract'), ('tar', 'rnn', 'named')]


def test_a_contract_raw_from_no_module_is_batch_first_unless_the_batch_size_refuses_it():
    model = BookLM(batch_first=False)
    plan = settled(model, tokens().t(), contract=contract_of(model, producer=False), batch_size=12)
    assert plan.reads[1].seq_dim == 1  # 12 x 4: the batch of 12 is first, as fastai's contract has it
    with pytest.raises(ValueError, match=r"first axis is not the batch of 4: pass seq_dim="):
        settled(model, tokens().t(), contract=contract_of(model, producer=False), batch_size=4)
    plan = settled(model, tokens().t(), contract=contract_of(model, producer=False), batch_size=4, seq_dim=0)
    assert plan.reads[1].seq_dim == 0 and plan.reads[1].axes_given
    with pytest.raises(ValueError, match='all_layers=True reads each layer, but the model returns fastai'):
        settled(model, tokens().t(), contract=contract_of(model), all_layers=True)


# --- names, wrappers, modules whose hooks do not fire -----------------------------------------------------------------
def test_names_wrapped_compiled_and_bad():
    model = Chain(nn.LSTM(8, 4, batch_first=True))
    assert unwrap_model(nn.DataParallel(model)) is model
    for name in ('mods.0', 'module.mods.0', '_orig_mod.mods.0', Place(model.mods[0])):
        assert settled(model, tokens(), modules=name).reads[1].module is model.mods[0]
    with pytest.raises(ValueError, match=r"modules: no module named 'nope'.*e.g. 'emb'"):
        settled(model, tokens(), modules='nope')
    with pytest.raises(ValueError, match=r"modules: the module LSTM is not part of"):
        settled(model, tokens(), modules=nn.LSTM(2, 2))
    with pytest.raises(ValueError, match=r"names the module 'mods.0' twice"):
        settled(model, tokens(), modules=['mods.0', model.mods[0]])
    class Frozen(Chain):  # its LSTM under no_grad (as checkpoint(use_reentrant=True) runs it)
        def forward(self, x):
            with torch.no_grad(): return self.mods[0](self.emb(x))[0]
    with pytest.raises(RuntimeError, match=r"reads mods.0 \(LSTM\) but it ran only without gradient.*use_reentrant"):
        settled(Frozen(nn.LSTM(8, 4, batch_first=True)), tokens())


def test_a_module_whose_wrapper_calls_its_forward_directly_is_said_and_the_wrapper_named():
    model = AWDGlue(VOCAB, contract=False)
    with pytest.raises(RuntimeError, match=r"reads model.rnns.2.module \(LSTM\) but it did not run through its hooks, "
                                           r"though 'model.rnns.2' \(WeightDrop\), which holds it, ran.*Name "
                                           r"'model.rnns.2' in modules= instead"):
        settled(model, tokens())
    plan = settled(model, tokens(), modules='model.rnns.2', ar_modules=Place('model.lockdrop', call=-1), seq_dim=0)
    assert places(plan) == [('ar', 'model.lockdrop', 'named'), ('tar', 'model.rnns.2', 'named')]


# --- before the first forward; a plan on a copy -----------------------------------------------------------------------
def test_places_before_the_first_forward_say_what_the_structure_says():
    model = Chain(nn.LSTM(8, 4, batch_first=True), nn.Dropout())
    text = describe_candidates(model, request(), {'ar': 2., 'tar': 1.})
    assert text.splitlines() == [
        "if the model's forward returns fastai's (logits, raw, dropped):",
        "  AR dropped (output[2]): alpha=2.0", "  TAR raw (output[1]): beta=1.0",
        "otherwise, found from the model's structure:",
        "  AR the dropout that takes the output TAR reads, else that output: alpha=2.0",
        "  TAR the last RNN module, mods.0 (LSTM): beta=1.0", "(settled at the first training batch)"]
    text = describe_candidates(model, request(modules='mods.0', contract=False), {'ar': 2., 'tar': 1.})
    assert text.splitlines()[:2] == ["AR the dropout that takes the output TAR reads, else that output: alpha=2.0",
                                     "TAR mods.0: beta=1.0; named by you"]


def test_a_plan_reads_a_copy_of_its_model_by_name_and_the_identity_of_modules_is_checked():
    model = WordLM()
    plan = settled(model, tokens())
    model.record.clear()
    twin = copy.deepcopy(model)
    assert structure(twin) == structure(model) and fingerprint(twin) != fingerprint(model)
    moved = plan.on(twin)
    assert [r.module for r in moved.reads] == [twin.drop, twin.rnn] and moved.reads[0].via is moved.reads[1]
    assert moved.watch == [twin.drop, twin.rnn] and moved.fingerprint == fingerprint(twin)
    model.extra = nn.Linear(2, 2)
    assert fingerprint(model) != plan.fingerprint and structure(model) != structure(twin)
