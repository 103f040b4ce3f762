"""`help()` of the public names: every argument with its whole comment, the same however the name was imported.

The expected text is read from the source files with regular expressions, line by line, not with fastcore's
`docments` that `fastai_tar.arg_docs` reads them with; `help()` is rendered in fresh processes, one importing
each name from its own module, one from `fastai_tar`, so that neither import path can prepare the other's."""
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastai_tar
from fastai_tar.arg_docs import add_arg_docs

ROOT = Path(__file__).parents[1]
# where each public name is defined, written out here rather than read from the package
HOME = {'TARCallback': 'callback', 'TARHooks': 'hooks', 'ar_penalty': 'functional', 'tar_penalty': 'functional',
        'ar_sum_count': 'functional', 'tar_sum_count': 'functional', 'ar_tar_sum_count': 'functional',
        'mean_of': 'functional'}
ERRORS = {'NothingToRegularize': ('plan', ValueError), 'TupleLossError': ('fastai_interop', TypeError)}
OTHERS = {'Place': 'plan'}  # a dataclass: its fields are documented in its docstring
_ARG = re.compile(r'^\s*(\*{0,2})(\w+)\b[^#]*?(?:#\s?(.*))?$')  # `name: anno = default,  # comment`
_MORE = re.compile(r'^\s*#\s?(.*)$')  # a comment-only line: the comment above goes on


def source_comments(name: str) -> dict[str, list[str]]:
    "Each argument's comment lines, read from the lines of its `def` (a class: its `__init__`) in the source file"
    lines = (ROOT / 'fastai_tar' / f'{HOME[name]}.py').read_text(encoding='utf-8').splitlines()
    at = next(i for i, l in enumerate(lines) if re.match(rf'(class|def) {name}\b', l))
    if lines[at].startswith('class'): at = next(i for i in range(at, len(lines)) if 'def __init__(' in lines[i])
    head, rest = lines[at].split('(', 1)
    header = [rest] if rest.strip() else []
    for l in lines[at + 1:]:
        if re.match(r'^\s*\)(\s*->.*)?:\s*$', l): break
        header.append(l)
    if header and header[0].rstrip().endswith(':'):  # a one-line def: `def f(a, b) -> T:`, no comments
        return {}
    comments, last = {}, None
    for l in header:
        if (m := _MORE.match(l)) and last is not None: comments[last].append(m.group(1).rstrip())
        elif m := _ARG.match(l):
            last = m.group(2)
            comments[last] = [m.group(3).rstrip()] if m.group(3) else []
    return {k: v for k, v in comments.items() if v and k != 'self'}


def _helps(import_line: str) -> dict[str, str]:
    "`pydoc.render_doc` of every public name, in a fresh process that imports them with `import_line` (`{name}`)"
    code = textwrap.dedent(f"""
        import json, pydoc
        out = {{}}
        for name, module in {HOME!r}.items():
            exec({import_line!r}.format(name=name, module=module))
            out[name] = pydoc.render_doc(eval(name), renderer=pydoc.plaintext)
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope='module')
def helps() -> dict[str, dict[str, str]]:
    return {'module': _helps('from fastai_tar.{module} import {name}'),
            'package': _helps('import fastai_tar; {name} = fastai_tar.{name}')}


def _argument_block(text: str) -> list[str]:
    "The lines after 'Arguments:', up to the first blank one, without a class help's ' |' margin or the indent"
    lines = [re.sub(r'^ \|', '', l).rstrip() for l in text.split('Arguments:', 1)[1].splitlines()[1:]]
    lines = lines[:lines.index('')] if '' in lines else lines
    return textwrap.dedent('\n'.join(lines)).splitlines()  # an argument's line starts at 0, what goes on is deeper


def test_the_names_are_the_public_api():
    assert sorted([*HOME, *ERRORS, *OTHERS]) == sorted(fastai_tar.__all__)
    for name, (module, base) in ERRORS.items():  # the errors a user can catch, the same class from either path
        err = getattr(fastai_tar, name)
        assert err is getattr(__import__(f'fastai_tar.{module}', fromlist=[name]), name) and issubclass(err, base)


@pytest.mark.parametrize('name', list(HOME))
def test_help_is_the_same_whatever_the_import_path(helps, name):
    assert 'Arguments:' in helps['module'][name]
    assert helps['module'][name] == helps['package'][name]


@pytest.mark.parametrize('name', list(HOME))
def test_help_shows_every_argument_with_its_whole_comment(helps, name):
    block = _argument_block(helps['module'][name])
    comments = source_comments(name)
    listed = [l.split()[0].lstrip('*') for l in block if not l.startswith(' ')]
    assert listed == list(inspect.signature(getattr(fastai_tar, name)).parameters)  # every argument, in order
    for arg, lines in comments.items():
        at = next((i for i, l in enumerate(block) if l.split()[0].lstrip('*') == arg), None)
        assert at is not None, f'{name}: argument {arg} missing from help()'
        assert block[at].endswith(f': {lines[0]}'), block[at]
        assert [l.strip() for l in block[at + 1:at + len(lines)]] == lines[1:], f'{name}: {arg} cut short'


@pytest.mark.parametrize('name', ['TARCallback', 'TARHooks', 'tar_penalty', 'ar_penalty'])
def test_main_entry_points_comment_every_argument(helps, name):
    text = helps['module'][name]
    assert 'Initialize self.  See help' not in text
    assert len(source_comments(name)) == len([l for l in _argument_block(text) if not l.startswith(' ')])


def test_the_data_builders_list_their_arguments():
    "`fastai_tar.corpus` and `fastai_tar.book` are decorated where they are defined too"
    from fastai_tar.book import human_numbers_dls
    from fastai_tar.corpus import corpus_frame, lm_dls
    assert '    bs (int) = 64: batch size' in human_numbers_dls.__doc__
    assert "    tok (Any) = None: a fastai tokenizer; None is `default_tokenizer()`" in lm_dls.__doc__
    assert 'else a .txt file or folder\n' in corpus_frame.__doc__


def test_add_arg_docs_on_a_written_out_example():
    @add_arg_docs
    def f(
        a: int,  # one line
        b=2,  # another
        *rest,  # the rest
        c: str | None = None,
        **kw,
    ) -> int:
        "Doc."
        return a

    assert f.__doc__ == textwrap.dedent("""\
        Doc.

        Arguments:
            a (int): one line
            b = 2: another
            *rest: the rest
            c (str | None) = None
            **kw""")
    assert add_arg_docs(f) is f and f.__doc__.count('Arguments:') == 1  # done once
