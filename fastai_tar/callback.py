"`TARCallback`: AR and TAR of hooked recurrent activations, added to a fastai learner's training loss."
import warnings
from functools import partial
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.rnn import RNNCallback, RNNRegularizer
from fastai.callback.training import GradientAccumulation
from fastai.text.models.core import SentenceEncoder
from fastcore.basics import PrettyString, store_attr

from .capture import ForwardCapture
from .columns import PenaltyColumn, column_layout
from .contract import OutputTarget, check_loss_input, output_sums, output_targets, read_contract, reads_output
from .functional import ar_sum_count, mean_of, tar_sum_count
from .history import PenaltyHistory, plot_history
from .schedule import coef_at, describe_coef
from .targets import COEF_ARG, check_arguments, describe_modules, find_targets, read_output

__all__ = ['TARCallback']

_SUM_COUNT = {'ar': ar_sum_count, 'tar': tar_sum_count}


class TARCallback(Callback):
    "Add `alpha`*AR and `beta`*TAR of hooked recurrent activations to the training loss (Merity et al.)"
    # after_loss must add the penalty before `GradientAccumulation` rescales `loss_grad`, and run in
    # validation too: after_pred strips fastai's (logits, raw, dropped) tuple there as well.
    order, run_valid = GradientAccumulation.order - 1, True
    # Per-batch and per-fit state: not pickled by `learn.export()`, rebuilt by `_init_state`.
    _stateattrs = ('_log', '_stats', '_capture', '_groups', '_valid_sums', '_columns')

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
        self.targets, self._silenced, self._warned, self._warned_places = [], [], False, False
        self._reads_output = None  # from the model's (logits, raw, dropped): unknown until a fit's first forward
        self._init_state()

    def _init_state(self):
        self._log, self._valid_sums, self._epoch_start, self._columns = PenaltyHistory(0), {}, None, []
        self._capture, self._groups, self._fresh = ForwardCapture(), [], False
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
            self._restore_fastai_regularizer()
            self._drop_columns(old)
        self.__dict__['_learn'] = learn

    # --- set-up and tear-down around fit ---------------------------------------------------------
    def _find(self):
        return find_targets(self.learn.model, self.alpha, self.beta, self.modules, self.ar_modules, self.all_layers)

    def before_fit(self):
        self._remove_hooks()
        self._drop_columns()  # a fit that raised never reached after_fit: drop the columns it left
        # `learn.validate()` and `get_preds()` send before_fit/after_fit too: they must keep the last fit's history.
        if self._in_validation_context(): return
        self._fresh = True
        # With no module named, a model returning (logits, raw, dropped) is read there: known at the first forward.
        self._reads_output = None if self.modules is None and self.ar_modules is None and self.contract is not False \
            else False
        self._no_places = None
        try: self._use(self._find())
        except ValueError as e:  # nothing to hook, but the model may return the contract: the first forward says
            if self._reads_output is False: raise
            self._no_places = e
            self._use(output_targets(self.alpha, self.beta, 1, False))
        self._epoch_start = None
        self._silence_fastai_regularizer()
        if self._reads_output is False: self._warn_if_places_differ()
        self._add_columns()

    def _use(self, targets):
        "Regularize `targets` from now on: at `before_fit`, or at the fit's first forward, before any row is logged."
        self.targets = targets
        # A zero coefficient adds nothing, so its module is hooked only for the validation metrics.
        self._train_targets = [t for t in self.targets if callable(t.coef) or t.coef != 0]
        # A new fit's history starts at its first training epoch, not here: `learn.summary()` sends before_fit too
        # (outside the lock). At a fit's first forward (the contract read) no row is logged yet: start it again.
        if not self._fresh: self._log = PenaltyHistory(len(self.targets))

    def after_fit(self):
        self._remove_hooks()
        self._clear_batch()
        if self._in_validation_context(): return
        self._restore_fastai_regularizer()
        self._drop_columns()

    def _in_validation_context(self) -> bool:
        "Inside `learn.validate()` / `get_preds()` / `predict()`: fastai holds the learner's lock there."
        # `gather_preds` is get_preds' GatherPredsCallback, a fallback for learners without the lock.
        locked = getattr(getattr(self.learn, 'lock', None), 'locked', None)
        return bool(locked and locked()) or hasattr(self.learn, 'gather_preds')

    def _silence_fastai_regularizer(self):
        "fastai's `TextLearner` adds `RNNRegularizer(alpha=2, beta=1)`: switch it off so the penalty counts once."
        for cb in self.learn.cbs:
            if isinstance(cb, RNNRegularizer) and (cb.alpha or cb.beta):
                if not any(c is cb for c, _ in self._silenced): self._silenced.append((cb, (cb.alpha, cb.beta)))
                cb.alpha = cb.beta = 0.
        if self._silenced and not self._warned:
            a, b = self._silenced[0][1]
            warnings.warn(f"TARCallback switches off fastai's RNNRegularizer(alpha={a}, beta={b}) during fit so that "
                          "AR/TAR is applied once; to silence this, create the learner with alpha=0, beta=0 "
                          "(language_model_learner(..., alpha=0., beta=0.)) or learn.remove_cb(RNNRegularizer)",
                          stacklevel=2)
            self._warned = True

    def _restore_fastai_regularizer(self):
        for cb, (a, b) in self._silenced: cb.alpha, cb.beta = a, b
        self._silenced = []

    def _add_columns(self):
        rec = getattr(self.learn, 'recorder', None)
        if rec is None: return
        kinds = lambda ts: [k for k in ('ar', 'tar') if any(t.kind == k for t in ts)]
        train_kinds = kinds(self._train_targets) if self.show_columns else []
        valid_kinds = kinds(self.targets) if self.valid_metrics else []
        if valid_kinds and not rec.valid_metrics:
            warnings.warn("TARCallback(valid_metrics=True) has no column to show: the Recorder logs no validation "
                          "metrics (Recorder(valid_metrics=False))", stacklevel=2)
        before, after = column_layout(train_kinds, valid_kinds, rec.train_metrics, rec.valid_metrics)
        # A second TARCallback (one per model part) gets columns of its own: `train_tar_2`, ...
        ours = [cb for cb in self.learn.cbs if isinstance(cb, TARCallback)]
        suffix = f'_{ours.index(self) + 1}' if self in ours and ours.index(self) else ''
        col = lambda name, kind, phase: PenaltyColumn(name + suffix, partial(self._column_value, kind, phase))
        before, after = [col(*c) for c in before], [col(*c) for c in after]
        self._columns = before + after
        self.learn.metrics = before + list(self.learn.metrics) + after

    def _drop_columns(self, learn=None):
        learn = learn or self.learn
        learn.metrics = [m for m in learn.metrics if not any(m is c for c in self._columns)]
        self._columns = []

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

    def _read_calls(self):
        "Sums and counts of each target over the calls of the forward that made `learn.pred`; then no hook is left."
        calls = self._capture.calls_for(self.learn.pred)
        self._remove_hooks()
        for call in calls:
            targets = self._groups[call.group]
            if self.training and torch.is_grad_enabled() and not call.grad_enabled:
                raise RuntimeError(
                    f"TARCallback: {targets[0].name or '<model>'} ({type(targets[0].module).__name__}) ran without "
                    "gradient inside the training forward, so the penalty could not train it. "
                    "torch.utils.checkpoint(..., use_reentrant=True) does this: use use_reentrant=False")
            # seq_dim is the user's word on the time axis of TAR's modules; AR has no time axis to check
            seq_dim = self.seq_dim if any(t.kind == 'tar' for t in targets) else None
            h, mask, sd = read_output(call.module, call.output, seq_dim)
            for t in targets:
                s, n = _SUM_COUNT[t.kind](h, mask, sd)
                if t in self._stats:  # a module called several times per forward: pool its calls into one mean
                    s0, n0 = self._stats[t]
                    s, n = s0 + s.to(s0.device), n0 + (n.to(s0.device) if isinstance(n, torch.Tensor) else n)
                self._stats[t] = (s, n)

    def _clear_batch(self):
        self._stats = {}

    # --- the penalty ---------------------------------------------------------------------------------
    def after_pred(self):
        if self._capture.handles: self._read_calls()  # before the tuple is stripped: it finds the forward by its output
        found = self._read_contract()
        if found is None: check_loss_input(self.learn.pred, self.learn.loss_func, self.contract)
        else: self.learn.pred = found.logits  # the loss sees the logits, as with fastai's RNNCallback
        if self._reads_output is None and not self._in_validation_context(): self._choose_places(found)
        if not self._reads_output: return
        if found is None:
            raise TypeError("TARCallback read AR/TAR from the model's (logits, raw, dropped) at the first batch, but "
                            "now the model returned something else; pass modules= / ar_modules= to hook modules")
        for t in self._capture_now(): self._stats[t] = output_sums(t, found)
    def _read_contract(self):
        "The batch's (logits, raw, dropped); fastai's RNNCallback, if kept, has already split it (last layer only)."
        if self.contract is False: return None
        rnn = next((cb for cb in self.learn.cbs if isinstance(cb, RNNCallback)), None)
        pred = self.learn.pred if rnn is None else (self.learn.pred, rnn.raw_out, rnn.out)
        return read_contract(pred, force=self.contract is True)

    def _choose_places(self, found):
        "At a fit's first forward: read the contract (no hooks from then on), or keep the hooked places."
        self._reads_output = found is not None and reads_output(self.learn.model, found, self.all_layers,
                                                                self.contract is True)
        if self._reads_output:
            self._use(output_targets(self.alpha, self.beta, len(found.raw), self.all_layers))
            self._clear_batch()  # the sums of this batch's hooks
        elif self._no_places is not None: raise self._no_places
        self._warn_if_places_differ()

    def _warn_if_places_differ(self):
        "The RNNRegularizer switched off would have read the last layer's dropped (AR) and raw (TAR) outputs."
        if not self._silenced or self._warned_places: return
        same = all(isinstance(t, OutputTarget) and t.name in ('raw', 'dropped') or isinstance(t.module, SentenceEncoder)
                   for t in self.targets)
        if same: return
        warnings.warn("TARCallback regularizes " + '; '.join(map(repr, self.targets)) + ", where the RNNRegularizer "
                      "it switches off would have used AR on the last layer's dropped output (output[2]) and TAR on its "
                      "raw output (output[1]): because of modules=, ar_modules= or all_layers=True", stacklevel=2)
        self._warned_places = True

    def after_loss(self):
        if not self.training: return
        missing = list(dict.fromkeys(t.name for t in self._train_targets if t not in self._stats))
        if missing: raise RuntimeError(self._not_called(missing))
        # The coefficients of all targets, zeros included, so that the history shows each one used.
        coefs = [coef_at(t.coef, self.pct_train, COEF_ARG[t.kind]) for t in self.targets]
        weighted = {t: c * mean_of(*self._stats[t]) for t, c in zip(self.targets, coefs) if t in self._stats}
        if weighted: self.learn.loss_grad = self.learn.loss_grad + sum(weighted.values())
        self._record(weighted, coefs)

    def after_batch(self):
        self._remove_hooks()  # still there if a callback cancelled the batch before the forward pass
        if not self.training and self._stats: self._add_valid()
        self._clear_batch()  # in training the sums hold the graph, and so the activations

    # --- what the penalty did: fit-table columns, history, plot ----------------------------------------
    def before_train(self):
        if self._fresh: self._log, self._fresh = PenaltyHistory(len(self.targets)), False
        self._epoch_start = len(self._log)

    def after_train(self): self._log.flush()  # one transfer per epoch: no per-batch tensor stays on the device

    def before_validate(self): self._valid_sums = {}

    def _record(self, weighted, coefs):
        "One history row, which also feeds the fit table's epoch means. No `.item()`: no device sync per batch."
        zero = self.learn.loss.new_zeros((), dtype=torch.float32)
        terms = torch.stack([weighted[t].detach().float() if t in weighted else zero for t in self.targets])
        self._log.add(self.train_iter, self.learn.loss, terms, coefs)

    def _add_valid(self):
        for t, (s, n) in self._stats.items():
            s0, n0 = self._valid_sums.get(t, (0., 0))
            self._valid_sums[t] = (s0 + s.detach(), n0 + n)

    def _column_value(self, kind, phase):
        "Epoch mean of the weighted training term, or the unweighted validation penalty; None where not computed."
        if phase is None: phase = 'train' if self.training else 'valid'  # the Recorder logs both phases
        if phase == 'train':
            idx = [i for i, t in enumerate(self.targets) if t.kind == kind and t in self._train_targets]
            means = None if self._epoch_start is None else self._log.term_means(self._epoch_start)
            return None if not idx or means is None else float(means[idx].sum())
        means = [mean_of(s, n) for t, (s, n) in getattr(self, '_valid_sums', {}).items() if t.kind == kind]
        return sum(means).item() if means else None

    @property
    def history(self):
        "A DataFrame with one row per training batch of the last fit: iter, loss, ar, tar, alpha, beta"
        return self._log.frame(self.targets)

    def plot(self, ax=None):
        "Plot the loss and the weighted AR/TAR terms of the last fit against iterations; returns the figure"
        return plot_history(self.history, ax)

    @property
    def places(self) -> str:
        "Where AR and TAR read, one term a line; before a fit's first forward with no module named, both candidates"
        if self.learn is None: return PrettyString("found when attached to a learner")
        try: found = self.targets if self._reads_output is not None else self._find()
        except ValueError as e: found, nothing = [], e
        lines = [repr(t) for t in found] or [f"nothing: {nothing}"]
        undecided = self._reads_output is None and self.modules is None and self.ar_modules is None
        if undecided and (self.contract or self.contract is None and
                          not any(isinstance(t.module, SentenceEncoder) for t in found)):
            every = 'every layer of ' if self.all_layers else ''
            lines = [f"if the model's forward returns fastai's (logits, raw, dropped)"
                     f"{' with per-layer lists' if self.all_layers else ''}:",
                     f"  AR {every}dropped (output[2]): alpha={describe_coef(self.alpha)}",
                     f"  TAR {every}raw (output[1]): beta={describe_coef(self.beta)}",
                     "otherwise, found from the model's structure:"] + [f"  {line}" for line in lines]
        return PrettyString('\n'.join(lines))

    def _not_called(self, missing) -> str:
        head = f"TARCallback hooked {missing} but the forward that made learn.pred did not call them"
        if any(hasattr(m, '_orig_mod') for m in self.learn.model.modules()):
            # dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards)
            return (f"{head}: learn.model is compiled (torch.compile) and its compiled code was traced before the "
                    "callback added its hooks, so it does not call them. Call torch.compiler.reset() before this fit, "
                    "or attach TARCallback before the compiled model's first forward")
        return f"{head}: pass modules= / ar_modules= naming modules that run in forward"

    def __repr__(self):
        "One line, as fastai lists callbacks: the arguments given, then (attached) what is hooked."
        given = [f"alpha={describe_coef(self.alpha)}", f"beta={describe_coef(self.beta)}"]
        given += [f"{k}={describe_modules(getattr(self, k))}" for k in ('modules', 'ar_modules')
                  if getattr(self, k) is not None]
        given += [f"{k}={getattr(self, k)!r}" for k, default in
                  (('all_layers', False), ('seq_dim', None), ('valid_metrics', False), ('show_columns', True))
                  if getattr(self, k) != default]
        head = f"TARCallback({', '.join(given)})"
        if self.learn is None: return head
        try: targets = self.targets or self._find()
        except (ValueError, TypeError) as e: return f"{head}: cannot hook: {e}"
        return f"{head}: {'; '.join(map(repr, targets))}"
