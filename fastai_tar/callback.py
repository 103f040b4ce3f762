"`TARCallback`: AR and TAR of recurrent activations, added to a fastai learner's training loss."
import functools
import operator
import sys
import warnings
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastcore.basics import PrettyString, store_attr

from .arg_docs import add_arg_docs
from .arguments import ALPHA, BETA, check_arguments, coef_objects, describe_modules
from .capture import ForwardCapture, read_item, read_tensors, term_sums
from .fastai_interop import (RECURRENT, FastaiRegularizerSwitch, certain_contract, check_loss_input, describe,
                             has_contract_form, rnn_callback_output)
from .functional import mean_of
from .history import plot_history
from .plan import KINDS, Request, describe_candidates, module_reads, settle, unwrap_model, watched_modules
from .reporting import PenaltyReport
from .schedule import coef_at, describe_coef, may_be_on

__all__ = ['TARCallback']

_AUTOCAST_DEVICES = ('cpu', 'cuda')


def _autocast_depth() -> int:
    "How many autocast windows are open (torch has no getter: one level up and back down)"
    depth = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return depth


def _autocast_state() -> tuple:
    "Everything an autocast window changes: per device enabled and dtype, the cache flag, the nesting depth"
    return ([(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES],
            torch.is_autocast_cache_enabled(), _autocast_depth())


def _restore_autocast(state: tuple):
    "Leave autocast as `_autocast_state` found it, as leaving the windows opened since would"
    devices, cache, depth = state
    for d, enabled, dtype in devices: torch.set_autocast_enabled(d, enabled); torch.set_autocast_dtype(d, dtype)
    torch.set_autocast_cache_enabled(cache)
    now = _autocast_depth()
    for _ in range(now - depth): torch.autocast_decrement_nesting()
    for _ in range(depth - now): torch.autocast_increment_nesting()
    if depth == 0 and now > 0: torch.clear_autocast_cache()


def _cleans_up_on_error(event):
    """An event whose error ends the fit, where no after_fit of ours follows: take the hooks off, give fastai's
    regularizer back, and leave autocast as it was before MixedPrecision opened it for the batch"""
    @functools.wraps(event)
    def wrapped(self):
        try: return event(self)
        except BaseException:
            if self._autocast is not None: _restore_autocast(self._autocast)
            self._recover()
            raise
    return wrapped


@add_arg_docs
class TARCallback(Callback):
    "Add `alpha`*AR and `beta`*TAR of recurrent activations to the training loss (Merity et al.)"
    # after_loss must add the penalty before `GradientAccumulation` rescales `loss_grad`; before_batch runs before
    # `MixedPrecision` opens autocast. Validation too: after_pred hands the loss the logits of fastai's contract there.
    order, run_valid = GradientAccumulation.order - 1, True
    # Per-batch and per-fit state: not pickled by `learn.export()`, rebuilt by `_init_state`.
    _stateattrs = ('_report', '_capture', '_plan', '_stats', '_coefs', '_autocast', '_groups', '_watched', '_pending',
                  '_said', '_batch_hooks')

    def __init__(self,
        alpha: Any = ALPHA,  # AR coefficient: a number >= 0, a schedule of `pct_train` (`SchedLin(0, 2)`), or a list
        beta: Any = BETA,  # TAR coefficient: a number >= 0, a schedule, or a list, one per TAR module or layer
        modules: Any = None,  # what TAR reads: None finds it; module(s), `named_modules()` names, or {module: beta}
        ar_modules: Any = None,  # what AR reads: None is the dropped output where one is found (else `modules`)
        all_layers: bool = False,  # read every layer found (fastai's per-layer lists, AWD_LSTM layers, each RNN)
        seq_dim: int | None = None,  # time axis of what TAR reads (1 batch-first, 0 sequence-first); None: the module's
        feature_dim: int | None = None,  # feature axis of what is read (channels-first: 1, with seq_dim=2); None: last
        valid_metrics: bool = False,  # also report unweighted AR/TAR of the validation activations (`valid_tar`)
        show_columns: bool = True,  # add the epoch means of the weighted terms to the fit table (`train_tar`)
        contract: bool | None = None,  # fastai's (logits, raw, dropped) output: None reads it where certain,
                                       # True reads any 3-tuple as it, False leaves tuples to the loss
    ):
        seq_dim, feature_dim = check_arguments(alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim,
                                               valid_metrics, show_columns, contract)
        store_attr()
        self._fastai_regularizer, self._fitting, self._opened_here = FastaiRegularizerSwitch(), False, False
        self._init_state()

    def _init_state(self):
        self._report, self._capture, self._plan = PenaltyReport(), ForwardCapture(), None
        self._pending = None  # why the plan must be settled again at the next training forward
        self._said = set()  # the one-off warnings given in this fit
        self._clear_batch()

    def _clear_batch(self):
        self._stats, self._coefs, self._autocast, self._groups, self._watched = {}, {}, None, {}, []
        self._batch_hooks = False  # hooks opened for this batch alone

    @property
    def request(self) -> Request:
        "The arguments, as the plan reads them: copies, so that a list or dict changed in place settles it again"
        own = lambda x: type(x)(x) if isinstance(x, (list, dict)) else x
        return Request(own(self.alpha), own(self.beta), own(self.modules), own(self.ar_modules), self.all_layers,
                       self.seq_dim, self.feature_dim, self.contract)

    @property
    def learn(self): return self.__dict__.get('_learn')

    @learn.setter
    def learn(self, learn):
        # `learn.remove_cb` sets None: after a fit that never reached after_fit this gives the learner back
        if learn is None and self.learn is not None: self._recover()
        self.__dict__['_learn'] = learn

    def _recover(self):
        "Undo what a fit set up, also one that an exception or a Ctrl-C ended before after_fit"
        self._capture.close()
        self._clear_batch()
        self._fastai_regularizer.restore()
        if self.learn is not None: self._report.drop_columns(self.learn)
        self._fitting = False

    # --- around fit ---------------------------------------------------------------------------------------
    def before_fit(self):
        if self._fitting and not _fit_running(self.learn): self._recover()  # the last fit never reached after_fit
        if self._in_validation_context():  # validate(), get_preds() and predict() keep the last fit's history
            self._opened_here = not self._capture.is_open  # (inside a fit, its hooks are open already)
            if self._opened_here: self._capture.open(self.learn, self._recover)
            return
        # arguments assigned since construction (`learn.tar.beta = 5.`) are checked as the constructor checks them
        self.seq_dim, self.feature_dim = check_arguments(
            self.alpha, self.beta, self.modules, self.ar_modules, self.all_layers, self.seq_dim, self.feature_dim,
            self.valid_metrics, self.show_columns, self.contract)
        self._capture.open(self.learn, self._recover)
        self._fitting, self._said = True, set()
        self._report.new_fit()
        if self._holding_plan() is not None: self._use_plan()
        elif self._plan is not None: self._drop_plan()
        self._fastai_regularizer.silence(self.learn.cbs)
        ours = [cb for cb in self.learn.cbs if isinstance(cb, TARCallback)]
        suffix = f'_{ours.index(self) + 1}' if self in ours and ours.index(self) else ''  # `train_tar_2`, ...
        on = [k for k in KINDS if may_be_on(self.request.coef(k))]
        self._report.add_columns(self.learn, suffix, self.show_columns, self.valid_metrics, on, list(KINDS))

    def after_fit(self):
        self._clear_batch()
        if not self._in_validation_context(): self._recover()
        elif self._opened_here: self._capture.close()

    def _in_validation_context(self) -> bool:
        "Inside `learn.validate()` / `get_preds()` / `predict()`: fastai holds the learner's lock there."
        locked = getattr(getattr(self.learn, 'lock', None), 'locked', None)
        return bool(locked and locked()) or hasattr(self.learn, 'gather_preds')

    # --- the plan ---------------------------------------------------------------------------------------
    def _holding_plan(self):
        "The plan, while the model's modules and the arguments are those it was settled for; else None"
        ok = self._plan is not None and self.learn is not None and self._plan.holds_for(self.learn.model, self.request)
        return self._plan if ok else None

    def _drop_plan(self):
        "The model's modules changed: settle again at the next training forward, and say so if it reads elsewhere"
        self._pending, self._plan = str(self._plan), None

    def _settle(self, contract, packed):
        self._plan = settle(self.learn.model, self.request, contract, packed)
        if self._pending is not None and str(self._plan) != self._pending:
            warnings.warn(f"TARCallback: the model's modules (or the callback's arguments) changed since its plan was "
                          f"settled, so it was settled again; it now reads:\n{self._plan}", stacklevel=2)
        self._pending = None
        many = next((r for r in self._plan.reads if r.others), None)
        if many is not None:
            warnings.warn(f"TARCallback found {len(many.others) + 1} recurrent modules and reads the last one, "
                          f"{many.name!r} ({', '.join(many.others)} too): name the one to read in modules= (or pass "
                          "all_layers=True to read each)", stacklevel=2)
        self._use_plan()
        self._fastai_regularizer.warn_if_places_differ(self._plan.reads, '; '.join(map(repr, self._plan.reads)))

    def _use_plan(self):
        self._report.use(self._plan.reads, self._train_reads())

    def _train_reads(self) -> list:
        "The reads that train: a zero coefficient adds nothing, so its read is kept for the validation metrics only"
        return [r for r in self._plan.reads if may_be_on(r.coef)]

    # --- one batch: hooks from before_batch to after_pred, the penalty in after_loss ---------------------------
    @_cleans_up_on_error
    def before_batch(self):
        self._clear_batch()
        if self.training:  # errors of a schedule come here, before MixedPrecision opens autocast
            self._coefs = {id(c): coef_at(c, self.pct_train, arg)
                           for c, arg in coef_objects(self.alpha, self.beta, self.modules, self.ar_modules)}
        self._autocast = _autocast_state()
        model = self.learn.model
        if self._plan is not None and self._holding_plan() is None: self._drop_plan()
        reads = self._reads_now()
        watched = [] if self.contract is False else self._recurrent_modules(model)
        if reads is None: watched += watched_modules(model, self.request)  # the plan is settled at this forward
        else: watched += [r.module for r in reads if r.module is not None]
        self._watched = list({id(m): m for m in watched}.values())
        self._groups = {id(m): i for i, m in enumerate(self._watched)}
        # A batch run without before_fit (`get_preds(inner=True)`) gets hooks for itself alone
        self._batch_hooks = not self._capture.is_open
        if self._batch_hooks: self._capture.open(self.learn, self._recover)
        self._capture.watch(self._watched)

    def _recurrent_modules(self, model) -> list:
        "The modules whose outputs can be fastai's `raw`, watched to tell its contract from other tuples"
        if self._plan is not None and self._plan.recurrent is not None: return self._plan.recurrent
        found = [m for m in unwrap_model(model).modules() if isinstance(m, RECURRENT)]
        if self._plan is not None: self._plan.recurrent = found  # kept while the plan holds: the same modules
        return found

    def _reads_now(self) -> list | None:
        "What this batch reads: None where the plan is still to be settled (the first training forward)"
        if self.training: return None if self._plan is None else self._train_reads()
        if not self.valid_metrics or self._in_validation_context() or self._plan is None: return []
        return self._plan.reads

    @_cleans_up_on_error
    def after_pred(self):
        fwd = self._capture.forward
        self._capture.forget()
        output = fwd.output if fwd is not None else rnn_callback_output(self.learn, self.learn.pred)
        contract, why_not = self._contract(output, fwd)
        if contract is not None:  # the loss gets the logits, as with RNNCallback; as they stand now: a callback
            # ordered before ours may have changed them (a temperature)
            if isinstance(self.learn.pred, (tuple, list)): self.learn.pred = self.learn.pred[0]
        else: check_loss_input(self.learn.pred, self.learn.loss_func, why_not)
        if self.training and self._plan is None:
            self._settle(contract, {id(self._watched[g]) for g in fwd.packed_groups()} if fwd else set())
        reads = self._reads_now()
        if not reads: return
        parts = {}
        for r in reads:
            if r.module is None:
                if contract is None: self._no_contract(r, output); continue
                parts[r] = read_item(r, getattr(contract, KINDS[r.kind].item_name)[r.layer])
                continue
            calls = [] if fwd is None else fwd.of(self._groups[id(r.module)])
            if not calls and self.training: raise RuntimeError(_not_called_message(r, self.learn.model))
            if not calls:
                if 'valid calls' not in self._said:
                    self._said.add('valid calls')
                    warnings.warn(f"TARCallback(valid_metrics=True): {r.name} ({type(r.module).__name__}) did not run "
                                  "in validation, so its validation penalty is not computed", stacklevel=3)
                continue
            parts[r] = read_tensors(r, calls, self.training)
        if self.training and 'first batch' not in self._said:
            self._said.add('first batch')
            self._warn_if_no_pairs(parts)
        self._stats = term_sums(parts)

    def _contract(self, output, fwd):
        "fastai's (logits, raw, dropped) when the output is it for certain, and why not otherwise"
        if not isinstance(output, (tuple, list)): return None, ''
        produced = {} if fwd is None else fwd.outputs_of(RECURRENT)
        # in training each forward shows where its items came from; outside it, the first training forward's decision
        # (before_batch dropped a plan that no longer holds)
        known = None if self.training or self._plan is None else self._plan.contract
        contract, why = certain_contract(output, unwrap_model(self.learn.model),
                                         {k: m for k, (m, _) in produced.items()}, self.contract, known)
        if self.training and contract is None and has_contract_form(output):
            if self._plan is not None and self._plan.contract:
                raise TypeError(f"TARCallback: the first training batch's output was fastai's (logits, raw, dropped) "
                                f"for certain, but this one's is not ({why}): return the same kind of output every "
                                "batch, or pass contract=True")
            if 'form' not in self._said:
                self._said.add('form')
                warnings.warn(f"TARCallback: the model's output has the form of fastai's (logits, raw, dropped), but "
                              f"{why}, so it goes to the loss as it is and AR/TAR read the modules found or named: see "
                              "learn.tar.places. Pass contract=True if it is fastai's contract", stacklevel=3)
        if contract is not None:  # each raw as it left its RNN: an in-place op since then would change TAR
            for raw, p in zip(contract.raw, contract.producers):
                if p is not None and produced[id(raw)][1] not in (None, raw._version):
                    raise RuntimeError(f"TARCallback reads TAR from the model's raw output, the output of "
                                       f"{type(p).__name__}, but it was changed in place after the module returned "
                                       "it: make that op out-of-place (`raw = raw + x`)")
        return contract, why

    def _no_contract(self, read, output):
        "A read of fastai's (logits, raw, dropped), on a forward that did not return it"
        if self.training:
            raise TypeError(f"TARCallback's plan reads {read.name} from the model's (logits, raw, dropped), settled at "
                            f"the first training batch, but this forward returned a {describe(output)}: return the "
                            "same kind of output every batch, or name the modules to read in modules= / ar_modules=")
        if 'valid' not in self._said:
            warnings.warn("TARCallback(valid_metrics=True): the model returns no (logits, raw, dropped) in validation, "
                          "so the validation penalty is not computed; name modules (modules=) to measure it there",
                          stacklevel=3)
            self._said.add('valid')

    def _warn_if_no_pairs(self, parts):
        for r, ps in parts.items():
            if KINDS[r.kind].needs_time and ps and all(h.shape[sd] == 1 for h, _, sd in ps):
                warnings.warn(f"TARCallback reads TAR of {r.name} along time axis {r.seq_dim} ({r.axis_why}), which "
                              "has length 1 on the first training batch: TAR has nothing to compare and adds 0. If "
                              "time is another axis, pass seq_dim=", stacklevel=3)
                return

    @_cleans_up_on_error
    def after_loss(self):
        if not self.training: return
        reads = self._plan.reads
        coefs = [self._coefs[id(r.coef)] for r in reads]  # zeros too, so that the history shows each one used
        weighted = {r: mean_of(*self._stats[r], c) for r, c in zip(reads, coefs) if r in self._stats}
        if weighted: self.learn.loss_grad = self.learn.loss_grad + functools.reduce(operator.add, weighted.values())
        self._report.record(self.train_iter, self.learn.loss, weighted, coefs)

    def after_batch(self):
        if self._batch_hooks: self._capture.close()
        self._capture.forget()  # a batch that a callback cancelled before after_pred left its forward
        if not self.training and self._stats: self._report.add_valid(self._stats)
        self._clear_batch()  # in training the sums hold the graph, and so the activations

    # --- what the penalty did: fit-table columns, history, plot ----------------------------------------
    def before_train(self): self._report.before_train()
    def after_train(self): self._report.after_train()
    def before_validate(self): self._report.before_validate()

    @property
    def log(self):
        "The raw per-batch record (a PenaltyHistory) behind history"
        return self._report.log

    @property
    def history(self):
        "A DataFrame with one row per training batch of the last fit: iter, loss, ar, tar, alpha, beta"
        return self._report.frame()

    @property
    def reads(self) -> list:
        "The settled plan's reads (`plan.Read`), one per term; [] before the first training batch"
        return [] if self._holding_plan() is None else self._plan.reads

    def plot(self, ax=None):
        "Plot the loss and the weighted AR/TAR terms of the last fit against iterations; returns the figure"
        return plot_history(self.history, ax)

    @property
    def places(self) -> str:
        "The plan: what each term reads, its axes and why; before the first training batch, the candidates"
        if self.learn is None: return PrettyString("found when attached to a learner")
        if self._holding_plan() is not None: return PrettyString(str(self._plan))
        return PrettyString(describe_candidates(self.learn.model, self.request))

    def __repr__(self):
        "One line, as fastai lists callbacks: the arguments given, then (attached) what is read."
        given = [f"alpha={describe_coef(self.alpha)}", f"beta={describe_coef(self.beta)}"]
        given += [f"{k}={describe_modules(getattr(self, k))}" for k in ('modules', 'ar_modules')
                  if getattr(self, k) is not None]
        given += [f"{k}={getattr(self, k)!r}" for k, default in
                  (('all_layers', False), ('seq_dim', None), ('feature_dim', None), ('valid_metrics', False),
                   ('show_columns', True), ('contract', None)) if getattr(self, k) != default]
        head = f"TARCallback({', '.join(given)})"
        if self.learn is None: return head
        try: reads = self.reads or module_reads(self.learn.model, self.request, list(KINDS))
        except (ValueError, TypeError) as e: return f"{head}: cannot hook: {e}"
        return f"{head}: {'; '.join(map(repr, reads))}"


def _fit_running(learn) -> bool:
    "A fit of `learn` is on the stack: `validate()` called from inside it must not undo the fit's set-up"
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is Learner._do_fit.__code__ and f.f_locals.get('self') is learn: return True
        f = f.f_back
    return False


def _not_called_message(read, model) -> str:
    head = f"TARCallback reads {read.name} ({type(read.module).__name__}) but the learner's forward did not call it"
    if any(hasattr(m, '_orig_mod') for m in model.modules()):
        # dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards)
        return (f"{head}: learn.model is compiled (torch.compile) and its compiled code was traced before the "
                "callback added its hooks, so it does not call them. Call torch.compiler.reset() before this fit, "
                "or attach TARCallback before the compiled model's first forward")
    return f"{head}: name modules that run in the forward in modules= / ar_modules="
