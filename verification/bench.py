r"""The benchmark suite: ``python -m verification.bench [--quick] [--out DIR]``,
also ``flownp bench``.

Every number comes from one run on one machine and is reported with the machine, the thread
counts and the command. Times are the *minimum* over interleaved repetitions (all variants of
one comparison take turns, so a noisy neighbour slows them alike); medians are kept in
``results.json``. Ratios, not absolute times, are the targets.

Sections (each writes its part of ``DIR/report.md`` and ``DIR/results.json``):

``machine``    CPU model, cores, library versions, BLAS, thread settings; the float32 GEMM rate
               (``np.matmul`` of two 1024 x 1024 matrices), measured at the start and the end.
``layers``     per layer, batch 100, float32, the CIFAR level shapes 16x16x12, 8x8x24, 4x4x48:
               forward, backward, inverse of CInC (raster = sequential, wavefront, and the
               unblocked per-pixel baseline), Emerging (nonzero taps only), 1x1, affine and quad
               couplings. Targets 1 and 2.
``size``       inverse time against image size (8 .. 64): CInC sequential, CInC wavefront,
               Emerging (figure ``inverse_vs_size.png``).
``sampling``   the paper's Tables 3/4: seconds to sample 100 CIFAR-shaped images for Glow
               (1x1 + affine), Emerging (1x1 + emerging + affine), CInC + affine, CInC + quad at
               depth 4 and 8 (and 32 without ``--quick``); the Emerging/CInC ratio next to the
               paper's. Target 4.
``training``   images/s and model FLOP utilisation of a training step (forward, backward,
               Adam) for "cifar-d4" and the default MNIST model, with a profile. Target 3.
``threads``    training step and sampling 100 images with 1 thread and with every usable CPU,
               interleaved, for the default MNIST model, MNIST quad width 128, and CIFAR-shaped
               depth 4 and 8 with CInC, Glow (1x1) and Emerging; ``--compete`` adds the same
               with one competing CPU-bound process (started and stopped here); ``--model``
               selects models by name.
``memory``     peak memory of a training step (tracemalloc) with stored activations and with
               recomputation by the inverse, against depth; the two gradients compared.
               Target 6.
``startup``    first-run compile time on an empty Numba cache, second-run overhead. Target 5.
``torch``      flownp against the PyTorch port of the same models (training step, sampling),
               each at its best thread count (:mod:`verification.bench_torch`; skipped with a
               message where torch is not installed).

FLOP convention: a multiply-add is 2 FLOP. A training step costs 3x the forward
multiply-adds of all convolutions (forward, input gradient, weight gradient); model FLOP
utilisation (MFU) = that / step time / GEMM rate.
"""

from __future__ import annotations

# isort: off
import flownp.threads as threads  # first: sets the idle-thread defaults before NumPy loads

# isort: on
import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

F32 = np.float32
#: The CIFAR level shapes (after the squeezes of a 32x32x3 image).
LEVEL_SHAPES = [(16, 16, 12), (8, 8, 24), (4, 4, 48)]
#: Paper Table 3 (depth 4 and 8) and Table 4 (depth 32), CIFAR-10, seconds for 100 samples.
PAPER_SAMPLING = {
    4: {"emerging": 2.45, "cinc": 1.31},
    8: {"emerging": 4.94, "cinc": 2.76},
    32: {"glow (GPU)": 0.58, "emerging": 18.4, "cinc": 9.3, "cinc+quad": 10.8},
}
TARGETS = {
    "inverse_over_forward": 1.3,
    "forward_pct_gemm": 30.0,
    "backward_pct_gemm": 30.0,
    "training_mfu_pct": 40.0,
    "sampling_cinc_over_glow": 1.2,
    "first_run_s": 20.0,
    "second_run_overhead_s": 2.0,
}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved(
    cases: dict[str, tuple[Callable[[], Any] | None, Callable[[], Any]]],
    rounds: int,
    warmup: int = 1,
) -> dict[str, dict[str, float]]:
    """Time every case ``name -> (setup, fn)`` ``rounds`` times, taking turns; ``setup`` runs
    untimed before each call. Returns ``{name: {"min": s, "median": s, "n": rounds}}``."""
    for setup, fn in cases.values():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (setup, fn) in cases.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {
        k: {"min": float(np.min(v)), "median": float(np.median(v)), "n": len(v)}
        for k, v in times.items()
    }


