r"""The benchmark suite: ``python -m verification.bench [--quick] [--out DIR]``,
also ``flownp bench``. One module per section (``layers``, ``size``, ``sampling``,
``training``, ``thread_scaling``, ``memory``, ``startup``; ``torch`` in
:mod:`verification.bench_torch`), shared timing in ``_common``, the report in ``report``.

Every number comes from one run on one machine and is reported with the machine, the thread
counts and the command. Times are the *minimum* over interleaved repetitions (all variants of
one comparison take turns, so a noisy neighbour slows them alike); medians are kept in
``results.json``. Ratios, not absolute times, are the targets.

Sections (each writes its part of ``DIR/report.md`` and ``DIR/results.json``):

``machine``    CPU model, cores, library versions, BLAS, thread settings; the float32 GEMM rate
               (``np.matmul`` of two 1024 x 1024 matrices), measured at the start and the end.
``layers``     per layer, batch 100, float32, the CIFAR level shapes 16x16x12, 8x8x24, 4x4x48:
               forward, backward, inverse of CInC (raster = sequential, wavefront, and the
               unblocked per-pixel baseline), Emerging (nonzero taps only), 1x1, affine and quad
               couplings. Targets 1 and 2.
``size``       inverse time against image size (8 .. 64): CInC sequential, CInC wavefront,
               Emerging (figure ``inverse_vs_size.png``).
``sampling``   the paper's Tables 3/4: seconds to sample 100 CIFAR-shaped images for Glow
               (1x1 + affine), Emerging (1x1 + emerging + affine), CInC + affine, CInC + quad at
               depth 4 and 8 (and 32 without ``--quick``); the Emerging/CInC ratio next to the
               paper's. Target 4.
``training``   images/s and model FLOP utilisation of a training step (forward, backward,
               Adam) for "cifar-d4" and "mnist-d4" (MNIST, L=2, D=4, width 64), with a
               profile. Target 3.
``threads``    training step and sampling 100 images with 1 thread and with every usable CPU,
               interleaved, for MNIST D=4 (L=2, width 64), MNIST D=8 quad width 128, and
               CIFAR-shaped depth 4 and 8 with CInC, Glow (1x1) and Emerging; ``--compete``
               adds the same with one competing CPU-bound process (started and stopped
               here); ``--model`` selects models by name.
``memory``     peak memory of a training step (tracemalloc) with stored activations and with
               recomputation by the inverse, against depth; the two gradients compared.
               Target 6.
``startup``    first-run compile time on an empty Numba cache, second-run overhead. Target 5.
``torch``      flownp against the PyTorch port of the same models (training step, sampling),
               each at its best thread count (:mod:`verification.bench_torch`; skipped with a
               message where torch is not installed).

FLOP convention: a multiply-add is 2 FLOP. A training step costs 3x the forward
multiply-adds of all convolutions (forward, input gradient, weight gradient); model FLOP
utilisation (MFU) = that / step time / GEMM rate.
"""

from __future__ import annotations

# isort: off
import flownp.threads as threads  # first: sets the idle-thread defaults before NumPy loads

# isort: on
import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from verification.bench._common import _fmt, gemm_rate, machine_info, model_forward_macs  # noqa: E402
from verification.bench.layers import bench_layers  # noqa: E402
from verification.bench.memory import bench_memory  # noqa: E402
from verification.bench.report import render_report  # noqa: E402
from verification.bench.sampling import bench_sampling  # noqa: E402
from verification.bench.size import bench_size  # noqa: E402
from verification.bench.startup import bench_startup  # noqa: E402
from verification.bench.thread_scaling import Competitor, bench_threads  # noqa: E402
from verification.bench.training import bench_training, train_step_fn  # noqa: E402

__all__ = [
    "SECTION_NAMES",
    "Competitor",
    "add_arguments",
    "main",
    "model_forward_macs",
    "run_bench",
    "train_step_fn",
]

