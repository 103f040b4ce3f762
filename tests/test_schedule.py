"""Coefficients as used (`fastai_tar.schedule`): numbers and fastai schedules of pct_train: their value at each batch, a
schedule that turns negative inside training, and how coefficients are described."""
import math

import numpy as np
import pytest
import torch
from fastai.callback.schedule import SchedCos, SchedExp, SchedLin, SchedNo, SchedPoly, combine_scheds

from fastai_tar.arguments import _check_coef as check_coef
from fastai_tar.schedule import coef_at, describe_coef

PCTS = [0., 0.1, 0.25, 0.5, 0.8, 0.999]


@pytest.mark.parametrize('coef, expected', [
    (2., lambda p: 2.),
    (3, lambda p: 3.),
    (SchedLin(0., 2.), lambda p: 2. * p),
    (SchedCos(1., 0.), lambda p: 1. - (1 - math.cos(math.pi * p)) / 2),
    (combine_scheds([0.25, 0.75], [SchedNo(0., 0.), SchedLin(0., 1.)]), lambda p: max(0., (p - 0.25) / 0.75)),
    (lambda p: 0.5 + p, lambda p: 0.5 + p),
    (lambda p: torch.tensor(p * 4.), lambda p: 4. * p),  # a 0-d tensor, as array-valued fastai schedules give
    (lambda p: np.float32(p), lambda p: float(np.float32(p))),
])
def test_value_at_pct_is_the_schedule(coef, expected):
    for p in PCTS:
        v = coef_at(coef, p, 'beta')
        assert type(v) is float
        assert v == pytest.approx(expected(p), rel=1e-6, abs=1e-7)


def test_schedule_negative_only_inside_training_rejected_when_used():
    dip = lambda p: abs(p - 0.5) - 0.1  # 0.4 at both ends, -0.1 at pct_train=0.5
    check_coef(dip, 'beta')  # the ends are fine
    assert coef_at(dip, 0.1, 'beta') == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"^beta must be .* got -0.1"): coef_at(dip, 0.5, 'beta')


def test_describe_coef_is_readable():
    assert describe_coef(2) == '2.0'
    assert describe_coef(0.5) == '0.5'
    assert describe_coef(SchedLin(0., 1.)) == 'SchedLin(0.0, 1.0)'
    assert describe_coef(SchedCos(2, 0)) == 'SchedCos(2, 0)'
    assert describe_coef(SchedExp(1., 2.)) == 'SchedExp(1.0, 2.0)'
    assert describe_coef(combine_scheds([0.5, 0.5], [SchedNo(0., 0.), SchedLin(0., 1.)])) == 'combine_scheds(...)'
    assert describe_coef(SchedPoly(0., 1., 2)) == 'SchedPoly(...)'
    assert describe_coef(lambda p: p) == 'lambda'

    def warmup(p): return min(1., 10 * p)
    assert describe_coef(warmup) == 'warmup'
    assert describe_coef([1, SchedLin(0., 2.)]) == '[1.0, SchedLin(0.0, 2.0)]'
    assert describe_coef({'0.rnns.0': 0.5}) == "{'0.rnns.0': 0.5}"
