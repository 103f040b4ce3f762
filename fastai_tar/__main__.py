"`python -m fastai_tar demo|bench`: the `fastai-tar` command (`fastai_tar.tools.cli`)"
import sys

from .tools.cli import main

if __name__ == '__main__':  # importing it (doc tools, pydoc) must not run the command line
    sys.exit(main())
