r"""Kernels of the top-left padded ("causal") convolution: forward and both gradients.

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

The inverse (substitution) is :mod:`flownp.kernels.solve`; it uses the micro-kernel below.

Implementation (``docs/performance.md``)
----------------------------------------
Every compiled kernel is one register-blocked micro-kernel, :func:`_accumulate_taps`, applied
to a list of *taps*: tap ``t`` adds ``x[n, i + off[t, 0], j + off[t, 1], :] @ Kp[t]`` to output
pixel ``(i, j)``. The forward uses the taps ``(-da, -db)`` with ``Kp[t] = K[a, b]``, the input
gradient the taps ``(+da, +db)`` with ``K[a, b]^T``, and the inverse
(:mod:`flownp.kernels.solve`) the non-corner taps with ``-K[a, b]``. Taps whose kernel block
is all zero are dropped (Emerging's masked kernels cost only their nonzero taps).

* A block of ``_P = 8`` samples at the same pixel times ``_VW = 16`` output channels is
  accumulated in a local ``(8, 16)`` array that LLVM keeps in vector registers; every load of
  ``Kp[t, c, o0:o0 + 16]`` serves eight samples. The output channels are padded with zeros to
  a multiple of 16 in ``Kp`` (so C = 12 uses 12 of 16 lanes); padded lanes are never stored.
  Tap validity is the same for all samples of a block, so there are no per-lane bounds
  checks. Samples beyond the batch (N not a multiple of 8) are clamped to the last sample:
  computed, never stored.
* Parallelism is over independent work only, one region per call on the thread pool of
  :mod:`flownp.threads` (fixed chunks of (sample block, output row) tasks for the
  convolutions, of sample blocks for the raster solve, of batch chunks for the kernel
  gradient); the compiled loops are serial over a chunk range. Only the wavefront solve,
  available on request, uses Numba's ``prange`` (one region per anti-diagonal). Every
  chunk writes disjoint outputs. The kernel gradient is summed per fixed chunk of samples
  (the chunking does not depend on the thread count) and the partial sums are added in chunk
  order: results are bitwise reproducible for any number of threads.
"""

from __future__ import annotations

import numpy as np

from flownp import threads
from flownp._numba import jit, jit_inline
from flownp.kernels import _validate as V

#: Output channels per register block (16 float32 = one AVX-512 or two AVX2 registers).
_VW = 16
#: Samples per register block: each loaded kernel row serves this many samples (the
#: micro-kernels write the 8 samples out explicitly).
_P = 8
#: Number of sample chunks of the kernel gradient (fixed, so the sum order never changes).
_GRAD_CHUNKS = 8


