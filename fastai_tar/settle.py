"""How a plan is settled: at the first training forward, from what it showed (docs/places.md).

**One candidate, or ask.** Every choice (which module, which of its calls, which item of its output, which tensor AR
reads, which axis is time) is made only where exactly one candidate exists, and by identity (the tensor a module
received or returned in that forward), never by a name or a size. Where there are several, an error names each and
the argument that picks one; the one default the docs promise, the last of several recurrent modules, is said in a
warning. Per term:

1. **What.** The modules you name (`modules=` for TAR, `ar_modules=` for AR; a `Place` picks a call or an output
   item). Else fastai's `(logits, raw, dropped)` where the forward returns it for certain: TAR `raw`, AR `dropped`.
   Else TAR reads the recurrent module (torch's RNNs and cells, fastai's `AWD_LSTM` and classifier encoder) that is
   not inside another one; of several, the last. AR, unless named, reads the dropout whose input *is* what TAR
   reads; with none, what TAR reads (said once). `all_layers=True` reads each layer: the contract's per-layer lists,
   an `AWD_LSTM`'s layers, or every recurrent module.
2. **Which call.** A module run once per forward; or run several times where its calls are the steps of one
   sequence (each call's state argument *is* the previous call's state output: a decoder stepping), joined in call
   order; or the calls a `Place` picks. Calls without gradient are skipped in training.
3. **Which item.** The one its class defines (an RNN's `output`, a cell's `h`, fastai's modules' own), else the only
   float tensor of the output or `Place(item=)`.
4. **Axes.** `seq_dim=` / `feature_dim=` where you give them; a `seq_dim` that contradicts a layout the module's class
   makes certain is an error. Else the module's own layout (`module_facts.layout`), a `PackedSequence`'s (unpacked
   batch-first), or for the contract's `raw` that of the module that returned it, else fastai's batch-first, which a
   batch size it contradicts refuses. Else TAR asks for `seq_dim`; AR needs no time axis.
Torch only: fastai's own modules are known through `module_facts`, its contract through `plan.Contract`.
"""
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .module_facts import activation_item, fastai_class, first_tensor, is_dropout, is_recurrent, layout
from .plan import (KINDS, Contract, NothingToRegularize, Place, Plan, Read, Request, activation_groups, describe,
                   fingerprint, graded, module_specs, one_sequence, select_calls, sequences, unwrap_model,
                   watched)
from .schedule import describe_coef

__all__ = ['settle_watch', 'settle', 'describe_candidates']

_PREFIXES = ('module.', '_orig_mod.')  # what DDP / DataParallel and torch.compile put before every name


# --- what the settling forward showed --------------------------------------------------------------------------------
def _top_recurrent(model: nn.Module) -> list:
    "`(name, module)` of each recurrent module that is not inside another one, in declaration order"
    found, inside = [], set()
    for n, m in model.named_modules():
        if id(m) in inside: continue
        if is_recurrent(m):
            found.append((n, m))
            inside.update(id(s) for s in m.modules())
    return found


def _parents(model: nn.Module) -> dict:
    "id of each module -> (name, module) of the module that holds it"
    return {id(c): (n, m) for n, m in model.named_modules() for c in m.children()}


def settle_watch(model: nn.Module, req: Request) -> list:
    """The modules the settling forward is watched on: those named, every recurrent module and dropout, and the
    modules holding the named and recurrent ones (to tell why a module's hooks did not fire)"""
    model = unwrap_model(model)
    named = [_lookup(model, s, KINDS[k].spec_arg)[1] for k in KINDS for s in module_specs(req.spec(k))]
    some = named + [m for m in model.modules() if is_recurrent(m) or is_dropout(m)]
    parents = _parents(model)
    # the holders, but not the model itself (a hook on a compiled model's module is traced apart): where a module's
    # hooks do not fire, the model's own forward ran anyway
    some += [parents[id(m)][1] for m in some if id(m) in parents and parents[id(m)][1] is not model]
    return list({id(m): m for m in some}.values())


