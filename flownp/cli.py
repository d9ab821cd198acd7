"""The ``flownp`` command. Each subcommand lives in ``flownp/commands/<name>.py`` and defines
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code).

Exit codes: 0 success, 1 a check/claim failed or training diverged, 2 bad usage or bad input
(argparse's convention), 130 interrupted. SIGTERM is handled as Ctrl-C in every command
(:func:`sigterm_as_interrupt`): one line on stderr and exit code 130, output files either
complete or untouched (they are written atomically), never a bare 143.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
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


#: Commands that run on several processes (``mpiexec -n N flownp COMMAND``,
#: docs/distributed.md); the others refuse to.
DISTRIBUTED = ("train", "evaluate", "sample", "experiment")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM raises ``KeyboardInterrupt("SIGTERM")`` as Ctrl-C does (the previous
    handler is restored on exit). ``flownp train`` replaces it with its own while it trains
    (finish the step, save, then stop). Only the main thread can set handlers: elsewhere this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from flownp import distributed

    try:
        comm = distributed.world()  # imports mpi4py only when started on several processes
    except distributed.DistributedError as exc:
        if distributed.launch_rank() == 0:  # one line, from process 0
            print(f"flownp: error: {exc}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    if comm.size == 1:
        return _main(argv, comm)
    return _main_distributed(argv, comm)


def _main(argv: list[str], comm) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if comm.size > 1 and args.command not in DISTRIBUTED:
        print(
            f"flownp {args.command}: error: runs on one process only; start it without an MPI "
            f"launcher (on several processes: {', '.join(DISTRIBUTED)})",
            file=sys.stderr,
        )
        return 2
    try:
        with sigterm_as_interrupt():
            return int(args._run(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C; training saves first (TrainingInterrupted)
        return _fail(comm, args.command, f"interrupted{f': {exc}' if str(exc) else ''}", 130, exc)
    except FlownpError as exc:
        return _fail(comm, args.command, f"error: {exc}", 2, exc)
    except OSError as exc:  # the user's files or disk (permissions, full disk, ...)
        return _fail(comm, args.command, f"error: {exc}", 2, exc)


_REAL_STDERR = sys.stderr  # processes other than 0 print only their own errors, here (below)


def _fail(comm, command: str, message: str, code: int, exc: BaseException) -> int:
    """Print the error and return ``code``. On several processes an error every process
    raised together is printed by process 0 only; an error of one process is printed by it,
    naming it, and ends the whole job (the others would wait for it forever)."""
    from flownp import distributed

    if comm.size == 1 or distributed.is_collective(exc):
        print(f"flownp {command}: {message}", file=sys.stderr)
        return code
    print(
        f"flownp {command}: process {comm.rank} of {comm.size}: {message}",
        file=_REAL_STDERR,
        flush=True,
    )
    comm.abort(code)
    return code


def _main_distributed(argv: list[str], comm) -> int:
    """:func:`_main` on one of several processes: they must run the same flownp with the
    same options (checked first); only process 0 prints, except an error of its own."""
    import os
    import shlex
    import traceback

    from flownp import distributed, threads

    global _REAL_STDERR
    _REAL_STDERR = sys.stderr
    quiet = None
    if not comm.is_root:
        quiet = open(os.devnull, "w")  # noqa: SIM115 (closed below)
        sys.stdout = sys.stderr = quiet
    try:
        try:
            distributed.agree(
                comm, {"flownp version": distributed.software(), "options": shlex.join(argv)}
            )
        except distributed.DistributedError as exc:
            print(f"flownp: error: {exc}", file=sys.stderr)
            return 2
        threads.set_default(distributed.default_threads(comm))
        return _main(argv, comm)
    except SystemExit:
        raise
    except BaseException:  # a bug on this process: say where, end the job
        print(
            f"flownp: process {comm.rank} of {comm.size} failed:\n{traceback.format_exc()}",
            file=_REAL_STDERR,
            flush=True,
        )
        comm.abort(1)
        return 1
    finally:
        if quiet is not None:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            quiet.close()


if __name__ == "__main__":
    sys.exit(main())
