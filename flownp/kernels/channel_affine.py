r"""Per-channel affine map over the last axis and its backward, one compiled pass each (the
ActNorm layer's arithmetic; its math is documented with the layer,
:mod:`flownp.layers.actnorm`)::

    forward    y = (x + bias) * scale                       (broadcast over all but the last axis)
    backward   dx = dy * scale,   dbias = sum dx,   dlog scale = sum dy * y    (sums over all but C)

Why compiled: NumPy broadcasts a 4-channel vector over an array with an inner loop of four
elements, about 2 ns an element (and an axis-0 sum of a (M, 4) array about 4 ns). Here the
flat array is walked in runs of ``16 C`` elements against the bias and scale tiled 16 times,
so the inner loop is long and vectorised whatever C; the sums collect in ``16 C`` partial
sums (one per lane and channel) that are folded at the end, in a fixed order. A single
thread: the arrays of an ActNorm are small next to the matrix products around them.
"""

from __future__ import annotations

import numpy as np

from flownp._numba import jit
from flownp.kernels import _validate as V

#: Copies of the channel vector in one run (16 C elements: 16 lanes per channel).
_TILE = 16
_u = np.uint64  # unsigned indices: no wrap-around check, so LLVM vectorises the runs


def _forward_kernel(x, bt, st, y):  # pragma: no cover - compiled
    """``y = (x + bt) * st`` over the flat arrays, ``bt``/``st`` tiled to the run length."""
    n = x.shape[0]
    L = bt.shape[0]
    full = n - n % L
    for base in range(0, full, L):
        for u in range(L):
            y[_u(base + u)] = (x[_u(base + u)] + bt[_u(u)]) * st[_u(u)]
    for q in range(full, n):
        y[q] = (x[q] + bt[q - full]) * st[q - full]


def _backward_kernel(dy, y, st, dx, acc):  # pragma: no cover - compiled
    """``dx = dy * st``; ``acc[0, u] += dx``, ``acc[1, u] += dy * y`` per run position."""
    n = dy.shape[0]
    L = st.shape[0]
    full = n - n % L
    for u in range(L):
        acc[0, u] = 0.0
        acc[1, u] = 0.0
    for base in range(0, full, L):
        for u in range(L):
            g = dy[_u(base + u)]
            d = g * st[_u(u)]
            dx[_u(base + u)] = d
            acc[0, _u(u)] += d
            acc[1, _u(u)] += g * y[_u(base + u)]
    for q in range(full, n):
        g = dy[q]
        d = g * st[q - full]
        dx[q] = d
        acc[0, q - full] += d
        acc[1, q - full] += g * y[q]


_forward_nb = jit(_forward_kernel)
_backward_nb = jit(_backward_kernel)


def _tiled(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.tile(v, _TILE))


def channel_affine_forward(x: np.ndarray, bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x + bias) * scale`` over the last axis of ``x (..., C)``; bias, scale: (C,), cast to
    the dtype of ``x``. Returns a new array like ``x``."""
    x = np.ascontiguousarray(x)
    if x.ndim < 1 or x.dtype not in V.FLOATS:
        raise ValueError(f"channel_affine_forward: x must be a float array, got {x.dtype}")
    C = x.shape[-1]
    bias = V.vector("channel_affine_forward", "bias", bias, C, x.dtype)
    scale = V.vector("channel_affine_forward", "scale", scale, C, x.dtype)
    y = np.empty_like(x)
    _forward_nb(x.reshape(-1), _tiled(bias), _tiled(scale), y.reshape(-1))
    return y


def channel_affine_backward(
    dy: np.ndarray, y: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`channel_affine_forward` given its output ``y``: returns
    ``(dx, dbias, dlogscale)`` with ``dx = dy * scale``, ``dbias = sum dx`` and
    ``dlogscale = sum dy * y`` over all but the last axis (module docstring)."""
    y = np.ascontiguousarray(y)
    if y.ndim < 1 or y.dtype not in V.FLOATS:
        raise ValueError(f"channel_affine_backward: y must be a float array, got {y.dtype}")
    if np.shape(dy) != y.shape:
        raise ValueError(
            f"channel_affine_backward: dy {np.shape(dy)} and y {y.shape} must have one shape"
        )
    C = y.shape[-1]
    scale = V.vector("channel_affine_backward", "scale", scale, C, y.dtype)
    dy = np.ascontiguousarray(dy, dtype=y.dtype)
    dx = np.empty_like(y)
    acc = np.empty((2, _TILE * C), dtype=y.dtype)
    _backward_nb(dy.reshape(-1), y.reshape(-1), _tiled(scale), dx.reshape(-1), acc)
    sums = acc.reshape(2, _TILE, C).sum(axis=1, dtype=np.float64).astype(y.dtype)
    return dx, sums[0], sums[1]


def channel_affine_forward_reference(
    x: np.ndarray, bias: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Plain NumPy reference of :func:`channel_affine_forward`."""
    return (x + bias) * scale


def channel_affine_backward_reference(
    dy: np.ndarray, y: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain NumPy reference of :func:`channel_affine_backward`."""
    C = y.shape[-1]
    dx = dy * scale
    return dx, dx.reshape(-1, C).sum(axis=0), (dy * y).reshape(-1, C).sum(axis=0)
