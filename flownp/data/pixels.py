r"""Pixels and model space: the one place where uint8 images become model inputs and back.

The training recipe (Glow lineage): a uint8 pixel ``u`` stands for the bin
``[u / 256 - 1/2, (u + 1) / 256 - 1/2)`` of model space::

    dequantize(u, rng)    x = (u + U[0, 1)) / 256 - 1/2      training and bits/dim
    images_to_model(u)    x = (u + 1/2) / 256 - 1/2          the bin centre (no noise)
    to_uint8(x)           u = clip(floor((x + 1/2) 256), 0, 255)

One rounding rule, ``floor``: it maps every point of a bin, a dequantised sample or a bin
centre, back to its pixel, and a bin centre survives any error below half a bin (``1/512``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.errors import DataError, NonFiniteError

__all__ = ["dequantize", "images_to_model", "to_uint8", "model_to_images"]


def dequantize(images: np.ndarray, rng: np.random.Generator | None, dtype: Any) -> np.ndarray:
    """uint8 images ``u`` -> ``u / 256 - 0.5 + U(0, 1/256)`` in ``dtype``.

    The uniform noise is drawn on a grid of ``2**-b`` of a bin (b = 16 in float32, 32 in
    float64), so that ``(u + noise) / 256 - 0.5`` is computed exactly and always lies inside
    the pixel's bin ``[u/256 - 0.5, (u+1)/256 - 0.5)`` (a rounded float noise could land on
    the next bin's edge). ``rng=None`` gives the bin centres ``u / 256 - 0.5 + 1/512``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"dequantize: images must be uint8, got dtype {images.dtype}")
    dt = np.dtype(dtype)
    if rng is None:
        noise = np.full(images.shape, 0.5, dtype=dt)
    else:
        bits = 16 if dt == np.float32 else 32
        grid = rng.integers(0, 1 << bits, size=images.shape, dtype=np.uint64)  # U{0..2^b-1}
        noise = grid.astype(dt) * dt.type(2.0**-bits)  # in [0, 1), exact
    return (images.astype(dt) + noise) / dt.type(256) - dt.type(0.5)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model space -> uint8: ``clip(floor((x + 0.5) * 256), 0, 255)``. NaN becomes 0 (for
    pictures of samples; :func:`model_to_images` refuses it)."""
    u = np.floor((np.asarray(x, dtype=np.float64) + 0.5) * 256)
    return np.clip(np.nan_to_num(u, nan=0.0), 0, 255).astype(np.uint8)


def images_to_model(images: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """uint8 images -> the centres of their bins in model space, ``(u + 1/2) / 256 - 1/2``
    (exact in float32 and float64): :func:`dequantize` without noise."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images_to_model: expects uint8 images, got dtype {images.dtype}")
    return dequantize(images, None, dtype)


def model_to_images(x: np.ndarray) -> np.ndarray:
    """:func:`to_uint8` that refuses NaN / Inf (:class:`~flownp.errors.NonFiniteError`).

    Exact inverse of :func:`images_to_model` for errors below ``1/512``; values an edit pushed
    outside ``[-1/2, 1/2)`` are clipped.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise NonFiniteError(f"model_to_images: {int(np.sum(~np.isfinite(x)))} NaN/Inf value(s)")
    return to_uint8(x)
