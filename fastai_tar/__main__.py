"`python -m fastai_tar demo|bench`: the `fastai-tar` command (`fastai_tar.tools.cli`)"
import sys

from .tools.cli import main

sys.exit(main())
