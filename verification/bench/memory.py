"""Benchmark section ``memory``: peak memory with stored activations and with
recomputation by the inverse."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from verification.bench._common import (
    F32,
    init_model,
)
from verification.bench.training import train_step_fn


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
    model = init_model(cfg, n=8)
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
    from flownp.model import FlowConfig, bpd_loss

    # gradients of the two paths, float64 (equal up to the round-off of the inverses)
    cfg64 = FlowConfig((8, 8, 3), 2, 2, 16, "cinc", "quad", dtype="float64")
    m = init_model(cfg64, n=8)
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
        "limit": "<= 1e-10 (max abs difference / max abs gradient)",
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
