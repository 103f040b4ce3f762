"""Placeholder: `fastai-tar demo` is being built."""


def add_arguments(parser): pass


def run(args):
    raise NotImplementedError('fastai-tar demo')
