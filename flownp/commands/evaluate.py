"""Print the bits/dim of a trained flow on held-out images.

bits/dim = (-log p(x) + D ln 256) / (D ln 2) with uniform dequantisation noise drawn from a
fixed seed (so the number is reproducible); 8.0 is a uniform model. A model of N-bit data
(flownp train --n-bits N) counts D ln 2^N instead of D ln 256 (N.0 is a uniform model). The data
set is the one the model was trained on (from the checkpoint) unless --dataset is given. The
EMA (Polyak) weights are used when the checkpoint has them.

A class-conditional model (flownp train --class-conditional) is evaluated given the label,
-log p(x | y), and as a generative classifier: the share of images whose
argmax_y log p(x | y) is their label (every class scored on the same latent; only the prior
changes); with --weight-y > 0 also the accuracy of its linear classifier.

Before it, the stability of the inverse (docs/stability.md): the reconstruction error
x -> z -> x on the first --stability-images held-out images in float32 and float64 (and in
float32 with the substitutions solved in float64), and per invertible convolution its dominance
ratio and bound, the exact amplification ||M^-1||_inf, its growth per image row and its own
round-trip errors on its input activations. A warning goes to stderr when the float32
reconstruction error exceeds --stability-threshold or a layer is unstable or at risk.
"""

from __future__ import annotations

import argparse
import time

from flownp.commands._common import (
    add_threads_and_ema,
    nonnegative_int,
    positive_float,
    positive_int,
    run_with_threads,
    seed_int,
)
from flownp.errors import DataError, UsageError

HELP = "print held-out bits/dim of a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file (checkpoint.h5 of a run folder)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset spec (default: the one in the checkpoint); when the training data has "
        "moved, its new place: it must match the fingerprint stored at training time",
    )
    parser.add_argument(
        "--other-data",
        action="store_true",
        help="evaluate on data other than the training data (skips the fingerprint check), "
        "e.g. another dataset of the same image shape",
    )
    parser.add_argument(
        "--holdout",
        type=positive_int,
        default=None,
        help="held-out images (default: the checkpoint's training setting); at most the "
        "training's held-out count, so that no training image is evaluated",
    )
    parser.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="evaluate the held-out (test) or the training images",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="only the first LIMIT images"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=500, help="images per forward pass"
    )
    parser.add_argument(
        "--seed", type=seed_int, default=1234, help="seed of the dequantisation noise"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--stability-images",
        type=nonnegative_int,
        default=64,
        help="held-out images of the stability report (0 = no report)",
    )
    parser.add_argument(
        "--stability-threshold",
        type=positive_float,
        default=1e-4,
        help="float32 reconstruction error above which the inverse is reported unstable",
    )
    add_threads_and_ema(parser)


def run(args: argparse.Namespace) -> int:
    return run_with_threads(args, _run)


