r"""``flownp bench --section torch``: flownp against the PyTorch port of the same models.

For every model of :data:`MODELS` (float32), a training step (forward, bits/dim loss,
backward, Adam; batch 64) and sampling 100 images (temperature 0.7) are timed for flownp
(NumPy + Numba, threads set by :func:`flownp.threads.limit`) and for the PyTorch port
(:mod:`verification.torch_port`, eager mode, ``torch.optim.Adam``, threads set by
``torch.set_num_threads``), each with 1 and with 2 threads. The four variants of a model take
turns, round after round, so a noisy neighbour slows them alike; the table reports medians,
each side at its own best thread count, and the speed ratio ``PyTorch time / flownp time``
(above 1: flownp is faster). Both sides run the same weights: the PyTorch model is loaded from
the flownp model's parameters, and its first loss is checked against flownp's.

Runs only where ``torch`` is importable (an optional extra); otherwise the section reports
that and returns.
"""

from __future__ import annotations

# isort: off
import flownp.threads as threads  # first: sets the idle-thread defaults before NumPy loads

# isort: on
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from flownp.model import FlowConfig  # noqa: E402

TARGET_RATIO = 1.5
BATCH = 64
N_SAMPLES = 100
TEMPERATURE = 0.7
THREAD_COUNTS = (1, 2)

#: name -> configuration (the benchmark models; CIFAR = 32x32x3, L = 3, width 512)
MODELS: dict[str, FlowConfig] = {
    "mnist default (L=2, D=8, w64, CInC lu + affine)": FlowConfig(dtype="float32"),
    "mnist D=4 (L=2, w64, CInC lu + affine)": FlowConfig(depth=4, dtype="float32"),
    "mnist D=8 w128, CInC + quad": FlowConfig(depth=8, width=128, coupling="quad", dtype="float32"),
    "cifar D=4, CInC + quad": FlowConfig((32, 32, 3), 3, 4, 512, "cinc", "quad", dtype="float32"),
    "cifar D=8, CInC + quad": FlowConfig((32, 32, 3), 3, 8, 512, "cinc", "quad", dtype="float32"),
    "cifar D=4, Glow (1x1 + affine)": FlowConfig(
        (32, 32, 3), 3, 4, 512, "1x1", "affine", dtype="float32"
    ),
    "cifar D=4, Emerging (1x1 + emerging + affine)": FlowConfig(
        (32, 32, 3), 3, 4, 512, "1x1+emerging", "affine", dtype="float32"
    ),
}

QUICK_MODELS: dict[str, FlowConfig] = {
    "tiny cinc + quad": FlowConfig((8, 8, 1), 2, 1, 8, "cinc", "quad", dtype="float32"),
    "tiny emerging": FlowConfig((8, 8, 3), 2, 1, 8, "1x1+emerging", "affine", dtype="float32"),
}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _uptime() -> str:
    """The load averages (1, 5, 15 min) as ``uptime`` prints them."""
    try:
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "load average unknown"


