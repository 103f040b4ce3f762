"`python -m fastai_tar demo|bench`"
import sys

from .cli import main

sys.exit(main())
