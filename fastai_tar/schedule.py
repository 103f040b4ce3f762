"AR/TAR coefficients: a number, or a schedule of training progress as fastai's `ParamScheduler` takes."
import math
from numbers import Real

__all__ = ['check_coef', 'coef_at']


def _bad(arg, value):
    return ValueError(f"{arg} must be a finite number >= 0 or a schedule of pct_train such as SchedLin(0, 1), "
                      f"got {value!r}")


def coef_at(
    coef,  # a number, or a callable of `pct_train` (fastai's `SchedLin`, `SchedCos`, `combine_scheds`, ...)
    pct: float,  # training progress in [0, 1], fastai's `learn.pct_train`
    arg: str = 'coef',  # the argument's name, for the error message
) -> float:
    "The coefficient's value at `pct`, checked to be finite and non-negative."
    value = coef(pct) if callable(coef) else coef
    try: value = float(value)
    except (TypeError, ValueError): raise _bad(arg, value) from None
    if not math.isfinite(value) or value < 0: raise _bad(arg, value)
    return value


def check_coef(coef, arg: str):
    "Reject a bad coefficient (or any bad one of a list or dict) when it is given, not at the first batch."
    values = coef.values() if isinstance(coef, dict) else coef if isinstance(coef, (list, tuple)) else [coef]
    for c in values:
        if isinstance(c, bool) or not (callable(c) or isinstance(c, Real)): raise _bad(arg, c)
        coef_at(c, 0., arg)
