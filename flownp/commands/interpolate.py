"""flownp interpolate: decode the latent path between pairs of held-out images.

z(t) = (1 - t) z0 + t z1 (--method linear) or the spherical path (slerp, keeps the latent norm;
see docs/latent.md), for --steps values of t from 0 to 1. The first and last columns are the
decoded endpoints, i.e. the reconstructions of the two images (exact up to float error; the
number is printed).
"""

from __future__ import annotations

import argparse

import numpy as np

from flownp import figures, latent
from flownp.commands import _latent as common
from flownp.commands._common import int_at_least, positive_int
from flownp.data import pixels
from flownp.errors import DataError

HELP = "interpolate between images in the exact latent space"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_data_arguments(parser)
    parser.add_argument(
        "--pairs",
        default=None,
        help="comma-separated index pairs into the held-out images, e.g. 0:1,2:3 "
        "(default: 0:1, 2:3, ... for --num-pairs pairs)",
    )
    parser.add_argument(
        "--num-pairs", type=positive_int, default=4, help="pairs when --pairs is absent"
    )
    parser.add_argument(
        "--steps", type=int_at_least(2), default=9, help="points on each path, endpoints included"
    )
    parser.add_argument("--method", choices=latent.INTERPOLATIONS, default="linear")


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """``"0:1,2:3"`` -> ``[(0, 1), (2, 3)]``; anything else -> DataError."""
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise DataError(f"--pairs: expected I:J with non-negative integers, got {item!r}")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def run(args: argparse.Namespace) -> int:
    common.check_args(args)
    if args.steps < 2:
        raise DataError(f"--steps must be >= 2 (the two endpoints), got {args.steps}")
    n_pairs = len(args.pairs.split(",")) if args.pairs else args.num_pairs
    common.check_figure_cells(n_pairs, args.steps, "--pairs / --num-pairs and --steps")
    if args.pairs:
        pairs = parse_pairs(args.pairs)
    else:
        if args.num_pairs < 1:
            raise DataError(f"--num-pairs must be >= 1, got {args.num_pairs}")
        pairs = [(2 * i, 2 * i + 1) for i in range(args.num_pairs)]
    out = common.figure_path(args, f"interpolate_{args.method}.png")
    model = common.load_model(args)
    need = max(max(p) for p in pairs) + 1
    images, where = common.load_examples(args, model, need)
    if len(images) < need:
        raise DataError(
            f"--pairs uses index {need - 1} but only {len(images)} images are available"
        )
    i0 = np.array([p[0] for p in pairs])
    i1 = np.array([p[1] for p in pairs])
    paths = latent.interpolate(
        model, images[i0], images[i1], args.steps, method=args.method, batch_size=args.batch_size
    )  # (P, T, H, W, C)
    bits = latent.model_n_bits(model)
    x0 = pixels.images_to_model(images[i0], paths.dtype, bits)
    x1 = pixels.images_to_model(images[i1], paths.dtype, bits)
    err = max(float(np.max(np.abs(paths[:, 0] - x0))), float(np.max(np.abs(paths[:, -1] - x1))))
    print(f"{len(pairs)} pair(s) of {where}, {args.steps} steps, {args.method}")
    print(f"endpoint reconstruction max |error| = {err:.3e}")
    t = np.linspace(0.0, 1.0, args.steps)
    figures.save_image_grid(
        paths,
        out,
        column_labels=[f"t={v:.2f}" for v in t],
        row_labels=[f"{a}->{b}" for a, b in pairs],
        title=f"{args.method} interpolation in latent space",
        n_bits=bits,
    )
    print(f"figure: {out}")
    return 0
