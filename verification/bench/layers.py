"""Benchmark section ``layers``: per layer, batch 100, float32, at the CIFAR level shapes:
forward, backward and inverse of CInC, Emerging, 1x1, affine and quad couplings."""

from __future__ import annotations

from typing import Any

import numpy as np

from verification.bench._common import (
    F32,
    LEVEL_SHAPES,
    TARGETS,
    GemmCase,
    interleaved,
)


def _layer_cases(layer, x, methods=None):
    """(setup, fn) cases forward / backward / inverse[-method] for one layer and input."""
    rng = np.random.default_rng(1)
    y, ld = layer.forward(x)
    layer.clear_cache()
    dy = rng.standard_normal(y.shape).astype(x.dtype)
    dld = rng.standard_normal(x.shape[0]).astype(x.dtype)

    def fwd():
        layer.forward(x)
        layer.clear_cache()

    cases = {
        "forward": (None, fwd),
        "backward": (lambda: layer.forward(x), lambda: layer.backward(dy, dld)),
    }
    if methods is None:
        cases["inverse"] = (None, lambda: layer.inverse(y))
    else:
        for m in methods:
            cases[f"inverse-{m}"] = (None, lambda m=m: layer.inverse(y, method=m))
    return cases


def _cinc_kernel_cases(cinc, x):
    """Cases of the bare kernels behind a CInC layer, and the unblocked per-pixel solver."""
    from flownp.kernels import conv as K_
    from flownp.kernels import solve as solve_kernels

    y = cinc.forward(x)[0]
    cinc.clear_cache()
    L, U, perm = cinc._corner_factors()
    Kc = cinc.kernel
    cases = {
        f"cinc inverse-pixelwise-{o}": (
            None,
            lambda o=o: solve_kernels.solve_pixelwise(y, Kc, L, U, perm, order=o),
        )
        for o in ("raster", "wavefront")
    }
    cases["cinc kernel: conv_forward"] = (None, lambda: K_.conv_forward(x, Kc))
    cases["cinc kernel: conv_backward_input"] = (None, lambda: K_.conv_backward_input(y, Kc))
    cases["cinc kernel: conv_backward_kernel"] = (
        None,
        lambda: K_.conv_backward_kernel(x, y, 3),
    )
    return cases


def _bench_layers_shape(shape, N, width, rounds, rounds_coupling, rng):
    """Rows and target checks of one level shape (H, W, C)."""
    from flownp.layers.cinc import CInCConv
    from flownp.layers.conv1x1 import Conv1x1
    from flownp.layers.coupling import AffineCoupling, QuadCoupling
    from flownp.layers.emerging import EmergingConv
    from flownp.testing import randomize_params

    H, W, C = shape
    x = rng.standard_normal((N, H, W, C)).astype(F32)
    flops = 2 * N * H * W * 9 * C * C  # one dense 3x3 C->C convolution
    layers = {
        "cinc": CInCConv(C, 3, dtype=F32, seed=1),
        "emerging": EmergingConv(C, 3, dtype=F32, seed=2),
        "1x1": Conv1x1(C, dtype=F32, seed=3),
        "affine": AffineCoupling(C, width, dtype=F32, seed=4),
        "quad": QuadCoupling(C, width, dtype=F32, seed=5),
    }
    for lay in layers.values():  # initialise actnorms, then move off the identity
        lay.forward(x)
        lay.clear_cache()
        randomize_params(lay, np.random.default_rng(6), scale=0.02)
    cinc = layers["cinc"]
    methods = ["auto", "raster", "wavefront"]
    cases = {f"cinc {k}": v for k, v in _layer_cases(cinc, x, methods).items()}
    cases.update(_cinc_kernel_cases(cinc, x))
    for name in ("emerging", "1x1"):
        meth = methods if name == "emerging" else None
        cases.update({f"{name} {k}": v for k, v in _layer_cases(layers[name], x, meth).items()})
    g = GemmCase()
    cases["gemm"] = g.case()
    res = interleaved(cases, rounds)
    del res["gemm"]
    gemm = g.rate  # measured between the CInC cases
    for name in ("affine", "quad"):
        res.update(
            interleaved(
                {f"{name} {k}": v for k, v in _layer_cases(layers[name], x).items()},
                rounds_coupling,
            )
        )
    rows, checks = [], []
    t_fwd = res["cinc forward"]["min"]
    for name, r in res.items():
        layer, op = name.split(" ", 1)
        row = {
            "shape": f"{H}x{W}x{C}",
            "layer": layer,
            "op": op,
            "ms": 1e3 * r["min"],
            "median_ms": 1e3 * r["median"],
        }
        if layer == "cinc":
            f = 2 * flops if op == "backward" else flops
            row["GFLOP/s"] = f / r["min"] / 1e9
            row["% GEMM"] = 100 * f / r["min"] / gemm
            row["/ cinc fwd"] = r["min"] / t_fwd
        rows.append(row)
    from flownp.kernels.solve import solve_schedule

    ratio = res["cinc inverse-auto"]["min"] / t_fwd  # the layer's default solver
    checks.append(
        {
            "target": f"1: CInC inverse (auto = {solve_schedule(N)}) / forward, {H}x{W}x{C}",
            "value": ratio,
            "limit": f"<= {TARGETS['inverse_over_forward']}",
            "met": ratio <= TARGETS["inverse_over_forward"],
        }
    )
    t_bwd = res["cinc backward"]["min"]
    for what, t, f in (("forward", t_fwd, flops), ("backward", t_bwd, 2 * flops)):
        pct = 100 * f / t / gemm
        checks.append(
            {
                "target": f"2: CInC {what} % of GEMM rate, {H}x{W}x{C}",
                "value": pct,
                "limit": f">= {TARGETS['forward_pct_gemm']}",
                "met": pct >= TARGETS["forward_pct_gemm"],
            }
        )
    for row in rows:
        if row["layer"] == "cinc":
            row["GEMM GFLOP/s (interleaved)"] = gemm / 1e9
    return rows, checks


def bench_layers(quick: bool) -> dict[str, Any]:
    N = 8 if quick else 100
    shapes = [(8, 8, 12)] if quick else LEVEL_SHAPES
    width = 16 if quick else 512
    rows, checks = [], []
    rng = np.random.default_rng(0)
    for shape in shapes:
        r, c = _bench_layers_shape(shape, N, width, 3 if quick else 15, 2 if quick else 3, rng)
        rows += r
        checks += c
    return {"batch": N, "coupling_width": width, "rows": rows, "checks": checks}
