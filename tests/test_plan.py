"""What each term reads (`fastai_tar.plan`): the default places (fastai's language model and classifier, the last RNN
of any model, each layer with `all_layers`), names and coefficients, wrapped and compiled models, bad specs and their
errors, the layouts read from a module (`module_layout`), a contract's reads, when a plan holds (`fingerprint`) and
what `places` shows before the first batch (`describe_candidates`)."""
import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from fastai.text.all import AWD_LSTM, get_text_classifier
from fastai.text.models.awdlstm import RNNDropout, WeightDropout

from fastai_tar.fastai_interop import Contract
from fastai_tar.plan import (KINDS, NothingToRegularize, Request, describe_candidates, fingerprint, module_layout,
                             module_reads, settle, unwrap_model, watched_modules)

from conftest import VOCAB, tiny_config, tiny_lm


def request(alpha=2., beta=1., modules=None, ar_modules=None, all_layers=False, seq_dim=None, feature_dim=None,
            contract=None):
    return Request(alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim, contract)


def reads_of(model, **kw): return module_reads(model, request(**kw), list(KINDS))


def places(reads): return [(r.kind, r.name, r.coef) for r in reads]


def classifier(): return get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))


# --- default places ----------------------------------------------------------------------------------------------
def test_language_model_defaults_to_merity_places():
    "TAR on the AWD_LSTM encoder's raw output, AR on the decoder's output dropout; fastai's modules are batch-first."
    model = tiny_lm()
    ar, tar = reads_of(model)
    assert places([ar, tar]) == [('ar', '1.output_dp', 2.), ('tar', '0', 1.)]
    assert ar.module is model[1].output_dp and tar.module is model[0]
    assert ar.source == tar.source == 'found' and "fastai's AWD_LSTM" in tar.why
    assert ar.seq_dim is None  # AR needs no time axis
    assert (tar.seq_dim, tar.steps, tar.axes_given) == (1, False, False) and 'batch-first' in tar.axis_why
    plan = settle(model, request(), None)
    assert places(plan.reads) == places([ar, tar]) and plan.holds_for(model, request())
    assert [r.module for r in plan.reads] == [model[1].output_dp, model[0]]


def test_all_layers_hooks_every_layer():
    model = tiny_lm()
    got = reads_of(model, all_layers=True)
    assert places(got) == [('ar', '0.hidden_dps.0', 2.), ('ar', '1.output_dp', 2.), ('tar', '0.rnns.0', 1.),
                           ('tar', '0.rnns.1', 1.)]
    assert [r.module for r in got] == [model[0].hidden_dps[0], model[1].output_dp, *model[0].rnns]
    assert [r.seq_dim for r in got] == [None, None, 1, 1]  # the LSTM inside each WeightDropout is batch-first
    model = nn.Sequential(nn.LSTM(3, 4), nn.GRU(4, 5, batch_first=True))
    got = reads_of(model, all_layers=True)
    assert places(got) == [('ar', '0', 2.), ('ar', '1', 2.), ('tar', '0', 1.), ('tar', '1', 1.)]
    assert [r.seq_dim for r in got if r.kind == 'tar'] == [0, 1] and 'every RNN module' in got[0].why


def test_classifier_uses_sentence_encoder():
    model = classifier()
    got = reads_of(model)
    assert places(got) == [('ar', '0', 2.), ('tar', '0', 1.)] and all(r.module is model[0] for r in got)
    assert 'padding mask' in got[0].why
    with pytest.raises(ValueError, match='all_layers'): reads_of(model, all_layers=True)
    # a classifier's output is fastai's contract, but the SentenceEncoder (with its mask) is read
    raw = torch.zeros(2, 5, 8)
    contract = Contract(torch.zeros(2, 2), [raw], [raw], per_layer=False, producers=[None])
    assert places(settle(model, request(), contract).reads) == places(got)


@pytest.mark.parametrize('rnn, seq_dim', [(nn.LSTM(4, 5), 0), (nn.GRU(4, 5, batch_first=True), 1), (nn.RNN(4, 5), 0)],
                         ids=['LSTM', 'GRU batch_first', 'RNN'])
def test_generic_model_last_rnn(rnn, seq_dim):
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4), rnn)
    got = reads_of(model)
    assert places(got) == [('ar', '2', 2.), ('tar', '2', 1.)] and all(r.module is rnn for r in got)
    assert got[1].seq_dim == seq_dim and got[1].axis_why == f'batch_first={seq_dim == 1}'
    assert 'the last RNN module' in got[1].why


