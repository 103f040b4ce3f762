"""One batch's reading: each read of the plan gathers its tensors from the forward's calls, checks that they are what
the plan settled (the same modules ran, the same tensors were read, none changed in place since), and the penalty's
sums are taken in as few autograd nodes as the reads allow. Torch only.

A module's calls in one forward are read by the plan's rule (`fastai_tar.plan`): the one call, or the steps of one
sequence (each call's state argument is the previous call's state output), joined in call order along the time
axis; or the calls a `Place` picked, each sequence apart. Calls on `nn.DataParallel`'s replicas are shards of one
call: each shard is read apart and the shards pool into one mean.
"""
import inspect

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .functional import ar_tar_sum_count
from .module_facts import first_tensor
from .plan import KINDS, activation_groups, describe, graded, one_sequence, select_calls, sequences

__all__ = ['PlanBroken', 'checked_mask', 'batch_mask', 'gather', 'term_sums']


class PlanBroken(RuntimeError):
    "A batch's forward no longer does what the plan was settled on: its owner settles again or says why it cannot."


def _read(read, call) -> tuple[Tensor, Tensor | None, bool]:
    "`(h, mask, packed)` of one call: the read item of its output, checked unchanged; mask True where data is real"
    out, versions = call[3], call[4]
    x = out if read.item is None else out[read.item]
    if isinstance(x, Tensor) and x.is_floating_point() and x.dim() > 0:
        version = versions if read.item is None or versions is None else versions.get(read.item)
        if version is not None and x._version != version: _changed_in_place(read, x)
        return x, (~out[1] if read.masked else None), False
    if isinstance(x, PackedSequence):
        h, lengths = pad_packed_sequence(x, batch_first=True)
        # the lengths are on the host: an asynchronous copy, so that no batch waits for the device
        lengths = lengths.to(h.device, non_blocking=True)
        return h, torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None], True
    raise TypeError(f"TARCallback cannot read {read.name!r} ({read.where}): this batch it returned a "
                    f"{describe(x)}, where the plan read a float tensor")


def _changed_in_place(read, t: Tensor):
    "The tensor is not as it left the module: an in-place op since then would change what the penalty reads."
    op = type(t.grad_fn).__name__ if t.grad_fn is not None else 'an in-place op'
    raise RuntimeError(
        f"TARCallback reads {read.name} ({read.kind.upper()}), but its output was changed in place after it left "
        f"the module (its autograd history now ends in {op}: e.g. `out += x`, `out.relu_()` or "
        "nn.ReLU(inplace=True)); the penalty would read the changed values. Make that op out-of-place "
        "(`out = out + x`, inplace=False), or name the module whose output is the activation to regularize")


def _axis(read, h: Tensor, packed: bool) -> int | None:
    "The time axis of this call's `h`: the plan's, but a PackedSequence is unpacked batch-first by us."
    if read.seq_dim is None: return None
    if packed:
        if read.axes_given and read.seq_dim % 3 != 1:
            raise ValueError(f"seq_dim={read.seq_dim} contradicts the time axis of {read.name}'s PackedSequence, "
                             "which TARCallback unpacks batch-first (time axis 1): leave seq_dim out")
        return 1
    if not read.axes_given and isinstance(read.module, nn.RNNBase) and h.dim() == 2: return 0  # unbatched (L, H)
    if read.steps: return read.seq_dim  # a step has no time axis yet: it is inserted there
    if not -h.dim() <= read.seq_dim < h.dim():
        raise ValueError(f"TARCallback reads {read.name!r} along time axis {read.seq_dim} ({read.axis_why}), but its "
                         f"output has shape {tuple(h.shape)}: pass seq_dim= naming its time axis")
    return read.seq_dim % h.dim()


