"Put the arguments' inline comments (docments style) into docstrings, so that `help()` shows what each one means."
import inspect

__all__ = ['add_arg_docs']

_HEADING = 'Arguments:'
_STARS = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}


def _arg_lines(obj) -> list[str]:
    "`name (annotation) = default: comment` for each argument of a function, or of a class's `__init__`"
    from fastcore.docments import docments  # fastai's own reader of the comments; imported only when used
    comments = docments(obj)
    lines = []
    for name, p in inspect.signature(obj).parameters.items():  # a class: its `__init__` without `self`
        anno = '' if p.annotation is p.empty else f' ({inspect.formatannotation(p.annotation)})'
        default = '' if p.default is p.empty else f' = {p.default!r}'
        comment = f': {comments[name]}' if comments.get(name) else ''
        lines.append(f'    {_STARS.get(p.kind, "")}{name}{anno}{default}{comment}')
    return lines


def add_arg_docs(obj):
    "Append an 'Arguments:' list, read from the comments where `obj`'s arguments are declared, to its docstring"
    if not callable(obj) or _HEADING in (obj.__doc__ or ''): return obj  # not a function, or done already
    lines = _arg_lines(obj)
    if not lines: return obj
    obj.__doc__ = '\n'.join([(obj.__doc__ or '').rstrip(), '', _HEADING, *lines])
    if inspect.isclass(obj) and obj.__init__.__doc__ is None:  # else help() says 'Initialize self. See help(...)'
        obj.__init__.__doc__ = f'Build a `{obj.__name__}`: its arguments are listed in the class docstring.'
    return obj
