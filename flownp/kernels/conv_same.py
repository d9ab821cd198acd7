r"""Ordinary "same"-padded convolution, for the (non-invertible) conditioner networks and the
split prior: BLAS matrix products plus cheap Numba data movement, which is what wide
(512-channel) layers need.

Symmetric zero padding of p = (k-1)//2 on every side (k odd)::

    y[n,i,j,o] = sum_{a,b<k} sum_c x[n, i-p+a, j-p+b, c] K[a,b,c,o]  (+ bias[o])

Two exact factorisations of the same sum, chosen per call by which side is narrower
(``T = k*k`` taps, ``M = N*H*W`` pixels, ``shift(Z)`` defined below)::

    input side  (C_in <= C_out):  cols = gather(x)              (M, T*C_in)   "im2col"
                                  y    = cols @ K.reshape(T*C_in, C_out)
    output side (C_in >  C_out):  Z    = x @ Kcat               (M, T*C_out), Kcat[c, (t, o)]
                                  y    = shift(Z)                             = K[a, b, c, o]

with ``gather(x)[n,i,j,t,c] = x[n, i+a-p, j+b-p, c]`` and
``shift(Z)[n,i,j,o] = sum_t Z[n, i+a-p, j+b-p, t, o]`` (tap ``t = a*k + b``; zero outside the
image). The scratch array is ``T`` times the *narrower* side: the 3x3 output convolution of a
512-wide conditioner (512 -> 2 C) never builds the 9 x 512-column im2col matrix. Backward
(the adjoints of gather and shift are each other with mirrored offsets)::

    input side:   dK = cols^T dy,      dx = shift'(dy K^T)         (shift' = adjoint of gather)
    output side:  dZ = gather'(dy),    dK = x^T dZ,  dx = dZ Kcat^T (gather' = adjoint of shift)
    db = sum_{n,i,j} dy

``k = 1`` is a single matrix product. All arrays stay in the input dtype (float32 in training).

Fused element-wise kernels of the conditioner (:func:`actnorm_relu_forward`,
:func:`actnorm_relu_backward`): ActNorm followed by ReLU in one parallel pass, instead of
five NumPy passes and three temporaries over a (N, H, W, 512) activation.
Multi-core: every kernel here runs as one region of fixed chunks on :mod:`flownp.threads`;
the matrix products through :func:`matmul` (fixed blocks of output rows or columns, one
single-threaded BLAS call each). Every chunk writes disjoint outputs and the tap sums run in
a fixed order, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np

from flownp import threads
from flownp._numba import jit
from flownp.kernels import _validate as V

#: Estimated nanoseconds of one core per multiply-add of a float32 BLAS product and per
#: element moved by the data-movement kernels (work estimates of
#: :func:`flownp.threads.chunk_bounds`).
_NS_PER_MAC = 0.02
_NS_PER_ELEMENT = 0.5


def _check_conv(fn: str, x, K) -> tuple[np.ndarray, np.ndarray]:
    """x: C-contiguous float (N, H, W, C); K: (k, k, C, C_out), k odd, cast to x.dtype."""
    x = V.float_array(fn, "x", x, 4)
    K = V.kernel_for(fn, K, x)
    if K.shape[0] % 2 == 0:
        raise ValueError(f"{fn}: kernel size k must be odd (symmetric padding), got {K.shape}")
    return x, K


# --------------------------------------------------------------------------------------------
# Data movement: gather (im2col) and shift-sum, each with a mirror flag (its adjoint's offsets)
# --------------------------------------------------------------------------------------------


def _gather_kernel(x, k, sign, cols, t0, t1):  # pragma: no cover - compiled
    """``cols[n,i,j,t,c] = x[n, i + sign*(a-p), j + sign*(b-p), c]`` (0 outside), t = a*k+b,
    for the rows ``task = n*H + i`` in ``[t0, t1)``."""
    N, H, W, C = x.shape
    p = (k - 1) // 2
    for task in range(t0, t1):
        n = task // H
        i = task % H
        for j in range(W):
            for a in range(k):
                ii = i + sign * (a - p)
                for b in range(k):
                    jj = j + sign * (b - p)
                    t = a * k + b
                    if 0 <= ii < H and 0 <= jj < W:
                        for c in range(C):
                            cols[n, i, j, t, c] = x[n, ii, jj, c]
                    else:
                        for c in range(C):
                            cols[n, i, j, t, c] = 0.0


def _shift_sum_kernel(Z, k, sign, bias, out, t0, t1):  # pragma: no cover - compiled
    """``out[n,i,j,c] = bias[c] + sum_t Z[n, i + sign*(a-p), j + sign*(b-p), t, c]`` for the
    rows ``task = n*H + i`` in ``[t0, t1)``.

    Taps outside the image are skipped; the sum runs over t in increasing order.
    """
    N, H, W, _, C = Z.shape
    p = (k - 1) // 2
    for task in range(t0, t1):
        n = task // H
        i = task % H
        for j in range(W):
            for c in range(C):
                out[n, i, j, c] = bias[c]
            for a in range(k):
                ii = i + sign * (a - p)
                if ii < 0 or ii >= H:
                    continue
                for b in range(k):
                    jj = j + sign * (b - p)
                    if jj < 0 or jj >= W:
                        continue
                    t = a * k + b
                    for c in range(C):
                        out[n, i, j, c] += Z[n, ii, jj, t, c]


_gather_nb = jit(_gather_kernel)
_shift_sum_nb = jit(_shift_sum_kernel)


def _gather(x: np.ndarray, k: int, sign: int) -> np.ndarray:
    N, H, W, C = x.shape
    cols = np.empty((N, H, W, k * k, C), dtype=x.dtype)  # (N, H, W, T, C)
    x = np.ascontiguousarray(x)
    threads.parallel_range(
        lambda t0, t1: _gather_nb(x, k, sign, cols, t0, t1), N * H, W * k * k * C * _NS_PER_ELEMENT
    )
    return cols


def _shift_sum(Z: np.ndarray, k: int, sign: int, bias: np.ndarray | None) -> np.ndarray:
    N, H, W, _, C = Z.shape
    out = np.empty((N, H, W, C), dtype=Z.dtype)  # (N, H, W, C)
    b = np.zeros(C, dtype=Z.dtype) if bias is None else np.asarray(bias, dtype=Z.dtype)
    threads.parallel_range(
        lambda t0, t1: _shift_sum_nb(Z, k, sign, b, out, t0, t1),
        N * H,
        W * k * k * C * _NS_PER_ELEMENT,
    )
    return out


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """``(N, H, W, C) -> (N*H*W, k*k*C)`` patches in (a, b, c) order, zero padded."""
    N, H, W, C = x.shape
    if k == 1:
        return np.ascontiguousarray(x).reshape(N * H * W, C)
    return _gather(x, k, +1).reshape(N * H * W, k * k * C)


def col2im(dcols: np.ndarray, shape: tuple[int, int, int, int], k: int) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add patches back to an ``(N, H, W, C)`` image
    (computed as a gather with mirrored offsets, so every output is written once)."""
    N, H, W, C = shape
    if k == 1:
        return dcols.reshape(N, H, W, C)
    d = np.ascontiguousarray(dcols).reshape(N, H, W, k * k, C)
    return _shift_sum(d, k, -1, None)


