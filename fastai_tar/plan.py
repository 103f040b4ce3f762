"""What each term reads: one explicit plan, settled at the first training forward and shown in `learn.tar.places`.

The rule (the README's "Where AR and TAR read"), per term:
1. **What**: the modules you name (`modules=` for TAR, `ar_modules=` for AR, which reads `modules` without it);
   else, for a fastai classifier, its `SentenceEncoder` (with the padding mask); else fastai's `(logits, raw,
   dropped)` when the forward returns it for certain (`fastai_tar.fastai_interop`): TAR `raw`, AR `dropped`; else
   found from the structure: fastai's `AWD_LSTM` (AR on the `LinearDecoder`'s output dropout), or the last
   `nn.LSTM`/`GRU`/`RNN` (or cell) for both terms. `all_layers=True` reads each layer where the model has layers
   to read: per-layer lists in the contract, an `AWD_LSTM`'s layers, or every RNN module.
2. **Axes**: `seq_dim=` / `feature_dim=` when you pass them, for every read; else the module's own layout where it is
   certain (stock `nn.RNN/LSTM/GRU`: `batch_first`; cells: one step per call; fastai's text modules: batch-first;
   a contract's `raw`: the layout of the RNN module that returned it); else TAR asks for `seq_dim`. AR needs no
   time axis. The feature axis is the last unless you say otherwise.
The plan is kept while the model's modules are the same objects; when they change it is settled again.
"""
from dataclasses import dataclass, field
from typing import Any, Callable
import weakref

from torch import nn

from .arguments import describe_modules, module_specs
from .functional import ar_sum_count, tar_sum_count
from .fastai_interop import Contract, fastai_layout, fastai_places, is_fastai_classifier
from .schedule import describe_coef, may_be_on

__all__ = ['Kind', 'KINDS', 'by_kind', 'Read', 'Request', 'Plan', 'NothingToRegularize', 'unwrap_model', 'fingerprint',
           'module_reads', 'settle', 'watched_modules', 'describe_candidates']


@dataclass(frozen=True)
class Kind:
    "A penalty kind: what weights it and what it reads by default."
    name: str  # 'ar' or 'tar'
    coef_arg: str  # the TARCallback argument that weights it
    spec_arg: str  # the argument that names its modules
    item: int  # its item of fastai's (logits, raw, dropped)
    item_name: str
    needs_time: bool  # TAR compares consecutive steps; AR reads each element alone
    sum_count: Callable  # `(h, mask, seq_dim=, feature_dim=) -> (sum, count)`


KINDS = {'ar': Kind('ar', 'alpha', 'ar_modules', 2, 'dropped', False, ar_sum_count),
         'tar': Kind('tar', 'beta', 'modules', 1, 'raw', True, tar_sum_count)}


def by_kind(reads: list) -> list:
    "Reads in the table's order of kinds: AR first"
    return sorted(reads, key=lambda r: list(KINDS).index(r.kind))


class NothingToRegularize(ValueError):
    "The model has no module that TARCallback knows to read, and its output is not fastai's contract."


@dataclass(frozen=True)
class Request:
    "What the user asked `TARCallback` for, as given."
    alpha: Any
    beta: Any
    modules: Any
    ar_modules: Any
    all_layers: bool
    seq_dim: int | None
    feature_dim: int | None
    contract: bool | None

    def coef(self, kind: str): return getattr(self, KINDS[kind].coef_arg)

    def spec(self, kind: str):
        "The modules named for `kind`: AR reads `modules` when `ar_modules` is not given"
        return self.modules if kind == 'tar' else self.modules if self.ar_modules is None else self.ar_modules

    def spec_arg(self, kind: str) -> str:
        return 'modules' if kind == 'tar' or self.ar_modules is None else 'ar_modules'


