"""Train a multi-scale CInC flow (default: a small model on the bundled MNIST, a few minutes on
2 CPU cores) and write a run folder:

  checkpoint.h5   model, optimizer, RNG and data position, metrics (docs/checkpoint-format.md)
  metrics.csv     one row per step: bits/dim, lr, gradient norm, speed; held-out bits/dim
  loss_curve.png  training and held-out bits/dim
  samples.png     64 samples (EMA weights, temperature 0.8)
  config.json     the model and training configuration

Bits/dim = (-log p(x) + D ln 256) / (D ln 2) on uniformly dequantised data; 8.0 is a uniform
model. --n-bits N trains on the N high bits of each pixel and reports bits/dim on N-bit data
(D ln 2^N instead of D ln 256). --class-conditional models p(x | label) on labelled data
(bits/dim given the label, and the accuracy of argmax_y p(x | y)); --weight-y W adds W x the
cross-entropy in bits of a linear classifier on the top latent (docs/training.md).

A step is rejected (reported, update not applied) when its loss or gradient is NaN/Inf or
its loss is more than twice (and at least 1 bit/dim above) the median of the last 50
accepted losses. After --max-bad-steps rejected steps in a row training
stops (exit code 1); the checkpoint is only ever written with a usable state, so the run
folder keeps the last usable one (the message says which step and how to go on). Ctrl-C (or
SIGTERM) finishes the current step, saves the checkpoint and the curves, and exits with 130
(docs/reliability.md).

--resume continues a run exactly (same losses as without the interruption) up to the run's own
--steps; model and training options then come from the checkpoint, only --steps, --lr,
--warmup-steps (restarts the warmup; both recorded in the checkpoint's history), --time-limit,
--out and --dataset (the training data's new place, checked against the fingerprint stored at
training time) may be given. The dataset path is stored absolute, so commands work from any
folder. A folder that already holds a checkpoint is never trained into unless
resuming it or with --overwrite.

Exit codes: 0 done, 1 diverged, 2 bad input (options, data, checkpoint, disk), 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from flownp.commands._common import (
    decay_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    seed_int,
    thread_count,
)
from flownp.errors import DataError

HELP = "train a flow (default: small CInC flow on bundled MNIST, a few minutes)"

# option name -> (FlowConfig field) for the model options
MODEL_OPTIONS = (
    "levels",
    "depth",
    "width",
    "conv",
    "coupling",
    "kernel_size",
    "scale",
    "dtype",
    "cinc_corner",
    "lu",
    "guard",
    "weight_y",
    "n_bits",
    "label_prior",
)
#: The model option that is not a FlowConfig field: the number of classes comes from the data.
CLASS_OPTION = "class_conditional"
TRAIN_OPTIONS = (
    "dataset",
    "holdout",
    "batch_size",
    "lr",
    "warmup_steps",
    "max_grad_norm",
    "ema_decay",
    "init_batch_size",
    "eval_every",
    "eval_size",
    "checkpoint_every",
    "max_bad_steps",
    "seed",
    "optimizer",
    "recompute",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from flownp.train import TrainConfig

    tc = TrainConfig()
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out",
        default=None,
        help="run folder (default: runs/<timestamp>; with --resume: the checkpoint's folder); "
        "it must not hold a checkpoint already, unless --overwrite",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="train into --out even if it holds a checkpoint (which is replaced)",
    )
    run.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        default=None,
        help="continue the training saved in CHECKPOINT exactly",
    )
    run.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"total training steps (batches), including those already done when resuming "
        f"(default: {tc.steps}; with --resume: the run's own)",
    )
    run.add_argument(
        "--time-limit",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="stop cleanly (final evaluation, checkpoint, figures) after this many "
        "seconds of training",
    )
    run.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="threads of the kernels (default: all usable CPUs; with several processes, the "
        "CPUs of a node divided among its processes; docs/performance.md)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (otherwise: a bar on a terminal, or a plain line every 2%% "
        "of the run or minute when the output goes to a file)",
    )

    add_config_options(parser)


def add_config_options(
    parser: argparse.ArgumentParser,
    *,
    skip: tuple[str, ...] = (),
    defaults: dict[str, object] | None = None,
    resume: bool = True,
) -> None:
    """The data, model and optimisation options of a run (``flownp train``; ``flownp
    experiment`` shares them, without its grid axes). ``skip``: option names (dests) to leave
    out; ``defaults``: other defaults (``lr`` / ``warmup_steps`` default to None here, meaning
    the TrainConfig default, or the run's own when resuming); ``resume``: the command has
    ``--resume`` (the help texts say what it changes)."""
    from flownp.model import CINC_CORNERS, CONVS, COUPLINGS, SCALES, FlowConfig
    from flownp.optim import OPTIMIZERS
    from flownp.train import TrainConfig

    mc, tc = FlowConfig(), TrainConfig()
    defaults = defaults or {}

    class _Group:
        """An argument group that leaves out the skipped options and applies ``defaults``."""

        def __init__(self, title: str) -> None:
            self.group = parser.add_argument_group(title)

        def add_argument(self, flag: str, **kw) -> None:
            dest = flag.lstrip("-").replace("-", "_")
            if dest in skip:
                return
            if dest in defaults:
                kw["default"] = defaults[dest]
            self.group.add_argument(flag, **kw)

    data = _Group("data")
    data.add_argument(
        "--dataset",
        default=tc.dataset,
        help="dataset spec for flownp.data.load_dataset ('mnist' = the bundled "
        "MNIST test set: 9000 training / 1000 held-out images; 'array:FILE[:KEY]' = npz/npy/"
        "HDF5 arrays; see docs/data.md)"
        + (
            ". With --resume: where the training data is now, if it moved (it must match the "
            "fingerprint stored in the checkpoint)"
            if resume
            else ""
        ),
    )
    data.add_argument(
        "--holdout",
        type=positive_int,
        default=tc.holdout,
        help="number of held-out images (default: the dataset's own split)",
    )
    data.add_argument(
        "--n-bits",
        type=_n_bits_value,
        default=mc.n_bits,
        metavar="N",
        help="bits per pixel the model sees, 1..8: floor(u / 2^(8-N)) / 2^N - 0.5, dequantised "
        "with U(0, 1/2^N); bits/dim on N-bit data (default: %(default)s)",
    )

    model = _Group("model (docs/model.md)")
    model.add_argument("--levels", type=int, default=mc.levels, help="levels L (multi-scale)")
    model.add_argument("--depth", type=int, default=mc.depth, help="steps per level D")
    model.add_argument(
        "--width", type=int, default=mc.width, help="hidden channels of the coupling networks"
    )
    model.add_argument(
        "--conv",
        choices=CONVS,
        default=mc.conv,
        help="invertible convolution of each step: cinc (the paper's), emerging, 1x1 (Glow), "
        "1x1+emerging (the paper's Emerging baseline), 1x1+cinc, periodic (Emerging's periodic "
        "convolution, FFT), reverse / shuffle (a fixed channel permutation); docs/model.md",
    )
    model.add_argument(
        "--coupling",
        choices=COUPLINGS,
        default=mc.coupling,
        help="quad coupling (paper Eq. 3-6), affine coupling (Glow) or additive coupling "
        "(log-det 0; --scale unused)",
    )
    model.add_argument(
        "--kernel-size",
        type=int,
        default=mc.kernel_size,
        help="k of the CInC / emerging / periodic convolution",
    )
    model.add_argument(
        "--scale",
        choices=SCALES,
        default=mc.scale,
        help="coupling scale: exp(2 tanh(h / 2)) (exp with a bounded log: cannot overflow), "
        "exp(h) (the paper's equations) or sigmoid(h + 2) (the official code)",
    )
    model.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=mc.dtype,
        help="floating-point type of training",
    )
    model.add_argument(
        "--cinc-corner",
        choices=CINC_CORNERS,
        default=mc.cinc_corner,
        help="CInC corner parameterisation (triangular: learned nonzero "
        "diagonal; unit: diagonal 1; lu: full corner block)",
    )
    model.add_argument("--lu", action="store_true", help="LU-parameterised 1x1 convolutions")
    model.add_argument(
        "--guard",
        type=_guard_value,
        default=mc.guard,
        metavar="RHO",
        help="stability guard of the CInC/emerging/periodic convolutions: keep each inside a "
        "diagonal-dominance region of ratio RHO in (0, 1), so its inverse stays accurate on "
        "any image size; 'off' = none (docs/stability.md; default: %(default)s)",
    )
    model.add_argument(
        "--class-conditional",
        action="store_true",
        help="model p(x | label): the top prior's mean and log-scale get a learned linear "
        "function of the one-hot label (the dataset must have labels; docs/layers/"
        "conditional.md)",
    )
    model.add_argument(
        "--weight-y",
        type=nonnegative_float,
        default=mc.weight_y,
        metavar="W",
        help="with --class-conditional: add W x the cross-entropy in bits of a linear "
        "classifier on the spatial mean of the top latent to the loss (0 = no classifier)",
    )

    model.add_argument(
        "--label-prior",
        choices=("channel", "position"),
        default=mc.label_prior,
        help="with --class-conditional: the label's offset of the top prior's mean and "
        "log-scale is one value per channel, broadcast over the positions ('channel', as in "
        "Glow), or one per position and channel ('position')",
    )

    opt = _Group("optimisation (docs/training.md)")
    opt.add_argument(
        "--batch-size", type=positive_int, default=tc.batch_size, help="images per step"
    )
    opt.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=tc.optimizer,
        help="adam, or adamax (the official training script's default); both with the warmup, "
        "clipping and EMA options below (default: %(default)s)",
    )
    opt.add_argument(
        "--recompute",
        action="store_true",
        help="memory-saving backward (gradient checkpointing): rebuild every layer's input "
        "from its output by the inverse instead of storing it; about one extra forward and "
        "inverse per step, activation memory of one layer instead of all",
    )
    opt.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"peak learning rate (default: {tc.lr:g}"
        + ("; with --resume: the run's own)" if resume else ")"),
    )
    opt.add_argument(
        "--warmup-steps",
        type=nonnegative_int,
        default=None,
        help=f"linear learning-rate warmup in steps (default: {tc.warmup_steps}"
        + ("; with --resume: restarts the warmup at the resumed step)" if resume else ")"),
    )
    opt.add_argument(
        "--max-grad-norm",
        type=nonnegative_float,
        default=tc.max_grad_norm,
        help="clip the global gradient norm to this (0 = no clipping)",
    )
    opt.add_argument(
        "--ema-decay",
        type=decay_float,
        default=tc.ema_decay,
        help="Polyak/EMA decay of the weights used for evaluation and samples (0 = off)",
    )
    opt.add_argument(
        "--init-batch-size",
        type=positive_int,
        default=tc.init_batch_size,
        help="images for the data-dependent actnorm initialisation",
    )
    opt.add_argument(
        "--eval-every",
        type=nonnegative_int,
        default=tc.eval_every,
        help="held-out evaluation period in steps (0 = only at the end)",
    )
    opt.add_argument(
        "--eval-size",
        type=positive_int,
        default=tc.eval_size,
        help="held-out images used by the periodic evaluations (the final one uses all)",
    )
    opt.add_argument(
        "--checkpoint-every",
        type=nonnegative_int,
        default=tc.checkpoint_every,
        help="checkpoint period in steps (0 = only at the end)",
    )
    opt.add_argument(
        "--max-bad-steps",
        type=positive_int,
        default=tc.max_bad_steps,
        help="bad steps in a row (NaN/Inf, or loss more than twice its recent level) "
        "before stopping with exit code 1",
    )
    opt.add_argument(
        "--seed",
        type=seed_int,
        default=tc.seed,
        help="seed of the initialisation, data order and dequantisation noise",
    )


def _n_bits_value(text: str) -> int:
    """``--n-bits`` value: an int in 1..8."""
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..8, got {text!r}") from None
    if not 1 <= val <= 8:
        raise argparse.ArgumentTypeError(f"must be in 1..8 (bits per pixel), got {val}")
    return val


def class_options(args: argparse.Namespace) -> None:
    """``--weight-y`` and ``--label-prior`` need ``--class-conditional``
    (:class:`~flownp.errors.UsageError`)."""
    from flownp.errors import UsageError

    if args.label_prior != "channel" and not args.class_conditional:
        raise UsageError(
            f"--label-prior {args.label_prior} needs --class-conditional (it shapes the label's "
            "term of the top prior)"
        )
    if args.weight_y and not args.class_conditional:
        raise UsageError(
            f"--weight-y {args.weight_y:g} needs --class-conditional (the classifier is trained "
            "on the labels of a class-conditional model)"
        )


def with_classes(mc, data, where: str):
    """``mc`` with ``num_classes`` of a labelled ``data`` set (``mc.num_classes`` > 0 marks a
    class-conditional request); refuses unlabelled data (:class:`~flownp.errors.UsageError`)."""
    import dataclasses

    from flownp.errors import UsageError

    if not mc.num_classes:
        return mc
    name = getattr(data, "name", where)
    if not getattr(data, "labelled", False):
        raise UsageError(
            f"--class-conditional: dataset {name!r} has no labels"
            + (
                " for its held-out images"
                if getattr(data, "train_labels", None) is not None
                else ""
            )
            + " (docs/data.md: labels and classes)"
        )
    k = int(data.num_classes)
    if k < 2:
        raise UsageError(f"--class-conditional: dataset {name!r} has {k} class; it needs 2 or more")
    try:
        return dataclasses.replace(mc, num_classes=k)
    except ValueError as exc:
        raise UsageError(f"--class-conditional: dataset {name!r}: {exc}") from None


def _guard_value(text: str) -> float | None:
    """``--guard`` value: a float in (0, 1), or ``off`` / ``none`` for no guard."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        rho = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1) or 'off', got {text!r}"
        ) from None
    if not 0.0 < rho < 1.0:
        raise argparse.ArgumentTypeError(f"RHO must be in (0, 1), got {rho}")
    return rho


