"""Benchmark section ``sampling``: seconds to sample 100 images, the paper's Tables 3 and 4."""

from __future__ import annotations

from typing import Any

import numpy as np

from verification.bench._common import (
    PAPER_SAMPLING,
    TARGETS,
    init_model,
    interleaved,
)

SAMPLING_MODELS = {
    "glow (1x1 + affine)": dict(conv="1x1", coupling="affine"),
    "emerging (1x1 + emerging + affine)": dict(conv="1x1+emerging", coupling="affine"),
    "cinc + affine": dict(conv="cinc", coupling="affine"),
    "cinc + quad": dict(conv="cinc", coupling="quad"),
}


def _conv_inverse_time(model, n: int, rounds: int) -> float:
    """Seconds spent in the invertible convolutions' inverses when sampling ``n`` images
    (each conv layer inverted on an input of its shape, summed)."""
    total = 0.0
    rng = np.random.default_rng(0)
    shapes = model.config.level_shapes()
    for path, node in model.flow:
        if not path.split("/")[-1].startswith("step"):
            continue
        H, W, C = shapes[int(path.split("/")[0][5:])]
        y = rng.standard_normal((n, H, W, C)).astype(model.dtype)
        convs = [lay for name, lay in node._layers.items() if name.startswith("conv")]
        cases = {str(i): (None, lambda c=c, y=y: c.inverse(y)) for i, c in enumerate(convs)}
        total += sum(r["min"] for r in interleaved(cases, rounds, warmup=0).values())
    return total


def bench_sampling(quick: bool) -> dict[str, Any]:
    from flownp.model import FlowConfig

    depths = [1] if quick else [4, 8, 32]
    image = (8, 8, 3) if quick else (32, 32, 3)
    levels = 2 if quick else 3
    width = 16 if quick else 512
    n = 8 if quick else 100
    rows = []
    for D in depths:
        rounds = 1 if (quick or D >= 32) else 3
        models = {}
        for name, kw in SAMPLING_MODELS.items():
            cfg = FlowConfig(
                image_shape=image, levels=levels, depth=D, width=width, dtype="float32", **kw
            )
            models[name] = init_model(cfg)
        cases = {
            name: (None, lambda m=m: m.sample(n, temperature=0.7, seed=1))
            for name, m in models.items()
        }
        res = interleaved(cases, rounds, warmup=0 if D >= 32 else 1)  # D=32: compiled by then
        conv_t = {name: _conv_inverse_time(m, n, rounds) for name, m in models.items()}
        row: dict[str, Any] = {"depth": D}
        for name in models:
            row[name] = res[name]["min"]
            row[f"{name} [conv inverses]"] = conv_t[name]
        g = row["glow (1x1 + affine)"]
        e = row["emerging (1x1 + emerging + affine)"]
        c = row["cinc + affine"]
        row["emerging / cinc"] = e / c
        row["emerging / cinc, conv inverses only"] = (
            conv_t["emerging (1x1 + emerging + affine)"] / conv_t["cinc + affine"]
        )
        row["cinc / glow"] = c / g
        paper = PAPER_SAMPLING.get(D)
        if paper:
            row["paper emerging / cinc"] = paper["emerging"] / paper["cinc"]
        rows.append(row)
    checks = [
        {
            "target": f"4: sampling cinc+affine / 1x1+affine, depth {r['depth']}",
            "value": r["cinc / glow"],
            "limit": f"<= {TARGETS['sampling_cinc_over_glow']}",
            "met": r["cinc / glow"] <= TARGETS["sampling_cinc_over_glow"],
        }
        for r in rows
    ]
    return {
        "images": n,
        "image_shape": image,
        "levels": levels,
        "width": width,
        "rows": rows,
        "checks": checks,
    }
