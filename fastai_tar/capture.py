"""Forward hooks, and nothing else: what the watched modules received and returned in the forwards that count.

Two hooks on the model itself tell the forwards apart: at each forward, the owner's `accept` says whether it counts
(fastai's learner counts its own forwards, not those its callbacks run); a forward that raised calls `on_raise`.
A hook on each watched module appends the call to the current forward's list: its body is a list append, so that it
runs inside a checkpointed region, a compiled graph and `nn.DataParallel`'s replica threads. Torch only.
"""
import torch
from torch import nn


__all__ = ['Forward', 'Capture', 'versions']


class Forward:
    """One forward that counts: the model's input and output, whether it trains, and each call of a watched module
    as `(module, args, kwargs, output, versions, grad_enabled, called)`, in call order: `versions` are the version
    counters of the output's tensors when it was returned (`versions`), `called` the module that ran (`module`
    itself, or its replica under `nn.DataParallel`)."""
    __slots__ = ('args', 'kwargs', 'output', 'training', 'calls')

    def __init__(self, args, kwargs, output, training, calls):
        self.args, self.kwargs, self.output, self.training, self.calls = args, kwargs, output, training, calls

    def of(self, module) -> list: return [c for c in self.calls if c[0] is module]


class _Tap:
    "A hook of ours. A copied or pickled model keeps an inert tap (`__reduce__`), which removes itself when called."
    __slots__ = ('capture', 'module')

    def __init__(self, capture, module=None): self.capture, self.module = capture, module
    def __reduce__(self): return (type(self), (None,))

    def _remove_from(self, module):
        for name in ('_forward_pre_hooks', '_forward_hooks'):
            for k in [k for k, v in getattr(module, name).items() if v is self]: getattr(module, name).pop(k)


class _ModuleTap(_Tap):
    __slots__ = ()

    def __call__(self, module, args, kwargs, output):
        cap = self.capture
        if cap is None: return self._remove_from(module)
        calls = cap.calls
        if calls is None: return
        # (a tensor's version without a call: this runs at every call of a watched module)
        v = None if torch.compiler.is_compiling() else output._version if type(output) is torch.Tensor and \
            not output.is_inference() else versions(output)
        calls.append((self.module, args, kwargs, output, v, torch.is_grad_enabled(), module))


def versions(output):
    """The version counter of the output's tensors (of each top-level item of a tuple, list or dict): a later in-place
    change shows in it. None inside a compiled graph, or for inference-mode tensors, which have none."""
    if torch.compiler.is_compiling(): return None
    if isinstance(output, torch.Tensor): return None if output.is_inference() else output._version
    items = output.items() if isinstance(output, dict) else enumerate(output) if isinstance(output, (tuple, list)) \
        else ()
    got = {}
    for k, x in items:  # (a loop, not a comprehension: this runs at every call of a watched module)
        if isinstance(x, torch.Tensor) and not x.is_inference(): got[k] = x._version
    return got


class _RootPreTap(_Tap):
    __slots__ = ()

    def __call__(self, model, args, kwargs):
        cap = self.capture
        if cap is None: return self._remove_from(model)
        cap.calls = [] if cap.accept is None or cap.accept(model) else None
        cap.inputs = args, kwargs


class _RootTap(_Tap):
    __slots__ = ()

    def __call__(self, model, args, kwargs, output):
        cap = self.capture
        if cap is None: return None if output is None else self._remove_from(model)
        calls, cap.calls = cap.calls, None
        if output is None:  # the forward raised (torch calls an always-call hook with None then)
            if cap.on_raise is not None: cap.on_raise(cap)
            return
        if calls is not None:
            training = model.training and torch.is_grad_enabled()
            cap.forward = Forward(args, kwargs, output, training, calls)
            cap.count += training


class Capture:
    "Hooks on a model from `open` to `close`, and on the modules `watch` names; `forward`: the last one that counted"
    def __init__(self,
        accept=None,  # called with the model at each forward: whether it counts; None: every forward counts
        on_raise=None,  # called with this capture when a forward raised
    ):
        self.accept, self.on_raise = accept, on_raise
        self.model, self.root_handles, self.watched, self.handles = None, [], [], []
        self.calls, self.inputs = None, None  # the calls of the forward in progress; its input
        self.forward, self.count = None, 0  # the last forward that counted, and how many trained since `forget`

    @property
    def is_open(self) -> bool: return bool(self.root_handles)

    def open(self, model: nn.Module):
        self.close()
        self.model = model
        self.root_handles = [model.register_forward_pre_hook(_RootPreTap(self), with_kwargs=True),
                             model.register_forward_hook(_RootTap(self), with_kwargs=True, always_call=True)]

    def watch(self,
        modules: list,  # the modules whose calls to record: the same list as last time keeps its hooks
    ):
        if self.watched == modules: return
        for h in self.handles: h.remove()
        self.watched = list(modules)
        # prepend: a tap runs before the model's own forward hook, which ends the forward's record, where the model
        # itself is watched
        self.handles = [m.register_forward_hook(_ModuleTap(self, m), with_kwargs=True, prepend=True)
                        for m in self.watched]

    def forget(self):
        "Drop what the forwards captured: no activation outlives its batch"
        self.calls = self.inputs = self.forward = None
        self.count = 0

    def close(self,
        running: bool = False,  # from inside the model's own forward hook, whose dict torch is iterating over
    ):
        "Remove every hook"
        self.forget()
        for m, h in zip(self.watched, self.handles): self._remove(h, running and m is self.model)
        for h in self.root_handles: self._remove(h, running)
        self.handles, self.watched, self.root_handles, self.model = [], [], [], None

    def _remove(self, handle, running: bool):
        if not running: return handle.remove()
        # inside the model's forward hooks, `remove` would change the dict torch is iterating over: a copy without the
        # hook replaces it instead
        for name in ('_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_forward_hooks',
                     '_forward_hooks_with_kwargs', '_forward_hooks_always_called'):
            hooks = getattr(self.model, name)
            if handle.id in hooks:
                setattr(self.model, name, type(hooks)((k, v) for k, v in hooks.items() if k != handle.id))