@dataclass(eq=False)
class Read:
    "One regularized term and how it is read."
    kind: str  # 'ar' or 'tar'
    name: str  # the module's name in `model.named_modules()`, or 'raw' / 'dropped' ('raw.0', ... per layer)
    module: nn.Module | None  # the hooked module; None for an item of the model's output
    coef: Any  # a number, or a schedule: a callable of `pct_train`
    source: str  # 'named' (by you), 'contract' (fastai's output) or 'found' (from the model's structure)
    why: str  # said in `places`
    seq_dim: int | None = None  # the time axis (TAR); None: AR needs none
    feature_dim: int = -1
    axis_why: str = ''  # where the time axis comes from
    axes_given: bool = False  # the time axis is the user's `seq_dim`
    steps: bool = False  # each call returns one step without a time axis (a cell): the axis is inserted
    layer: int | None = None  # for output items: the layer of fastai's per-layer lists
    others: tuple = ()  # the other modules the structure offered: the plan took the last one

    @property
    def coef_arg(self) -> str: return KINDS[self.kind].coef_arg

    def __repr__(self):
        off = ' (off in training)' if not callable(self.coef) and self.coef == 0 else ''
        where = f"output[{KINDS[self.kind].item}]" if self.module is None else type(self.module).__name__
        axes = [f"time axis {self.seq_dim} ({self.axis_why})"] if self.seq_dim is not None else []
        if self.feature_dim != -1: axes.append(f"feature axis {self.feature_dim}")
        return (f"{self.kind.upper()} {self.name or '<model>'} ({where}): {self.coef_arg}={describe_coef(self.coef)}"
                f"{off}; {'; '.join(axes + [self.why])}")


_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)
_PREFIXES = ('module.', '_orig_mod.')  # what DDP / DataParallel and torch.compile put before every name


def unwrap_model(model: nn.Module) -> nn.Module:
    "The model inside `DistributedDataParallel` / `nn.DataParallel` wrappers and `torch.compile`."
    while True:
        if isinstance(model, _WRAPPERS): model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module): model = model._orig_mod
        else: return model


def fingerprint(model: nn.Module) -> tuple:
    "The identity of every module: a plan is kept while it holds (a module added, removed or swapped changes it)."
    return tuple(map(id, model.modules()))


# --- layouts --------------------------------------------------------------------------------------------
_STOCK_RNN = {nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward}
_STOCK_CELL = {nn.RNNCell.forward, nn.LSTMCell.forward, nn.GRUCell.forward}


def module_layout(module: nn.Module) -> tuple[int, bool, str] | None:
    "`(time axis, one step per call, why)` where the module's own forward makes it certain; None otherwise."
    fastai = fastai_layout(module)
    if fastai is not None:
        inner, axis = fastai
        if axis is not None: return axis, False, "fastai's text modules are batch-first"
        module = inner  # fastai's WeightDropout runs the RNN it wraps
    forward = type(module).forward
    if forward in _STOCK_RNN: return (1 if module.batch_first else 0), False, f"batch_first={module.batch_first}"
    if forward in _STOCK_CELL: return 1, True, "a cell: one step per call, joined in call order"
    return None


def _layout(read: Read, req: Request, module: nn.Module | None, seen: tuple | None = None,
            default: tuple | None = None):
    "Set `read`'s axes: the user's first, then what the forward showed (`seen`), the module's own, `default`."
    read.feature_dim = -1 if req.feature_dim is None else req.feature_dim
    if not KINDS[read.kind].needs_time: return read
    known = seen or (module_layout(module) if module is not None else None) or default
    if req.seq_dim is not None:
        read.seq_dim, read.axis_why, read.axes_given = req.seq_dim, f"seq_dim={req.seq_dim}, yours", True
        # a cell's calls have no time axis whatever the user says: each is a step, joined along `seq_dim`
        if known is not None and known[1]: read.steps, read.axis_why = True, f"{read.axis_why}; a cell's steps"
        return read
    if known is None and not may_be_on(read.coef): return None  # TAR off: nothing to ask for
    if known is None:
        what = type(module).__name__
        own = ' has a forward of its own' if isinstance(module, nn.RNNBase) else ' is not a module whose layout ' \
            'TARCallback knows (stock nn.RNN/LSTM/GRU and cells, fastai text modules)'
        raise ValueError(f"TARCallback cannot tell the time axis of {read.name} ({what})'s output for TAR: "
                         f"{what}{own}. "
                         "Pass seq_dim= (1: batch x time x features, 0: time x batch x features, 2 with feature_dim=1: "
                         "batch x features x time)")
    read.seq_dim, read.steps, read.axis_why = known
    return read


# --- which modules ---------------------------------------------------------------------------------------
def _lookup(model: nn.Module, spec, arg: str) -> tuple[str, nn.Module]:
    "`(name, module)` for a module or a name of `model.named_modules()`."
    named = dict(model.named_modules())
    if isinstance(spec, nn.Module):
        for n, m in named.items():
            if m is spec: return n, m
        raise ValueError(f"{arg}: the module {type(spec).__name__} is not part of the learner's model")
    key = spec
    while key not in named and key.startswith(_PREFIXES): key = key.split('.', 1)[1]
    if key in named: return key, named[key]
    some = ', '.join(repr(n) for n in list(named)[1:9])
    raise ValueError(f"{arg}: no module named {spec!r} in the model; names come from model.named_modules(), "
                     f"e.g. {some}")


