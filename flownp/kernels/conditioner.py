r"""The whole conditioner network of a coupling layer, forward and backward, one compiled call
per block of samples.

The network (its math and its parameters are documented with the layer,
:mod:`flownp.layers.conditioner`) in the notation of this kernel, per pixel row ``m`` of
``x.reshape(N*H*W, C_in)``::

    a1 = conv_k(x; W_in)                    (M, width)    same-padded k x k, no bias
    r1 = relu((a1 + b1) * s1)               (M, width)    ActNorm + ReLU
    a2 = r1 @ W_mid                         (M, width)    1x1
    r2 = relu((a2 + b2) * s2)               (M, width)
    h  = (conv_k(r2; W_out) + b_out) * s_out (M, C_out)

``s1, s2, s_out`` are the positive scales (``exp`` of the layer's log-scales); the backward
returns the gradients with respect to ``log s``::

    dlog s_out = sum_m dh * h,      db_out = sum_m do,      do = dh * s_out
    (dr2, dW_out) = conv_k backward of do
    dn2 = dr2 * [r2 > 0],  da2 = dn2 * s2,  db2 = sum_m da2,  dlog s2 = sum_m dn2 * r2
    dW_mid = r1^T da2,     dr1 = da2 W_mid^T
    dn1 = dr1 * [r1 > 0],  da1 = dn1 * s1,  db1 = sum_m da1,  dlog s1 = sum_m dn1 * r1
    (dx, dW_in) = conv_k backward of da1

(``sum dn * n = sum dn * r`` because ``n = r`` wherever ``dn != 0``.)

The convolutions are those of :mod:`flownp.kernels.conv_same` (the same two factorisations,
input side ``gather`` + product or output side product + ``shift``, chosen by the narrower
side), and :func:`conditioner_forward_reference` / :func:`conditioner_backward_reference`
compose that module's plain NumPy references: the tests compare the two.

Why one call: the conditioners of the small models (MNIST: 2 to 8 channels in and out,
width 64) are a few dozen microseconds of BLAS each, and the separate kernels (gather,
product, ActNorm + ReLU, ..., each its own parallel region over the whole batch) spent more
time in memory traffic, Python and thread hand-overs than in the products. Here the batch is
cut into a fixed list of blocks of whole samples (a 3x3 convolution never reads across
samples); one region of :mod:`flownp.threads` runs one block per chunk, and inside a block
every step runs on activations that stay in the core's cache, the matrix products calling
single-threaded BLAS from compiled code (no GIL). The blocks depend on the shapes only, and
the parameter gradients are summed per block then over blocks in block order (ActNorm and
bias sums in float64): results are bitwise the same for every thread count, and equal the
whole-batch computation up to float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flownp import threads
from flownp._numba import jit, jit_exact, jit_inline
from flownp.kernels import _validate as V
from flownp.kernels.conv_same import (
    actnorm_relu_backward_reference,
    actnorm_relu_forward_reference,
    conv_same_backward_reference,
    conv_same_forward_reference,
)

#: Estimated nanoseconds of one core per multiply-add (work estimate of the blocks).
_NS_PER_MAC = 0.02


class ConditionerGrads(NamedTuple):
    """Gradients returned by :func:`conditioner_backward` (log-scale entries: with respect to
    ``log s``)."""

    dx: np.ndarray  # (N, H, W, C_in)
    w_in: np.ndarray  # (k, k, C_in, width)
    b1: np.ndarray  # (width,)
    logs1: np.ndarray  # (width,)
    w_mid: np.ndarray  # (1, 1, width, width)
    b2: np.ndarray  # (width,)
    logs2: np.ndarray  # (width,)
    w_out: np.ndarray  # (k, k, width, C_out)
    b_out: np.ndarray  # (C_out,)
    logs_out: np.ndarray  # (C_out,)


#: Index type of the hot loops: an unsigned index needs no negative-index wrap-around check,
#: which would keep LLVM from vectorising them (every such index here is >= 0).
_u = np.uint64

# --------------------------------------------------------------------------------------------
# Compiled helpers on one block of samples, in channel-major ("planar") layout: a block's
# activation is a (C, Mb) matrix, column q = (n*H + i)*W + j for the block's samples n < nb,
# so every shift of the 3x3 taps moves contiguous runs of a row and every per-channel
# operation runs along a row.
# --------------------------------------------------------------------------------------------


def _gather(src, nb, H, W, k, sign, cols):  # pragma: no cover - compiled
    """``cols[t*C + c, q(n, i, j)] = src[c, q(n, i + sign*(a-p), j + sign*(b-p))]`` (0
    outside the image), tap ``t = a*k + b``, ``p = (k-1)//2``.

    Per tap, channel and sample one contiguous copy of the plane shifted by ``off = da*W +
    db``, then the entries whose column left the image (they read a neighbouring row) are
    set to zero."""
    C = src.shape[0]
    p = (k - 1) // 2
    HW = H * W
    for a in range(k):
        da = sign * (a - p)
        i0 = max(0, -da)  # output rows whose input row is inside the image
        i1 = min(H, H - da)
        for b in range(k):
            db = sign * (b - p)
            off = da * W + db
            j0 = max(0, -db)  # output columns whose input column is inside the image
            j1 = min(W, W - db)
            for c in range(C):
                r = (a * k + b) * C + c
                for n in range(nb):
                    base = n * HW
                    if i1 <= i0 or j1 <= j0:  # the tap never lands inside
                        for q in range(base, base + HW):
                            cols[r, q] = 0.0
                        continue
                    q0 = base + i0 * W + j0  # first and one past the last valid pixel
                    q1 = base + (i1 - 1) * W + j1
                    for q in range(base, q0):
                        cols[r, q] = 0.0
                    for q in range(q0, q1):  # reads stay inside sample n
                        cols[r, _u(q)] = src[c, _u(q + off)]  # unsigned: vectorised
                    for q in range(q1, base + HW):
                        cols[r, q] = 0.0
                    for i in range(i0, i1):  # columns that wrapped to a neighbouring row
                        for j in range(j0):
                            cols[r, base + i * W + j] = 0.0
                        for j in range(j1, W):
                            cols[r, base + i * W + j] = 0.0


def _shift(Z, nb, H, W, k, sign, out):  # pragma: no cover - compiled
    """``out[c, q(n, i, j)] = sum_t Z[t*C + c, q(n, i + sign*(a-p), j + sign*(b-p))]`` over
    the taps inside the image, in increasing ``t``. Overwrites ``Z`` (scratch).

    Per tap, channel and sample one contiguous add of the shifted plane; the entries of
    ``Z`` that such an add would bring to a column outside the image (from a neighbouring
    row) are zeroed first: each entry of a tap is read by exactly one output, so only that
    wrong read sees the zero."""
    C = out.shape[0]
    p = (k - 1) // 2
    HW = H * W
    out[:] = 0.0
    for a in range(k):
        da = sign * (a - p)
        i0 = max(0, -da)
        i1 = min(H, H - da)
        for b in range(k):
            db = sign * (b - p)
            off = da * W + db
            j0 = max(0, -db)
            j1 = min(W, W - db)
            for c in range(C):
                r = (a * k + b) * C + c
                for n in range(nb):
                    if i1 <= i0 or j1 <= j0:  # the tap never lands inside
                        continue
                    base = n * HW
                    for i in range(i0, i1):  # reads of columns outside the image
                        for j in range(j0):
                            s = base + i * W + j + off
                            if s >= base:
                                Z[r, s] = 0.0
                        for j in range(j1, W):
                            s = base + i * W + j + off
                            if s < base + HW:
                                Z[r, s] = 0.0
                    for q in range(base + i0 * W + j0, base + (i1 - 1) * W + j1):
                        out[c, _u(q)] += Z[r, _u(q + off)]  # unsigned: vectorised


_gather_nb = jit_exact(_gather)
_shift_nb = jit_exact(_shift)


def _conv_fwd(src, nb, H, W, k, KT, KcT, side, out):  # pragma: no cover - compiled
    """``out = conv_k(src)`` (planar): k = 1 one product ``KT @ src``; input side
    (``side == 0``) gather then ``KT @ cols``; output side ``Z = KcT @ src`` then shift.
    ``KT = K2^T (C_out, T*C_in)``, ``KcT = Kcat^T (T*C_out, C_in)``."""
    Mb = src.shape[1]
    if k == 1:
        np.dot(KT, src, out)
    elif side == 0:
        cols = np.empty((KT.shape[1], Mb), dtype=src.dtype)
        _gather_nb(src, nb, H, W, k, 1, cols)
        np.dot(KT, cols, out)
    else:
        Z = np.empty((KcT.shape[0], Mb), dtype=src.dtype)
        np.dot(KcT, src, Z)
        _shift_nb(Z, nb, H, W, k, 1, out)


def _conv_bwd(src, dy, nb, H, W, k, KT, KcT, side, dsrc, dK):  # pragma: no cover - compiled
    """Backward of :func:`_conv_fwd`: ``dsrc`` and this block's gradient ``dK`` of ``KT``
    (k = 1 and input side) or of ``KcT`` (output side)."""
    Mb = src.shape[1]
    if k == 1:
        np.dot(dy, src.T, dK)
        np.dot(KT.T, dy, dsrc)
    elif side == 0:
        cols = np.empty((KT.shape[1], Mb), dtype=src.dtype)
        _gather_nb(src, nb, H, W, k, 1, cols)
        np.dot(dy, cols.T, dK)
        np.dot(KT.T, dy, cols)  # cols now holds d cols
        _shift_nb(cols, nb, H, W, k, -1, dsrc)
    else:
        dZ = np.empty((KcT.shape[0], Mb), dtype=src.dtype)
        _gather_nb(dy, nb, H, W, k, -1, dZ)
        np.dot(dZ, src.T, dK)
        np.dot(KcT.T, dZ, dsrc)


_conv_fwd_nb = jit_exact(_conv_fwd)
_conv_bwd_nb = jit_exact(_conv_bwd)


def _actnorm_relu(a, bias, scale):  # pragma: no cover - compiled
    """In place, per channel row ``c``: ``a = max((a + bias) * scale, 0)`` (NaN stays NaN)."""
    C, Mb = a.shape
    for c in range(C):
        bc = bias[c]
        sc = scale[c]
        for m in range(Mb):
            v = (a[c, _u(m)] + bc) * sc
            a[c, _u(m)] = 0.0 if v < 0.0 else v  # as np.maximum(v, 0): a NaN stays


def _actnorm_relu_back(d, r, scale, sums):  # pragma: no cover - compiled
    """In place, per channel row ``c``: ``dn = d * [r > 0]``, ``d = dn * scale``;
    ``sums[0, c] = sum d``, ``sums[1, c] = sum dn * r``.

    The row sums accumulate in the arrays' precision (float32 sums start as float32 zeros;
    float64 arrays unify them to float64), which lets LLVM keep many partial sums in vector
    lanes; the blocks' sums are then added in float64. Inlined into its caller (one compiled
    copy: the result does not depend on what else the process compiled or loaded)."""
    C, Mb = d.shape
    for c in range(C):
        sc = scale[c]
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        for m in range(Mb):
            y = r[c, _u(m)]
            g = d[c, _u(m)] * (y > 0.0)  # as NumPy's d * (r > 0): a NaN stays visible
            s1 += g * y
            v = g * sc
            s0 += v
            d[c, _u(m)] = v
        sums[0, c] = s0
        sums[1, c] = s1


_actnorm_relu_nb = jit_exact(_actnorm_relu)
_actnorm_relu_back_nb = jit_inline(_actnorm_relu_back)


def _forward_block(
    x, H, W, n0, n1, k_in, KT_in, KcT_in, side_in, b1, s1, WmT, b2, s2,
    k_out, KT_out, KcT_out, side_out, b_out, s_out, r1, r2, h,
):  # fmt: skip  # pragma: no cover - compiled
    """The network on samples ``[n0, n1)``: writes their rows of ``h (M, C_out)`` and their
    planar ``(width, Mb)`` blocks of ``r1``, ``r2`` (flat buffers, block at ``[lo*width,
    hi*width)``)."""
    HW = H * W
    lo = n0 * HW
    hi = n1 * HW
    nb = n1 - n0
    Mb = hi - lo
    Wd = WmT.shape[0]
    Co = h.shape[1]
    xT = np.ascontiguousarray(x[lo:hi].T)  # (C_in, Mb)
    r1b = r1[lo * Wd : hi * Wd].reshape((Wd, Mb))
    r2b = r2[lo * Wd : hi * Wd].reshape((Wd, Mb))
    _conv_fwd_nb(xT, nb, H, W, k_in, KT_in, KcT_in, side_in, r1b)
    _actnorm_relu_nb(r1b, b1, s1)
    np.dot(WmT, r1b, r2b)
    _actnorm_relu_nb(r2b, b2, s2)
    hT = np.empty((Co, Mb), dtype=h.dtype)
    _conv_fwd_nb(r2b, nb, H, W, k_out, KT_out, KcT_out, side_out, hT)
    for m in range(Mb):
        for c in range(Co):
            h[lo + m, c] = (hT[c, m] + b_out[c]) * s_out[c]


def _backward_block(
    x, r1, r2, h, dh, H, W, n0, n1, k_in, KT_in, KcT_in, side_in, s1, WmT, s2,
    k_out, KT_out, KcT_out, side_out, s_out, dx, dK_in, dWmT, dK_out, sums1, sums2, sums_out,
):  # fmt: skip  # pragma: no cover - compiled
    """Backward on samples ``[n0, n1)``: their rows of ``dx`` and this block's parameter
    gradients (``dK_*``, ``dWmT`` and ``sums*`` are the block's own slices)."""
    HW = H * W
    lo = n0 * HW
    hi = n1 * HW
    nb = n1 - n0
    Mb = hi - lo
    Co = h.shape[1]
    Wd = WmT.shape[0]
    Ci = x.shape[1]
    r1b = r1[lo * Wd : hi * Wd].reshape((Wd, Mb))
    r2b = r2[lo * Wd : hi * Wd].reshape((Wd, Mb))
    doT = np.empty((Co, Mb), dtype=h.dtype)
    g_logs = np.zeros(Co)
    g_b = np.zeros(Co)
    for m in range(Mb):
        for c in range(Co):
            g = dh[lo + m, c]
            g_logs[c] += g * h[lo + m, c]
            v = g * s_out[c]
            doT[c, m] = v
            g_b[c] += v
    for c in range(Co):
        sums_out[0, c] = g_b[c]
        sums_out[1, c] = g_logs[c]
    d2 = np.empty((Wd, Mb), dtype=h.dtype)
    _conv_bwd_nb(r2b, doT, nb, H, W, k_out, KT_out, KcT_out, side_out, d2, dK_out)
    _actnorm_relu_back_nb(d2, r2b, s2, sums2)  # d2 = da2
    d1 = np.empty((Wd, Mb), dtype=h.dtype)
    np.dot(d2, r1b.T, dWmT)
    np.dot(WmT.T, d2, d1)
    _actnorm_relu_back_nb(d1, r1b, s1, sums1)  # d1 = da1
    xT = np.ascontiguousarray(x[lo:hi].T)
    dxT = np.empty((Ci, Mb), dtype=h.dtype)
    _conv_bwd_nb(xT, d1, nb, H, W, k_in, KT_in, KcT_in, side_in, dxT, dK_in)
    for m in range(Mb):
        for c in range(Ci):
            dx[lo + m, c] = dxT[c, m]


_forward_block_nb = jit(_forward_block)
_backward_block_nb = jit(_backward_block)


# --------------------------------------------------------------------------------------------
# Python side: layouts of the kernels, the blocks, validation
# --------------------------------------------------------------------------------------------


class _Conv(NamedTuple):
    k: int
    side: int  # 0: input side (gather + product), 1: output side (product + shift)
    KT: np.ndarray  # K2^T (C_out, T*C_in), K2[t*C_in + c, o] = K[a, b, c, o]
    KcT: np.ndarray  # Kcat^T (T*C_out, C_in), Kcat[c, t*C_out + o] = K[a, b, c, o]


def _conv_layout(K: np.ndarray) -> _Conv:
    """The two (transposed) matrix layouts of a ``(k, k, C_in, C_out)`` kernel and the side
    to use (output side when ``C_in > C_out``, as :mod:`flownp.kernels.conv_same`)."""
    k, _, C, Co = K.shape
    KT = np.ascontiguousarray(K.reshape(k * k * C, Co).T)
    KcT = np.ascontiguousarray(K.transpose(0, 1, 3, 2)).reshape(k * k * Co, C)
    return _Conv(k, int(k > 1 and C > Co), KT, KcT)


def _macs_per_sample(H: int, W: int, Ci: int, Wd: int, Co: int, k_in: int, k_out: int) -> int:
    return H * W * (k_in * k_in * Ci * Wd + Wd * Wd + k_out * k_out * Wd * Co)


class Activations(NamedTuple):
    """What :func:`conditioner_forward` keeps for :func:`conditioner_backward`: the hidden
    activations ``r1``, ``r2`` (flat buffers, block ``b`` holding the ``(width, Mb)`` planar
    matrix of samples ``[bounds[b], bounds[b+1])``) and the block boundaries."""

    r1: np.ndarray
    r2: np.ndarray
    bounds: list[int]


def _check(fn, x, w_in, w_mid, w_out, vectors):
    x = V.float_array(fn, "x", x, 4)
    w_in = V.kernel_for(fn, w_in, x)
    Wd = w_in.shape[3]
    if w_in.shape[0] % 2 == 0:
        raise ValueError(f"{fn}: w_in must have an odd kernel size, got {w_in.shape}")
    w_mid = np.asarray(w_mid)
    if w_mid.shape != (1, 1, Wd, Wd):
        raise ValueError(f"{fn}: w_mid must have shape (1, 1, {Wd}, {Wd}), got {w_mid.shape}")
    w_mid = np.ascontiguousarray(w_mid, dtype=x.dtype)
    w_out = np.asarray(w_out)
    if w_out.ndim != 4 or w_out.shape[0] != w_out.shape[1] or w_out.shape[2] != Wd:
        raise ValueError(f"{fn}: w_out must have shape (k, k, {Wd}, C_out), got {w_out.shape}")
    if w_out.shape[0] % 2 == 0:
        raise ValueError(f"{fn}: w_out must have an odd kernel size, got {w_out.shape}")
    w_out = np.ascontiguousarray(w_out, dtype=x.dtype)
    Co = w_out.shape[3]
    vecs = [
        V.vector(fn, name, v, Co if name.endswith("out") else Wd, x.dtype)
        for name, v in vectors.items()
    ]
    return x, w_in, w_mid, w_out, vecs


def conditioner_forward(
    x: np.ndarray,
    w_in: np.ndarray,
    b1: np.ndarray,
    s1: np.ndarray,
    w_mid: np.ndarray,
    b2: np.ndarray,
    s2: np.ndarray,
    w_out: np.ndarray,
    b_out: np.ndarray,
    s_out: np.ndarray,
) -> tuple[np.ndarray, Activations]:
    """The network (module docstring) on ``x (N, H, W, C_in)``: returns ``(h, acts)``,
    ``h (N, H, W, C_out)`` and the :class:`Activations` that :func:`conditioner_backward`
    needs.

    ``w_in (k, k, C_in, width)``, ``w_mid (1, 1, width, width)``, ``w_out (k, k, width,
    C_out)`` (k odd), the biases and the positive scales ``s`` as vectors; everything is cast
    to the dtype of ``x``.
    """
    vectors = {"b1": b1, "s1": s1, "b2": b2, "s2": s2, "b_out": b_out, "s_out": s_out}
    x, w_in, w_mid, w_out, vecs = _check("conditioner_forward", x, w_in, w_mid, w_out, vectors)
    b1, s1, b2, s2, b_out, s_out = vecs
    N, H, W, Ci = x.shape
    Wd, Co = w_in.shape[3], w_out.shape[3]
    cin, cout = _conv_layout(w_in), _conv_layout(w_out)
    M = N * H * W
    r1 = np.empty(M * Wd, dtype=x.dtype)
    r2 = np.empty(M * Wd, dtype=x.dtype)
    h = np.empty((M, Co), dtype=x.dtype)
    x2 = x.reshape(M, Ci)
    WmT = np.ascontiguousarray(w_mid.reshape(Wd, Wd).T)
    # one block list for the forward and the backward (the activations are stored by block),
    # sized by the work of both
    macs = 3 * _macs_per_sample(H, W, Ci, Wd, Co, cin.k, cout.k)
    b = threads.chunk_bounds(N, macs * _NS_PER_MAC)

    def block(c: int) -> None:
        _forward_block_nb(
            x2, H, W, b[c], b[c + 1], cin.k, cin.KT, cin.KcT, cin.side, b1, s1, WmT, b2, s2,
            cout.k, cout.KT, cout.KcT, cout.side, b_out, s_out, r1, r2, h,
        )  # fmt: skip

    threads.parallel_for(block, len(b) - 1)
    return h.reshape(N, H, W, Co), Activations(r1, r2, b)


def conditioner_backward(
    dh: np.ndarray,
    x: np.ndarray,
    h: np.ndarray,
    acts: Activations,
    w_in: np.ndarray,
    s1: np.ndarray,
    w_mid: np.ndarray,
    s2: np.ndarray,
    w_out: np.ndarray,
    s_out: np.ndarray,
) -> ConditionerGrads:
    """Gradients of ``sum(h * dh)`` (module docstring) given the forward's input ``x``, its
    output ``h`` and its activations ``acts``; the biases are not needed. Returns
    :class:`ConditionerGrads` (parameter gradients in the parameters' shapes and the dtype of
    ``x``)."""
    fn = "conditioner_backward"
    vectors = {"s1": s1, "s2": s2, "s_out": s_out}
    x, w_in, w_mid, w_out, vecs = _check(fn, x, w_in, w_mid, w_out, vectors)
    s1, s2, s_out = vecs
    N, H, W, Ci = x.shape
    Wd, Co = w_in.shape[3], w_out.shape[3]
    for name, a in (("h", h), ("dh", dh)):
        if np.shape(a) != (N, H, W, Co) or np.asarray(a).dtype != x.dtype:
            raise ValueError(
                f"{fn}: {name} must be {x.dtype} of shape {(N, H, W, Co)}, got "
                f"{np.asarray(a).dtype} {np.shape(a)}"
            )
    M = N * H * W
    b = acts.bounds
    if b[0] != 0 or b[-1] != N or acts.r1.shape != (M * Wd,) or acts.r2.shape != (M * Wd,):
        raise ValueError(f"{fn}: acts do not belong to a forward of this shape")
    h = np.ascontiguousarray(h).reshape(M, Co)
    dh = np.ascontiguousarray(dh).reshape(M, Co)
    cin, cout = _conv_layout(w_in), _conv_layout(w_out)
    x2 = x.reshape(M, Ci)
    WmT = np.ascontiguousarray(w_mid.reshape(Wd, Wd).T)
    nb = len(b) - 1
    dx = np.empty((M, Ci), dtype=x.dtype)
    dK_in = np.empty((nb,) + (cin.KcT.shape if cin.side else cin.KT.shape), dtype=x.dtype)
    dWmT = np.empty((nb, Wd, Wd), dtype=x.dtype)
    dK_out = np.empty((nb,) + (cout.KcT.shape if cout.side else cout.KT.shape), dtype=x.dtype)
    sums1 = np.empty((nb, 2, Wd))  # float64: [sum da1, sum dn1 * r1]
    sums2 = np.empty((nb, 2, Wd))
    sums_out = np.empty((nb, 2, Co))  # [sum do, sum dh * h]

    def block(c: int) -> None:
        _backward_block_nb(
            x2, acts.r1, acts.r2, h, dh, H, W, b[c], b[c + 1], cin.k, cin.KT, cin.KcT,
            cin.side, s1, WmT, s2, cout.k, cout.KT, cout.KcT, cout.side, s_out, dx, dK_in[c],
            dWmT[c], dK_out[c], sums1[c], sums2[c], sums_out[c],
        )  # fmt: skip

    threads.parallel_for(block, nb)
    dt = x.dtype
    s1_, s2_, so_ = (_sum_blocks(s).astype(dt) for s in (sums1, sums2, sums_out))
    return ConditionerGrads(
        dx=dx.reshape(N, H, W, Ci),
        w_in=_kernel_grad(_sum_blocks(dK_in), cin, w_in.shape),
        b1=s1_[0],
        logs1=s1_[1],
        w_mid=np.ascontiguousarray(_sum_blocks(dWmT).T).reshape(1, 1, Wd, Wd),
        b2=s2_[0],
        logs2=s2_[1],
        w_out=_kernel_grad(_sum_blocks(dK_out), cout, w_out.shape),
        b_out=so_[0],
        logs_out=so_[1],
    )


def _sum_blocks(parts: np.ndarray) -> np.ndarray:
    """``sum_c parts[c]`` added in block order (a fixed order)."""
    return np.add.reduce(parts, axis=0)  # one call; the order depends on the shapes only


def _kernel_grad(g: np.ndarray, conv: _Conv, shape: tuple[int, ...]) -> np.ndarray:
    """A kernel gradient from its block layout (of ``KT`` or ``KcT``) back to ``(k, k, C_in,
    C_out)``."""
    k, _, C, Co = shape
    if conv.side:  # KcT (T*Co, C) -> (k, k, Co, C) -> (k, k, C, Co)
        return np.ascontiguousarray(g.reshape(k, k, Co, C).transpose(0, 1, 3, 2))
    return np.ascontiguousarray(g.T).reshape(shape)  # KT (Co, T*C) -> (T*C, Co)


# --------------------------------------------------------------------------------------------
# Plain NumPy references (what the tests compare the compiled kernels with)
# --------------------------------------------------------------------------------------------


def conditioner_forward_reference(x, w_in, b1, s1, w_mid, b2, s2, w_out, b_out, s_out):
    """Readable reference of :func:`conditioner_forward`, from the same-padded convolution's
    and the fused ActNorm + ReLU's NumPy references."""
    r1 = actnorm_relu_forward_reference(conv_same_forward_reference(x, w_in), b1, np.log(s1))
    r2 = actnorm_relu_forward_reference(conv_same_forward_reference(r1, w_mid), b2, np.log(s2))
    h = conv_same_forward_reference(r2, w_out, b_out) * s_out
    return h, r1, r2


def conditioner_backward_reference(dh, x, w_in, b1, s1, w_mid, b2, s2, w_out, b_out, s_out):
    """Readable reference of :func:`conditioner_backward` (same return value), from the
    forward's input and every parameter (the activations are recomputed)."""
    axes = (0, 1, 2)
    h, r1, r2 = conditioner_forward_reference(x, w_in, b1, s1, w_mid, b2, s2, w_out, b_out, s_out)
    do = dh * s_out
    dr2, dW_out, db_out = conv_same_backward_reference(r2, w_out, do)
    da2, db2, dlogs2 = actnorm_relu_backward_reference(dr2, r2, np.log(s2))
    dr1, dW_mid, _ = conv_same_backward_reference(r1, w_mid, da2)
    da1, db1, dlogs1 = actnorm_relu_backward_reference(dr1, r1, np.log(s1))
    dx, dW_in, _ = conv_same_backward_reference(x, w_in, da1)
    return ConditionerGrads(
        dx, dW_in, db1, dlogs1, dW_mid, db2, dlogs2, dW_out, db_out, (dh * h).sum(axis=axes)
    )
