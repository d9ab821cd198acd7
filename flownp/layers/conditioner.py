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

from flownp.kernels.conditioner import conditioner_backward, conditioner_forward
from flownp.kernels.conv_same import actnorm_relu_forward, conv_same_forward
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
        """``h = NN(x)`` (module docstring); remembers the activations for one backward.

        The whole network runs as one compiled kernel (:func:`conditioner_forward`); on the
        first call the ActNorms initialise first (:meth:`_initialize_norms`).
        """
        x = self.check_input(x, self.in_channels)
        self._initialize_norms(x)
        p, ni, nm = self._params, self._layers["norm_in"]._params, self._layers["norm_mid"]._params
        h, acts = conditioner_forward(
            x,
            p["conv_in/weight"],
            ni["bias"],
            np.exp(ni["logs"]),
            p["conv_mid/weight"],
            nm["bias"],
            np.exp(nm["logs"]),
            p["conv_out/weight"],
            p["conv_out/bias"],
            np.exp(LOGSCALE_FACTOR * p["conv_out/logs"]),
        )
        self._cache = (x, h, acts)
        return h

    def _initialize_norms(self, x: np.ndarray) -> None:
        """Data-dependent initialisation of the ActNorms not yet initialised, each on the
        activations it sees (``a1``, then ``a2`` computed with the initialised ``norm_in``)."""
        ni, nm = self._layers["norm_in"], self._layers["norm_mid"]
        if ni.initialized and nm.initialized:  # type: ignore[attr-defined]
            return
        a1 = conv_same_forward(x, self._params["conv_in/weight"])  # (N, H, W, width)
        if not ni.initialized:  # type: ignore[attr-defined]
            ni.initialize(a1)  # type: ignore[attr-defined]
        if not nm.initialized:  # type: ignore[attr-defined]
            r1, _ = actnorm_relu_forward(a1, ni._params["bias"], ni._params["logs"], out=a1)
            nm.initialize(conv_same_forward(r1, self._params["conv_mid/weight"]))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ backward
    def backward(self, dh: np.ndarray) -> np.ndarray:
        """Gradient of ``sum(h * dh)`` w.r.t. the input of the last :meth:`forward`; adds the
        parameter gradients into :attr:`grads` (``+=``). One compiled kernel
        (:func:`conditioner_backward`) runs the module docstring's backward lines."""
        x, h, acts = self.pop_cache()
        dh = self.check_grad(dh, h.shape, "dh")
        p, g = self._params, self._grads
        ni, nm = self._layers["norm_in"], self._layers["norm_mid"]
        d = conditioner_backward(
            dh,
            x,
            h,
            acts,
            p["conv_in/weight"],
            np.exp(ni._params["logs"]),
            p["conv_mid/weight"],
            np.exp(nm._params["logs"]),
            p["conv_out/weight"],
            np.exp(LOGSCALE_FACTOR * p["conv_out/logs"]),
        )
        g["conv_out/logs"] += LOGSCALE_FACTOR * d.logs_out  # d/dlogs of exp(3 logs)
        g["conv_out/bias"] += d.b_out
        g["conv_out/weight"] += d.w_out
        nm._grads["bias"] += d.b2
        nm._grads["logs"] += d.logs2
        g["conv_mid/weight"] += d.w_mid
        ni._grads["bias"] += d.b1
        ni._grads["logs"] += d.logs1
        g["conv_in/weight"] += d.w_in
        return d.dx