def test_generic_model_with_cells_reads_the_last_cell_one_step_per_call():
    model = nn.Sequential(nn.LSTMCell(3, 4), nn.GRUCell(4, 4))
    got = reads_of(model)
    assert places(got) == [('ar', '1', 2.), ('tar', '1', 1.)] and 'RNN cell' in got[1].why
    assert (got[1].seq_dim, got[1].steps) == (1, True)


def test_nothing_to_regularize_says_where_it_looked():
    with pytest.raises(NothingToRegularize, match=r"found nothing to regularize in Linear.*modules='encoder.rnn'"):
        reads_of(nn.Linear(2, 2))
    assert issubclass(NothingToRegularize, ValueError)
    assert watched_modules(nn.Linear(2, 2), request()) == []  # the output may still be fastai's contract


# --- names and coefficients --------------------------------------------------------------------------------------
def test_names_modules_and_coefficients():
    model = tiny_lm()
    got = reads_of(model, modules={'0.rnns.0': 0.5, model[0].rnns[1]: 3.})
    assert places(got) == [('ar', '0.rnns.0', 2.), ('ar', '0.rnns.1', 2.), ('tar', '0.rnns.0', .5),
                           ('tar', '0.rnns.1', 3.)]
    assert all(r.source == 'named' and r.why == 'named by you' for r in got)
    got = reads_of(model, alpha=[1., 4.], beta=[.5, 3.], modules=['0.rnns.0', '0.rnns.1'])
    assert [r.coef for r in got] == [1., 4., .5, 3.]
    got = reads_of(model, modules='0', ar_modules=['1.output_dp'])
    assert places(got) == [('ar', '1.output_dp', 2.), ('tar', '0', 1.)]
    got = reads_of(model, ar_modules={'1.output_dp': 3.})  # TAR found, AR named with its own coefficient
    assert places(got) == [('ar', '1.output_dp', 3.), ('tar', '0', 1.)]
    assert [r.source for r in got] == ['named', 'found']
    assert watched_modules(model, request(modules='0', ar_modules='1.output_dp')) == [model[1].output_dp, model[0]]


def test_the_users_axes_win_for_every_named_module():
    model = nn.Sequential(nn.LSTM(3, 4), nn.GRU(4, 4, batch_first=True))
    got = reads_of(model, modules=['0', '1'], seq_dim=-2, feature_dim=-1)
    assert [(r.kind, r.seq_dim, r.axes_given) for r in got] == [('ar', None, False)] * 2 + [('tar', -2, True)] * 2
    assert got[2].axis_why == 'seq_dim=-2, yours' and all(r.feature_dim == -1 for r in got)
    assert 'time axis -2 (seq_dim=-2, yours)' in repr(got[2])
    got = reads_of(model, modules='1', seq_dim=2, feature_dim=1)
    assert [(r.seq_dim, r.feature_dim) for r in got] == [(None, 1), (2, 1)] and 'feature axis 1' in repr(got[1])


def test_a_module_of_unknown_layout_that_returned_a_packed_sequence_is_read_batch_first():
    model = nn.Sequential(nn.LSTM(3, 4), nn.Identity())  # the Identity passes the LSTM's PackedSequence on
    (tar,) = module_reads(model, request(alpha=0., modules='1'), ['tar'], packed={id(model[1])})
    assert tar.seq_dim == 1 and tar.axis_why == 'a PackedSequence, unpacked batch-first'
    with pytest.raises(ValueError, match='Pass seq_dim='): module_reads(model, request(alpha=0., modules='1'), ['tar'])
    # a sequence-first nn.LSTM that returned a PackedSequence is read as the capture unpacks it: batch-first
    (tar,) = module_reads(model, request(alpha=0., modules='0'), ['tar'], packed={id(model[0])})
    assert tar.seq_dim == 1 and tar.axis_why == 'a PackedSequence, unpacked batch-first'


class OwnForward(nn.LSTM):
    "An LSTM subclass with a forward of its own: its layout cannot be told from the class."
    def forward(self, x, hx=None): return super().forward(x.transpose(0, 1), hx)


def test_a_module_of_unknown_layout_asks_for_seq_dim_unless_tar_is_off():
    model = nn.Sequential(nn.Linear(3, 4), OwnForward(4, 4))
    with pytest.raises(ValueError, match=r"time axis of 1 \(OwnForward\).*has a forward of its own.*Pass seq_dim="):
        reads_of(model)
    with pytest.raises(ValueError, match=r"time axis of 0 \(Linear\).*not a module whose layout.*Pass seq_dim="):
        reads_of(model, modules='0')
    assert places(reads_of(model, beta=0., modules='0')) == [('ar', '0', 2.)]  # TAR off: nothing to ask for
    assert reads_of(model, seq_dim=0)[1].seq_dim == 0


