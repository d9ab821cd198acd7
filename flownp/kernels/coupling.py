r"""The element-wise part of a coupling layer's transformed block, forward and backward, in one
compiled pass each (the math is the layer's, :mod:`flownp.layers.coupling`; its NumPy
functions ``block_forward`` / ``block_backward`` are the references the tests compare with).

For the block ``x[..., lo:hi]`` of ``Cb = hi - lo`` channels and its conditioner output ``h``
(``2 Cb`` channels, shift and raw scale interleaved)::

    shift = h[..., 0::2],  raw = h[..., 1::2],  s = scale(raw)
    y[..., lo:hi] = (x[..., lo:hi] + shift) * s
    logdet[n]    += sum_{i,j,c} log s                               (float64)

    backward, given dy, dlogdet, y:
    dx[..., lo:hi] += dy_b * s
    dh[..., 0::2]   = dy_b * s
    dh[..., 1::2]   = (dy_b * y_b + dlogdet[n]) * dlog s / draw

``scale`` is ``sigmoid(raw + 2)`` (``log s = -log(1 + e^-(raw+2))``, ``dlog s/draw =
sigmoid(-(raw+2))``), ``exp(raw)`` (``log s = raw``, derivative 1) or the soft-clamped
``exp(c tanh(raw / c))`` (``log s = c t`` with ``t = tanh(raw / c)``, derivative
``1 - t^2``, ``c = 2``); ``None`` is the
additive coupling: ``h`` is the shift alone (``Cb`` channels), ``y_b = x_b + h``, no
log-determinant, ``dx_b += dy_b``, ``dh = dy_b``. One pass instead of
about ten NumPy passes and their temporaries; chunks of samples on :mod:`flownp.threads`
(disjoint writes, per-sample sums: the same bits for any thread count).
"""

from __future__ import annotations

import math

import numpy as np

from flownp import threads
from flownp._numba import jit, jit_exact

#: Estimated nanoseconds of one core per element (work estimate of the chunks).
_NS_PER_ELEMENT = 2.0
#: Offset of the sigmoid scale (the layer's ``SIGMOID_SHIFT``, repeated: kernels import no layer).
_SIGMOID_SHIFT = 2.0
#: Bound ``c`` of the soft-clamped scale (the layer's ``SOFTCLAMP``, repeated likewise).
_SOFTCLAMP = 2.0


def _scale(raw, mode):  # pragma: no cover - compiled
    """``(s, log s, dlog s / draw)`` of one raw scale (NumPy / SciPy's stable forms);
    mode 1 sigmoid, 2 exp, 3 soft-clamped exp."""
    if mode == 2:
        return math.exp(raw), raw, 1.0
    if mode == 3:  # t = tanh(raw / c) from one exp (math.tanh is not vectorised)
        a = math.exp(-2.0 * abs(raw) / _SOFTCLAMP)
        t = math.copysign((1.0 - a) / (1.0 + a), raw)
        log_s = _SOFTCLAMP * t
        return math.exp(log_s), log_s, 1.0 - t * t
    u = raw + _SIGMOID_SHIFT
    e = math.exp(-abs(u))
    log_s = -(max(0.0, -u) + math.log1p(e))  # -logaddexp(0, -u)
    if u >= 0:
        s = 1.0 / (1.0 + e)
        ds = e / (1.0 + e)  # sigmoid(-u)
    else:
        s = e / (1.0 + e)
        ds = 1.0 / (1.0 + e)
    return s, log_s, ds


_scale_nb = jit_exact(_scale)


def _forward_kernel(x, h, lo, mode, y, logdet, n0, n1):  # pragma: no cover - compiled
    """mode: 0 additive, 1 sigmoid, 2 exp, 3 soft-clamped exp."""
    N, H, W, _ = x.shape
    if mode == 0:
        for n in range(n0, n1):
            for i in range(H):
                for j in range(W):
                    for c in range(h.shape[3]):
                        y[n, i, j, lo + c] = x[n, i, j, lo + c] + h[n, i, j, c]
        return
    Cb = h.shape[3] // 2
    for n in range(n0, n1):
        acc = 0.0
        for i in range(H):
            for j in range(W):
                for c in range(Cb):
                    s, log_s, _ = _scale_nb(h[n, i, j, 2 * c + 1], mode)
                    y[n, i, j, lo + c] = (x[n, i, j, lo + c] + h[n, i, j, 2 * c]) * s
                    acc += log_s
        logdet[n] += acc


def _backward_kernel(dy, y, h, dlogdet, lo, mode, dx, dh, n0, n1):  # pragma: no cover
    N, H, W, _ = dy.shape
    if mode == 0:
        for n in range(n0, n1):
            for i in range(H):
                for j in range(W):
                    for c in range(h.shape[3]):
                        g = dy[n, i, j, lo + c]
                        dx[n, i, j, lo + c] += g
                        dh[n, i, j, c] = g
        return
    Cb = h.shape[3] // 2
    for n in range(n0, n1):
        dl = dlogdet[n]
        for i in range(H):
            for j in range(W):
                for c in range(Cb):
                    s, _, ds = _scale_nb(h[n, i, j, 2 * c + 1], mode)
                    g = dy[n, i, j, lo + c]
                    d = g * s
                    dx[n, i, j, lo + c] += d
                    dh[n, i, j, 2 * c] = d
                    dh[n, i, j, 2 * c + 1] = (g * y[n, i, j, lo + c] + dl) * ds


