"`fastai_tar.tools.book` under its earlier name: the same module object, so that patching one patches both"
import sys

from .tools import book

sys.modules[__name__] = book
