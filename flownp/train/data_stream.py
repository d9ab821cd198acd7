r"""The training data stream: which images each step sees, and their dequantisation noise.

::

    order of epoch e   perm_e = default_rng([seed, 3, e]).permutation(n)      (n training images)
    a batch            the next batch_size indices of perm_e, sorted; an epoch's incomplete
                       last batch is dropped (the next epoch starts)
    its pixels         x = u / 256 - 0.5 + U(0, 1/256),  noise from default_rng([seed, 1])
                       (N-bit data: x = floor(u / 2^(8-N)) / 2^N - 0.5 + U(0, 1/2^N))
    its labels         the labels of the same images (class-conditional models)
    initialisation     init_batch_size images drawn by default_rng([seed, 2]) (no repeats,
                       sorted), dequantised by the same generator

The stream's whole state is ``(epoch, position, noise generator state)``
(:meth:`DataStream.state`); the checkpoint stores it, so a resumed run sees the same batches
with the same noise as an uninterrupted one.

A :class:`Batch` is what one training step consumes: the dequantised images and, for a
class-conditional model, their labels (the stream of a labelled dataset carries them; the
order and the noise are the same with or without them). On several processes every process
draws the whole global batch (the same images with the same noise, whatever the number of
processes) and computes its share (:meth:`Batch.part`, which cuts the labels the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.data.pixels import dequantize
from flownp.errors import DataError


def load_data(spec: str, holdout: int | None = None) -> Any:
    """:func:`flownp.data.load_dataset` (imported lazily)."""
    from flownp.data import load_dataset

    return load_dataset(spec, holdout=holdout)


def check_data(
    data: Any, image_shape: tuple[int, ...], batch_size: int, num_classes: int = 0
) -> None:
    """``data.train`` and ``data.test`` must be non-empty uint8 NHWC arrays of ``image_shape``
    images, with at least ``batch_size`` training images; for a class-conditional model
    (``num_classes`` K > 0) both splits need labels in ``0 .. K-1``
    (:class:`~flownp.errors.DataError`)."""
    tr, te = getattr(data, "train", None), getattr(data, "test", None)
    for name, arr in (("train", tr), ("test", te)):
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4:
            raise DataError(f"Trainer: data.{name} must be a uint8 NHWC array")
        if arr.shape[1:] != image_shape:
            raise DataError(
                f"Trainer: data.{name} images are {arr.shape[1:]}, the model expects {image_shape}"
            )
        if len(arr) == 0:
            raise DataError(f"Trainer: data.{name} is empty")
    if batch_size > len(tr):
        raise DataError(f"Trainer: batch_size {batch_size} exceeds the {len(tr)} training images")
    if num_classes:
        check_labels(data, num_classes)


def check_labels(data: Any, num_classes: int) -> None:
    """Both splits of ``data`` have int labels in ``0 .. num_classes-1``, one per image
    (:class:`~flownp.errors.DataError` naming the dataset and the problem)."""
    name = getattr(data, "name", "the dataset")
    for split in ("train", "test"):
        y = getattr(data, f"{split}_labels", None)
        images = getattr(data, split)
        if y is None:
            raise DataError(
                f"a class-conditional model needs labelled data, but {name!r} has no labels"
                + (" for its held-out images" if split == "test" else "")
                + " (docs/data.md: labels and classes)"
            )
        y = np.asarray(y)
        if y.shape != (len(images),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{name!r}: {split} labels must be ints of shape ({len(images)},)")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise DataError(
                f"{name!r}: {split} label {bad} is outside the model's classes 0..{num_classes - 1}"
            )


@dataclass(frozen=True)
class Batch:
    """One step's data: ``x``, the dequantised images ``(N, H, W, C)`` in model space, and
    ``labels``, their int64 labels ``(N,)`` (None: an unconditional model's batch)."""

    x: np.ndarray
    labels: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        return int(self.x.shape[0])

    def part(self, rows: slice) -> Batch:
        """The images ``rows`` of this batch (a process's share, :func:`flownp.distributed.share`),
        with their labels."""
        return Batch(self.x[rows], None if self.labels is None else self.labels[rows])


class DataStream:
    """Batches of ``images`` (uint8 NHWC) in the order of the module docstring.

    ``epoch``, ``position`` (index into the epoch's permutation) and ``rng`` (the noise
    generator) are the state; :meth:`state` / :meth:`restore` save and set it.
    """

    def __init__(
        self,
        images: np.ndarray,
        *,
        seed: int,
        dtype: Any,
        labels: np.ndarray | None = None,
        n_bits: int = 8,
    ) -> None:
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.seed = int(seed)
        self.dtype = dtype
        self.n_bits = int(n_bits)
        self.rng = np.random.default_rng([self.seed, 1])
        self.epoch = 0
        self.position = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, 3, epoch]).permutation(len(self.images))
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def next_batch(self, batch_size: int) -> Batch:
        """The next batch (advances epoch / position and the noise generator)."""
        if self.position + batch_size > len(self.images):  # drop the incomplete last batch
            self.epoch += 1
            self.position = 0
        idx = np.sort(self.permutation(self.epoch)[self.position : self.position + batch_size])
        self.position += batch_size
        x = dequantize(self.images[idx], self.rng, self.dtype, self.n_bits)
        return Batch(x, None if self.labels is None else self.labels[idx])

    def init_batch(self, size: int) -> np.ndarray:
        """The images of the data-dependent initialisation (their own generator: the stream's
        state is not touched)."""
        rng = np.random.default_rng([self.seed, 2])
        n = len(self.images)
        idx = np.sort(rng.choice(n, size=min(size, n), replace=False))
        return dequantize(self.images[idx], rng, self.dtype, self.n_bits)

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "rng_state": self.rng.bit_generator.state,
        }

    def restore(self, epoch: int, position: int, rng_state: dict[str, Any]) -> None:
        self.epoch = int(epoch)
        self.position = int(position)
        self.rng.bit_generator.state = rng_state
