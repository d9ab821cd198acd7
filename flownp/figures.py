"""Every figure flownp draws: grids of images (samples, latent-space edits) and the loss curve.

Used by training (``samples.png``, ``loss_curve.png``), ``flownp sample`` and the latent-space
commands; all with matplotlib's Agg canvas, never pyplot state. Images are
uint8 ``(N, H, W, C)``. C = 1 is drawn in grey and C = 3 as RGB; no colour mapping fits other
channel counts, so they are drawn as C grayscale panels side by side (channel 0 first).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flownp.data.pixels import model_to_images, to_uint8
from flownp.files import write_atomic

__all__ = [
    "image_grid",
    "channel_panels",
    "displayable",
    "save_grid",
    "save_image_grid",
    "plot_loss_curve",
]


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 ``(N, H, W, C)`` images into one ``(R (H+pad), S (W+pad), C)`` image
    (``S = ncols``, at most N; default: a square)."""
    N, H, W, C = images.shape
    S = min(ncols, N) if ncols else int(math.ceil(math.sqrt(N)))
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


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    *,
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    highlight_column: int | None = None,
    title: str | None = None,
    cell_inches: float = 1.0,
    dpi: int = 100,
    n_bits: int = 8,
) -> Path:
    """Save a ``(R, S, H, W, C)`` grid of images as a PNG (matplotlib Agg, no pyplot state).

    ``images`` are uint8 or floats in model space (converted by :func:`model_to_images`);
    C = 1 is drawn in grey, C = 3 as RGB, other C as grayscale panels side by side
    (:func:`displayable`). ``highlight_column`` gets a red frame (the original
    in a Figure 5(d) sweep). ``n_bits``: the bits per pixel of the model that made float
    images. Parent directories are created. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] < 1:
        raise ValueError(
            f"save_image_grid: images must be (rows, columns, H, W, C), got {images.shape}"
        )
    pix = images if images.dtype == np.uint8 else model_to_images(images, n_bits)
    R, S = pix.shape[:2]
    if column_labels is not None and len(column_labels) != S:
        raise ValueError(f"save_image_grid: {len(column_labels)} column labels for {S} columns")
    if row_labels is not None and len(row_labels) != R:
        raise ValueError(f"save_image_grid: {len(row_labels)} row labels for {R} rows")
    left = 0.9 if row_labels is not None else 0.1
    top = (0.35 if column_labels is not None else 0.1) + (0.35 if title else 0.0)
    fig = Figure(figsize=(left + 0.1 + S * cell_inches, top + 0.1 + R * cell_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    W_in, H_in = fig.get_size_inches()
    for r in range(R):
        for c in range(S):
            ax = fig.add_axes(
                (
                    (left + c * cell_inches) / W_in,
                    1.0 - (top + (r + 1) * cell_inches) / H_in,
                    0.96 * cell_inches / W_in,
                    0.96 * cell_inches / H_in,
                )
            )
            img = displayable(pix[r, c])
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            hl = highlight_column is not None and c == highlight_column
            for spine in ax.spines.values():
                spine.set_visible(hl)
                spine.set_color("red")
                spine.set_linewidth(2.0)
            if r == 0 and column_labels is not None:
                ax.set_title(column_labels[c], fontsize=7)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.05 / H_in, va="top")
    return _save_png(fig, path)


def save_grid(
    x: np.ndarray,
    path: str | os.PathLike,
    *,
    ncols: int | None = None,
    title: str | None = None,
    n_bits: int = 8,
) -> Path:
    """Save model-space images ``x`` (or uint8 images) as one PNG grid (matplotlib Agg);
    ``n_bits``: the bits per pixel of the model that made ``x`` (:func:`to_uint8`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pix = x if x.dtype == np.uint8 else to_uint8(x, n_bits)
    grid = image_grid(pix, ncols)
    channels = grid.shape[2]
    if channels not in (1, 3):
        # No colour mapping fits 2 or 4+ channels: show each channel as its own grayscale
        # grid, side by side (channel 0 on the left), and say so in the title.
        grid = channel_panels(grid)
        note = f"{channels} channels, each a grayscale panel (left: channel 0)"
        title = f"{title}; {note}" if title else note
    fig = Figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - (0.4 / fig.get_size_inches()[1] if title else 0)))
    if grid.shape[2] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_png(fig, path)


def plot_loss_curve(metrics: dict[str, dict[str, list[float]]], path: str | os.PathLike) -> Path:
    """Training bits/dim per step (raw and smoothed) and the held-out evaluations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tr, ev = metrics["train"], metrics["eval"]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.asarray(tr["step"])
    bpd = np.asarray(tr["bpd"], dtype=np.float64)
    ok = np.isfinite(bpd)
    if ok.any():
        ax.plot(steps[ok], bpd[ok], lw=0.5, alpha=0.35, color="C0", label="train (batch)")
        k = min(50, int(ok.sum()))
        sm = np.convolve(bpd[ok], np.ones(k) / k, mode="valid")
        ax.plot(steps[ok][k - 1 :], sm, lw=1.5, color="C0", label=f"train ({k}-step mean)")
        lo = np.nanpercentile(bpd[ok], 1)
        hi = np.percentile(bpd[ok][len(bpd[ok]) // 20 :], 99) if ok.sum() > 20 else bpd[ok].max()
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
    ev_bpd = np.asarray(ev["bpd"], dtype=np.float64)
    if np.isfinite(ev_bpd).any():
        fin = np.isfinite(ev_bpd)
        ax.plot(
            np.asarray(ev["step"])[fin],
            ev_bpd[fin],
            "o-",
            color="C3",
            label="held-out (EMA weights)",
        )
    bad = steps[np.asarray(tr["rejected"]) > 0] if tr["rejected"] else []
    for s in bad:
        ax.axvline(s, color="k", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when every step was rejected
        ax.legend()
    return _save_png(fig, path)


def _save_png(fig: object, path: str | os.PathLike) -> Path:
    """Render ``fig`` as PNG (whatever the suffix of ``path``) and write it atomically
    (:func:`flownp.files.write_atomic`; parent folders are created)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # type: ignore[attr-defined]
    return write_atomic(path, buf.getvalue())
