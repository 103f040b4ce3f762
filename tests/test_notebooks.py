"The notebooks in nbs/ run top to bottom (at their tiny CI size) and are saved with the outputs of a full run."
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).parent.parent / 'nbs').glob('*.ipynb'))


def test_the_notebooks_are_there():
    assert [p.name for p in NBS] == ['01_quickstart.ipynb', '02_beta_sweep.ipynb', '03_beyond_awd_lstm.ipynb',
                                     '04_fastai_book.ipynb']


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv('FASTAI_TAR_NB_SIZE', 'ci')  # read by each notebook's first cell
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tiny models: a second thread on 2 shared cores only adds contention
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    book = nbformat.read(path, as_version=4)
    # the kernel works in an empty folder: a notebook that wrote files would leave them there
    NotebookClient(book, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == 'code' for o in c.outputs]
    assert outputs[0].get('text') == 'size: ci\n'
    assert not [o for o in outputs if o.output_type == 'error']
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('path', NBS, ids=lambda p: p.stem)
def test_notebook_saved_from_a_full_run(path):
    "The committed outputs are documentation: every cell ran, in order, at the full size, without errors."
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == 'code']
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert code[0].outputs[0]['text'] == 'size: full\n'
    assert not [o for c in code for o in c.outputs if o.output_type == 'error']