class GemmCase:
    """A 1024 x 1024 float32 matrix product (:func:`flownp.kernels.conv_same.matmul`, the
    blocked product on flownp's threads) to interleave with other cases, so that a GEMM-relative
    figure uses the GEMM rate *of the same moments* (the load of a shared machine drifts
    during a run). :attr:`rate`: FLOP/s of the fastest call."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.random((1024, 1024), dtype=F32)
        self.b = rng.random((1024, 1024), dtype=F32)
        self.times: list[float] = []

    def case(self) -> tuple[None, Callable[[], Any]]:
        def fn():
            from flownp.kernels.conv_same import matmul

            for _ in range(3):
                t0 = time.perf_counter()
                matmul(self.a, self.b)
                self.times.append(time.perf_counter() - t0)

        return (None, fn)

    @property
    def rate(self) -> float:
        return 2 * 1024**3 / min(self.times)


def gemm_rate(rounds: int = 10) -> float:
    """float32 FLOP/s of the product of two 1024 x 1024 matrices (best of ``rounds``), with
    :func:`flownp.kernels.conv_same.matmul` on flownp's threads (BLAS itself: 1 thread)."""
    rng = np.random.default_rng(0)
    a = rng.random((1024, 1024), dtype=F32)
    b = rng.random((1024, 1024), dtype=F32)
    from flownp.kernels.conv_same import matmul

    t = interleaved({"gemm": (None, lambda: matmul(a, b))}, rounds, warmup=2)["gemm"]["min"]
    return 2 * 1024**3 / t


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import numba
    import scipy

    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(
            line.split(":", 1) for line in out.splitlines() if ":" in line and line.strip()
        )
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("Model name", cpu)
        caches = {k: fields[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in fields}
        flags = fields.get("Flags", "")
        simd = [f for f in ("avx2", "fma", "avx512f") if f in flags.split()]
    except (OSError, subprocess.SubprocessError):
        caches, simd = {}, []
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": threads.usable_cpus(),
        "caches": caches,
        "simd": simd,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "threads": threads.info(),
    }


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------


def model_forward_macs(model) -> int:
    """Multiply-adds of every convolution of one forward pass, per image.

    Every weight of a layer under ``level{l}/`` is applied once per pixel of level ``l``:
    a 4-D ``(k, k, C_in, C_out)`` weight costs ``k*k*C_in*C_out`` per pixel (CInC counts its 9
    taps, Emerging its 2 x 4 taps, the conditioners and split priors their 3x3 and 1x1
    convolutions), a 2-D ``(C, C)`` 1x1 weight (``weight``, or ``lower`` for the LU form)
    ``C*C``. Element-wise work (actnorm, couplings' affine maps, ReLU) is not counted.
    """
    shapes = model.config.level_shapes()
    total = 0
    for key, p in model.params.items():
        parts = key.split("/")
        if not parts[0].startswith("level"):
            continue
        H, W, _ = shapes[int(parts[0][5:])]
        name = parts[-1]
        if p.ndim == 4 and name in ("weight", "kernel"):
            total += H * W * int(np.prod(p.shape))
        elif p.ndim == 2 and name in ("weight", "lower"):
            # a 1x1 weight (plain or LU); not CInC's LU corner factors, which only
            # parameterise the corner tap of its 4-D weight (already counted)
            sibling = model.params.get("/".join(parts[:-1] + ["weight"]))
            if sibling is None or sibling.ndim == 2:
                total += H * W * p.shape[0] * p.shape[1]
    return int(total)


