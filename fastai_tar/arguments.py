"""Every check of `TARCallback`'s arguments, in one place: what can be told without a model fails at construction,
naming the arguments involved; what needs the model (a name, a module given twice by name and object) fails when
the plan is settled (`fastai_tar.settle`)."""
import operator
from numbers import Real

from torch import Tensor, nn

from .plan import Place, module_specs
from .schedule import coef_at, describe_coef

__all__ = ['ALPHA', 'BETA', 'READ_ARGS', 'check_arguments', 'check_flags', 'check_axis', 'check_mask_function',
           'describe_modules', 'describe_arguments']


class _Default(float):
    "A default coefficient: equal to the float it holds, but told apart from the same number passed by the user"
    def __repr__(self): return repr(float(self))
    def __reduce__(self): return (_Default, (float(self),))


ALPHA, BETA = _Default(2.), _Default(1.)  # Merity et al.'s and fastai's language-model defaults

# The arguments that decide what is read: assigning one settles the plan again at the next training forward
READ_ARGS = ('alpha', 'beta', 'modules', 'ar_modules', 'all_layers', 'seq_dim', 'feature_dim', 'contract')
# The defaults of the others that `repr` leaves out
_FLAG_DEFAULTS = dict(all_layers=False, seq_dim=None, feature_dim=None, valid_metrics=False, show_columns=True,
                      contract=None)

_SPEC = ("a module, a name from model.named_modules(), a Place of either, a list of them, or a dict {module or name: "
         "coefficient}")


def _bad_coef(arg, value):
    return ValueError(f"{arg} must be a finite number >= 0 or a schedule of pct_train such as SchedLin(0, 1), "
                      f"got {value!r}")


def _check_coef(coef, arg: str):
    "A number >= 0 or a schedule, or a non-empty list of them; schedules are tried at both ends of training."
    values = list(coef.values()) if isinstance(coef, dict) else list(coef) if isinstance(coef, (list, tuple)) \
        else [coef]
    if not values: raise ValueError(f"{arg}={coef!r} has no coefficient: give a number, a schedule, or one per module")
    for c in values:
        if isinstance(c, bool) or not (callable(c) or isinstance(c, Real)): raise _bad_coef(arg, c)
        # a linear or cosine schedule that goes negative does so at one end
        for pct in (0., 1.): coef_at(c, pct, arg)


def _check_modules(spec, arg: str, coef, coef_arg: str):
    if spec is None: return
    specs = module_specs(spec)
    if not specs:
        raise ValueError(f"{arg}={spec!r} names no module: give {_SPEC}, or None to find them from the model")
    for s in specs:
        if not isinstance(s.module if isinstance(s, Place) else s, (nn.Module, str)):
            raise TypeError(f"{arg} takes {_SPEC}; got {type(s).__name__} {s!r}")
    seen = set()
    for s in specs:
        key = s if isinstance(s, (str, Place)) else id(s)
        if key in seen:
            raise ValueError(f"{arg} names {describe_modules(s)} twice: each module is read once; give it once "
                             "(with its own coefficient in a dict if it needs one)")
        seen.add(key)
    if isinstance(spec, dict):
        _check_coef(spec, coef_arg)
        if not isinstance(coef, _Default):
            raise ValueError(f"{coef_arg}={describe_coef(coef)} and {arg}={describe_modules(spec)} both give the "
                             f"coefficients: leave {coef_arg} out, or pass {arg} as a list of modules")
    elif isinstance(coef, (list, tuple)) and len(coef) != len(specs):
        raise ValueError(f"{coef_arg} has {len(coef)} coefficients but {arg} names {len(specs)} modules: "
                         "give one coefficient per module, or a single number for all")


