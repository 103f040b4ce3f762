"""What a plan is: the kinds of penalty (`KINDS`), what you ask for (`Request`, `Place`), what each term reads and how
(`Read`), the plan settled for one model (`Plan`), and the rule by which a read's calls are taken in a forward: the
one call, or the steps of one sequence, or the ones a `Place` picks (`sequences`, `select_calls`). How a plan is
settled is `fastai_tar.settle`'s. Torch only.
"""
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .module_facts import activation_item, state_tensors
from .schedule import describe_coef

__all__ = ['Kind', 'KINDS', 'Place', 'Request', 'Read', 'Contract', 'Plan', 'NothingToRegularize', 'module_specs',
           'unwrap_model', 'fingerprint', 'structure', 'describe', 'sequences', 'one_sequence', 'select_calls',
           'graded', 'activation_groups', 'watched']


@dataclass(frozen=True)
class Kind:
    "A penalty kind: the argument that weights it, the one that names its modules, its item of fastai's contract."
    name: str  # 'ar' or 'tar'
    coef_arg: str
    spec_arg: str
    item: int  # its item of fastai's (logits, raw, dropped)
    item_name: str
    needs_time: bool  # TAR compares consecutive steps; AR reads each element alone


KINDS = {'ar': Kind('ar', 'alpha', 'ar_modules', 2, 'dropped', False),
         'tar': Kind('tar', 'beta', 'modules', 1, 'raw', True)}


class NothingToRegularize(ValueError):
    "The model has no module that the plan knows to read, and its output is not fastai's contract."


@dataclass(frozen=True)
class Place:
    """A module to read, and which of its calls and which item of its output where it has several:
    `Place('drop', call=1)` reads the second call of `drop` in each forward, `Place('head', item=0)` the first item of
    `head`'s output, `Place('cell', call='all')` every call (each sequence of steps apart)."""
    module: Any  # a module of the model, or its name in `model.named_modules()`
    call: Any = None  # which call(s) of a module run more than once a forward: an index, a list of them, or 'all'
    item: Any = None  # which item of a tuple, list or dict output: an index or a key


def module_specs(spec) -> list:
    "The places a `modules=` / `ar_modules=` value gives, in order (a dict's keys)."
    return list(spec) if isinstance(spec, (list, tuple, dict)) else [] if spec is None else [spec]


@dataclass(frozen=True)
class Request:
    "What decides the reads: the places asked for, the axes, whether each term can be on, the coefficients' count."
    modules: Any  # `modules=` as `module_specs` gives it (a dict: its keys), or None
    ar_modules: Any
    all_layers: bool
    seq_dim: int | None
    feature_dim: int | None
    contract: bool | None
    on: tuple  # per kind in KINDS' order: its coefficient can be other than 0
    counts: tuple  # per kind: how many coefficients a list gives, None for one number or schedule
    dicts: tuple = (False, False)  # per kind: its modules came as a dict {place: coefficient}

    @classmethod
    def of(cls, alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim, contract, may_be_on):
        specs = lambda s: None if s is None else tuple(module_specs(s))
        count = lambda c: len(c) if isinstance(c, (list, tuple)) else None
        return cls(specs(modules), specs(ar_modules), all_layers, seq_dim, feature_dim, contract,
                   (may_be_on(ar_modules if isinstance(ar_modules, dict) else alpha),
                    may_be_on(modules if isinstance(modules, dict) else beta)),
                   (count(alpha), count(beta)), (isinstance(ar_modules, dict), isinstance(modules, dict)))

    def spec(self, kind: str): return self.ar_modules if kind == 'ar' else self.modules
    def is_on(self, kind: str) -> bool: return self.on[list(KINDS).index(kind)]


