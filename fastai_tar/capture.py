"""Forward hooks that only keep the activations AR and TAR read; the penalty is computed later, outside the forward.

Keeping the hook body to a list append (no arithmetic, no lock) is what lets it run inside a gradient-checkpointed
region (nothing is saved for backward there), inside a `torch.compile`d graph (dynamo traces an append without a
graph break), and in `nn.DataParallel`'s replica threads (`list.append` is atomic). Each forward of the whole model
files what its hooks saw under its output tensors, held weakly: the callback then reads the forward whose output
became `learn.pred`, whatever other forwards callbacks ran in the same batch, and a forward nobody reads frees its
activations with its output.
"""
import sys

import torch
from fastai.learner import Learner
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ['Call', 'ForwardCapture']

_ONE_BATCH = Learner.one_batch.__code__  # the frame of a fastai batch, whatever callbacks run in it


class Call:
    "One call of a hooked module: which group of targets it feeds, the module (or its replica), its raw output."
    __slots__ = ('group', 'module', 'output', 'grad_enabled')

    def __init__(self, group, module, output, grad_enabled):
        self.group, self.module, self.output, self.grad_enabled = group, module, output, grad_enabled


class _Tap:
    "The hook objects left in the modules' hook dicts: copying or pickling a model keeps an inert tap, not our state."
    def __init__(self, capture, group=None): self.capture, self.group = capture, group

    def __reduce__(self): return (_Tap, (None, self.group))

    def __call__(self, module, *args):
        cap = self.capture
        if cap is None: return
        if self.group is None: return cap._root(module, *args)
        calls = cap.current
        if calls is not None: calls.append(Call(self.group, module, args[-1], torch.is_grad_enabled()))


class ForwardCapture:
    "Hooks on `modules` (one per group of targets) for as long as `start` .. `stop`; the calls of each root forward."
    def __init__(self):
        self.current = None  # the calls of the root forward in progress; None outside one
        self.by_output = WeakTensorKeyDictionary()
        self.handles = []

    def start(self, model: nn.Module, modules: list):
        "Hook `modules[i]` as group i, and the root `model` to tell its forwards apart."
        self.stop()
        self.handles = [m.register_forward_hook(_Tap(self, i)) for i, m in enumerate(modules)]
        root = _Tap(self)
        self.handles += [model.register_forward_pre_hook(root), model.register_forward_hook(root, always_call=True)]

    def stop(self):
        "Remove every hook and forget every forward."
        for h in self.handles: h.remove()
        self.handles, self.current = [], None
        self.by_output = WeakTensorKeyDictionary()

    def _root(self, model, args, *output):
        if not output:  # the pre-hook: a root forward starts
            # Outside fastai's `one_batch` the hooks are left over from a fit that an exception or a Ctrl-C ended
            # between before_batch and after_pred: no event of ours followed (fastai's `_with_events` has no
            # `finally`, torch's always_call hooks run for `Exception` only). This forward is no training step.
            if not _in_one_batch(): return self.stop()
            self.current = []
            return
        calls, self.current = self.current, None
        # torch passes output None when the forward raised: the exception leaves fastai's loop, and no event of
        # ours may follow to remove the hooks
        if output[0] is None: return self.stop()
        if calls is None: return
        for t in _tensors(output[0]): self.by_output[t] = calls

    def calls_for(self, pred):
        "The calls of the forward that returned `pred` (or a tensor in it); [] if no hooked forward did."
        for t in _tensors(pred):
            if t in self.by_output: return self.by_output[t]
        return []


def _in_one_batch() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is _ONE_BATCH: return True
        f = f.f_back
    return False


def _tensors(x):
    if isinstance(x, torch.Tensor): return [x]
    if isinstance(x, (tuple, list)): return [t for o in x for t in _tensors(o)]
    if isinstance(x, dict): return [t for o in x.values() for t in _tensors(o)]
    return []
