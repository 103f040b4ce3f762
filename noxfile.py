"""`nox` sessions: the suite on each supported Python found on this machine, lint, the release build, the notebooks.

`nox -s tests` runs the suite once per Python 3.10-3.13 found (`nox -s tests-3.13` one of them), each in a fresh
virtualenv installed as the README says; `nox -s lint build` are the release checks of `.ci/run`;
`nox -s notebooks` runs `nbs/*.ipynb` again at full size and saves their outputs (about 15 minutes on 2 cores).
"""
import glob
import os
import subprocess
from pathlib import Path

import nox

SUPPORTED = ('3.10', '3.11', '3.12', '3.13')  # pyproject's classifiers
TORCH = '2.13.0'  # the README's install line: the CPU build where a wheel cache has it, else PyPI's
nox.options.sessions = ['lint', 'build', 'tests']


def _runs(exe: Path) -> bool:
    "A pyenv shim exists for every version it knows, but runs only the ones selected: try it"
    try: return subprocess.run([exe, '-c', ''], capture_output=True, timeout=30).returncode == 0
    except OSError: return False


def _interpreters() -> dict[str, Path]:
    "`{version: python}` of the supported Pythons on PATH or installed by pyenv, the first that runs of each"
    pyenv = Path(os.environ.get('PYENV_ROOT', Path.home() / '.pyenv'))
    dirs = [*os.environ.get('PATH', '').split(os.pathsep), *sorted(glob.glob(str(pyenv / 'versions' / '*' / 'bin')))]
    found = {}
    for v in SUPPORTED:
        exe = next((p for d in dirs if (p := Path(d) / f'python{v}').is_file() and _runs(p)), None)
        if exe is not None: found[v] = exe
    return found


PYTHONS = _interpreters()
# nox looks `python3.X` up on PATH, where a pyenv shim may come first and refuse: put the found ones ahead of it
os.environ['PATH'] = os.pathsep.join([*dict.fromkeys(str(p.parent) for p in PYTHONS.values()), os.environ['PATH']])


@nox.session(python=list(PYTHONS))
def tests(session):
    "The suite in a fresh virtualenv, installed with the README's two lines"
    session.install(f'torch=={TORCH}')
    torch = session.run('python', '-c', 'import torch; print(torch.__version__.split("+")[0])', silent=True).strip()
    session.install('-e', '.[test]', f'torch=={torch}')
    session.run('python', '-m', 'pip', 'check')
    session.run('python', '-m', 'pytest', *session.posargs)


@nox.session(python=False)
def lint(session):
    "ruff, with the configuration in pyproject.toml, over the package, the tests and the scripts"
    session.run('ruff', 'check', '.')


@nox.session(python=False)
def build(session):
    "Build the sdist and the wheel into dist/ and check what PyPI would show of them"
    session.run('python', '-m', 'build')
    session.run('twine', 'check', '--strict', *glob.glob('dist/*'))


@nox.session(python=False)
def notebooks(session):
    "Run nbs/*.ipynb again at full size in this environment and save their outputs"
    session.run('python', 'nbs/run_notebooks.py', *session.posargs, env={'OMP_NUM_THREADS': '1'})