@dataclass(eq=False)
class Read:
    "One term's read: what it reads, how, where its coefficient comes from, and why."
    kind: str  # 'ar' or 'tar'
    name: str  # the module's name in `model.named_modules()`, or 'raw' / 'dropped' ('raw.0', ... per layer)
    module: nn.Module | None  # the module whose calls are read; None for an item of fastai's contract
    coef: tuple  # where its coefficient is: (argument, None | index of a list | key of a dict)
    source: str  # 'named' (by you), 'contract' (fastai's output) or 'found'
    why: str
    item: Any = None  # the item of the module's output that is read (None: all of it)
    masked: bool = False  # the output's item 1 is the padding (fastai's classifier encoder)
    call: Any = None  # the calls you picked (`Place(call=)`); None: the one call, or the steps of one sequence
    via: 'Read | None' = None  # AR of a dropout: the calls of `module` whose input is what `via` reads
    seq_dim: int | None = None  # the time axis; None where none is needed (AR) or known (TAR off)
    feature_dim: int = -1
    axis_why: str = ''
    axes_given: bool = False  # the time axis is the user's `seq_dim`
    steps: bool = False  # each call is one step without a time axis (a cell): the axis is inserted
    layer: int | None = None  # for the contract: the layer of its per-layer lists
    others: tuple = ()  # the other recurrent modules the structure offered

    @property
    def coef_arg(self) -> str: return KINDS[self.kind].coef_arg

    @property
    def where(self) -> str:
        if self.module is None: return f"output[{KINDS[self.kind].item}]"
        item = self.item is not None and activation_item(self.module) is None  # an item the class does not define
        return type(self.module).__name__ + (f", item {self.item!r}" if item else '') + \
            ('' if self.call is None else f", call {self.call!r}")

    def line(self, coef=None) -> str:
        "One line of `places`: what is read, with `coef` (its coefficient as given) where known, its axes and why"
        axes = [f"time axis {self.seq_dim} ({self.axis_why})"] if self.seq_dim is not None and self.kind == 'tar' \
            else []
        if self.feature_dim != -1: axes.append(f"feature axis {self.feature_dim}")
        weight = [] if coef is None else [f"{self.coef_arg}={describe_coef(coef)}" + (
            ' (off in training)' if not callable(coef) and coef == 0 else '')]
        return f"{self.kind.upper()} {self.name or '<model>'} ({self.where}): {'; '.join(weight + axes + [self.why])}"

    def __repr__(self): return self.line()


@dataclass
class Contract:
    "A forward's fastai `(logits, raw, dropped)`, with `raw` and `dropped` as lists of one tensor per layer."
    logits: Tensor
    raw: list
    dropped: list
    per_layer: bool  # the model returned lists (one tensor per layer), not single tensors
    producers: list  # per layer, the recurrent module whose output `raw` is in this forward (None where none is)


@dataclass(eq=False)
class Plan:
    "The settled reads for one model, and what they were settled for."
    reads: list
    request: Request
    contract: bool  # the reads take fastai's (logits, raw, dropped) from the output
    fingerprint: tuple
    watch: list = field(repr=False)  # the modules whose calls each forward needs
    notes: list = field(default_factory=list)  # (key, message): what to say once
    producers: list | None = None  # the contract's: per layer, the module that returned raw (None where none did)
    reads_output: bool = False  # a read takes an item of the contract, which each forward must return then

    def __str__(self): return '\n'.join(map(repr, self.reads))

    def on(self, model: nn.Module) -> 'Plan':
        "This plan on a model of the same structure (an EMA copy of it): each module read by its name there"
        named, moved = dict(model.named_modules()), {}
        def move(r):
            if r is not None and id(r) not in moved:
                moved[id(r)] = replace(r, module=None if r.module is None else named[r.name], via=move(r.via))
            return None if r is None else moved[id(r)]
        reads = [move(r) for r in self.reads]
        return Plan(reads, self.request, self.contract, fingerprint(model), watched(reads),
                    reads_output=self.reads_output)


def watched(
    reads: list,  # a plan's reads
    producers: list = (),  # the contract's producers of raw, where the plan reads the contract (None where none did)
) -> list:
    "The modules whose calls each forward needs, once each: those read, those AR's dropouts are found by, the producers"
    some = [r.module for r in reads if r.module is not None] + [r.via.module for r in reads if r.via is not None]
    return list({id(m): m for m in some + [p for p in producers if p is not None]}.values())