def _describe_calls(module, calls: list, sources: dict) -> str:
    """The calls of a module: its sequences of steps where it has several, else each call's input (named by the module
    that returned it, where a watched one did) and output; the first few"""
    seqs = sequences(module, calls)
    if len(seqs) < len(calls):
        index = {id(c): i for i, c in enumerate(calls)}
        return f"{len(seqs)} sequences of steps (calls " + '; '.join(
            ', '.join(str(index[id(c)]) for c in s) for s in seqs[:4]) + (', ...' if len(seqs) > 4 else '') + ')'
    def one(i, c):
        x = first_tensor(c[1]) if c[1] else None
        src = sources.get(id(x))
        inp = f"the output of {src}" if src else describe(x) if x is not None else 'no tensor'
        return f"call {i}: input {inp}, output {describe(c[3])}"
    return '; '.join(one(i, c) for i, c in enumerate(calls[:6])) + ('; ...' if len(calls) > 6 else '')


class _Seen:
    "What the settling forward showed: the calls of each watched module, and the names to say them by"
    def __init__(self, model, fwd, training: bool, compiled: bool = False):
        self.model, self.fwd, self.training, self.compiled = model, fwd, training, compiled
        self.names = {id(m): n for n, m in model.named_modules()}
        self.sources = {}  # id of a tensor a watched module returned -> "name (Class)"
        for c in fwd.calls:
            t = first_tensor(c[3])
            if isinstance(t, Tensor): self.sources.setdefault(id(t), self.say(c[0]))

    def say(self, module) -> str: return f"{self.names.get(id(module), '?')!r} ({type(module).__name__})"
    def calls(self, module) -> list: return graded(self.fwd.of(module), self.training)

    def why_silent(self, module, arg: str) -> str:
        "Why a module read has no call: a holder that ran called its forward directly, or the forward never called it"
        parents = _parents(self.model)
        holder = parents.get(id(module))
        while holder is not None and not self.fwd.of(holder[1]): holder = parents.get(id(holder[1]))
        if holder is not None and holder[1] is not self.model:
            return (f"it did not run through its hooks, though {self.say(holder[1])}, which holds it, "
                    f"ran: it calls the forward of {self.names[id(module)]!r} directly (`module.forward(...)`, "
                    f"as awd-lstm-lm's WeightDrop does), which skips forward hooks. Name {holder[0]!r} in {arg}= "
                    "instead (with seq_dim= for TAR: its layout is its own)")
        if self.compiled:  # dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards)
            return ("it did not run through its hooks: the model is compiled (torch.compile) and its compiled code was "
                    "traced before the callback added its hooks, so it does not call them. Call "
                    "torch.compiler.reset() before this fit, or attach TARCallback before the compiled model's first "
                    "forward")
        if self.fwd.of(module) and self.training:
            return ("it ran only without gradient in the training forward, so the penalty could not train it: "
                    "torch.no_grad() around it, or torch.utils.checkpoint(..., use_reentrant=True), which runs the "
                    "forward without gradient (use use_reentrant=False)")
        return f"the learner's forward did not call it: name modules that run in the forward in {arg}="


# --- layouts ---------------------------------------------------------------------------------------------------------
def _layout(read: Read, req: Request, known: tuple | None, maker: nn.Module | None = None) -> Read:
    """Set `read`'s axes from the user's, checked against `known` (the module's own); a TAR that is off and has no
    layout to go by keeps no time axis (it reads nothing; it may still be what AR's dropout is found by).
    `maker`: the module that made the output (default: the read's), for messages."""
    maker = maker if maker is not None else read.module
    what = type(maker).__name__ if maker is not None else 'output'
    read.feature_dim = -1 if req.feature_dim is None else req.feature_dim
    if req.seq_dim is not None:
        if known is not None and not known[1] and -3 <= req.seq_dim < 3 and known[0] != req.seq_dim % 3:
            what = 'PackedSequence' if 'PackedSequence' in known[2] else f"output ({what})"
            raise ValueError(
                f"seq_dim={req.seq_dim} contradicts the time axis of {read.name}'s {what}, which is {known[0]} "
                f"({known[2]}): leave seq_dim out, or name a module whose output has its time axis at "
                f"{req.seq_dim} in {KINDS[read.kind].spec_arg}=")
        read.seq_dim, read.axis_why, read.axes_given = req.seq_dim, f"seq_dim={req.seq_dim}, yours", True
        # a cell's calls have no time axis whatever the user says: each is a step, joined along `seq_dim`
        if known is not None and known[1]: read.steps, read.axis_why = True, f"{read.axis_why}; a cell's steps"
        return read
    if known is not None:
        read.seq_dim, read.steps, read.axis_why = known
        return read
    if KINDS[read.kind].needs_time and req.is_on(read.kind):
        own = ' has a forward of its own' if isinstance(maker, (nn.RNNBase, nn.RNNCellBase)) else \
            ' is not a module whose layout TARCallback knows (stock nn.RNN/LSTM/GRU and cells, fastai text modules)'
        raise ValueError(f"TARCallback cannot tell the time axis of {read.name} ({what})'s output for TAR: "
                         f"{what}{own}. Pass seq_dim= (1: batch x time x features, 0: time x batch x features, 2 "
                         "with feature_dim=1: batch x features x time)")
    return read


