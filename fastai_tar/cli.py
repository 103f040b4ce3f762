"The `fastai-tar` command: `demo` shows what AR/TAR does on an offline corpus, `bench` measures speed and memory."
import argparse
import sys
import tempfile
from pathlib import Path

__all__ = ['UsageError', 'check_writable', 'main']


class UsageError(ValueError):
    """Bad input from the user (an option, the corpus): the command prints the message on one line, no traceback.

    A `ValueError`, so library callers catching that still do; any other error, a bug in fastai or in this
    package among them, keeps its traceback. Defined here, above the subcommands: `corpus`, `demo` and
    `bench` import it and this module imports them only when the parser is built, so there is no cycle."""


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


def _parser() -> argparse.ArgumentParser:
    from . import bench, demo
    p = _Parser(prog='fastai-tar', description=__doc__)
    sub = p.add_subparsers(dest='command', required=True)
    for name, mod in (('demo', demo), ('bench', bench)):
        sp = sub.add_parser(name, help=mod.__doc__.splitlines()[0], description=mod.__doc__)
        mod.add_arguments(sp)
        sp.set_defaults(run=mod.run)
    return p


def main(argv=None) -> int:
    "Entry point of the console script; returns the exit status."
    args = _parser().parse_args(argv)
    try: return args.run(args) or 0
    except UsageError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"fastai-tar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == '__main__': sys.exit(main())
