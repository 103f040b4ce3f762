"""How the plan's activations are captured: forward hooks that keep what a module returned in the training forward,
and the reading of those calls into `(h, mask, seq_dim, feature_dim)` for the penalties.

A hook's body is a list append (no arithmetic, no lock), so it runs inside a gradient-checkpointed region, inside a
`torch.compile`d graph and in `nn.DataParallel`'s replica threads. The forward that counts is the one the learner
itself runs (`learn.model(*learn.xb)` in fastai's `_do_one_batch`): forwards run by callbacks are not recorded, and
a callback may derive `learn.pred` from the output as it likes.

**Every call counts, by one rule.** Calls made without gradient are skipped (a no-grad burn-in). Calls of one step
each (a cell, or an RNN fed one step at a time by a decoder) are joined in call order along the time axis into one
sequence; calls of whole sequences each add their own pairs, pooled into one mean. A mix of the two cannot be read
for certain and is an error. Each tensor is read as it left the module: a later in-place change is an error.
"""
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .fastai_interop import fastai_output
from .functional import ar_tar_sum_count
from .plan import KINDS, by_kind

__all__ = ['Call', 'Forward', 'ForwardCapture', 'read_item', 'read_tensors', 'term_sums']

# Frames of fastai's training loop: `_with_events` runs every fit, epoch and batch
_LOOP = {Learner._with_events.__code__, Learner.one_batch.__code__, Learner._do_one_batch.__code__}
_TORCH_DIR = torch.__file__.rsplit('/', 1)[0]
_MAX_DEPTH = 20  # frames between the model's call and the learner's method: helpers, wrappers


@dataclass
class Call:
    "One call of a watched module in the learner's forward."
    group: int  # which watched module (its replicas under nn.DataParallel share it)
    module: nn.Module  # the module, or its replica
    output: object  # what it returned
    version: int | None  # the version counter of its first tensor then (None inside a compiled graph)
    grad_enabled: bool


@dataclass
class Forward:
    "The learner's forward of one batch: the model's whole output and the watched modules' calls."
    output: object
    calls: list

    def of(self, group: int) -> list: return [c for c in self.calls if c.group == group]

    def outputs_of(self, types) -> dict:
        "id of the first tensor each call of a module of `types` returned -> (that module, its version then)"
        return {id(_first_tensor(c.output)): (c.module, c.version) for c in self.calls if isinstance(c.module, types)}

    def packed_groups(self) -> set:
        "The groups whose module returned a PackedSequence (alone, or first in a tuple): their layout is known"
        return {c.group for c in self.calls if isinstance(c.output, PackedSequence) or
                isinstance(c.output, tuple) and c.output and isinstance(c.output[0], PackedSequence)}


def _first_tensor(x):
    while isinstance(x, (tuple, list)) and x: x = x[0]  # (output, state), (h, c), a PackedSequence's data
    return x if isinstance(x, Tensor) else None


class _Tap:
    "The hook objects left in the modules' hook dicts: copying or pickling a model keeps an inert tap, not our state."
    def __init__(self, capture, group=None): self.capture, self.group = capture, group

    def __reduce__(self): return (_Tap, (None, self.group))

    def __call__(self, module, *args):
        cap = self.capture
        if cap is None: return
        if self.group is None: return cap._root(module, *args)
        calls = cap.current
        if calls is None: return
        out = args[-1]
        # (inside a compiled graph, and for inference-mode tensors, there is no version counter to read)
        t = None if torch.compiler.is_compiling() else _first_tensor(out)
        version = None if t is None or t.is_inference() else t._version
        calls.append(Call(self.group, module, out, version, torch.is_grad_enabled()))


