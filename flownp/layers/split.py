r"""Multi-scale split with a learned conditional Gaussian prior, and the learned top prior
(RealNVP Section 3.6; Glow, Kingma & Dhariwal 2018, Section 3 and openai/glow ``split2d``).

Both layers *standardise* the latent they factor out, so that the whole latent of a model is
standard normal and ``log p(x) = sum log N(z; 0, I) + sum of all logdets``::

    eps    = (z - mean) * exp(-logs)                                   (standardise)
    logdet = -sum_{i,j,c} logs[n,i,j,c]      (per sample)
    log N(z; mean, exp(2 logs)) = log N(eps; 0, I) + logdet            (change of variables)

:func:`standardize_forward`, :func:`standardize_inverse` and :func:`standardize_backward` are
that map; :class:`Split` and :class:`LearnedPrior` only differ in where ``mean``/``logs``
come from.

``Split(C)``, C even, ``C1 = C / 2``::

    h  = x[..., :C1]                    (kept, passed on to the next level)
    z2 = x[..., C1:]                    (factored out)
    out = conv3x3_same(h; prior/weight, prior/bias)    (N, H, W, 2 C1), zero initialised
    mean = out[..., 0::2],  logs = out[..., 1::2]      (interleaved, as openai/glow)
    eps  = (z2 - mean) * exp(-logs),    logdet = -sum logs

    forward(x)        -> (h, eps, logdet)
    inverse(h, eps)   -> x = concat(h, eps * exp(logs) + mean)
    backward(dh, deps, dlogdet) -> dx:
        dz2   = deps * exp(-logs)
        dmean = -dz2,   dlogs = -deps * eps - dlogdet[n]
        dout[..., 0::2] = dmean,  dout[..., 1::2] = dlogs
        (dh_prior, d prior/weight, d prior/bias) = conv3x3_same backward of dout
        dx = concat(dh + dh_prior, dz2)

The Jacobian of ``x -> concat(h, eps)`` is block lower triangular
``[[I, 0], [*, diag(exp(-logs))]]``, hence ``logdet = -sum logs``.

``LearnedPrior((H, W, C))``: parameters ``mean`` and ``logs`` of shape ``(H, W, C)`` (one
per latent position), zero initialised; ``forward(z) -> (eps, logdet)`` standardises with
them. It is an ordinary :class:`~flownp.layers.base.Layer`; :class:`Split` follows the
:class:`~flownp.layers.base.FactorOut` contract.

Differences from openai/glow (exact reparameterisations, documented for porters):
Glow's ``conv2d_zeros`` multiplies the conv output by ``exp(3 * logs)``; here that factor is
folded into ``prior/weight`` and ``prior/bias``. Glow's ``split2d`` also squeezes the kept
half; here that is the next level's :class:`~flownp.layers.squeeze.Squeeze`. Glow's learned
top prior is per channel (a conv of zeros, i.e. a bias); here it is per position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.kernels.conv_same import conv_same_backward, conv_same_forward
from flownp.layers.base import FactorOut, Layer

PRIOR_KERNEL_SIZE = 3


# ---------------------------------------------------------------------- the standardising map
def standardize_forward(
    z: np.ndarray, mean: np.ndarray, logs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eps = (z - mean) * exp(-logs)``, ``logdet[n] = -sum logs[n]``.

    ``z`` is ``(N, H, W, C)``; ``mean`` and ``logs`` broadcast to it (``(N, H, W, C)`` or
    ``(H, W, C)``). Returns ``(eps, inv_scale, logdet)`` with ``inv_scale = exp(-logs)``
    (kept for the backward) and ``logdet`` of shape ``(N,)``, summed in float64.
    """
    inv_scale = np.exp(-logs)  # same shape as logs
    eps = (z - mean) * inv_scale  # (N, H, W, C)
    N = z.shape[0]
    logdet = -np.sum(np.broadcast_to(logs, z.shape).reshape(N, -1), axis=1, dtype=np.float64)
    return eps, inv_scale, logdet.astype(z.dtype)


def standardize_inverse(eps: np.ndarray, mean: np.ndarray, logs: np.ndarray) -> np.ndarray:
    """``z = eps * exp(logs) + mean`` (inverse of :func:`standardize_forward`)."""
    return eps * np.exp(logs) + mean


