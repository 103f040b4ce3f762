"""Forward hooks that only keep the activations AR and TAR read; the penalty is computed later, outside the forward.

Keeping the hook body to a list append (no arithmetic, no lock) is what lets it run inside a gradient-checkpointed
region (nothing is saved for backward there), inside a `torch.compile`d graph (dynamo traces an append without a
graph break), and in `nn.DataParallel`'s replica threads (`list.append` is atomic). Each forward of the whole model
files what its hooks saw under its output tensors, held weakly: the callback then reads the forward whose output
became `learn.pred`, whatever other forwards callbacks ran in the same batch, and a forward nobody reads frees its
activations with its output.
"""
import sys
import weakref

import torch
from fastai.learner import Learner
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from .functional import ar_sum_count, tar_sum_count
from .targets import read_output

__all__ = ['Call', 'ForwardCapture', 'call_sums', 'not_called_message']

# Frames of fastai's training loop: `_with_events` runs every fit, epoch and batch (also of a Learner subclass
# that writes its own `one_batch`), `_do_one_batch` calls the model.
_LOOP = {Learner._with_events.__code__, Learner.one_batch.__code__, Learner._do_one_batch.__code__}


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
        self.last = []  # weak references to the output tensors of the last root forward that ended
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
        self.handles, self.current, self.last = [], None, []
        self.by_output = WeakTensorKeyDictionary()

    def _root(self, model, args, *output):
        if not output:  # the pre-hook: a root forward starts
            # Outside fastai's loop the hooks are left over from a fit that an exception or a Ctrl-C ended
            # between before_batch and after_pred: no event of ours followed (fastai's `_with_events` has no
            # `finally`, torch's always_call hooks run for `Exception` only). This forward is no training step.
            if not _in_fastai_loop(): return self.stop()
            self.current = []
            return
        calls, self.current = self.current, None
        # torch passes output None when the forward raised: the exception leaves fastai's loop, and no event of
        # ours may follow to remove the hooks
        if output[0] is None: return self.stop()
        if calls is None: return
        outs = _tensors(output[0])
        self.last = [weakref.ref(t) for t in outs]
        for t in outs: self.by_output[t] = calls

    def calls_for(self, pred):
        "The calls of the forward that returned `pred` (or a tensor in it); [] if no hooked forward did."
        for t in _tensors(pred):
            if t in self.by_output: return self.by_output[t]
        # A callback made `pred` from the output (a view, a reshape): the last forward's, while its output lives
        for r in self.last:
            t = r()
            if t is not None and t in self.by_output: return self.by_output[t]
        return []


_SUM_COUNT = {'ar': ar_sum_count, 'tar': tar_sum_count}


def call_sums(
    calls: list,  # `ForwardCapture.calls_for(learn.pred)`
    groups: list,  # the targets of each hooked module, in the order given to `ForwardCapture.start`
    seq_dim: int | None,  # `TARCallback(seq_dim=...)`: the time axis of TAR's modules
    needs_grad: bool,  # a training forward with gradient on: a call without gradient could not train its module
) -> dict:
    "(sum, count) of each target over `calls`"
    stats = {}
    for call in calls:
        targets = groups[call.group]
        if needs_grad and not call.grad_enabled:
            raise RuntimeError(
                f"TARCallback: {targets[0].name or '<model>'} ({type(targets[0].module).__name__}) ran without "
                "gradient inside the training forward, so the penalty could not train it. "
                "torch.utils.checkpoint(..., use_reentrant=True) does this: use use_reentrant=False")
        # seq_dim is the user's word on the time axis of TAR's modules; AR has no time axis to check
        sd = seq_dim if any(t.kind == 'tar' for t in targets) else None
        h, mask, sd = read_output(call.module, call.output, sd)
        for t in targets:
            s, n = _SUM_COUNT[t.kind](h, mask, sd)
            if t in stats:  # a module called several times per forward: pool its calls into one mean
                s0, n0 = stats[t]
                s, n = s0 + s.to(s0.device), n0 + (n.to(s0.device) if isinstance(n, torch.Tensor) else n)
            stats[t] = (s, n)
    return stats


def not_called_message(
    missing: list,  # names of the hooked modules the forward did not call
    model: nn.Module,  # the learner's model
) -> str:
    head = f"TARCallback hooked {missing} but the forward that made learn.pred did not call them"
    if any(hasattr(m, '_orig_mod') for m in model.modules()):
        # dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards)
        return (f"{head}: learn.model is compiled (torch.compile) and its compiled code was traced before the "
                "callback added its hooks, so it does not call them. Call torch.compiler.reset() before this fit, "
                "or attach TARCallback before the compiled model's first forward")
    return f"{head}: pass modules= / ar_modules= naming modules that run in forward"


def _in_fastai_loop() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code in _LOOP: return True
        f = f.f_back
    return False


def _tensors(x):
    if isinstance(x, torch.Tensor): return [x]
    if isinstance(x, (tuple, list)): return [t for o in x for t in _tensors(o)]
    if isinstance(x, dict): return [t for o in x.values() for t in _tensors(o)]
    return []
