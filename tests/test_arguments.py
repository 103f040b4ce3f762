"""Argument checks alone (`fastai_tar.arguments`): coefficients (numbers >= 0, schedules tried at both ends of
training, lists and dicts of them), axes (any integer, never a bool or a float), module specs, and the checks of
`check_arguments` that need no model, each naming the arguments involved."""
import numpy as np
import pytest
import torch
from torch import nn
from fastai.callback.schedule import SchedCos, SchedLin

from fastai_tar.arguments import (ALPHA, BETA, _check_coef as check_coef, check_arguments, check_axis, check_flags,
                                  describe_modules)
from fastai_tar.plan import Place, module_specs


# --- coefficients ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bad', [-1., -1e-9, float('nan'), float('inf'), '2', None, True, object()])
def test_bad_numbers_rejected_naming_the_argument(bad):
    with pytest.raises(ValueError, match=r'^alpha must be a finite number >= 0 or a schedule'):
        check_coef(bad, 'alpha')


@pytest.mark.parametrize('sched', [SchedLin(1., -1.), SchedCos(-1., 1.), lambda p: float('nan'), lambda p: 'x',
                                   lambda p: -p])
def test_schedule_negative_or_not_a_number_at_either_end_rejected_when_given(sched):
    with pytest.raises(ValueError, match='beta'): check_coef(sched, 'beta')


def test_lists_and_dicts_check_every_coefficient():
    check_coef([0., 1., SchedLin(0., 2.)], 'alpha')
    check_coef({'0.rnns.0': 0.5, 'x': SchedCos(1., 0.)}, 'beta')
    with pytest.raises(ValueError, match='alpha'): check_coef([1., -2.], 'alpha')
    with pytest.raises(ValueError, match='beta'): check_coef({'a': 1., 'b': float('inf')}, 'beta')
    with pytest.raises(ValueError, match='beta'): check_coef({'a': SchedLin(0., -1.)}, 'beta')


def test_defaults_equal_fastais_and_are_told_apart_from_the_same_numbers():
    assert ALPHA == 2. and BETA == 1. and repr(ALPHA) == '2.0'
    args = dict(alpha=2., ar_modules=None, all_layers=False, seq_dim=None, feature_dim=None, contract=None)
    check_arguments(beta=BETA, modules={'rnn': 1.}, **args)  # the default beta: the dict gives the coefficients
    with pytest.raises(ValueError, match=r"^beta=1.0 and modules=\{'rnn': 1.0\} both give the coefficients"):
        check_arguments(beta=1., modules={'rnn': 1.}, **args)


def test_flags_are_true_or_false():
    check_flags(valid_metrics=True, show_columns=False)
    with pytest.raises(TypeError, match=r"^show_columns must be True or False, got 1"): check_flags(show_columns=1)


# --- axes and module specs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('value, expected', [(None, None), (1, 1), (-2, -2), (np.int64(2), 2), (torch.tensor(0), 0)],
                         ids=['None', 'int', 'negative', 'numpy', 'tensor'])
def test_check_axis_takes_any_integer(value, expected):
    got = check_axis(value, 'seq_dim')
    assert got == expected and (got is None or type(got) is int)


@pytest.mark.parametrize('bad', [True, 1.0, torch.tensor(1.), '1', [1]],
                         ids=['bool', 'float', 'float tensor', 'str', 'list'])
def test_check_axis_refuses_what_is_not_an_integer(bad):
    with pytest.raises(TypeError, match=r'^feature_dim takes an integer axis'): check_axis(bad, 'feature_dim')


def test_check_arguments_returns_python_int_axes_and_refuses_one_axis_for_both():
    args = dict(alpha=2., beta=1., modules=None, ar_modules=None, all_layers=False, contract=None)
    assert check_arguments(seq_dim=np.int64(2), feature_dim=torch.tensor(1), **args) == (2, 1)
    with pytest.raises(ValueError, match=r'^seq_dim=1 and feature_dim=1 name the same axis'):
        check_arguments(seq_dim=1, feature_dim=1, **args)


def test_module_specs_and_their_description():
    lstm = nn.LSTM(2, 2)
    assert module_specs(None) == [] and module_specs('rnn') == ['rnn'] and module_specs(lstm) == [lstm]
    assert module_specs(['a', lstm]) == ['a', lstm] and module_specs({'a': 1., lstm: 2.}) == ['a', lstm]
    assert describe_modules('rnn') == "'rnn'" and describe_modules(['a', lstm]) == "['a', LSTM]"
    assert describe_modules({'a': 1., lstm: SchedCos(1., 0.)}) == "{'a': 1.0, LSTM: SchedCos(1.0, 0.0)}"
    assert describe_modules([Place('drop', call=1), 'rnn']) == "[Place(module='drop', call=1, item=None), 'rnn']"
    check_arguments(1., 1., [Place('drop', call=1), Place(lstm, item=0)], None, False, None, None)
    with pytest.raises(TypeError, match=r"modules takes a module, a name from model.named_modules\(\), a Place"):
        check_arguments(1., 1., Place(3), None, False, None, None)
