"""TARCallback's argument checks: bad coefficients and schedules, coefficient lists that do not match the modules,
contradicting arguments and places named twice fail, naming the arguments involved: at construction where the
arguments alone tell, at `fit` where only the model can (an unknown name, a module named both by name and as an
object)."""
import re

import pytest
import torch
from torch import nn
from fastai.text.all import SGD, CrossEntropyLossFlat, Learner, SchedLin

from fastai_tar import TARCallback

from conftest import LossSpy, VOCAB, hook_ids, lm_dls, quiet_fit
from models import CheckpointLM, VocabLSTMLM


@pytest.mark.parametrize('kw, names', [
    (dict(modules=['rnn', 'rnn']), ['modules']),
    (dict(ar_modules=['drop', 'drop']), ['ar_modules']),
    (dict(beta=5., modules={'rnn': 1.}), ['beta', 'modules']),
    (dict(beta=[1., 2., 3.], modules={'rnn': 1.}), ['beta', 'modules']),
    (dict(alpha=3., ar_modules={'drop': 1.}), ['alpha', 'ar_modules']),
    (dict(modules='rnn', all_layers=True), ['all_layers', 'modules']),
], ids=lambda v: ','.join(f'{k}={v[k]!r}' for k in v) if isinstance(v, dict) else '+'.join(v))
def test_duplicates_and_contradictions_fail_at_construction_naming_both(kw, names):
    with pytest.raises(ValueError) as e: TARCallback(**kw)
    for name in names: assert re.search(rf'\b{name}\b', str(e.value)), (name, str(e.value))


class LSTMLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.rnn = nn.Embedding(VOCAB, 8), nn.LSTM(8, 12, batch_first=True)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(12, VOCAB)

    def forward(self, x): return self.head(self.drop(self.rnn(self.emb(x))[0]))


@pytest.mark.parametrize('arg', ['modules', 'ar_modules'])
def test_a_module_named_by_name_and_as_an_object_fails_at_fit_naming_both(arg):
    model = LSTMLM()
    spy = LossSpy(stop=1)
    learn = Learner(lm_dls(n=4), model, loss_func=CrossEntropyLossFlat(), opt_func=SGD,
                    cbs=[TARCallback(**{arg: ['rnn', model.rnn]}), spy])
    with pytest.raises(ValueError, match=rf'\b{arg}\b') as e: quiet_fit(learn)
    assert 'rnn' in str(e.value).replace(arg, '')  # the module, beside the argument
    assert spy.added == [] and hook_ids(model) == set()  # before any penalty was added


# --- coefficients: numbers >= 0 or schedules, one per module where a list ------------------------------------------
@pytest.mark.parametrize('bad', [-1., float('nan'), float('inf'), 'big', None])
def test_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match='beta'): TARCallback(beta=bad)
    with pytest.raises(ValueError, match='alpha'): TARCallback(alpha=bad)


@pytest.mark.parametrize('kw, arg', [
    (dict(alpha=-1.), 'alpha'), (dict(beta=float('nan')), 'beta'), (dict(alpha='2'), 'alpha'),
    (dict(beta=SchedLin(1., -1.)), 'beta'), (dict(alpha=[1., -1.]), 'alpha'),
    (dict(modules={'0.rnns.0': -1.}), 'beta'), (dict(ar_modules={'1.output_dp': float('inf')}), 'alpha'),
])
def test_bad_coefficients_rejected_at_construction(kw, arg):
    with pytest.raises(ValueError, match=rf'^{arg} must be a finite number >= 0'): TARCallback(**kw)


def test_coefficient_errors_name_the_modules_and_empty_lists_fail_at_construction(book_dls):
    learn = Learner(book_dls, VocabLSTMLM(len(book_dls.vocab)), loss_func=CrossEntropyLossFlat(),
                    cbs=TARCallback(alpha=[1., 2.]))
    with pytest.raises(ValueError, match=r'alpha has 2 coefficients but TARCallback reads 1 layer'):
        quiet_fit(learn)
    for kw in (dict(alpha=[]), dict(beta=())):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}=.* has no coefficient"): TARCallback(**kw)


# --- other arguments checked at construction; names checked when the plan is settled --------------------------------
@pytest.mark.parametrize('kw, exc, msg', [
    (dict(modules=[]), ValueError, r"^modules=\[\] names no module: give a module, a name"),
    (dict(ar_modules={}), ValueError, r"^ar_modules=\{\} names no module"),
    (dict(modules=5), TypeError, r"^modules takes a module, a name from model.named_modules\(\).*; got int 5"),
    (dict(modules=['lstm', 2.]), TypeError, r"^modules takes .*; got float 2.0"),
    (dict(alpha={'lstm2': 2.}), TypeError, r"^alpha=\{'lstm2': 2.0\}: coefficients per module go in ar_modules="),
    (dict(beta={'lstm': 1.}), TypeError, r"^beta=.*go in modules="),
    (dict(alpha=[1., 2.], modules=['lstm']), ValueError, r"^alpha has 2 coefficients but modules names 1 modules"),
    (dict(seq_dim='a'), TypeError, r"^seq_dim takes an integer.*got str 'a'"),
    (dict(seq_dim=True), TypeError, r"^seq_dim takes an integer.*got bool True"),
    (dict(seq_dim=1.), TypeError, r"^seq_dim takes an integer.*got float 1.0"),
    (dict(all_layers='yes'), TypeError, r"^all_layers must be True or False, got 'yes'"),
])
def test_bad_arguments_fail_at_construction(kw, exc, msg):
    with pytest.raises(exc, match=msg): TARCallback(**kw)


def test_unknown_names_fail_in_before_fit_and_missing_modules_are_named_once():
    spy = LossSpy()
    learn = Learner(lm_dls(), CheckpointLM(), loss_func=CrossEntropyLossFlat(),
                    cbs=[TARCallback(ar_modules={'lstm2': 2.}), spy])
    with pytest.raises(ValueError, match=r"ar_modules: no module named 'lstm2'"): quiet_fit(learn)
    assert spy.rows == []
    model = CheckpointLM()
    model.unused = nn.LSTM(8, 8)
    learn = Learner(lm_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=TARCallback(modules='unused'))
    with pytest.raises(RuntimeError, match=r"TARCallback reads unused \(LSTM\) but the learner's forward did not call"):
        quiet_fit(learn)
