"""flownp reconstruct: encode and decode held-out images and report the error.

A flow is a bijection, so f^{-1}(f(x)) = x up to floating-point error: this prints the
maximum and rms absolute error (pixel range 1, model space u/256 - 0.5) and the number of
uint8 pixels that differ after rounding. Exit code 1 when the maximum error exceeds --tol
(default 1/512: half a grey level, the largest error that still gives every uint8 pixel back).
"""

from __future__ import annotations

import argparse

import numpy as np

from flownp import figures, latent
from flownp.commands import _latent as common
from flownp.commands._common import positive_float, positive_int
from flownp.data import pixels
from flownp.errors import DataError

HELP = "report the reconstruction error f^-1(f(x)) - x on held-out images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_data_arguments(parser)
    parser.add_argument(
        "--num-images", type=positive_int, default=256, help="held-out images to use"
    )
    parser.add_argument(
        "--tol", type=positive_float, default=1.0 / 512, help="fail (exit 1) above this max |error|"
    )
    parser.add_argument(
        "--figure",
        action="store_true",
        help="also save originals / reconstructions / |error| (scaled to its max) as a PNG",
    )


def run(args: argparse.Namespace) -> int:
    common.check_args(args)
    if args.num_images < 1:
        raise DataError(f"--num-images must be >= 1, got {args.num_images}")
    out = common.figure_path(args, "reconstruct.png") if args.figure or args.out else None
    model = common.load_model(args)
    images, where = common.load_examples(args, model, args.num_images)
    report, rec = latent.reconstruction_report(model, images, batch_size=args.batch_size)
    print(f"{where}")
    print(report)
    if out is not None:
        n = min(8, len(images))
        x = pixels.images_to_model(images[:n], np.float64, latent.model_n_bits(model))
        err = np.abs(rec[:n].astype(np.float64) - x)  # (n, H, W, C)
        scale = max(report.max_abs_error, np.finfo(np.float64).tiny)
        grid = np.stack([x, rec[:n].astype(np.float64), err / scale - 0.5], axis=0)
        figures.save_image_grid(
            grid,
            out,
            row_labels=["original", "f^-1(f(x))", "|error|"],
            title=f"max |error| = {report.max_abs_error:.2e} (white in the last row)",
            n_bits=latent.model_n_bits(model),
        )
        print(f"figure: {out}")
    if not report.max_abs_error <= args.tol:
        print(f"FAILED: max |error| {report.max_abs_error:.3e} > --tol {args.tol:.3e}")
        return 1
    return 0
