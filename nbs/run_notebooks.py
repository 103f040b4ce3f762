"""Run the notebooks at full size and save them with their outputs: `python nbs/run_notebooks.py [NAME ...]`.

With no names, all of nbs/*.ipynb, in order (about 15 minutes on 2 cores, most of it the sweep). Run it with
`OMP_NUM_THREADS=1` (as `nox -s notebooks` does): these models are small, and one thread per process is faster on a
busy machine. The stored outputs are what `tests/test_notebooks.py` checks: every cell ran, in order, at full size.
"""
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NBS = Path(__file__).parent


def run(
    path: Path,  # the notebook, executed in its own folder and saved in place
):
    "Execute one notebook at the full size and write it back with its outputs"
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=3600, kernel_name='python3', resources={'metadata': {'path': str(NBS)}}).execute()
    nbformat.write(book, path)


def main(names: list[str]) -> int:
    paths = [NBS / (n if n.endswith('.ipynb') else f'{n}.ipynb') for n in names] or sorted(NBS.glob('*.ipynb'))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing: sys.exit(f"run_notebooks: no such notebook: {', '.join(missing)}")
    # the kernels start with this process's environment
    os.environ['FASTAI_TAR_NB_SIZE'] = 'full'  # read by each notebook's first cell
    os.environ.pop('MPLBACKEND', None)  # the kernel's inline backend, so that the saved notebooks show their figures
    for p in paths:
        print(f'running {p.name}...', flush=True)
        run(p)
    return 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
