"""Arguments that contradict each other or name a place twice fail, naming both arguments involved: at construction
where the arguments alone tell, at `fit` where only the model can (a module named both by name and as an object)."""
import re

import pytest
import torch
from torch import nn
from fastai.text.all import SGD, CrossEntropyLossFlat, Learner

from fastai_tar import TARCallback
from conftest import VOCAB, LossSpy, hook_ids, lm_dls, quiet_fit


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