def _module_layout(read: Read, calls: list) -> tuple | None:
    packed = calls and isinstance(read.module, nn.Module) and isinstance(
        calls[0][3] if read.item is None else calls[0][3][read.item], PackedSequence)
    if packed: return 1, False, "a PackedSequence, unpacked batch-first"
    return layout(read.module)


# --- which modules ---------------------------------------------------------------------------------------------------
def _lookup(model: nn.Module, spec, arg: str) -> tuple[str, nn.Module]:
    "`(name, module)` for a module, a name of `model.named_modules()`, or a `Place` of either."
    if isinstance(spec, Place): spec = spec.module
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


def _coef_refs(req: Request, kind: str, n: int, what: str) -> list:
    "Where each of `n` places of `kind` finds its coefficient: one per place from a list, else the same for all"
    count = req.counts[list(KINDS).index(kind)]
    arg = KINDS[kind].coef_arg
    if count is None: return [(arg, None)] * n
    if count != n:
        raise ValueError(f"{arg} has {count} coefficients but TARCallback reads {n} {what}: give one per place, or "
                         "a single number")
    return [(arg, i) for i in range(n)]


def _item(read: Read, spec, calls: list, seen: _Seen, arg: str):
    "The item of the module's output that is read: yours, the class's, or the only float tensor in it"
    known = activation_item(read.module)
    given = spec.item if isinstance(spec, Place) else None
    out = calls[0][3]
    if given is not None:
        try: x = out[given]
        except (TypeError, IndexError, KeyError):
            raise ValueError(f"{arg}: Place(item={given!r}) of {seen.say(read.module)}, but its output is a "
                             f"{describe(out)}") from None
        if not (isinstance(x, PackedSequence) or isinstance(x, Tensor) and x.is_floating_point()):
            raise TypeError(f"{arg}: item {given!r} of {seen.say(read.module)}'s output is a {describe(x)}, not a "
                            "float tensor")
        return given, False
    if known is not None: return known
    if isinstance(out, (Tensor, PackedSequence)): return None, False
    items = out.items() if isinstance(out, dict) else enumerate(out) if isinstance(out, (tuple, list)) else ()
    found = [k for k, x in items if isinstance(x, PackedSequence) or isinstance(x, Tensor) and x.is_floating_point()]
    if len(found) == 1: return found[0], False
    if not found:
        raise TypeError(f"TARCallback cannot read the output of {seen.say(read.module)}, a {describe(out)}: name "
                        f"modules that return a float tensor, an (output, state) tuple or a PackedSequence in {arg}=")
    name = seen.names[id(read.module)]
    raise ValueError(f"{seen.say(read.module)} returns {len(found)} float tensors ({describe(out)}), and which one to "
                     f"read cannot be told: pick one with {arg}=Place({name!r}, item=...), one of {found}")


def _check_calls(read: Read, spec, calls: list, seen: _Seen, arg: str):
    "The calls of a module read: one, the steps of one sequence, or the ones you picked; else an error naming each"
    if not calls:
        raise RuntimeError(f"TARCallback reads {read.name} ({type(read.module).__name__}) but "
                           f"{seen.why_silent(read.module, arg)}")
    read.call = spec.call if isinstance(spec, Place) else None
    if read.call is not None:
        select_calls(read, calls)  # checks the choice against this forward
        return
    if not one_sequence(read.module, calls):
        raise ValueError(
            f"{seen.say(read.module)} ran {len(calls)} times in one forward, and its calls are not the steps of one "
            f"sequence: {_describe_calls(read.module, calls, seen.sources)}. Say which to read: "
            f"{arg}=Place({read.name!r}, "
            f"call=i) for call i, a list of them, or call='all' for each (TAR within each sequence)")


