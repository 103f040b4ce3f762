"""The `fastai-tar` command: `demo` shows what AR/TAR does on an offline corpus, `bench` measures speed and memory.

This module defines every option, and imports neither torch nor fastai: `--help`, `--version` and usage
errors answer at once. A subcommand's module (`fastai_tar.tools.demo`, `fastai_tar.tools.bench`) is imported only
to run it.
"""
import argparse
import ast
import importlib
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

from .. import __version__

__all__ = ['UsageError', 'check_writable', 'main']


class UsageError(ValueError):
    """Bad input from the user (an option, the corpus): the command prints the message on one line, no traceback.

    A `ValueError`, so library callers catching that still do; any other error, a bug in fastai or in this
    package among them, keeps its traceback. Defined here, above the subcommands, which import it."""


def check_writable(
    folder: Path,  # where the command will write its files
    option: str,  # the option that named it, e.g. '--out PATH', for the message
    create: bool = False,  # make the folder (and its parents) first
):
    "Raise a `UsageError` unless `folder` takes new files: checked before the work, not after it"
    try:
        if create: folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"{option}: cannot write there ({e.strerror or e}): give a place you can write in") from None


class _Parser(argparse.ArgumentParser):
    "Bad arguments get one line, as every other input error of the command does (argparse adds the usage)."
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The defaults quoted in the help are the subcommands' own (`demo.PRESETS`, `bench.SHAPES`, ...), written
# out here so that no help needs torch; `tests/test_cli.py` checks that they agree.
def _demo_arguments(parser):
    "The `fastai-tar demo` options; None means the preset's value (`--quick` or the default size)"
    parser.add_argument('--corpus', metavar='PATH', help='a .txt file or a folder of .txt files to train on '
                        '(default: the Python documentation that ships with this Python)')
    parser.add_argument('--alpha', type=float, nargs='+', default=[2.], metavar='A',
                        help='AR coefficient(s) of the regularized runs; several values make a sweep (default: 2)')
    parser.add_argument('--beta', type=float, nargs='+', default=[1.], metavar='B',
                        help='TAR coefficient(s) of the regularized runs; several values make a sweep (default: 1)')
    parser.add_argument('--epochs', type=int, help='epochs per run (default: 6; --quick: 2)')
    parser.add_argument('--bs', type=int, help='batch size (default: 32; --quick: 16)')
    parser.add_argument('--bptt', type=int, help='tokens per sequence (default: 50; --quick: 20)')
    parser.add_argument('--seed', type=int, default=42, help='seed of every run (default: 42)')
    parser.add_argument('--quick', action='store_true',
                        help='a tiny model on 60k characters of text, 2 epochs: checks that everything works')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads for torch (default: 1; a model this small gains little from more, and '
                        'loses much when other processes share the cores)')
    parser.add_argument('--out', default='tar_demo', metavar='DIR',
                        help='folder for the plot and the tables (default: ./tar_demo)')


def _bench_arguments(parser):
    "The `fastai-tar bench` options"
    parser.add_argument('--shapes', metavar='BSxSLxH,...', help='shapes of the table rows '
                        '(default: 64x70x400,64x70x1152,16x512x1024,8x2048x2048)')
    parser.add_argument('--dtypes', default='float32,bfloat16', metavar='D,...',
                        help='activation dtypes, from float32, bfloat16, float16 (default: float32,bfloat16)')
    parser.add_argument('--repeats', type=int, help='timed repeats per measurement (default: 20; --quick: 3)')
    parser.add_argument('--quick', action='store_true', help='small shapes and few repeats: checks that it works')
    parser.add_argument('--device', help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument('--train', action='store_true', help='time training epochs with and without TARCallback '
                        'instead of the penalties alone: an AWD-LSTM LM and a small time-series LSTM (--quick: tiny '
                        'models)')
    parser.add_argument('--history', action='store_true', help="measure learn.tar.history instead: bytes per "
                        "training batch over a long fit, and seconds to build 1M rows (--quick: 200 batches)")
    parser.add_argument('--host', action='store_true', help="measure what the callback costs the host per training "
                        "batch instead, against fastai's RNNCallback + RNNRegularizer, on a tiny model, and the Python "
                        "calls a batch makes (--quick: 3 epochs)")
    parser.add_argument('--epochs', type=int, help='--train: timed epochs per variant (default: 6 for the LM, 8 for '
                        'the time-series model; --quick: 2)')
    parser.add_argument('--threads', type=int, help='torch intra-op threads (default: torch\'s, one per core)')
    parser.add_argument('--allocator', choices=('keep', 'default'), default='keep',
                        help="keep: time in a child process whose glibc keeps the memory it frees "
                        "(GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736), so that "
                        "timings do not depend on the allocator's history; default: in this process, glibc's "
                        "defaults (default: keep)")
    parser.add_argument('--json', metavar='PATH', help='also write the figures to this JSON file')


SUBCOMMANDS = {'demo': _demo_arguments, 'bench': _bench_arguments}


def _module_doc(name: str) -> str:
    "The docstring of `fastai_tar.<name>`, read from its source: importing it would import torch"
    with open(importlib.util.find_spec(f'{__package__}.{name}').origin, encoding='utf-8') as f:
        return ast.get_docstring(ast.parse(f.read()))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog='fastai-tar', description=__doc__.split('\n\n')[0],
                epilog='`fastai-tar COMMAND --help` lists the options of a command.')
    p.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = p.add_subparsers(dest='command', metavar='COMMAND', title='commands')
    for name, add_arguments in SUBCOMMANDS.items():
        doc = _module_doc(name)
        sp = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(sp)
    return p


def main(argv=None) -> int:
    "Entry point of the console script; returns the exit status."
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the bare command: what it can do, rather than only 'a command is required'
        parser.print_help(sys.stderr)
        return 2
    # fastai 2.8.12 decorates functions with `torch.jit.script`, which torch >= 2.14 warns about on import: a
    # warning about fastai's code, not the user's, that would otherwise open every command's output.
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    try: return importlib.import_module(f'{__package__}.{args.command}').run(args) or 0
    except UsageError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"fastai-tar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: a line, not a traceback; 130 is the shells' status for SIGINT
        if sys.stdout.isatty(): print(flush=True)  # below a progress bar cut short, not over it
        print(f"fastai-tar {args.command}: interrupted" + (f": {e}" if str(e) else ''), file=sys.stderr)
        return 130


if __name__ == '__main__': sys.exit(main())
