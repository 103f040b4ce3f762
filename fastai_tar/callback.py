"`TARCallback`: AR and TAR of hooked recurrent activations, added to a fastai learner's training loss."
import weakref
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastcore.basics import PrettyString, store_attr

from .arg_docs import add_arg_docs
from .capture import ForwardCapture, call_sums, not_called_message
from .contract import OutputTarget, check_loss_input, output_sums, output_targets, reads_output
from .functional import mean_of
from .history import plot_history
from .places import FastaiRegularizerSwitch, describe_places, read_batch_contract
from .reporting import PenaltyReport
from .schedule import coef_at, describe_coef
from .targets import COEF_ARG, NothingToRegularize, check_arguments, describe_modules, find_targets

__all__ = ['TARCallback']


@add_arg_docs
class TARCallback(Callback):
    "Add `alpha`*AR and `beta`*TAR of hooked recurrent activations to the training loss (Merity et al.)"
    # after_loss must add the penalty before `GradientAccumulation` rescales `loss_grad`, and run in
    # validation too: after_pred strips fastai's (logits, raw, dropped) tuple there as well.
    order, run_valid = GradientAccumulation.order - 1, True
    # Per-batch and per-fit state: not pickled by `learn.export()`, rebuilt by `_init_state`.
    _stateattrs = ('_report', '_stats', '_batch_output', '_capture', '_groups', '_decided_for')

    def __init__(self,
        alpha: Any = 2.,  # AR coefficient: a number >= 0, a schedule of `pct_train` (`SchedLin(0, 2)`), or a list
        beta: Any = 1.,  # TAR coefficient: a number >= 0, a schedule, or a list, one per TAR module
        modules: Any = None,  # what TAR reads: None finds it; module(s), `named_modules()` names, or {module: beta}
        ar_modules: Any = None,  # what AR reads: None is the fastai LM's output dropout (else `modules`); same forms
        all_layers: bool = False,  # regularize every layer of a fastai `AWD_LSTM` (its `rnns`), not only the last
        seq_dim: int | None = None,  # time axis of custom TAR modules' outputs (default 1); nn.RNN's is read
        valid_metrics: bool = False,  # also report unweighted AR/TAR of the validation activations (`valid_tar`)
        show_columns: bool = True,  # add the epoch means of the weighted terms to the fit table (`train_tar`)
        contract: bool | None = None,  # fastai's (logits, raw, dropped) output: None recognises it, True reads any
                                       # 3-tuple as it, False leaves tuples to the loss (`fastai_tar.contract`)
    ):
        seq_dim = check_arguments(alpha, beta, modules, ar_modules, all_layers, seq_dim, valid_metrics, show_columns)
        if contract not in (None, True, False):
            raise TypeError(f"contract takes None (recognise fastai's (logits, raw, dropped)), True or False, got "
                            f"{contract!r}")
        store_attr()
        self.targets, self._fastai_regularizer = [], FastaiRegularizerSwitch()
        self._reads_output = None  # from the model's (logits, raw, dropped): unknown until a fit's first forward
        self._init_state()

    def _init_state(self):
        self._report, self._capture, self._groups = PenaltyReport(), ForwardCapture(), []
        self._decided_for = None  # a weak reference to the model the places were chosen for
        self._clear_batch()

    @property
    def learn(self): return self.__dict__.get('_learn')

    @learn.setter
    def learn(self, learn):
        # `learn.remove_cb` sets None. After a fit that raised (no after_fit) this is the last chance to
        # give fastai's RNNRegularizer its coefficients back and to take our columns out of the table.
        old = self.learn
        if learn is None and old is not None:
            self._remove_hooks()
            self._clear_batch()
            self._fastai_regularizer.restore()
            self._report.drop_columns(old)
        self.__dict__['_learn'] = learn

    # --- set-up and tear-down around fit ---------------------------------------------------------
    def _find(self):
        return find_targets(self.learn.model, self.alpha, self.beta, self.modules, self.ar_modules, self.all_layers)

    def before_fit(self):
        self._remove_hooks()
        self._report.drop_columns(self.learn)  # a fit that raised never reached after_fit: drop the columns it left
        # `learn.validate()` and `get_preds()` send before_fit/after_fit too: they must keep the last fit's history.
        if self._in_validation_context(): return
        self._report.new_fit()
        # The places are chosen once per model: a later fit, and `learn.summary()` (which sends before_fit outside
        # the lock), keep what the first one chose; a new `learn.model` is looked at afresh.
        if self._decided_for is not None and self._decided_for() is self.learn.model: self._use(self.targets)
        else: self._choose_candidates()
        self._fastai_regularizer.silence(self.learn.cbs)
        if self._reads_output is False: self._fastai_regularizer.warn_if_places_differ(self.targets)
        # A second TARCallback (one per model part) gets columns of its own: `train_tar_2`, ...
        ours = [cb for cb in self.learn.cbs if isinstance(cb, TARCallback)]
        suffix = f'_{ours.index(self) + 1}' if self in ours and ours.index(self) else ''
        self._report.add_columns(self.learn, suffix, self.show_columns, self.valid_metrics)

    def _choose_candidates(self):
        "The places found from the model's structure; with no module named, the first forward may pick the contract"
        self._decided_for = weakref.ref(self.learn.model)
        self._reads_output = None if self.modules is None and self.ar_modules is None and self.contract is not False \
            else False
        self._no_places = None
        try: self._use(self._find())
        except NothingToRegularize as e:  # nothing to hook, but the model may return the contract: its forward says
            if self._reads_output is False: raise
            self._no_places = e
            n_layers = max([len(c) for c in (self.alpha, self.beta) if isinstance(c, (list, tuple))], default=1)
            self._use(output_targets(self.alpha, self.beta, n_layers, self.all_layers))

    def _use(self, targets):
        "Regularize `targets` from now on: at `before_fit`, or at the fit's first forward, before any row is logged."
        self.targets = targets
        # A zero coefficient adds nothing, so its module is hooked only for the validation metrics.
        self._train_targets = [t for t in self.targets if callable(t.coef) or t.coef != 0]
        self._report.use(self.targets, self._train_targets)

    def after_fit(self):
        self._remove_hooks()
        self._clear_batch()
        if self._in_validation_context(): return
        self._fastai_regularizer.restore()
        self._report.drop_columns(self.learn)

    def _in_validation_context(self) -> bool:
        "Inside `learn.validate()` / `get_preds()` / `predict()`: fastai holds the learner's lock there."
        # `gather_preds` is get_preds' GatherPredsCallback, a fallback for learners without the lock.
        locked = getattr(getattr(self.learn, 'lock', None), 'locked', None)
        return bool(locked and locked()) or hasattr(self.learn, 'gather_preds')

    # --- hooks: from before_batch to after_pred; they keep outputs, the sums are taken in after_pred ----------
    def _capture_now(self):
        if self.training: return self._train_targets
        return self.targets if self.valid_metrics and not self._in_validation_context() else []

    def before_batch(self):
        self._remove_hooks()  # a batch that a callback cancelled before after_pred left them
        self._clear_batch()
        targets = [t for t in self._capture_now() if not isinstance(t, OutputTarget)]  # those are read in after_pred
        if not targets: return
        by_module = {}
        for t in targets: by_module.setdefault(t.module, []).append(t)
        self._groups = list(by_module.values())
        self._capture.start(self.learn.model, list(by_module))

    def _remove_hooks(self): self._capture.stop()

    def _clear_batch(self):
        self._stats, self._batch_output = {}, None

    # --- the penalty ---------------------------------------------------------------------------------
    def after_pred(self):
        if self._capture.handles:  # before the tuple is stripped: the forward is found by its output
            calls = self._capture.calls_for(self.learn.pred)
            self._remove_hooks()
            self._stats = call_sums(calls, self._groups, self.seq_dim, self.training and torch.is_grad_enabled())
        found = read_batch_contract(self.learn, self.contract)
        if found is None: check_loss_input(self.learn.pred, self.learn.loss_func, self.contract)
        else: self.learn.pred = found.logits  # the loss sees the logits, as with fastai's RNNCallback
        self._batch_output = found  # for a second TARCallback, which sees only the logits now
        if self._reads_output is None and not self._in_validation_context(): self._choose_places(found)
        targets = self._capture_now() if self._reads_output else []
        if not targets: return  # e.g. validation without valid_metrics: a model may return plain logits in eval
        if found is None:
            raise TypeError("TARCallback read AR/TAR from the model's (logits, raw, dropped) at the first batch, but "
                            "now the model returned something else; pass modules= / ar_modules= to hook modules")
        for t in targets: self._stats[t] = output_sums(t, found)

    def _choose_places(self, found):
        "At a fit's first forward: read the contract (no hooks from then on), or keep the hooked places."
        self._reads_output = found is not None and reads_output(self.learn.model, found, self.all_layers,
                                                                self.contract is True)
        if self._reads_output:
            self._use(output_targets(self.alpha, self.beta, len(found.raw), self.all_layers))
            self._stats = {}  # the sums of this batch's hooks
        elif self._no_places is not None: raise self._no_places
        self._fastai_regularizer.warn_if_places_differ(self.targets)

    def after_loss(self):
        if not self.training: return
        missing = list(dict.fromkeys(t.name for t in self._train_targets if t not in self._stats))
        if missing: raise RuntimeError(not_called_message(missing, self.learn.model))
        # The coefficients of all targets, zeros included, so that the history shows each one used.
        coefs = [coef_at(t.coef, self.pct_train, COEF_ARG[t.kind]) for t in self.targets]
        weighted = {t: c * mean_of(*self._stats[t]) for t, c in zip(self.targets, coefs) if t in self._stats}
        if weighted: self.learn.loss_grad = self.learn.loss_grad + sum(weighted.values())
        self._report.record(self.train_iter, self.learn.loss, weighted, coefs)

    def after_batch(self):
        self._remove_hooks()  # still there if a callback cancelled the batch before the forward pass
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

    def plot(self, ax=None):
        "Plot the loss and the weighted AR/TAR terms of the last fit against iterations; returns the figure"
        return plot_history(self.history, ax)

    @property
    def places(self) -> str:
        "Where AR and TAR read, one term a line; before a fit's first forward with no module named, both candidates"
        if self.learn is None: return PrettyString("found when attached to a learner")
        found, nothing = [], None
        try: found = self.targets if self._reads_output is not None else self._find()
        except ValueError as e: nothing = e
        undecided = self._reads_output is None and self.modules is None and self.ar_modules is None
        return describe_places(found, nothing, undecided, self.contract, self.all_layers, self.alpha, self.beta)

    def __repr__(self):
        "One line, as fastai lists callbacks: the arguments given, then (attached) what is hooked."
        given = [f"alpha={describe_coef(self.alpha)}", f"beta={describe_coef(self.beta)}"]
        given += [f"{k}={describe_modules(getattr(self, k))}" for k in ('modules', 'ar_modules')
                  if getattr(self, k) is not None]
        given += [f"{k}={getattr(self, k)!r}" for k, default in
                  (('all_layers', False), ('seq_dim', None), ('valid_metrics', False), ('show_columns', True),
                   ('contract', None))
                  if getattr(self, k) != default]
        head = f"TARCallback({', '.join(given)})"
        if self.learn is None: return head
        try: targets = self.targets or self._find()
        except (ValueError, TypeError) as e: return f"{head}: cannot hook: {e}"
        return f"{head}: {'; '.join(map(repr, targets))}"
