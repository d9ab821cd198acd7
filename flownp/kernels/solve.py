r"""Kernels of the inverse of the top-left padded convolution: substitution.

Notation as in :mod:`flownp.kernels.conv` (``x``, ``K``, ``y``, tap ``(a, b)`` reading the pixel
``(da, db) = (k-1-a, k-1-b)`` above/left, the corner ``A[o, c] = K[k-1, k-1, c, o]``).

Inverse. Given y, the pixels are solved in an order where every pixel's dependencies are
already known::

    r = y[n, i, j, :] - sum_{(a, b) != corner} K[a, b]^T x[n, i-da, j-db, :]     (residual)
    A x[n, i, j, :] = r                                                          (C x C solve)

``A`` is passed factorised as ``A = P L U`` (``L`` lower, ``U`` upper triangular, each with
its own diagonal, ``P`` a permutation given as ``perm`` with ``(P^T r)[m] = r[perm[m]]``).
The masked CInC layer passes ``L = A`` (lower triangular), ``U = I``, ``perm = arange(C)``.
All pixels on one anti-diagonal ``i + j = s`` depend only on diagonals ``< s``: the
wavefront solve needs ``H + W - 1`` sequential steps, each parallel over batch and pixels.

Implementation (``docs/performance.md``)
----------------------------------------
The residual is formed by the convolution's register-blocked micro-kernel
(:func:`flownp.kernels.conv._accumulate_taps`, inlined into the compiled loops here) on the
non-corner taps with ``-K[a, b]``. Numba's cache is per file: after editing that micro-kernel,
delete the compiled caches (``find flownp -name '*.nbi' -delete``) or this module keeps the
old machine code.

* The inverse forms the residual with the same micro-kernel into a scratch buffer ``r``
  distinct from ``x`` and applies ``A^{-1} = U^{-1} L^{-1} P^T`` (computed once per call, in
  float64, from the triangular factors) as one more dense C x C "tap", so it does the same
  multiply-adds as the forward plus one C x C product per pixel, all vectorised. (The
  readable substitution ``L z = P^T r``, ``U x = z`` is kept in :func:`solve_reference` and
  :func:`solve_pixelwise`.) Rounding: ``x = fl(A^{-1}) r`` differs from substitution by
  O(cond(A) eps), far below the float32 round-off of a training step for the well
  conditioned corners flows use.
* The raster solve is parallel over blocks of samples on the pool of :mod:`flownp.threads`;
  the wavefront solve, available on request, uses Numba's ``prange`` (one region per
  anti-diagonal). Every schedule does the same arithmetic per pixel in the same order.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from flownp import threads
from flownp._numba import jit, jit_inline, pjit, prange
from flownp.kernels import _validate as V
from flownp.kernels.conv import (
    _NS_PER_MAC,
    _P,
    _VW,
    _accumulate_taps_nb,
    _padded_channels,
    _store_block_nb,
    _taps,
)

# --------------------------------------------------------------------------------------------
# The readable reference
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


def _solve_block_pixel(y, Kn, off, AiT, x, r, acc, n0, i, j):  # pragma: no cover - compiled
    """Solve pixel (i, j) of samples n0 .. n0+_P-1 (every earlier pixel known).

    ``Kn`` holds the *negated* non-corner taps, so ``acc = y + sum_t x Kn`` is the residual;
    ``AiT[m, o] = A^{-1}[o, m]`` (padded). ``r`` (_P, Cp) is scratch, distinct from ``x``.
    """
    N, _, _, C = y.shape
    nob = (C + _VW - 1) // _VW
    for ob in range(nob):  # residual r = y - sum_{non-corner taps} K^T x
        o0 = ob * _VW
        acc[:] = 0.0
        m = min(_VW, C - o0)
        for p in range(_P):
            n = min(n0 + p, N - 1)
            for o in range(m):
                acc[p, o] = y[n, i, j, o0 + o]
        _accumulate_taps_nb(x, Kn, off, n0, i, j, o0, acc)
        for p in range(_P):
            for o in range(_VW):
                r[p, o0 + o] = acc[p, o]
    for ob in range(nob):  # x = A^{-1} r
        o0 = ob * _VW
        acc[:] = 0.0
        for c in range(C):
            r0 = r[0, c]
            r1 = r[1, c]
            r2 = r[2, c]
            r3 = r[3, c]
            r4 = r[4, c]
            r5 = r[5, c]
            r6 = r[6, c]
            r7 = r[7, c]
            for o in range(_VW):
                kv = AiT[c, o0 + o]
                acc[0, o] += r0 * kv
                acc[1, o] += r1 * kv
                acc[2, o] += r2 * kv
                acc[3, o] += r3 * kv
                acc[4, o] += r4 * kv
                acc[5, o] += r5 * kv
                acc[6, o] += r6 * kv
                acc[7, o] += r7 * kv
        _store_block_nb(acc, x, n0, i, j, o0)


_solve_block_pixel_nb = jit_inline(_solve_block_pixel)


def _solve_raster_kernel(y, Kn, off, AiT, x, b0, b1):  # pragma: no cover - compiled
    N, H, W, _ = y.shape
    Cp = AiT.shape[1]
    for blk in range(b0, b1):  # blocks of samples are independent (the official scheme)
        acc = np.empty((_P, _VW), dtype=x.dtype)
        r = np.empty((_P, Cp), dtype=x.dtype)
        for i in range(H):
            for j in range(W):
                _solve_block_pixel_nb(y, Kn, off, AiT, x, r, acc, blk * _P, i, j)


def _solve_wavefront_kernel(y, Kn, off, AiT, x):  # pragma: no cover - compiled
    N, H, W, _ = y.shape
    Cp = AiT.shape[1]
    nblk = (N + _P - 1) // _P
    for s in range(H + W - 1):  # H + W - 1 sequential steps
        i0 = max(0, s - W + 1)
        npix = min(s, H - 1) - i0 + 1
        ntask = nblk * npix  # every (sample block, pixel) of this anti-diagonal
        per = (ntask + 15) // 16  # at most 16 chunks: scratch allocated once per chunk
        for ch in prange((ntask + per - 1) // per):
            acc = np.empty((_P, _VW), dtype=x.dtype)
            r = np.empty((_P, Cp), dtype=x.dtype)
            for t in range(ch * per, min(ntask, (ch + 1) * per)):
                i = i0 + t % npix
                _solve_block_pixel_nb(y, Kn, off, AiT, x, r, acc, (t // npix) * _P, i, s - i)


_solve_raster_kernel_nb = jit(_solve_raster_kernel)
_solve_wavefront_nb = pjit(_solve_wavefront_kernel)


def _solve_raster_nb(y, Kn, off, AiT, x):
    """Raster substitution, blocks of samples spread over the thread pool."""
    N, H, W, C = y.shape
    macs = H * W * (max(1, off.shape[0]) * C + C) * AiT.shape[1] * _P  # per block
    threads.parallel_range(
        lambda b0, b1: _solve_raster_kernel_nb(y, Kn, off, AiT, x, b0, b1),
        (N + _P - 1) // _P,
        macs * _NS_PER_MAC,
    )


def _corner_inverse_kernel(L, U, perm, Ainv):  # pragma: no cover - compiled
    """``Ainv = U^{-1} L^{-1} P^T``: forward then back substitution, all C right-hand sides at
    once (row operations, vectorised over the columns)."""
    C = L.shape[0]
    for r in range(C):  # Ainv <- P^T, (P^T)[r, m] = [perm[r] == m]
        for m in range(C):
            Ainv[r, m] = 0.0
        Ainv[r, perm[r]] = 1.0
    for r in range(C):  # L Z = P^T
        for l in range(r):
            f = L[r, l]
            for m in range(C):
                Ainv[r, m] -= f * Ainv[l, m]
        for m in range(C):
            Ainv[r, m] /= L[r, r]
    for r in range(C - 1, -1, -1):  # U Ainv = Z
        for l in range(r + 1, C):
            f = U[r, l]
            for m in range(C):
                Ainv[r, m] -= f * Ainv[l, m]
        for m in range(C):
            Ainv[r, m] /= U[r, r]


_corner_inverse_nb = jit(_corner_inverse_kernel)


def corner_inverse(L: np.ndarray, U: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``A^{-1} = U^{-1} L^{-1} P^T`` for ``A = P L U``, in float64, by substitution.

    (A small serial loop rather than LAPACK: C <= a few hundred, and a BLAS call would wake
    the BLAS thread pool for microseconds of work.)
    """
    C = L.shape[0]
    Ainv = np.empty((C, C))
    _corner_inverse_nb(
        np.ascontiguousarray(L, dtype=np.float64),
        np.ascontiguousarray(U, dtype=np.float64),
        np.asarray(perm, dtype=np.int64),
        Ainv,
    )
    return Ainv