def standardize_backward(
    deps: np.ndarray, dlogdet: np.ndarray, eps: np.ndarray, inv_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(eps * deps) + sum(logdet * dlogdet)`` per element.

    Returns ``(dz, dmean, dlogs)``, each ``(N, H, W, C)`` (not reduced over a broadcast)::

        dz = deps * exp(-logs),   dmean = -dz,   dlogs = -deps * eps - dlogdet[n]
    """
    dz = deps * inv_scale  # (N, H, W, C)
    dlogs = -deps * eps - dlogdet[:, None, None, None]
    return dz, -dz, dlogs


# ---------------------------------------------------------------------- Split
class Split(FactorOut):
    """Factor out half of the channels with a learned conditional Gaussian prior (Glow).

    Contract :class:`~flownp.layers.base.FactorOut` (two outputs, so not a plain layer)::

        forward(x) -> (h, eps, logdet)     inverse(h, eps) -> x
        backward(dh, deps, dlogdet) -> dx

    Parameters
    ----------
    channels : int
        Input channels C, even. ``h`` and ``eps`` have ``C / 2`` channels each.
    dtype : float32 or float64

    Parameters of the layer: ``prior/weight (3, 3, C/2, C)`` and ``prior/bias (C,)``, zero
    initialised (the initial prior is N(0, I): ``eps == z2``, ``logdet == 0``).
    """

    def __init__(self, channels: int, *, dtype: Any = np.float64) -> None:
        super().__init__(dtype)
        if not isinstance(channels, (int, np.integer)) or channels < 2 or channels % 2:
            raise ValueError(f"Split: channels must be an even int >= 2, got {channels!r}")
        self.channels = int(channels)
        self.half = C1 = self.channels // 2
        k = PRIOR_KERNEL_SIZE
        self.add_param("prior/weight", np.zeros((k, k, C1, 2 * C1)))
        self.add_param("prior/bias", np.zeros(2 * C1))

    def prior(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, logs)`` of the conditional prior of ``z2`` given the kept half ``h``."""
        out = conv_same_forward(h, self._params["prior/weight"], self._params["prior/bias"])
        return out[..., 0::2], out[..., 1::2]  # (N, H, W, C1) each, interleaved channels

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        C1 = self.half
        h = np.ascontiguousarray(x[..., :C1])  # (N, H, W, C1), a copy
        z2 = x[..., C1:]  # (N, H, W, C1)
        mean, logs = self.prior(h)
        eps, inv_scale, logdet = standardize_forward(z2, mean, logs)
        self._cache = (h, eps, inv_scale)
        return h, eps, logdet

    def inverse(self, h: np.ndarray, eps: np.ndarray) -> np.ndarray:
        h = self.check_input(h, self.half, name="h")
        eps = self.check_input(eps, self.half, name="eps")
        if eps.shape != h.shape:
            raise ValueError(
                f"Split.inverse: h and eps must have the same shape, got {h.shape} and {eps.shape}"
            )
        mean, logs = self.prior(h)
        z2 = standardize_inverse(eps, mean, logs)
        return np.concatenate([h, z2], axis=-1)  # (N, H, W, C)

    def backward(self, dh: np.ndarray, deps: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        h, eps, inv_scale = self.pop_cache()
        N = h.shape[0]
        dh = self.check_grad(dh, h.shape, "dh")
        deps = self.check_grad(deps, h.shape, "deps")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dz2, dmean, dlogs = standardize_backward(deps, dlogdet, eps, inv_scale)
        dout = np.empty(h.shape[:3] + (2 * self.half,), dtype=self.dtype)  # (N, H, W, 2 C1)
        dout[..., 0::2] = dmean
        dout[..., 1::2] = dlogs
        dh_prior, dK, db = conv_same_backward(h, self._params["prior/weight"], dout)
        self._grads["prior/weight"] += dK
        self._grads["prior/bias"] += db
        return np.concatenate([dh + dh_prior, dz2], axis=-1)  # (N, H, W, C)


# ---------------------------------------------------------------------- LearnedPrior
class LearnedPrior(Layer):
    """Learned Gaussian prior of the top-level latent, as a standardising flow layer.

    ``forward(z) -> (eps, logdet)`` with ``eps = (z - mean) * exp(-logs)`` and
    ``logdet = -sum logs`` (same for every sample); ``inverse(eps) = eps * exp(logs) + mean``.

    Parameters
    ----------
    shape : (H, W, C)
        Shape of one latent. Parameters ``mean`` and ``logs`` have this shape, zero
        initialised (the initial prior is N(0, I)).
    dtype : float32 or float64
    """

    def __init__(self, shape: tuple[int, int, int], *, dtype: Any = np.float64) -> None:
        super().__init__(dtype)
        shape = tuple(shape)
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
            raise ValueError(
                f"{type(self).__name__}: shape must be (H, W, C) of positive ints, got {shape!r}"
            )
        self.shape = tuple(int(s) for s in shape)
        self.add_param("mean", np.zeros(self.shape))
        self.add_param("logs", np.zeros(self.shape))

    def _check(self, z: np.ndarray, name: str) -> np.ndarray:
        z = self.check_input(z, self.shape[2], name=name)
        if z.shape[1:] != self.shape:
            raise ValueError(
                f"{type(self).__name__}: {name} must have shape "
                f"(N, {', '.join(map(str, self.shape))}), "
                f"got {z.shape}"
            )
        return z

    def forward(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self._check(z, "z")
        eps, inv_scale, logdet = standardize_forward(z, self._params["mean"], self._params["logs"])
        self._cache = (eps, inv_scale)
        return eps, logdet

    def inverse(self, eps: np.ndarray) -> np.ndarray:
        eps = self._check(eps, "eps")
        return standardize_inverse(eps, self._params["mean"], self._params["logs"])

    def backward(self, deps: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        eps, inv_scale = self.pop_cache()
        N = eps.shape[0]
        deps = self.check_grad(deps, eps.shape, "deps")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dz, dmean, dlogs = standardize_backward(deps, dlogdet, eps, inv_scale)
        self._grads["mean"] += dmean.sum(axis=0)  # reduce the broadcast over the batch
        self._grads["logs"] += dlogs.sum(axis=0)
        return dz
