"The package's layout: the library never imports its tools, and the tools' earlier import paths still work."
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]
PKG = ROOT / 'fastai_tar'
ALIASES = {'corpus', 'book'}  # `fastai_tar.corpus` and `fastai_tar.book`: the tools' modules under their old names
LIBRARY = sorted(p.stem for p in PKG.glob('*.py') if p.stem not in ALIASES | {'__init__', '__main__'})


def _imports(path: Path) -> set[str]:
    "The modules a source file imports, relative ones resolved against `fastai_tar`"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import): names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = 'fastai_tar' + (f'.{node.module}' if node.module else '') if node.level else node.module
            names |= {base} | {f'{base}.{a.name}' for a in node.names}
    return names


def test_library_modules_do_not_import_the_tools():
    assert {'callback', 'functional', 'capture', 'plan', 'fastai_interop', 'arguments'} <= set(LIBRARY)
    for name in ['__init__', *LIBRARY]:
        found = {m for m in _imports(PKG / f'{name}.py') if m.startswith('fastai_tar.tools')}
        assert not found, f'fastai_tar/{name}.py imports {found}'


def test_importing_the_library_loads_no_tool():
    "In a fresh process: every library module and public name, and not one module of `fastai_tar.tools`"
    code = textwrap.dedent(f"""
        import importlib, sys
        import fastai_tar
        for name in {LIBRARY!r}: importlib.import_module('fastai_tar.' + name)
        for name in fastai_tar.__all__: getattr(fastai_tar, name)
        print(sorted(m for m in sys.modules if m.startswith('fastai_tar.tools')))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == '[]'


def test_earlier_import_paths_are_the_tools_modules():
    import fastai_tar.book
    import fastai_tar.corpus
    from fastai_tar.book import human_numbers_dls
    from fastai_tar.tools import book, corpus
    assert fastai_tar.corpus is corpus and fastai_tar.book is book and human_numbers_dls is book.human_numbers_dls
    assert fastai_tar.__all__ == ['TARCallback', 'ar_penalty', 'tar_penalty', 'ar_sum_count', 'tar_sum_count',
                                  'ar_tar_sum_count', 'mean_of', 'NothingToRegularize', 'TupleLossError']


def test_data_builders_do_not_depend_on_the_command_line():
    "`corpus` and `book` raise ValueError/TypeError of their own; `fastai-tar demo` turns them into usage errors"
    for name in ('corpus', 'book'):
        assert not {m for m in _imports(PKG / 'tools' / f'{name}.py') if m.startswith('fastai_tar.tools.cli')}
