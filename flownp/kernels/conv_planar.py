r"""The top-left padded convolution of :mod:`flownp.kernels.conv` (same definition, same
references) for few channels, in planar layout.

Definition (``docs/conventions.md``)::

    y[n, i, j, o] = sum_{a, b < k} sum_c x[n, i - da, j - db, c] K[a, b, c, o],
    (da, db) = (k-1-a, k-1-b),   zero outside the image

    backward:  dx[n, p, q, c] = sum_{a, b} sum_o dy[n, p + da, q + db, o] K[a, b, c, o]
               dK[a, b, c, o] = sum_{n, i, j} x[n, i - da, j - db, c] dy[n, i, j, o]

Why a second implementation: the register-blocked kernels of :mod:`flownp.kernels.conv`
compute 16 output channels at a time, so with 4 channels three quarters of their work is
padding. Here the batch is cut into blocks of whole samples; inside a block each channel is
one row of a ``(C, Mb)`` matrix (column ``q = (n*H + i)*W + j``), and a tap is a shift of
that row: every multiply-add runs along a contiguous row (vectorised over pixels, whatever
C), with one shifted copy per (tap, channel)::

    xs        = shift_{-da,-db}(x[c])                (zero where the tap leaves the image)
    y[o]     += K[a, b, c, o] * xs                   for every o      (forward)
    dK[a,b,c,o] = <xs, dy[o]>                                          (kernel gradient)
    ds        = shift_{+da,+db}(dy[o]);  dx[c] += K[a, b, c, o] * ds  (input gradient)

Each block writes its own samples' rows and its own kernel-gradient partial sum; the partial
sums are added in block order, and the blocks depend on the shapes only: the same bits for
every thread count, and the whole-batch result up to float rounding. The tests compare with
:func:`flownp.kernels.conv.conv_forward_reference` and the other references there.
"""

from __future__ import annotations

import numpy as np

from flownp import threads
from flownp._numba import jit, jit_exact
from flownp.kernels import _validate as V
from flownp.kernels import conv as K_

#: Widest input or output used by :func:`conv_forward_auto` / :func:`conv_backward_auto`.
#: Measured (2-core Xeon, float32, 3x3, one thread) against the 16-lane kernels of
#: flownp.kernels.conv: 4 channels 1.9x (forward) and 3x (both gradients) faster, 8 even
#: (the MNIST levels); 12 and 24 about 1.2x faster, 48 and 96 1.3x slower. Wider layers keep
#: the 16-lane kernels, which the raster inverse shares (the layers benchmark compares an
#: inverse with its forward at 12, 24 and 48 channels).
MAX_CHANNELS = 8
#: Estimated nanoseconds of one core per multiply-add (work estimate of the blocks).
_NS_PER_MAC = 0.1
#: Index type of the hot loops (unsigned: no wrap-around check, so LLVM vectorises them).
_u = np.uint64


def _shift_copy(src, nb, H, W, di, dj, out):  # pragma: no cover - compiled
    """``out[q(n, i, j)] = src[q(n, i + di, j + dj)]``, zero where that pixel is outside the
    image: one contiguous copy of the shifted plane per sample, then the columns that
    wrapped to a neighbouring row are zeroed."""
    HW = H * W
    off = di * W + dj
    i0 = max(0, -di)  # rows and columns whose source pixel is inside the image
    i1 = min(H, H - di)
    j0 = max(0, -dj)
    j1 = min(W, W - dj)
    for n in range(nb):
        base = n * HW
        if i1 <= i0 or j1 <= j0:  # the tap never lands inside
            for q in range(base, base + HW):
                out[q] = 0.0
            continue
        q0 = base + i0 * W + j0  # first and one past the last valid pixel
        q1 = base + (i1 - 1) * W + j1
        for q in range(base, q0):
            out[q] = 0.0
        for q in range(q0, q1):  # reads stay inside sample n
            out[_u(q)] = src[_u(q + off)]
        for q in range(q1, base + HW):
            out[q] = 0.0
        for i in range(i0, i1):  # columns that wrapped to a neighbouring row
            for j in range(j0):
                out[base + i * W + j] = 0.0
            for j in range(j1, W):
                out[base + i * W + j] = 0.0


_shift_copy_nb = jit_exact(_shift_copy)


