"""Train a declared grid of variants (invertible convolution x coupling x depth x seeds) under an
equal-steps and an equal-wall-clock budget, and write a report with error bars over seeds.

  <out>/runs/<budget>/<conv>-<coupling>-d<depth>/seed<k>/   one run folder each (as flownp train)
  <out>/report/report.md        held-out bits/dim mean ± std over seeds, parameters, training
                                time, time to sample 100 images, legible-digit share (MNIST)
  <out>/report/results.csv      one row per run
  <out>/report/curves_<budget>.png   held-out bits/dim against steps and against seconds

Resumable: run the same command again after an interruption. Finished runs (result.json) are
skipped, partially trained runs continue from their checkpoint (the wall-clock budget counts the
time already trained); a run folder made with other options is refused. The report is rewritten
after every run. --status lists the runs and their state; --report-only rebuilds the report.

--temperature-sweep T1,T2,... trains nothing: it measures the legible-digit share of samples at
each temperature, for the checkpoints given with --checkpoint or else for every finished run
of the grid in --out (MNIST-shaped models), so that a sampling temperature can be chosen.

Exit codes: 0 done, 1 some runs diverged, 2 bad input (options, data, a mismatching run folder).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flownp.commands import train as _train
from flownp.commands._common import thread_count
from flownp.errors import DataError

HELP = "train a grid of variants with seeds under equal budgets; report mean ± std"

# The options of `flownp train` that are the same for every run of a grid: all but the grid's
# axes (conv, coupling, depth) and the seed.
MODEL_OPTIONS = tuple(o for o in _train.MODEL_OPTIONS if o not in ("conv", "coupling", "depth"))
TRAIN_OPTIONS = tuple(o for o in _train.TRAIN_OPTIONS if o != "seed")


def _csv(kind: type, name: str):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a comma-separated list") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flownp.experiment import GridConfig
    from flownp.train import TrainConfig

    g, tc = GridConfig(), TrainConfig()
    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--out", default="runs/experiment", help="experiment folder (run again to resume)"
    )
    grid.add_argument(
        "--conv",
        type=_csv(str, "--conv"),
        default=",".join(g.convs),
        help="convolutions, e.g. cinc,1x1 (any of cinc, emerging, 1x1, 1x1+emerging, "
        "1x1+cinc, periodic, reverse, shuffle)",
    )
    grid.add_argument(
        "--coupling",
        type=_csv(str, "--coupling"),
        default=",".join(g.couplings),
        help="couplings, e.g. affine,quad (or additive)",
    )
    grid.add_argument(
        "--depth",
        type=_csv(int, "--depth"),
        default=",".join(map(str, g.depths)),
        help="steps per level, e.g. 4,8",
    )
    grid.add_argument(
        "--seeds",
        default="3",
        help="seeds per variant: a count (seeds 0..N-1) or per depth, e.g. 4:3,8:2",
    )
    grid.add_argument(
        "--budget",
        type=_csv(str, "--budget"),
        default=",".join(g.budgets),
        help="steps (equal steps), seconds (equal wall-clock time) or both",
    )
    grid.add_argument(
        "--steps", type=int, default=g.steps, help="training steps per run (steps budget)"
    )
    grid.add_argument(
        "--seconds",
        type=float,
        default=g.seconds,
        help="seconds of training per run (seconds budget)",
    )
    grid.add_argument(
        "--max-steps",
        type=int,
        default=g.max_steps,
        help="step cap of the seconds budget",
    )
    grid.add_argument(
        "--sample-images",
        type=int,
        default=g.sample_images,
        help="images of the sampling-time measurement",
    )
    grid.add_argument(
        "--temperature", type=float, default=g.temperature, help="temperature of those samples"
    )
    grid.add_argument("--status", action="store_true", help="list the runs and their state only")
    grid.add_argument(
        "--report-only", action="store_true", help="rebuild the report from finished runs only"
    )
    grid.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="threads of the kernels, the same for every run (default: all usable CPUs; with "
        "several processes, the CPUs of a node divided among its processes)",
    )
    grid.add_argument("--progress", action="store_true", help="a progress bar per run")

    sweep = parser.add_argument_group("temperature sweep (trains nothing)")
    sweep.add_argument(
        "--temperature-sweep",
        type=_csv(float, "--temperature-sweep"),
        default=None,
        metavar="T1,T2,...",
        help="legible-digit share of samples at each temperature",
    )
    sweep.add_argument(
        "--checkpoint",
        action="append",
        default=None,
        help="checkpoint to sweep (repeatable; default: every finished run of --out)",
    )
    sweep.add_argument(
        "--sweep-images", type=int, default=200, help="samples per temperature and checkpoint"
    )

    _train.add_config_options(
        parser,
        skip=("conv", "coupling", "depth", "seed"),
        defaults={"lr": tc.lr, "warmup_steps": tc.warmup_steps, "eval_every": 200},
        resume=False,
    )


def grid_from_args(args: argparse.Namespace):
    """The :class:`~flownp.experiment.GridConfig` of the command line."""
    from flownp.experiment import GridConfig, parse_seeds

    _train.class_options(args)
    model = {k: getattr(args, k) for k in MODEL_OPTIONS}
    if args.class_conditional:  # the number of classes comes from the data
        model[_train.CLASS_OPTION] = True
    train = {k: getattr(args, k) for k in TRAIN_OPTIONS}
    train["max_grad_norm"] = train["max_grad_norm"] or None
    train["ema_decay"] = train["ema_decay"] or None
    return GridConfig(
        convs=args.conv,
        couplings=args.coupling,
        depths=args.depth,
        seeds=parse_seeds(args.seeds, args.depth),
        budgets=args.budget,
        steps=args.steps,
        seconds=args.seconds,
        max_steps=args.max_steps,
        model=model,
        train=train,
        sample_images=args.sample_images,
        temperature=args.temperature,
    )


def run(args: argparse.Namespace) -> int:
    from flownp import threads

    with threads.limit(args.threads):
        if args.temperature_sweep is not None:
            return _sweep(args)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from flownp import distributed
    from flownp import experiment as E

    grid = grid_from_args(args)
    out = Path(args.out)
    if args.status and not distributed.world().is_root:  # process 0 looks and says
        return 0
    if args.status:
        for spec, state in E.grid_status(grid, out):
            print(f"{state:8s} {spec.folder(grid)}")
        return 0
    t0 = time.perf_counter()
    results = E.run_grid(
        grid,
        out,
        log=lambda m: print(m, flush=True),
        progress=args.progress,
        train=not args.report_only,
    )
    failed = [r for r in results if r["status"] != "done"]
    print(
        f"{len(results)} of {len(grid.runs())} runs finished ({len(failed)} failed) in "
        f"{time.perf_counter() - t0:.0f} s; report: {out / 'report' / 'report.md'}"
    )
    return 1 if failed else 0


def _sweep(args: argparse.Namespace) -> int:
    from flownp import distributed

    if not distributed.world().is_root:  # several processes: process 0 does the sweep
        return 0
    return _sweep_here(args)


def _sweep_here(args: argparse.Namespace) -> int:
    from flownp.checkpoint import load_model
    from flownp.digits import format_sweep, temperature_sweep
    from flownp.experiment import mean_std

    if args.checkpoint:
        paths = [Path(p) for p in args.checkpoint]
    else:
        paths = sorted(Path(args.out).glob("runs/*/*/seed*/result.json"))
        paths = [p.with_name("checkpoint.h5") for p in paths]
        if not paths:
            raise DataError(f"no finished runs in {args.out}; give --checkpoint")
    by_variant: dict[str, dict[float, list[float]]] = {}
    for path in paths:
        model = load_model(path)
        rows = temperature_sweep(model, args.temperature_sweep, n=args.sweep_images)
        print(f"{path}:\n{format_sweep(rows)}\n")
        run = path.parent  # <out>/runs/<budget>/<variant>/seed<k>
        variant = (
            f"the {len(paths)} checkpoints"
            if args.checkpoint
            else f"{run.parent.parent.name} {run.parent.name}"
        )
        for t, score in rows:
            by_variant.setdefault(variant, {}).setdefault(t, []).append(score.share)
    if len(paths) > 1:
        temps = list(args.temperature_sweep)
        print(
            "legible samples %, mean ± std over the given checkpoints"
            if args.checkpoint
            else "legible samples %, mean ± std over the checkpoints of each variant"
        )
        print("| variant | " + " | ".join(f"T = {t:g}" for t in temps) + " |")
        print("|---|" + "---|" * len(temps))
        for variant, shares in by_variant.items():
            cells = []
            for t in temps:
                m, s, n = mean_std(shares[t])
                cells.append(f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if n > 1 else ""))
            print(f"| {variant} | " + " | ".join(cells) + " |")
    return 0
