"Where AR and TAR read: module discovery and output reading (`fastai_tar.targets`)."
import pytest
import torch
from torch import nn
from fastai.text.all import AWD_LSTM, get_text_classifier

from fastai_tar.targets import find_targets, read_output, unwrap_model
from conftest import VOCAB, tiny_config, tiny_lm


def places(targets): return [(t.kind, t.name, t.coef) for t in targets]


def test_language_model_defaults_to_merity_places():
    "TAR on the AWD_LSTM encoder's raw output, AR on the decoder's output dropout."
    model = tiny_lm()
    assert places(find_targets(model, 2., 1.)) == [('ar', '1.output_dp', 2.), ('tar', '0', 1.)]
    ts = find_targets(model, 2., 1.)
    assert ts[0].module is model[1].output_dp and ts[1].module is model[0]


def test_all_layers_hooks_every_rnn():
    model = tiny_lm()
    got = places(find_targets(model, 2., 1., all_layers=True))
    assert got == [('ar', '0.hidden_dps.0', 2.), ('ar', '1.output_dp', 2.),
                   ('tar', '0.rnns.0', 1.), ('tar', '0.rnns.1', 1.)]


def test_classifier_uses_sentence_encoder():
    model = get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))
    assert places(find_targets(model, 2., 1.)) == [('ar', '0', 2.), ('tar', '0', 1.)]
    with pytest.raises(ValueError, match='all_layers'): find_targets(model, 2., 1., all_layers=True)


@pytest.mark.parametrize('rnn', [nn.LSTM(4, 5), nn.GRU(4, 5, batch_first=True), nn.RNN(4, 5)])
def test_generic_model_last_rnn(rnn):
    model = nn.Sequential(nn.Linear(3, 4), nn.LSTM(4, 4), rnn)
    assert places(find_targets(model, 2., 1.)) == [('ar', '2', 2.), ('tar', '2', 1.)]


def test_names_modules_and_coefficients():
    model = tiny_lm()
    got = find_targets(model, 2., 1., modules={'0.rnns.0': 0.5, model[0].rnns[1]: 3.})
    assert places(got) == [('ar', '0.rnns.0', 2.), ('ar', '0.rnns.1', 2.),
                           ('tar', '0.rnns.0', .5), ('tar', '0.rnns.1', 3.)]
    got = find_targets(model, [1., 4.], [.5, 3.], modules=['0.rnns.0', '0.rnns.1'])
    assert [t.coef for t in got] == [1., 4., .5, 3.]
    got = find_targets(model, 2., 1., modules='0', ar_modules=['1.output_dp'])
    assert places(got) == [('ar', '1.output_dp', 2.), ('tar', '0', 1.)]


def test_wrapped_models_are_searched_inside():
    model = tiny_lm()
    wrapped = nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    assert places(find_targets(wrapped, 2., 1.)) == places(find_targets(model, 2., 1.))
    assert find_targets(wrapped, 2., 1., modules='module.0')[1].module is model[0]


def test_compiled_models_are_searched_inside():
    "torch.compile's OptimizedModule names every module '_orig_mod.<name>': found by either name, or by structure."
    model = tiny_lm()
    compiled = torch.compile(model, backend='eager')  # compiles lazily: nothing is traced here
    assert unwrap_model(compiled) is model
    assert '_orig_mod.0' in dict(compiled.named_modules())
    for name in ('0', '_orig_mod.0'):
        ts = find_targets(compiled, 2., 1., modules=name)
        assert places(ts) == [('ar', '0', 2.), ('tar', '0', 1.)] and all(t.module is model[0] for t in ts)
    assert places(find_targets(compiled, 2., 1.)) == places(find_targets(model, 2., 1.))
    assert find_targets(compiled, 2., 1.)[0].module is model[1].output_dp
    # nn.DataParallel around a compiled model: both prefixes
    both = nn.DataParallel(compiled)
    assert unwrap_model(both) is model
    assert find_targets(both, 2., 1., modules='module._orig_mod.0.rnns.1')[1].module is model[0].rnns[1]


def test_bad_specs_raise_clear_errors():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"^modules: no module named 'encoder'.*named_modules"):
        find_targets(model, 2., 1., modules='encoder')
    with pytest.raises(ValueError, match='not part of'): find_targets(model, 2., 1., modules=nn.LSTM(2, 2))
    with pytest.raises(TypeError, match='modules'): find_targets(model, 2., 1., modules=3)
    with pytest.raises(ValueError, match=r'beta has 1 coefficients but modules names 2'):
        find_targets(model, 2., [1.], modules=['0.rnns.0', '0.rnns.1'])
    with pytest.raises(ValueError, match=r'modules=\['):
        find_targets(nn.Linear(2, 2), 2., 1.)


def test_read_output_forms():
    h = torch.randn(3, 5, 4)
    lstm_sf, lstm_bf = nn.LSTM(4, 4), nn.LSTM(4, 4, batch_first=True)
    assert read_output(lstm_sf, (h, None))[2] == 0
    assert read_output(lstm_bf, (h, None))[2] == 1
    assert read_output(lstm_bf, (h, None), -2)[2] == 1  # the user may say so too
    assert read_output(lstm_sf, (h[0], None))[2] == 0  # unbatched (L, H)
    out, mask, sd = read_output(nn.Identity(), h)
    assert out is h and mask is None and sd == 1  # a custom module: batch-first unless seq_dim says otherwise
    assert read_output(nn.Identity(), h, 0)[2] == 0

    lengths = torch.tensor([5, 2, 1])
    packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True)
    out, mask, sd = read_output(lstm_bf, (packed, None))
    assert sd == 1 and out.shape == (3, 5, 4)
    assert mask.tolist() == [[True] * 5, [True, True] + [False] * 3, [True] + [False] * 4]

    enc = get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))[0]
    pad = torch.zeros(3, 5, dtype=torch.bool); pad[0, :2] = True
    out, mask, sd = read_output(enc, (h, pad))
    assert torch.equal(mask, ~pad) and sd == 1

    for bad in ({'h': h}, torch.ones(3, 5, dtype=torch.long), torch.randn(5)):
        with pytest.raises(TypeError, match=r'cannot read the output of'): read_output(nn.Identity(), bad, 1)
