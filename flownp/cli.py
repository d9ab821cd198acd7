"""The ``flownp`` command. Each subcommand lives in ``flownp/commands/<name>.py`` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).

Exit codes: 0 success, 1 a check/claim failed or training diverged, 2 bad usage or bad input
(argparse's convention), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

import flownp.threads  # noqa: F401  (first: idle-thread env defaults, before NumPy loads)
from flownp.errors import FlownpError

# name -> module; the order is the order of ``flownp --help``.
COMMANDS = {
    "train": "flownp.commands.train",
    "sample": "flownp.commands.sample",
    "evaluate": "flownp.commands.evaluate",
    "verify": "flownp.commands.verify",
    "export-reference": "flownp.commands.export_reference",
    "check-reference": "flownp.commands.check_reference",
    "bench": "flownp.commands.bench",
    "experiment": "flownp.commands.experiment",
    "reconstruct": "flownp.commands.reconstruct",
    "interpolate": "flownp.commands.interpolate",
    "manipulate": "flownp.commands.manipulate",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (no usage dump), naming the fix; exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the layout of each command's description (its module docstring) and appends
    ``(default: X)`` to options whose default is meaningful and not already in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flownp",
        description="flownp: CInC Flow (invertible padded convolutions) in NumPy + Numba.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.__doc__,
            formatter_class=_HelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C; training saves first (TrainingInterrupted)
        print(
            f"flownp {args.command}: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr
        )
        return 130
    except FlownpError as exc:
        print(f"flownp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the user's files or disk (permissions, full disk, ...)
        print(f"flownp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