def _run(args: argparse.Namespace) -> int:
    import math

    from flownp import distributed
    from flownp.checkpoint import model_from_checkpoint, read_checkpoint
    from flownp.data import check_fingerprint
    from flownp.train import evaluate_bpd
    from flownp.train.data_stream import load_data
    from flownp.train.evaluation import evaluate_classes

    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.stability_images < 0 or not args.stability_threshold > 0:
        raise DataError("--stability-images must be >= 0 and --stability-threshold > 0")
    comm = distributed.world()  # several processes: each evaluates its share of each batch
    ckpt = read_checkpoint(args.checkpoint, comm=comm)
    model = model_from_checkpoint(ckpt, use_ema=not args.no_ema)
    tc = ckpt.train_config or {}
    spec = args.dataset or tc.get("dataset", "mnist")
    trained = tc.get("holdout")
    holdout = args.holdout if args.holdout is not None else trained

    def local_data():  # every process reads its own copy, checked against the fingerprint
        data = load_data(spec, holdout)
        if not args.other_data:
            check_fingerprint(data, tc.get("dataset_fingerprint"), f"dataset {spec!r}")
            if args.split == "test" and holdout != trained:
                _check_held_out(data, load_data(spec, trained), args.holdout)
        return data

    data = distributed.together(comm, local_data)
    if args.other_data:  # not checked against the training data: the same on every process
        from flownp.data import fingerprint

        distributed.agree(comm, {"the evaluated data": fingerprint(data)})
    images = data.test if args.split == "test" else data.train
    if args.limit is not None:
        images = images[: args.limit]
    if images.shape[1:] != model.config.image_shape:
        raise DataError(
            f"dataset {spec!r} has images {images.shape[1:]}, the model expects "
            f"{model.config.image_shape}"
        )
    labels = _labels(model, data, args, spec, len(images))
    t0 = time.perf_counter()
    kw = {
        "batch_size": args.batch_size,
        "seed": args.seed,
        "progress": not args.no_progress and comm.is_root,
        "comm": comm,
    }
    classes = None
    if labels is None:
        bpd = evaluate_bpd(model, images, **kw)
    else:
        classes = evaluate_classes(model, images, labels, **kw)
        bpd = classes.bpd
    dt = time.perf_counter() - t0
    weights = "raw" if args.no_ema or not (ckpt.optimizer_state or {}).get("ema") else "EMA"
    if not comm.is_root:  # process 0 reports
        return 0 if math.isfinite(bpd) else 1
    if args.stability_images:
        try:
            _stability_report(model, images[: args.stability_images], args)
        except Exception as exc:  # process 0 alone: nobody waits for it any more
            raise distributed.collective(exc) from None
    processes = f", {comm.size} processes" if comm.size > 1 else ""
    print(f"{spec} {args.split}: {len(images)} images, {weights} weights, {dt:.1f} s{processes}")
    bits = "" if model.config.n_bits == 8 else f" ({model.config.n_bits}-bit data)"
    if classes is None:
        print(f"bits/dim{bits}: {bpd:.4f}")
        return 0 if math.isfinite(bpd) else 1
    print(f"bits/dim given the label{bits}: {bpd:.4f}")
    print(
        f"generative classifier accuracy (argmax_y log p(x | y)): {classes.accuracy:.2%} "
        f"of {classes.num_images}"
    )
    if classes.classifier_accuracy is not None:
        print(
            f"linear classifier accuracy (top latent): {classes.classifier_accuracy:.2%}, "
            f"cross-entropy {classes.bits_y:.4f} bits"
        )
    return 0 if math.isfinite(bpd) else 1


def _labels(model, data, args: argparse.Namespace, spec: str, n: int):
    """The labels of the evaluated images for a class-conditional model (None otherwise);
    unlabelled data is a :class:`~flownp.errors.UsageError`."""
    if not model.config.num_classes:
        return None
    labels = data.test_labels if args.split == "test" else data.train_labels
    if labels is None:
        raise UsageError(
            f"the model in {args.checkpoint} is class-conditional and is evaluated given the "
            f"labels, but dataset {spec!r} has no labels for its {args.split} images"
        )
    return labels[:n]


def _check_held_out(data, training_split, holdout: int) -> None:
    """Refuse a ``--holdout`` whose held-out images are not all held out of the training: the
    evaluated images must be the last images of the held-out set the model never saw."""
    import numpy as np

    seen = training_split.test
    k = len(data.test)
    if k <= len(seen) and np.array_equal(data.test, seen[len(seen) - k :]):
        return
    raise UsageError(
        f"--holdout {holdout}: the model was trained with {len(seen)} images held out, so "
        f"these {k} would include images it was trained on; give "
        f"--holdout {len(seen)} or less, --split train to evaluate on training images, or "
        "--other-data with --dataset for other data"
    )


def _stability_report(model, images, args: argparse.Namespace) -> None:
    import sys

    import numpy as np

    from flownp import stability as S
    from flownp.data.pixels import dequantize

    t0 = time.perf_counter()
    x = dequantize(images, np.random.default_rng(args.seed), model.dtype, model.config.n_bits)
    rep = S.measure_model_stability(model, x, threshold=args.stability_threshold)
    print(f"stability of the inverse ({time.perf_counter() - t0:.1f} s):")
    print(rep.format() + "\n")
    warning = rep.warning()
    if warning is not None:
        print(f"WARNING: {warning}", file=sys.stderr)