def _part(read, calls: list, axis: bool) -> tuple:
    """`(h, mask, seq_dim)` of one sequence of calls: a call alone, or steps joined in call order along the time axis.
    `axis`: find the time axis (TAR, and AR where a mask or steps need it)"""
    parts = []
    for c in calls:
        h, mask, packed = _read(read, c)
        sd = _axis(read, h, packed) if axis and read.seq_dim is not None else None
        if read.steps and sd is not None:  # a cell's output has no time axis: each call is one step
            h, mask = h.unsqueeze(sd), None if mask is None else mask.unsqueeze(sd)
        parts.append((h, mask, sd))
    if len(parts) == 1: return parts[0]
    h0, m0, sd = parts[0]
    if sd is None: raise PlanBroken(f"{read.name!r} ran {len(parts)} steps, which AR without a time axis cannot join")
    if any(h.shape[:sd] + h.shape[sd + 1:] != h0.shape[:sd] + h0.shape[sd + 1:] or (m is None) != (m0 is None)
           for h, m, _ in parts):
        raise ValueError(f"TARCallback cannot join the steps of {read.name!r} into a sequence: their shapes differ "
                         f"({sorted({tuple(h.shape) for h, _, _ in parts})})")
    mask = None if m0 is None else torch.cat([m for _, m, _ in parts], sd - (sd > read.feature_dim % h0.dim()))
    return torch.cat([h for h, _, _ in parts], sd), mask, sd


def _module_parts(read, calls: list, training: bool, via: dict | None, axis: bool) -> list:
    """A module read's `(h, mask, seq_dim)` parts, by the plan's rule, from its calls in this forward. `via`: AR's
    dropout takes what that read reads, {id of each tensor: its sequence} (`plan.activation_groups`)"""
    if len(calls) == 1 and read.call is None:  # the common case, without a further call
        c = calls[0]
        if training and not c[5] or via is not None and (not c[1] or id(first_tensor(c[1])) not in via):
            return []
        return [_part(read, calls, axis)]
    calls = graded(calls, training)
    if via is not None: return _dropout_parts(read, calls, via, axis)
    calls = select_calls(read, calls)
    if not calls: return []
    if read.call is None and not one_sequence(read.module, calls):
        raise PlanBroken(f"{read.name!r} ran {len(calls)} times in this forward, and its calls are not the steps of "
                         "one sequence, as they were when the plan was settled")
    return [_part(read, s, True) for s in sequences(read.module, calls)]


def _dropout_parts(read, calls: list, via: dict, axis: bool) -> list:
    "The dropout's calls that took what `via` read, one each, joined as the sequences they took their inputs from"
    groups, taken = {}, set()
    for c in calls:
        x = first_tensor(c[1]) if c[1] else None
        if x is None or id(x) not in via: continue
        if id(x) in taken:
            raise PlanBroken(f"{read.name!r} took the output of {read.via.name!r} twice in this forward, where it took "
                             "it once when the plan was settled")
        taken.add(id(x))
        groups.setdefault(via[id(x)], []).append(c)
    if read.seq_dim is None: return [_part(read, [c], axis) for cs in groups.values() for c in cs]  # no time to join
    return [_part(read, cs, axis or len(cs) > 1) for cs in groups.values()]


def checked_mask(mask, source: str) -> Tensor:
    "The batch x time mask that `source` gave (a function or an argument), if it is a bool tensor"
    if isinstance(mask, Tensor) and mask.dtype == torch.bool: return mask
    raise TypeError(f"{source} must give a bool batch x time tensor, True where a step is real; it gave "
                    f"a {describe(mask)}")


def batch_mask(
    fn,  # the mask function the user gave
    args: tuple,  # what it is called with
    kwargs: dict,
    source: str,  # where it was given, for messages: 'TARCallback(mask=...)'
    called_as: str,  # how it is called, for messages: 'mask(xb, yb)'
) -> Tensor:
    "The mask `fn` makes of a batch, checked; a function that cannot take what it is called with is told how it is"
    try: mask = fn(*args, **kwargs)
    except TypeError as e:
        try: inspect.signature(fn).bind(*args, **kwargs)
        except TypeError:  # (not one raised inside the function: that one is the user's to read, as it is)
            raise TypeError(f"{source} is called as {called_as}, which the function given cannot take: {e}") from None
        except ValueError: pass  # (a callable without a signature to check)
        raise
    return checked_mask(mask, source)