def _check_solve(fn, y, K, L, U, perm):
    y = V.float_array(fn, "y", y, 4)
    K = V.kernel_for(fn, K, y, xname="y")
    if K.shape[3] != K.shape[2]:
        raise ValueError(f"{fn}: K must map C channels to C, got {K.shape}")
    L, U, perm = V.corner_factors(fn, L, U, perm, y.shape[3])
    return y, K, L, U, perm


def _solve(kernel, y, K, L, U, perm, fn="solve"):
    y, K, L, U, perm = _check_solve(fn, y, K, L, U, perm)
    C = y.shape[3]
    off, Kn = _taps(K, y.dtype, skip_corner=True, scale=-1.0)
    AiT = np.zeros((C, _padded_channels(C)), dtype=y.dtype)  # AiT[m, o] = A^{-1}[o, m]
    AiT[:, :C] = corner_inverse(L, U, perm).T
    x = np.empty_like(y)
    kernel(y, Kn, off, AiT, x)
    return x


def solve_raster(
    y: np.ndarray, K: np.ndarray, L: np.ndarray, U: np.ndarray, perm: np.ndarray
) -> np.ndarray:
    """Inverse by sequential substitution in raster order, parallel over the batch only
    (blocks of 8 samples; module docstring). y: (N, H, W, C), K: (k, k, C, C), A = P L U."""
    return _solve(_solve_raster_nb, y, K, L, U, perm, "solve_raster")


