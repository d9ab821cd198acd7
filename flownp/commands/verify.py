"""Run the explicit-matrix verification of the paper (Section 3.1: Lemma 1, Theorem 1, the
general-C case, the symmetric-padding counterexamples of Figure 1a, the layers against their
dense matrices, Figure 1) and the stability section; write ``OUT/report.md`` and the figures
(an OUT holding the report of an earlier run is refused unless --overwrite).
Exit status 1 if any claim fails. Same as ``python -m verification``."""

from __future__ import annotations

import argparse

HELP = "check the paper's claims with explicit matrices; write a Markdown report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verification.__main__ import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from verification.__main__ import run_verification

    return run_verification(
        args.out, quick=args.quick, sections=args.section, overwrite=args.overwrite
    )
