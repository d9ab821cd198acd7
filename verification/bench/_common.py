"""Shared by the benchmark sections: the targets, interleaved timing, the machine's facts,
the GEMM rate, FLOP counting and table formatting."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import flownp.threads as threads

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


def init_model(cfg, seed: int = 0, n: int = 8):
    from flownp.model import FlowModel

    model = FlowModel(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    model.initialize((rng.random((n,) + cfg.image_shape) - 0.5).astype(cfg.dtype))
    return model
