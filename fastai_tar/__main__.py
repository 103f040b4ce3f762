"`python -m fastai_tar demo|bench`"
import sys

from .cli import main

if __name__ == '__main__':  # importing it (doc tools, pydoc) must not run the command line
    sys.exit(main())
