r"""A small digit classifier that measures whether MNIST-shaped samples look like digits.

Bits/dim says how well a flow models the data, not whether its samples are legible. This module
turns "the samples are mostly recognisable digits" into a number: the share of samples that a
fixed classifier assigns to one digit class with probability at least 0.9, printed next to the
same share for real held-out images (what a perfect generator would reach).

The classifier is a one-hidden-layer network trained with *outlier exposure* (Hendrycks,
Mazeika and Dietterich, "Deep anomaly detection with outlier exposure", ICLR 2019): next to
the labelled digits it sees images that are not digits and is trained to give them the uniform
distribution over the ten classes, so "p >= 0.9" means "this is one digit", not merely "this is
closer to one class template than to the others"::

    features   f(x) = the pixel intensities in [0, 1]                    (784 values)
    network    h = relu(f W1 + b1)  (256 units),  z = h W2 + b2,  p(k | x) = softmax(z)_k
    loss       mean_{digits n} [ lse(z_n) - z_{n, y_n} ]
               + lam * mean_{outliers m} [ lse(z_m) - mean_k z_{m, k} ]   (cross-entropy to uniform)
               + (l2 / 2) (||W1||^2 + ||W2||^2),     lam = 0.5, l2 = 1e-4, lse = logsumexp_k
    outliers   9,000 generated images, a quarter each: uniform noise; training digits with their
               pixels shuffled; smooth Gaussian noise thresholded into blobs; two training
               digits overlaid (pixelwise maximum)                        (:func:`outlier_images`)
    training   Adam (:class:`flownp.optim.Adam`, lr 1e-3) on batches of 128 digits + 128
               outliers, 20 epochs over the 9,000 training images of the bundled MNIST
               split, He initialisation, seed 0: deterministic, about 8 s on one core
    confident  max_k p(k | x) >= 0.9

Pixel intensities: uint8 images ``u`` give ``(u + 0.5) / 256`` (the centre of the pixel's bin);
float images are taken in model space (``x = u / 256 - 1/2 + noise``, about [-1/2, 1/2], as
:meth:`flownp.model.FlowModel.sample` returns them) and give ``clip(x + 1/2, 0, 1)``, so samples
need no rounding. A sample with a NaN or Inf pixel is counted as not confident (and counted).
The intensities are not rescaled: a faint smudge is judged as faint, as a reader would judge it.

Measured (``docs/experiments.md``, with outliers drawn from other seeds than the training
ones): 0 % of uniform noise, shuffled digits and smooth blobs, and about 8 % of overlaid digit
pairs reach 0.9, against about 78 % of real held-out digits (held-out accuracy about 0.96). The
share is a relative measure: compare samples with the real share, not with 100 %.

Shipped weights. The weights :func:`train_classifier` produces on the bundled split ship with
flownp as ``flownp/data/digit_classifier.npz`` (:data:`WEIGHTS_FILE`), so scoring samples does
not retrain. :func:`bundled_classifier` loads them once per process and checks what they were
trained for: the :data:`MEASURE` string, the :func:`hyperparameters` and the
:func:`data_fingerprint` of the training images and labels stored next to the weights must
equal the current ones, and the weights must have their shapes, be float64 and finite. A
missing, unreadable or mismatched file is never used: the classifier is then trained in memory
(about 8 s) after a one-line warning on stderr. ``python -m flownp.digits --write-weights PATH``
trains the classifier and writes the file (:func:`write_weights`; the same bytes on every run
on a given machine). The classifier depends only on NumPy, SciPy and the bundled data, never on
a model.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import os
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from flownp.errors import DataError, NonFiniteError, SingularKernelError
from flownp.optim import Adam

DIGIT_SHAPE = (28, 28, 1)
#: Names this measure in stored results (a grid's ``result.json``): results scored by another
#: classifier are scored again by :mod:`flownp.experiment.run`. Change it with the measure.
MEASURE = "one-hidden-layer network with outlier exposure, p >= 0.9"
NUM_CLASSES = 10
CONFIDENCE = 0.9
HIDDEN = 256
EPOCHS = 20
BATCH = 128
LEARNING_RATE = 1e-3
L2 = 1e-4
OUTLIER_WEIGHT = 0.5
NUM_OUTLIERS = 9000
SEED = 0
#: The shipped weights of :func:`bundled_classifier`, package data of :mod:`flownp.data`
#: (:func:`write_weights` writes it, :func:`load_weights` reads it).
WEIGHTS_FILE = "digit_classifier.npz"
WEIGHTS_FORMAT = 1
_NAMES = ("w1", "b1", "w2", "b2")  # the order of DigitClassifier.params and classifier_loss
#: Columns of the ``digits_requested`` metrics table of a class-conditional digit model: the
#: share of samples that are confidently the requested digit, overall and per digit.
REQUESTED_COLUMNS = ("step", "temperature", "samples", "share") + tuple(
    f"share_{k}" for k in range(NUM_CLASSES)
)


def is_digit_shaped(shape: Sequence[int]) -> bool:
    """True for MNIST-shaped images ``(28, 28, 1)`` (the classifier's input)."""
    return tuple(int(s) for s in shape) == DIGIT_SHAPE


def intensities(images: np.ndarray) -> np.ndarray:
    """Images ``(N, 28, 28, 1)`` -> pixel intensities in [0, 1], float64, same shape.

    uint8 ``(u + 0.5) / 256``; float (model space) ``clip(x + 0.5, 0, 1)`` (NaN stays NaN).
    """
    images = np.asarray(images)
    if images.ndim != 4 or not is_digit_shaped(images.shape[1:]):
        raise DataError(
            f"digit classifier: images must be (N, 28, 28, 1), got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        return (images.astype(np.float64) + 0.5) / 256.0
    if np.issubdtype(images.dtype, np.floating):
        return np.clip(images.astype(np.float64) + 0.5, 0.0, 1.0)  # NaN propagates through clip
    raise DataError(f"digit classifier: images must be uint8 or float, got {images.dtype}")


def features(images: np.ndarray) -> np.ndarray:
    """Images ``(N, 28, 28, 1)`` -> :func:`intensities` as rows ``(N, 784)`` (float64)."""
    return intensities(images).reshape(len(images), -1)


def outlier_images(source: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 images ``(n, 28, 28, 1)`` that are not digits, made from real digits
    ``source`` (uint8 ``(M, 28, 28, 1)``), a quarter of each kind in this order:

    * uniform noise, every pixel uniform in 0..255;
    * a random ``source`` image with its pixels shuffled (same intensities, no strokes);
    * a smooth blob: Gaussian noise filtered with sigma = 3 pixels, 255 where it exceeds a
      threshold drawn uniformly in [0.05, 0.2], 0 elsewhere;
    * two random ``source`` images overlaid (pixelwise maximum).
    """
    from scipy.ndimage import gaussian_filter

    source = np.asarray(source)
    sizes = [n // 4 + (1 if i < n % 4 else 0) for i in range(4)]
    noise = rng.integers(0, 256, (sizes[0], *DIGIT_SHAPE)).astype(np.uint8)
    picks = source[rng.integers(0, len(source), sizes[1])].reshape(sizes[1], -1)
    shuffled = rng.permuted(picks, axis=1).reshape(sizes[1], *DIGIT_SHAPE)
    smooth = gaussian_filter(rng.standard_normal((sizes[2], 28, 28)), (0, 3, 3))
    threshold = rng.uniform(0.05, 0.2, (sizes[2], 1, 1))
    blobs = np.where(smooth > threshold, 255, 0).astype(np.uint8)[..., None]
    i, j = rng.integers(0, len(source), (2, sizes[3]))
    overlaid = np.maximum(source[i], source[j])
    return np.concatenate([noise, shuffled, blobs, overlaid]).astype(np.uint8)


@dataclass(frozen=True)
class DigitClassifier:
    """One-hidden-layer network on :func:`features` (module docstring).

    Attributes
    ----------
    w1 : np.ndarray
        ``(784, 256)`` float64.
    b1 : np.ndarray
        ``(256,)`` float64.
    w2 : np.ndarray
        ``(256, 10)`` float64.
    b2 : np.ndarray
        ``(10,)`` float64.
    """

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def params(self) -> list[np.ndarray]:
        """``[w1, b1, w2, b2]`` (the order of :func:`classifier_loss`)."""
        return [self.w1, self.b1, self.w2, self.b2]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, 10)``; a row is NaN when its image has a non-finite pixel."""
        from scipy.special import softmax

        F = features(images)  # (N, 784)
        bad = ~np.isfinite(F).all(axis=1)
        h = np.maximum(np.where(bad[:, None], 0.0, F) @ self.w1 + self.b1, 0.0)  # (N, 256)
        p = softmax(h @ self.w2 + self.b2, axis=1)  # (N, 10)
        p[bad] = np.nan
        return p

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Most probable digit per image ``(N,)`` (int64; 0 for non-finite images)."""
        return np.argmax(np.nan_to_num(self.predict_proba(images)), axis=1).astype(np.int64)

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
    params: Sequence[np.ndarray],
    F: np.ndarray,
    Y: np.ndarray,
    F_out: np.ndarray,
    *,
    l2: float = L2,
    outlier_weight: float = OUTLIER_WEIGHT,
) -> tuple[float, list[np.ndarray]]:
    r"""Loss of the module docstring and its gradient with respect to ``[w1, b1, w2, b2]``.

    ``F`` digit features ``(N, D)``, ``Y`` one-hot labels ``(N, K)``, ``F_out`` outlier
    features ``(M, D)`` (``M = 0`` allowed). With ``X = [F; F_out]``, ``A = X W1 + b1``,
    ``H = relu(A)``, ``Z = H W2 + b2``, ``P = softmax(Z)`` and the targets ``T = [Y; 1/K]``
    weighted ``c = [1/N, ..., lam/M, ...]`` per row::

        L      = sum_r c_r [ lse(Z_r) - T_r . Z_r ] + (l2 / 2) (||W1||^2 + ||W2||^2)
        dZ     = c (P - T)                     (rows of T sum to 1)
        dW2    = H^T dZ + l2 W2,   db2 = sum_r dZ_r
        dA     = (dZ W2^T) * [A > 0]
        dW1    = X^T dA + l2 W1,   db1 = sum_r dA_r
    """
    from scipy.special import logsumexp

    w1, b1, w2, b2 = params
    N, M, K = len(F), len(F_out), Y.shape[1]
    X = np.concatenate([F, F_out]) if M else F  # (N + M, D)
    T = np.concatenate([Y, np.full((M, K), 1.0 / K)]) if M else Y  # (N + M, K)
    c = np.concatenate([np.full(N, 1.0 / N), np.full(M, outlier_weight / max(M, 1))])[:, None]
    A = X @ w1 + b1  # (R, Hd)
    H = np.maximum(A, 0.0)
    Z = H @ w2 + b2  # (R, K)
    lse = logsumexp(Z, axis=1, keepdims=True)  # (R, 1)
    loss = float(np.sum(c * (lse - np.sum(T * Z, axis=1, keepdims=True))))
    loss += 0.5 * l2 * float(np.sum(w1 * w1) + np.sum(w2 * w2))
    dZ = c * (np.exp(Z - lse) - T)  # (R, K)
    dA = (dZ @ w2.T) * (A > 0)  # (R, Hd)
    grads = [X.T @ dA + l2 * w1, dA.sum(axis=0), H.T @ dZ + l2 * w2, dZ.sum(axis=0)]
    return loss, grads


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = EPOCHS,
    hidden: int = HIDDEN,
    num_outliers: int = NUM_OUTLIERS,
    seed: int = SEED,
) -> DigitClassifier:
    """Fit :class:`DigitClassifier` by Adam on :func:`classifier_loss` (module docstring).

    Deterministic for fixed inputs: the initialisation, the outliers and the batch order all
    come from ``numpy.random.default_rng(seed)``.
    """
    F_all = features(images)  # (N, D)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(F_all),) or y.min() < 0 or y.max() > NUM_CLASSES - 1:
        raise DataError("digit classifier: labels must be (N,) digits 0..9")
    rng = np.random.default_rng(seed)
    N, D, K = len(F_all), F_all.shape[1], NUM_CLASSES
    Y_all = np.eye(K)[y]  # (N, K)
    F_out = features(outlier_images(images, num_outliers, rng)) if num_outliers else F_all[:0]
    names = ("w1", "b1", "w2", "b2")  # the order of classifier_loss
    params = dict(
        zip(
            names,
            [
                rng.standard_normal((D, hidden)) * math.sqrt(2.0 / D),
                np.zeros(hidden),
                rng.standard_normal((hidden, K)) * math.sqrt(1.0 / hidden),
                np.zeros(K),
            ],
            strict=True,
        )
    )
    optimizer = Adam(params, lr=LEARNING_RATE)  # no warmup, clipping or EMA
    batch = min(BATCH, N)
    for _ in range(int(epochs)):
        order = rng.permutation(N)
        for start in range(0, N - batch + 1, batch):
            idx = order[start : start + batch]
            out = rng.integers(0, len(F_out), batch) if len(F_out) else np.zeros(0, np.int64)
            _, grads = classifier_loss(list(params.values()), F_all[idx], Y_all[idx], F_out[out])
            optimizer.step(dict(zip(names, grads, strict=True)))
    if not all(np.all(np.isfinite(p)) for p in params.values()):
        raise NonFiniteError("digit classifier: training produced non-finite weights")
    return DigitClassifier(**params)


# ---------------------------------------------------------------------- shipped weights
def hyperparameters() -> dict[str, int | float]:
    """The settings :func:`train_classifier` trains the bundled classifier with (its defaults
    and the module constants), as stored next to the shipped weights."""
    return {
        "hidden": HIDDEN,
        "epochs": EPOCHS,
        "batch": BATCH,
        "learning_rate": LEARNING_RATE,
        "l2": L2,
        "outlier_weight": OUTLIER_WEIGHT,
        "num_outliers": NUM_OUTLIERS,
        "seed": SEED,
    }


def data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 (hex) of the training data: the images' dtype and shape, their bytes in C order,
    then the labels as little-endian int64."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{images.dtype.str} {images.shape}".encode())
    h.update(images.data)
    h.update(np.ascontiguousarray(labels, dtype="<i8").data)
    return h.hexdigest()


def write_weights(
    path: str | Path, clf: DigitClassifier, images: np.ndarray, labels: np.ndarray
) -> Path:
    """Write ``clf`` trained on ``images, labels`` as the weights file :func:`load_weights`
    reads: an npz (deflate) of ``w1, b1, w2, b2`` (float64) and ``format``, ``measure``,
    ``hyperparameters`` (JSON), ``fingerprint`` (:func:`data_fingerprint`). The zip entries
    carry a fixed date, so the same weights give the same bytes. Written to a temporary file
    and renamed into place."""
    path = Path(path)
    arrays = {
        "format": np.array(WEIGHTS_FORMAT),
        "measure": np.array(MEASURE),
        "hyperparameters": np.array(json.dumps(hyperparameters(), sort_keys=True)),
        "fingerprint": np.array(data_fingerprint(images, labels)),
        **{
            name: np.asarray(p, dtype=np.float64)
            for name, p in zip(_NAMES, clf.params(), strict=True)
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
    os.replace(tmp, path)
    return path


def load_weights(
    source: str | Path | BinaryIO, images: np.ndarray, labels: np.ndarray
) -> DigitClassifier:
    """The classifier stored by :func:`write_weights`, checked against the training data
    ``images, labels`` it must have been trained on.

    Raises
    ------
    DataError
        The file is missing or unreadable, its format, :data:`MEASURE`, :func:`hyperparameters`
        or :func:`data_fingerprint` differ from the current ones, or a weight has the wrong
        shape or dtype or a non-finite value.
    """
    try:
        with np.load(source, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as e:  # any failure to read means: do not use this file
        raise DataError(f"unreadable ({type(e).__name__}: {e})") from e
    keys = {*_NAMES, "format", "measure", "hyperparameters", "fingerprint"}
    if missing := sorted(keys - set(arrays)):
        raise DataError(f"entries missing: {', '.join(missing)}")

    def text(name: str) -> str:
        a = arrays[name]
        return str(a[()]) if a.shape == () and a.dtype.kind == "U" else repr(a)

    if arrays["format"].shape != () or arrays["format"].dtype.kind not in "iu":
        raise DataError("format entry is not an integer")
    if int(arrays["format"]) != WEIGHTS_FORMAT:
        raise DataError(f"format {int(arrays['format'])}, this flownp reads {WEIGHTS_FORMAT}")
    if text("measure") != MEASURE:
        raise DataError(f"trained for the measure {text('measure')!r}, not {MEASURE!r}")
    try:
        stored = json.loads(text("hyperparameters"))
    except ValueError:
        stored = None
    if stored != hyperparameters():
        raise DataError(f"trained with {text('hyperparameters')}, not {hyperparameters()}")
    if text("fingerprint") != data_fingerprint(images, labels):
        raise DataError("trained on other data (fingerprint of the images and labels differs)")
    shapes = {"w1": (784, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, NUM_CLASSES), "b2": (10,)}
    for name, shape in shapes.items():
        a = arrays[name]
        if a.shape != shape or a.dtype != np.float64:
            raise DataError(f"{name} is {a.dtype} {a.shape}, expected float64 {shape}")
        if not np.all(np.isfinite(a)):
            raise DataError(f"{name} has non-finite values")
    return DigitClassifier(**{name: arrays[name] for name in _NAMES})


def load_or_train(
    source: str | Path | BinaryIO, images: np.ndarray, labels: np.ndarray
) -> DigitClassifier:
    """:func:`load_weights`, or, when that fails, :func:`train_classifier` on ``images,
    labels`` after a one-line warning on stderr naming the reason."""
    try:
        return load_weights(source, images, labels)
    except DataError as e:
        reason = " ".join(str(e).split())  # one line
        print(
            f"flownp: warning: digit classifier: the shipped weights {WEIGHTS_FILE} are not "
            f"used ({reason}); training the classifier instead (about 8 s)",
            file=sys.stderr,
        )
    return train_classifier(images, labels)


@functools.lru_cache(maxsize=1)
def bundled_classifier() -> DigitClassifier:
    """The classifier trained on the 9,000 training images of the bundled MNIST split: the
    shipped weights (:data:`WEIGHTS_FILE`), checked by :func:`load_weights`, or trained anew
    when they cannot be used (:func:`load_or_train`); cached for the process."""
    from flownp.data import load_dataset

    data = load_dataset("mnist")
    try:
        source: Path | BinaryIO = io.BytesIO(
            resources.files("flownp.data").joinpath(WEIGHTS_FILE).read_bytes()
        )
    except OSError:
        source = Path(WEIGHTS_FILE)  # missing from the package: load_or_train names it
    return load_or_train(source, data.train, data.train_labels)


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


@dataclass(frozen=True)
class RequestedScore:
    """Share of class-conditional samples that the classifier assigns to the *requested* digit
    with probability >= ``threshold`` (``p(requested | x) >= threshold``), per digit and overall.

    Attributes
    ----------
    requested : np.ndarray
        int64 ``(N,)``, the digit each sample was drawn for.
    hits : np.ndarray
        bool ``(N,)``, the classifier's most probable digit is the requested one and its
        probability is >= ``threshold`` (False for a sample with a non-finite pixel).
    threshold : float
    """

    requested: np.ndarray
    hits: np.ndarray
    threshold: float = CONFIDENCE

    @property
    def num_samples(self) -> int:
        return len(self.requested)

    @property
    def share(self) -> float:
        """Overall share of samples that are confidently the requested digit."""
        return float(np.mean(self.hits))

    def class_shares(self) -> dict[int, float]:
        """``{digit: share}`` for every requested digit."""
        return {
            int(k): float(np.mean(self.hits[self.requested == k]))
            for k in np.unique(self.requested)
        }

    def format(self) -> str:
        per = ", ".join(f"{k}: {v:.0%}" for k, v in self.class_shares().items())
        return (
            f"digit classifier: {self.share:.0%} of {self.num_samples} class-conditional samples "
            f"are the requested digit with probability >= {self.threshold:g} (per digit: {per})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.num_samples,
            "share": self.share,
            "class_shares": {str(k): v for k, v in self.class_shares().items()},
            "threshold": self.threshold,
        }


def score_requested(samples: np.ndarray, requested: np.ndarray) -> RequestedScore | None:
    """Score MNIST-shaped class-conditional ``samples`` against the digits ``requested`` for
    them (int ``(N,)`` in 0..9); None for other shapes."""
    samples = np.asarray(samples)
    if samples.ndim != 4 or not is_digit_shaped(samples.shape[1:]) or len(samples) == 0:
        return None
    y = np.asarray(requested, dtype=np.int64)
    if y.shape != (len(samples),) or y.min() < 0 or y.max() > NUM_CLASSES - 1:
        raise DataError(f"digit classifier: requested digits must be ({len(samples)},) in 0..9")
    p = bundled_classifier().predict_proba(samples)  # (N, 10), NaN rows for non-finite images
    p_req = p[np.arange(len(y)), y]
    hits = np.where(np.isfinite(p_req), p_req, 0.0) >= CONFIDENCE  # >= 0.9 > 0.5: the argmax
    return RequestedScore(requested=y, hits=hits)


def grid_labels(num_classes: int, per_class: int) -> np.ndarray:
    """The labels of a grid with one row per class: ``per_class`` times 0, then 1, ...
    (``np.repeat(arange(K), per_class)``)."""
    return np.repeat(np.arange(int(num_classes), dtype=np.int64), int(per_class))


def report_samples(
    samples: np.ndarray,
    print_fn: Callable[[str], None] = print,
    requested: np.ndarray | None = None,
) -> None:
    """Print the :class:`DigitScore` line for MNIST-shaped ``samples`` (nothing otherwise),
    and the :class:`RequestedScore` line when the ``requested`` digits are given."""
    score = score_samples(samples)
    if score is not None:
        print_fn(score.format())
    if requested is not None:
        req = score_requested(samples, requested)
        if req is not None:
            print_fn(req.format())


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


# ---------------------------------------------------------------------- regenerating the file
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flownp.digits --write-weights PATH``: train the bundled classifier and
    write its weights file (:func:`write_weights`), then check it loads back."""
    parser = argparse.ArgumentParser(
        prog="python -m flownp.digits",
        description="Train the digit classifier on the bundled MNIST split and write the "
        f"weights file flownp ships as flownp/data/{WEIGHTS_FILE}.",
    )
    parser.add_argument("--write-weights", metavar="PATH", required=True, type=Path)
    args = parser.parse_args(argv)
    from flownp.data import load_dataset

    data = load_dataset("mnist")
    clf = train_classifier(data.train, data.train_labels)
    path = write_weights(args.write_weights, clf, data.train, data.train_labels)
    loaded = load_weights(path, data.train, data.train_labels)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.params(), clf.params(), strict=True))
    print(
        f"{path}: held-out accuracy {clf.accuracy(data.test, data.test_labels):.3f}, "
        f"confident share {clf.confident_share(data.test):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
