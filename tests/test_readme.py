"""README.md runs as written, offline: every ```python block, top to bottom, in one namespace (a reader pasting
them into one Python session), at a tiny size, with the network refused.

A block that is a script for a launcher (`accelerate launch`) is marked by an HTML comment on the line before its
fence, `<!-- readme-test: no-launcher -->`: it runs in this one process, where fastai's `distrib_ctx` only yields
the learner (what it does in a process no launcher started), with accelerate if it is installed
(`fastai_tar[distributed]`), else with a stand-in for the one name `fastai.distributed` reads from it at import.
The tiny size changes data and model sizes, never the text: the Python documentation corpus is cut to every 12th
document, fastai's AWD-LSTM configs to a few dozen units."""
import contextlib
import re
import socket
import sys
import types
import urllib.request
from pathlib import Path

import pytest
from fastai.learner import Learner
from fastai.text.models.awdlstm import awd_lstm_clas_config, awd_lstm_lm_config
from fastai.text.models.core import _model_meta
from fastai.text.models.awdlstm import AWD_LSTM

import fastai_tar.corpus

README = Path(__file__).parents[1] / 'README.md'
PYTHON_BLOCK = re.compile(r'^```python\n(.*?)^```$', re.S | re.M)
MARKER = re.compile(r'<!--\s*readme-test:\s*(\S+)\s*-->')
MARKERS = {'no-launcher'}


def readme_blocks(text: str) -> list[tuple[int, str, str | None]]:
    "`(line of the fence, code, marker)` of each ```python block; the marker is the comment on the line before"
    blocks = []
    for m in PYTHON_BLOCK.finditer(text):
        before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1]
        marker = MARKER.search(before)
        if marker and marker.group(1) not in MARKERS:
            raise ValueError(f"README.md: unknown marker {marker.group(0)!r}; known: {sorted(MARKERS)}")
        blocks.append((text.count('\n', 0, m.start()) + 1, m.group(1), marker and marker.group(1)))
    return blocks


def _refuse(*args, **kwargs): raise ConnectionRefusedError('a README snippet tried to reach the network')


@pytest.fixture
def offline(monkeypatch):
    "Any name look-up or connection fails: a snippet that downloads (fastai's `pretrained=True`) fails the test"
    monkeypatch.setattr(socket, 'getaddrinfo', _refuse)
    monkeypatch.setattr(socket.socket, 'connect', _refuse)
    monkeypatch.setattr(socket.socket, 'connect_ex', _refuse)


@pytest.fixture(scope='module')
def few_docs():
    return fastai_tar.corpus.python_docs()[::12]


@pytest.fixture
def tiny(monkeypatch, few_docs):
    monkeypatch.setattr(fastai_tar.corpus, 'python_docs', lambda: few_docs)
    # fastai's learners copy these dicts (`_model_meta`), so a model built while patched is tiny
    assert _model_meta[AWD_LSTM]['config_lm'] is awd_lstm_lm_config
    assert _model_meta[AWD_LSTM]['config_clas'] is awd_lstm_clas_config
    for cfg in (awd_lstm_lm_config, awd_lstm_clas_config):
        for k, v in dict(emb_sz=16, n_hid=24, n_layers=2).items(): monkeypatch.setitem(cfg, k, v)


@contextlib.contextmanager
def _no_launcher(self, *args, **kwargs):
    yield self


@contextlib.contextmanager
def one_process(mp):
    "A launcher's script, run here: `distrib_ctx` as without a launcher; accelerate, or a stand-in where missing"
    mp.setattr(Learner, 'distrib_ctx', _no_launcher, raising=False)
    try: import accelerate  # noqa: F401
    except ModuleNotFoundError: pass
    else:
        yield
        return
    stand_in = types.ModuleType('accelerate')
    stand_in.Accelerator = type('Accelerator', (), {'__init__': lambda self, *args, **kwargs: None})
    mp.setitem(sys.modules, 'accelerate', stand_in)
    saved = sys.modules.pop('fastai.distributed', None)  # imported again, here, under the stand-in
    try: yield
    finally:  # the stand-in's import of fastai.distributed is not left for other tests
        sys.modules.pop('fastai.distributed', None)
        if saved is not None: sys.modules['fastai.distributed'] = saved


def test_readme_runs_offline(offline, tiny, monkeypatch, tmp_path):
    blocks = readme_blocks(README.read_text(encoding='utf-8'))
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands here
    ns = {'__name__': '__main__'}
    for line, code, marker in blocks:
        with monkeypatch.context() as mp, (one_process(mp) if marker == 'no-launcher' else contextlib.nullcontext()):
            # blank lines first: a traceback names README.md and the line in it
            exec(compile('\n' * line + code, str(README), 'exec'), ns)
    assert isinstance(ns['learn'], Learner)


def test_offline_fixture_refuses_downloads(offline):
    "The guard the README test relies on: a download fails at once"
    with pytest.raises(OSError, match='tried to reach the network'):
        urllib.request.urlopen('https://example.com', timeout=1)


def test_readme_blocks_and_markers():
    text = ('a\n```python\nx = 1\n```\n<!-- readme-test: no-launcher -->\n```python\ny = x\n```\n'
            '```bash\nls\n```\n')
    assert readme_blocks(text) == [(2, 'x = 1\n', None), (6, 'y = x\n', 'no-launcher')]
    with pytest.raises(ValueError, match='unknown marker'):
        readme_blocks('<!-- readme-test: skip -->\n```python\nx\n```\n')


def test_distributed_extra_is_declared_and_named():
    "The Multi-GPU snippet needs accelerate: an extra installs it, and the README names the extra"
    tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')
    project = tomllib.loads((README.parent / 'pyproject.toml').read_text())['project']
    assert any(r.startswith('accelerate') for r in project['optional-dependencies']['distributed'])
    assert 'pip install "fastai_tar[distributed]"' in README.read_text(encoding='utf-8')


def test_every_test_the_readme_names_exists():
    "The README backs its claims with `file::test` names: each must be a test in tests/, or the claim is unbacked"
    text = README.read_text(encoding='utf-8')
    named = set(re.findall(r'`(test_\w+)::(test_\w+)', text))
    assert len(named) >= 30
    defined = {(p.stem, n) for p in (README.parent / 'tests').glob('test_*.py')
               for n in re.findall(r'^def (test_\w+)', p.read_text(encoding='utf-8'), re.M)}
    assert named - defined == set()
    bare = set(re.findall(r'`(test_\w+)`', text))
    assert bare <= {n for _, n in defined} | {p.stem for p in (README.parent / 'tests').glob('test_*.py')}
