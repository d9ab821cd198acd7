"""Benchmark section: inverse time against image size (section ``size``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from verification.bench._common import (
    F32,
    interleaved,
)


def bench_size(quick: bool, out: Path) -> dict[str, Any]:
    from flownp.layers.cinc import CInCConv
    from flownp.layers.emerging import EmergingConv
    from flownp.testing import randomize_params

    sizes = [8, 16] if quick else [8, 16, 24, 32, 48, 64]
    C = 12
    N = 4 if quick else 16
    rounds = 2 if quick else 7
    cinc = CInCConv(C, 3, dtype=F32, seed=1)
    emer = EmergingConv(C, 3, dtype=F32, seed=2)
    for lay in (cinc, emer):
        randomize_params(lay, np.random.default_rng(3), scale=0.02)
    rows = []
    rng = np.random.default_rng(0)
    for s in sizes:
        y = rng.standard_normal((N, s, s, C)).astype(F32)
        cases = {
            "cinc forward": (None, lambda y=y: (cinc.forward(y), cinc.clear_cache())),
            "cinc sequential": (None, lambda y=y: cinc.inverse(y, method="raster")),
            "cinc wavefront": (None, lambda y=y: cinc.inverse(y, method="wavefront")),
            "emerging sequential": (None, lambda y=y: emer.inverse(y, method="raster")),
            "emerging wavefront": (None, lambda y=y: emer.inverse(y, method="wavefront")),
        }
        res = interleaved(cases, rounds)
        rows.append({"size": s, **{k: 1e3 * v["min"] for k, v in res.items()}})
    fig = out / "inverse_vs_size.png"
    _plot_size(rows, fig, N, C)
    return {"batch": N, "channels": C, "rows": rows, "figure": fig.name}


def _plot_size(rows: list[dict], path: Path, N: int, C: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (
        ("cinc sequential", "o-"),
        ("cinc wavefront", "s-"),
        ("emerging sequential", "^--"),
        ("emerging wavefront", "v--"),
        ("cinc forward", "k:"),
    ):
        ax.plot(sizes, [r[key] for r in rows], style, label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("image size H = W")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"Inverse of one 3x3 layer, batch {N}, C = {C}, float32")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