def _output_side(K: np.ndarray) -> bool:
    """True when the output side (``T * C_out`` scratch columns) is the narrower one."""
    return K.shape[2] > K.shape[3]


def _kcat(K: np.ndarray) -> np.ndarray:
    """``Kcat[c, t*Co + o] = K[a, b, c, o]``: (C_in, T*C_out)."""
    k, _, C, Co = K.shape
    return np.ascontiguousarray(K.transpose(2, 0, 1, 3)).reshape(C, k * k * Co)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D float arrays, on the thread pool: the output is split into fixed
    blocks of rows (or of columns, when it has more columns than rows), each one
    single-threaded BLAS product over the full inner dimension. Bitwise the same for every
    thread count (the blocks do not depend on it, and no sum is split)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: need (M, K) @ (K, N) matrices, got {a.shape} @ {b.shape}")
    M, K = a.shape
    Nc = b.shape[1]
    out = np.empty((M, Nc), dtype=np.result_type(a, b))
    if M >= Nc:
        threads.parallel_range(
            lambda r0, r1: np.matmul(a[r0:r1], b, out=out[r0:r1]), M, K * Nc * _NS_PER_MAC
        )
    else:
        threads.parallel_range(
            lambda c0, c1: np.matmul(a, b[:, c0:c1], out=out[:, c0:c1]), Nc, K * M * _NS_PER_MAC
        )
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def conv_same_forward(x: np.ndarray, K: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Same-padded convolution. x: (N,H,W,C), K: (k,k,C,Co), bias: (Co,) or None.

    Returns ``y`` (N, H, W, Co) in the dtype of ``x`` (``K``/``bias`` are cast to it).
    """
    x, K = _check_conv("conv_same_forward", x, K)
    k = K.shape[0]
    N, H, W, C = x.shape
    Co = K.shape[3]
    if bias is not None:
        bias = V.vector("conv_same_forward", "bias", bias, Co, x.dtype)
    if k == 1:
        y = matmul(np.ascontiguousarray(x).reshape(-1, C), K[0, 0])  # (M, Co)
        if bias is not None:
            y += np.asarray(bias, dtype=x.dtype)
        return y.reshape(N, H, W, Co)
    if _output_side(K):
        Z = matmul(np.ascontiguousarray(x).reshape(-1, C), _kcat(K))  # (M, T*Co)
        return _shift_sum(Z.reshape(N, H, W, k * k, Co), k, +1, bias)
    y = matmul(im2col(x, k), K.reshape(k * k * C, Co))  # (M, Co)
    if bias is not None:
        y += np.asarray(bias, dtype=x.dtype)
    return y.reshape(N, H, W, Co)


def conv_same_backward(
    x: np.ndarray, K: np.ndarray, dy: np.ndarray, bias: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of ``sum(conv_same_forward(x, K, b) * dy)``: returns ``(dx, dK, db)``.

    ``dx`` (N, H, W, C), ``dK`` (k, k, C, Co), ``db`` (Co,), all in the dtype of ``x``;
    ``bias=False`` (a convolution without bias) skips the sum and returns ``db = None``.
    """
    x, K = _check_conv("conv_same_backward", x, K)
    k = K.shape[0]
    N, H, W, C = x.shape
    Co = K.shape[3]
    dy = V.float_array("conv_same_backward", "dy", dy, 4)
    if dy.shape != (N, H, W, Co) or dy.dtype != x.dtype:
        raise ValueError(
            f"conv_same_backward: dy must be {x.dtype} of shape {(N, H, W, Co)} "
            f"(x {x.shape}, K {K.shape}), got {dy.dtype} {dy.shape}"
        )
    dy2 = dy.reshape(-1, Co)  # (M, Co)
    db = dy2.sum(axis=0) if bias else None
    if k == 1:
        x2 = np.ascontiguousarray(x).reshape(-1, C)  # (M, C)
        dK = matmul(x2.T, dy2).reshape(K.shape)
        return matmul(dy2, K[0, 0].T).reshape(N, H, W, C), dK, db
    if _output_side(K):
        x2 = np.ascontiguousarray(x).reshape(-1, C)  # (M, C)
        dZ = _gather(dy, k, -1).reshape(-1, k * k * Co)  # (M, T*Co), adjoint of shift
        dKcat = matmul(x2.T, dZ)  # (C, T*Co)
        dK = np.ascontiguousarray(dKcat.reshape(C, k, k, Co).transpose(1, 2, 0, 3))
        dx = matmul(dZ, _kcat(K).T).reshape(N, H, W, C)
        return dx, dK, db
    cols = im2col(x, k)  # (M, T*C)
    dK = matmul(cols.T, dy2).reshape(K.shape)
    dx = col2im(matmul(dy2, K.reshape(k * k * C, Co).T), x.shape, k)
    return dx, dK, db


def conv_same_forward_reference(
    x: np.ndarray, K: np.ndarray, bias: np.ndarray | None = None
) -> np.ndarray:
    """Readable NumPy reference of :func:`conv_same_forward`: pad, then one matrix product
    per tap, ``y[n,i,j] += xpad[n, i+a, j+b] @ K[a, b]``."""
    k = K.shape[0]
    p = (k - 1) // 2
    N, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))  # (N, H+2p, W+2p, C)
    y = np.zeros((N, H, W, K.shape[3]), dtype=np.result_type(x, K))
    for a in range(k):
        for b in range(k):
            y += xp[:, a : a + H, b : b + W, :] @ K[a, b]
    return y if bias is None else y + bias