def _named_reads(model, req: Request, kind: str, seen: _Seen) -> list:
    k = KINDS[kind]
    specs = module_specs(req.spec(kind))
    refs = [(k.spec_arg, s) for s in specs] if req.dicts[list(KINDS).index(kind)] else \
        _coef_refs(req, kind, len(specs), f"module(s) named in {k.spec_arg}")
    reads, taken = [], {}
    for s, ref in zip(specs, refs):
        name, module = _lookup(model, s, k.spec_arg)
        if id(module) in taken and not isinstance(s, Place):
            raise ValueError(f"{k.spec_arg} names the module {name!r} twice ({taken[id(module)]!r} and {s!r}): each "
                             "module is read once")
        taken[id(module)] = s
        read = Read(kind, name, module, ref, 'named', 'named by you')
        calls = seen.calls(module)
        _check_calls(read, s, calls, seen, k.spec_arg)
        read.item, read.masked = _item(read, s, select_calls(read, calls), seen, k.spec_arg)
        reads.append(_layout(read, req, _module_layout(read, calls)))
    return reads


def _found_tar(model, req: Request, seen: _Seen) -> tuple[list, str, tuple]:
    "`(name, module)` places of TAR from the structure, why, and the other candidates where the last was taken"
    tops = _top_recurrent(model)
    if not tops:
        raise NothingToRegularize(
            f"TARCallback found nothing to regularize in {type(model).__name__}: it looked for modules you named "
            "(modules=, ar_modules=), fastai's (logits, raw, dropped) output, fastai's text modules (AWD_LSTM, "
            "SentenceEncoder) and an nn.LSTM/GRU/RNN or its cell, and found none. Name the module(s) whose output is "
            "the activation to regularize, with names from model.named_modules() or the modules themselves: "
            "TARCallback(modules='encoder.rnn'), or modules=backbone with seq_dim=2, feature_dim=1 for a "
            "channels-first time-series backbone (batch x features x time).")
    if not req.all_layers:
        others = tuple(n or type(m).__name__ for n, m in tops[:-1])
        last = tops[-1][1]
        why = "found: fastai's classifier encoder, with its padding mask" if (activation_item(last) or (0, 0))[1] \
            else "found: fastai's AWD_LSTM" if isinstance(last, fastai_class('AWD_LSTM') or ()) \
            else "found: the last RNN module"
        return tops[-1:], why, others
    if any(isinstance(m, fastai_class('SentenceEncoder') or ()) for _, m in tops):
        raise ValueError("all_layers=True needs the per-layer outputs of an AWD_LSTM, but a classifier's "
                         "SentenceEncoder joins its bptt chunks only at its output: use all_layers=False")
    deep = [n or type(m).__name__ for n, m in tops if getattr(m, 'num_layers', 1) > 1]
    if deep:
        raise ValueError(f"all_layers=True reads every layer, but {', '.join(deep)} is an RNN module of several "
                         "layers, which returns the last layer's output only: build one module per layer and pass "
                         "all_layers=True (or name them in modules=), or use all_layers=False")
    places, awd = [], fastai_class('AWD_LSTM') or ()
    for n, m in tops:  # fastai's AWD_LSTM: each of its layers
        places += [(f"{n + '.' if n else ''}rnns.{i}", r) for i, r in enumerate(m.rnns)] if isinstance(m, awd) else \
            [(n, m)]
    return places, "found: each layer of fastai's AWD_LSTM" if any(isinstance(m, awd) for _, m in tops) else \
        "found: every RNN module", ()


def _found_reads(model, req: Request, seen: _Seen) -> list:
    places, why, others = _found_tar(model, req, seen)
    reads = []
    for (name, module), ref in zip(places, _coef_refs(req, 'tar', len(places), 'layer(s)')):
        read = Read('tar', name, module, ref, 'found', why, others=others)
        calls = seen.calls(module)
        _check_calls(read, None, calls, seen, 'modules')
        read.item, read.masked = _item(read, None, calls, seen, 'modules')
        reads.append(_layout(read, req, _module_layout(read, calls)))
    return reads


def _one_call_each(dropout: nn.Module, name: str, tar_read, ids: dict, calls: list):
    "The dropout takes each tensor TAR reads once: where it takes one twice (Monte Carlo dropout), ask which call"
    took = {}
    for i, c in enumerate(calls):
        if c[1] and id(first_tensor(c[1])) in ids: took.setdefault(id(first_tensor(c[1])), []).append(i)
    twice = next((idx for idx in took.values() if len(idx) > 1), None)
    if twice is not None:
        raise ValueError(f"AR reads the dropout of the output of {tar_read.name!r}, and {name} "
                         f"({type(dropout).__name__}) takes that output {len(twice)} times in one forward (calls "
                         f"{', '.join(map(str, twice))}), each with a mask of its own: pick the call to read, "
                         f"ar_modules=Place({name!r}, call={twice[-1]}), or a list of calls to pool")


