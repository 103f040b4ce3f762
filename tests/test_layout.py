"""The package's layout: the library never imports its tools nor its data builders; the torch-only modules import no
fastai, neither directly nor through another module of the package; a batch's way through the modules goes one way."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]
PKG = ROOT / 'fastai_tar'
DATA = {'corpus', 'book'}  # the offline data builders: the demo, the bench and the notebooks use them, the library not
LIBRARY = sorted(p.stem for p in PKG.glob('*.py') if p.stem not in DATA | {'__init__', '__main__'})
# what needs no fastai: the penalties, the plan and its hooks, for plain PyTorch, Lightning, Hugging Face, tsfast 0.5
TORCH_ONLY = {'functional', 'module_facts', 'plan', 'settle', 'capture', 'reading', 'hooks', 'arguments', 'schedule',
              'arg_docs', 'triton_kernels'}
# the modules a training batch passes through: each imports only modules after it, so that no call goes back up
BATCH_WAY = ['callback', 'report', 'hooks', 'settle', 'reading', 'capture', 'plan', 'module_facts', 'functional']


def _imports(path: Path) -> set[str]:
    "The modules a source file imports, relative ones resolved against `fastai_tar`"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import): names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = 'fastai_tar' + (f'.{node.module}' if node.module else '') if node.level else node.module
            names |= {base} | {f'{base}.{a.name}' for a in node.names}
    return names


def _package_imports(name: str) -> set[str]:
    "The package's modules that `fastai_tar/{name}.py` imports, by their short names"
    return {m.split('.')[1] for m in _imports(PKG / f'{name}.py') if m.startswith('fastai_tar.')} - {name}


def test_library_modules_do_not_import_the_tools_or_the_data_builders():
    assert TORCH_ONLY | set(BATCH_WAY) | {'fastai_interop'} <= set(LIBRARY)
    for name in ['__init__', *LIBRARY]:
        found = {m for m in _imports(PKG / f'{name}.py') if m.startswith('fastai_tar.tools')}
        assert not found, f'fastai_tar/{name}.py imports {found}'
        assert not _package_imports(name) & DATA, f'fastai_tar/{name}.py imports a data builder'


def test_torch_only_modules_import_no_fastai_even_through_the_package():
    for name in TORCH_ONLY:
        assert not {m for m in _imports(PKG / f'{name}.py') if m.split('.')[0] == 'fastai'}, name
        assert _package_imports(name) <= TORCH_ONLY, f'{name} imports {_package_imports(name) - TORCH_ONLY}'


def test_a_batch_goes_one_way_through_the_modules():
    "callback -> report; hooks -> settle, reading -> capture, plan -> module_facts; functional: none imports back"
    for i, name in enumerate(BATCH_WAY):
        assert not _package_imports(name) & set(BATCH_WAY[:i]), f'{name} imports {set(BATCH_WAY[:i])}'


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


def test_the_public_names():
    assert fastai_tar_all() == ['TARCallback', 'TARHooks', 'Place', 'ar_penalty', 'tar_penalty', 'ar_sum_count',
                                'tar_sum_count', 'ar_tar_sum_count', 'mean_of', 'NothingToRegularize', 'TupleLossError']


def fastai_tar_all():
    import fastai_tar
    return fastai_tar.__all__


def test_data_builders_do_not_depend_on_the_tools():
    "`corpus` and `book` raise ValueError/TypeError of their own; `fastai-tar demo` turns them into usage errors"
    for name in DATA: assert not {m for m in _imports(PKG / f'{name}.py') if m.startswith('fastai_tar.tools')}