def conv_same_backward_reference(
    x: np.ndarray, K: np.ndarray, dy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readable NumPy reference of :func:`conv_same_backward`: ``(dx, dK, db)`` tap by tap,
    ``dK[a, b] = sum xpad[n, i+a, j+b]^T dy[n, i, j]``, ``dxpad[n, i+a, j+b] += dy K[a, b]^T``."""
    k = K.shape[0]
    p = (k - 1) // 2
    N, H, W, C = x.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dxp = np.zeros_like(xp, dtype=np.result_type(x, dy))
    dK = np.zeros(K.shape, dtype=np.result_type(x, dy))
    for a in range(k):
        for b in range(k):
            win = xp[:, a : a + H, b : b + W, :].reshape(-1, C)
            dK[a, b] = win.T @ dy.reshape(-1, K.shape[3])
            dxp[:, a : a + H, b : b + W, :] += dy @ K[a, b].T
    return dxp[:, p : p + H, p : p + W, :], dK, dy.sum(axis=(0, 1, 2))


def actnorm_relu_forward_reference(
    a: np.ndarray, bias: np.ndarray, logs: np.ndarray, relu: bool = True
) -> np.ndarray:
    """NumPy reference of :func:`actnorm_relu_forward` (its first output)."""
    n = (a + bias) * np.exp(logs)
    return np.maximum(n, 0) if relu else n


def actnorm_relu_backward_reference(
    dr: np.ndarray, r: np.ndarray, logs: np.ndarray, relu: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy reference of :func:`actnorm_relu_backward`: ``(da, dbias, dlogs)``."""
    dn = dr * (r > 0) if relu else dr
    da = dn * np.exp(logs)
    axes = tuple(range(r.ndim - 1))
    return da, da.sum(axis=axes), (dn * r).sum(axis=axes)


# --------------------------------------------------------------------------------------------
# Fused ActNorm (+ ReLU) of the conditioner networks
# --------------------------------------------------------------------------------------------

#: Rows per chunk of the per-channel sums (fixed, so the summation order never changes).
_ROWS_PER_CHUNK = 1024


def _actnorm_relu_kernel(a, bias, scale, relu, out, bad, r0, r1):  # pragma: no cover
    """``out = max((a + bias) * scale, 0)`` (or without the max); ``bad[r] = 1`` when row r of
    ``a`` holds a NaN/Inf; rows ``[r0, r1)``. a, out: (R, C)."""
    C = a.shape[1]
    for r in range(r0, r1):
        nonfinite = False
        for c in range(C):
            v = a[r, c]
            if not np.isfinite(v):
                nonfinite = True
            y = (v + bias[c]) * scale[c]
            if relu and y < 0:
                y = 0.0
            out[r, c] = y
        bad[r] = 1 if nonfinite else 0


def _actnorm_relu_backward_kernel(dr, r, scale, relu, da, part, c0, c1):  # pragma: no cover
    """``dn = dr * [r > 0]`` (or ``dr``), ``da = dn * scale``; per chunk of rows
    ``part[ch, 0, c] = sum da``, ``part[ch, 1, c] = sum dn * r`` (float64), chunks
    ``[c0, c1)``."""
    R, C = dr.shape
    for ch in range(c0, c1):
        for c in range(C):
            part[ch, 0, c] = 0.0
            part[ch, 1, c] = 0.0
        for row in range(ch * _ROWS_PER_CHUNK, min(R, (ch + 1) * _ROWS_PER_CHUNK)):
            for c in range(C):
                g = dr[row, c]
                y = r[row, c]
                if relu and not y > 0:
                    g = g * 0.0  # as NumPy's dr * (r > 0): a NaN/Inf in dr stays visible
                d = g * scale[c]
                da[row, c] = d
                part[ch, 0, c] += d
                part[ch, 1, c] += g * y


_actnorm_relu_nb = jit(_actnorm_relu_kernel)
_actnorm_relu_backward_nb = jit(_actnorm_relu_backward_kernel)


def _out_like(out: np.ndarray | None, a2: np.ndarray, name: str) -> np.ndarray:
    """``out`` viewed as ``a2``'s (R, C) shape, or a new array; every element is read before
    it is written, so ``out`` may alias an input."""
    if out is None:
        return np.empty_like(a2)
    if out.size != a2.size or out.dtype != a2.dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"{name}: out must be a C-contiguous {a2.dtype} array of {a2.size} elements, "
            f"got {out.dtype} {out.shape}"
        )
    return out.reshape(a2.shape)