def _ar_of(tar_reads: list, req: Request, seen: _Seen, model) -> tuple[list, list]:
    "AR of each TAR read: the dropout whose input is what it reads, by identity; else what it reads (said once)"
    reads, notes = [], []
    refs = _coef_refs(req, 'ar', len(tar_reads), 'layer(s) for AR, one per place TAR reads')
    for t, ref in zip(tar_reads, refs):
        ids = activation_groups(t, seen.calls(t.module))
        takers = {}
        for c in seen.fwd.calls:
            if is_dropout(c[0]) and c[1] and id(first_tensor(c[1])) in ids: takers.setdefault(id(c[0]), c[0])
        if len(takers) > 1:
            names = ', '.join(seen.say(m) for m in takers.values())
            raise ValueError(f"AR reads the dropout of the output of {t.name!r}, and {len(takers)} dropouts take it "
                             f"({names}): name the one to read in ar_modules=")
        if takers:
            (module,) = takers.values()
            name = seen.names[id(module)]
            _one_call_each(module, name, t, ids, seen.calls(module))
            read = Read('ar', name, module, ref, t.source, f"{'found: ' if t.source == 'found' else ''}the dropout "
                        f"that takes the output of {t.name or '<model>'}", via=t,
                        seq_dim=t.seq_dim, axis_why=t.axis_why, axes_given=t.axes_given, steps=t.steps,
                        feature_dim=t.feature_dim)
        else:
            fastai = t.masked  # a fastai classifier: its own (logits, raw, dropped) has dropped = raw
            read = Read('ar', t.name, t.module, ref, t.source, t.why if fastai else
                        f"{t.why}; no dropout takes its output, so AR reads it raw",
                        item=t.item, masked=t.masked, call=t.call, seq_dim=t.seq_dim, axis_why=t.axis_why,
                        axes_given=t.axes_given, steps=t.steps, feature_dim=t.feature_dim, others=t.others)
            if not fastai and req.is_on('ar'):
                notes.append(('ar raw', f"TARCallback: no dropout module takes the output of {t.name!r} "
                              f"({type(t.module).__name__}), so AR reads it raw (Merity reads AR after the output "
                              "dropout): name the module to read in ar_modules=, or pass alpha=0 to leave AR out"))
        reads.append(read)
    return reads, notes


def _contract_reads(contract: Contract, req: Request, kinds: list, batch_size: int | None) -> list:
    "AR of `dropped` and TAR of `raw`: the last layer, as fastai's RNNRegularizer, or each one (`all_layers`)"
    n = len(contract.raw)
    layers = list(range(n)) if req.all_layers else [n - 1]
    reads = []
    for k in kinds:
        base = KINDS[k].item_name
        for i, ref in zip(layers, _coef_refs(req, k, len(layers), f"layer(s) of the model's {base} output")):
            producer = contract.producers[i]
            read = Read(k, f'{base}.{i}' if req.all_layers else base, None, ref, 'contract',
                        "fastai's (logits, raw, dropped)", layer=i)
            h = getattr(contract, base)[i]
            if producer is not None: known = layout(producer)  # the layout of the RNN that returned raw
            elif req.seq_dim is not None or h.dim() < 3: known = None  # your word; or no time axis to find
            elif batch_size is not None and h.shape[0] != batch_size:
                # fastai's contract is batch-first: a first axis that is not the batch refuses that
                raise ValueError(
                    f"TARCallback reads {k.upper()} from the model's {base} (output[{KINDS[k].item}]), a "
                    f"{describe(h)}, as fastai's batch-first (logits, raw, dropped), but its first axis is not the "
                    f"batch of {batch_size}: pass seq_dim= naming its time axis (0 for time x batch x features)")
            else: known = (1, False, "fastai's contract is batch-first")
            if known is None and KINDS[k].needs_time and req.seq_dim is None and h.dim() < 3 and req.is_on(k):
                raise ValueError(f"TARCallback reads TAR from the model's {base}, a {h.dtype} tensor "
                                 f"{tuple(h.shape)} without a time axis (fastai's contract is batch x time x "
                                 "features): set beta=0 to read AR only, pass seq_dim= naming its time axis, or "
                                 "return raw with a time axis")
            reads.append(_layout(read, req, known, producer))
    return reads


