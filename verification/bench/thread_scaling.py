"""Benchmark section ``threads``: 1 thread against all usable CPUs, idle and with a
competing process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from typing import Any

import numpy as np

import flownp.threads as threads
from verification.bench._common import (
    F32,
    init_model,
    interleaved,
)
from verification.bench.training import train_step_fn

#: Models whose idle training step must gain at least 1.6x from all threads over one.
SPEEDUP_MODELS = ("cifar d4 cinc", "mnist default")
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
        "mnist D=4": (FlowConfig(depth=4, dtype="float32"), 64),
        "mnist D=8 quad w128": (
            FlowConfig(depth=8, width=128, coupling="quad", dtype="float32"),
            64,
        ),
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
        model = init_model(cfg, n=min(batch, 16))
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
                if name in SPEEDUP_MODELS and op == "step" and cond == "idle":
                    checks.append(
                        {
                            "target": f"threads: {name} step, idle: speed-up of {n_all}",
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
