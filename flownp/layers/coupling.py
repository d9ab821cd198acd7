r"""Affine and additive coupling (Glow/RealNVP/NICE) and the paper's quad coupling (Section 3.2,
Eq. 3-6).

Both are one mechanism, an *autoregressive block coupling*: the channels are cut into ``B``
contiguous blocks ``x = [x_1, ..., x_B]`` (``edges`` ``e_0 = 0 < e_1 < ... < e_B = C``), the
first block is copied, and block ``k >= 2`` is shifted and scaled by a conditioner network
reading *all earlier input blocks* (a contiguous channel prefix)::

    y_1 = x_1                                                                   (Eq. 3)
    h_k = NN_k(x_1, ..., x_{k-1}) = NN_k(x[..., :e_{k-1}])       (N, H, W, 2 |block k|)
    shift_k = h_k[..., 0::2],   raw_k = h_k[..., 1::2]           (interleaved channels)
    y_k = (x_k + shift_k) * s(raw_k)                                         (Eq. 4-6)
    logdet = sum_{k>=2} sum_{i,j,c} log s(raw_k)                 (per sample, (N,))

``AffineCoupling`` is ``B = 2`` (halves; one network ``net``), ``QuadCoupling`` is ``B = 4``
(quarters; networks ``nn1``, ``nn2``, ``nn3`` reading 1, 2 and 3 quarters). The networks are
:class:`~flownp.layers.conditioner.ConditionerNet`. Because they read *inputs*, the forward
evaluates them all at once, and since ``x_1..x_{k-1} = y_1..y_{k-1}`` is known block by block
the inverse is sequential and exact::

    x_1 = y_1;   for k = 2..B:  x_k = y_k / s(raw_k) - shift_k,  h_k = NN_k(x[..., :e_{k-1}])

Scale functions (``scale=``), ``u = raw``:

===============  ==================  ======================  ===========================
``scale``        ``s(u)``            ``log s(u)``            ``d log s / du``
===============  ==================  ======================  ===========================
``"softclamp"``  ``exp(c t)``        ``c t``                 ``1 - t^2``
``"exp"``        ``exp(u)``          ``u``                   ``1``
``"sigmoid"``    ``sigmoid(u + 2)``  ``-log(1 + e^-(u+2))``  ``1 - s = sigmoid(-(u+2))``
``None``         ``1``               ``0``                   (no raw channels)
===============  ==================  ======================  ===========================

with ``t = tanh(u / c)`` and ``c = SOFTCLAMP = 2`` for ``"softclamp"``.

``scale=None`` is the *additive* coupling (NICE; Glow's ``flow_coupling 0``): the networks
output the shift only (``|block k|`` channels, ``h_k = shift_k``), ``y_k = x_k + shift_k`` and
the log-determinant is 0. :class:`AdditiveCoupling` is its two-block form.

``"sigmoid"`` is what the reference code (openai/glow, Emerging, official CInC) trains with
(bounded scale in (0, 1), scale 0.88 at initialisation); ``"exp"`` is the paper's Eq. 4-6.
``"softclamp"`` (the model's default) is ``exp`` with its log bounded to ``(-c, c)``: near 0,
``c tanh(u / c) = u - u^3 / (3 c^2) + ...`` (within 8 % of ``u`` for ``|u| <= 1``), so it learns
as fast as ``exp`` (both are the identity at initialisation, ``s = 1``), but no conditioner
output can overflow the scale (``exp(u)`` overflows float32 at ``u > 88``) or amplify a block
by more than ``e^2 ~ 7.4`` either way. Soft clamping of this kind is used by invertible
networks since Ardizzone et al. (2019).
The interleaved shift/scale layout (``0::2`` shift, ``1::2`` scale) is the reference code's.

Jacobian (``dy/dx``, blocks in channel order): block lower triangular, the diagonal blocks
are ``I`` (block 1) and ``diag(s(raw_k))`` (block k), hence the log-determinant above.

Backward (``dy``, ``dlogdet`` given; ``L = sum(y * dy) + sum(logdet * dlogdet)``), per block
``k >= 2``, with ``t_k = x_k + shift_k`` so ``y_k = t_k * s_k``::

    dx_k     += dy_k * s_k
    dshift_k  = dy_k * s_k
    draw_k    = (dy_k * y_k + dlogdet[n]) * (d log s / du)(raw_k)
                (dL/dlog s = dy_k * t_k * s_k + dlogdet = dy_k * y_k + dlogdet)
    dh_k[..., 0::2] = dshift_k,   dh_k[..., 1::2] = draw_k
    dx[..., :e_{k-1}] += NN_k.backward(dh_k)
    dx_1     += dy_1
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit

from flownp.errors import NonFiniteError
from flownp.kernels.coupling import (
    add_to_channels,
    copy_channels,
    coupling_block_backward,
    coupling_block_forward,
)
from flownp.layers.base import Layer
from flownp.layers.conditioner import ConditionerNet, _positive_int

SCALES = ("sigmoid", "exp", "softclamp")
#: The offset of the sigmoid scale, ``s = sigmoid(raw + SIGMOID_SHIFT)`` (reference code).
SIGMOID_SHIFT = 2.0
#: The bound of the soft-clamped scale, ``log s = SOFTCLAMP * tanh(raw / SOFTCLAMP)``.
SOFTCLAMP = 2.0


# ---------------------------------------------------------------------- the scale function
def scale_forward(raw: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """``(s, log s)`` of the raw scale pre-activation (table in the module docstring)."""
    if scale == "sigmoid":
        u = raw + SIGMOID_SHIFT
        return expit(u), -np.logaddexp(0, -u)  # stable for both signs of u
    if scale == "softclamp":
        log_s = SOFTCLAMP * np.tanh(raw / SOFTCLAMP)
        return np.exp(log_s), log_s
    return np.exp(raw), raw


def scale_dlog(raw: np.ndarray, scale: str) -> np.ndarray | float:
    """``d log s / d raw``: ``1 - s = sigmoid(-(raw + 2))``, ``1`` or ``1 - tanh(raw / c)^2``."""
    if scale == "sigmoid":
        return expit(-(raw + SIGMOID_SHIFT))
    if scale == "softclamp":
        return 1.0 - np.tanh(raw / SOFTCLAMP) ** 2
    return 1.0


# ---------------------------------------------------------------------- one transformed block
def block_forward(
    xb: np.ndarray, h: np.ndarray, scale: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``yb = (xb + h[..., 0::2]) * s(h[..., 1::2])``; returns ``(yb, log s)``, both like xb.
    Additive (``scale=None``): ``(xb + h, None)``."""
    if scale is None:
        return xb + h, None
    s, log_s = scale_forward(h[..., 1::2], scale)  # (N, H, W, Cb)
    return (xb + h[..., 0::2]) * s, log_s