def solve_wavefront(
    y: np.ndarray, K: np.ndarray, L: np.ndarray, U: np.ndarray, perm: np.ndarray
) -> np.ndarray:
    """Inverse by anti-diagonal wavefront: H + W - 1 steps, each parallel over (block of 8
    samples, pixel) pairs of one anti-diagonal. Arguments as :func:`solve_raster`."""
    return _solve(_solve_wavefront_nb, y, K, L, U, perm, "solve_wavefront")


def solve_schedule(n: int, threads: int | None = None) -> str:
    """The schedule :func:`solve_auto` uses: always ``"raster"`` (blocks of 8 samples spread
    over the thread pool; ``n`` and ``threads`` are accepted for compatibility).

    Measured (``docs/performance.md``): the wavefront runs H + W - 1 parallel regions per
    call, each ending in a barrier that waits for every thread; whenever another process
    holds a core, each barrier can wait a scheduler time slice, and sampling 8 images with
    2 threads took up to 60x as long as with 1. The raster schedule never waits for a thread
    that has not started. :func:`solve_wavefront` stays available on request (it helps only
    batches of fewer than 8 samples per thread on otherwise idle cores).
    """
    return "raster"


def solve_auto(
    y: np.ndarray, K: np.ndarray, L: np.ndarray, U: np.ndarray, perm: np.ndarray
) -> np.ndarray:
    """Inverse with the default schedule (:func:`solve_schedule`: :func:`solve_raster`).
    Every schedule does the same arithmetic per pixel in the same order, so the result is
    bitwise the same whichever is used."""
    return _solve(_solve_raster_nb, y, K, L, U, perm, "solve_auto")


# --------------------------------------------------------------------------------------------
# Unblocked baseline: per-pixel substitution (the straightforward transcription)
# --------------------------------------------------------------------------------------------


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


_solve_pixel_nb = jit_inline(_solve_pixel)


def _solve_pixelwise_kernel(y, Kp, L, U, perm, x, wavefront):  # pragma: no cover - compiled
    N, H, W, C = y.shape
    if not wavefront:
        for n in prange(N):
            for i in range(H):
                for j in range(W):
                    _solve_pixel_nb(y, Kp, L, U, perm, x, n, i, j)
        return
    for s in range(H + W - 1):
        i0 = max(0, s - W + 1)
        npix = min(s, H - 1) - i0 + 1
        for t in prange(N * npix):
            i = i0 + t % npix
            _solve_pixel_nb(y, Kp, L, U, perm, x, t // npix, i, s - i)


_solve_pixelwise_nb = pjit(_solve_pixelwise_kernel)


def solve_pixelwise(
    y: np.ndarray,
    K: np.ndarray,
    L: np.ndarray,
    U: np.ndarray,
    perm: np.ndarray,
    order: str = "raster",
) -> np.ndarray:
    """Unblocked baseline of the inverse: one sample and pixel at a time, residual then
    forward/back substitution with ``L`` and ``U``, in ``order`` ``"raster"`` (parallel over
    samples) or ``"wavefront"`` (parallel over samples x pixels of an anti-diagonal).

    The direct transcription of the module docstring's equations; the benchmark compares it
    with the blocked :func:`solve_raster` / :func:`solve_wavefront`.
    """
    if order not in ("raster", "wavefront"):
        raise ValueError(f"solve_pixelwise: order must be 'raster' or 'wavefront', got {order!r}")
    y, K, L, U, perm = _check_solve("solve_pixelwise", y, K, L, U, perm)
    Kp = np.ascontiguousarray(K[..., perm], dtype=y.dtype)
    x = np.empty_like(y)
    _solve_pixelwise_nb(
        y,
        Kp,
        np.ascontiguousarray(L, dtype=y.dtype),
        np.ascontiguousarray(U, dtype=y.dtype),
        np.asarray(perm, dtype=np.int64),
        x,
        order == "wavefront",
    )
    return x
