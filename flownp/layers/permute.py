r"""Fixed channel permutations: RealNVP's channel reversal and Glow's random channel shuffle
(Kingma & Dhariwal 2018, Section 3.2, the two baselines of the 1x1 convolution).

Every pixel's C channels are reordered by one fixed permutation ``perm`` (a buffer, saved with
the model), NHWC::

    forward   y[n, i, j, o] = x[n, i, j, perm[o]]
    matrix    y_vec = (I_{HW} kron P) x_vec,  P[o, perm[o]] = 1        (a permutation matrix)
    logdet    0                                                        (|det P| = 1)
    inverse   x[n, i, j, perm[o]] = y[n, i, j, o]     (i.e. x = y[..., argsort(perm)])
    backward  dx[n, i, j, perm[o]] = dy[n, i, j, o]   (P^T = P^{-1}); no parameters

Kinds (``kind=``)::

    "reverse"  perm = [C-1, C-2, ..., 0]                (RealNVP; the official script's option 0)
    "shuffle"  perm = default_rng(seed).permutation(C)  (Glow; the official script's option 1)

The permutation is drawn once, at construction, and stored as the int64 buffer ``perm``: a
loaded model uses the saved one, whatever the seed. A loaded ``perm`` that is not a
permutation of ``0 .. C-1`` is refused (the map would not be invertible).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.layers.base import Layer

KINDS = ("reverse", "shuffle")


class ChannelPermutation(Layer):
    """A fixed permutation of the channels, ``y = x[..., perm]`` (module docstring).

    Parameters
    ----------
    channels : int
        Number of channels C (input = output).
    kind : {"reverse", "shuffle"}
        Channel reversal or a random permutation drawn from ``seed``.
    seed : int
        Seed of the ``"shuffle"`` permutation (unused by ``"reverse"``).
    dtype : float32 or float64

    No parameters; buffer ``perm (C,)`` int64.
    """

    def __init__(
        self, channels: int, kind: str = "reverse", *, seed: int = 0, dtype: Any = np.float64
    ) -> None:
        super().__init__(dtype)
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool):
            raise ValueError(
                f"ChannelPermutation: channels must be a positive int, got {channels!r}"
            )
        if channels < 1:
            raise ValueError(
                f"ChannelPermutation: channels must be a positive int, got {channels!r}"
            )
        if kind not in KINDS:
            raise ValueError(f"ChannelPermutation: kind must be one of {KINDS}, got {kind!r}")
        self.channels = C = int(channels)
        self.kind = kind
        if kind == "reverse":
            perm = np.arange(C - 1, -1, -1)
        else:
            perm = np.random.default_rng(seed).permutation(C)
        self.add_buffer("perm", perm.astype(np.int64))

    @property
    def perm(self) -> np.ndarray:
        """The permutation, ``y[..., o] = x[..., perm[o]]`` (the buffer itself)."""
        return self._buffers["perm"]

    def after_load(self) -> None:
        perm = self.perm
        if perm.shape != (self.channels,) or not np.array_equal(
            np.sort(perm), np.arange(self.channels)
        ):
            raise ValueError(
                f"ChannelPermutation: the loaded perm {perm.tolist()} is not a permutation of "
                f"0..{self.channels - 1}"
            )
        super().after_load()

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        y = x[..., self.perm]  # (N, H, W, C), a copy
        self._cache = x.shape
        return y, np.zeros(x.shape[0], dtype=self.dtype)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        y = self.check_input(y, self.channels, name="y")
        return y[..., np.argsort(self.perm)]

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        shape = self.pop_cache()
        dy = self.check_grad(dy, shape, "dy")
        self.check_grad(dlogdet, (shape[0],), "dlogdet")
        dx = np.empty_like(dy)
        dx[..., self.perm] = dy
        return dx
