"""Which modules AR and TAR read, and how their outputs become `(activations, mask, seq_dim)`.

Where no module is named and the model returns fastai's `(logits, raw, dropped)`, `TARCallback` reads that
output instead (`fastai_tar.contract`); the places here are the rest. For fastai's text models they are known:
the AWD-LSTM encoder's raw output (TAR) and the language model decoder's output dropout (AR), or the
`SentenceEncoder` of a classifier, whose output carries the padding mask. For any other model the last
`nn.RNNBase` is used for both TAR and AR: AR then reads the raw RNN output, not a dropped one.
"""
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn, Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from fastai.text.models.awdlstm import AWD_LSTM, RNNDropout, WeightDropout
from fastai.text.models.core import LinearDecoder, SentenceEncoder

from .schedule import check_coef, describe_coef

__all__ = ['NothingToRegularize', 'COEF_ARG', 'Target', 'unwrap_model', 'check_arguments', 'check_modules',
           'check_seq_dim', 'describe_modules', 'find_targets', 'read_output']

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


COEF_ARG = {'ar': 'alpha', 'tar': 'beta'}  # the argument that weights each kind


class NothingToRegularize(ValueError):
    "The model has no module that TARCallback knows to read: a model returning fastai's contract may still be read."


@dataclass(eq=False)
class Target:
    "One regularized term: `kind` ('ar' or 'tar') of the output of `module`, weighted by `coef`."
    kind: str
    name: str  # the module's name in `model.named_modules()`
    module: nn.Module
    coef: Any  # a number, or a schedule: a callable of `pct_train`

    def __repr__(self):
        off = ' (off in training)' if not callable(self.coef) and self.coef == 0 else ''
        return (f"{self.kind.upper()} {self.name or '<model>'} ({type(self.module).__name__}): "
                f"{COEF_ARG[self.kind]}={describe_coef(self.coef)}{off}")


_PREFIXES = ('module.', '_orig_mod.')  # what DDP / DataParallel and torch.compile put before every name


def unwrap_model(model: nn.Module) -> nn.Module:
    "The model inside `DistributedDataParallel` / `nn.DataParallel` wrappers and `torch.compile`."
    while True:
        if isinstance(model, _WRAPPERS): model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module): model = model._orig_mod
        else: return model


def _named(model, cls):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _default_places(model: nn.Module, all_layers: bool) -> tuple[list, list]:
    "(TAR places, AR places) as `(name, module)` lists, found from the model's structure."
    encoders = _named(model, SentenceEncoder)
    if encoders:  # classifier: the encoder output is the last layer's raw output with its padding mask
        if all_layers:
            raise ValueError("all_layers=True needs the per-layer outputs of an AWD_LSTM, but a classifier's "
                             "SentenceEncoder joins its bptt chunks only at its output: use all_layers=False")
        return encoders[-1:], encoders[-1:]
    awd = _named(model, AWD_LSTM)
    if awd:
        name, enc = awd[-1]
        decoders = _named(model, LinearDecoder)
        last_dropped = [(f'{n}.output_dp' if n else 'output_dp', d.output_dp) for n, d in decoders[-1:]]
        if not all_layers: return [(name, enc)], last_dropped or [(name, enc)]
        prefix = f'{name}.' if name else ''
        tar = [(f'{prefix}rnns.{i}', r) for i, r in enumerate(enc.rnns)]
        ar = [(f'{prefix}hidden_dps.{i}', d) for i, d in enumerate(enc.hidden_dps)][:-1]
        return tar, ar + (last_dropped or tar[-1:])
    rnns = _named(model, nn.RNNBase)
    if rnns: return (rnns, rnns) if all_layers else (rnns[-1:], rnns[-1:])
    raise NothingToRegularize(
        f"TARCallback found nothing to regularize in {type(model).__name__}: it looked for a fastai "
        "SentenceEncoder (classifier), an AWD_LSTM (language model) and an nn.LSTM/nn.GRU/nn.RNN. Name the "
        "module(s) whose output is the recurrent activation: TARCallback(modules=['encoder.rnn']) with names "
        "from model.named_modules(), or the module objects themselves.")


_SPEC = "a module, a name from model.named_modules(), a list of them, or a dict {module or name: coefficient}"


def _specs(spec) -> list:
    return list(spec) if isinstance(spec, (list, tuple, dict)) else [spec]


