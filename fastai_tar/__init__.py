"Temporal Activation Regularization (TAR) and Activation Regularization (AR) for fastai."
import importlib
from typing import TYPE_CHECKING

from .arg_docs import add_arg_docs

__version__ = '0.1.0'

# Where each public name lives. They are imported on first use (PEP 562 `__getattr__`), so that `import
# fastai_tar.tools.cli` costs no torch or fastai import and `fastai-tar --help` answers at once; the objects are
# the same as `from fastai_tar.callback import TARCallback` gives.
_EXPORTS = {'TARCallback': 'callback', 'ar_penalty': 'functional', 'tar_penalty': 'functional',
            'ar_sum_count': 'functional', 'tar_sum_count': 'functional', 'ar_tar_sum_count': 'functional',
            'mean_of': 'functional', 'NothingToRegularize': 'plan', 'TupleLossError': 'fastai_interop'}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for editors and type checkers, which do not run `__getattr__`
    from .callback import TARCallback
    from .fastai_interop import TupleLossError
    from .functional import ar_penalty, ar_sum_count, ar_tar_sum_count, mean_of, tar_penalty, tar_sum_count
    from .plan import NothingToRegularize


def __getattr__(name: str):
    if name not in _EXPORTS: raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # `help()` shows each argument with the comment it is declared with (docments style)
    obj = getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    if not isinstance(obj, type) or not issubclass(obj, Exception): obj = add_arg_docs(obj)
    globals()[name] = obj  # later look-ups find it without coming here
    return obj


def __dir__(): return sorted([*globals(), *_EXPORTS])
