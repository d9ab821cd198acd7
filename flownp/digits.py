r"""A small digit classifier that measures whether MNIST-shaped samples look like digits.

Bits/dim says how well a flow models the data, not whether its samples are legible. This module
turns "the samples are mostly recognisable digits" into a number: the share of samples that a
fixed classifier assigns to one digit class with probability at least 0.9, printed next to the
same share for real held-out images (what a perfect generator would reach)::

    pooled     p(x) = 2x2 mean pooling of the pixel intensities in [0, 1]    (196 values)
    features   f(x) = p(x) / ||p(x)||_2                                      (unit length)
    model      p(k | x) = softmax(W^T f(x) + b)_k         (multinomial logistic regression)
    training   min_{W, b}  mean_n [ -log p(y_n | x_n) ] + (l2 / 2) ||W||^2,   l2 = 1e-4,
               on the 9,000 training images of the bundled MNIST split (``load_dataset("mnist")``),
               L-BFGS (scipy) from W = 0, b = 0: deterministic, a few seconds
    confident  max_k p(k | x) >= 0.9

Pixel intensities: uint8 images ``u`` give ``(u + 0.5) / 256`` (the centre of the pixel's bin);
float images are taken in model space (``x = u / 256 - 1/2 + noise``, about [-1/2, 1/2], as
:meth:`flownp.model.FlowModel.sample` returns them) and give ``clip(x + 1/2, 0, 1)``, so samples
need no rounding. The unit-length features make the measure depend on the shape of the strokes,
not on their brightness: flow samples at a low temperature are dimmer than real digits, and a
classifier on raw intensities is less sure of dim images whatever their shape. A sample with a
NaN or Inf pixel is counted as not confident (and counted).

The L2 penalty is chosen so that structureless images are not confident: measured with the
snippet in ``docs/experiments.md``, 0.0 % of uniform-noise images and 0.2 % of pixel-shuffled
digits reach 0.9, 7 % of thresholded smooth blobs and of two digits overlaid do, and 45 % of real
held-out digits do (held-out accuracy 0.90). The share is a relative measure: compare samples
with the real share, not with 100 %.

The classifier is trained once per process and cached (:func:`bundled_classifier`); it depends
only on NumPy, SciPy and the bundled data, never on a model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.errors import DataError, NonFiniteError, SingularKernelError
from flownp.model import SAMPLE_TEMPERATURE

DIGIT_SHAPE = (28, 28, 1)
CONFIDENCE = 0.9
L2 = 1e-4
MAX_ITER = 500
POOL = 2


def is_digit_shaped(shape: Sequence[int]) -> bool:
    """True for MNIST-shaped images ``(28, 28, 1)`` (the classifier's input)."""
    return tuple(int(s) for s in shape) == DIGIT_SHAPE


def features(images: np.ndarray) -> np.ndarray:
    """Images ``(N, 28, 28, 1)`` -> unit-length pooled intensities ``(N, 196)`` in float64.

    Intensities: uint8 ``(u + 0.5) / 256``; float (model space) ``clip(x + 0.5, 0, 1)`` (NaN
    stays NaN). Then 2x2 mean pooling and division by the Euclidean norm (at least 1e-6).
    """
    images = np.asarray(images)
    if images.ndim != 4 or not is_digit_shaped(images.shape[1:]):
        raise DataError(
            f"digit classifier: images must be (N, 28, 28, 1), got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        x = (images.astype(np.float64) + 0.5) / 256.0
    elif np.issubdtype(images.dtype, np.floating):
        x = np.clip(images.astype(np.float64) + 0.5, 0.0, 1.0)  # NaN propagates through clip
    else:
        raise DataError(f"digit classifier: images must be uint8 or float, got {images.dtype}")
    N, H, W, _ = x.shape
    p = x.reshape(N, H // POOL, POOL, W // POOL, POOL).mean(axis=(2, 4)).reshape(N, -1)  # (N, 196)
    norm = np.sqrt(np.sum(p * p, axis=1, keepdims=True))  # (N, 1); NaN stays NaN
    return p / np.maximum(norm, 1e-6)


@dataclass(frozen=True)
class DigitClassifier:
    """Multinomial logistic regression on :func:`features` (module docstring).

    Attributes
    ----------
    weights : np.ndarray
        ``(196, 10)`` float64.
    bias : np.ndarray
        ``(10,)`` float64.
    """

    weights: np.ndarray
    bias: np.ndarray

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, 10)``; a row is NaN when its image has a non-finite pixel."""
        from scipy.special import softmax

        logits = features(images) @ self.weights + self.bias  # (N, 10)
        return softmax(logits, axis=1)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Most probable digit per image ``(N,)`` (int64)."""
        return np.argmax(self.predict_proba(images), axis=1).astype(np.int64)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of ``images`` whose most probable digit is ``labels``."""
        return float(np.mean(self.predict(images) == np.asarray(labels)))

    def confident(self, images: np.ndarray, threshold: float = CONFIDENCE) -> np.ndarray:
        """Boolean ``(N,)``: ``max_k p(k | x) >= threshold`` (False for non-finite images)."""
        p = self.predict_proba(images).max(axis=1)
        return np.where(np.isfinite(p), p, 0.0) >= threshold

    def confident_share(self, images: np.ndarray, threshold: float = CONFIDENCE) -> float:
        """Share of ``images`` classified with probability ``>= threshold``."""
        return float(np.mean(self.confident(images, threshold)))


def classifier_loss(
    w: np.ndarray, F: np.ndarray, Y: np.ndarray, l2: float
) -> tuple[float, np.ndarray]:
    r"""Loss and gradient of the classifier, ``w = concat(W.ravel(), b)``.

    ``F`` features ``(N, D)``, ``Y`` one-hot labels ``(N, K)``, ``P = softmax(F W + b)``::

        L       = mean_n [ logsumexp_k (F W + b)_nk - (F W + b)_{n, y_n} ] + (l2 / 2) ||W||^2
        dL/dW   = F^T (P - Y) / N + l2 W
        dL/db   = sum_n (P - Y)_n / N
    """
    from scipy.special import logsumexp

    N, D = F.shape
    K = Y.shape[1]
    W, b = w[: D * K].reshape(D, K), w[D * K :]
    logits = F @ W + b  # (N, K)
    lse = logsumexp(logits, axis=1)  # (N,)
    loss = float(np.mean(lse - np.sum(logits * Y, axis=1)) + 0.5 * l2 * np.sum(W * W))
    G = (np.exp(logits - lse[:, None]) - Y) / N  # (N, K) = (P - Y) / N
    return loss, np.concatenate([(F.T @ G + l2 * W).ravel(), G.sum(axis=0)])


def train_classifier(
    images: np.ndarray, labels: np.ndarray, *, l2: float = L2, max_iter: int = MAX_ITER
) -> DigitClassifier:
    """Fit :class:`DigitClassifier` by L-BFGS on :func:`classifier_loss` (deterministic:
    zero start, fixed data)."""
    from scipy.optimize import minimize

    F = features(images)  # (N, D)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(F),) or y.min() < 0 or y.max() > 9:
        raise DataError("digit classifier: labels must be (N,) digits 0..9")
    D, K = F.shape[1], 10
    Y = np.eye(K)[y]  # (N, K)
    res = minimize(
        classifier_loss,
        np.zeros(D * K + K),
        jac=True,
        args=(F, Y, float(l2)),
        method="L-BFGS-B",
        options={"maxiter": int(max_iter)},
    )
    if not np.all(np.isfinite(res.x)):
        raise NonFiniteError("digit classifier: training produced non-finite weights")
    return DigitClassifier(weights=res.x[: D * K].reshape(D, K).copy(), bias=res.x[D * K :].copy())


@functools.lru_cache(maxsize=1)
def bundled_classifier() -> DigitClassifier:
    """The classifier trained on the 9,000 training images of the bundled MNIST split
    (trained on first use, a few seconds; cached for the process)."""
    from flownp.data import load_dataset

    data = load_dataset("mnist")
    return train_classifier(data.train, data.train_labels)


@functools.lru_cache(maxsize=1)
def bundled_heldout_share() -> float:
    """Confident share of the 1,000 held-out images of the bundled MNIST split."""
    from flownp.data import load_dataset

    return bundled_classifier().confident_share(load_dataset("mnist").test)


# ---------------------------------------------------------------------- scoring samples
@dataclass(frozen=True)
class DigitScore:
    """Share of samples classified as one digit with probability >= ``threshold``.

    Attributes
    ----------
    num_samples, num_confident, num_nonfinite : int
    real_share : float
        The same share for real held-out images (``num_real`` of them).
    num_real : int
    threshold : float
    """

    num_samples: int
    num_confident: int
    num_nonfinite: int
    real_share: float
    num_real: int
    threshold: float = CONFIDENCE

    @property
    def share(self) -> float:
        return self.num_confident / self.num_samples

    def format(self) -> str:
        text = (
            f"digit classifier: {self.share:.0%} of {self.num_samples} samples classified with "
            f"probability >= {self.threshold:g} (real held-out images: {self.real_share:.0%} "
            f"of {self.num_real})"
        )
        if self.num_nonfinite:
            text += f"; {self.num_nonfinite} samples with non-finite pixels count as not confident"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.num_samples,
            "confident": self.num_confident,
            "share": self.share,
            "nonfinite": self.num_nonfinite,
            "real_share": self.real_share,
            "real_images": self.num_real,
            "threshold": self.threshold,
        }


def score_samples(samples: np.ndarray, real: np.ndarray | None = None) -> DigitScore | None:
    """Score MNIST-shaped ``samples`` (uint8 or model-space floats); None for other shapes.

    ``real``: held-out images to compare with (default: the bundled MNIST held-out split).
    """
    samples = np.asarray(samples)
    if samples.ndim != 4 or not is_digit_shaped(samples.shape[1:]) or len(samples) == 0:
        return None
    clf = bundled_classifier()
    if real is None or len(real) == 0:
        real_share, num_real = bundled_heldout_share(), 1000
    else:
        real_share, num_real = clf.confident_share(real), len(real)
    finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
    return DigitScore(
        num_samples=len(samples),
        num_confident=int(np.sum(clf.confident(samples))),
        num_nonfinite=int(np.sum(~finite)),
        real_share=float(real_share),
        num_real=int(num_real),
    )


def report_samples(samples: np.ndarray, print_fn: Callable[[str], None] = print) -> None:
    """Print the :class:`DigitScore` line for MNIST-shaped ``samples`` (nothing otherwise)."""
    score = score_samples(samples)
    if score is not None:
        print_fn(score.format())


def report_training(
    trainer: Any, *, n: int = 100, temperature: float = SAMPLE_TEMPERATURE
) -> DigitScore | None:
    """End-of-training report of a :class:`flownp.train.Trainer` with an MNIST-shaped model.

    Draws ``n`` samples at ``temperature`` with the EMA weights (seed = the run's seed), scores
    them against the run's own held-out images, logs one line and appends a row to
    ``trainer.metrics["digits"]`` (columns ``step, temperature, samples, share, real_share``;
    saved with the checkpoint). Returns None for other image shapes or when sampling fails
    (which is logged).
    """
    model = trainer.model
    if not is_digit_shaped(model.config.image_shape):
        return None
    try:
        with trainer.optimizer.ema_weights():
            x = model.sample(n, temperature=temperature, seed=trainer.config.seed)
    except (NonFiniteError, SingularKernelError, FloatingPointError) as exc:
        trainer.log(f"digit classifier: not measured, sampling failed: {exc}")
        return None
    score = score_samples(x, trainer.data.test)
    assert score is not None
    trainer.log(f"step {trainer.step}: {score.format()} (T = {temperature:g})")
    table = trainer.metrics.setdefault(
        "digits", {c: [] for c in ("step", "temperature", "samples", "share", "real_share")}
    )
    row = (trainer.step, temperature, score.num_samples, score.share, score.real_share)
    for c, v in zip(table, row, strict=True):
        table[c].append(float(v))
    return score


def temperature_sweep(
    model: Any,
    temperatures: Sequence[float],
    *,
    n: int = 200,
    seed: int = 0,
    solve_precision: str = "model",
) -> list[tuple[float, DigitScore]]:
    """Confident-digit share of ``n`` samples at each temperature (the same latent draw
    ``eps`` scaled by T, so only T changes). ``model`` needs ``config.image_shape`` and
    ``inverse(z, solve_precision=...)`` (a :class:`flownp.model.FlowModel`)."""
    if not is_digit_shaped(model.config.image_shape):
        raise DataError(
            f"temperature sweep: the digit classifier needs a (28, 28, 1) model, this one is "
            f"{tuple(model.config.image_shape)}"
        )
    if n < 1:
        raise DataError(f"temperature sweep: n must be >= 1, got {n}")
    temps = [float(t) for t in temperatures]
    if not temps or not all(math.isfinite(t) and t >= 0 for t in temps):
        raise DataError(f"temperature sweep: temperatures must be >= 0, got {temperatures!r}")
    eps = np.random.default_rng(seed).standard_normal((n, model.config.num_dims))
    rows = []
    for t in temps:
        try:
            x = model.inverse((t * eps).astype(model.dtype), solve_precision=solve_precision)
        except (NonFiniteError, SingularKernelError, FloatingPointError):
            x = np.full((n, *DIGIT_SHAPE), np.nan)
        score = score_samples(x)
        assert score is not None
        rows.append((t, score))
    return rows


def format_sweep(rows: list[tuple[float, DigitScore]]) -> str:
    """Markdown table of :func:`temperature_sweep` rows."""
    lines = [
        f"| temperature | confident samples (p >= {CONFIDENCE:g}) | non-finite |",
        "|---|---|---|",
    ]
    for t, s in rows:
        lines.append(f"| {t:g} | {s.share:.1%} of {s.num_samples} | {s.num_nonfinite} |")
    real = rows[0][1] if rows else None
    if real is not None:
        lines.append(f"\nreal held-out images: {real.real_share:.1%} of {real.num_real}")
    return "\n".join(lines)
