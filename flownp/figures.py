"""Pictures of images: tiling a batch into one grid, and showing any channel count.

Used by training (``samples.png``), ``flownp sample`` and the latent-space figures. Images are
uint8 ``(N, H, W, C)``. C = 1 is drawn in grey and C = 3 as RGB; no colour mapping fits other
channel counts, so they are drawn as C grayscale panels side by side (channel 0 first).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["image_grid", "channel_panels", "displayable"]


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 ``(N, H, W, C)`` images into one ``(R (H+pad), S (W+pad), C)`` image."""
    N, H, W, C = images.shape
    S = ncols or int(math.ceil(math.sqrt(N)))
    R = int(math.ceil(N / S))
    out = np.full((R * (H + pad) + pad, S * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(N):
        r, s = divmod(i, S)
        out[
            pad + r * (H + pad) : pad + r * (H + pad) + H,
            pad + s * (W + pad) : pad + s * (W + pad) + W,
        ] = images[i]
    return out


def channel_panels(grid: np.ndarray, gap: int = 4) -> np.ndarray:
    """``(R, S, C)`` uint8 -> ``(R, C S + (C - 1) gap, 1)``: the C channels side by side."""
    R, S, C = grid.shape
    out = np.full((R, C * S + (C - 1) * gap, 1), 255, dtype=np.uint8)
    for c in range(C):
        out[:, c * (S + gap) : c * (S + gap) + S, 0] = grid[..., c]
    return out


def displayable(image: np.ndarray) -> np.ndarray:
    """A uint8 ``(H, W, C)`` image as matplotlib can show it: unchanged for C = 1 or 3, else
    :func:`channel_panels` (one grayscale panel per channel, C = 1)."""
    return image if image.shape[-1] in (1, 3) else channel_panels(image, gap=2)
