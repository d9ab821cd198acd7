"""Run the benchmark suite: per-layer times of the invertible convolutions and
couplings, inverse time against image size, the paper's sampling tables, training throughput
and model FLOP utilisation, peak memory, start-up time, and (``--section torch``, where
PyTorch is installed) flownp against a PyTorch port of the same models. Writes ``OUT/report.md``,
``OUT/results.json`` and ``OUT/inverse_vs_size.png``. Same as ``python -m verification.bench``."""

from __future__ import annotations

import argparse

HELP = "time the kernels, layers, sampling and training on this machine; write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from verification.bench import add_arguments as add

    add(parser)


def run(args: argparse.Namespace) -> int:
    from verification.bench import main

    argv = ["--out", args.out] + (["--quick"] if args.quick else [])
    for s in args.section or []:
        argv += ["--section", s]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.compete:
        argv += ["--compete"]
    if args.overwrite:
        argv += ["--overwrite"]
    for m in args.model or []:
        argv += ["--model", m]
    return main(argv, prog="flownp bench")
