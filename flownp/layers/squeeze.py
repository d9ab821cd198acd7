r"""2x2 space-to-depth "squeeze" (RealNVP, Dinh et al. 2017, Section 3.6; Glow's ``squeeze2d``).

``(N, H, W, C) -> (N, H/2, W/2, 4C)``, a permutation of the entries, in openai/glow's channel
order (reshape ``[N, H/2, 2, W/2, 2, C]``, transpose ``[0, 1, 3, 5, 2, 4]``, reshape)::

    forward   y[n, i, j, 4c + 2a + b] = x[n, 2i + a, 2j + b, c]     (a, b in {0, 1})
    logdet    0                                                     (a permutation matrix)
    inverse   x[n, 2i + a, 2j + b, c] = y[n, i, j, 4c + 2a + b]
    backward  dx = inverse(dy)           (the transpose of a permutation is its inverse)

The output channel index is *channel-major*: the four pixels of a 2x2 block of input channel
``c`` are the adjacent output channels ``4c .. 4c+3``, in raster order within the block
(top-left, top-right, bottom-left, bottom-right). Same as PyTorch
``x.reshape(N, C, H/2, 2, W/2, 2).permute(0, 1, 3, 5, 2, 4).reshape(N, 4C, H/2, W/2)``
in NCHW and as ``einops.rearrange(x, 'n (h a) (w b) c -> n h w (c a b)', a=2, b=2)``.
(``torch.nn.PixelUnshuffle`` gives the same order in NCHW.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.layers.base import Layer


def squeeze2d(x: np.ndarray) -> np.ndarray:
    """``(N, H, W, C) -> (N, H/2, W/2, 4C)``, ``y[n,i,j,4c+2a+b] = x[n,2i+a,2j+b,c]``.

    H and W must be even (not checked here; :class:`Squeeze` checks)."""
    N, H, W, C = x.shape
    t = x.reshape(N, H // 2, 2, W // 2, 2, C)  # [n, i, a, j, b, c]
    t = t.transpose(0, 1, 3, 5, 2, 4)  # [n, i, j, c, a, b]
    return t.reshape(N, H // 2, W // 2, 4 * C)


def unsqueeze2d(y: np.ndarray) -> np.ndarray:
    """Inverse of :func:`squeeze2d`: ``(N, h, w, 4C) -> (N, 2h, 2w, C)``."""
    N, h, w, C4 = y.shape
    C = C4 // 4
    t = y.reshape(N, h, w, C, 2, 2)  # [n, i, j, c, a, b]
    t = t.transpose(0, 1, 4, 2, 5, 3)  # [n, i, a, j, b, c]
    return t.reshape(N, 2 * h, 2 * w, C)


class Squeeze(Layer):
    """2x2 space-to-depth flow layer (no parameters, log-det 0).

    Parameters
    ----------
    dtype : float32 or float64
        Inputs must have this dtype (as for every layer); ``logdet`` is returned in it.
    """

    def __init__(self, *, dtype: Any = np.float64) -> None:
        super().__init__(dtype)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x)
        N, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(
                f"Squeeze: height and width must be even for a 2x2 squeeze, got shape {x.shape}"
            )
        self._cache = x.shape
        return squeeze2d(x), np.zeros(N, dtype=self.dtype)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        y = self.check_input(y, name="y")
        if y.shape[3] % 4:
            raise ValueError(
                f"Squeeze.inverse: y must have a multiple of 4 channels, got shape {y.shape}"
            )
        return unsqueeze2d(y)

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        N, H, W, C = self.pop_cache()
        dy = self.check_grad(dy, (N, H // 2, W // 2, 4 * C), "dy")
        self.check_grad(dlogdet, (N,), "dlogdet")  # logdet is constant: no contribution
        return unsqueeze2d(dy)