# --------------------------------------------------------------------------------------------
# Section: per-layer kernels
# --------------------------------------------------------------------------------------------


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

    y = cinc.forward(x)[0]
    cinc.clear_cache()
    L, U, perm = cinc._corner_factors()
    Kc = cinc.kernel
    cases = {
        f"cinc inverse-pixelwise-{o}": (
            None,
            lambda o=o: K_.solve_pixelwise(y, Kc, L, U, perm, order=o),
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
    from flownp.kernels.conv import solve_schedule

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


# --------------------------------------------------------------------------------------------
# Section: inverse time against image size
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Section: sampling (paper Tables 3 and 4)
# --------------------------------------------------------------------------------------------

SAMPLING_MODELS = {
    "glow (1x1 + affine)": dict(conv="1x1", coupling="affine"),
    "emerging (1x1 + emerging + affine)": dict(conv="1x1+emerging", coupling="affine"),
    "cinc + affine": dict(conv="cinc", coupling="affine"),
    "cinc + quad": dict(conv="cinc", coupling="quad"),
}


def _init_model(cfg, seed: int = 0, n: int = 8):
    from flownp.model import FlowModel

    model = FlowModel(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    model.initialize((rng.random((n,) + cfg.image_shape) - 0.5).astype(cfg.dtype))
    return model


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
            models[name] = _init_model(cfg)
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


# --------------------------------------------------------------------------------------------
# Section: training throughput
# --------------------------------------------------------------------------------------------


def training_configs(quick: bool):
    from flownp.model import FlowConfig

    if quick:
        return {
            "tiny-cifar": (FlowConfig((8, 8, 3), 2, 1, 16, "cinc", "quad", dtype="float32"), 8),
            "tiny-mnist": (FlowConfig((8, 8, 1), 2, 1, 8, dtype="float32"), 8),
        }
    return {
        # "cifar-d4": 32x32x3, L=3, D=4, width 512, cinc + quad, batch 64
        "cifar-d4": (
            FlowConfig((32, 32, 3), 3, 4, 512, "cinc", "quad", dtype="float32"),
            64,
        ),
        # the default MNIST model (FlowConfig() defaults, TrainConfig batch 64)
        "mnist-default": (FlowConfig(dtype="float32"), 64),
    }


def train_step_fn(model, x, recompute: bool = False):
    """One training step (forward, loss, backward, Adam), as :meth:`flownp.train.Trainer.train_step`
    without the bookkeeping; ``recompute=True`` uses the model's memory-saving backward
    (:class:`flownp.model.FlowModel` ``recompute``: no stored activations)."""
    from flownp.optim import Adam
    from flownp.train import bpd_loss

    opt = Adam(model.params, lr=1e-5)

    def step():
        model.zero_grad()
        model.recompute = recompute
        z, logdet = model.forward(x)
        loss, dz, dlogdet = bpd_loss(z, logdet)
        model.backward(dz, dlogdet)
        opt.step(model.grads)
        return loss

    return step


def bench_training(quick: bool) -> dict[str, Any]:
    import cProfile
    import pstats

    rows, profiles = [], {}
    for name, (cfg, batch) in training_configs(quick).items():
        model = _init_model(cfg, n=min(batch, 16))
        rng = np.random.default_rng(0)
        x = (rng.random((batch,) + cfg.image_shape) - 0.5).astype(F32)
        step = train_step_fn(model, x)
        g = GemmCase()
        rounds = 1 if quick else (3 if name == "cifar-d4" else 10)  # a cifar-d4 step: seconds
        res = interleaved({"step": (None, step), "gemm": g.case()}, rounds, warmup=1)
        res, gemm = res["step"], g.rate
        macs = model_forward_macs(model) * batch
        flops = 2 * 3 * macs
        t = res["min"]
        rows.append(
            {
                "model": name,
                "config": cfg.to_dict(),
                "batch": batch,
                "step_s": t,
                "median_step_s": res["median"],
                "images/s": batch / t,
                "train GFLOP/step": flops / 1e9,
                "GFLOP/s": flops / t / 1e9,
                "GEMM GFLOP/s (interleaved)": gemm / 1e9,
                "MFU %": 100 * flops / t / gemm,
            }
        )
        prof = cProfile.Profile()
        prof.enable()
        step()
        prof.disable()
        st = pstats.Stats(prof)
        total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
        profiles[name] = [
            {
                "function": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})",
                "calls": v[1],
                "self_s": v[2],
                "self_%": 100 * v[2] / total,
            }
            for fn, v in top
        ]
    thread_rows = _training_thread_counts(quick)
    main = rows[0]
    checks = [
        {
            "target": f"3: training MFU, {main['model']}",
            "value": main["MFU %"],
            "limit": f">= {TARGETS['training_mfu_pct']}",
            "met": main["MFU %"] >= TARGETS["training_mfu_pct"],
        }
    ]
    return {"rows": rows, "profiles": profiles, "thread_rows": thread_rows, "checks": checks}


def _training_thread_counts(quick: bool) -> list[dict[str, Any]]:
    """Step time of the MNIST model with 1 thread and with every usable CPU (both pools),
    interleaved in this process: the measurement behind the thread defaults."""
    name = "tiny-mnist" if quick else "mnist-default"
    cfg, batch = training_configs(quick)[name]
    model = _init_model(cfg, n=min(batch, 16))
    x = (np.random.default_rng(0).random((batch,) + cfg.image_shape) - 0.5).astype(F32)
    step = train_step_fn(model, x)
    n_all = threads.get_threads()

    def one_thread():
        with threads.limit(1):
            step()

    res = interleaved(
        {"1": (None, one_thread), str(n_all): (None, step)}, 2 if quick else 7, warmup=1
    )
    return [
        {
            "model": name,
            "threads": int(k),
            "step_s": v["min"],
            "median_step_s": v["median"],
            "images/s": batch / v["min"],
        }
        for k, v in res.items()
    ]


# --------------------------------------------------------------------------------------------
# Section: threads (1 thread against all, idle and with a competing process)
# --------------------------------------------------------------------------------------------

#: The competing CPU-bound process of ``--compete`` (one busy Python loop, not pinned).
COMPETITOR = [sys.executable, "-c", "while True: pass"]


def thread_models(quick: bool):
    """``name -> (FlowConfig, batch)``: the models of the thread comparison."""
    from flownp.model import FlowConfig

    if quick:
        return {
            "tiny-mnist": (FlowConfig((8, 8, 1), 2, 1, 8, dtype="float32"), 8),
            "tiny-cifar cinc": (FlowConfig((8, 8, 3), 2, 1, 16, dtype="float32"), 8),
        }
    models = {
        "mnist default": (FlowConfig(dtype="float32"), 64),
        "mnist quad w128": (FlowConfig(width=128, coupling="quad", dtype="float32"), 64),
    }
    for D in (4, 8):
        for name, conv in (("cinc", "cinc"), ("glow", "1x1"), ("emerging", "1x1+emerging")):
            cfg = FlowConfig((32, 32, 3), 3, D, 512, conv, "affine", dtype="float32")
            models[f"cifar d{D} {name}"] = (cfg, 64)
    return models


class Competitor:
    """Context manager: one competing CPU-bound process (:data:`COMPETITOR`) while inside;
    terminated (and waited for) on exit, also on errors."""

    def __enter__(self) -> Competitor:
        self.proc = subprocess.Popen(COMPETITOR)
        time.sleep(0.2)  # let it start spinning
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _thread_cases(model, x, n_sample: int, n_all: int):
    step = train_step_fn(model, x)

    def sample():
        model.sample(n_sample, temperature=0.7, seed=1)

    cases = {}
    for op, fn in (("step", step), (f"sample {n_sample}", sample)):
        for n in (1, n_all):

            def run(fn=fn, n=n):
                with threads.limit(n):
                    fn()

            cases[(op, n)] = (None, run)
    return cases


def bench_threads(
    quick: bool, compete: bool = False, only: list[str] | None = None
) -> dict[str, Any]:
    """Training step and sampling with 1 thread and with every usable CPU, interleaved;
    without and (``compete``) with one competing CPU-bound process. ``only``: run the models
    whose name contains one of these strings."""
    n_all = threads.usable_cpus()
    n_sample = 8 if quick else 100
    conditions = ["idle"] + (["competing process"] if compete else [])
    rows, checks = [], []
    for name, (cfg, batch) in thread_models(quick).items():
        if only and not any(o in name for o in only):
            continue
        model = _init_model(cfg, n=min(batch, 16))
        x = (np.random.default_rng(0).random((batch,) + cfg.image_shape) - 0.5).astype(F32)
        cases = _thread_cases(model, x, n_sample, n_all)
        rounds = 1 if quick else (3 if name.startswith("cifar") else 7)
        for cond in conditions:
            ctx = Competitor() if cond != "idle" else contextlib.nullcontext()
            with ctx:
                res = interleaved(cases, rounds, warmup=1)
            print(f"[bench] threads: {name}, {cond} done", flush=True)
            for op in dict.fromkeys(k[0] for k in cases):
                t1, tn = res[(op, 1)]["median"], res[(op, n_all)]["median"]
                rows.append(
                    {
                        "model": name,
                        "op": op,
                        "machine": cond,
                        "1 thread s": t1,
                        f"{n_all} threads s": tn,
                        f"{n_all} / 1": tn / t1,
                        "speed-up": t1 / tn,
                        "rounds": rounds,
                    }
                )
                checks.append(
                    {
                        "target": f"threads: {name}, {op}, {cond}: {n_all} threads / 1 thread",
                        "value": tn / t1,
                        "limit": "<= 1.05",
                        "met": tn / t1 <= 1.05,
                    }
                )
                if name == "cifar d4 cinc" and op == "step" and cond == "idle":
                    checks.append(
                        {
                            "target": f"threads: cifar d4 cinc step, idle: speed-up of {n_all}",
                            "value": t1 / tn,
                            "limit": ">= 1.6",
                            "met": t1 / tn >= 1.6,
                        }
                    )
    return {
        "threads": n_all,
        "competitor": " ".join(["python3", "-c", repr("while True: pass")]) if compete else None,
        "rows": rows,
        "checks": checks,
    }


# --------------------------------------------------------------------------------------------
# Section: memory (stored activations vs recomputation by the inverse)
# --------------------------------------------------------------------------------------------


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def _memory_row(base, D: int, batch: int) -> dict[str, Any]:
    """Peak memory and time of one training step at depth ``D``, both backward paths."""
    from flownp.model import FlowConfig

    cfg = FlowConfig(**{**base.to_dict(), "depth": D, "image_shape": base.image_shape})
    model = _init_model(cfg, n=8)
    xb = (np.random.default_rng(1).random((batch,) + cfg.image_shape) - 0.5).astype(F32)
    stored = train_step_fn(model, xb)
    recompute = train_step_fn(model, xb, recompute=True)
    stored()  # warm up (compilation, Adam state)
    t0 = time.perf_counter()
    recompute()
    t_re = time.perf_counter() - t0
    t0 = time.perf_counter()
    stored()
    t_st = time.perf_counter() - t0
    return {
        "depth": D,
        "batch": batch,
        "stored MB": _peak_bytes(stored) / 2**20,
        "recompute MB": _peak_bytes(recompute) / 2**20,
        "stored step s": t_st,
        "recompute step s": t_re,
    }


def bench_memory(quick: bool) -> dict[str, Any]:
    from flownp.model import FlowConfig
    from flownp.train import bpd_loss

    # gradients of the two paths, float64 (equal up to the round-off of the inverses)
    cfg64 = FlowConfig((8, 8, 3), 2, 2, 16, "cinc", "quad", dtype="float64")
    m = _init_model(cfg64, n=8)
    rng = np.random.default_rng(0)
    for p in m.params.values():  # leave the zero-initialised identity
        p += 0.01 * rng.standard_normal(p.shape)
    x = rng.random((4,) + cfg64.image_shape) - 0.5
    grads, losses = [], []
    for recompute in (False, True):
        m.zero_grad()
        m.recompute = recompute
        z, ld = m.forward(x)
        loss, dz, dld = bpd_loss(z, ld)
        m.backward(dz, dld)
        grads.append({k: v.copy() for k, v in m.grads.items()})
        losses.append(loss)
    (ga, gb), (loss_a, loss_b) = grads, losses
    scale = max(float(np.abs(v).max()) for v in ga.values())
    grad_diff = max(float(np.abs(ga[k] - gb[k]).max()) for k in ga) / scale
    check = {
        "target": "6: recompute-path gradients = stored-activation gradients (float64)",
        "value": grad_diff,
        "limit": "<= 1e-10 (max |difference| / max |gradient|)",
        "met": grad_diff <= 1e-10 and abs(loss_a - loss_b) <= 1e-12 * abs(loss_a),
    }

    if quick:
        base = FlowConfig((8, 8, 3), 2, 1, 16, "cinc", "quad", dtype="float32")
        batch, depths = 8, [1, 2]
    else:
        base = FlowConfig((32, 32, 3), 3, 1, 512, "cinc", "quad", dtype="float32")
        batch, depths = 64, [1, 2, 4]
    rows = [_memory_row(base, D, batch) for D in depths]
    try:
        import resource

        maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # not POSIX
        maxrss_mb = float("nan")
    return {
        "config": base.to_dict(),
        "rows": rows,
        "grad_rel_diff": grad_diff,
        "loss_stored": loss_a,
        "loss_recompute": loss_b,
        "process_maxrss_MB": maxrss_mb,
        "checks": [check],
    }


# --------------------------------------------------------------------------------------------
# Section: start-up (compile time on an empty Numba cache)
# --------------------------------------------------------------------------------------------

_STARTUP_SCRIPT = r"""
import time
t0 = time.perf_counter()
import flownp.threads
import numpy as np
from flownp.model import FlowConfig, FlowModel
from verification.bench import train_step_fn
t_import = time.perf_counter() - t0

def work():
    # what `flownp train` (default MNIST model) then `flownp sample` run: init, steps, sample
    cfg = FlowConfig(image_shape=(8, 8, 1), levels=2, depth=1, width=8, dtype="float32")
    m = FlowModel(cfg, seed=0)
    x = (np.random.default_rng(0).random((4, 8, 8, 1)) - 0.5).astype(np.float32)
    m.initialize(x)
    step = train_step_fn(m, x)
    step()
    m.sample(2)

t1 = time.perf_counter(); work(); first = time.perf_counter() - t1
t1 = time.perf_counter(); work(); again = time.perf_counter() - t1
print(f"{t_import} {first} {again}")
"""


def bench_startup(quick: bool) -> dict[str, Any]:
    if quick:
        return {"skipped": "needs two fresh processes with an empty Numba cache (full run only)"}
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env["NUMBA_CACHE_DIR"] = cache
        for run in ("first run (empty cache)", "second run (cache filled)"):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _STARTUP_SCRIPT],
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            wall = time.perf_counter() - t0
            if out.returncode != 0:
                return {"error": out.stderr[-2000:]}
            t_import, first, again = map(float, out.stdout.split()[-3:])
            rows.append(
                {
                    "run": run,
                    "process wall s": wall,
                    "import s": t_import,
                    "workload first call s": first,
                    "workload again s": again,
                    "compile/load overhead s": first - again,
                }
            )
    checks = [
        {
            "target": "5: first run on an empty cache (whole process, compilation included)",
            "value": rows[0]["process wall s"],
            "limit": f"<= {TARGETS['first_run_s']} s",
            "met": rows[0]["process wall s"] <= TARGETS["first_run_s"],
        },
        {
            "target": "5: second run overhead (import + cache load)",
            "value": rows[1]["compile/load overhead s"] + rows[1]["import s"],
            "limit": f"<= {TARGETS['second_run_overhead_s']} s",
            "met": rows[1]["compile/load overhead s"] + rows[1]["import s"]
            <= TARGETS["second_run_overhead_s"],
        },
    ]
    return {"rows": rows, "checks": checks}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "**no**"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def md_table(rows: list[dict], keys: list[str] | None = None) -> list[str]:
    if not rows:
        return []
    keys = keys or list(dict.fromkeys(k for r in rows for k in r if k != "config"))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    return out


