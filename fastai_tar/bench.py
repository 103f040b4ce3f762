"""Placeholder: `fastai-tar bench` is being built."""


def add_arguments(parser): pass


def run(args):
    raise NotImplementedError('fastai-tar bench')