def _padded_channels(c: int) -> int:
    return -(-c // _VW) * _VW


# --------------------------------------------------------------------------------------------
# Tap lists: (offsets (T, 2), padded weights (T, C_in, Cp_out)) for the micro-kernel
# --------------------------------------------------------------------------------------------


def _taps(
    K: np.ndarray,
    dtype: np.dtype,
    *,
    direction: int = -1,
    transpose: bool = False,
    skip_corner: bool = False,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero taps of ``K`` as ``(off, Kp)``.

    Tap ``t`` built from ``K[a, b]`` reads the pixel ``(i + off[t, 0], j + off[t, 1])`` with
    ``off = direction * (k-1-a, k-1-b)``; ``Kp[t] = scale * K[a, b]`` (``K[a, b].T`` if
    ``transpose``), output channels zero padded to a multiple of :data:`_VW`.
    """
    k = K.shape[0]
    Ki, Ko = (K.shape[3], K.shape[2]) if transpose else (K.shape[2], K.shape[3])
    offs, blocks = [], []
    for a in range(k):
        for b in range(k):
            if skip_corner and a == k - 1 and b == k - 1:
                continue
            blk = K[a, b].T if transpose else K[a, b]
            if not np.any(blk):  # all-zero tap (masked kernels): no work
                continue
            offs.append((direction * (k - 1 - a), direction * (k - 1 - b)))
            blocks.append(blk)
    Kp = np.zeros((len(blocks), Ki, _padded_channels(Ko)), dtype=dtype)  # (T, C_in, Cp_out)
    for t, blk in enumerate(blocks):
        Kp[t, :, :Ko] = blk if scale == 1.0 else scale * blk
    off = np.array(offs, dtype=np.int64).reshape(len(offs), 2)  # (T, 2)
    return off, Kp


# --------------------------------------------------------------------------------------------
# The micro-kernel and the convolution built on it
# --------------------------------------------------------------------------------------------


def _accumulate_taps(x, Kp, off, n0, i, j, o0, acc):  # pragma: no cover - compiled
    """``acc[p, :] += sum_t sum_c x[n0+p, i+off[t,0], j+off[t,1], c] * Kp[t, c, o0:o0+_VW]``.

    p < _P (= 8, written out so that LLVM keeps ``acc`` in registers); samples past the batch
    read the last sample; taps outside the image are skipped.
    """
    N, H, W, C = x.shape
    n1 = min(n0 + 1, N - 1)
    n2 = min(n0 + 2, N - 1)
    n3 = min(n0 + 3, N - 1)
    n4 = min(n0 + 4, N - 1)
    n5 = min(n0 + 5, N - 1)
    n6 = min(n0 + 6, N - 1)
    n7 = min(n0 + 7, N - 1)
    for t in range(off.shape[0]):
        ii = i + off[t, 0]
        jj = j + off[t, 1]
        if ii < 0 or ii >= H or jj < 0 or jj >= W:
            continue
        for c in range(C):
            x0 = x[n0, ii, jj, c]
            x1 = x[n1, ii, jj, c]
            x2 = x[n2, ii, jj, c]
            x3 = x[n3, ii, jj, c]
            x4 = x[n4, ii, jj, c]
            x5 = x[n5, ii, jj, c]
            x6 = x[n6, ii, jj, c]
            x7 = x[n7, ii, jj, c]
            for o in range(_VW):
                kv = Kp[t, c, o0 + o]
                acc[0, o] += x0 * kv
                acc[1, o] += x1 * kv
                acc[2, o] += x2 * kv
                acc[3, o] += x3 * kv
                acc[4, o] += x4 * kv
                acc[5, o] += x5 * kv
                acc[6, o] += x6 * kv
                acc[7, o] += x7 * kv


_accumulate_taps_nb = jit_inline(_accumulate_taps)


def _store_block(acc, y, n0, i, j, o0):  # pragma: no cover - compiled
    """``y[n0+p, i, j, o0:o0+_VW] = acc[p]`` for the samples and channels that exist."""
    N = y.shape[0]
    m = min(_VW, y.shape[3] - o0)
    for p in range(_P):
        if n0 + p < N:
            for o in range(m):
                y[n0 + p, i, j, o0 + o] = acc[p, o]


_store_block_nb = jit_inline(_store_block)


#: Estimated nanoseconds of one core per multiply-add of the register-blocked kernels (the
#: work estimate of :func:`flownp.threads.chunk_bounds`; ~40 G multiply-adds/s).
_NS_PER_MAC = 0.025


def _conv_taps_kernel(x, Kp, off, y, t0, t1):  # pragma: no cover - compiled
    N, H, W, _ = x.shape
    Co = y.shape[3]
    for task in range(t0, t1):  # (sample block, output row): disjoint writes
        n0 = (task // H) * _P
        i = task % H
        acc = np.empty((_P, _VW), dtype=y.dtype)
        for j in range(W):
            for ob in range((Co + _VW - 1) // _VW):  # (a step-range loop defeats LLVM here)
                o0 = ob * _VW
                acc[:] = 0.0
                _accumulate_taps_nb(x, Kp, off, n0, i, j, o0, acc)
                _store_block_nb(acc, y, n0, i, j, o0)


_conv_taps_nb = jit(_conv_taps_kernel)


def _conv_taps(x: np.ndarray, Kp: np.ndarray, off: np.ndarray, y: np.ndarray) -> None:
    """Run :func:`_conv_taps_kernel` over every (sample block, row) task, on the thread pool."""
    N, H, W, C = x.shape
    macs = W * max(1, off.shape[0]) * C * Kp.shape[2] * _P  # per task
    threads.parallel_range(
        lambda t0, t1: _conv_taps_nb(x, Kp, off, y, t0, t1),
        ((N + _P - 1) // _P) * H,
        macs * _NS_PER_MAC,
    )


def _check_out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype, name: str):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"{name}: out must be a C-contiguous {dtype} array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    return out


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


def conv_forward(x: np.ndarray, K: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Top-left padded convolution ``y = conv(pad(x), K)`` (module docstring).

    Parameters
    ----------
    x : (N, H, W, C) C-contiguous float32/float64 array.
    K : (k, k, C, Co) kernel (cast to ``x.dtype``).
    out : optional (N, H, W, Co) array of ``x.dtype`` to write into.

    Returns
    -------
    y : (N, H, W, Co)
    """
    x = V.float_array("conv_forward", "x", x, 4)
    K = V.kernel_for("conv_forward", K, x)
    out = _check_out(out, x.shape[:3] + (K.shape[3],), x.dtype, "conv_forward")
    off, Kp = _taps(K, x.dtype)
    _conv_taps(x, Kp, off, out)
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


def conv_backward_input(dy: np.ndarray, K: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Gradient of ``conv_forward`` with respect to its input: ``dx = M^T dy``.

    The bottom-right padded convolution of ``dy`` with the transposed taps
    ``K[a, b]^T`` read at ``(p + da, q + db)``; same micro-kernel as the forward.
    dy: (N, H, W, Co), K: (k, k, C, Co) -> dx: (N, H, W, C).
    """
    dy = V.float_array("conv_backward_input", "dy", dy, 4)
    K = V.kernel_for("conv_backward_input", K, dy, c_axis=3, xname="dy")
    out = _check_out(out, dy.shape[:3] + (K.shape[2],), dy.dtype, "conv_backward_input")
    off, Kp = _taps(K, dy.dtype, direction=+1, transpose=True)
    _conv_taps(dy, Kp, off, out)
    return out


# --------------------------------------------------------------------------------------------
# Backward with respect to the kernel
# --------------------------------------------------------------------------------------------


def conv_backward_kernel_reference(x: np.ndarray, dy: np.ndarray, k: int) -> np.ndarray:
    """Readable reference of :func:`conv_backward_kernel`: one BLAS product per tap.

    ``dK[a, b] = sum_{n,i,j} x[n, i-da, j-db, :]^T dy[n, i, j, :]``, shape (k, k, C, Co).
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


def _conv_grad_kernel(x, dyp, off, part, ch0, ch1):  # pragma: no cover - compiled
    """``part[ch, t, c, o] = sum_{n in chunk ch} sum_{i,j} x[n, i+off_t, j+off_t, c] dy[n,i,j,o]``.

    ``dyp`` is ``dy`` with channels zero padded to ``part.shape[3]`` (a multiple of _VW), so
    that the 16-lane loads stay inside the array. Register block: 8 input channels (clamped
    to C - 1 past the end: computed, never stored) x _VW output channels, accumulated over
    every pixel of the chunk; each loaded ``dyp`` row serves 8 channels.
    """
    N, H, W, C = x.shape
    nch, T, _, Cp = part.shape
    per = (N + nch - 1) // nch
    for ch in range(ch0, ch1):
        n_lo = min(N, ch * per)
        n_hi = min(N, n_lo + per)
        acc = np.empty((8, _VW), dtype=part.dtype)
        for t in range(T):
            di = off[t, 0]
            dj = off[t, 1]
            i_lo = max(0, -di)  # output rows/columns whose tap pixel is inside the image
            i_hi = min(H, H - di)
            j_lo = max(0, -dj)
            j_hi = min(W, W - dj)
            for cb in range((C + 7) // 8):
                c0 = cb * 8
                c1 = min(c0 + 1, C - 1)
                c2 = min(c0 + 2, C - 1)
                c3 = min(c0 + 3, C - 1)
                c4 = min(c0 + 4, C - 1)
                c5 = min(c0 + 5, C - 1)
                c6 = min(c0 + 6, C - 1)
                c7 = min(c0 + 7, C - 1)
                for ob in range(Cp // _VW):
                    o0 = ob * _VW
                    acc[:] = 0.0
                    for n in range(n_lo, n_hi):
                        for i in range(i_lo, i_hi):
                            ii = i + di
                            for j in range(j_lo, j_hi):
                                jj = j + dj
                                x0 = x[n, ii, jj, c0]
                                x1 = x[n, ii, jj, c1]
                                x2 = x[n, ii, jj, c2]
                                x3 = x[n, ii, jj, c3]
                                x4 = x[n, ii, jj, c4]
                                x5 = x[n, ii, jj, c5]
                                x6 = x[n, ii, jj, c6]
                                x7 = x[n, ii, jj, c7]
                                for o in range(_VW):
                                    g = dyp[n, i, j, o0 + o]
                                    acc[0, o] += x0 * g
                                    acc[1, o] += x1 * g
                                    acc[2, o] += x2 * g
                                    acc[3, o] += x3 * g
                                    acc[4, o] += x4 * g
                                    acc[5, o] += x5 * g
                                    acc[6, o] += x6 * g
                                    acc[7, o] += x7 * g
                    for q in range(min(8, C - c0)):
                        for o in range(_VW):
                            part[ch, t, c0 + q, o0 + o] = acc[q, o]


_conv_grad_nb = jit(_conv_grad_kernel)


def _sum_chunks(part, dK):  # pragma: no cover - compiled
    """``dK[t, c, o] = sum_ch part[ch, t, c, o]``, added in chunk order (fixed order)."""
    nch, T, C, _ = part.shape
    Co = dK.shape[2]
    for t in range(T):
        for c in range(C):
            for o in range(Co):
                dK[t, c, o] = part[0, t, c, o]
    for ch in range(1, nch):
        for t in range(T):
            for c in range(C):
                for o in range(Co):
                    dK[t, c, o] += part[ch, t, c, o]


_sum_chunks_nb = jit(_sum_chunks)


def conv_backward_kernel(
    x: np.ndarray, dy: np.ndarray, k: int, taps: np.ndarray | None = None
) -> np.ndarray:
    """Gradient of ``sum(y * dy)`` with respect to K, for ``y = conv_forward(x, K)``.

    ``dK[a, b] = sum_{n,i,j} x[n, i-da, j-db, :]^T dy[n, i, j, :]``, shape (k, k, C, Co).

    Parameters
    ----------
    x : (N, H, W, C);  dy : (N, H, W, Co), same dtype.
    k : kernel size.
    taps : optional (k, k) bool mask: only these taps are computed, the others are zero
        (masked kernels, e.g. Emerging's, whose masked taps get a zero gradient anyway).

    Deterministic for any thread count: partial sums over a fixed chunking of the batch,
    added in chunk order.
    """
    x = V.float_array("conv_backward_kernel", "x", x, 4)
    dy = V.float_array("conv_backward_kernel", "dy", dy, 4)
    V.same_pixels("conv_backward_kernel", x, dy, "x", "dy")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"conv_backward_kernel: k must be a positive int, got {k!r}")
    if taps is not None and np.shape(taps) != (k, k):
        raise ValueError(
            f"conv_backward_kernel: taps must have shape ({k}, {k}), got {np.shape(taps)}"
        )
    N, H, W, C = x.shape
    Co = dy.shape[3]
    ab = [
        (a, b)
        for a in range(k)
        for b in range(k)
        if (taps is None or taps[a, b]) and k - 1 - a < H and k - 1 - b < W
    ]
    dK = np.zeros((k, k, C, Co), dtype=x.dtype)
    if not ab or N == 0:
        return dK
    off = np.array([(-(k - 1 - a), -(k - 1 - b)) for a, b in ab], dtype=np.int64)  # (T, 2)
    nch = min(N, _GRAD_CHUNKS)
    Cp = _padded_channels(Co)
    dyp = dy
    if Cp != Co:  # zero padded copy (N, H, W, Cp)
        dyp = np.zeros((N, H, W, Cp), dtype=x.dtype)
        dyp[..., :Co] = dy
    part = np.empty((nch, len(ab), C, Cp), dtype=x.dtype)  # per-chunk partial sums
    macs = (N // nch + 1) * H * W * len(ab) * (-(-C // 8) * 8) * Cp  # per chunk
    threads.parallel_range(
        lambda c0, c1: _conv_grad_nb(x, dyp, off, part, c0, c1), nch, macs * _NS_PER_MAC
    )
    out = np.empty((len(ab), C, Co), dtype=x.dtype)
    _sum_chunks_nb(part, out)
    for t, (a, b) in enumerate(ab):
        dK[a, b] = out[t]
    return dK
