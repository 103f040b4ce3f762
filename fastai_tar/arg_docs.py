"""Put the arguments' inline comments (docments style) into docstrings, so that `help()` shows what each one means.

fastcore's `docments` reads the comments; `add_arg_docs` decorates each public name where it is defined, so the
docstring is the same however the name is imported."""
import inspect
from collections.abc import Callable
from typing import TypeVar

from fastcore.docments import docments

__all__ = ['add_arg_docs']

_HEADING = 'Arguments:'
_STARS = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}
_F = TypeVar('_F', bound=Callable)


def add_arg_docs(obj: _F) -> _F:
    "Append an 'Arguments:' list, `name (annotation) = default: comment`, to `obj`'s docstring (a class's: __init__'s)"
    if not callable(obj) or _HEADING in (obj.__doc__ or ''): return obj  # not a function, or done already
    try: comments = docments(obj)
    except (OSError, TypeError): comments = {}  # no source to read (a build without .py files): names, no comments
    lines = []
    for name, p in inspect.signature(obj).parameters.items():  # a class: its `__init__` without `self`
        anno = '' if p.annotation is p.empty else f' ({inspect.formatannotation(p.annotation)})'
        default = '' if p.default is p.empty else f' = {p.default!r}'
        comment = comments.get(name)
        lines.append(f'    {_STARS.get(p.kind, "")}{name}{anno}{default}' + (f': {comment}' if comment else ''))
    if not lines: return obj
    obj.__doc__ = '\n'.join([(obj.__doc__ or '').rstrip(), '', _HEADING, *lines])
    if inspect.isclass(obj) and obj.__init__.__doc__ is None:  # else help() says 'Initialize self. See help(...)'
        obj.__init__.__doc__ = f'Build a `{obj.__name__}`: its arguments are listed in the class docstring.'
    return obj