def _user_mask(read, parts: list, mask: Tensor) -> list:
    "Each part's mask and-ed with the batch x time `mask`, in the part's own order of axes"
    out = []
    for h, m, sd in parts:
        if sd is None:
            raise ValueError(f"mask= is batch x time, but the time axis of {read.name!r} ({read.where}), which "
                             f"{read.kind.upper()} reads, is not known: pass seq_dim=")
        fd = read.feature_dim % h.dim()
        if h.dim() != 3 or mask.dim() != 2:
            raise ValueError(f"mask= of shape {tuple(mask.shape)} does not fit {read.name!r}, a tensor "
                             f"{tuple(h.shape)} that {read.kind.upper()} reads: the mask is batch x time, and the "
                             "read tensor batch, time and features" + (
                                 " (a PackedSequence's data has no batch and time axes: read the module that returns "
                                 "the PackedSequence, or apply the dropout to the padded output)" if h.dim() == 2
                                 else ""))
        bd = ({0, 1, 2} - {sd, fd}).pop()
        um = mask
        if m is not None and mask.shape[0] == h.shape[bd] and mask.shape[1] > h.shape[sd]:
            # the module's padding says there are no steps past these (a PackedSequence unpacks to its longest
            # sequence): and-ed with it, the mask's later steps are False anyway
            um = mask[:, :h.shape[sd]]
        if um.shape != (h.shape[bd], h.shape[sd]):
            raise ValueError(f"mask= of shape {tuple(mask.shape)} does not fit {read.name!r}, a tensor "
                             f"{tuple(h.shape)} that {read.kind.upper()} reads: its batch x time is "
                             f"{(h.shape[bd], h.shape[sd])}")
        if um.device != h.device: um = um.to(h.device, non_blocking=True)
        if bd > sd: um = um.T
        out.append((h, um if m is None else m & um, sd))
    return out


def gather(
    reads: list,  # the reads to take this batch (those that train, or all of them in validation)
    fwd,  # the batch's `capture.Forward`
    contract=None,  # the batch's `plan.Contract`, where the plan reads it
    mask: Tensor | None = None,  # the batch's bool batch x time mask, True where a step is real
    missing: list | None = None,  # outside training, the reads whose module did not run are put here and skipped
) -> dict:
    "read -> its `(h, mask, seq_dim)` parts this batch, checked against the plan"
    parts, by_module = {}, {}
    for c in fwd.calls: by_module.setdefault(id(c[0]), []).append(c)
    for r in reads:
        if r.module is None:
            h = getattr(contract, KINDS[r.kind].item_name)[r.layer]
            # (AR needs its time axis only for a mask)
            ps = [(h, None, None if r.seq_dim is None or r.kind == 'ar' and mask is None else _axis(r, h, False))]
        else:
            via = None
            if r.via is not None:  # the calls whose input is what `via` reads, by identity
                via = activation_groups(r.via, by_module.get(id(r.via.module), ()), fwd.training)
            axis = r.kind == 'tar' or mask is not None  # (AR's time axis is for a mask alone)
            ps = _module_parts(r, by_module.get(id(r.module), []), fwd.training, via, axis)
            if not ps and missing is not None and not fwd.training:
                missing.append(r)
                continue
            if not ps:
                raise PlanBroken(f"{r.name!r} ({type(r.module).__name__}) did not run in this forward" if r.via is None
                                 else f"no call of {r.name!r} took the output of {r.via.name!r} in this forward")
        parts[r] = ps if mask is None else _user_mask(r, ps, mask)
    return parts


def term_sums(
    parts: dict,  # read -> its `(h, mask, seq_dim)` parts (`gather`)
) -> dict:
    "read -> (sum, count) pooled over its parts; one AR and one TAR part together in one fused autograd node"
    if len(parts) == 2:  # the common case, AR and TAR of one place each: one call
        (ar, ar_parts), (tar, tar_parts) = parts.items()
        if ar.kind == 'tar': (ar, ar_parts), (tar, tar_parts) = (tar, tar_parts), (ar, ar_parts)
        if ar.kind == 'ar' and tar.kind == 'tar' and len(ar_parts) == len(tar_parts) == 1 and \
                ar.feature_dim == tar.feature_dim:
            (a, am, _), (t, tm, sd) = ar_parts[0], tar_parts[0]
            stats = {}
            stats[ar], stats[tar] = ar_tar_sum_count(a, t, am, tm, seq_dim=sd, feature_dim=tar.feature_dim)
            return stats
    stats, reads = {}, [r for r in parts if parts[r]]
    for r in reads:
        for h, mask, sd in parts[r]:
            pair = (None, h) if r.kind == 'tar' else (h, None)
            masks = (None, mask) if r.kind == 'tar' else (mask, None)
            ar, tar = ar_tar_sum_count(*pair, *masks, seq_dim=1 if sd is None else sd, feature_dim=r.feature_dim)
            s, n = ar if r.kind == 'ar' else tar
            if r in stats:
                s0, n0 = stats[r]
                s, n = s0 + s.to(s0.device), n0 + (n.to(s0.device) if isinstance(n, Tensor) else n)
            stats[r] = (s, n)
    return stats
