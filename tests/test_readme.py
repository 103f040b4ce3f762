"""README.md and the docs pages run as written, offline: every ```python block of a page, top to bottom, in one
namespace per page (a reader pasting them into one Python session), at a tiny size, with the network refused.
README.md runs first, then each `docs/*.md` page in its own namespace.

A block may carry a marker: an HTML comment on the line before its fence, `<!-- docs-test: MARKER -->`
(`<!-- readme-test: MARKER -->` reads the same):
- `no-launcher`: a script for a launcher (`accelerate launch`). It runs in this one process, where fastai's
  `distrib_ctx` only yields the learner (what it does in a process no launcher started), with accelerate if it is
  installed (`fastai_tar[distributed]`), else with a stand-in for the one name `fastai.distributed` reads from it.
- `needs-tsai`, `needs-tsfast`, `needs-lightning`, `needs-transformers`, `needs-gpu`: needs a package that is not a
  dependency (or a GPU). The block is compiled, not run; the page shows a runnable stand-in next to it (Lightning and
  transformers import torchvision, which fastai's PyPI torchvision makes fail beside a CPU torch).
A block that is not run must not define names that later blocks of its page use.

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

ROOT = Path(__file__).parents[1]
README = ROOT / 'README.md'
PAGES = [README, *sorted((ROOT / 'docs').glob('*.md'))]
PYTHON_BLOCK = re.compile(r'^```python\n(.*?)^```$', re.S | re.M)
MARKER = re.compile(r'<!--\s*(?:readme|docs)-test:\s*(\S+)\s*-->')
NOT_RUN = {  # marker: why the block is compiled but not run
    'needs-tsai': 'tsai is not a dependency', 'needs-tsfast': 'tsfast is not a dependency',
    'needs-lightning': 'Lightning is not a dependency', 'needs-transformers': 'transformers is not a dependency',
    'needs-gpu': 'needs a CUDA GPU'}
MARKERS = {'no-launcher', *NOT_RUN}


def readme_blocks(text: str, name: str = 'README.md') -> list[tuple[int, str, str | None]]:
    "`(line of the fence, code, marker)` of each ```python block; the marker is the comment on the line before"
    blocks = []
    for m in PYTHON_BLOCK.finditer(text):
        before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1]
        marker = MARKER.search(before)
        if marker and marker.group(1) not in MARKERS:
            raise ValueError(f"{name}: unknown marker {marker.group(0)!r}; known: {sorted(MARKERS)}")
        blocks.append((text.count('\n', 0, m.start()) + 1, m.group(1), marker and marker.group(1)))
    return blocks


def page_blocks(page: Path): return readme_blocks(page.read_text(encoding='utf-8'), page.relative_to(ROOT).as_posix())


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


def _skipped(marker) -> bool: return marker in NOT_RUN


@pytest.mark.parametrize('page', [p for p in PAGES if page_blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_runs_offline(page, offline, tiny, monkeypatch, tmp_path):
    blocks = page_blocks(page)
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands here
    ns = {'__name__': '__main__'}
    for line, code, marker in blocks:
        # blank lines first: a traceback names the page and the line in it
        code = compile('\n' * line + code, str(page), 'exec')
        if _skipped(marker): continue  # compiled above: a typo in a block not run still fails
        with monkeypatch.context() as mp, (one_process(mp) if marker == 'no-launcher' else contextlib.nullcontext()):
            exec(code, ns)


def test_readme_is_the_front_door():
    "The README's snippets train a learner; it stays short enough to read in five minutes and links into the docs"
    text = README.read_text(encoding='utf-8')
    assert len(page_blocks(README)) >= 2
    assert len(text.splitlines()) <= 160
    for page in PAGES[1:]:
        assert f'](docs/{page.name})' in text, f"the README links no docs/{page.name}"


def test_pages_cite_no_test_names():
    "Docs state what holds; which test checks it is the suite's business, so renaming a test breaks no page"
    for page in PAGES:
        text = page.read_text(encoding='utf-8')
        assert not re.findall(r'test_\w+::test_\w+|`test_\w+`', text), page.name


def test_offline_fixture_refuses_downloads(offline):
    "The guard the page tests rely on: a download fails at once"
    with pytest.raises(OSError, match='tried to reach the network'):
        urllib.request.urlopen('https://example.com', timeout=1)


def test_readme_blocks_and_markers():
    text = ('a\n```python\nx = 1\n```\n<!-- readme-test: no-launcher -->\n```python\ny = x\n```\n'
            '```bash\nls\n```\n<!-- docs-test: needs-tsai -->\n```python\nz\n```\n')
    assert readme_blocks(text) == [(2, 'x = 1\n', None), (6, 'y = x\n', 'no-launcher'), (13, 'z\n', 'needs-tsai')]
    with pytest.raises(ValueError, match='unknown marker'):
        readme_blocks('<!-- readme-test: skip -->\n```python\nx\n```\n')


def test_distributed_extra_is_declared_and_named():
    "The multi-GPU snippet needs accelerate: an extra installs it, and the page with the snippet names the extra"
    tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    assert any(r.startswith('accelerate') for r in project['optional-dependencies']['distributed'])
    launched = [p for p in PAGES if any(m == 'no-launcher' for _, _, m in page_blocks(p))]
    assert launched and all('pip install "fastai_tar[distributed]"' in p.read_text(encoding='utf-8') for p in launched)