def _gather(src, off, nb, H, W, cols):  # pragma: no cover - compiled
    """``cols[t*C + c] = shift_{off[t]}(src[c])``: the block's im2col matrix, planar."""
    C = src.shape[0]
    for t in range(off.shape[0]):
        for c in range(C):
            _shift_copy_nb(src[c], nb, H, W, off[t, 0], off[t, 1], cols[t * C + c])


_gather_nb = jit_exact(_gather)


def _transpose_in(a, lo, hi):  # pragma: no cover - compiled
    """Rows ``[lo, hi)`` of a pixel-row matrix ``(M, C)`` as a planar ``(C, hi - lo)``."""
    return np.ascontiguousarray(a[lo:hi].T)


def _transpose_out(aT, out, lo):  # pragma: no cover - compiled
    """``out[lo + m, c] = aT[c, m]``."""
    C, Mb = aT.shape
    for m in range(Mb):
        for c in range(C):
            out[lo + m, c] = aT[c, m]


_transpose_in_nb = jit_exact(_transpose_in)
_transpose_out_nb = jit_exact(_transpose_out)


def _forward_blocks(x, KT, off, H, W, per, blk0, blk1, y):  # pragma: no cover - compiled
    """``y`` rows of the blocks ``[blk0, blk1)`` (block ``b``: samples ``[b*per, b*per +
    per)``): per block ``y^T = KT @ cols(x)`` (x: (M, C), y: (M, Co))."""
    N = x.shape[0] // (H * W)
    for blk in range(blk0, blk1):
        n0 = blk * per
        n1 = min(N, n0 + per)
        lo = n0 * H * W
        hi = n1 * H * W
        xT = _transpose_in_nb(x, lo, hi)  # (C, Mb)
        cols = np.empty((KT.shape[1], hi - lo), dtype=y.dtype)
        _gather_nb(xT, off, n1 - n0, H, W, cols)
        yT = np.dot(KT, cols)  # (Co, Mb)
        _transpose_out_nb(yT, y, lo)


def _backward_blocks(x, dy, KT, KbT, off, H, W, per, blk0, blk1, dx, dKT):  # pragma: no cover
    """``dx`` rows of the blocks ``[blk0, blk1)`` and each block's gradient ``dKT[blk]`` of
    ``KT`` (Co, T*C): ``dKT = dy^T cols(x)^T``, ``dx^T = KbT @ cols'(dy)`` (mirrored taps)."""
    N = x.shape[0] // (H * W)
    for blk in range(blk0, blk1):
        n0 = blk * per
        n1 = min(N, n0 + per)
        lo = n0 * H * W
        hi = n1 * H * W
        nb = n1 - n0
        xT = _transpose_in_nb(x, lo, hi)  # (C, Mb)
        dyT = _transpose_in_nb(dy, lo, hi)  # (Co, Mb)
        cols = np.empty((KT.shape[1], hi - lo), dtype=dx.dtype)
        _gather_nb(xT, off, nb, H, W, cols)
        np.dot(dyT, cols.T, dKT[blk])
        dcols = np.empty((KbT.shape[1], hi - lo), dtype=dx.dtype)
        _gather_nb(dyT, -off, nb, H, W, dcols)
        dxT = np.dot(KbT, dcols)  # (C, Mb)
        _transpose_out_nb(dxT, dx, lo)


_forward_blocks_nb = jit(_forward_blocks)
_backward_blocks_nb = jit(_backward_blocks)

#: Tap offsets ``(-da, -db)`` (T, 2) per kernel size, in tap order ``t = a*k + b``.
_OFFSETS: dict[int, np.ndarray] = {}