def _with_coefs(places: list, coef, arg: str, what: str) -> list:
    "Pair each place with its coefficient: one per place from a list, else the same for all."
    if not isinstance(coef, (list, tuple)): return [(p, coef) for p in places]
    if len(coef) != len(places):
        raise ValueError(f"{arg} has {len(coef)} coefficients but TARCallback reads {len(places)} {what}: give one "
                         "per place, or a single number")
    return list(zip(places, coef))


def _named_reads(model, req: Request, kind: str, seen_layout) -> list[Read]:
    spec, arg = req.spec(kind), req.spec_arg(kind)
    coef = req.coef(kind)
    if isinstance(spec, dict) and arg == KINDS[kind].spec_arg: items = list(spec.items())  # its own coefficients
    else: items = _with_coefs(module_specs(spec), coef, KINDS[kind].coef_arg, f"module(s) named in {arg}")
    reads, seen = [], {}
    for s, c in items:
        name, module = _lookup(model, s, arg)
        if id(module) in seen:
            raise ValueError(f"{arg} names the module {name!r} twice ({describe_modules(seen[id(module)])} and "
                             f"{describe_modules(s)}): each module is read once")
        seen[id(module)] = s
        reads.append(_layout(Read(kind, name, module, c, 'named', 'named by you'), req, module, seen_layout(module)))
    return [r for r in reads if r is not None]


def _found_places(model, all_layers: bool) -> tuple[dict, str, tuple]:
    "`{kind: [(name, module)]}`, why, and the names of the other modules it could have read, from the structure"
    fastai = fastai_places(model, all_layers)
    if fastai is not None:
        tar, ar, why = fastai
        return {'tar': tar, 'ar': ar}, why, ()
    rnns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)] or \
        [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNCellBase)]
    if rnns:
        kind = 'RNN' if isinstance(rnns[0][1], nn.RNNBase) else 'RNN cell'
        deep = [n or type(m).__name__ for n, m in rnns if getattr(m, 'num_layers', 1) > 1]
        if all_layers and deep:
            raise ValueError(f"all_layers=True reads every layer, but {', '.join(deep)} is an {kind} module of several "
                             "layers, which returns the last layer's output only: build one module per layer and "
                             "pass all_layers=True (or name them in modules=), or use all_layers=False")
        places = rnns if all_layers else rnns[-1:]
        # the last of several is a choice the callback cannot be sure of: the plan names the others
        others = () if all_layers else tuple(n for n, _ in rnns[:-1])
        return {'tar': places, 'ar': places}, f"found: {'every' if all_layers else 'the last'} {kind} module", others
    raise NothingToRegularize(
        f"TARCallback found nothing to regularize in {type(model).__name__}: it looked for modules you named "
        "(modules=, ar_modules=), fastai's (logits, raw, dropped) output, fastai's text modules (AWD_LSTM, "
        "SentenceEncoder) and an nn.LSTM/GRU/RNN or its cell, and found none. Name the module(s) whose output is "
        "the activation to regularize, with names from model.named_modules() or the modules themselves: "
        "TARCallback(modules='encoder.rnn'), or modules=backbone with seq_dim=2, feature_dim=1 for a channels-first "
        "time-series backbone (batch x features x time).")


def module_reads(
    model: nn.Module,  # the learner's model
    req: Request,  # the user's arguments
    kinds: list,  # the kinds to read from modules
    packed: set = frozenset(),  # ids of the modules that returned a PackedSequence in the first training forward
) -> list[Read]:
    "The reads that need no forward but for the layout of a module that returns a PackedSequence."
    model = unwrap_model(model)
    seen_layout = lambda m: (1, False, "a PackedSequence, unpacked batch-first") if id(m) in packed else None
    reads = [r for k in kinds if req.spec(k) is not None for r in _named_reads(model, req, k, seen_layout)]
    unnamed = [k for k in kinds if req.spec(k) is None]
    if unnamed:
        places, why, others = _found_places(model, req.all_layers)
        for k in unnamed:
            for (name, module), c in _with_coefs(places[k], req.coef(k), KINDS[k].coef_arg, "layer(s)"):
                read = Read(k, name, module, c, 'found', why, others=others)
                reads.append(_layout(read, req, module, seen_layout(module)))
    return by_kind([r for r in reads if r is not None])


