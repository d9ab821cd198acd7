"""Checkpoint-time observers: measurements of the model that the training loop takes at its
checkpoints and at the end, and stores as metrics rows.

An observer is called with what it needs (the model holding the weights to measure, the
held-out images, the step, the run's seed, where to log, the run folder for its files) and
returns a row of its metrics table (:mod:`flownp.train.metrics`) and its full result; it never
sees the trainer. The loop puts the EMA weights in place before calling one.

- :func:`observe_stability`: the inverse's numerical stability
  (:func:`flownp.stability.measure_model_stability`) at every checkpoint and at the end; a
  summary line in the log, the full table in ``stability.txt``, a warning over the thresholds.
- :func:`observe_digits`: at the end, for MNIST-shaped models, the share of samples the digit
  classifier finds legible (:mod:`flownp.digits`), against the run's own held-out images.
- :func:`observe_requested_digits`: at the end, for class-conditional digit models, the share
  of those samples that are confidently the digit they were drawn for.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from flownp import digits
from flownp import stability as S
from flownp.data.pixels import dequantize
from flownp.errors import NonFiniteError, SingularKernelError
from flownp.model import SAMPLE_TEMPERATURE, FlowModel
from flownp.train.metrics import STABILITY_COLUMNS
from flownp.train.run_folder import RunFolder

Log = Callable[[str], None]
Row = dict[str, float]


def observe_stability(
    model: FlowModel,
    images: np.ndarray,
    *,
    step: int,
    seed: int,
    threshold: float,
    log: Log,
    folder: RunFolder,
) -> tuple[Row, S.ModelStability | None]:
    """Measure the inverse of ``model`` on the uint8 held-out ``images`` (noise from
    ``[seed, 4]``): log a summary, write the table to ``stability.txt``, warn
    (:class:`flownp.stability.InverseInstabilityWarning`) when over ``threshold``. Returns the
    ``stability`` row (every value ``inf`` when the measurement failed) and the report."""
    x = dequantize(images, np.random.default_rng([seed, 4]), model.dtype, model.config.n_bits)
    try:
        rep = S.measure_model_stability(model, x, threshold=threshold)
    except (NonFiniteError, SingularKernelError, FloatingPointError) as exc:
        model.clear_cache()
        msg = f"step {step}: INVERSE UNSTABLE: the stability measurement failed: {exc}"
        log(msg)
        warnings.warn(msg, S.InverseInstabilityWarning, stacklevel=3)
        row = {c: float("inf") for c in STABILITY_COLUMNS}
        row["step"] = float(step)
        return row, None
    row = rep.summary()
    row["step"] = float(step)
    worst = (
        f"worst layer ||M^-1||_inf {row['max_norm_inf']:.3g}, "
        f"round trip {row['max_layer_roundtrip_f32']:.2e}"
        if rep.layers
        else "no layer inverts by substitution"
    )
    log(
        f"step {step}: inverse stability ({rep.num_images} held-out images): "
        f"reconstruction error float32 {rep.roundtrip_f32:.2e}, float64 "
        f"{rep.roundtrip_f64:.2e}; {worst}; {rep.status}"
    )
    folder.write_text("stability.txt", f"step {step}, EMA weights\n{rep.format()}\n")
    warning = rep.warning()
    if warning is not None:
        log(f"step {step}: WARNING: {warning}")
        warnings.warn(warning, S.InverseInstabilityWarning, stacklevel=3)
    return row, rep


def observe_digits(
    model: FlowModel,
    heldout: np.ndarray,
    *,
    step: int,
    seed: int,
    log: Log,
    n: int = 100,
    temperature: float = SAMPLE_TEMPERATURE,
) -> tuple[Row | None, Any]:
    """For an MNIST-shaped ``model``: draw ``n`` samples at ``temperature`` (seed ``seed``;
    a class-conditional model: the same number of each class, :func:`_sample`), score them
    against ``heldout`` (:func:`flownp.digits.score_samples`) and log one line.
    Returns the ``digits`` row and the :class:`flownp.digits.DigitScore`; ``(None, None)``
    for other image shapes or when sampling fails (which is logged)."""
    if not digits.is_digit_shaped(model.config.image_shape):
        return None, None
    x, _ = _sample(model, n, temperature, seed, log)
    if x is None:
        return None, None
    score = digits.score_samples(x, heldout)
    assert score is not None
    log(f"step {step}: {score.format()} (T = {temperature:g})")
    row = {
        "step": float(step),
        "temperature": float(temperature),
        "samples": float(score.num_samples),
        "share": float(score.share),
        "real_share": float(score.real_share),
    }
    return row, score


def _sample(
    model: FlowModel, n: int, temperature: float, seed: int, log: Log
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``n`` samples (seed ``seed``) and their labels: a class-conditional model draws the
    classes in turn, one row of ``ceil(n / K)`` per class (:func:`flownp.digits.grid_labels`,
    cut to ``n``); an unconditional one has no labels. ``(None, None)`` when sampling fails
    (logged)."""
    K = getattr(model.config, "num_classes", 0)
    labels = digits.grid_labels(K, -(-n // K))[:n] if K else None
    extra = {} if labels is None else {"labels": labels}
    try:
        return model.sample(n, temperature=temperature, seed=seed, **extra), labels
    except (NonFiniteError, SingularKernelError, FloatingPointError) as exc:
        log(f"digit classifier: not measured, sampling failed: {exc}")
        return None, None


def observe_requested_digits(
    model: FlowModel,
    *,
    step: int,
    seed: int,
    log: Log,
    n: int = 100,
    temperature: float = SAMPLE_TEMPERATURE,
) -> tuple[Row | None, Any]:
    """For a class-conditional digit model (MNIST-shaped, 10 classes): the samples of
    :func:`observe_digits` (the same ``n``, seed and temperature), scored for the digit each
    was drawn for (:func:`flownp.digits.score_requested`); logs one line. Returns the
    ``digits_requested`` row and the :class:`flownp.digits.RequestedScore`, or
    ``(None, None)`` for other models or when sampling fails."""
    cfg = model.config
    K = getattr(cfg, "num_classes", 0)
    if not digits.is_digit_shaped(cfg.image_shape) or K != digits.NUM_CLASSES:
        return None, None
    x, labels = _sample(model, n, temperature, seed, log)
    if x is None or labels is None:
        return None, None
    score = digits.score_requested(x, labels)
    assert score is not None
    log(f"step {step}: {score.format()} (T = {temperature:g})")
    shares = score.class_shares()
    row = {"step": float(step), "temperature": float(temperature)}
    row |= {"samples": float(score.num_samples), "share": float(score.share)}
    row |= {f"share_{k}": float(shares.get(k, float("nan"))) for k in range(digits.NUM_CLASSES)}
    return row, score