def check_modules(
    spec,  # what the user passed as `modules=` / `ar_modules=`
    arg: str,  # that argument's name, for the message
    coef=None,  # the coefficient that weights these modules: a list must give one per module
    coef_arg: str = '',  # its name
):
    "Reject a module spec that can never name a module, when the callback is built; names are looked up at fit."
    if spec is None: return
    if isinstance(spec, (list, tuple, dict)) and not spec:
        raise ValueError(f"{arg}={spec!r} names no module: give {_SPEC}, or None to find them from the model")
    for s in _specs(spec):
        if not isinstance(s, (nn.Module, str)):
            raise TypeError(f"{arg} takes {_SPEC}; got {type(s).__name__} {s!r}")
    if isinstance(spec, dict): check_coef(spec, coef_arg)
    elif isinstance(coef, (list, tuple)) and len(coef) != len(_specs(spec)):
        raise ValueError(f"{coef_arg} has {len(coef)} coefficients but {arg} names {len(_specs(spec))} modules: "
                         f"give one coefficient per module, or a single number for all")


def check_seq_dim(seq_dim):
    "The time axis as a Python int: any integer (numpy's, a 0-d torch tensor) but a bool; None stays None."
    if seq_dim is None: return None
    try:
        if isinstance(seq_dim, bool) or isinstance(seq_dim, Tensor) and seq_dim.is_floating_point(): raise TypeError
        return operator.index(seq_dim)
    except TypeError:
        raise TypeError(f"seq_dim takes an integer, the time axis of the hooked output (1: batch-first, "
                        f"0: sequence-first), or None; got {type(seq_dim).__name__} {seq_dim!r}") from None


def check_arguments(alpha, beta, modules, ar_modules, all_layers, seq_dim, valid_metrics, show_columns) -> int | None:
    "Check `TARCallback`'s arguments when it is built; returns `seq_dim` as a Python int (or None)."
    for coef, arg, spec_arg in ((alpha, 'alpha', 'ar_modules'), (beta, 'beta', 'modules')):
        if isinstance(coef, dict):
            raise TypeError(f"{arg}={describe_coef(coef)}: coefficients per module go in {spec_arg}= as a dict, "
                            f"{spec_arg}={describe_coef(coef)}; {arg} takes a number >= 0, a schedule, or a list")
        check_coef(coef, arg)
    check_modules(modules, 'modules', beta, 'beta')
    if ar_modules is None: check_modules(modules, 'modules', alpha, 'alpha')  # AR reads `modules` then
    else: check_modules(ar_modules, 'ar_modules', alpha, 'alpha')
    for flag, value in (('all_layers', all_layers), ('valid_metrics', valid_metrics), ('show_columns', show_columns)):
        if not isinstance(value, bool): raise TypeError(f"{flag} must be True or False, got {value!r}")
    return check_seq_dim(seq_dim)


def describe_modules(spec) -> str:
    "A one-line form of a module spec for `repr`: names quoted, modules by their class."
    one = lambda m: repr(m) if isinstance(m, str) else type(m).__name__
    if isinstance(spec, dict): return '{' + ', '.join(f'{one(k)}: {describe_coef(v)}' for k, v in spec.items()) + '}'
    if isinstance(spec, (list, tuple)): return '[' + ', '.join(map(one, spec)) + ']'
    return one(spec)


def _lookup(model: nn.Module, spec, arg: str) -> tuple[str, nn.Module]:
    "`(name, module)` for a module or a name of `model.named_modules()`."
    named = dict(model.named_modules())
    if isinstance(spec, nn.Module):
        for n, m in named.items():
            if m is spec: return n, m
        raise ValueError(f"{arg}: the module {type(spec).__name__} is not part of the learner's model")
    if isinstance(spec, str):
        key = spec
        while key not in named and key.startswith(_PREFIXES): key = key.split('.', 1)[1]
        if key in named: return key, named[key]
        some = ', '.join(repr(n) for n in list(named)[1:9])
        raise ValueError(f"{arg}: no module named {spec!r} in the model; names come from model.named_modules(), "
                         f"e.g. {some}")
    raise TypeError(f"{arg} takes modules or names from model.named_modules(), got {type(spec).__name__}")


def _as_items(spec, coef, arg: str, coef_arg: str) -> list[tuple[Any, Any]]:
    "Pair each module spec with its coefficient: a dict gives its own, a list of coefficients matches by position."
    if isinstance(spec, dict): return list(spec.items())
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if isinstance(coef, (list, tuple)):
        if len(coef) != len(specs):
            raise ValueError(f"{coef_arg} has {len(coef)} coefficients but {arg} names {len(specs)} modules: "
                             f"give one coefficient per module, or a single number for all")
        return list(zip(specs, coef))
    return [(s, coef) for s in specs]


