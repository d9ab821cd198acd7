"""Figure 1 of the paper, reproduced from the explicit matrices of :mod:`verification.dense`.

Top row: the padded 4x4 input (image pixels white, padding grey) with the k x k window of the
first output pixel, one colour per tap; the masked corner tap is hatched. Bottom row: the
32x32 matrix ``M`` (4x4 image, 2 channels, k = 3) with zero entries white and every other
entry coloured by the spatial tap it comes from (the paper's convention: same colour = same
spatial location, whatever the channels):

(a) symmetric ("same") padding, (b) top-left padding, (c) top-left padding, masked corner.

Also: :func:`model_jacobian_figure` (the Jacobian of a whole tiny model) and
:func:`quad_jacobian_figure` (the block-triangular Jacobian of the quad coupling).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from verification import dense as D  # noqa: E402

PANELS = (
    ("(a) symmetric", "same", "full"),
    ("(b) top-left", "top_left", "full"),
    ("(c) top-left, masked", "top_left", "masked"),
)


def _tap_colours(k: int) -> np.ndarray:
    return plt.get_cmap("tab10" if k * k <= 10 else "tab20")(np.arange(k * k))[:, :3]


def _matrix_image(M: np.ndarray, k: int, H: int, W: int, C: int, padding: str) -> np.ndarray:
    """RGB image of ``M``: white where zero, else the colour of the tap (per pixel block)."""
    taps = D.tap_map(k, H, W, padding)  # (HW, HW) tap index per pixel pair
    tap_full = np.kron(taps, np.ones((C, C), dtype=np.int64))  # (HWC, HWC)
    colours = _tap_colours(k)
    img = np.ones(M.shape + (3,))
    nz = M != 0
    img[nz] = colours[tap_full[nz]]
    return img


def _draw_padding(ax, k: int, H: int, W: int, padding: str, masked: bool) -> None:
    t, b, l, r = D.padding_amounts(k, padding)
    Hp, Wp = H + t + b, W + l + r
    colours = _tap_colours(k)
    for i in range(Hp):
        for j in range(Wp):
            inside = t <= i < t + H and l <= j < l + W
            ax.add_patch(
                Rectangle((j, Hp - 1 - i), 1, 1, fc="white" if inside else "0.8", ec="0.4", lw=0.5)
            )
    # the window of output pixel (0, 0) covers padded rows/columns 0..k-1
    for a in range(k):
        for bb in range(k):
            corner = (a, bb) == (t, l)
            ax.add_patch(
                Rectangle(
                    (bb + 0.1, Hp - 1 - a + 0.1),
                    0.8,
                    0.8,
                    fc=colours[a * k + bb],
                    alpha=0.9,
                    hatch="////" if corner and masked else None,
                    ec="black" if corner else "none",
                    lw=1.0,
                )
            )
    ax.set_xlim(0, Wp)
    ax.set_ylim(0, Hp)
    ax.set_aspect("equal")
    ax.axis("off")


def figure1(
    path: str, k: int = 3, H: int = 4, W: int = 4, C: int = 2, seed: int = 0
) -> tuple[str, list[dict]]:
    """Draw Figure 1 to ``path`` (PNG). Returns the path and per-panel structural numbers.

    The kernel is random with every weight nonzero (``|N(0,1)| + 0.1`` with random signs),
    so every zero in the pictures comes from the padding or the mask, not from the weights.
    """
    rng = np.random.default_rng(seed)
    K = (np.abs(rng.standard_normal((k, k, C, C))) + 0.1) * rng.choice([-1, 1], (k, k, C, C))
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), gridspec_kw={"height_ratios": [1, 2.2]})
    stats = []
    for col, (title, padding, corner) in enumerate(PANELS):
        M = D.conv_matrix(K, H, W, padding, corner)
        _draw_padding(axes[0, col], k, H, W, padding, corner == "masked")
        axes[0, col].set_title(title)
        ax = axes[1, col]
        ax.imshow(_matrix_image(M, k, H, W, C, padding), interpolation="nearest")
        n = M.shape[0]
        for p in range(0, n + 1, C):  # pixel block grid
            ax.axhline(p - 0.5, color="0.85", lw=0.3)
            ax.axvline(p - 0.5, color="0.85", lw=0.3)
        rank = int(np.linalg.matrix_rank(M))
        ax.set_title(f"M ({n}x{n}), rank {rank}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        stats.append(
            {
                "panel": title,
                "nonzeros": int(np.count_nonzero(M)),
                "nonzeros above diag": int(np.count_nonzero(np.triu(M, 1))),
                "nonzeros above block diag": int(np.count_nonzero(M[D.above_block_diagonal(M, C)])),
                "rank": rank,
            }
        )
    fig.suptitle(
        f"Figure 1 reproduced: k={k} convolution of a {H}x{W} image with {C} channels "
        "(colour = spatial tap, white = zero)"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, stats


# --------------------------------------------------------------------------------------------
# Jacobians of a whole tiny model and of the quad coupling
# --------------------------------------------------------------------------------------------


def _log_abs_image(ax, J: np.ndarray, floor: float = 1e-8):
    """``log10 |J|`` with exact zeros white; returns the image handle (for a colour bar)."""
    A = np.abs(J)
    img = np.ma.masked_where(A == 0, np.log10(np.maximum(A, floor)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    return ax.imshow(img, cmap=cmap, interpolation="nearest")


def model_jacobian_figure(J: np.ndarray, model, path: str, title: str = "") -> str:
    """``log10 |dz/dx|`` of one sample of a tiny :class:`~flownp.model.FlowModel`: columns in
    the paper's vectorisation of the image (row, column, channel), rows in the latent order
    (split-off pieces level 0 first, top latent last), pieces separated by red lines."""
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    im = _log_abs_image(ax, J)
    start = 0
    for l, (h, w, c) in enumerate(model.latent_shapes()):
        size = h * w * c
        last = l == len(model.latent_shapes()) - 1
        name = "top latent" if last else f"split level {l}"
        ax.text(
            J.shape[1] + 0.5, start + size / 2, f"{name}\n({h}x{w}x{c})", va="center", fontsize=8
        )
        start += size
        if not last:
            ax.axhline(start - 0.5, color="red", lw=0.8)
    ax.set_xlabel("input index  c + C j + C W i  (paper's vectorisation of x)")
    ax.set_ylabel("latent index (z = concat of the standardised pieces)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.2, label="log10 |dz/dx| (white: exactly 0)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quad_jacobian_figure(J: np.ndarray, Jb: np.ndarray, nb: int, path: str) -> str:
    """The quad coupling's Jacobian in the paper's (pixel, channel) order and permuted to
    (channel block, pixel, channel in block) order, where it is block lower triangular with
    diagonal blocks ``I, diag(s_1), diag(s_2), diag(s_3)``."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    _log_abs_image(axes[0], J)
    axes[0].set_title("dy/dx, paper order (pixel, channel)", fontsize=10)
    im = _log_abs_image(axes[1], Jb)
    for b in range(1, 4):
        for line in (axes[1].axhline, axes[1].axvline):
            line(b * nb - 0.5, color="red", lw=0.8)
    axes[1].set_title(
        "block order (x_1 | x_2 | x_3 | x_4): block lower triangular,\n"
        "diagonal blocks I, diag(s_1), diag(s_2), diag(s_3)",
        fontsize=10,
    )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, fraction=0.03, label="log10 |J| (white: exactly 0)")
    fig.suptitle("Quad coupling (paper Eq. 3-6), 2x2 image, 8 channels")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