def check_axis(value, arg: str) -> int | None:
    "An axis as a Python int: any integer (numpy's, a 0-d integer tensor) but a bool; None stays None."
    if value is None: return None
    try:
        if isinstance(value, bool) or isinstance(value, Tensor) and value.is_floating_point(): raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{arg} takes an integer axis of the read output (seq_dim: 1 batch-first, 0 sequence-first, "
                        f"2 channels-first; feature_dim: -1 last, 1 channels-first) or None; got "
                        f"{type(value).__name__} {value!r}") from None


def check_arguments(alpha, beta, modules, ar_modules, all_layers, seq_dim, feature_dim,
                    contract=None) -> tuple[int | None, int | None]:
    "Check the arguments of what to read and how much it weighs; returns `(seq_dim, feature_dim)` as Python ints."
    for coef, arg, spec_arg in ((alpha, 'alpha', 'ar_modules'), (beta, 'beta', 'modules')):
        if isinstance(coef, dict):
            raise TypeError(f"{arg}={describe_coef(coef)}: coefficients per module go in {spec_arg}= as a dict, "
                            f"{spec_arg}={describe_coef(coef)}; {arg} takes a number >= 0, a schedule, or a list")
        _check_coef(coef, arg)
    _check_modules(modules, 'modules', beta, 'beta')
    # AR reads one place for each TAR module where it names none: a list of alphas counts those
    if ar_modules is None and not isinstance(modules, dict): _check_modules(modules, 'modules', alpha, 'alpha')
    else: _check_modules(ar_modules, 'ar_modules', alpha, 'alpha')
    check_flags(all_layers=all_layers)
    if all_layers and (modules is not None or ar_modules is not None):
        named = 'modules' if modules is not None else 'ar_modules'
        raise ValueError(f"all_layers=True reads every layer the callback finds, but {named}= names the modules "
                         f"to read: pass one or the other (list every layer in {named}= to read each)")
    if contract not in (None, True, False):
        raise TypeError(f"contract takes None (recognise fastai's (logits, raw, dropped)), True or False, got "
                        f"{contract!r}")
    seq_dim, feature_dim = check_axis(seq_dim, 'seq_dim'), check_axis(feature_dim, 'feature_dim')
    if seq_dim is not None and feature_dim is not None and seq_dim == feature_dim:
        raise ValueError(f"seq_dim={seq_dim} and feature_dim={feature_dim} name the same axis: the time axis and the "
                         "feature axis of the read output must differ")
    return seq_dim, feature_dim


def check_mask_function(mask, takes: str, example: str):
    "`mask=` is None or a function (of what `takes` says) that gives the batch x time mask"
    if mask is not None and not callable(mask):
        raise TypeError(f"mask= takes a function of {takes} returning a bool batch x time tensor (True where a step "
                        f"is real), e.g. {example}; got {type(mask).__name__}")


def check_flags(**flags):
    "Each flag is True or False"
    for flag, value in flags.items():
        if not isinstance(value, bool): raise TypeError(f"{flag} must be True or False, got {value!r}")


def describe_modules(spec) -> str:
    "A one-line form of a module spec for `repr`: names quoted, modules by their class."
    one = lambda m: repr(m) if isinstance(m, (str, Place)) else type(m).__name__
    if isinstance(spec, dict): return '{' + ', '.join(f'{one(k)}: {describe_coef(v)}' for k, v in spec.items()) + '}'
    if isinstance(spec, (list, tuple)): return '[' + ', '.join(map(one, spec)) + ']'
    return one(spec)


def describe_arguments(owner: str, **given) -> str:
    "`owner(alpha=..., beta=..., ...)` for `repr`: the coefficients, then each other argument that is not its default"
    out = [f"{k}={describe_coef(given.pop(k))}" for k in ('alpha', 'beta')]
    for k, v in given.items():
        if k in _FLAG_DEFAULTS:
            if v != _FLAG_DEFAULTS[k]: out.append(f"{k}={v!r}")
        elif v is not None: out.append(f"{k}={describe_coef(v) if k == 'mask' else describe_modules(v)}")
    return f"{owner}({', '.join(out)})"
