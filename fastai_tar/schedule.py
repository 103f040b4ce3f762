"AR/TAR coefficients: a number, or a schedule of training progress as fastai's `ParamScheduler` takes."
import math
from numbers import Real

__all__ = ['coef_at', 'describe_coef', 'may_be_on']


def coef_at(
    coef,  # a number, or a callable of `pct_train` (fastai's `SchedLin`, `SchedCos`, `combine_scheds`, ...)
    pct: float,  # training progress in [0, 1], fastai's `learn.pct_train`
    arg: str = 'coef',  # the argument's name, for the error message
) -> float:
    "The coefficient's value at `pct`, checked to be finite and non-negative."
    given = coef(pct) if callable(coef) else coef
    try: value = float(given)
    except (TypeError, ValueError): value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg} must be a finite number >= 0 or a schedule of pct_train such as SchedLin(0, 1), "
                         f"got {given!r}")
    return value


def may_be_on(coef) -> bool:
    "Whether a coefficient (or any of a list or dict of them) can be other than 0: a schedule always can"
    values = coef.values() if isinstance(coef, dict) else coef if isinstance(coef, (list, tuple)) else [coef]
    return any(callable(c) or c != 0 for c in values)


def describe_coef(coef) -> str:
    "A short readable form of a coefficient for `repr`: `2.0`, `SchedLin(0.0, 1.0)`, `combine_scheds(...)`."
    if isinstance(coef, dict): return '{' + ', '.join(f'{k!r}: {describe_coef(v)}' for k, v in coef.items()) + '}'
    if isinstance(coef, (list, tuple)): return '[' + ', '.join(describe_coef(c) for c in coef) + ']'
    if not callable(coef): return repr(float(coef)) if isinstance(coef, Real) else repr(coef)
    f = getattr(coef, 'f', None)  # fastai's `_Annealer`: `SchedLin(start, end)` keeps `f=sched_lin`
    if f is not None and hasattr(coef, 'start') and getattr(f, '__name__', '').startswith('sched_'):
        name = 'Sched' + f.__name__[len('sched_'):].capitalize()
        return f"{name}({coef.start!r}, {coef.end!r})"
    qual = getattr(coef, '__qualname__', None) or type(coef).__qualname__
    outer, _, inner = qual.rpartition('.<locals>.')
    if inner == '<lambda>': return 'lambda'
    # A private closure such as `combine_scheds`' `_inner` is best named by the function that built it.
    return f"{outer.split('.')[-1]}(...)" if outer and inner.startswith('_') else inner
