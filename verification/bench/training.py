"""Benchmark section ``training``: images/s and model FLOP utilisation of a training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import flownp.threads as threads
from verification.bench._common import (
    F32,
    TARGETS,
    GemmCase,
    init_model,
    interleaved,
    model_forward_macs,
)


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
        # MNIST, L=2, D=4, width 64, CInC lu + affine (the default at half depth), batch 64
        "mnist-d4": (FlowConfig(depth=4, dtype="float32"), 64),
    }


def train_step_fn(model, x, recompute: bool = False):
    """One training step (forward, loss, backward, Adam), as :meth:`flownp.train.Trainer.train_step`
    without the bookkeeping; ``recompute=True`` uses the model's memory-saving backward
    (:class:`flownp.model.FlowModel` ``recompute``: no stored activations)."""
    from flownp.model import bpd_loss
    from flownp.optim import Adam

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
        model = init_model(cfg, n=min(batch, 16))
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
    name = "tiny-mnist" if quick else "mnist-d4"
    cfg, batch = training_configs(quick)[name]
    model = init_model(cfg, n=min(batch, 16))
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