def _configs(args: argparse.Namespace):
    from flownp.model import FlowConfig
    from flownp.train import TrainConfig

    class_options(args)
    try:
        mc = FlowConfig(
            image_shape=(1 << 30, 1 << 30, 1),
            num_classes=2 if args.class_conditional else 0,  # the data's classes, once loaded
            **{k: getattr(args, k) for k in MODEL_OPTIONS},
        )
    except ValueError as exc:
        raise DataError(str(exc)) from None
    kw = {k: getattr(args, k) for k in TRAIN_OPTIONS}
    defaults = TrainConfig()
    kw["lr"] = defaults.lr if args.lr is None else args.lr
    kw["warmup_steps"] = defaults.warmup_steps if args.warmup_steps is None else args.warmup_steps
    kw["max_grad_norm"] = kw["max_grad_norm"] or None
    kw["ema_decay"] = kw["ema_decay"] or None
    try:
        steps = defaults.steps if args.steps is None else args.steps
        tc = TrainConfig(steps=steps, time_limit=args.time_limit, **kw)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return mc, tc


def run(args: argparse.Namespace) -> int:
    from flownp import threads

    if args.threads is not None and args.threads < 1:
        raise DataError(f"--threads must be >= 1, got {args.threads}")
    with threads.limit(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from flownp import distributed, threads
    from flownp.model import FlowConfig
    from flownp.train import Trainer, TrainingDiverged, TrainingInterrupted, check_run_folder
    from flownp.train.data_stream import load_data

    progress = not args.no_progress
    t0 = time.perf_counter()
    comm = distributed.world()  # several processes: one run, docs/distributed.md
    if comm.size > 1:
        print(f"{comm.size} processes, {threads.get_threads()} thread(s) on process 0")
    if args.resume:
        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        resumable = ("lr", "warmup_steps", "dataset")  # dataset: the data's new place
        given = [
            k
            for k in (*MODEL_OPTIONS, CLASS_OPTION, *TRAIN_OPTIONS)
            if k not in resumable and getattr(args, k) != parser.get_default(k)
        ]
        if given:
            raise DataError(
                f"--resume takes the model and training options from the checkpoint; do not "
                f"give {', '.join('--' + k.replace('_', '-') for k in given)} (only --steps, "
                "--lr, --warmup-steps, --time-limit, --out and --dataset may change)"
            )
        moved = args.dataset if args.dataset != parser.get_default("dataset") else None
        trainer = Trainer.from_checkpoint(
            args.resume,
            steps=args.steps,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            dataset=moved,
            out_dir=args.out,
            overwrite=args.overwrite,
            progress=progress,
        )
        if args.time_limit is not None:
            trainer.config = dataclasses.replace(trainer.config, time_limit=args.time_limit)
        print(f"resuming {args.resume} at step {trainer.step} of {trainer.config.steps}")
    else:
        mc, tc = _configs(args)
        if args.out is not None:  # before loading any data
            distributed.on_root(comm, lambda: check_run_folder(args.out, overwrite=args.overwrite))

        def local_data():  # every process reads its own copy (the Trainer compares them)
            data = load_data(tc.dataset, tc.holdout)
            shaped = with_classes(mc, data, tc.dataset)
            try:
                shaped = FlowConfig.from_dict({**shaped.to_dict(), "image_shape": list(data.shape)})
            except ValueError as exc:
                raise DataError(f"dataset {tc.dataset!r}: {exc}") from None
            return data, shaped

        data, mc = distributed.together(comm, local_data)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or Path("runs") / comm.bcast(stamp)  # process 0's clock names it
        trainer = Trainer(mc, tc, data, out_dir=out, progress=progress, overwrite=args.overwrite)
        print(f"{trainer.model}")
        classes = f", {mc.num_classes} classes" if mc.num_classes else ""
        bits = f", {mc.n_bits}-bit" if mc.n_bits != 8 else ""
        print(
            f"data: {getattr(data, 'name', tc.dataset)}: {len(data.train)} training, "
            f"{len(data.test)} held-out images of {data.shape}{bits}{classes}"
        )
    print(f"run folder: {trainer.out_dir}")
    try:
        result = trainer.run()
    except TrainingDiverged as exc:
        print(f"flownp train: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"flownp train: interrupted: {exc}", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    print(
        f"done: {result.steps} steps, {result.wall_time:.1f} s of training "
        f"({wall:.1f} s wall time for this command), {result.rejected_total} rejected steps"
    )
    print(f"train bits/dim (mean of the last 100 steps): {result.train_bpd:.4f}")
    given = ", given the label" if trainer.model_config.num_classes else ""
    print(
        f"held-out bits/dim ({len(trainer.data.test)} images, "
        f"{'EMA' if trainer.config.ema_decay else 'final'} weights{given}): "
        f"{result.heldout_bpd:.4f}"
    )
    red = trainer.reduction
    if red.calls and red.buffer is not None:
        print(
            f"all-reduce of a step: {1e3 * red.seconds / red.calls:.2f} ms on average on "
            f"process 0 ({red.buffer.nbytes / 1e6:.2f} MB; waiting for the slowest process "
            "included)"
        )
    classes = trainer.metrics["classes"]
    if classes["step"]:
        print(f"generative classifier accuracy (held out): {classes['accuracy'][-1]:.2%}")
        if trainer.model.classifier is not None:
            print(
                f"linear classifier accuracy (held out): {classes['classifier_accuracy'][-1]:.2%}"
            )
    for name in ("checkpoint.h5", "metrics.csv", "loss_curve.png", "samples.png"):
        print(f"  {trainer.out_dir / name}")
    return 0