_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    "The model inside `DistributedDataParallel` / `nn.DataParallel` wrappers and `torch.compile`."
    while True:
        if isinstance(model, _WRAPPERS): model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module): model = model._orig_mod
        else: return model


def fingerprint(model: nn.Module) -> tuple:
    "The identity of every module: a plan holds while it does (a module added, removed or swapped changes it)."
    return tuple(map(id, model.modules()))


def structure(model: nn.Module) -> tuple:
    "Every module's name and class: a copy of a model (an EMA copy) has its structure, and the plan reads it alike"
    return tuple((n, type(m)) for n, m in unwrap_model(model).named_modules())


def describe(x) -> str:
    "A short description of an output for messages: `tuple of 2 (float32 tensor (4, 12, 30), list of 1 (...))`"
    if isinstance(x, Tensor): return f"{x.dtype} tensor {tuple(x.shape)}"
    if isinstance(x, PackedSequence): return "PackedSequence"
    if isinstance(x, dict):
        return f"{type(x).__name__} of {len(x)} ({', '.join(f'{k!r}: ' + describe(v) for k, v in x.items())})"
    if isinstance(x, (list, tuple)): return f"{type(x).__name__} of {len(x)} ({', '.join(map(describe, x))})"
    return type(x).__name__


# --- a read's calls in one forward -----------------------------------------------------------------------------------
def sequences(module: nn.Module, calls: list) -> list:
    """The calls as sequences: a call whose state argument *is* an earlier call's state output continues that call's
    sequence (a decoder stepping); every other call begins one. Calls on `nn.DataParallel`'s replicas (a call's
    `called` module) are shards of one call: each shard has sequences of its own. Each is a list of calls in order."""
    seqs, ends = [], {}  # (shard, id of a sequence's last state out) -> the sequence
    for c in calls:
        states = state_tensors(module, c[1], c[2], c[3])
        seq = None if states is None or states[0] is None else ends.pop((id(c[6]), id(states[0])), None)
        if seq is None: seqs.append(seq := [])
        seq.append(c)
        if states is not None and states[1] is not None: ends[(id(c[6]), id(states[1]))] = seq
    return seqs


def one_sequence(module: nn.Module, calls: list) -> bool:
    "Whether the calls are one call, or the steps of one sequence, on each shard"
    return len(sequences(module, calls)) == len({id(c[6]) for c in calls})


def select_calls(read: Read, calls: list) -> list:
    "The calls of `read` that `Place(call=)` picked, in call order"
    choice = read.call
    if choice is None or choice == 'all': return calls
    picks = [choice] if isinstance(choice, int) else list(choice) if isinstance(choice, (list, tuple)) else None
    if picks is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in picks):
        raise TypeError(f"Place(call=) takes a call's index, a list of them, or 'all'; got {choice!r}")
    if not all(-len(calls) <= i < len(calls) for i in picks):
        raise ValueError(f"{read.name!r} ran {len(calls)} times in this forward, so Place(call={choice!r}) picks a "
                         "call it did not make")
    return [calls[i] for i in sorted({i % len(calls) for i in picks})]


def _activation(call, item):
    out = call[3] if item is None else call[3][item]
    return out.data if type(out) is PackedSequence else out


def graded(calls: list, training: bool) -> list:
    """The calls that count: in training, those with gradient (a no-grad burn-in call is skipped, and `Place(call=)`
    counts among the rest)"""
    return [c for c in calls if c[5]] if training else calls


def activation_groups(read: Read, calls: list, training: bool = False) -> dict:
    """The tensors a module read takes from its calls (a PackedSequence's data), what AR's dropout must receive: the id
    of each -> the index of its call's sequence (`sequences`), so that the dropout's calls join as the read's do. In
    training, of the calls with gradient."""
    if len(calls) == 1 and read.call is None:  # the common case, without further calls: this runs at every batch
        return {id(_activation(calls[0], read.item)): 0} if calls[0][5] or not training else {}
    calls = graded(calls, training)
    if read.call is not None: calls = select_calls(read, calls)
    return {id(_activation(c, read.item)): i for i, seq in enumerate(sequences(read.module, calls)) for c in seq}