def _channels_kernel(src, s0, dst, d0, n, add):  # pragma: no cover - compiled
    """``dst[:, d0:d0+n] (+)= src[:, s0:s0+n]`` on pixel-row matrices."""
    for m in range(src.shape[0]):
        if add:
            for c in range(n):
                dst[m, d0 + c] += src[m, s0 + c]
        else:
            for c in range(n):
                dst[m, d0 + c] = src[m, s0 + c]


_forward_nb = jit(_forward_kernel)
_backward_nb = jit(_backward_kernel)
_channels_nb = jit(_channels_kernel)


def _rows(a: np.ndarray, fn: str, name: str) -> np.ndarray:
    if not a.flags.c_contiguous or a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{fn}: {name} must be a C-contiguous float array, got {a.dtype}")
    return a.reshape(-1, a.shape[-1])


def copy_channels(src: np.ndarray, dst: np.ndarray, lo: int, hi: int) -> None:
    """``dst[..., lo:hi] = src[..., lo:hi]`` (one compiled pass; NumPy's strided copy of a few
    channels is several times slower)."""
    s, d = _rows(src, "copy_channels", "src"), _rows(dst, "copy_channels", "dst")
    if src.shape != dst.shape or src.dtype != dst.dtype or not 0 <= lo <= hi <= src.shape[-1]:
        raise ValueError(f"copy_channels: {src.shape} -> {dst.shape}, channels [{lo}, {hi})")
    _channels_nb(s, lo, d, lo, hi - lo, False)


def add_to_channels(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[..., :Cs] += src`` for ``src (..., Cs)`` (one compiled pass)."""
    s, d = _rows(src, "add_to_channels", "src"), _rows(dst, "add_to_channels", "dst")
    if src.shape[:-1] != dst.shape[:-1] or src.dtype != dst.dtype or s.shape[1] > d.shape[1]:
        raise ValueError(f"add_to_channels: {src.shape} into {dst.shape}")
    _channels_nb(s, 0, d, 0, s.shape[1], True)


_MODES = {None: 0, "sigmoid": 1, "exp": 2, "softclamp": 3}


def _check(fn: str, a: np.ndarray, h: np.ndarray, lo: int, name: str, scale) -> int:
    """Shapes of a block: ``a (N, H, W, C)`` and ``h (N, H, W, 2 Cb)`` (``Cb`` additive)
    C-contiguous of one dtype, ``lo + Cb <= C``; returns the mode."""
    if scale not in _MODES:
        raise ValueError(
            f"{fn}: scale must be 'sigmoid', 'exp', 'softclamp' or None, got {scale!r}"
        )
    per = 1 if scale is None else 2
    if a.ndim != 4 or h.ndim != 4 or a.shape[:3] != h.shape[:3] or h.shape[3] % per:
        raise ValueError(
            f"{fn}: {name} (N, H, W, C) and h (N, H, W, {per} Cb) must share N, H, W, got "
            f"{a.shape} and {h.shape}"
        )
    Cb = h.shape[3] // per
    if not 0 <= lo or lo + Cb > a.shape[3]:
        raise ValueError(f"{fn}: block [{lo}, {lo + Cb}) is outside the {a.shape[3]} channels")
    if a.dtype != h.dtype or not (a.flags.c_contiguous and h.flags.c_contiguous):
        raise ValueError(f"{fn}: {name} and h must be C-contiguous arrays of one dtype")
    return _MODES[scale]


def coupling_block_forward(
    x: np.ndarray, h: np.ndarray, lo: int, scale: str | None, y: np.ndarray, logdet: np.ndarray
) -> None:
    """Block ``[lo, lo + Cb)`` of a coupling (module docstring): writes
    ``y[..., lo:lo+Cb]`` and adds ``sum log s`` per sample to ``logdet`` (float64, (N,))."""
    mode = _check("coupling_block_forward", x, h, lo, "x", scale)
    if y.shape != x.shape or y.dtype != x.dtype or not y.flags.c_contiguous:
        raise ValueError("coupling_block_forward: y must be a C-contiguous array like x")
    N, H, W, _ = x.shape
    threads.parallel_range(
        lambda n0, n1: _forward_nb(x, h, lo, mode, y, logdet, n0, n1),
        N,
        H * W * h.shape[3] * _NS_PER_ELEMENT,
    )


def coupling_block_backward(
    dy: np.ndarray,
    y: np.ndarray,
    h: np.ndarray,
    dlogdet: np.ndarray,
    lo: int,
    scale: str | None,
    dx: np.ndarray,
) -> np.ndarray:
    """Backward of :func:`coupling_block_forward` (module docstring): adds ``dy_b * s`` into
    ``dx[..., lo:lo+Cb]`` and returns ``dh`` (like ``h``)."""
    mode = _check("coupling_block_backward", dy, h, lo, "dy", scale)
    if y.shape != dy.shape or dx.shape != dy.shape or y.dtype != dy.dtype:
        raise ValueError("coupling_block_backward: y and dx must be like dy")
    N, H, W, _ = dy.shape
    dh = np.empty_like(h)
    dl = np.ascontiguousarray(dlogdet, dtype=dy.dtype)
    threads.parallel_range(
        lambda n0, n1: _backward_nb(dy, y, h, dl, lo, mode, dx, dh, n0, n1),
        N,
        H * W * h.shape[3] * _NS_PER_ELEMENT,
    )
    return dh
