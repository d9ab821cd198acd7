"""Options and loading shared by the latent-space commands (``flownp manipulate``,
``flownp interpolate``, ``flownp reconstruct``): the checkpoint and data-source options, the
model, and held-out example images (from any dataset spec, or CelebA)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from flownp import latent
from flownp.commands._common import add_overwrite, positive_int
from flownp.data import attributes
from flownp.errors import DataError, UsageError


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and data-source options shared by the latent-space commands."""
    parser.add_argument("checkpoint", help="checkpoint file of a trained model (checkpoint.h5)")
    parser.add_argument(
        "--data",
        default="mnist",
        help="data set spec of flownp.data.load_dataset (ignored with --celeba-attrs)",
    )
    parser.add_argument(
        "--celeba-attrs", metavar="FILE", help="CelebA attribute file (list_attr_celeba.txt)"
    )
    parser.add_argument(
        "--celeba-images", metavar="DIR", help="CelebA image folder (img_align_celeba)"
    )
    parser.add_argument(
        "--crop",
        type=positive_int,
        default=None,
        help="CelebA: side of the centred square crop before resizing "
        "(default: the largest centred box with the model's aspect ratio)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=128, help="images per model call"
    )
    parser.add_argument("--out", default=None, help="output PNG (default: next to the checkpoint)")
    add_overwrite(parser)


def check_args(args: argparse.Namespace) -> None:
    if bool(args.celeba_attrs) != bool(args.celeba_images):
        raise DataError("--celeba-attrs and --celeba-images must be given together")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")


def load_model(args: argparse.Namespace) -> Any:
    from flownp.checkpoint import load_model

    model = load_model(args.checkpoint)
    print(
        f"model: {args.checkpoint} (image {latent.model_image_shape(model)}, "
        f"{latent.model_dtype(model)})"
    )
    return model


def required_image_shape(model: Any) -> tuple[int, int, int]:
    shape = latent.model_image_shape(model)
    if shape is None:
        raise DataError("the model does not state its image shape (model.config.image_shape)")
    return shape


def check_shape(images: np.ndarray, model: Any, source: str) -> None:
    shape = latent.model_image_shape(model)
    if shape is not None and images.shape[1:] != shape:
        raise DataError(
            f"{source}: images are {images.shape[1:]} (H, W, C) but the model expects {shape}"
        )


def load_examples(args: argparse.Namespace, model: Any, n: int) -> tuple[np.ndarray, str]:
    """``n`` held-out uint8 images for the figures, and a description of where they come from
    (CelebA: the last ``n`` rows of the attribute file; other data: the first ``n`` test
    images)."""
    if args.celeba_attrs:
        table = attributes.read_celeba_attributes(args.celeba_attrs)
        start = max(0, len(table.filenames) - n)
        data = attributes.load_celeba(
            table,
            args.celeba_images,
            image_shape=required_image_shape(model),
            start=start,
            crop=args.crop,
        )
        return data.images, data.name
    from flownp.data import load_dataset

    ds = load_dataset(args.data)
    images = ds.test[:n]
    check_shape(images, model, args.data)
    return images, f"{args.data} held-out images 0..{len(images) - 1}"


#: Cells (images) of a latent-space figure at most: one inch each, so 2500 is a 50 x 50 inch
#: picture; more would take minutes to draw and gigabytes to hold, and show nothing.
MAX_FIGURE_CELLS = 2500


def check_figure_cells(rows: int, columns: int, options: str) -> None:
    """Refuse a figure of more than :data:`MAX_FIGURE_CELLS` images before any work (the
    latent paths behind it are held in memory too); ``options`` names what sets its size."""
    if rows * columns > MAX_FIGURE_CELLS:
        raise UsageError(
            f"{options}: the figure would hold {rows} x {columns} = {rows * columns} images, "
            f"more than {MAX_FIGURE_CELLS}; ask for fewer"
        )


def figure_path(args: argparse.Namespace, name: str) -> Path:
    """The figure to write: ``--out``, else ``name`` next to the checkpoint; a ``.png`` that
    does not exist yet unless ``--overwrite`` (checked before the work)."""
    from flownp.files import refuse_existing

    path = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / name
    return refuse_existing(path, args.overwrite, option="--out", suffixes=(".png",))
