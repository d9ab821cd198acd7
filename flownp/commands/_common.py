"""Options and plumbing shared by several subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flownp.errors import DataError


def add_threads_and_ema(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` (Numba and BLAS) and ``--no-ema`` for commands that run a checkpoint."""
    parser.add_argument(
        "--no-ema", action="store_true", help="use the raw parameters instead of the EMA weights"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of the Numba kernels and of BLAS (1 is fastest on 2 shared cores, "
        "docs/training.md)",
    )


def run_with_threads(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """Validate ``--threads`` and run ``body(args)`` with both thread pools limited to it."""
    from flownp.train import thread_limits

    if args.threads < 1:
        raise DataError(f"--threads must be >= 1, got {args.threads}")
    with thread_limits(args.threads, args.threads):
        return body(args)