def render_report(res: dict[str, Any]) -> str:
    m = res["machine"]
    L = [
        "# flownp benchmark report",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']}, total {res['total_s']:.0f} s",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}; {m['logical_cpus']} logical CPUs, {m['usable_cpus']} usable; "
        f"SIMD {', '.join(m['simd'])}; caches {m['caches']}",
        f"- Python {m['python']}, NumPy {m['numpy']}, SciPy {m['scipy']}, Numba {m['numba']}",
        f"- Threads: flownp {m['threads']['flownp_threads']} (`flownp.threads`); Numba "
        f"{m['threads']['numba_threads']} ({m['threads']['numba_threading_layer']}, used only "
        "by the wavefront inverse); BLAS "
        + "; ".join(
            f"{b['library']} {b['version']} ({b['architecture']}, {b['num_threads']} threads)"
            for b in m["threads"]["blas"]
        ),
        f"- Environment: {m['threads']['env']}",
        f"- float32 GEMM (1024^2 matmul): {res['gemm_start'] / 1e9:.1f} GFLOP/s at the start, "
        f"{res['gemm_end'] / 1e9:.1f} at the end. The GEMM-relative figures (% GEMM, MFU) "
        "use the rate measured *interleaved* with the timed work (column "
        "`GEMM GFLOP/s (interleaved)`), not these two: the load of a shared machine drifts.",
        "- Load (1-minute load average, all processes, before the run and after each "
        "section): "
        + ", ".join(
            [f"start {res['loadavg_1min_start']:.2f}"]
            + [f"{k} {v['loadavg_1min_after']:.2f}" for k, v in res["sections"].items()]
        )
        + f" on {m['usable_cpus']} CPUs.",
        "",
        "## Targets",
        "",
    ]
    checks = [c for s in res["sections"].values() for c in s.get("checks", [])]
    L += md_table(checks, ["target", "value", "limit", "met"])
    sec = res["sections"]
    if "layers" in sec:
        s = sec["layers"]
        L += [
            "",
            f"## Per layer (batch {s['batch']}, float32, coupling width {s['coupling_width']})",
            "",
            "Minimum over interleaved repetitions. CInC GFLOP/s count one dense 3x3 C->C "
            "convolution (2 N H W 9 C^2) per forward or inverse, twice that per backward.",
            "",
        ]
        L += md_table(s["rows"])
    if "size" in sec:
        s = sec["size"]
        L += [
            "",
            f"## Inverse time against image size (batch {s['batch']}, C = {s['channels']}, ms)",
            "",
            f"![inverse vs size]({s['figure']})",
            "",
        ]
        L += md_table(s["rows"])
    if "sampling" in sec:
        s = sec["sampling"]
        L += [
            "",
            f"## Sampling {s['images']} images (seconds), image {s['image_shape']}, "
            f"L = {s['levels']}, width {s['width']}, float32",
            "",
            "`[conv inverses]`: the part spent in the invertible convolutions' inverses.",
            "",
        ]
        L += md_table(s["rows"])
    if "training" in sec:
        s = sec["training"]
        L += ["", "## Training throughput", ""]
        L += md_table(s["rows"])
        if s.get("thread_rows"):
            L += ["", "Thread counts (interleaved in this run):", ""]
            L += md_table(s["thread_rows"])
        for name, prof in s["profiles"].items():
            L += ["", f"Profile of one step of {name} (self time, top 12):", ""]
            L += md_table(prof)
    if "threads" in sec:
        s = sec["threads"]
        L += [
            "",
            f"## 1 thread against {s['threads']} (medians of interleaved rounds, seconds)",
            "",
            "Training step (forward, loss, backward, Adam; batch 64, float32) and sampling. "
            + (
                f"Competing process: `{s['competitor']}` (not pinned), started before and "
                "stopped after each model's rounds."
                if s["competitor"]
                else "No competing process started (run with `--compete` for that table)."
            ),
            "",
        ]
        L += md_table(s["rows"])
    if "memory" in sec:
        s = sec["memory"]
        L += [
            "",
            "## Memory of a training step (tracemalloc peak of NumPy allocations)",
            "",
            "A step is forward, loss, backward and Adam; *recompute* rebuilds every node's "
            "input from its output with `inverse` instead of storing activations.",
            "",
            f"Gradients, recompute vs stored (float64): max |diff| / max |g| = "
            f"{s['grad_rel_diff']:.2e}; losses {s['loss_stored']!r} vs {s['loss_recompute']!r}. "
            f"Process max RSS {s['process_maxrss_MB']:.0f} MB.",
            "",
        ]
        L += md_table(s["rows"])
    if "startup" in sec:
        s = sec["startup"]
        L += ["", "## Start-up", ""]
        if "rows" in s:
            L += md_table(s["rows"])
        else:
            L += [str(s)]
    if "torch" in sec:
        from verification.bench_torch import render

        L += render(sec["torch"])
    return "\n".join(L) + "\n"


