r"""Kernels of the top-left padded ("causal") convolution and its inverse.

Notation (used throughout flownp, see ``docs/conventions.md``)::

    x : (N, H, W, C_in)        NHWC input
    K : (k, k, C_in, C_out)    kernel, paper Definition 1
    y : (N, H, W, C_out)

The input is zero padded with k-1 rows on top and k-1 columns on the left, then convolved
with no further padding (paper Definition 2 with (t, b, l, r) = (k-1, 0, k-1, 0))::

    y[n, i, j, o] = sum_{a, b < k} sum_c  x[n, i - (k-1) + a, j - (k-1) + b, c] * K[a, b, c, o]

(terms whose input index is negative are zero). Tap (a, b) therefore reads the pixel
``(da, db) = (k-1-a, k-1-b)`` rows/columns *above/left of* the output pixel; the tap
``(k-1, k-1)`` is the "corner", the current pixel. In the raster vectorisation
``x.reshape(N, -1)`` (row, column, channel) every output depends only on the same or earlier
pixels, hence the matrix is block lower triangular with the corner channel block
``A[o, c] = K[k-1, k-1, c, o]`` on its diagonal (paper Lemma 1).

Inverse. Given y, the pixels are solved in an order where every pixel's dependencies are
already known::

    r = y[n, i, j, :] - sum_{(a, b) != corner} K[a, b]^T x[n, i-da, j-db, :]     (residual)
    A x[n, i, j, :] = r                                                          (C x C solve)

``A`` is passed factorised as ``A = P L U`` (``L`` lower, ``U`` upper triangular, each with
its own diagonal, ``P`` a permutation given as ``perm`` with ``(P^T r)[m] = r[perm[m]]``).
The masked CInC layer passes ``L = A`` (lower triangular), ``U = I``, ``perm = arange(C)``.
All pixels on one anti-diagonal ``i + j = s`` depend only on diagonals ``< s``: the
wavefront solve needs ``H + W - 1`` sequential steps, each parallel over batch and pixels.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from flownp._numba import jit, pjit, prange

# --------------------------------------------------------------------------------------------
# Forward: y = conv(pad_top_left(x), K)
# --------------------------------------------------------------------------------------------


def conv_forward_reference(x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Readable NumPy reference of :func:`conv_forward`: one matrix product per tap."""
    N, H, W, _ = x.shape
    k = K.shape[0]
    y = np.zeros((N, H, W, K.shape[3]), dtype=np.result_type(x, K))
    for a in range(k):
        for b in range(k):
            da, db = k - 1 - a, k - 1 - b  # tap (a, b) reads pixel (i - da, j - db)
            if da >= H or db >= W:
                continue
            y[:, da:, db:, :] += x[:, : H - da, : W - db, :] @ K[a, b]
    return y


def _conv_forward_kernel(x, K, y):  # pragma: no cover - compiled
    N, H, W, C = x.shape
    k = K.shape[0]
    Co = K.shape[3]
    for t in prange(N * H):  # one output row per task: disjoint writes
        n = t // H
        i = t % H
        for j in range(W):
            for o in range(Co):
                y[n, i, j, o] = 0.0
            for a in range(k):
                ii = i - (k - 1) + a
                if ii < 0:
                    continue
                for b in range(k):
                    jj = j - (k - 1) + b
                    if jj < 0:
                        continue
                    for c in range(C):
                        xv = x[n, ii, jj, c]
                        for o in range(Co):
                            y[n, i, j, o] += xv * K[a, b, c, o]


_conv_forward_nb = pjit(_conv_forward_kernel)


