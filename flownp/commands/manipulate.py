"""flownp manipulate: edit images along attribute directions in the exact latent space
(paper Section 4, Figure 5).

Encodes a labelled data set with a trained model, computes one latent direction per attribute
(default: the regression direction Cov(z, a) / Var(a); see docs/latent.md), then encodes a few
held-out images, moves their latents by s * direction for a sweep of strengths s and decodes
them. The figure has one row per (attribute, image), the original (s = 0) in the middle column
with the strengths either side, as in the paper's Figure 5(d).

Data: --data mnist (bundled; directions from the first 9000 images, examples from the held-out
last 1000; attributes digit_0..digit_9, thickness, slant, ink), any other `flownp.data` spec
with class labels (one-hot class_k attributes), or CelebA: --celeba-attrs list_attr_celeba.txt
--celeba-images img_align_celeba/ (directions from the first --max-images rows, examples from
the last rows of the file, CelebA's official test partition).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from flownp import figures, latent
from flownp.commands import _latent as common
from flownp.commands._common import positive_float, positive_int
from flownp.data import attributes, pixels
from flownp.errors import DataError
from flownp.files import npz_bytes, refuse_existing, write_atomic

HELP = "edit images along attribute directions of the latent space (paper Figure 5)"


def strength_labels(strengths: np.ndarray) -> list[str]:
    return ["original" if s == 0 else f"{s:+.3g}" for s in strengths]


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_data_arguments(parser)
    parser.add_argument(
        "--attribute",
        action="append",
        default=None,
        help="attribute to edit (repeatable; default: thickness and slant on MNIST). "
        "--list-attributes shows the names",
    )
    parser.add_argument(
        "--list-attributes", action="store_true", help="print the attribute names and exit"
    )
    parser.add_argument(
        "--method",
        choices=latent.METHODS,
        default="regression",
        help="direction: regression Cov(z,a)/Var(a), mean_difference mean(z|a>0) - "
        "mean(z|a<=0), or the raw covariance Cov(z,a)",
    )
    parser.add_argument(
        "--max-strength",
        type=positive_float,
        default=2.0,
        help="largest |s| of the sweep z + s*direction (regression: attribute units; "
        "MNIST pixel attributes are standardised, so 1 = one standard deviation)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="strengths on each side of the original"
    )
    parser.add_argument(
        "--num-images", type=positive_int, default=4, help="held-out images to edit"
    )
    parser.add_argument(
        "--max-images",
        type=positive_int,
        default=10000,
        help="labelled images encoded to compute the directions",
    )
    parser.add_argument(
        "--save-directions", metavar="FILE.npz", help="also save the directions (npz)"
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def _labelled(args: argparse.Namespace, model: Any) -> attributes.LabelledImages:
    if args.celeba_attrs:
        return attributes.load_celeba(
            args.celeba_attrs,
            args.celeba_images,
            image_shape=common.required_image_shape(model),
            limit=args.max_images,
            crop=args.crop,
            progress=args.progress,
        )
    data = attributes.load_labelled(args.data, "train")
    n = min(len(data.images), args.max_images)
    return attributes.LabelledImages(
        data.name, data.images[:n], data.attributes[:n], data.attribute_names
    )


def run(args: argparse.Namespace) -> int:
    common.check_args(args)
    if args.list_attributes:
        if args.celeba_attrs:
            names = attributes.read_celeba_attributes(args.celeba_attrs).names
        else:
            names = attributes.load_labelled(args.data, "train").attribute_names
        print("\n".join(names))
        return 0
    if args.steps < 1 or args.num_images < 1 or args.max_images < 2:
        raise DataError("--steps and --num-images must be >= 1, --max-images >= 2")
    n_attributes = len(args.attribute) if args.attribute else 2  # default: thickness, slant
    common.check_figure_cells(
        n_attributes * args.num_images, 2 * args.steps + 1, "--attribute, --num-images and --steps"
    )
    model = common.load_model(args)
    data = _labelled(args, model)
    common.check_shape(data.images, model, data.name)
    wanted = args.attribute or (
        ["thickness", "slant"] if "thickness" in data.attribute_names else None
    )
    if not wanted:
        raise DataError(f"choose --attribute; available: {', '.join(data.attribute_names)}")
    unknown = [a for a in wanted if a not in data.attribute_names]
    if unknown:
        raise DataError(
            f"unknown attribute(s) {unknown}; available: {', '.join(data.attribute_names)}"
        )
    cols = [data.attribute_names.index(a) for a in wanted]
    out = common.figure_path(args, f"manipulate_{'_'.join(wanted)}.png")
    if args.save_directions:
        refuse_existing(
            args.save_directions, args.overwrite, option="--save-directions", suffixes=(".npz",)
        )
    print(f"directions ({args.method}) from {len(data.images)} images of {data.name}")
    stats = latent.encode_statistics(
        model,
        data.images,
        data.attributes[:, cols],
        wanted,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    V = stats.directions(args.method)  # (K, D)
    for k, name in enumerate(wanted):
        print(
            f"  {name}: {stats.n_pos[k]} images with a > 0, {stats.n_neg[k]} without; "
            f"|direction| = {np.linalg.norm(V[k]):.4g} (latent dim {V.shape[1]})"
        )
    if args.save_directions:
        data_npz = npz_bytes(
            compressed=False,
            directions=V,
            names=np.array(wanted),
            method=np.array(args.method),
            n_pos=stats.n_pos,
            n_neg=stats.n_neg,
        )
        write_atomic(args.save_directions, data_npz)
        print(f"directions saved to {args.save_directions}")

    examples, where = common.load_examples(args, model, args.num_images)
    strengths = latent.strength_sweep(args.max_strength, args.steps)
    mid = args.steps
    rows, labels, worst = [], [], 0.0
    for k, name in enumerate(wanted):
        edited = latent.manipulate(
            model, examples, V[k], strengths, batch_size=args.batch_size
        )  # (N, S, H, W, C)
        x0 = pixels.images_to_model(examples, edited.dtype, latent.model_n_bits(model))
        worst = max(worst, float(np.max(np.abs(edited[:, mid] - x0))))
        rows.append(edited)
        labels += [f"{name}\n#{i}" for i in range(len(examples))]
    grid = np.concatenate(rows, axis=0)
    print(f"edited {len(examples)} images ({where}), strengths {np.round(strengths, 4).tolist()}")
    print(f"reconstruction (s = 0) max |error| = {worst:.3e}")
    figures.save_image_grid(
        grid,
        out,
        column_labels=strength_labels(strengths),
        row_labels=labels,
        highlight_column=mid,
        title=f"{args.method} directions, z + s v",
        n_bits=latent.model_n_bits(model),
    )
    print(f"figure: {out}")
    return 0