class ForwardCapture:
    """Hooks on the model, from `open` to `close` (a fit, or a `get_preds`), that tell the learner's own forwards apart,
    and on the watched modules, from `watch` until other modules are watched or `close`. `forward`: the learner's
    forward of this batch, until `forget`: no activation outlives its batch."""
    def __init__(self):
        self.current = None  # the calls of the learner's forward in progress
        self.forward, self.learn, self.on_stale, self.root_handles = None, None, None, []
        self.handles = []  # (module, hook handle) of each watched module
        self.root = None  # the model the root hooks are on

    @property
    def is_open(self) -> bool: return bool(self.root_handles)

    def open(self,
        learn,  # the learner: its own forward is the one recorded
        on_stale,  # called when a forward outside fastai's loop finds the hooks left over from an interrupted fit
    ):
        self.close()
        self.learn, self.on_stale, root = learn, on_stale, _Tap(self)
        self.root_handles = [learn.model.register_forward_pre_hook(root),
                             learn.model.register_forward_hook(root, always_call=True)]
        self.root = learn.model

    def watch(self,
        modules: list,  # the modules to watch, group i for modules[i]: the same list as last time keeps its hooks
    ):
        self.forget()
        if [m for m, _ in self.handles] == modules: return
        for _, h in self.handles: h.remove()
        self.handles = [(m, m.register_forward_hook(_Tap(self, i))) for i, m in enumerate(modules)]

    def forget(self):
        "Drop what the last forward captured."
        self.current, self.forward = None, None

    def close(self, running=False):
        "Remove every hook; `running`: from inside the root forward hook, whose dict torch is iterating over."
        self.forget()
        for _, h in self.handles: h.remove()
        self.handles = []
        if running:
            pre, post = self.root_handles
            pre.remove()
            # `remove` would change the dict torch is iterating over: a copy without the hook replaces it instead
            for name in ('_forward_hooks', '_forward_hooks_with_kwargs', '_forward_hooks_always_called'):
                hooks = getattr(self.root, name)
                if post.id in hooks:
                    setattr(self.root, name, OrderedDict((k, v) for k, v in hooks.items() if k != post.id))
        else:
            for h in self.root_handles: h.remove()
        self.root_handles, self.learn, self.on_stale, self.root = [], None, None, None

    def _root(self, model, args, *output):
        if not output:  # the pre-hook: a forward of the whole model starts
            if _called_by(self.learn): self.current = []
            # Outside fastai's loop the hooks are left over from a fit that an exception or a Ctrl-C ended: no
            # event of ours followed (fastai's `_with_events` has no `finally`)
            elif not _in_fastai_loop(): self._stale()
            return
        calls, self.current = self.current, None
        if output[0] is None: return self._stale(running=True)  # the forward raised: no event of ours follows
        if calls is not None: self.forward = Forward(output[0], calls)


    def _stale(self, running=False):
        on_stale = self.on_stale
        self.close(running)
        if on_stale is not None: on_stale()


def _called_by(learn) -> bool:
    """Whether the learner itself runs this forward (fastai's `_do_one_batch`, a subclass's `one_batch`, or a helper
    they call), not a callback's event: the nearest method of either on the stack decides."""
    f = sys._getframe(3)
    while f is not None and f.f_code.co_filename.startswith(_TORCH_DIR): f = f.f_back  # module call, compile, DDP
    for _ in range(_MAX_DEPTH):
        if f is None: return False
        owner = f.f_locals.get('self') if 'self' in f.f_code.co_varnames else None
        if owner is learn: return True
        if isinstance(owner, Callback): return False
        f = f.f_back
    return False


def _in_fastai_loop() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code in _LOOP: return True
        f = f.f_back
    return False


# --- reading the calls --------------------------------------------------------------------------------------
def _unpack(module, output) -> tuple[Tensor, Tensor | None, bool]:
    "`(h, mask, packed)` of a module's output: mask True where the position is real data."
    fastai = fastai_output(module, output)
    if fastai is not None: return (*fastai, False)
    # RNNs return (output, state), cells (h, c); a PackedSequence is a tuple too, and is the output itself
    if isinstance(output, (tuple, list)) and not isinstance(output, PackedSequence) and output: output = output[0]
    if isinstance(output, PackedSequence):
        h, lengths = pad_packed_sequence(output, batch_first=True)
        # the lengths are on the host: an asynchronous copy, so that no batch waits for the device
        lengths = lengths.to(h.device, non_blocking=True)
        return h, torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None], True
    if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 1:
        what = f"a {output.dtype} tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) \
            else type(output).__name__
        raise TypeError(f"TARCallback cannot read the output of {type(module).__name__} ({what}): name modules that "
                        "return a float tensor, an (output, state) tuple or a PackedSequence in modules= / ar_modules=")
    return output, None, False


def _check_unchanged(read, t: Tensor | None, version: int | None):
    "The tensor must be as it left the module: an in-place op since then would change what the penalty reads."
    if t is None or version is None or t._version == version: return
    op = type(t.grad_fn).__name__ if t.grad_fn is not None else 'an in-place op'
    raise RuntimeError(
        f"TARCallback reads {read.name} ({read.kind.upper()}), but its output was changed in place after it left "
        f"the module (its autograd history now ends in {op}: e.g. `out += x`, `out.relu_()` or "
        "nn.ReLU(inplace=True)); the penalty would read the changed values. Make that op out-of-place "
        "(`out = out + x`, inplace=False), or name the module whose output is the activation to regularize")


def _axis(read, module, h: Tensor, packed: bool) -> int | None:
    "The time axis of this call's `h`: the plan's, but a PackedSequence is unpacked batch-first by us."
    if read.seq_dim is None: return None
    if packed:
        if read.axes_given and read.seq_dim % 3 != 1:
            raise ValueError(f"seq_dim={read.seq_dim} contradicts the time axis of {read.name}'s PackedSequence, "
                             "which TARCallback unpacks batch-first (time axis 1): leave seq_dim out")
        return 1
    if not read.axes_given and isinstance(module, nn.RNNBase) and h.dim() == 2: return 0  # unbatched (L, H)
    if not -h.dim() <= read.seq_dim < h.dim():
        raise ValueError(f"TARCallback reads TAR of {read.name} along time axis {read.seq_dim} ({read.axis_why}), "
                         f"but its output has shape {tuple(h.shape)}: pass seq_dim= naming its time axis")
    return read.seq_dim % h.dim()