def conv_forward(x: np.ndarray, K: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Top-left padded convolution ``y = conv(pad(x), K)``. x: (N,H,W,C), K: (k,k,C,Co)."""
    if out is None:
        out = np.empty(x.shape[:3] + (K.shape[3],), dtype=x.dtype)
    _conv_forward_nb(x, K, out)
    return out


# --------------------------------------------------------------------------------------------
# Backward with respect to the input: dx = M^T dy
# --------------------------------------------------------------------------------------------


def conv_backward_input_reference(dy: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Readable reference of :func:`conv_backward_input` (the transpose of the forward).

    ``dx[n, p, q, c] = sum_{a,b} sum_o dy[n, p + da, q + db, o] * K[a, b, c, o]``.
    """
    N, H, W, _ = dy.shape
    k = K.shape[0]
    dx = np.zeros((N, H, W, K.shape[2]), dtype=np.result_type(dy, K))
    for a in range(k):
        for b in range(k):
            da, db = k - 1 - a, k - 1 - b
            if da >= H or db >= W:
                continue
            dx[:, : H - da, : W - db, :] += dy[:, da:, db:, :] @ K[a, b].T
    return dx


def _conv_backward_input_kernel(dy, K, dx):  # pragma: no cover - compiled
    N, H, W, Co = dy.shape
    k = K.shape[0]
    C = K.shape[2]
    for t in prange(N * H):
        n = t // H
        p = t % H
        for q in range(W):
            for c in range(C):
                dx[n, p, q, c] = 0.0
            for a in range(k):
                ii = p + (k - 1) - a
                if ii >= H:
                    continue
                for b in range(k):
                    jj = q + (k - 1) - b
                    if jj >= W:
                        continue
                    for c in range(C):
                        acc = 0.0
                        for o in range(Co):
                            acc += dy[n, ii, jj, o] * K[a, b, c, o]
                        dx[n, p, q, c] += acc


_conv_backward_input_nb = pjit(_conv_backward_input_kernel)


def conv_backward_input(dy: np.ndarray, K: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Gradient of ``conv_forward`` with respect to its input: ``dx = M^T dy``."""
    if out is None:
        out = np.empty(dy.shape[:3] + (K.shape[2],), dtype=dy.dtype)
    _conv_backward_input_nb(dy, K, out)
    return out


# --------------------------------------------------------------------------------------------
# Backward with respect to the kernel
# --------------------------------------------------------------------------------------------


def conv_backward_kernel(x: np.ndarray, dy: np.ndarray, k: int) -> np.ndarray:
    """Gradient of ``sum(y * dy)`` with respect to K: one BLAS product per tap.

    ``dK[a, b] = sum_{n,i,j} x[n, i-da, j-db, :]^T dy[n, i, j, :]``, shape (k, k, C, Co).
    Deterministic for a fixed BLAS thread count (no atomics, fixed summation order).
    """
    N, H, W, C = x.shape
    Co = dy.shape[3]
    dK = np.zeros((k, k, C, Co), dtype=np.result_type(x, dy))
    for a in range(k):
        for b in range(k):
            da, db = k - 1 - a, k - 1 - b
            if da >= H or db >= W:
                continue
            xs = x[:, : H - da, : W - db, :].reshape(-1, C)
            ds = dy[:, da:, db:, :].reshape(-1, Co)
            dK[a, b] = xs.T @ ds
    return dK


# --------------------------------------------------------------------------------------------
# Inverse: solve conv(pad(x), K) = y for x
# --------------------------------------------------------------------------------------------


def solve_reference(
    y: np.ndarray, K: np.ndarray, L: np.ndarray, U: np.ndarray, perm: np.ndarray
) -> np.ndarray:
    """Readable reference of the inverse: raster-order substitution with SciPy's triangular
    solves, vectorised over the batch. The corner tap of ``K`` is ignored and replaced by
    ``A = P L U`` (see module docstring)."""
    N, H, W, C = y.shape
    k = K.shape[0]
    x = np.zeros_like(y)
    for i in range(H):
        for j in range(W):
            r = y[:, i, j, :].copy()  # (N, C)
            for a in range(k):
                for b in range(k):
                    da, db = k - 1 - a, k - 1 - b
                    if (da == 0 and db == 0) or i - da < 0 or j - db < 0:
                        continue
                    r -= x[:, i - da, j - db, :] @ K[a, b]
            z = scipy.linalg.solve_triangular(L, r[:, perm].T, lower=True)  # (C, N)
            x[:, i, j, :] = scipy.linalg.solve_triangular(U, z, lower=False).T
    return x


def _solve_pixel(y, Kp, L, U, perm, x, n, i, j):  # pragma: no cover - compiled
    """Solve pixel (i, j) of sample n in place into x[n, i, j, :] (all earlier pixels known).

    ``Kp = K[..., perm]`` so that the residual is formed directly in permuted order.
    """
    k = Kp.shape[0]
    C = Kp.shape[2]
    Co = Kp.shape[3]
    xo = x[n, i, j]
    for m in range(Co):  # residual r_m = y[perm[m]] - sum_taps ..., in permuted order
        xo[m] = y[n, i, j, perm[m]]
    for a in range(k):
        ii = i - (k - 1) + a
        if ii < 0:
            continue
        for b in range(k):
            jj = j - (k - 1) + b
            if jj < 0 or (a == k - 1 and b == k - 1):
                continue
            for c in range(C):
                xv = x[n, ii, jj, c]
                for m in range(Co):
                    xo[m] -= xv * Kp[a, b, c, m]
    for m in range(Co):  # forward substitution L z = r (in place)
        acc = xo[m]
        for l in range(m):
            acc -= L[m, l] * xo[l]
        xo[m] = acc / L[m, m]
    for m in range(Co - 1, -1, -1):  # back substitution U x = z (in place)
        acc = xo[m]
        for l in range(m + 1, Co):
            acc -= U[m, l] * xo[l]
        xo[m] = acc / U[m, m]


_solve_pixel_nb = jit(_solve_pixel)


def _solve_raster_kernel(y, Kp, L, U, perm, x):  # pragma: no cover - compiled
    N, H, W, C = y.shape
    for n in prange(N):  # the official scheme: parallel over the batch only
        for i in range(H):
            for j in range(W):
                _solve_pixel_nb(y, Kp, L, U, perm, x, n, i, j)


def _solve_wavefront_kernel(y, Kp, L, U, perm, x):  # pragma: no cover - compiled
    N, H, W, C = y.shape
    for s in range(H + W - 1):  # H + W - 1 sequential steps
        i0 = max(0, s - W + 1)
        npix = min(s, H - 1) - i0 + 1
        for t in prange(N * npix):  # every (sample, pixel) of this anti-diagonal
            n = t // npix
            i = i0 + t % npix
            _solve_pixel_nb(y, Kp, L, U, perm, x, n, i, s - i)


_solve_raster_nb = pjit(_solve_raster_kernel)
_solve_wavefront_nb = pjit(_solve_wavefront_kernel)


def _solve(kernel, y, K, L, U, perm):
    Kp = np.ascontiguousarray(K[..., perm])
    x = np.empty_like(y)
    kernel(y, Kp, np.ascontiguousarray(L), np.ascontiguousarray(U), perm.astype(np.int64), x)
    return x


def solve_raster(
    y: np.ndarray, K: np.ndarray, L: np.ndarray, U: np.ndarray, perm: np.ndarray
) -> np.ndarray:
    """Inverse by sequential substitution in raster order (parallel over the batch only)."""
    return _solve(_solve_raster_nb, y, K, L, U, perm)


def solve_wavefront(
    y: np.ndarray, K: np.ndarray, L: np.ndarray, U: np.ndarray, perm: np.ndarray
) -> np.ndarray:
    """Inverse by anti-diagonal wavefront: H + W - 1 steps, parallel over batch and pixels."""
    return _solve(_solve_wavefront_nb, y, K, L, U, perm)
