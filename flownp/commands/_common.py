"""Options and plumbing shared by several subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flownp.errors import DataError


def add_threads_and_ema(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` and ``--no-ema`` for commands that run a checkpoint."""
    parser.add_argument(
        "--no-ema", action="store_true", help="use the raw parameters instead of the EMA weights"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of the kernels (default: all usable CPUs; docs/performance.md)",
    )


def run_with_threads(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """Validate ``--threads`` and run ``body(args)`` with that many threads (None: all usable
    CPUs, :func:`flownp.threads.default_threads`)."""
    from flownp import threads

    if args.threads is not None and args.threads < 1:
        raise DataError(f"--threads must be >= 1, got {args.threads}")
    with threads.limit(args.threads):
        return body(args)
