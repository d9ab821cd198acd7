r"""The conditioner network of the coupling layers (Glow's ``f``; paper Section 3.2, Figure 2).

Not a flow layer: it is not invertible and has no log-determinant. The couplings call it on
the blocks they condition on, ``h = NN(x)``, and differentiate through it. Architecture
(openai/glow ``model.f``, also the official CInC code; ``conv`` is the "same"-padded
convolution of :mod:`flownp.kernels.conv_same`)::

    a1 = conv3x3(x; conv_in/weight)                    (N, H, W, width)   no bias
    n1 = ActNorm_in(a1),        r1 = relu(n1)          (N, H, W, width)
    a2 = conv1x1(r1; conv_mid/weight)                  (N, H, W, width)   no bias
    n2 = ActNorm_mid(a2),       r2 = relu(n2)          (N, H, W, width)
    o  = conv3x3(r2; conv_out/weight) + conv_out/bias  (N, H, W, C_out)
    h  = o * exp(3 * conv_out/logs)                    (N, H, W, C_out)   Glow's conv2d_zeros

``conv_out`` is zero-initialised, so ``h == 0`` at initialisation and a coupling starts as
``y_b = x_b * scale(0)``. The two ActNorms use data-dependent initialisation on the first
batch the network sees (:class:`~flownp.layers.actnorm.ActNorm`); their log-determinants are
ignored (the network is not a flow), so their backward gets ``dlogdet = 0``.

Backward (``dh`` given; ``*`` elementwise; ``[.]`` the indicator)::

    do           = dh * exp(3 logs)
    d logs       = 3 * sum_{n,i,j} dh * h
    d bias       = sum_{n,i,j} do
    (dr2, dW_out) = conv3x3 backward of do            (im2col: dW = cols(r2)^T do)
    dn2          = dr2 * [r2 > 0]
    da2          = ActNorm_mid backward of dn2        (adds d norm_mid/bias, d norm_mid/logs)
    (dr1, dW_mid) = conv1x1 backward of da2
    dn1          = dr1 * [r1 > 0]
    da1          = ActNorm_in backward of dn1
    (dx, dW_in)   = conv3x3 backward of da1

Differences from openai/glow, documented for porters: Glow's ``conv2d`` with ``edge_bias``
appends an extra input channel that is 1 on the zero-padded border (for both 3x3 convs);
this network does not (plain zero padding, as the paper describes the network).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.kernels.conv_same import (
    actnorm_relu_backward,
    actnorm_relu_forward,
    conv_same_backward,
    conv_same_forward,
)
from flownp.layers.actnorm import ActNorm
from flownp.layers.base import Network

#: Standard deviation of the initial weights of ``conv_in`` and ``conv_mid`` (Glow's default).
INIT_STD = 0.05
#: ``h = o * exp(LOGSCALE_FACTOR * logs)`` (Glow's ``logscale_factor``).
LOGSCALE_FACTOR = 3.0


def _positive_int(value: Any, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


class ConditionerNet(Network):
    """3x3 conv -> actnorm -> ReLU -> 1x1 conv -> actnorm -> ReLU -> zero-init 3x3 conv.

    Contract :class:`~flownp.layers.base.Network` (not invertible)::

        forward(x) -> h          x (N, H, W, in_channels) -> h (N, H, W, out_channels)
        backward(dh) -> dx       adds every parameter gradient into ``grads``

    Parameters
    ----------
    in_channels : int
        Channels of the input ``x``.
    out_channels : int
        Channels of the output ``h``.
    width : int
        Hidden channels (512 in the paper's models).
    seed : int
        Seed of the initial weights of ``conv_in`` and ``conv_mid``.
    dtype : float32 or float64

    Notes
    -----
    Parameters (path, shape, initialisation):

    ====================  ==========================  ===============================
    ``conv_in/weight``    ``(3, 3, C_in, width)``     normal, std 0.05
    ``norm_in/bias``      ``(width,)``                data-dependent (ActNorm)
    ``norm_in/logs``      ``(width,)``                data-dependent (ActNorm)
    ``conv_mid/weight``   ``(1, 1, width, width)``    normal, std 0.05
    ``norm_mid/bias``     ``(width,)``                data-dependent (ActNorm)
    ``norm_mid/logs``     ``(width,)``                data-dependent (ActNorm)
    ``conv_out/weight``   ``(3, 3, width, C_out)``    zeros
    ``conv_out/bias``     ``(C_out,)``                zeros
    ``conv_out/logs``     ``(C_out,)``                zeros
    ====================  ==========================  ===============================

    Buffers: ``norm_in/initialized``, ``norm_mid/initialized``.

    The activations needed by :meth:`backward` are kept from the last :meth:`forward` and
    released by :meth:`backward` (or :meth:`clear_cache`); nothing else is remembered.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int,
        *,
        seed: int = 0,
        dtype: Any = np.float64,
    ) -> None:
        super().__init__(dtype)
        name = "ConditionerNet"
        self.in_channels = _positive_int(in_channels, "in_channels", name)
        self.out_channels = _positive_int(out_channels, "out_channels", name)
        self.width = _positive_int(width, "width", name)
        Ci, Co, Wd = self.in_channels, self.out_channels, self.width
        rng = np.random.default_rng(seed)
        self.add_param("conv_in/weight", rng.normal(0.0, INIT_STD, (3, 3, Ci, Wd)))
        self.add_layer("norm_in", ActNorm(Wd, dtype=self.dtype))
        self.add_param("conv_mid/weight", rng.normal(0.0, INIT_STD, (1, 1, Wd, Wd)))
        self.add_layer("norm_mid", ActNorm(Wd, dtype=self.dtype))
        self.add_param("conv_out/weight", np.zeros((3, 3, Wd, Co)))
        self.add_param("conv_out/bias", np.zeros(Co))
        self.add_param("conv_out/logs", np.zeros(Co))

    # ------------------------------------------------------------------ forward
    def forward(self, x: np.ndarray) -> np.ndarray:
        """``h = NN(x)`` (module docstring); remembers the activations for one backward."""
        x = self.check_input(x, self.in_channels)
        p = self._params
        N = x.shape[0]
        a1 = conv_same_forward(x, p["conv_in/weight"])  # (N, H, W, width)
        r1 = self._norm_relu("norm_in", a1)  # (N, H, W, width)
        a2 = conv_same_forward(r1, p["conv_mid/weight"])  # (N, H, W, width)
        r2 = self._norm_relu("norm_mid", a2)  # (N, H, W, width)
        o = conv_same_forward(r2, p["conv_out/weight"], p["conv_out/bias"])  # (N, H, W, C_out)
        out_scale = np.exp(LOGSCALE_FACTOR * p["conv_out/logs"])  # (C_out,)
        h = o * out_scale  # (N, H, W, C_out)
        self._cache = (x, r1, r2, h, out_scale, N)
        return h

    def _norm_relu(self, name: str, a: np.ndarray) -> np.ndarray:
        """``relu(ActNorm_name(a))`` in one fused pass (the ActNorm initialises on first use)."""
        norm = self._layers[name]
        if not norm.initialized:  # type: ignore[attr-defined]
            norm.initialize(a)  # type: ignore[attr-defined]
        # in place: ``a`` is this network's own temporary
        r, _ = actnorm_relu_forward(a, norm._params["bias"], norm._params["logs"], out=a)
        return r  # a NaN/Inf propagates to h; the coupling reports it

    def _norm_relu_backward(self, name: str, dr: np.ndarray, r: np.ndarray) -> np.ndarray:
        """``dn = dr * [r > 0]``, then ActNorm ``name``'s backward with ``dlogdet = 0``."""
        norm = self._layers[name]
        da, dbias, dlogs = actnorm_relu_backward(dr, r, norm._params["logs"], out=dr)
        norm._grads["bias"] += dbias
        norm._grads["logs"] += dlogs
        return da

    # ------------------------------------------------------------------ backward
    def backward(self, dh: np.ndarray) -> np.ndarray:
        """Gradient of ``sum(h * dh)`` w.r.t. the input of the last :meth:`forward`; adds the
        parameter gradients into :attr:`grads` (``+=``)."""
        x, r1, r2, h, out_scale, N = self.pop_cache()
        dh = self.check_grad(dh, h.shape, "dh")
        p, g = self._params, self._grads
        Co = self.out_channels
        g["conv_out/logs"] += LOGSCALE_FACTOR * (dh * h).reshape(-1, Co).sum(axis=0)
        do = dh * out_scale  # (N, H, W, C_out)
        dr2, dW, db = conv_same_backward(r2, p["conv_out/weight"], do)
        g["conv_out/weight"] += dW
        g["conv_out/bias"] += db
        da2 = self._norm_relu_backward("norm_mid", dr2, r2)  # relu', then ActNorm_mid
        dr1, dW, _ = conv_same_backward(r1, p["conv_mid/weight"], da2, bias=False)
        g["conv_mid/weight"] += dW
        da1 = self._norm_relu_backward("norm_in", dr1, r1)  # relu', then ActNorm_in
        dx, dW, _ = conv_same_backward(x, p["conv_in/weight"], da1, bias=False)
        g["conv_in/weight"] += dW
        return dx
