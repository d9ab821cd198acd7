r"""Pixels and model space: the one place where uint8 images become model inputs and back.

The training recipe (Glow lineage): a uint8 pixel ``u`` stands for the bin
``[u / 256 - 1/2, (u + 1) / 256 - 1/2)`` of model space::

    dequantize(u, rng)    x = (u + U[0, 1)) / 256 - 1/2      training and bits/dim
    images_to_model(u)    x = (u + 1/2) / 256 - 1/2          the bin centre (no noise)
    to_uint8(x)           u = clip(floor((x + 1/2) 256), 0, 255)

One rounding rule, ``floor``: it maps every point of a bin, a dequantised sample or a bin
centre, back to its pixel, and a bin centre survives any error below half a bin (``1/512``).

N-bit data (``n_bits = N`` in 1..8, openai/glow ``--n_bits_x``; 8 is the default above): a
pixel keeps its ``N`` high bits, ``v = floor(u / 2^(8-N))`` in ``0 .. 2^N - 1``, and stands for
the wider bin ``[v / 2^N - 1/2, (v + 1) / 2^N - 1/2)``::

    reduce_bits(u)        v = floor(u / 2^(8-N))                 (reduce_bits(u, 8) = u)
    dequantize(u, rng)    x = (v + U[0, 1)) / 2^N - 1/2          U(0, 1/2^N) in model space
    images_to_model(u)    x = (v + 1/2) / 2^N - 1/2
    to_uint8(x)           u = clip(floor((x + 1/2) 2^N), 0, 2^N - 1) * 2^(8-N)

so a model of N-bit data sees ``2^N`` levels per pixel, and its samples come back as uint8
images on the same ``2^(8-N)`` grid (:func:`quantize` puts data on that grid, for pictures and
exact comparisons). Bits/dim of such a model counts ``D ln 2^N`` instead of ``D ln 256``
(:func:`flownp.model.bits_per_dim`): a uniform model scores exactly N bits/dim.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.errors import DataError, NonFiniteError

__all__ = [
    "dequantize",
    "images_to_model",
    "to_uint8",
    "model_to_images",
    "reduce_bits",
    "quantize",
    "check_n_bits",
    "N_BITS",
]

N_BITS = 8  # the default: 8-bit data


def check_n_bits(n_bits: Any) -> int:
    """``n_bits`` as an int in 1..8, else ``ValueError``."""
    if (
        isinstance(n_bits, bool)
        or not isinstance(n_bits, (int, np.integer))
        or not 1 <= n_bits <= 8
    ):
        raise ValueError(f"n_bits must be an int in 1..8, got {n_bits!r}")
    return int(n_bits)


def reduce_bits(images: np.ndarray, n_bits: int = N_BITS) -> np.ndarray:
    """uint8 images -> their N-bit values ``v = floor(u / 2^(8-N))`` (uint8, ``0 .. 2^N - 1``)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"reduce_bits: images must be uint8, got dtype {images.dtype}")
    n = check_n_bits(n_bits)
    return images if n == 8 else images >> np.uint8(8 - n)


def quantize(images: np.ndarray, n_bits: int = N_BITS) -> np.ndarray:
    """uint8 images on the grid of N-bit data, ``floor(u / 2^(8-N)) * 2^(8-N)``: what a model
    of N-bit data sees of them (and what :func:`to_uint8` of its output looks like)."""
    n = check_n_bits(n_bits)
    return reduce_bits(images, n) << np.uint8(8 - n) if n < 8 else np.asarray(images)


def dequantize(
    images: np.ndarray, rng: np.random.Generator | None, dtype: Any, n_bits: int = N_BITS
) -> np.ndarray:
    """uint8 images ``u`` -> ``v / 2^N - 0.5 + U(0, 1/2^N)`` in ``dtype``, ``v`` =
    :func:`reduce_bits` ``(u, N)`` (``u / 256 - 0.5 + U(0, 1/256)`` for 8 bits).

    The uniform noise is drawn on a grid of ``2**-b`` of a bin (b = 16 in float32, 32 in
    float64), so that ``(v + noise) / 2^N - 0.5`` is computed exactly and always lies inside
    the pixel's bin ``[v/2^N - 0.5, (v+1)/2^N - 0.5)`` (a rounded float noise could land on
    the next bin's edge). ``rng=None`` gives the bin centres ``(v + 1/2) / 2^N - 0.5``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"dequantize: images must be uint8, got dtype {images.dtype}")
    n = check_n_bits(n_bits)
    images = reduce_bits(images, n)
    dt = np.dtype(dtype)
    if rng is None:
        noise = np.full(images.shape, 0.5, dtype=dt)
    else:
        bits = 16 if dt == np.float32 else 32
        grid = rng.integers(0, 1 << bits, size=images.shape, dtype=np.uint64)  # U{0..2^b-1}
        noise = grid.astype(dt) * dt.type(2.0**-bits)  # in [0, 1), exact
    return (images.astype(dt) + noise) / dt.type(2**n) - dt.type(0.5)


def to_uint8(x: np.ndarray, n_bits: int = N_BITS) -> np.ndarray:
    """Model space -> uint8: ``clip(floor((x + 0.5) * 2^N), 0, 2^N - 1) * 2^(8-N)``
    (``clip(floor((x + 0.5) * 256), 0, 255)`` for 8 bits). NaN becomes 0 (for pictures of
    samples; :func:`model_to_images` refuses it)."""
    n = check_n_bits(n_bits)
    v = np.floor((np.asarray(x, dtype=np.float64) + 0.5) * 2**n)
    v = np.clip(np.nan_to_num(v, nan=0.0), 0, 2**n - 1).astype(np.uint8)
    return v << np.uint8(8 - n) if n < 8 else v


def images_to_model(
    images: np.ndarray, dtype: Any = np.float64, n_bits: int = N_BITS
) -> np.ndarray:
    """uint8 images -> the centres of their bins in model space, ``(v + 1/2) / 2^N - 1/2``
    (exact in float32 and float64): :func:`dequantize` without noise."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images_to_model: expects uint8 images, got dtype {images.dtype}")
    return dequantize(images, None, dtype, n_bits)


def model_to_images(x: np.ndarray, n_bits: int = N_BITS) -> np.ndarray:
    """:func:`to_uint8` that refuses NaN / Inf (:class:`~flownp.errors.NonFiniteError`).

    Exact inverse of :func:`images_to_model` (up to :func:`quantize`) for errors below half a
    bin (``1/2^(N+1)``); values an edit pushed outside ``[-1/2, 1/2)`` are clipped.
    """
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise NonFiniteError(f"model_to_images: {int(np.sum(~np.isfinite(x)))} NaN/Inf value(s)")
    return to_uint8(x, n_bits)
