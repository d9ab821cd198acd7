"""Draw samples from a trained flow and save them as one PNG grid.

x = f^{-1}(T * eps), eps ~ N(0, I) (standard-normal latent of every level); T < 1 (e.g. 0.7,
as in Glow) gives cleaner, less diverse images. The EMA (Polyak) weights are used when the
checkpoint has them.

--solve-precision sets the precision of the CInC/emerging substitutions (docs/stability.md):
"model" (the checkpoint's dtype, default), "float64" (as the official code) or "auto"
(float64 only for the layers whose amplification is not provably bounded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from flownp.commands._common import (
    add_threads_and_ema,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    run_with_threads,
)
from flownp.digits import report_samples
from flownp.errors import DataError
from flownp.model import SAMPLE_TEMPERATURE

HELP = "write a PNG grid of samples from a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file (checkpoint.h5 of a run folder)")
    parser.add_argument("-n", "--num", type=positive_int, default=64, help="number of samples")
    parser.add_argument(
        "-t",
        "--temperature",
        type=nonnegative_float,
        default=SAMPLE_TEMPERATURE,
        help="latent temperature T (standard deviation of the latent; default: %(default)s)",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the latent draw")
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
    add_threads_and_ema(parser)
    parser.add_argument(
        "--solve-precision",
        choices=("model", "float64", "auto"),
        default="model",
        help="precision of the convolution substitutions (docs/stability.md)",
    )


def run(args: argparse.Namespace) -> int:
    return run_with_threads(args, _run)


def _run(args: argparse.Namespace) -> int:
    from flownp.checkpoint import load_model
    from flownp.data.pixels import to_uint8
    from flownp.figures import save_grid

    if args.num < 1:
        raise DataError(f"--num must be >= 1, got {args.num}")
    if not args.temperature >= 0:
        raise DataError(f"--temperature must be >= 0, got {args.temperature}")
    _output_path(args)  # refuse a bad --out before the work
    model = load_model(args.checkpoint, use_ema=not args.no_ema)
    x = model.sample(
        args.num,
        temperature=args.temperature,
        seed=args.seed,
        solve_precision=args.solve_precision,
    )
    if not np.isfinite(x).all():
        print(
            f"warning: {np.size(x) - np.count_nonzero(np.isfinite(x))} non-finite pixel "
            "values in the samples (drawn black)",
            file=sys.stderr,
        )
    out = _output_path(args)
    save_grid(x, out, ncols=args.ncols, title=f"{args.num} samples, T = {args.temperature:g}")
    print(f"{args.num} samples ({model.config.image_shape}, T = {args.temperature:g}): {out}")
    report_samples(x)  # MNIST-shaped: share of samples a digit classifier is sure of
    if args.npz:
        np.savez_compressed(args.npz, images=to_uint8(x))
        print(f"uint8 samples: {args.npz}")
    return 0


def _output_path(args: argparse.Namespace) -> Path:
    """The PNG to write: ``--out`` itself when it ends in ``.png``, else ``--out`` is a folder
    and the file ``samples_T<T>.png`` goes into it; without ``--out``, next to the checkpoint."""
    name = f"samples_T{args.temperature:g}.png"
    if args.out is None:
        return Path(args.checkpoint).resolve().parent / name
    out = Path(args.out)
    if out.suffix.lower() == ".png" and not out.is_dir():
        return out
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {args.out}: exists and is not a folder or a .png file")
    if out.suffix and not out.is_dir():
        raise DataError(
            f"--out {args.out}: give a .png file or a folder (samples are written as PNG)"
        )
    return out / name