def test_off_terms_are_planned_and_said_off():
    ar, tar = reads_of(tiny_lm(), alpha=0.)
    assert ar.coef == 0 and '(off in training)' in repr(ar) and '(off in training)' not in repr(tar)


# --- wrapped and compiled models ---------------------------------------------------------------------------------
def test_data_parallel_and_ddp_models_are_searched_inside():
    model = tiny_lm()
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    assert places(reads_of(wrapped)) == places(reads_of(model))
    assert reads_of(wrapped, modules='module.0')[1].module is model[0]
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model and '0' not in dict(ddp.named_modules())
        assert places(reads_of(ddp)) == places(reads_of(model))
        for name in ('0.rnns.1', 'module.0.rnns.1'):
            assert reads_of(ddp, modules=name)[1].module is model[0].rnns[1]
        plan = settle(ddp, request(), None)
        # the plan is kept for the learner's model object
        assert plan.holds_for(ddp, request()) and not plan.holds_for(model, request())
    finally:
        dist.destroy_process_group()


def test_compiled_models_are_searched_inside():
    "torch.compile's OptimizedModule names every module '_orig_mod.<name>': found by either name, or by structure."
    model = tiny_lm()
    compiled = torch.compile(model, backend='eager')  # compiles lazily: nothing is traced here
    assert unwrap_model(compiled) is model
    assert '_orig_mod.0' in dict(compiled.named_modules())
    for name in ('0', '_orig_mod.0'):
        ts = reads_of(compiled, modules=name)
        assert places(ts) == [('ar', '0', 2.), ('tar', '0', 1.)] and all(t.module is model[0] for t in ts)
    assert places(reads_of(compiled)) == places(reads_of(model))
    assert reads_of(compiled)[0].module is model[1].output_dp
    # nn.DataParallel around a compiled model: both prefixes
    both = nn.DataParallel(compiled)
    assert unwrap_model(both) is model
    assert reads_of(both, modules='module._orig_mod.0.rnns.1')[1].module is model[0].rnns[1]


# --- bad specs -----------------------------------------------------------------------------------------------------
def test_bad_specs_raise_clear_errors():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"^modules: no module named 'encoder'.*named_modules"):
        reads_of(model, modules='encoder')
    with pytest.raises(ValueError, match=r"^ar_modules: no module named 'drop'"):
        reads_of(model, ar_modules='drop')
    with pytest.raises(ValueError, match='not part of'): reads_of(model, modules=nn.LSTM(2, 2))
    with pytest.raises(ValueError,
                       match=r"beta has 1 coefficients but TARCallback reads 2 module\(s\) named in modules"):
        reads_of(model, beta=[1.], modules=['0.rnns.0', '0.rnns.1'])
    with pytest.raises(ValueError, match=r"alpha has 3 coefficients but TARCallback reads 2 layer"):
        reads_of(model, alpha=[1., 2., 3.], all_layers=True)
    with pytest.raises(ValueError, match=r"^modules names the module '0' twice \('0' and AWD_LSTM\)"):
        reads_of(model, modules=['0', model[0]])
    with pytest.raises(NothingToRegularize, match=r"modules="): reads_of(nn.Linear(2, 2))


# --- a contract's reads ------------------------------------------------------------------------------------------
def contract_of(n_layers=1, producer=None, bs=2, sl=5, per_layer=None):
    raws = [torch.randn(bs, sl, 4) for _ in range(n_layers)]
    per_layer = n_layers > 1 if per_layer is None else per_layer
    return Contract(torch.randn(bs, sl, VOCAB), raws, [r * 2 for r in raws], per_layer, [producer] * n_layers)


def test_a_contract_is_read_from_the_output_in_the_producers_layout():
    model = nn.Sequential(nn.LSTM(4, 4))
    ar, tar = settle(model, request(), contract_of(producer=model[0])).reads
    assert places([ar, tar]) == [('ar', 'dropped', 2.), ('tar', 'raw', 1.)]
    assert ar.module is None and tar.module is None and (ar.layer, tar.layer) == (0, 0)
    assert tar.seq_dim == 0 and tar.axis_why == 'batch_first=False'  # the sequence-first LSTM that returned raw
    assert ar.source == 'contract' and 'output[1]' in repr(tar)
    (tar,) = [r for r in settle(nn.Linear(2, 2), request(), contract_of()).reads if r.kind == 'tar']
    assert tar.seq_dim == 1 and "batch-first" in tar.axis_why  # no recurrent producer: fastai's contract layout


