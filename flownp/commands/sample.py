"""Draw samples from a trained flow and save them as one PNG grid.

x = f^{-1}(T * eps), eps ~ N(0, I) (standard-normal latent of every level); T < 1 (e.g. 0.7,
as in Glow) gives cleaner, less diverse images. The EMA (Polyak) weights are used when the
checkpoint has them.

--solve-precision sets the precision of the CInC/emerging substitutions (docs/stability.md):
"model" (the checkpoint's dtype, default), "float64" (as the official code) or "auto"
(float64 only for the layers whose amplification is not provably bounded).

A class-conditional model (flownp train --class-conditional) samples given a label:
--label K draws every sample of class K; --label all (the default for such a model) draws a
grid with one row per class, --num samples per class. For MNIST-shaped models the digit
classifier then also reports the share of samples that are confidently the requested digit.

The grid shows at most the first 1024 samples; --npz holds all of them. Existing output files
are refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from flownp.commands._common import (
    add_overwrite,
    add_threads_and_ema,
    nonnegative_float,
    positive_int,
    run_with_threads,
    seed_int,
)
from flownp.digits import report_samples
from flownp.errors import UsageError
from flownp.model import SAMPLE_TEMPERATURE

HELP = "write a PNG grid of samples from a checkpoint"
#: Samples drawn per model call (the latent stream is the same as one call for all of them).
SAMPLE_BATCH = 1024
#: Samples shown in the PNG grid at most (all of them go to --npz).
GRID_MAX = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file (checkpoint.h5 of a run folder)")
    parser.add_argument(
        "-n",
        "--num",
        type=positive_int,
        default=None,
        help="number of samples (default 64); with --label all: samples per class (default 10)",
    )
    parser.add_argument(
        "--label",
        type=_label_value,
        default=None,
        metavar="K|all",
        help="class-conditional models: draw every sample of class K, or 'all' for one row "
        "per class (the default for such a model)",
    )
    parser.add_argument(
        "-t",
        "--temperature",
        type=nonnegative_float,
        default=SAMPLE_TEMPERATURE,
        help="latent temperature T (standard deviation of the latent; default: %(default)s)",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of the latent draw")
    parser.add_argument(
        "--ncols", type=positive_int, default=None, help="grid columns (default: square)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="a .png file, or a folder to write samples_T<T>.png into (created if missing); "
        "default: samples_T<T>.png next to the checkpoint",
    )
    parser.add_argument(
        "--npz", default=None, help="also save the uint8 samples (N, H, W, C) to this .npz file"
    )
    add_overwrite(parser)
    add_threads_and_ema(parser)
    parser.add_argument(
        "--solve-precision",
        choices=("model", "float64", "auto"),
        default="model",
        help="precision of the convolution substitutions (docs/stability.md)",
    )


def _label_value(text: str) -> int | str:
    """``--label`` value: an int >= 0 or ``all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class number or 'all', got {text!r}"
        ) from None
    if val < 0:
        raise argparse.ArgumentTypeError(f"a class number is >= 0, got {val}")
    return val


def sample_labels(model, label: int | str | None, num: int | None, where: str) -> tuple:
    """``(labels or None, number of samples, columns or None)`` of a ``--label`` request for
    ``model``: refuses a label for an unconditional model, or outside its classes
    (:class:`~flownp.errors.UsageError`, one line)."""
    from flownp.digits import grid_labels

    K = model.config.num_classes
    if label is not None and not K:
        raise UsageError(f"--label: the model in {where} is not class-conditional")
    if not K:
        return None, num or 64, None
    if label is None or label == "all":
        per = num or 10
        return grid_labels(K, per), K * per, per
    if label >= K:
        raise UsageError(f"--label {label}: the model in {where} has the classes 0..{K - 1}")
    n = num or 64
    return np.full(n, label, dtype=np.int64), n, None


def run(args: argparse.Namespace) -> int:
    return run_with_threads(args, _run)


