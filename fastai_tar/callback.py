"`TARCallback`: AR and TAR of recurrent activations, added to a fastai learner's training loss."
import functools
from typing import Any

from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastcore.basics import PrettyString
from torch import Tensor

from .arg_docs import add_arg_docs
from .arguments import ALPHA, BETA, READ_ARGS, check_arguments, check_flags, check_mask_function, describe_arguments
from .fastai_interop import (FastaiRegularizerSwitch, autocast_state, batch_contract, batch_size, check_loss_input,
                             fit_running, in_validation_context, learner_forward, no_contract, restore_autocast,
                             rnn_callback_output)
from .functional import mean_of
from .hooks import TARHooks
from .plan import KINDS
from .reading import batch_mask
from .report import PenaltyReport, drop_columns, plot_history
from .schedule import may_be_on

__all__ = ['TARCallback']


def _cleans_up_on_error(event):
    """An event whose error ends the fit, where no after_fit of ours follows: take the hooks off, give fastai's
    regularizer back, and leave autocast as it was before MixedPrecision opened it for the batch"""
    @functools.wraps(event)
    def wrapped(self):
        try: return event(self)
        except BaseException:
            if self._autocast is not None: restore_autocast(self._autocast)
            self._recover()
            raise
    return wrapped


@add_arg_docs
class TARCallback(Callback):
    "Add `alpha`*AR and `beta`*TAR of recurrent activations to the training loss (Merity et al.)"
    # after_loss must add the penalty before `GradientAccumulation` rescales `loss_grad`; before_batch runs before
    # `MixedPrecision` opens autocast. Validation too: after_pred hands the loss the logits of fastai's contract there.
    order, run_valid = GradientAccumulation.order - 1, True
    # Per-fit state that `learn.export()` does not pickle, rebuilt by `_init_state`. What a fit changed on the learner
    # (`_switch`, `_columns`, `_fitting`) is pickled: a learner exported mid-fit gives it back at its first event.
    _stateattrs = ('hooks', '_report', '_batch', '_autocast')

    def __init__(self,
        alpha: Any = ALPHA,  # AR coefficient: a number >= 0, a schedule of `pct_train` (`SchedLin(0, 2)`), or a list
        beta: Any = BETA,  # TAR coefficient: a number >= 0, a schedule, or a list, one per TAR module or layer
        modules: Any = None,  # what TAR reads: None finds it; modules, `named_modules()` names, `Place`s, {place: beta}
        ar_modules: Any = None,  # what AR reads: None is the dropout of what TAR reads (else that tensor itself)
        all_layers: bool = False,  # read every layer found (fastai's per-layer lists, AWD_LSTM layers, each RNN)
        seq_dim: int | None = None,  # time axis of what is read (1 batch-first, 0 sequence-first); None: the module's
        feature_dim: int | None = None,  # feature axis of what is read (channels-first: 1, with seq_dim=2); None: last
        mask: Any = None,  # a function of the batch, `mask(xb, yb)`, giving a bool batch x time tensor, True where real
        valid_metrics: bool = False,  # also report unweighted AR/TAR of the validation activations (`valid_tar`)
        show_columns: bool = True,  # add the epoch means of the weighted terms to the fit table (`train_tar`)
        contract: bool | None = None,  # fastai's (logits, raw, dropped): None reads it where certain, True any 3-tuple
    ):
        seq_dim, feature_dim = check_arguments(alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim,
                                               contract)
        check_flags(valid_metrics=valid_metrics, show_columns=show_columns)
        check_mask_function(mask, "the batch, mask(xb, yb),", "lambda xb, yb: xb[0] != pad_idx")
        self.__dict__.update(alpha=alpha, beta=beta, modules=modules, ar_modules=ar_modules, all_layers=all_layers,
                             seq_dim=seq_dim, feature_dim=feature_dim, mask=mask, valid_metrics=valid_metrics,
                             show_columns=show_columns, contract=contract, learn=None)
        self.__dict__.update(_switch=FastaiRegularizerSwitch(), _columns=[], _fitting=False, _opened_here=False)
        self._init_state()

    def _init_state(self):
        self.__dict__.update(_report=PenaltyReport(), _batch={}, _autocast=None, hooks=TARHooks(
            None, *(self.__dict__[a] for a in READ_ARGS[:-1]), contract=self.contract, on_raise=self._on_raise,
            owner='TARCallback'))

    def __setattr__(self, name, value):
        if name == 'learn' and value is None and self.learn is not None: self._recover()  # `learn.remove_cb`
        if name.startswith('_') or name == 'learn': self.__dict__[name] = value  # no shadowing check per batch
        else: super().__setattr__(name, value)
        if name in READ_ARGS:  # read at the next training forward: one assigned mid-fit settles the plan again
            setattr(self.hooks, name, value)
            if self.hooks.is_open: self.hooks.prepare()

    def _recover(self):
        "Undo what a fit set up, also one that an exception or a Ctrl-C ended before after_fit"
        self.hooks.close()
        self._batch.clear()
        self._switch.restore()
        if self.learn is not None: drop_columns(self.learn, self._columns, fit_running(self.learn))
        self._columns, self._fitting = [], False

    def _on_raise(self, capture):
        "A forward that raised: no event of ours follows (fastai's loop has no `finally`)"
        capture.close(running=True)
        self._recover()

    # --- around fit ---------------------------------------------------------------------------------------
    def before_fit(self):
        if self._fitting and not fit_running(self.learn): self._recover()  # the last fit never reached after_fit
        if in_validation_context(self.learn):  # validate(), get_preds(), predict() keep the last fit's history
            self._opened_here = not self.hooks.is_open  # (inside a fit, its hooks are open already)
            if self._opened_here: self._open()
            return
        self._begin_fit()

    def _begin_fit(self, mid_fit: bool = False):
        # arguments assigned since construction (`learn.tar.beta = 5.`) are checked as the constructor checks them
        seq_dim, feature_dim = check_arguments(*(getattr(self, a) for a in READ_ARGS))
        self.hooks.seq_dim, self.hooks.feature_dim = seq_dim, feature_dim
        self._open()
        self._fitting, self._autocast = True, autocast_state()
        self._report.new_fit()
        self._switch.silence(self.learn)
        ours = [cb for cb in self.learn.cbs if isinstance(cb, TARCallback)]
        suffix = f'_{ours.index(self) + 1}' if self in ours and ours.index(self) else ''  # `train_tar_2`, ...
        on = [k for k in KINDS if may_be_on(getattr(self, KINDS[k].coef_arg))]
        if mid_fit:
            self.hooks.say_once('mid fit', "TARCallback was added during a fit: it regularizes from now on, and its "
                                "train_ar/train_tar columns start with the next fit (the table's header is printed)")
            self._report.before_train()
        else: self._columns = self._report.add_columns(self.learn, suffix, self.show_columns, self.valid_metrics, on)

    def _open(self):
        self.hooks.capture.accept = learner_forward(self.learn, self._recover)
        self.hooks.open(self.learn.model)

    def after_fit(self):
        self._batch.clear()
        if not in_validation_context(self.learn): self._recover()
        elif self._opened_here: self.hooks.close()

    # --- one batch: the forward's activations read in after_pred, the penalty added in after_loss ---------------
    @_cleans_up_on_error
    def before_batch(self):
        if not self._fitting and fit_running(self.learn): self._begin_fit(mid_fit=True)  # added from another callback
        if self.learn.model is not self.hooks.model and self.hooks.is_open: self._open()  # a model swapped in

    @_cleans_up_on_error
    def after_pred(self):
        learn, hooks = self.learn, self.hooks
        fwd, training = hooks.capture.forward, learn.training
        hooks.capture.forget()  # no activation is kept past this event but in the sums' graph
        output = fwd.output if fwd is not None else rnn_callback_output(learn, learn.pred)
        plan = hooks.plan or (None if training else hooks.borrow_plan())
        contract = None
        if isinstance(output, (tuple, list)):  # (a model's plain tensor output needs no call here: every batch)
            contract, why = batch_contract(output, learn.model, fwd, self.contract, plan, training, hooks.say_once)
            if contract is not None:  # the loss gets the logits, as with RNNCallback; as they stand now: a callback
                # ordered before ours may have changed them (a temperature)
                if isinstance(learn.pred, (tuple, list)): learn.pred = learn.pred[0]
            else: check_loss_input(learn.pred, learn.loss_func, why)
        if fwd is None: return
        if not training and (not self.valid_metrics or plan is None or in_validation_context(learn)): return
        if contract is None and plan is not None and plan.reads_output:
            return no_contract(output, training, hooks.say_once)
        mask = None if self.mask is None else batch_mask(self.mask, (learn.xb, learn.yb), {}, 'TARCallback(mask=...)',
                                                          'mask(xb, yb), xb and yb tuples')
        stats, coefs = hooks.sums(learn.pct_train, contract, None if plan else batch_size(learn), mask, plan, fwd)
        if plan is None: self._settled(plan := hooks.plan)
        self._batch.update(stats=stats, coefs=coefs, reads=plan.reads)

    @property
    def train_reads(self) -> list:
        "The reads that can train: those whose coefficient is not a plain 0"
        return [r for r in self.reads if may_be_on(self.hooks.coef_given(r))]

    def _settled(self, plan):
        "The plan was settled at this batch: report its reads, and check them against fastai's and our other callbacks"
        self._report.use(plan.reads, self.train_reads)
        self._switch.warn_if_places_differ(plan.reads)
        key = lambda r: (r.kind, id(r.module), r.layer, repr(r.call), repr(r.item))
        mine = {key(r) for r in self.train_reads}
        for cb in self.learn.cbs:
            if not isinstance(cb, TARCallback) or cb is self: continue
            both = [r for r in cb.train_reads if key(r) in mine]
            if both:
                raise ValueError(f"Two TARCallbacks read {both[0].kind.upper()} of {both[0].name!r}, so the penalty "
                                 f"would count twice: {cb!r} and {self!r}. Remove one (learn.remove_cb), or name other "
                                 "modules in modules= / ar_modules=")

    @_cleans_up_on_error
    def after_loss(self):
        if not self.learn.training or 'stats' not in self._batch: return
        stats, coefs, reads = self._batch['stats'], self._batch['coefs'], self._batch['reads']
        weighted, total = {}, None
        for r, c in zip(reads, coefs):  # (a loop, not a comprehension: this runs at every batch)
            if r in stats:
                w = weighted[r] = mean_of(*stats[r], c)
                total = w if total is None else total + w
        if total is not None:  # (fastai's losses are TensorBase, whose ops go through Python: added as a plain tensor)
            grad = self.learn.loss_grad
            self.learn.loss_grad = (grad.as_subclass(Tensor) + total).as_subclass(type(grad))
        self._report.record(self.learn.train_iter, self.learn.loss, weighted, coefs)

    def after_batch(self):
        if not self.learn.training and 'stats' in self._batch: self._report.add_valid(self._batch['stats'])
        cap = self.hooks.capture
        if cap.forward is not None or cap.calls is not None: cap.forget()  # a batch cancelled before after_pred
        self._batch.clear()  # in training the sums hold the graph, and so the activations

    # --- what the penalty did: fit-table columns, history, plot ----------------------------------------
    def before_train(self):
        if not self._fitting and fit_running(self.learn): self._begin_fit(mid_fit=True)
        self._report.before_train()

    def after_train(self): self._report.after_train()
    def before_validate(self): self._report.before_validate()

    @property
    def log(self):
        "The raw per-batch record (a `PenaltyHistory`) behind history"
        return self._report.log

    @property
    def history(self):
        "A DataFrame with one row per training batch of the last fit: iter, loss, ar, tar, alpha, beta"
        return self._report.frame()

    @property
    def reads(self) -> list:
        "The settled plan's reads (`plan.Read`), one per term and place; [] before the first training batch"
        return self.hooks.reads

    def plot(self, ax=None):
        "Plot the loss and the weighted AR/TAR terms of the last fit against iterations; returns the figure"
        return plot_history(self.history, ax)

    @property
    def places(self) -> str:
        "The plan: what each term reads, its axes and why; before the first training batch, what it will look for"
        if self.learn is None: return PrettyString("found when attached to a learner")
        if self.hooks.model is not self.learn.model: self.hooks.model = self.learn.model
        return PrettyString(self.hooks.places + ('\nmask: yours (mask=), and-ed with any padding the read module '
                                                 'gives' if self.mask is not None else ''))

    def __repr__(self):
        "One line, as fastai lists callbacks: the arguments given, then (attached) what is read."
        head = describe_arguments('TARCallback', **{a: getattr(self, a) for a in (*READ_ARGS, 'mask', 'valid_metrics',
                                                                                  'show_columns')})
        if self.learn is None: return head
        try: places = self.places
        except (ValueError, TypeError) as e: return f"{head}: cannot hook: {e}"
        lines = [l.strip() for l in places.splitlines()]  # (a heading line, ending in ':', runs on into the next)
        return f"{head}: {''.join(l + (' ' if l.endswith(':') else '; ') for l in lines)[:-2]}"