def block_inverse(yb: np.ndarray, h: np.ndarray, scale: str | None) -> np.ndarray:
    """``xb = yb / s(h[..., 1::2]) - h[..., 0::2]`` (inverse of :func:`block_forward`)."""
    if scale is None:
        return yb - h
    s, _ = scale_forward(h[..., 1::2], scale)
    return yb / s - h[..., 0::2]


def block_backward(
    dyb: np.ndarray, dlogdet: np.ndarray, yb: np.ndarray, h: np.ndarray, scale: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``sum(yb * dyb) + sum_n dlogdet[n] * sum log s[n]`` w.r.t. ``xb`` and
    ``h``: returns ``(dxb, dh)`` (module docstring). Additive: ``(dyb, dyb)``."""
    if scale is None:
        return dyb, dyb.copy()
    raw = h[..., 1::2]
    s, _ = scale_forward(raw, scale)
    dxb = dyb * s  # (N, H, W, Cb)  = d/dxb and d/dshift
    dh = np.empty_like(h)  # (N, H, W, 2 Cb)
    dh[..., 0::2] = dxb
    dh[..., 1::2] = (dyb * yb + dlogdet[:, None, None, None]) * scale_dlog(raw, scale)
    return dxb, dh


# ---------------------------------------------------------------------- the shared mechanism
class BlockCoupling(Layer):
    """Autoregressive block coupling (module docstring); base of the two couplings.

    Parameters
    ----------
    channels : int
        Input (= output) channels C.
    width : int
        Hidden channels of every conditioner network.
    blocks : int
        Number of equal channel blocks B >= 2; ``C % B == 0`` is required.
    net_names : sequence of str
        Names of the ``B - 1`` conditioner networks (parameter path prefixes).
    scale : {"sigmoid", "exp", "softclamp"} or None
        None: additive (the networks output the shift only).
    seed : int
        Seed of the networks' initial weights.
    dtype : float32 or float64
    """

    def __init__(
        self,
        channels: int,
        width: int,
        *,
        blocks: int,
        net_names: tuple[str, ...],
        scale: str | None = "sigmoid",
        seed: int = 0,
        dtype: Any = np.float64,
    ) -> None:
        super().__init__(dtype)
        cls = type(self).__name__
        C = _positive_int(channels, "channels", cls)
        if C % blocks:
            raise ValueError(
                f"{cls}: channels must be divisible by {blocks} ({blocks} equal channel blocks), "
                f"got channels={C}"
            )
        if scale is not None and scale not in SCALES:
            raise ValueError(f"{cls}: scale must be one of {SCALES}, got {scale!r}")
        if len(net_names) != blocks - 1:
            raise ValueError(f"{cls}: {blocks} blocks need {blocks - 1} net names")
        self.channels = C
        self.width = _positive_int(width, "width", cls)
        self.scale = scale
        b = C // blocks
        self.edges = tuple(range(0, C + 1, b))  # (0, b, 2b, ..., C)
        seeds = np.random.SeedSequence(seed).generate_state(blocks - 1)
        self.nets: list[ConditionerNet] = []
        for k, name in enumerate(net_names, start=1):
            # net k reads blocks 1..k (e_k channels), outputs shift and raw scale of block k+1
            out = b if scale is None else 2 * b  # the shift (and the raw scale, interleaved)
            net = ConditionerNet(
                self.edges[k], out, self.width, seed=int(seeds[k - 1]), dtype=self.dtype
            )
            self.nets.append(self.add_layer(name, net))

    def _blocks(self):
        """``(k, net, lo, hi)`` for every transformed block: net reads ``[..., :lo]``, block
        is ``[..., lo:hi]``."""
        e = self.edges
        return [(k, net, e[k], e[k + 1]) for k, net in enumerate(self.nets, start=1)]

    # ------------------------------------------------------------------ forward
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``y`` (Eq. 3-6) and ``logdet = sum log s`` per sample."""
        x = self.check_input(x, self.channels)
        N = x.shape[0]
        y = np.empty_like(x)  # (N, H, W, C)
        copy_channels(x, y, 0, self.edges[1])  # y_1 = x_1, bit for bit
        logdet = np.zeros(N)  # float64 accumulation
        hs = []
        for _, net, lo, _hi in self._blocks():
            h = net.forward(x[..., :lo])  # (N, H, W, 2 (hi - lo))
            # y[..., lo:hi], log_s = block_forward(x[..., lo:hi], h); logdet += sum log_s
            coupling_block_forward(x, h, lo, self.scale, y, logdet)  # one compiled pass
            hs.append(h)
        self._check_finite(y, "forward", "output")
        self._check_finite(logdet, "forward", "logdet")
        self._cache = (y, hs)
        return y, logdet.astype(self.dtype)

    # ------------------------------------------------------------------ inverse
    def inverse(self, y: np.ndarray) -> np.ndarray:
        """The exact inverse: ``x_1 = y_1``, then ``x_2``, ..., ``x_B`` in turn.

        The conditioners are re-evaluated, so a pending :meth:`backward` of an earlier
        :meth:`forward` is no longer possible (its activations are released: calling it raises
        instead of silently using the wrong ones). On a layer that has never run ``forward``,
        the conditioners' ActNorms initialise on the ``x_1..x_{k-1}`` they see here (the same
        inputs a forward of the result would give them).
        """
        y = self.check_input(y, self.channels, name="y")
        self.clear_cache()
        x = np.empty_like(y)  # (N, H, W, C)
        x[..., : self.edges[1]] = y[..., : self.edges[1]]  # x_1 = y_1
        for k, net, lo, hi in self._blocks():
            h = net.forward(x[..., :lo])  # x[..., :lo] is already reconstructed
            net.clear_cache()
            x[..., lo:hi] = block_inverse(y[..., lo:hi], h, self.scale)
            self._check_finite(x[..., lo:hi], "inverse", f"output block {k + 1}")
        return x

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        y, hs = self.pop_cache()
        N = y.shape[0]
        dy = self.check_grad(dy, y.shape, "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dx = np.zeros_like(dy)  # (N, H, W, C)
        copy_channels(dy, dx, 0, self.edges[1])  # y_1 = x_1
        for (_, net, lo, _hi), h in zip(reversed(self._blocks()), reversed(hs), strict=True):
            # dxb, dh = block_backward(dy[..., lo:hi], dlogdet, y[..., lo:hi], h); dx_b += dxb
            dh = coupling_block_backward(dy, y, h, dlogdet, lo, self.scale, dx)  # one pass
            add_to_channels(dx, net.backward(dh))  # dx[..., :lo] += through the network k
        return dx

    # ------------------------------------------------------------------ helpers
    def _check_finite(self, a: np.ndarray, method: str, what: str) -> None:
        if not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise NonFiniteError(
                f"{type(self).__name__}.{method}: the {what} contains {bad} NaN/Inf value(s) "
                f"(finite input; scale={self.scale!r}: the conditioner outputs or the scale "
                "have overflowed/underflowed)"
            )


class AffineCoupling(BlockCoupling):
    """Glow/RealNVP affine coupling, ``y = [x_a, (x_b + shift) * s]`` (module docstring).

    ``x_a = x[..., :C/2]``, ``x_b = x[..., C/2:]``; ``h = net(x_a)`` has ``C`` channels,
    ``shift = h[..., 0::2]``, ``raw = h[..., 1::2]`` (interleaved, as the reference code).
    C must be even. Parameters ``net/<ConditionerNet path>`` (``net/conv_in/weight`` ...).

    Parameters
    ----------
    channels : int
        C, even.
    width : int
        Hidden channels of the conditioner network.
    scale : {"sigmoid", "exp", "softclamp"}
        ``sigmoid(raw + 2)`` (reference code, default) or ``exp(raw)`` (Glow/paper equations).
    seed : int
    dtype : float32 or float64
    """

    def __init__(
        self,
        channels: int,
        width: int,
        *,
        scale: str = "sigmoid",
        seed: int = 0,
        dtype: Any = np.float64,
    ) -> None:
        super().__init__(
            channels, width, blocks=2, net_names=("net",), scale=scale, seed=seed, dtype=dtype
        )


class QuadCoupling(BlockCoupling):
    """The paper's quad coupling (Section 3.2, Eq. 3-6, Figure 2).

    ``x = [x_1, x_2, x_3, x_4]`` (quarters of the channels, in order)::

        y_1 = x_1                                                         (Eq. 3)
        y_2 = (x_2 + f_1(x_1)) * s_1(x_1)                                 (Eq. 4)
        y_3 = (x_3 + f_2(x_1, x_2)) * s_2(x_1, x_2)                       (Eq. 5)
        y_4 = (x_4 + f_3(x_1, x_2, x_3)) * s_3(x_1, x_2, x_3)             (Eq. 6)

    with ``[f_k, raw_k]`` interleaved in the output of network ``nn{k}`` (``C/2`` channels) and
    ``s_k = scale(raw_k)``. The paper writes ``s = exp(g)`` (``scale="exp"``); the official
    code uses ``sigmoid(g + 2)`` (``scale="sigmoid"``, default). C % 4 == 0 is required.
    Parameters ``nn1/...``, ``nn2/...``, ``nn3/...`` (ConditionerNet paths).

    Parameters
    ----------
    channels : int
        C, divisible by 4.
    width : int
        Hidden channels of the three conditioner networks.
    scale : {"sigmoid", "exp", "softclamp"}
    seed : int
    dtype : float32 or float64
    """

    def __init__(
        self,
        channels: int,
        width: int,
        *,
        scale: str = "sigmoid",
        seed: int = 0,
        dtype: Any = np.float64,
    ) -> None:
        super().__init__(
            channels,
            width,
            blocks=4,
            net_names=("nn1", "nn2", "nn3"),
            scale=scale,
            seed=seed,
            dtype=dtype,
        )


class AdditiveCoupling(BlockCoupling):
    """Additive coupling (NICE, Dinh et al. 2015; Glow's ``flow_coupling 0``),
    ``y = [x_a, x_b + net(x_a)]``, log-det 0 (module docstring, ``scale=None``).

    ``x_a = x[..., :C/2]``, ``x_b = x[..., C/2:]``; ``net`` outputs ``C/2`` channels, the shift.
    C must be even. Parameters ``net/<ConditionerNet path>``.

    Parameters
    ----------
    channels : int
        C, even.
    width : int
        Hidden channels of the conditioner network.
    seed : int
    dtype : float32 or float64
    """

    def __init__(
        self, channels: int, width: int, *, seed: int = 0, dtype: Any = np.float64
    ) -> None:
        super().__init__(
            channels, width, blocks=2, net_names=("net",), scale=None, seed=seed, dtype=dtype
        )