def _join_steps(read, parts: list) -> list:
    "Calls of one step each are one sequence, in call order; calls of whole sequences stay apart."
    if len(parts) < 2: return parts
    lengths = [h.shape[sd] for h, _, sd in parts]
    if all(n > 1 for n in lengths): return parts
    if any(n > 1 for n in lengths):
        raise ValueError(f"TARCallback cannot tell how the {len(parts)} calls of {read.name} in one forward relate: "
                         f"{lengths.count(1)} return one step (a decoder stepping) and "
                         f"{len(lengths) - lengths.count(1)} whole sequences. Name a module that runs one way only "
                         "in modules= (wrap each use of the shared module in a module of its own), or compute this "
                         "penalty yourself with fastai_tar.tar_penalty")
    h0, m0, sd = parts[0]
    if any(h.shape != h0.shape or (m is None) != (m0 is None) or s != sd for h, m, s in parts):
        raise ValueError(f"TARCallback cannot join the one-step calls of {read.name} into a sequence: their shapes "
                         f"differ ({sorted({tuple(h.shape) for h, _, _ in parts})})")
    mask = None if m0 is None else torch.cat([m for _, m, _ in parts], sd)
    return [(torch.cat([h for h, _, _ in parts], sd), mask, sd)]


def read_tensors(
    read,  # a `plan.Read` of a module
    calls: list,  # its calls in the learner's forward
    training: bool,  # a training forward: calls without gradient are skipped
) -> list[tuple[Tensor, Tensor | None, int | None]]:
    "`(h, mask, seq_dim)` to penalize for one read, by the rule of this module's docstring."
    graded = [c for c in calls if c.grad_enabled] if training and torch.is_grad_enabled() else calls
    if calls and not graded:
        raise RuntimeError(
            f"TARCallback: {read.name} ({type(read.module).__name__}) ran only without gradient in the training "
            "forward, so the penalty could not train it: torch.no_grad() around it, or "
            "torch.utils.checkpoint(..., use_reentrant=True), which runs the forward without gradient (use "
            "use_reentrant=False)")
    parts = []
    for c in graded:
        h, mask, packed = _unpack(c.module, c.output)
        _check_unchanged(read, _first_tensor(c.output), c.version)
        sd = _axis(read, c.module, h, packed)
        if read.steps and sd is not None:  # a cell's output has no time axis: each call is one step
            h, mask = h.unsqueeze(sd), None if mask is None else mask.unsqueeze(sd)
        parts.append((h, mask, sd))
    return _join_steps(read, parts) if read.seq_dim is not None else parts


def read_item(
    read,  # a `plan.Read` of an item of fastai's (logits, raw, dropped)
    h: Tensor,  # that item (its layer)
) -> list[tuple[Tensor, None, int | None]]:
    "`(h, mask, seq_dim)` of a contract item: batch x time x features, unless `seq_dim` says otherwise"
    if read.seq_dim is not None and not read.axes_given and h.dim() < 3:
        raise ValueError(f"TARCallback reads TAR from the model's {read.name}, a {h.dtype} tensor {tuple(h.shape)} "
                         "without a time axis (fastai's contract is batch x time x features): set beta=0 to read AR "
                         "only, pass seq_dim= naming its time axis, or return raw with a time axis")
    return [(h, None, None if read.seq_dim is None else _axis(read, None, h, False))]


def term_sums(
    parts: dict,  # read -> its `(h, mask, seq_dim)` list (`read_tensors`)
) -> dict:
    "read -> (sum, count) pooled over its parts; one AR and one TAR part together in one fused autograd node"
    stats, reads = {}, [r for r in parts if parts[r]]
    single = [r for r in reads if len(parts[r]) == 1]
    if len(reads) == 2 and len(single) == 2 and {r.kind for r in reads} == set(KINDS) and \
            reads[0].feature_dim == reads[1].feature_dim:
        ar, tar = by_kind(reads)
        (a, am, _), (t, tm, sd) = parts[ar][0], parts[tar][0]
        stats[ar], stats[tar] = ar_tar_sum_count(a, t, am, tm, seq_dim=sd, feature_dim=tar.feature_dim)
        return stats
    for r in reads:
        for h, mask, sd in parts[r]:
            s, n = KINDS[r.kind].sum_count(h, mask, **({'seq_dim': sd} if sd is not None else {}),
                                           feature_dim=r.feature_dim)
            if r in stats:
                s0, n0 = stats[r]
                s, n = s0 + s.to(s0.device), n0 + (n.to(s0.device) if isinstance(n, Tensor) else n)
            stats[r] = (s, n)
    return stats