def settle(
    model: nn.Module,  # the model (DDP, DataParallel and compile wrappers are looked through)
    req: Request,  # what to read
    fwd,  # the settling forward (`capture.Forward`), watched on `settle_watch(model, req)`
    contract: Contract | None = None,  # fastai's contract, where that forward returned it and it is to be read
    batch_size: int | None = None,  # the batch's size, where known: refuses a batch-first guess it contradicts
) -> Plan:
    "The plan: the rule of this module's docstring."
    inner = unwrap_model(model)
    seen = _Seen(inner, fwd, fwd.training, any(hasattr(m, '_orig_mod') for m in model.modules()))
    # the contract's items, except where raw came from a module whose output carries the padding (fastai's classifier
    # encoder): that module is read instead, with its mask
    from_output = contract is not None and not any(p is not None and (activation_item(p) or (0, False))[1]
                                                    for p in contract.producers)
    if from_output and req.all_layers and not contract.per_layer:
        if not any(isinstance(m, fastai_class('AWD_LSTM') or ()) for m in inner.modules()):
            raise ValueError("all_layers=True reads each layer, but the model returns fastai's (logits, raw, dropped) "
                             "with single tensors (one layer) and has no AWD_LSTM whose layers could be read: use "
                             "all_layers=False, return per-layer lists, or name the modules in modules=")
        from_output = False  # an AWD_LSTM: its layers are read
    tar = _named_reads(inner, req, 'tar', seen) if req.modules is not None else \
        _contract_reads(contract, req, ['tar'], batch_size) if from_output else _found_reads(inner, req, seen)
    notes = []
    if req.ar_modules is not None: ar = _named_reads(inner, req, 'ar', seen)
    elif from_output: ar = _contract_reads(contract, req, ['ar'], batch_size)
    else: ar, notes = _ar_of([t for t in tar if t.module is not None], req, seen, inner)
    many = next((r for r in tar if r.others), None)
    if many is not None and req.modules is None:
        notes.append(('several', f"TARCallback found {len(many.others) + 1} recurrent modules and reads the last one, "
                      f"{many.name!r} ({', '.join(many.others)} too): name the one to read in modules= (or pass "
                      "all_layers=True to read each)"))
    reads = ar + tar
    return Plan(reads, req, contract is not None, fingerprint(inner),
                watched(reads, () if contract is None else contract.producers), notes,
                None if contract is None else contract.producers, any(r.module is None for r in reads))


def describe_candidates(
    model: nn.Module,  # the model, before its first training forward
    req: Request,  # what to read
    coefs: dict,  # kind -> its coefficient as given, for the lines
) -> str:
    "Before the first training forward: what the plan will read, as far as the model's structure says"
    inner = unwrap_model(model)
    unnamed = [k for k in KINDS if req.spec(k) is None]
    weight = lambda k: f"{KINDS[k].coef_arg}={describe_coef(coefs[k])}"
    lines = []
    if unnamed and req.contract is not False:
        lines += ["if the model's forward returns fastai's (logits, raw, dropped)"
                  f"{' with per-layer lists' if req.all_layers else ''}:"]
        lines += [f"  {k.upper()} {'every layer of ' if req.all_layers else ''}{KINDS[k].item_name} "
                  f"(output[{KINDS[k].item}]): {weight(k)}" for k in unnamed]
        lines.append("otherwise, found from the model's structure:")
    indent = '  ' if lines else ''
    for k in KINDS:
        spec = req.spec(k)
        if spec is not None:
            names = ', '.join(_lookup(inner, s, KINDS[k].spec_arg)[0] for s in module_specs(spec))
            lines.append(f"{indent}{k.upper()} {names}: {weight(k)}; named by you")
        elif k == 'ar':
            lines.append(f"{indent}AR the dropout that takes the output TAR reads, else that output: {weight(k)}")
        else:
            tops = _top_recurrent(inner)
            found = ', '.join(f"{n or '<model>'} ({type(m).__name__})" for n, m in
                              (tops if req.all_layers else tops[-1:])) or 'none found'
            lines.append(f"{indent}TAR {'each of ' if req.all_layers else 'the last RNN module, '}{found}: "
                         f"{weight(k)}" + (f" (of {len(tops)} recurrent modules)" if len(tops) > 1 and
                                           not req.all_layers else ''))
    return '\n'.join(lines + ["(settled at the first training batch)"])