SECTION_NAMES = ("layers", "size", "sampling", "training", "threads", "memory", "startup", "torch")


def run_bench(
    out: str | os.PathLike,
    quick: bool = False,
    sections=None,
    n_threads: int | None = None,
    compete: bool = False,
    models: list[str] | None = None,
) -> dict[str, Any]:
    """Run the suite, write ``out/report.md``, ``out/results.json`` and the figure; return
    the results. ``sections``: a subset of :data:`SECTION_NAMES` (default all)."""
    t_start = time.perf_counter()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    threads.configure(n_threads)
    sections = list(sections or SECTION_NAMES)
    unknown = sorted(set(sections) - set(SECTION_NAMES))
    if unknown:
        raise ValueError(f"bench: unknown section(s) {unknown}; choose from {SECTION_NAMES}")
    res: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "sections": {},
    }
    res["loadavg_1min_start"] = _loadavg()
    res["gemm_start"] = gemm_rate()
    res["gemm"] = res["gemm_start"]
    for name in sections:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        if name == "layers":
            r = bench_layers(quick)
        elif name == "size":
            r = bench_size(quick, outdir)
        elif name == "sampling":
            r = bench_sampling(quick)
        elif name == "training":
            r = bench_training(quick)
        elif name == "threads":
            r = bench_threads(quick, compete, models)
        elif name == "memory":
            r = bench_memory(quick)
        elif name == "torch":
            from verification.bench_torch import bench_torch

            r = bench_torch(quick)
        else:
            r = bench_startup(quick)
        r["section_s"] = time.perf_counter() - t0
        r["loadavg_1min_after"] = _loadavg()
        res["sections"][name] = r
        print(f"[bench] {name} done in {r['section_s']:.1f} s", flush=True)
    res["gemm_end"] = gemm_rate()
    res["gemm"] = max(res["gemm_start"], res["gemm_end"])
    res["machine"] = machine_info()
    res["total_s"] = time.perf_counter() - t_start
    (outdir / "results.json").write_text(json.dumps(res, indent=1, default=_json_default))
    (outdir / "report.md").write_text(render_report(res))
    return res


def _loadavg() -> float:
    """1-minute load average (other processes competing for the cores), NaN if unknown."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return float("nan")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    parser.add_argument("--out", default="bench-out", help="output folder")
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTION_NAMES,
        help="run only this section (repeatable; default all)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of flownp (default: usable CPUs)"
    )
    parser.add_argument(
        "--compete",
        action="store_true",
        help="threads section: also measure while one competing CPU-bound process runs "
        "(started and stopped by the benchmark)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="threads section: only the models whose name contains this (repeatable), "
        "e.g. 'mnist', 'cifar d4'",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verification.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    res = run_bench(
        args.out,
        quick=args.quick,
        sections=args.section,
        n_threads=args.threads,
        compete=args.compete,
        models=args.model,
    )
    checks = [c for s in res["sections"].values() for c in s.get("checks", [])]
    for c in checks:
        print(f"{'MET ' if c['met'] else 'MISS'} {c['target']}: {_fmt(c['value'])} ({c['limit']})")
    print(f"[bench] report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
