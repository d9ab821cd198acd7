r"""Ordinary "same"-padded convolution, for the (non-invertible) conditioner networks and the
split prior. im2col + one BLAS matrix product, which is what wide (512-channel) layers need.

Symmetric zero padding of p = (k-1)//2 on every side (k odd)::

    y[n,i,j,o] = sum_{a,b<k} sum_c x[n, i-p+a, j-p+b, c] K[a,b,c,o]  (+ bias[o])

Backward::

    dK = cols^T dy,   db = sum dy,   dx = col2im(dy K^T)

where ``cols[n,i,j,a,b,c] = x[n, i-p+a, j-p+b, c]`` (zero outside the image).
"""

from __future__ import annotations

import numpy as np


def _check_kernel(K: np.ndarray) -> int:
    k = K.shape[0]
    if K.ndim != 4 or K.shape[1] != k or k % 2 == 0:
        raise ValueError(f"conv_same: kernel must be (k, k, C_in, C_out) with k odd, got {K.shape}")
    return k


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """``(N, H, W, C) -> (N*H*W, k*k*C)`` patches in (a, b, c) order, zero padded."""
    N, H, W, C = x.shape
    p = (k - 1) // 2
    if k == 1:
        return x.reshape(N * H * W, C)
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = np.empty((N, H, W, k, k, C), dtype=x.dtype)
    for a in range(k):
        for b in range(k):
            cols[:, :, :, a, b, :] = xp[:, a : a + H, b : b + W, :]
    return cols.reshape(N * H * W, k * k * C)


def col2im(dcols: np.ndarray, shape: tuple[int, int, int, int], k: int) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add patches back to an ``(N, H, W, C)`` image."""
    N, H, W, C = shape
    p = (k - 1) // 2
    if k == 1:
        return dcols.reshape(N, H, W, C)
    d = dcols.reshape(N, H, W, k, k, C)
    dxp = np.zeros((N, H + 2 * p, W + 2 * p, C), dtype=dcols.dtype)
    for a in range(k):
        for b in range(k):
            dxp[:, a : a + H, b : b + W, :] += d[:, :, :, a, b, :]
    return dxp[:, p : p + H, p : p + W, :]


def conv_same_forward(x: np.ndarray, K: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Same-padded convolution. x: (N,H,W,C), K: (k,k,C,Co), bias: (Co,) or None."""
    k = _check_kernel(K)
    N, H, W, C = x.shape
    Co = K.shape[3]
    y = im2col(x, k) @ K.reshape(k * k * C, Co)
    if bias is not None:
        y += bias
    return y.reshape(N, H, W, Co)


def conv_same_backward(
    x: np.ndarray, K: np.ndarray, dy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(conv_same_forward(x, K, b) * dy)``: returns ``(dx, dK, db)``."""
    k = _check_kernel(K)
    N, H, W, C = x.shape
    Co = K.shape[3]
    dy2 = dy.reshape(-1, Co)
    dK = (im2col(x, k).T @ dy2).reshape(K.shape)
    db = dy2.sum(axis=0)
    dx = col2im(dy2 @ K.reshape(k * k * C, Co).T, x.shape, k)
    return dx, dK, db
