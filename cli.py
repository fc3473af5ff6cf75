"""The command line of every CLI here (train.py, eval.py, bench.py, plots.py, python -m checkpoint, python -m mini,
python -m rid_kernels.bench, python -m experiments.*): bad input is one line `PROG: error: MESSAGE` on stderr and
exit code 2, never a usage dump or a traceback. Standard library only, so any CLI imports it for nothing.
"""
from __future__ import annotations

import argparse
import functools
import sys


class UsageError(ValueError):
    """Bad input at a boundary (a flag, a file the user pointed at): the CLIs print it as one line
    and exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (UsageError, exit 2), and which refuses a flag given an empty or
    blank value rather than read it as "unset" and replace it by a default (a flag whose default is
    empty may be given empty)."""

    def error(self, message):
        raise UsageError(message)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(ns, action.dest, None)
            if value == action.default:  # not given, or given as its default ("" where "" means none)
                continue
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and not v.strip():
                    if action.option_strings:
                        raise UsageError(f"{action.option_strings[0]} {v!r}: empty; give a value or leave the flag out")
                    raise UsageError(f"{action.metavar or action.dest} {v!r}: empty; give a value")
        return ns


def command(prog: str):
    """Decorates a CLI's main(argv=None) -> int: a UsageError raised anywhere in it (Parser's, or a value
    checked after parsing) is printed as `prog: error: message` and main returns 2."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except UsageError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap
