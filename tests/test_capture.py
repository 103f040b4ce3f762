"""The hooks alone (`fastai_tar.capture`): which forwards count (`accept`), what a forward that raised does
(`on_raise`), what each watched module's call records, copies and pickles of a hooked model (inert taps that remove
themselves), activations freed by `forget`, watched modules kept or swapped by `watch`, and `nn.DataParallel`'s
replicas recorded as calls of the module they copy."""
import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

from fastai_tar.capture import Capture

from models import cpu_replicas


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def no_hooks(m): return not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())


def test_each_forward_that_counts_records_the_calls_of_the_watched_modules():
    m, cap = model(), Capture()
    cap.open(m)
    cap.watch([m[1]])
    x = torch.randn(2, 3)
    out = m(x)
    fwd = cap.forward
    assert fwd.output is out and fwd.args[0] is x and fwd.training and cap.count == 1
    (call,) = fwd.calls
    module, args, kwargs, output, version, grad, called = call
    assert module is m[1] and called is m[1] and args[0].shape == (2, 4) and kwargs == {} and grad
    torch.testing.assert_close(output, torch.tanh(m[0](x)))
    assert version == output._version and fwd.of(m[1]) == [call] and fwd.of(m[0]) == []
    with torch.no_grad(): m(torch.randn(5, 3))
    assert not cap.forward.training and not cap.forward.calls[0][5] and cap.count == 1  # counts training forwards
    m.eval()
    m(x)
    assert not cap.forward.training  # a forward in eval() does not train either
    cap.close()
    assert no_hooks(m) and not cap.is_open and cap.forward is None


def test_accept_decides_which_forwards_count():
    m, seen = model(), []
    cap = Capture(accept=lambda model: seen.append(model) or len(seen) % 2 == 1)
    cap.open(m)
    cap.watch([m[1]])
    first = m(torch.randn(2, 3))
    m(torch.randn(4, 3))  # not accepted: the last forward that counted stays
    assert seen == [m, m] and cap.forward.output is first and cap.count == 1
    cap.close()


class Raising(nn.Module):
    def forward(self, x): raise KeyError('boom')


def test_a_forward_that_raised_calls_on_raise_which_may_close_the_hooks_from_inside():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Raising())
    raised = []
    cap = Capture(on_raise=lambda c: raised.append(c) or c.close(running=True))
    cap.open(m)
    cap.watch([m[1], m])  # the model itself watched too: its hook dict is the one torch is iterating over
    with pytest.raises(KeyError, match='boom'): m(torch.randn(2, 3))
    assert raised == [cap] and not cap.is_open and cap.forward is None and no_hooks(m)
    m[2] = nn.Identity()
    m(torch.randn(2, 3))  # the model runs as if never hooked


def test_copies_and_pickles_of_a_hooked_model_carry_inert_taps_that_remove_themselves():
    m, cap = model(), Capture()
    cap.open(m)
    cap.watch([m[1]])
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        taps = [*twin[1]._forward_hooks.values(), *twin._forward_hooks.values(), *twin._forward_pre_hooks.values()]
        assert len(taps) == 3 and all(t.capture is None for t in taps)
        twin(torch.randn(2, 3))
        assert cap.forward is None and cap.count == 0  # the original's capture saw nothing of it
        assert no_hooks(twin)  # the taps went at the copy's first forward
    assert cap.is_open and len(m[1]._forward_hooks) == 1
    cap.close()


def test_forget_frees_the_activations_and_watch_keeps_or_swaps_the_hooks():
    m, cap = model(), Capture()
    cap.open(m)
    cap.watch([m[1]])
    m(torch.randn(2, 3))
    ref = weakref.ref(cap.forward.calls[0][3])
    cap.forget()
    gc.collect()
    assert ref() is None and cap.forward is None and cap.count == 0
    tap = list(m[1]._forward_hooks.values())
    cap.watch([m[1]])  # the same modules: the same hook, no new registration
    assert list(m[1]._forward_hooks.values()) == tap and cap.is_open and m._forward_hooks and m._forward_pre_hooks
    cap.watch([m[0]])  # other modules: the old hook goes
    assert not m[1]._forward_hooks and len(m[0]._forward_hooks) == 1
    cap.close()
    assert no_hooks(m)


def test_the_calls_of_a_module_run_twice_and_its_state_argument_are_recorded_in_order():
    torch.manual_seed(0)
    gru, cap = nn.GRU(3, 4, batch_first=True), Capture()
    wrapper = nn.Sequential(gru)
    cap.open(wrapper)
    cap.watch([gru])
    out1, h = gru(torch.randn(2, 1, 3))  # outside the root forward: no forward in progress, not recorded
    assert cap.forward is None

    class Steps(nn.Module):
        def __init__(self): super().__init__(); self.gru = gru
        def forward(self, x):
            o, h = self.gru(x[:, :1])
            return self.gru(x[:, 1:], hx=h)[0], h
    steps = Steps()
    cap.open(steps)
    cap.watch([gru])
    _, h = steps(torch.randn(2, 3, 3))
    first, second = cap.forward.calls
    assert first[3][1] is h and second[2]['hx'] is h  # the state out of the first call is the second's hx
    cap.close()


class Replicas(nn.Module):
    "What nn.DataParallel does on 2 devices, on the CPU: the module copied for each half of the batch"
    def __init__(self, inner): super().__init__(); self.inner = inner
    def forward(self, x): return torch.cat([c(h) for c, h in zip(cpu_replicas(self.inner, 2), x.chunk(2))])


def test_replicas_are_recorded_as_calls_of_the_module_they_copy():
    inner, cap = nn.Linear(3, 4), Capture()
    m = Replicas(inner)
    cap.open(m)
    cap.watch([inner])
    m(torch.randn(4, 3))
    calls = cap.forward.calls
    assert [c[0] for c in calls] == [inner, inner] and all(c[6] is not inner for c in calls)
    assert calls[0][6] is not calls[1][6]
    cap.close()
    assert no_hooks(m)
