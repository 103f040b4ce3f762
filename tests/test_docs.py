"""The docs site builds with warnings as errors (`mkdocs build --strict`), its API reference read from the docstrings
of the installed package by import (mkdocstrings' dynamic inspection). Skips where the `docs` extra is not
installed: `pip install -e ".[docs]"`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_docs_build_strict(tmp_path):
    for name in ('mkdocs', 'mkdocstrings', 'mkdocstrings_handlers.python', 'material'):
        pytest.importorskip(name, reason=f'{name} is not installed: the docs extra, pip install -e ".[docs]"')
    env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1',  # mkdocs-material's notice about its successor
           'PYTHONPATH': os.pathsep.join([str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])])}
    site = tmp_path / 'site'
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-f', str(ROOT / 'mkdocs.yml'),
                        '-d', str(site)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    api = (site / 'api' / 'index.html').read_text(encoding='utf-8')
    # help()-style argument lists are put into the docstrings at import: the reference shows them
    for text in ('TARCallback', 'ar_penalty', 'tar_penalty', 'ar_sum_count', 'tar_sum_count', 'mean_of',
                 'NothingToRegularize', 'TupleLossError', 'AR coefficient'):
        assert text in api, text
