"""Options and plumbing shared by several subcommands.

Option values are validated when they are parsed, by the ``type=`` functions below: a bad
value is a one-line error naming the option, the rule and the value (exit code 2), before any
work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from flownp import threads as _threads


# ---------------------------------------------------------------------- option value types
def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse ``type``: an int ``>= lo`` (and ``<= hi`` when given)."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if val < lo or (hi is not None and val > hi):
            rule = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {val}")
        return val

    parse.__name__ = f"int >= {lo}" if hi is None else f"int in {lo}..{hi}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
#: ``--seed``: 0 .. 2**63 - 1 (a checkpoint stores it as a 64-bit integer).
seed_int = int_at_least(0, 2**63 - 1)


def finite_float(
    *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """argparse ``type``: a finite float in the interval ``[lo, hi]`` (ends open on request)."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    interval = f"{left}{lo:g}, {hi:g}{right}" if math.isfinite(hi) else None
    rule = interval and f"in {interval}" or (f"> {lo:g}" if lo_open else f">= {lo:g}")

    def parse(text: str) -> float:
        try:
            val = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(val) and (val > lo if lo_open else val >= lo)
        ok = ok and (val < hi if hi_open else val <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text}")
        return val

    parse.__name__ = f"number {rule}"
    return parse


positive_float = finite_float(lo=0.0, lo_open=True)
nonnegative_float = finite_float(lo=0.0)
decay_float = finite_float(lo=0.0, hi=1.0, hi_open=True)


#: argparse ``type`` of ``--threads``: 1 .. the usable CPUs.
thread_count = _threads.thread_count_option


# ---------------------------------------------------------------------- shared options
def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: the command's output files may replace existing ones (without it an
    existing output is refused before any work, :func:`flownp.files.refuse_existing`)."""
    parser.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist"
    )


def add_threads_and_ema(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` and ``--no-ema`` for commands that run a checkpoint."""
    parser.add_argument(
        "--no-ema", action="store_true", help="use the raw parameters instead of the EMA weights"
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="threads of the kernels (default: all usable CPUs; with several processes, the "
        "CPUs of a node divided among its processes; docs/performance.md)",
    )


def run_with_threads(args: argparse.Namespace, body: Callable[[argparse.Namespace], int]) -> int:
    """Run ``body(args)`` with ``--threads`` threads (None: all usable CPUs,
    :func:`flownp.threads.default_threads`)."""
    from flownp import threads

    with threads.limit(args.threads):
        return body(args)