def actnorm_relu_forward(
    a: np.ndarray,
    bias: np.ndarray,
    logs: np.ndarray,
    relu: bool = True,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """``r = relu((a + bias) * exp(logs))`` per channel, in one pass (ActNorm then ReLU).

    a: (..., C); bias, logs: (C,). ``out``: optional C-contiguous array like ``a`` to write
    ``r`` into; it may be ``a`` itself (in place: no new allocation, whose first-touch page
    faults cost as much as the pass). Returns ``(r, finite)`` with ``finite`` False when
    ``a`` holds a NaN or Inf (the values are computed regardless).
    """
    a = np.asarray(a)
    if a.ndim < 1 or a.dtype not in V.FLOATS:
        raise ValueError(
            f"actnorm_relu_forward: a must be a float32/float64 array, got {a.dtype} {a.shape}"
        )
    C = a.shape[-1]
    a2 = np.ascontiguousarray(a).reshape(-1, C)  # (R, C)
    bias = V.vector("actnorm_relu_forward", "bias", bias, C, a2.dtype)
    logs = V.vector("actnorm_relu_forward", "logs", logs, C, a2.dtype)
    out = _out_like(out, a2, "actnorm_relu_forward")
    bad = np.empty(a2.shape[0], dtype=np.uint8)
    scale = np.exp(np.asarray(logs, dtype=a2.dtype))
    bias = np.asarray(bias, dtype=a2.dtype)
    threads.parallel_range(
        lambda r0, r1: _actnorm_relu_nb(a2, bias, scale, bool(relu), out, bad, r0, r1),
        a2.shape[0],
        C * _NS_PER_ELEMENT,
    )
    return out.reshape(a.shape), not bad.any()


def actnorm_relu_backward(
    dr: np.ndarray,
    r: np.ndarray,
    logs: np.ndarray,
    relu: bool = True,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`actnorm_relu_forward` given its output ``r``::

        dn = dr * [r > 0]   (relu; dn = dr without it)
        da = dn * exp(logs),   dbias = sum da,   dlogs = sum dn * r   (sums over all but C)

    (``sum dn * n = sum dn * r`` because ``n = r`` wherever ``dn != 0``.) Returns
    ``(da, dbias, dlogs)``; the sums are accumulated in float64 over fixed chunks of rows
    (deterministic), then cast to the dtype of ``dr``. ActNorm's log-determinant term
    ``H W sum(dlogdet)`` is not included (the conditioners do not use it). ``out``: optional
    array like ``r`` for ``da``; it may be ``dr`` itself (in place).
    """
    r = np.asarray(r)
    if r.ndim < 1 or r.dtype not in V.FLOATS:
        raise ValueError(
            f"actnorm_relu_backward: r must be a float32/float64 array, got {r.dtype} {r.shape}"
        )
    if np.shape(dr) != r.shape:
        raise ValueError(
            f"actnorm_relu_backward: dr {np.shape(dr)} and r {r.shape} must have the same shape"
        )
    C = r.shape[-1]
    logs = V.vector("actnorm_relu_backward", "logs", logs, C, r.dtype)
    dr2 = np.ascontiguousarray(dr, dtype=r.dtype).reshape(-1, C)  # (R, C)
    r2 = np.ascontiguousarray(r).reshape(-1, C)
    da = _out_like(out, r2, "actnorm_relu_backward")
    nch = max(1, -(-r2.shape[0] // _ROWS_PER_CHUNK))
    part = np.empty((nch, 2, C))  # float64 partial sums
    scale = np.exp(np.asarray(logs, dtype=r2.dtype))
    threads.parallel_range(
        lambda c0, c1: _actnorm_relu_backward_nb(dr2, r2, scale, bool(relu), da, part, c0, c1),
        nch,
        _ROWS_PER_CHUNK * C * _NS_PER_ELEMENT,
    )
    sums = part.sum(axis=0)  # (2, C), fixed order over chunks
    return da.reshape(r.shape), sums[0].astype(r2.dtype), sums[1].astype(r2.dtype)
