"""What a module's class makes certain (`fastai_tar.module_facts`): its role, the layout of its output, the item of
its output that is the activation, and the state that chains its calls; fastai's classes known without importing
fastai; a subclass with a forward of its own is certain of nothing."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from fastai.text.all import AWD_LSTM, get_text_classifier
from fastai.text.models.awdlstm import RNNDropout, WeightDropout

from fastai_tar.module_facts import activation_item, is_dropout, is_recurrent, layout, state_tensors

from conftest import VOCAB, tiny_config, tiny_lm


class SameForward(nn.GRU):
    "A subclass that keeps nn.GRU's forward."


class OwnForward(nn.LSTM):
    "An LSTM subclass with a forward of its own: its layout cannot be told from the class."
    def forward(self, x, hx=None): return super().forward(x, hx)


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
def test_layout_of_torch_modules_and_subclasses(module, expected):
    got = layout(module)
    assert (got if got is None else got[:2]) == expected
    if got is not None and not expected[1]: assert got[2] == f'batch_first={module.batch_first}'


def test_layout_of_fastai_modules():
    enc = tiny_lm()[0]
    assert layout(enc) == (1, False, "fastai's text modules are batch-first")
    assert layout(get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))[0])[:2] == (1, False)
    assert layout(RNNDropout(0.1))[:2] == (1, False)
    assert isinstance(enc.rnns[0], WeightDropout)
    assert layout(enc.rnns[0]) == (1, False, 'batch_first=True')  # the LSTM it wraps decides
    assert layout(WeightDropout(nn.LSTM(3, 4), 0.1))[:2] == (0, False)

    class OwnAWD(AWD_LSTM):
        def forward(self, inp, from_embeds=False): return super().forward(inp, from_embeds)
    assert layout(OwnAWD(VOCAB, 8, 12, 2)) is None


def test_roles_and_activation_items():
    lm, clas = tiny_lm(), get_text_classifier(AWD_LSTM, VOCAB, 2, config=tiny_config(clas=True))
    assert [is_recurrent(m) for m in (nn.LSTM(2, 2), nn.GRUCell(2, 2), lm[0], clas[0], OwnForward(2, 2))] == [True] * 5
    assert not any(is_recurrent(m) for m in (nn.Linear(2, 2), lm[0].rnns[0], nn.Dropout()))
    assert [is_dropout(m) for m in (nn.Dropout(), nn.AlphaDropout(), nn.Dropout1d(), RNNDropout())] == [True] * 4
    assert not is_dropout(nn.Linear(2, 2))
    assert activation_item(nn.LSTM(2, 2)) == (0, False) and activation_item(nn.LSTMCell(2, 2)) == (0, False)
    assert activation_item(nn.GRUCell(2, 2)) == (None, False) and activation_item(lm[0]) == (None, False)
    assert activation_item(lm[0].rnns[0]) == (0, False)  # WeightDropout: the LSTM it wraps
    assert activation_item(clas[0]) == (0, True)  # (outs, padding)
    assert activation_item(nn.Dropout()) == (None, False)
    assert activation_item(OwnForward(2, 2)) is None and activation_item(nn.Linear(2, 2)) is None


def test_state_chains_a_decoders_calls_by_identity():
    torch.manual_seed(0)
    gru, cell, lstm = nn.GRU(3, 4, batch_first=True), nn.LSTMCell(3, 4), nn.LSTM(3, 4)
    x = torch.randn(2, 1, 3)
    out, h = gru(x)
    assert state_tensors(gru, (x,), {}, (out, h)) == (None, h)
    assert state_tensors(gru, (x,), {'hx': h}, gru(x, hx=h))[0] is h
    hc = cell(x[:, 0])
    assert state_tensors(cell, (x[:, 0], hc), {}, cell(x[:, 0], hc))[0] is hc[0]
    out, (h, c) = lstm(x)
    assert state_tensors(lstm, (x, (h, c)), {}, lstm(x, (h, c)))[0] is h
    assert state_tensors(OwnForward(3, 4), (x, (h, c)), {}, (out, (h, c))) is None  # its own forward: unknown
    assert state_tensors(nn.Linear(3, 4), (x,), {}, x) is None


def test_fastai_is_known_without_being_imported():
    "In a process that has not imported fastai, a torch model is read, and fastai stays unimported."
    code = textwrap.dedent("""
        import sys, torch
        from fastai_tar.module_facts import is_recurrent, layout
        assert is_recurrent(torch.nn.LSTM(2, 2)) and layout(torch.nn.Linear(2, 2)) is None
        print(sorted(m for m in sys.modules if m.split('.')[0] == 'fastai'))
    """)
    root = Path(__file__).parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == '[]'