def _flownp_cases(model, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    from verification.bench.training import train_step_fn

    step = train_step_fn(model, x)

    def sample():
        return model.sample(N_SAMPLES, temperature=TEMPERATURE, seed=1)

    return {"train": step, "sample": sample}


def _torch_cases(tmodel, x: np.ndarray) -> dict[str, Callable[[], Any]]:
    import torch

    from verification.torch_port import bpd_loss, nchw

    xt = nchw(x).to(tmodel.dtype)
    opt = torch.optim.Adam(tmodel.parameters(), lr=1e-5, foreach=True)
    gen = torch.Generator().manual_seed(1)

    def step():
        opt.zero_grad(set_to_none=True)
        z, logdet = tmodel(xt)
        loss, _ = bpd_loss(z, logdet)
        loss.backward()
        opt.step()
        return loss

    def sample():
        return tmodel.sample(N_SAMPLES, TEMPERATURE, generator=gen)

    return {"train": step, "sample": sample}


def _with_threads(side: str, n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    if side == "torch":

        def run():
            torch.set_num_threads(n)
            return fn()

        return run

    def run_flownp():
        with threads.limit(n):
            return fn()

    return run_flownp


def _first_loss_check(model, tmodel, x: np.ndarray) -> float:
    """|flownp loss - PyTorch loss| on the benchmark batch (the two run the same function)."""
    import torch

    from flownp.model import bpd_loss as np_bpd_loss
    from verification.torch_port import bpd_loss, nchw

    z, logdet = model.forward(x)
    model.clear_cache()
    loss = np_bpd_loss(z, logdet)[0]
    with torch.no_grad():
        tz, tld = tmodel(nchw(x).to(tmodel.dtype))
    return abs(float(loss) - float(bpd_loss(tz, tld)[0]))


def _profile_torch(tmodel, x: np.ndarray, n_threads: int) -> list[dict[str, Any]]:
    """Top operators of one PyTorch training step (self CPU time)."""
    import torch

    case = _torch_cases(tmodel, x)["train"]
    torch.set_num_threads(n_threads)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        case()
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for e in events:
        rows.append(
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": e.self_cpu_time_total / 1e3,
                "self_%": 100 * e.self_cpu_time_total / total,
            }
        )
    return rows


def _profile_flownp(model, x: np.ndarray, n_threads: int) -> list[dict[str, Any]]:
    """Top functions of one flownp training step (cProfile self time; a Numba kernel is
    one function)."""
    import cProfile
    import pstats
    from pathlib import Path

    case = _flownp_cases(model, x)["train"]
    prof = cProfile.Profile()
    with threads.limit(n_threads):
        prof.enable()
        case()
        prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:8]  # type: ignore[attr-defined]
    return [
        {
            "op": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})",
            "calls": v[1],
            "self_ms": 1e3 * v[2],
            "self_%": 100 * v[2] / total,
        }
        for fn, v in top
    ]