def _run(args: argparse.Namespace) -> int:
    from flownp import distributed
    from flownp.checkpoint import load_model
    from flownp.files import refuse_existing
    from flownp.limits import check_allocation

    comm = distributed.world()  # several processes: each inverts its share of every batch

    def outputs() -> Path:  # refuse a bad or existing output before the work
        if args.npz:
            refuse_existing(args.npz, args.overwrite, option="--npz", suffixes=(".npz",))
        return _output_path(args)

    out = distributed.on_root(comm, outputs)
    model = load_model(args.checkpoint, use_ema=not args.no_ema, comm=comm)
    labels, num, per_row = sample_labels(model, args.label, args.num, args.checkpoint)
    shape = tuple(model.config.image_shape)
    # the samples, their uint8 pixels and two float64 copies (the digit classifier's features)
    per_image = int(np.prod(shape)) * (np.dtype(model.dtype).itemsize + 1 + 16)
    check_allocation(
        num * per_image,
        f"-n {num}: {num} samples of {shape}",
        UsageError,
        hint="ask for fewer samples",
    )
    rng = np.random.default_rng(args.seed)
    x = np.empty((num, *shape), model.dtype) if comm.is_root else None
    for start in range(0, num, SAMPLE_BATCH):  # one latent stream, drawn in order
        stop = min(num, start + SAMPLE_BATCH)
        mine = distributed.share(stop - start, comm.rank, comm.size)
        part = model.sample(
            stop - start,
            temperature=args.temperature,
            seed=rng,
            labels=None if labels is None else labels[start:stop],
            solve_precision=args.solve_precision,
            part=mine,
        )
        parts = comm.gather(part)
        if x is not None and parts is not None:
            x[start:stop] = np.concatenate(parts)
    if x is None:  # the other processes are done: process 0 writes
        return 0
    try:
        return _write(args, x, out, model, labels, per_row)
    except Exception as exc:  # nobody waits for process 0 any more: a plain error
        raise distributed.collective(exc) from None


def _write(
    args: argparse.Namespace,
    x: np.ndarray,
    out: Path,
    model: Any,
    labels: np.ndarray | None,
    per_row: int | None,
) -> int:
    from flownp.data.pixels import to_uint8
    from flownp.figures import save_grid
    from flownp.files import npz_bytes, write_atomic

    if not np.isfinite(x).all():
        print(
            f"warning: {np.size(x) - np.count_nonzero(np.isfinite(x))} non-finite pixel "
            "values in the samples (drawn black)",
            file=sys.stderr,
        )
    num, shape = len(x), tuple(model.config.image_shape)
    shown = min(num, GRID_MAX)
    what = f"{num} samples" if shown == num else f"the first {shown} of {num}"
    if labels is not None:
        what += f" of class {args.label}" if per_row is None else ", one row per class"
    n_bits = model.config.n_bits
    title = f"{what}, T = {args.temperature:g}"
    save_grid(x[:shown], out, ncols=args.ncols or per_row, title=title, n_bits=n_bits)
    print(f"{what} ({shape}, T = {args.temperature:g}): {out}")
    # MNIST-shaped: share of samples a digit classifier is sure of (and of the requested digit)
    report_samples(x, requested=labels if model.config.num_classes == 10 else None)
    if args.npz:
        extra = {} if labels is None else {"labels": labels}
        write_atomic(args.npz, npz_bytes(images=to_uint8(x, n_bits), **extra))
        print(f"uint8 samples: {args.npz}")
    return 0


def _output_path(args: argparse.Namespace) -> Path:
    """The PNG to write: ``--out`` itself when it ends in ``.png``, else ``--out`` is a folder
    and the file ``samples_T<T>.png`` (``samples_T<T>_label<K>.png`` with ``--label K``,
    ``samples_T<T>_classes.png`` with ``--label all``) goes into it; without ``--out``, next to
    the checkpoint. An existing file is refused without ``--overwrite``."""
    from flownp.files import refuse_existing

    label = getattr(args, "label", None)
    suffix = "" if label is None else ("_classes" if label == "all" else f"_label{label}")
    name = f"samples_T{args.temperature:g}{suffix}.png"
    if args.out is None:
        path = Path(args.checkpoint).resolve().parent / name
    elif Path(args.out).suffix.lower() == ".png" and not Path(args.out).is_dir():
        path = Path(args.out)
    elif Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder or a .png file")
    elif Path(args.out).suffix and not Path(args.out).is_dir():
        raise UsageError(
            f"--out {args.out}: give a .png file or a folder (samples are written as PNG)"
        )
    else:
        path = Path(args.out) / name
    return refuse_existing(path, args.overwrite, option="--out", suffixes=(".png",))
