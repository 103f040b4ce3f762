"""`TARHooks`: AR and TAR of a model's activations in any training loop (plain PyTorch, Lightning, Hugging Face,
tsfast), with the plan, rules and errors of `TARCallback`, which is built on it. Torch only: no fastai import.

```python
with TARHooks(model, alpha=2., beta=1.) as tar:
    for x, y in batches:
        loss = loss_fn(model(x), y) + tar.penalty()
        loss.backward(); opt.step(); opt.zero_grad()
```
"""
import warnings
import weakref

import torch
from torch import Tensor, nn

from .arg_docs import add_arg_docs
from .arguments import ALPHA, BETA, READ_ARGS, check_arguments, check_mask_function, describe_arguments
from .capture import Capture
from .functional import mean_of
from .plan import KINDS, Plan, Request, fingerprint, structure, unwrap_model
from .reading import PlanBroken, batch_mask, checked_mask, gather, term_sums
from .schedule import coef_at, may_be_on
from .settle import describe_candidates, settle, settle_watch

__all__ = ['TARHooks']


@add_arg_docs
class TARHooks:
    """Hooks on `model` that find the activations AR and TAR read (`places`), and after each training forward give
    `penalty()`, the weighted sum to add to the loss. A context manager: the hooks are on inside `with`, or from
    `open()` to `close()`. A forward in `eval()` or without gradient gives a penalty of 0."""
    def __init__(self,
        model: nn.Module | None = None,  # the model whose forwards are read
        alpha=ALPHA,  # AR coefficient: a number >= 0, a schedule of the training's progress, or a list, one per place
        beta=BETA,  # TAR coefficient: a number >= 0, a schedule of the training's progress, or a list, one per place
        modules=None,  # what TAR reads: None finds it; module(s), `named_modules()` names, `Place`s, {place: beta}
        ar_modules=None,  # what AR reads: None is the dropout of what TAR reads, else TAR's tensor itself
        all_layers: bool = False,  # read every layer found (an AWD_LSTM's layers, each recurrent module)
        seq_dim: int | None = None,  # time axis of what is read (1 batch-first, 0 sequence-first); None: the module's
        feature_dim: int | None = None,  # feature axis of what is read (channels-first: 1); None: the last
        mask=None,  # a function of the forward's arguments giving a bool batch x time tensor, True where a step is real
        *,
        accept=None,  # called with the model at each forward: whether it counts (TARCallback's: the learner's own)
        on_raise=None,  # called when a forward raised
        contract: bool | None = None,  # fastai's (logits, raw, dropped): TARCallback's argument, read by the plan
        owner: str = 'TARHooks',  # what messages call the one who asked (TARCallback's hooks: 'TARCallback')
    ):
        seq_dim, feature_dim = check_arguments(alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim,
                                               contract)
        check_mask_function(mask, "the forward's arguments", "lambda tokens: tokens != pad_idx (a tensor goes to "
                            "penalty(mask=))")
        self.__dict__.update(alpha=alpha, beta=beta, modules=modules, ar_modules=ar_modules, all_layers=all_layers,
                             seq_dim=seq_dim, feature_dim=feature_dim, contract=contract, mask=mask, model=model)
        self.capture = Capture(accept, on_raise or (lambda cap: cap.forget()))
        self._plans = weakref.WeakKeyDictionary()  # model -> its Plan
        self._request, self._said, self._last_places, self.owner, self._trainer = None, set(), None, owner, None
        self._current = None  # the model's plan, checked against the arguments once: each batch reads it unchecked
        self.terms = {}  # the last penalty's weighted terms, detached: {'ar': ..., 'tar': ...}

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name in READ_ARGS or name == 'model':  # read at the next training forward
            object.__setattr__(self, '_request', None)
            object.__setattr__(self, '_current', None)

    # --- hooks on and off -------------------------------------------------------------------------------------
    def open(self,
        model: nn.Module | None = None,  # another model to read (the plan of each model is kept)
    ):
        "Put the hooks on the model; the next training forward settles the plan where it is not yet settled"
        if model is not None: self.model = model
        if self.model is None: raise ValueError("TARHooks has no model to hook: pass one")
        self.capture.open(self.model)
        self.prepare()
        return self

    def close(self):
        "Take every hook off"
        self.capture.close()

    def __enter__(self): return self.open()
    def __exit__(self, *exc): self.close()

    @property
    def is_open(self) -> bool: return self.capture.is_open

    @property
    def request(self) -> Request:
        if self._request is None:
            seq_dim, feature_dim = check_arguments(self.alpha, self.beta, self.modules, self.ar_modules,
                                                   self.all_layers, self.seq_dim, self.feature_dim, self.contract)
            object.__setattr__(self, '_request', Request.of(
                self.alpha, self.beta, self.modules, self.ar_modules, self.all_layers, seq_dim, feature_dim,
                self.contract, may_be_on))
        return self._request

    # --- the plan -----------------------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        "The settled plan of the model, while the arguments are those it was settled for; else None"
        if self._current is not None: return self._current
        plan = self._plans.get(self.model) if self.model is not None else None
        if plan is not None and plan.request != self.request: plan = self._drop()  # settled again, and said so
        self._current = plan
        return plan

    @property
    def reads(self) -> list:
        "The settled plan's reads (`plan.Read`), one per term and place; [] before the first training forward"
        plan = self.plan
        return [] if plan is None else plan.reads

    def coef_given(self, read):
        "The coefficient of `read` as given (a number or a schedule)"
        arg, key = read.coef
        c = getattr(self, arg)
        return c if key is None else c[key]

    def describe(self, reads) -> str:
        return '\n'.join(r.line(self.coef_given(r)) for r in reads)

    @property
    def places(self) -> str:
        "The plan: what each term reads, its axes and why; before the first training forward, what it will look for"
        plan = self.plan
        if plan is not None: return self.describe(plan.reads)
        if self.model is None: return "no model"
        return describe_candidates(self.model, self.request, {k: getattr(self, KINDS[k].coef_arg) for k in KINDS})

    def prepare(self):
        """Watch what the next forward needs: the plan's modules, or, where it must be settled, every candidate. Also
        drops a plan whose model's modules changed (a layer added, removed or swapped)."""
        plan = self.plan
        if plan is not None and plan.fingerprint != fingerprint(unwrap_model(self.model)): plan = self._drop()
        if self.capture.is_open:
            self.capture.watch(plan.watch if plan is not None else settle_watch(self.model, self.request))

    def _drop(self):
        self._last_places, self._current = str(self._plans.pop(self.model)), None
        return None

    def settle(self, fwd, contract=None, batch_size=None) -> Plan:
        "Settle the plan of the model from a training forward; warn where it reads elsewhere than before"
        plan = settle(self.model, self.request, fwd, contract, batch_size)
        self._plans[self.model] = self._current = plan
        if self._last_places is not None and str(plan) != self._last_places:
            warnings.warn(f"TARCallback: the model's modules (or the arguments) changed since its plan was settled, so "
                          f"it was settled again; it now reads:\n{self.describe(plan.reads)}", stacklevel=3)
        self._last_places = None
        for key, message in plan.notes: self.say_once(key, message)
        self.capture.watch(plan.watch)
        return plan

    def borrow_plan(self) -> Plan | None:
        """For a model without a plan (a copy swapped in for validation): the plan of a model of the same structure,
        read on this one by name, and kept as its plan"""
        if not self._plans: return None
        mine = structure(self.model)
        for model, plan in list(self._plans.items()):
            if plan.request == self.request and structure(model) == mine:
                self._plans[self.model] = self._current = plan.on(unwrap_model(self.model))
                if self.capture.is_open: self.capture.watch(self._current.watch)
                return self._current
        return None

    def say_once(self, key: str, message: str):
        if key in self._said: return
        self._said.add(key)
        warnings.warn(message.replace('TARCallback', self.owner), stacklevel=4)

    def _as_owner(self, e: Exception) -> Exception:
        "The messages of the plan and the reading name TARCallback's arguments; TARHooks takes the same ones"
        if self.owner != 'TARCallback' and e.args and isinstance(e.args[0], str):
            e.args = (e.args[0].replace('TARCallback', self.owner), *e.args[1:])
        return e

    # --- one forward ----------------------------------------------------------------------------------------------
    def sums(self,
        pct: float | None = None,  # training progress, where the coefficients are schedules (fastai's `pct_train`)
        contract=None,  # fastai's contract in this forward, where the plan reads it
        batch_size: int | None = None,  # the batch's size, where known
        mask: Tensor | None = None,  # the batch's bool batch x time mask
        plan: Plan | None = None,  # the plan to read by (default: the model's, settled at a training forward)
        fwd=None,  # the forward to read (default: the last one that counted)
    ) -> tuple[dict, list]:
        """`(stats, coefs)` of the forward: read -> (sum, count), and each read's coefficient. In training a read whose
        coefficient is 0 is not taken; outside it, every read is (validation metrics)."""
        fwd = fwd or self.capture.forward
        if fwd is None: return {}, []
        plan = plan or self.plan
        settling = plan is None
        if settling:
            if not fwd.training: return {}, []
            try: plan = self.settle(fwd, contract, batch_size)
            except (ValueError, TypeError, RuntimeError) as e: raise self._as_owner(e)
        coefs = []
        for r in plan.reads:  # (a loop, not a helper: this runs at every batch)
            arg, key = r.coef
            c = getattr(self, arg)
            if key is not None: c = c[key]
            if callable(c) and pct is None:
                raise ValueError(f"{r.coef_arg} is a schedule of the training's progress: pass penalty(pct=...), the "
                                 "share of training done, from 0 to 1")
            coefs.append(coef_at(c, pct, r.coef_arg) if callable(c) else float(c))
        # a TAR without a time axis is off (its coefficient was 0 when settled), also for the validation metrics
        reads = []
        for r, c in zip(plan.reads, coefs):  # (a loop, not a comprehension: this runs at every batch)
            if (c or not fwd.training) and (r.kind != 'tar' or r.seq_dim is not None): reads.append(r)
        missing = []
        try: parts = gather(reads, fwd, contract, mask, missing)
        except PlanBroken as e:
            raise RuntimeError(f"TARCallback's plan, settled at the first training forward, reads:\n{plan}\nbut {e}: "
                               "a model whose forward changes what it runs needs the places named (modules=, "
                               "ar_modules=, Place(call=)) so that each batch reads the same") from None
        except (ValueError, TypeError, RuntimeError) as e: raise self._as_owner(e)
        if missing:
            r = missing[0]
            self.say_once('valid calls', f"TARCallback(valid_metrics=True): {r.name} ({type(r.module).__name__}) did "
                          "not run in validation, so its validation penalty is not computed")
        if settling:  # a time axis of length 1: TAR has nothing to compare
            one = next((r for r, ps in parts.items() if r.kind == 'tar' and ps and
                        all(h.shape[sd] == 1 for h, _, sd in ps if sd is not None)), None)
            if one is not None:
                self.say_once('length 1', f"TARCallback reads TAR of {one.name} along time axis {one.seq_dim} "
                              f"({one.axis_why}), which has length 1 on the first training batch: TAR has nothing "
                              "to compare and adds 0. If time is another axis, pass seq_dim=")
        return term_sums(parts), coefs

    def penalty(self,
        mask: Tensor | None = None,  # bool batch x time, True where a step is real; default: `mask(*args)`, if given
        pct: float | None = None,  # training progress in [0, 1], where a coefficient is a schedule of it
    ) -> Tensor:
        "The weighted AR + TAR of the last forward, to add to the loss; 0 for a forward in eval() or without gradient"
        cap = self.capture
        fwd = cap.forward
        if fwd is None:
            raise RuntimeError("TARHooks.penalty(): no forward of the model since the last penalty() (or since the "
                               "hooks were put on): call it after the model's forward, once per forward")
        if cap.count > 1 or cap.count and not fwd.training:
            said = f"{cap.count} training forwards" if cap.count > 1 else "a training forward, then one in eval() or " \
                "without gradient,"
            cap.forget()
            raise RuntimeError(f"TARHooks.penalty(): the model ran {said} since the last penalty(), and which one to "
                               "regularize cannot be told: call penalty() after each training forward")
        weighted = {}  # (a forward in eval() or without gradient has nothing to regularize)
        try:  # (whatever is raised, the forward is forgotten: the next batch's penalty() reads the next forward)
            if fwd.training:
                if mask is not None: mask = checked_mask(mask, 'penalty(mask=)')
                elif self.mask is not None:
                    mask = batch_mask(self.mask, fwd.args, fwd.kwargs, f'{self.owner}(mask=...)',
                                      "mask(*args, **kwargs), with the model's forward arguments")
                stats, coefs = self.sums(pct, mask=mask)
                weighted = {r: mean_of(*stats[r], c) for r, c in zip(self.reads, coefs) if r in stats}
        finally: cap.forget()
        self.prepare()
        zero = torch.zeros((), device=_device(fwd.output))
        self.terms = {k: sum((w.detach() for r, w in weighted.items() if r.kind == k), zero) for k in KINDS}
        return sum(weighted.values(), zero)

    # tsfast 0.5's auxiliary losses, and loops like it: `Learner(..., aux_losses=[TARHooks(...)])`
    def setup(self, trainer):
        "Put the hooks on `trainer.model`, for the trainer's fit"
        self._trainer = trainer
        self.open(trainer.model)

    def teardown(self, trainer): self.close()

    def __call__(self, *_):
        "`penalty()`, at the trainer's `pct_train` where it has one: as a loss term `(pred, yb, xb) -> Tensor`"
        return self.penalty(pct=getattr(self._trainer, 'pct_train', None))

    def __repr__(self):
        head = describe_arguments(self.owner, **{a: getattr(self, a) for a in (*READ_ARGS, 'mask')})
        return f"{head}{': ' + '; '.join(map(repr, self.reads)) if self.reads else ''}"


def _device(output) -> torch.device:
    while isinstance(output, (tuple, list)) and output: output = output[0]
    return output.device if isinstance(output, Tensor) else torch.device('cpu')