def find_targets(
    model: nn.Module,  # the learner's model, possibly wrapped in DistributedDataParallel
    alpha: Any,  # AR coefficient: a number, a schedule, or one per AR module
    beta: Any,  # TAR coefficient: a number, a schedule, or one per TAR module
    modules=None,  # TAR places; None: found from the model's structure
    ar_modules=None,  # AR places; None: the fastai LM's output dropout, else the same as `modules`
    all_layers: bool = False,  # every layer of a fastai AWD_LSTM, not only the last
) -> list[Target]:
    "The AR and TAR terms for `model`, zero coefficients included (they still feed validation metrics)."
    model = unwrap_model(model)
    ar_arg = 'ar_modules' if ar_modules is not None or modules is None else 'modules'  # where a bad name came from
    if modules is None:
        tar_places, ar_places = _default_places(model, all_layers)
        modules = [m for _, m in tar_places]
        if ar_modules is None: ar_modules = [m for _, m in ar_places]
    elif ar_modules is None: ar_modules = list(modules) if isinstance(modules, dict) else modules
    targets = []
    for kind, spec, coef, arg, coef_arg in (('ar', ar_modules, alpha, ar_arg, 'alpha'),
                                            ('tar', modules, beta, 'modules', 'beta')):
        for s, c in _as_items(spec, coef, arg, coef_arg):
            name, module = _lookup(model, s, arg)
            targets.append(Target(kind, name, module, c))
    return targets


# Modules whose output layout is known: fastai's text modules are batch-first, `nn.RNNBase` says `batch_first`.
_BATCH_FIRST = (AWD_LSTM, SentenceEncoder, RNNDropout)


def _known_axis(module: nn.Module, h: Tensor) -> int | None:
    rnn = module.module if isinstance(module, WeightDropout) else module
    if isinstance(rnn, nn.RNNBase):
        if h.dim() == 2: return 0  # unbatched input: (L, H)
        return 1 if rnn.batch_first else 0
    return 1 if isinstance(module, _BATCH_FIRST) else None


def _packed_mask(lengths: Tensor, sl: int, device) -> Tensor:
    return torch.arange(sl, device=device)[None] < lengths.to(device)[:, None]


def read_output(
    module: nn.Module,  # the hooked module
    output,  # what its forward returned
    seq_dim: int | None = None,  # the user's time axis: needed where the module's layout is unknown (default 1)
) -> tuple[Tensor, Tensor | None, int]:
    "`(h, mask, seq_dim)` from a module's output: mask True where the position is real data."
    name = type(module).__name__
    if isinstance(module, SentenceEncoder):
        h, pad = output
        mask = ~pad
    else:
        # RNNs return (output, state); a PackedSequence is a tuple too, and is the output itself
        if isinstance(output, (tuple, list)) and not isinstance(output, PackedSequence) and output: output = output[0]
        mask = None
        if isinstance(output, PackedSequence):
            output, lengths = pad_packed_sequence(output, batch_first=True)
            mask = _packed_mask(lengths, output.shape[1], output.device)
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 2:
            what = f"a {output.dtype} tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) \
                else type(output).__name__
            raise TypeError(f"TARCallback cannot read the output of {name} ({what}): hook modules that return a "
                            "float tensor with time and feature dims, an (output, state) tuple or a PackedSequence, "
                            "through modules= / ar_modules=")
        h = output
    known = 1 if mask is not None else _known_axis(module, h)
    if known is None:
        if isinstance(module, nn.RNNCellBase) or (h.dim() == 2 and seq_dim is None):
            raise ValueError(f"TARCallback cannot find a time axis in the output of {name} (shape {tuple(h.shape)}): "
                             "one step of an RNN cell has none. Hook the module that returns the whole sequence "
                             "(batch, time, features), or pass seq_dim= for a custom module's (time, features)")
        return h, mask, 1 if seq_dim is None else seq_dim
    if seq_dim is not None and (not -h.dim() <= seq_dim < h.dim() or seq_dim % h.dim() != known):
        raise ValueError(f"seq_dim={seq_dim} contradicts the time axis of {name}'s output, {known} (shape "
                         f"{tuple(h.shape)}), which TARCallback reads from the module itself: leave seq_dim out; "
                         "it is for custom modules whose layout cannot be read")
    return h, mask, known
