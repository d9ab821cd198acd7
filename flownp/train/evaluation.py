"""Held-out bits/dim of a model on uint8 images (:func:`evaluate_bpd`), and what a
class-conditional model is measured by (:func:`evaluate_classes`).

Both draw the dequantisation noise from a fixed ``seed`` (the number is reproducible) and use
the model's ``n_bits`` (:mod:`flownp.data.pixels`; bits/dim on N-bit data counts
``D ln 2^N``). A class-conditional model is evaluated *given the label*: ``log p(x | y)``.
On several processes (``comm``, a :mod:`flownp.distributed` communicator) every process draws
the noise of each whole batch and evaluates its share of it (images and labels); one
all-reduce of the sums (and of a failure flag) at the end gives every process the same
numbers. A layer error on one process (a NaN inside, a singular kernel) is raised on every
process.

Evaluation stores no activations
(:meth:`flownp.model.FlowModel.no_stored_activations`): each layer's cache is cleared right
after the layer, so a batch needs the memory of one layer's activations, not the whole flow's
(with stored activations, an evaluation batch of 500 images would hold 7.8 times the
activations of a training step of 64). The numbers are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.data.pixels import dequantize
from flownp.errors import NonFiniteError, SingularKernelError
from flownp.model import LN2, FlowModel, bits_per_dim
from flownp.progress import Progress

_ERRORS = (NonFiniteError, FloatingPointError, SingularKernelError)


def _evaluate(
    model: FlowModel,
    images: np.ndarray,
    labels: np.ndarray | None,
    batch_size: int,
    seed: int,
    progress: bool,
    comm: Any,
    sums_of: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    width: int,
) -> np.ndarray:
    """The column sums ``sums_of(x, y)`` (``width`` values) over every batch of ``images``
    (dequantised with the model's ``n_bits``), this process's share of each batch only,
    reduced over the processes."""
    from flownp.distributed import collective, share

    size, rank = (1, 0) if comm is None else (comm.size, comm.rank)
    rng = np.random.default_rng(seed)
    total = np.zeros(width)
    n = len(images)
    error: BaseException | None = None
    with (
        Progress(n, desc="evaluate", unit="image", enabled=progress, lines=10) as bar,
        model.no_stored_activations(),
    ):
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x = dequantize(images[sl], rng, model.dtype, model.config.n_bits)
            y = None if labels is None else labels[sl]
            if size > 1:
                mine = share(len(x), rank, size)
                x, y = x[mine], None if y is None else y[mine]
            if len(x) and error is None:
                try:
                    total += sums_of(x, y)
                except _ERRORS as exc:
                    model.clear_cache()
                    if size == 1:
                        raise
                    error = exc  # the others must still meet this process at the reduction
            bar.update(len(images[sl]))
    if size > 1:
        sums = comm.allreduce_sum(np.concatenate([total, [float(error is not None)]]))
        if sums[-1]:
            if error is not None:
                raise collective(error)
            raise collective(NonFiniteError(f"evaluation failed on {int(sums[-1])} process(es)"))
        total = np.asarray(sums[:-1], dtype=np.float64)
    return total


def evaluate_bpd(
    model: FlowModel,
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 500,
    seed: int = 1234,
    progress: bool = False,
    comm: Any = None,
) -> float:
    """Mean bits/dim of uint8 ``images`` under ``model`` (dequantisation noise from a fixed
    ``seed``, so the number is reproducible). A class-conditional model needs the images'
    ``labels`` and gives the bits/dim of ``p(x | y)``. Returns NaN (never hides it) if any is
    NaN. ``comm``: several processes (module docstring)."""
    if model.config.num_classes and labels is None:
        raise ValueError("evaluate_bpd: a class-conditional model is evaluated given the labels")
    bits = model.config.n_bits

    def sums_of(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        z, logdet = model.forward(x, y)
        model.clear_cache()
        return np.array([float(np.sum(bits_per_dim(z, logdet, bits)))])

    total = _evaluate(model, images, labels, batch_size, seed, progress, comm, sums_of, 1)
    return float(total[0]) / len(images)


@dataclass(frozen=True)
class ClassEvaluation:
    """What :func:`evaluate_classes` measured on ``num_images`` labelled images.

    Attributes
    ----------
    bpd : float
        Mean bits/dim given the true label, ``-log p(x | y)`` (the same number as
        :func:`evaluate_bpd` with the same seed).
    accuracy : float
        Share of images whose ``argmax_k log p(x | y = k)`` is their label: the flow as a
        generative classifier (every class scored on the same latent; only the prior changes).
    classifier_accuracy : float or None
        Share of images the linear classifier on the top latent labels right (models with
        ``weight_y > 0``; None otherwise).
    bits_y : float or None
        Its mean cross-entropy in bits (None without a classifier).
    num_images : int
    """

    bpd: float
    accuracy: float
    classifier_accuracy: float | None
    bits_y: float | None
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "bpd": self.bpd,
            "accuracy": self.accuracy,
            "classifier_accuracy": self.classifier_accuracy,
            "bits_y": self.bits_y,
            "images": self.num_images,
        }


def evaluate_classes(
    model: FlowModel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 500,
    seed: int = 1234,
    progress: bool = False,
    comm: Any = None,
) -> ClassEvaluation:
    """Bits/dim given the label, the generative classifier's accuracy and (with a classifier)
    the linear classifier's accuracy of a class-conditional ``model`` on uint8 ``images``
    with int ``labels`` (:class:`ClassEvaluation`). One pass of the flow per batch:
    :meth:`flownp.model.FlowModel.class_log_probs` scores the top latent under every class.
    ``comm``: several processes (module docstring)."""
    from flownp.layers.conditional import check_labels, cross_entropy_bits

    cfg = model.config
    if not cfg.num_classes:
        raise ValueError("evaluate_classes: the model is not class-conditional")
    labels = check_labels(labels, len(images), cfg.num_classes, "evaluate_classes")
    D = int(np.prod(cfg.image_shape))

    def sums_of(x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        assert y is not None
        h, pieces, logdet = model.forward_top(x)
        model.clear_cache()
        log_p = model.class_log_probs_from_top(h, pieces, logdet)  # (B, K)
        own = log_p[np.arange(len(y)), y]
        out = np.zeros(4)
        out[0] = np.sum((-own + D * cfg.n_bits * LN2) / (D * LN2))
        out[1] = np.sum(np.argmax(log_p, axis=1) == y)
        if model.classifier is not None:
            logits = model.classifier.forward(h)
            model.classifier.clear_cache()
            bits, _, error = cross_entropy_bits(logits, y)
            out[2] = len(y) - np.sum(error)
            out[3] = np.sum(bits)
        return out

    total = _evaluate(model, images, labels, batch_size, seed, progress, comm, sums_of, 4)
    n = len(images)
    has_clf = model.classifier is not None
    return ClassEvaluation(
        bpd=float(total[0]) / n,
        accuracy=float(total[1]) / n,
        classifier_accuracy=float(total[2]) / n if has_clf else None,
        bits_y=float(total[3]) / n if has_clf else None,
        num_images=n,
    )
