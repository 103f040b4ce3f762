"Temporal Activation Regularization (TAR) and Activation Regularization (AR) for fastai."
import importlib
from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

# Where each public name lives. They are imported on first use (PEP 562 `__getattr__`), so that `import
# fastai_tar.tools.cli` costs no torch or fastai import and `fastai-tar --help` answers at once; the objects are
# the same as `from fastai_tar.callback import TARCallback` gives.
_EXPORTS = {'TARCallback': 'callback', 'TARHooks': 'hooks', 'Place': 'plan', 'ar_penalty': 'functional',
            'tar_penalty': 'functional', 'ar_sum_count': 'functional', 'tar_sum_count': 'functional',
            'ar_tar_sum_count': 'functional', 'mean_of': 'functional', 'NothingToRegularize': 'plan',
            'TupleLossError': 'fastai_interop'}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for editors and type checkers, which do not run `__getattr__`
    # `name as name`: the form that marks a re-export in a typed package (PEP 484)
    from .callback import TARCallback as TARCallback
    from .hooks import TARHooks as TARHooks
    from .plan import Place as Place
    from .functional import ar_penalty as ar_penalty, ar_sum_count as ar_sum_count, mean_of as mean_of
    from .functional import tar_penalty as tar_penalty, tar_sum_count as tar_sum_count
    from .functional import ar_tar_sum_count as ar_tar_sum_count
    from .fastai_interop import TupleLossError as TupleLossError
    from .plan import NothingToRegularize as NothingToRegularize


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS: raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    obj = getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    globals()[name] = obj  # later look-ups find it without coming here
    return obj


def __dir__() -> list[str]: return sorted([*globals(), *_EXPORTS])