def _contract_reads(contract: Contract, req: Request, kinds: list) -> list[Read]:
    "AR of `dropped` and TAR of `raw`: the last layer, as fastai's RNNRegularizer, or each one (`all_layers`)"
    n = len(contract.raw)
    layers = list(range(n)) if req.all_layers else [n - 1]
    reads = []
    for k in kinds:
        base = KINDS[k].item_name
        for i, c in _with_coefs(layers, req.coef(k), KINDS[k].coef_arg, f"layer(s) of the model's {base} output"):
            producer = contract.producers[i]
            read = Read(k, f'{base}.{i}' if req.all_layers else base, None, c, 'contract',
                        "fastai's (logits, raw, dropped)", layer=i)
            # the layout of the RNN that returned raw; fastai's (batch-first) where no recurrent module did
            default = (1, False, "fastai's contract is batch-first") if producer is None else None
            reads.append(_layout(read, req, producer, default=default))
    return reads


@dataclass(eq=False)
class Plan:
    "The settled reads for one model, with what the model was when they were settled."
    reads: list
    contract: bool  # the first training forward returned fastai's (logits, raw, dropped) for certain
    request: Request  # the arguments it was settled for: changing one settles it again
    fingerprint: tuple
    model: Any = field(repr=False)  # a weak reference to the learner's model
    recurrent: list | None = field(default=None, repr=False)  # the model's recurrent modules, once looked up

    def holds_for(self, model, request: Request) -> bool:
        return self.model() is model and self.request == request and self.fingerprint == fingerprint(model)

    def __str__(self): return '\n'.join(map(repr, self.reads))


def settle(
    model: nn.Module,  # the learner's model
    req: Request,  # the user's arguments
    contract: Contract | None,  # the first training forward's output, when it is fastai's contract for certain
    packed: set = frozenset(),  # ids of the modules that returned a PackedSequence in that forward
) -> Plan:
    "The plan: the rule of this module's docstring."
    inner = unwrap_model(model)
    unnamed = [k for k in KINDS if req.spec(k) is None]
    classifier = is_fastai_classifier(inner)
    from_output = [] if contract is None or classifier else unnamed
    if from_output and req.all_layers and not contract.per_layer:
        if fastai_places(inner, False) is None:
            raise ValueError("all_layers=True reads each layer, but the model returns fastai's (logits, raw, dropped) "
                             "with single tensors (one layer) and has no AWD_LSTM whose layers could be read: use "
                             "all_layers=False, return per-layer lists, or name the modules in modules=")
        from_output = []  # an AWD_LSTM: its layers are hooked
    reads = module_reads(model, req, [k for k in KINDS if k not in from_output], packed)
    if from_output: reads = by_kind(reads + _contract_reads(contract, req, from_output))
    return Plan(reads, contract is not None, req, fingerprint(model), weakref.ref(model))


def watched_modules(model: nn.Module, req: Request) -> list:
    "The modules the plan may read, before it is settled: named ones, and those found from the structure"
    model = unwrap_model(model)
    named = [_lookup(model, s, req.spec_arg(k))[1] for k in KINDS for s in module_specs(req.spec(k))]
    try: found = [m for k in KINDS if req.spec(k) is None for _, m in _found_places(model, req.all_layers)[0][k]]
    except NothingToRegularize: found = []  # the output may be fastai's contract; else the error comes when settled
    return named + found


def describe_candidates(model: nn.Module, req: Request) -> str:
    "Before the first training forward: what the plan would read, with both candidates where the contract may apply"
    try: lines = [repr(r) for r in module_reads(model, req, list(KINDS))]
    except ValueError as e: lines = [f"nothing: {e}"]
    unnamed = [k for k in KINDS if req.spec(k) is None]
    classifier = is_fastai_classifier(unwrap_model(model))
    if not unnamed or req.contract is False or classifier: return '\n'.join(lines)
    every = 'every layer of ' if req.all_layers else ''
    head = [f"if the model's forward returns fastai's (logits, raw, dropped)"
            f"{' with per-layer lists' if req.all_layers else ''}:"]
    head += [f"  {k.upper()} {every}{KINDS[k].item_name} (output[{KINDS[k].item}]): "
             f"{KINDS[k].coef_arg}={describe_coef(req.coef(k))}" for k in unnamed]
    return '\n'.join(head + ["otherwise, found from the model's structure:"] + [f"  {line}" for line in lines])
