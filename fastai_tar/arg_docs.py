"""Put the arguments' inline comments (docments style) into docstrings, so that `help()` shows what each one means.

`add_arg_docs` decorates each public name where it is defined, so the docstring is the same however the name is
imported. A comment may go on over the next lines, as comment-only lines below its argument: all of it is kept."""
import ast
import inspect
import io
import textwrap
import tokenize
from collections.abc import Callable
from typing import TypeVar

__all__ = ['add_arg_docs', 'arg_comments']

_HEADING = 'Arguments:'
_STARS = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}
_F = TypeVar('_F', bound=Callable)


def _declared_args(fn: ast.FunctionDef) -> list[tuple[str, int]]:
    "`(name, line its declaration ends on)` of each argument, in order; the line is its default's last, if it has one"
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults = {id(arg): d for arg, d in zip(positional[len(positional) - len(a.defaults):], a.defaults)}
    defaults |= {id(arg): d for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None}
    args = [*positional, *[a.vararg] * bool(a.vararg), *a.kwonlyargs, *[a.kwarg] * bool(a.kwarg)]
    return [(arg.arg, defaults.get(id(arg), arg).end_lineno) for arg in args]


def arg_comments(
    obj: Callable,  # a function, or a class (its `__init__` is read)
) -> dict[str, list[str]]:
    "Each commented argument's comment lines: the one after it on its line, then the comment-only lines below it"
    src = textwrap.dedent(inspect.getsource(obj.__init__ if inspect.isclass(obj) else obj))
    fn = ast.parse(src).body[0]
    comments, code = {}, set()  # line -> its comment; the lines that hold code
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.COMMENT: comments[t.start[0]] = t.string[1:].strip()
        elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code.update(range(t.start[0], t.end[0] + 1))
    args = _declared_args(fn)
    ends = [line for _, line in args[1:]] + [fn.body[0].lineno]  # where the next argument's, or the body's, lines begin
    res = {}
    for (name, line), stop in zip(args, ends):
        if line == stop or line not in comments: continue  # the comment on a line of several arguments is the last's
        res[name] = [comments[line]]
        for cont in range(line + 1, stop):
            if cont in code or cont not in comments: break
            res[name].append(comments[cont])
    return res


def _arg_lines(obj) -> list[str]:
    "`name (annotation) = default: comment` for each argument of a function, or of a class's `__init__`"
    try: comments = arg_comments(obj)
    except (OSError, TypeError): comments = {}  # no source to read (a build without .py files): names, no comments
    lines = []
    for name, p in inspect.signature(obj).parameters.items():  # a class: its `__init__` without `self`
        anno = '' if p.annotation is p.empty else f' ({inspect.formatannotation(p.annotation)})'
        default = '' if p.default is p.empty else f' = {p.default!r}'
        first, *more = comments.get(name) or ['']
        lines.append(f'    {_STARS.get(p.kind, "")}{name}{anno}{default}' + (f': {first}' if first else ''))
        lines += [f'        {l}' for l in more]  # as the source breaks it
    return lines


def add_arg_docs(obj: _F) -> _F:
    "Append an 'Arguments:' list, read from the comments where `obj`'s arguments are declared, to its docstring"
    if not callable(obj) or _HEADING in (obj.__doc__ or ''): return obj  # not a function, or done already
    lines = _arg_lines(obj)
    if not lines: return obj
    obj.__doc__ = '\n'.join([(obj.__doc__ or '').rstrip(), '', _HEADING, *lines])
    if inspect.isclass(obj) and obj.__init__.__doc__ is None:  # else help() says 'Initialize self. See help(...)'
        obj.__init__.__doc__ = f'Build a `{obj.__name__}`: its arguments are listed in the class docstring.'
    return obj