def test_a_contract_with_all_layers_reads_each_layer_or_is_refused():
    reads = settle(nn.Linear(2, 2), request(all_layers=True, alpha=[1., 0.]), contract_of(2)).reads
    assert places(reads) == [('ar', 'dropped.0', 1.), ('ar', 'dropped.1', 0.),
                             ('tar', 'raw.0', 1.), ('tar', 'raw.1', 1.)]
    assert [r.layer for r in reads] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"all_layers=True reads each layer.*single tensors"):
        settle(nn.Linear(2, 2), request(all_layers=True), contract_of(1))
    model = tiny_lm()  # single tensors from an AWD_LSTM: its layers are hooked
    assert places(settle(model, request(all_layers=True), contract_of(1)).reads) == places(
        reads_of(model, all_layers=True))


# --- layouts -------------------------------------------------------------------------------------------------------
class SameForward(nn.GRU):
    "A subclass that keeps nn.GRU's forward."


@pytest.mark.parametrize('module, expected', [
    (nn.LSTM(3, 4), (0, False)), (nn.LSTM(3, 4, batch_first=True), (1, False)), (nn.GRU(3, 4), (0, False)),
    (nn.GRU(3, 4, batch_first=True), (1, False)), (nn.RNN(3, 4), (0, False)),
    (nn.RNN(3, 4, batch_first=True), (1, False)),
    (SameForward(3, 4, batch_first=True), (1, False)),
    (nn.LSTMCell(3, 4), (1, True)), (nn.GRUCell(3, 4), (1, True)), (nn.RNNCell(3, 4), (1, True)),
    (OwnForward(3, 4), None), (OwnForward(3, 4, batch_first=True), None), (nn.Linear(3, 4), None),
    (nn.Dropout(), None),
], ids=lambda x: type(x).__name__ + ('_bf' if getattr(x, 'batch_first', False) else '') if isinstance(x, nn.Module)
   else None)
def test_module_layout_of_stock_modules_and_subclasses(module, expected):
    got = module_layout(module)
    assert (got if got is None else got[:2]) == expected
    if got is not None and not expected[1]: assert got[2] == f'batch_first={module.batch_first}'


def test_module_layout_of_fastai_modules():
    enc = tiny_lm()[0]
    assert module_layout(enc) == (1, False, "fastai's text modules are batch-first")
    assert module_layout(classifier()[0])[:2] == (1, False)
    assert module_layout(RNNDropout(0.1))[:2] == (1, False)
    assert isinstance(enc.rnns[0], WeightDropout)
    assert module_layout(enc.rnns[0]) == (1, False, 'batch_first=True')  # the LSTM it wraps decides
    assert module_layout(WeightDropout(nn.LSTM(3, 4), 0.1))[:2] == (0, False)

    class OwnAWD(AWD_LSTM):
        def forward(self, inp, from_embeds=False): return super().forward(inp, from_embeds)
    assert module_layout(OwnAWD(VOCAB, 8, 12, 2)) is None


# --- when a plan holds, and what is shown before it is settled -----------------------------------------------------
def test_fingerprint_changes_when_a_module_is_added_removed_or_swapped():
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4))
    fp = fingerprint(model)
    assert fingerprint(model) == fp and fingerprint(copy.deepcopy(model)) != fp
    model[1].weight_hh_l0.data.zero_()  # weights are not modules
    assert fingerprint(model) == fp
    plan, req = settle(model, request(), None), request()
    model.append(nn.GRU(4, 4))
    assert fingerprint(model) != fp and not plan.holds_for(model, req)
    del model[2]
    assert fingerprint(model) == fp and plan.holds_for(model, req)
    assert not plan.holds_for(model, request(beta=2.))  # other arguments: settled again
    model[1] = nn.LSTM(4, 4)
    assert fingerprint(model) != fp and not plan.holds_for(model, req)


def test_describe_candidates_names_both_candidates_where_the_contract_may_apply():
    model = nn.Sequential(nn.Embedding(VOCAB, 4), nn.LSTM(4, 4, batch_first=True))
    text = describe_candidates(model, request())
    assert text.splitlines()[0] == "if the model's forward returns fastai's (logits, raw, dropped):"
    assert "  AR dropped (output[2]): alpha=2.0" in text and "  TAR raw (output[1]): beta=1.0" in text
    assert "otherwise, found from the model's structure:\n  AR 1 (LSTM)" in text
    assert 'with per-layer lists' in describe_candidates(model, request(all_layers=True))
    assert describe_candidates(model, request(contract=False)) == '\n'.join(map(repr, reads_of(model)))
    assert describe_candidates(model, request(modules='1')) == '\n'.join(map(repr, reads_of(model, modules='1')))
    text = describe_candidates(classifier(), request())  # a classifier reads its SentenceEncoder
    assert 'raw' not in text and text.startswith('AR 0 (SentenceEncoder)')
    text = describe_candidates(nn.Linear(2, 2), request())
    assert 'TAR raw (output[1])' in text and 'nothing: TARCallback found nothing to regularize' in text