def bench_torch(
    quick: bool, models: list[str] | None = None, tasks: tuple[str, ...] = ("train", "sample")
) -> dict[str, Any]:
    """The section (module docstring). Returns rows, checks and the profiles.

    ``models``: only the models whose name contains one of these strings (default all);
    ``tasks``: a subset of ``("train", "sample")``.
    """
    if not torch_available():
        msg = (
            "PyTorch is not installed: the torch section needs it "
            "(pip install 'flownp[torch]'); skipped"
        )
        print(f"[bench] {msg}", flush=True)
        return {"skipped": msg, "rows": [], "checks": []}
    import torch

    from verification.bench._common import init_model, interleaved
    from verification.torch_port import from_flownp

    uptime_before = _uptime()
    chosen = QUICK_MODELS if quick else MODELS
    if models:
        chosen = {k: v for k, v in chosen.items() if any(m in k for m in models)}
        if not chosen:
            raise ValueError(f"bench_torch: no model name contains any of {models}")
    batch = 4 if quick else BATCH
    rows, profiles = [], {}
    for name, cfg in chosen.items():
        t0 = time.perf_counter()
        model = init_model(cfg, n=16)
        tmodel = from_flownp(model)
        rng = np.random.default_rng(0)
        x = (rng.random((batch,) + cfg.image_shape) - 0.5).astype(np.float32)
        loss_diff = _first_loss_check(model, tmodel, x)
        cases_np = _flownp_cases(model, x)
        cases_t = _torch_cases(tmodel, x)
        row: dict[str, Any] = {"model": name, "loss diff": loss_diff}
        for task in tasks:
            big = cfg.image_shape[0] >= 32
            rounds = 1 if quick else (3 if big else 7)
            cases = {}
            for n in THREAD_COUNTS:
                cases[f"flownp {n}"] = (None, _with_threads("flownp", n, cases_np[task]))
                cases[f"torch {n}"] = (None, _with_threads("torch", n, cases_t[task]))
            res = interleaved(cases, rounds, warmup=1)
            best = {}
            for side in ("flownp", "torch"):
                med = {n: res[f"{side} {n}"]["median"] for n in THREAD_COUNTS}
                n_best = min(med, key=med.get)
                best[side] = med[n_best]
                for n in THREAD_COUNTS:
                    row[f"{task} {side} {n}T s"] = med[n]
                row[f"{task} {side} best T"] = n_best
            row[f"{task} torch/flownp"] = best["torch"] / best["flownp"]
        rows.append(row)
        ratios = ", ".join(f"{t} {row[f'{t} torch/flownp']:.2f}x" for t in tasks)
        print(f"[bench] torch: {name}: {ratios} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if not quick and "train" in tasks:
            nt, nf = row["train torch best T"], row["train flownp best T"]
            profiles[name] = {
                f"flownp, {nf} thread(s)": _profile_flownp(model, x, nf),
                f"torch, {nt} thread(s)": _profile_torch(tmodel, x, nt),
            }
        torch.set_num_threads(max(THREAD_COUNTS))
    conv_rows = bench_conv_layers(quick) if not models else []
    checks = [
        {
            "target": f"torch: flownp over PyTorch, {task}, {r['model']}",
            "value": r[f"{task} torch/flownp"],
            "limit": f">= {TARGET_RATIO}",
            "met": r[f"{task} torch/flownp"] >= TARGET_RATIO,
        }
        for r in rows
        for task in tasks
    ] + [
        {
            "target": f"torch: CInC forward layer over conv2d, {r['shape']}",
            "value": r["torch / layer"],
            "limit": ">= 1.0",
            "met": r["torch / layer"] >= 1.0,
        }
        for r in conv_rows
    ]
    return {
        "conv_rows": conv_rows,
        "torch_version": torch.__version__,
        "torch_config": torch.__config__.parallel_info(),
        "uptime_before": uptime_before,
        "uptime_after": _uptime(),
        "batch": batch,
        "tasks": list(tasks),
        "samples": N_SAMPLES,
        "rows": rows,
        "profiles": profiles,
        "checks": checks,
    }


#: The CIFAR level shapes (H, W, C) of the per-layer comparison, batch 100.
LAYER_SHAPES = [(16, 16, 12), (8, 8, 24), (4, 4, 48)]


def bench_conv_layers(quick: bool) -> list[dict[str, Any]]:
    """The CInC forward against PyTorch's ``conv2d`` of the same top-left padded convolution.

    Per CIFAR level shape, batch 100, float32: flownp's ``CInCConv.forward`` (output and
    log-det, NHWC) and its kernel alone (:func:`flownp.kernels.conv.conv_forward`) against
    ``F.conv2d(F.pad(x, (k-1, 0, k-1, 0)), w)`` on an NCHW tensor (PyTorch's own layout, made
    before timing) with ``w = K.transpose(3, 2, 0, 1)``; each at its best of 1 and 2 threads.
    The outputs are compared first.
    """
    import torch
    import torch.nn.functional as F

    from flownp.kernels.conv import conv_forward
    from flownp.layers import CInCConv
    from flownp.testing import randomize_params
    from verification.bench._common import interleaved

    rows = []
    shapes = [(4, 4, 3)] if quick else LAYER_SHAPES
    batch = 4 if quick else 100
    for H, W, C in shapes:
        rng = np.random.default_rng(0)
        layer = CInCConv(C, 3, corner="lu", guard=0.9, dtype="float32")
        randomize_params(layer, rng)
        K = np.ascontiguousarray(layer.kernel, dtype=np.float32)  # (k, k, C, C)
        x = rng.standard_normal((batch, H, W, C)).astype(np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        wt = torch.from_numpy(np.ascontiguousarray(K.transpose(3, 2, 0, 1)))
        k = K.shape[0]

        def torch_conv(xt=xt, wt=wt, k=k):
            with torch.no_grad():
                return F.conv2d(F.pad(xt, (k - 1, 0, k - 1, 0)), wt)

        y_ref = torch_conv().numpy().transpose(0, 2, 3, 1)
        diff = float(np.max(np.abs(layer.forward(x)[0] - y_ref)))
        layer.clear_cache()

        def layer_fwd(layer=layer, x=x):
            layer.forward(x)
            layer.clear_cache()

        cases = {}
        for n in THREAD_COUNTS:
            cases[f"layer {n}"] = (None, _with_threads("flownp", n, layer_fwd))
            cases[f"kernel {n}"] = (
                None,
                _with_threads("flownp", n, lambda x=x, K=K: conv_forward(x, K)),
            )
            cases[f"torch {n}"] = (None, _with_threads("torch", n, torch_conv))
        res = interleaved(cases, 3 if quick else 15, warmup=2)
        best = {
            side: min(res[f"{side} {n}"]["median"] for n in THREAD_COUNTS)
            for side in ("layer", "kernel", "torch")
        }
        rows.append(
            {
                "shape": f"{H}x{W}x{C}",
                "batch": batch,
                "flownp layer ms": 1e3 * best["layer"],
                "flownp kernel ms": 1e3 * best["kernel"],
                "torch conv2d ms": 1e3 * best["torch"],
                "torch / layer": best["torch"] / best["layer"],
                "torch / kernel": best["torch"] / best["kernel"],
                "max abs diff": diff,
            }
        )
        print(f"[bench] torch: conv {H}x{W}x{C}: torch/layer {rows[-1]['torch / layer']:.2f}")
    torch.set_num_threads(max(THREAD_COUNTS))
    return rows


def render(s: dict[str, Any]) -> list[str]:
    """Markdown lines of the section for the report."""
    from verification.bench._common import md_table

    L = ["", "## flownp vs PyTorch", ""]
    if s.get("skipped"):
        return L + [s["skipped"]]
    L += [
        f"PyTorch {s['torch_version']}, eager, float32; training step = forward + loss + "
        f"backward + Adam, batch {s['batch']}; sampling = {s['samples']} images. Medians of "
        "interleaved rounds (seconds), each side at 1 and 2 threads; `torch/flownp` is the "
        "ratio at each side's best thread count (> 1: flownp faster).",
        "",
    ]
    table = []
    for r in s["rows"]:
        for task in s.get("tasks", ["train", "sample"]):
            t = {"model": r["model"], "task": "training step" if task == "train" else "sampling"}
            for side in ("flownp", "torch"):
                for n in THREAD_COUNTS:
                    t[f"{side} {n}T (s)"] = r[f"{task} {side} {n}T s"]
            best = (r[f"{task} flownp best T"], r[f"{task} torch best T"])
            t["best T flownp / torch"] = f"{best[0]} / {best[1]}"
            t["torch / flownp"] = r[f"{task} torch/flownp"]
            table.append(t)
    L += md_table(table)
    L += [
        "",
        f"Load: {s['uptime_before']} (before), {s['uptime_after']} (after). "
        "|loss(flownp) - loss(torch)| on the benchmark batch, per model: "
        + ", ".join(f"{r['model']} {r['loss diff']:.1e}" for r in s["rows"])
        + ".",
    ]
    if s.get("conv_rows"):
        L += [
            "",
            "CInC forward (3x3, LU corner, guard 0.9) against PyTorch's `conv2d` of the same "
            "top-left padded convolution (NCHW input made before timing), float32, medians of "
            "interleaved rounds, each at its best of 1 and 2 threads (ms):",
            "",
        ]
        L += md_table(s["conv_rows"])
    for name, profs in s.get("profiles", {}).items():
        for who, prof in profs.items():
            L += ["", f"Profile of one training step of {name}, {who} (self CPU time):", ""]
            L += md_table(prof)
    return L


def main(argv: list[str] | None = None) -> int:
    """``python -m verification.bench_torch [--model NAME ...] [--task train|sample] [--conv]``:
    the section alone, for some models or one task, or (``--conv``) only the per-layer CInC
    forward against ``conv2d``; prints the Markdown tables."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m verification.bench_torch", description=main.__doc__
    )
    parser.add_argument("--model", action="append", help="a substring of a model name (repeatable)")
    parser.add_argument("--task", choices=("train", "sample"), action="append")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--conv", action="store_true", help="only the per-layer comparison")
    args = parser.parse_args(argv)
    threads.configure()
    if args.conv:
        from verification.bench._common import md_table

        print("\n".join(md_table(bench_conv_layers(args.quick))))
        return 0
    res = bench_torch(args.quick, args.model, tuple(args.task or ("train", "sample")))
    print("\n".join(render(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
