"`fastai_tar.tools.corpus` under its earlier name: the same module object, so that patching one patches both"
import sys

from .tools import corpus

sys.modules[__name__] = corpus
