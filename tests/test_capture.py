"The hook machinery alone (`fastai_tar.capture`): which forward's calls are read, and what stale hooks do."
import copy
import gc
import pickle
import weakref

import torch
from torch import nn

from fastai_tar import capture
from fastai_tar.capture import ForwardCapture


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_calls_are_filed_under_the_output_of_their_forward(monkeypatch):
    "Two forwards: each output finds its own calls; a forward whose output is dropped frees what it captured."
    monkeypatch.setattr(capture, '_in_fastai_loop', lambda: True)  # as inside fastai's training loop
    m, cap = model(), ForwardCapture()
    cap.start(m, [m[1]])
    x1, x2 = torch.randn(2, 3), torch.randn(5, 3)
    out1, out2 = m(x1), m(x2)
    (c1,), (c2,) = cap.calls_for(out1), cap.calls_for((out2, 'other'))  # a tensor inside the output also finds it
    torch.testing.assert_close(c1.output, torch.tanh(m[0](x1)))
    torch.testing.assert_close(c2.output, torch.tanh(m[0](x2)))
    assert c1.group == 0 and c1.module is m[1] and c1.grad_enabled
    ref = weakref.ref(c2.output)
    del out2, c2
    gc.collect()
    assert ref() is None  # nothing of ours keeps the activation of a forward nobody reads
    assert cap.calls_for(torch.zeros(1)) == []
    cap.stop()
    assert not m[1]._forward_hooks and not m._forward_hooks and not m._forward_pre_hooks


def test_a_forward_outside_fastais_batch_removes_the_hooks_and_records_nothing():
    m, cap = model(), ForwardCapture()
    cap.start(m, [m[1]])
    out = m(torch.randn(2, 3))
    assert cap.calls_for(out) == [] and cap.handles == []
    assert not m[1]._forward_hooks and not m._forward_hooks and not m._forward_pre_hooks


def test_copies_and_pickles_of_a_hooked_model_carry_inert_taps(monkeypatch):
    monkeypatch.setattr(capture, '_in_fastai_loop', lambda: True)
    m, cap = model(), ForwardCapture()
    cap.start(m, [m[1]])
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        taps = list(twin[1]._forward_hooks.values()) + list(twin._forward_hooks.values())
        assert taps and all(t.capture is None for t in taps)
        out = twin(torch.randn(2, 3))
        assert cap.calls_for(out) == [] and cap.current is None  # the original's capture saw nothing of it
    cap.stop()