SECTION_NAMES = ("layers", "size", "sampling", "training", "threads", "memory", "startup", "torch")


def run_bench(
    out: str | os.PathLike,
    quick: bool = False,
    sections=None,
    n_threads: int | None = None,
    compete: bool = False,
    models: list[str] | None = None,
    command: str | None = None,
    *,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Run the suite, write ``out/report.md``, ``out/results.json`` and the figure; return
    the results. ``sections``: a subset of :data:`SECTION_NAMES` (default all).
    ``overwrite=False`` refuses an ``out`` holding the report of an earlier run
    (:class:`~flownp.errors.UsageError`, before any work)."""
    from flownp.files import refuse_existing_in

    t_start = time.perf_counter()
    outdir = refuse_existing_in(out, ["report.md", "results.json"], overwrite, option="--out")
    outdir.mkdir(parents=True, exist_ok=True)
    threads.configure(n_threads)
    sections = list(sections or SECTION_NAMES)
    unknown = sorted(set(sections) - set(SECTION_NAMES))
    if unknown:
        raise ValueError(f"bench: unknown section(s) {unknown}; choose from {SECTION_NAMES}")
    res: dict[str, Any] = {
        "command": command or "verification.bench.run_bench (called from Python)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "sections": {},
    }
    res["loadavg_1min_start"] = _loadavg()
    res["gemm_start"] = gemm_rate()
    res["gemm"] = res["gemm_start"]
    for name in sections:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        if name == "layers":
            r = bench_layers(quick)
        elif name == "size":
            r = bench_size(quick, outdir)
        elif name == "sampling":
            r = bench_sampling(quick)
        elif name == "training":
            r = bench_training(quick)
        elif name == "threads":
            r = bench_threads(quick, compete, models)
        elif name == "memory":
            r = bench_memory(quick)
        elif name == "torch":
            from verification.bench_torch import bench_torch

            r = bench_torch(quick)
        else:
            r = bench_startup(quick)
        r["section_s"] = time.perf_counter() - t0
        r["loadavg_1min_after"] = _loadavg()
        res["sections"][name] = r
        print(f"[bench] {name} done in {r['section_s']:.1f} s", flush=True)
    res["gemm_end"] = gemm_rate()
    res["gemm"] = max(res["gemm_start"], res["gemm_end"])
    res["machine"] = machine_info()
    res["total_s"] = time.perf_counter() - t_start
    (outdir / "results.json").write_text(json.dumps(res, indent=1, default=_json_default))
    (outdir / "report.md").write_text(render_report(res))
    return res


def _loadavg() -> float:
    """1-minute load average (other processes competing for the cores), NaN if unknown."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    parser.add_argument("--out", default="bench-out", help="output folder")
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTION_NAMES,
        help="run only this section (repeatable; default all)",
    )
    parser.add_argument(
        "--threads",
        type=threads.thread_count_option,
        default=None,
        help="threads of flownp (default: usable CPUs)",
    )
    parser.add_argument(
        "--compete",
        action="store_true",
        help="threads section: also measure while one competing CPU-bound process runs "
        "(started and stopped by the benchmark)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="threads section: only the models whose name contains this (repeatable), "
        "e.g. 'mnist', 'cifar d4'",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the report of an earlier run in --out"
    )


def main(argv: list[str] | None = None, prog: str = "python3 -m verification.bench") -> int:
    """Command-line entry; ``prog`` is how the report names the command (with ``argv``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    res = run_bench(
        args.out,
        quick=args.quick,
        sections=args.section,
        n_threads=args.threads,
        compete=args.compete,
        models=args.model,
        command=" ".join([prog, shlex.join(argv)]).strip(),
        overwrite=args.overwrite,
    )
    checks = [c for s in res["sections"].values() for c in s.get("checks", [])]
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISS'} {c['target']}: {_fmt(c['value'])} ({c['limit']})")
    print(f"[bench] report: {Path(args.out) / 'report.md'}")
    return 0