def _layout(K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(off, KT, KbT)``: the tap offsets, ``KT[o, t*C + c] = K[a, b, c, o]`` and
    ``KbT[c, t*Co + o] = K[a, b, c, o]``."""
    k, _, C, Co = K.shape
    off = _OFFSETS.get(k)
    if off is None:
        a, b = np.divmod(np.arange(k * k), k)
        off = _OFFSETS[k] = np.stack([-(k - 1 - a), -(k - 1 - b)], axis=1).astype(np.int64)
    KT = np.ascontiguousarray(K.reshape(k * k * C, Co).T)
    KbT = np.ascontiguousarray(K.transpose(2, 0, 1, 3)).reshape(C, k * k * Co)
    return off, KT, KbT


#: Bytes of one block's planar matrices (its im2col matrices, input and output): they stay
#: in the core's second-level cache.
_BLOCK_BYTES = 256 * 1024


def _per_block(H: int, W: int, K: np.ndarray, itemsize: int) -> int:
    """Samples per block: as many as fit :data:`_BLOCK_BYTES` (at least one); a function of
    the shapes only."""
    k, _, C, Co = K.shape
    return max(1, _BLOCK_BYTES // ((k * k + 1) * (C + Co) * H * W * itemsize))


def _run_blocks(fn, n_blocks: int, ns_per_block: float) -> None:
    """``fn(blk0, blk1)`` over groups of consecutive blocks, the pool's chunks."""
    threads.parallel_range(fn, n_blocks, ns_per_block)


def conv_forward_planar(x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """``y = conv(pad(x), K)`` (module docstring), like :func:`flownp.kernels.conv.conv_forward`.

    x: (N, H, W, C) float32/float64; K: (k, k, C, Co), cast to ``x.dtype``. Returns y
    (N, H, W, Co).
    """
    x = V.float_array("conv_forward_planar", "x", x, 4)
    K = V.kernel_for("conv_forward_planar", K, x)
    N, H, W, C = x.shape
    Co = K.shape[3]
    y = np.empty((N * H * W, Co), dtype=x.dtype)
    x2 = x.reshape(-1, C)
    per = _per_block(H, W, K, x.itemsize)
    off, KT, _ = _layout(K)
    _run_blocks(
        lambda b0, b1: _forward_blocks_nb(x2, KT, off, H, W, per, b0, b1, y),
        -(-N // per),
        K.size * H * W * per * _NS_PER_MAC,
    )
    return y.reshape(N, H, W, Co)


def conv_backward_planar(
    x: np.ndarray, dy: np.ndarray, K: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Both gradients of ``sum(conv_forward_planar(x, K) * dy)`` in one pass: ``(dx, dK)``
    (as :func:`flownp.kernels.conv.conv_backward_input` and ``conv_backward_kernel``)."""
    fn = "conv_backward_planar"
    x = V.float_array(fn, "x", x, 4)
    dy = V.float_array(fn, "dy", dy, 4)
    V.same_pixels(fn, x, dy, "x", "dy")
    K = V.kernel_for(fn, K, x)
    if K.shape[3] != dy.shape[3]:
        raise ValueError(f"{fn}: dy has {dy.shape[3]} channels, K {K.shape} outputs {K.shape[3]}")
    N, H, W, C = x.shape
    dx = np.empty((N * H * W, C), dtype=x.dtype)
    per = _per_block(H, W, K, x.itemsize)
    nblk = -(-N // per)
    off, KT, KbT = _layout(K)
    parts = np.empty((nblk,) + KT.shape, dtype=x.dtype)
    x2, dy2 = x.reshape(-1, C), dy.reshape(-1, K.shape[3])
    _run_blocks(
        lambda b0, b1: _backward_blocks_nb(x2, dy2, KT, KbT, off, H, W, per, b0, b1, dx, parts),
        nblk,
        2 * K.size * H * W * per * _NS_PER_MAC,
    )
    dKT = np.add.reduce(parts, axis=0)  # over the blocks; the order depends on the shapes only
    k, Co = K.shape[0], K.shape[3]
    return dx.reshape(N, H, W, C), np.ascontiguousarray(dKT.T).reshape(k, k, C, Co)


def conv_forward_auto(x: np.ndarray, K: np.ndarray) -> np.ndarray:
    """:func:`conv_forward_planar` for at most :data:`MAX_CHANNELS` input and output channels,
    else :func:`flownp.kernels.conv.conv_forward` (the same convolution)."""
    if max(np.shape(K)[2:]) <= MAX_CHANNELS:
        return conv_forward_planar(x, K)
    return K_.conv_forward(x, K)


def conv_backward_auto(
    x: np.ndarray, dy: np.ndarray, K: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(dx, dK)`` of :func:`conv_forward_auto`: :func:`conv_backward_planar`, or the
    16-lane ``conv_backward_input`` and ``conv_backward_kernel`` for wider layers."""
    if max(np.shape(K)[2:]) <= MAX_CHANNELS:
        return conv_backward_planar(x, dy, K)
    return K_.conv_backward_input(dy, K), K_.conv_backward_kernel(x, dy, np.shape(K)[0])
