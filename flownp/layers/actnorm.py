r"""Activation normalisation (Glow, Kingma & Dhariwal 2018, Section 3.1 and Table 1).

Per-channel affine map, NHWC, C channels::

    forward   y = (x + bias) * exp(logs)                      (broadcast over N, H, W)
    logdet    H * W * sum_c logs[c]                           (same for every sample)
    inverse   x = y * exp(-logs) - bias
    backward  dx     = dy * exp(logs)
              dbias  = sum_{n,i,j} dy * exp(logs)
              dlogs  = sum_{n,i,j} dy * y  +  H * W * sum_n dlogdet[n]

Data-dependent initialisation: the first ``forward`` on an uninitialised layer sets
``bias = -mean(x)`` and ``logs = -log(std(x) + 1e-6)`` per channel (over N, H, W), so that
this first output has zero mean and unit variance. The flag is the buffer ``initialized``
(saved with the model): a loaded model is not re-initialised. ``inverse`` never initialises.

Parameters: ``bias (C,)`` and ``logs (C,)``, both zero before initialisation (identity).

The forward and backward lines run as one compiled pass each
(:mod:`flownp.kernels.channel_affine`, whose NumPy reference is the two lines above): NumPy
broadcasts a few-channel vector slowly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.kernels.channel_affine import channel_affine_backward, channel_affine_forward
from flownp.layers.base import Layer


class ActNorm(Layer):
    """Per-channel affine flow layer with data-dependent initialisation."""

    def __init__(self, channels: int, *, dtype: Any = np.float64, eps: float = 1e-6) -> None:
        super().__init__(dtype)
        if not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"ActNorm: channels must be a positive int, got {channels!r}")
        self.channels = int(channels)
        self.eps = eps
        self.add_param("bias", np.zeros(channels))
        self.add_param("logs", np.zeros(channels))
        self.add_buffer("initialized", np.array(False))

    @property
    def initialized(self) -> bool:
        return bool(self._buffers["initialized"])

    def initialize(self, x: np.ndarray) -> None:
        """Set ``bias``/``logs`` so that ``forward(x)`` has zero mean, unit variance per channel."""
        x64 = x.reshape(-1, self.channels).astype(np.float64)
        mean = x64.mean(axis=0)
        std = x64.std(axis=0)
        self._params["bias"][...] = -mean
        self._params["logs"][...] = -np.log(std + self.eps)
        self._buffers["initialized"][...] = True

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        if not self.initialized:
            self.initialize(x)
        N, H, W, _ = x.shape
        scale = np.exp(self._params["logs"])  # (C,)
        y = channel_affine_forward(x, self._params["bias"], scale)  # (x + bias) * scale
        logdet = np.full(N, H * W * np.sum(self._params["logs"]), dtype=self.dtype)
        self._cache = (y, scale)
        return y, logdet

    def inverse(self, y: np.ndarray) -> np.ndarray:
        y = self.check_input(y, self.channels, name="y")
        return y * np.exp(-self._params["logs"]) - self._params["bias"]

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        y, scale = self.pop_cache()
        N, H, W, C = y.shape
        dy = self.check_grad(dy, y.shape, "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        # dx = dy * scale, dbias = sum dx, dlogs_data = sum dy * y (over n, i, j)
        dx, dbias, dlogs_data = channel_affine_backward(dy, y, scale)
        self._grads["bias"] += dbias
        self._grads["logs"] += dlogs_data + H * W * dlogdet.sum()
        return dx
