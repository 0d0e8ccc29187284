"""The jobs' one vocabulary of flags (docs/jobs.md) and the old spellings kept working beside it: a
deprecated spelling is hidden from --help, sets the same argparse dest as the new one and says so on stderr
in one line. Plain argparse: a job's parser is built before torch, DeepSpeed or Ray is imported."""

import argparse
import sys
from collections.abc import Sequence


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest, prints `OLD is deprecated; use NEW`."""

    def __init__(self, option_strings, dest, *, use: str, const=None, nargs=None, **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{option_string} is deprecated; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str | Sequence[str],
                   use: str, *, dest: str, switch: bool = False, type=None, const=True) -> None:
    """Accept `old` (one spelling or several) as a deprecated spelling of the flag `use` (whose argparse dest
    is `dest`), hidden from --help. switch: a flag without a value that stores `const`."""
    spellings = [old] if isinstance(old, str) else list(old)
    extra = dict(nargs=0, const=const) if switch else dict(type=type)
    parser.add_argument(*spellings, dest=dest, use=use, action=_DeprecatedAlias, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **extra)


def positive_int(text: str) -> int:
    """argparse type of a count (workers, iterations): a whole number >= 1, refused in one line otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def require(parser: argparse.ArgumentParser, args: argparse.Namespace, **flags: str) -> None:
    """What required=True says, for flags that also have a deprecated spelling (argparse would ask for the new
    spelling even when the old one was given): flags maps a dest to the flag's name."""
    missing = [flag for dest, flag in flags.items() if getattr(args, dest, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
