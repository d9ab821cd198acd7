r"""Several processes, measured: ``python -m verification.bench_distributed [--quick] --out DIR``.

Run it as one process; it starts ``mpiexec`` itself where it needs several. Sections:

``reduce``     the step's one all-reduce (:class:`flownp.distributed.FlatBuffer` of a model's
               gradients plus the step's scalars, in the model's dtype) between 2 processes of
               this machine, for the default MNIST model and the paper's CIFAR-10 model
               (L = 3, D = 32, width 512; CInC + affine and CInC + quad); also an 8-byte
               all-reduce (latency) and a local ``a += b`` over the buffer (the arithmetic of a
               reduction, per byte).
``compute``    the compute time of one training step (forward, loss, backward, Adam) of those
               models on one process with every usable CPU, at 64 images (the official
               recipe's batch per worker); and the time to draw one image's dequantisation noise
               (every process draws the whole global batch's noise).
``model``      an alpha-beta model of a ring all-reduce between nodes like this machine,
               ``T_ar(p) = 2 (p - 1) alpha + 2 (p - 1) / p * n * beta + (p - 1) / p * n * gamma``
               (n bytes, gamma from ``reduce``), for 10 and 100 Gb/s networks; a step on p nodes
               is ``T_c + T_noise(64 p) + T_ar(p)`` (no overlap: the reduction follows the
               backward pass); parallel efficiency ``T_c / step``, and the wall time of the
               paper's CIFAR-10 recipe (500 epochs of 50,000 images, 64 images per node and
               step) at 1, 4, 16 and 64 nodes.
``processes``  ``mpiexec -n 2 flownp train`` (1 thread each, the default) against ``flownp
               train`` (2 threads) on the default model and a CIFAR-shaped depth-4 model: time
               per step and held-out bits/dim of the same run.
``grid``       a small ``flownp experiment`` grid on 2 processes against one process: wall
               time, and the two reports compared (equal but for the wall-clock columns).

Writes ``DIR/report.md`` and ``DIR/results.json``. Wall-clock figures need an otherwise idle
machine; ``--quick`` runs tiny shapes to check the commands only.
"""

from __future__ import annotations

# isort: off
import flownp.threads as threads  # first: sets the idle-thread defaults before NumPy loads

# isort: on
import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from flownp.model import FlowConfig  # noqa: E402

#: The models of the reduction and compute measurements (float32, as trained).
MODELS: dict[str, FlowConfig] = {
    "default (MNIST, L=2, D=8, w64, CInC + affine)": FlowConfig(dtype="float32"),
    "CIFAR-10 paper (L=3, D=32, w512, CInC + affine)": FlowConfig(
        (32, 32, 3), 3, 32, 512, "cinc", "affine", dtype="float32"
    ),
    "CIFAR-10 paper (L=3, D=32, w512, CInC + quad)": FlowConfig(
        (32, 32, 3), 3, 32, 512, "cinc", "quad", dtype="float32"
    ),
}
QUICK_MODELS: dict[str, FlowConfig] = {
    "tiny MNIST-shaped": FlowConfig((8, 8, 1), 2, 1, 8, dtype="float32"),
    "tiny CIFAR-shaped": FlowConfig((8, 8, 3), 2, 2, 16, "cinc", "quad", dtype="float32"),
}
BATCH_PER_NODE = 64  # the official recipe: 64 images per worker
EPOCHS, TRAIN_IMAGES = 500, 50_000  # the paper's CIFAR-10 recipe
NODES = (1, 4, 16, 64)
#: (name, link bandwidth in bytes/s, per-message latency alpha in s): assumptions, stated in
#: the report (TCP over 10 Gb/s Ethernet; an RDMA fabric at 100 Gb/s).
NETWORKS = (("10 Gb/s", 10e9 / 8, 30e-6), ("100 Gb/s", 100e9 / 8, 3e-6))
SCALARS = ("loss_sum", "count", "nonfinite", "stop")


def _models(quick: bool) -> dict[str, FlowConfig]:
    return QUICK_MODELS if quick else MODELS


def _stats(times: list[float]) -> dict[str, float]:
    return {"min": float(np.min(times)), "median": float(np.median(times)), "n": len(times)}


def _param_shapes(cfg: FlowConfig) -> dict[str, tuple[int, ...]]:
    from flownp.model import FlowModel

    return {k: p.shape for k, p in FlowModel(cfg).params.items()}


# ---------------------------------------------------------------------- reduce (under mpiexec)
def reduce_worker(quick: bool, out: Path) -> None:
    """Under ``mpiexec -n P``: time the step's all-reduce for every model; process 0 writes
    ``out`` (JSON). Each timing is the slowest process's, after a barrier."""
    from flownp import distributed

    comm = distributed.world()
    rounds = 5 if quick else 30
    rows = []

    def timed(fn) -> float:
        comm.allreduce_sum(np.zeros(1))  # a barrier
        t0 = time.perf_counter()
        fn()
        return comm.allreduce_max(time.perf_counter() - t0)

    tiny = np.zeros(1)
    latency = [timed(lambda: comm.allreduce_sum(tiny)) for _ in range(rounds * 10)]
    for name, cfg in _models(quick).items():
        fb = distributed.FlatBuffer(_param_shapes(cfg), SCALARS, np.dtype(cfg.dtype))
        fb.data[:] = 1.0
        for _ in range(2):
            comm.allreduce_sum(fb.data)
        times = [timed(lambda fb=fb: comm.allreduce_sum(fb.data)) for _ in range(rounds)]
        other = np.ones_like(fb.data)
        adds = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fb.data += other
            adds.append(time.perf_counter() - t0)
        rows.append(
            {
                "model": name,
                "parameters": fb.num_values,
                "dtype": str(fb.dtype),
                "bytes": fb.nbytes,
                "allreduce_s": _stats(times),
                "local_add_s": _stats(adds),
            }
        )
        del fb, other
    if comm.is_root:
        out.write_text(
            json.dumps(
                {"processes": comm.size, "latency_s": _stats(latency), "models": rows}, indent=2
            )
        )


def bench_reduce(quick: bool, work: Path) -> dict[str, Any]:
    out = work / "reduce.json"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "verification.bench_distributed"]
    cmd += ["--worker", "reduce", "--json", str(out)] + (["--quick"] if quick else [])
    _run(cmd, timeout=1800)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------- compute
def bench_compute(quick: bool) -> dict[str, Any]:
    """A training step of each model on this process (every usable CPU), and the noise draw."""
    from flownp.data.pixels import dequantize
    from verification.bench._common import init_model, interleaved
    from verification.bench.training import train_step_fn

    threads.configure()
    batch = 8 if quick else BATCH_PER_NODE
    rows = []
    for name, cfg in _models(quick).items():
        model = init_model(cfg, n=min(batch, 16))
        rng = np.random.default_rng(0)
        x = (rng.random((batch, *cfg.image_shape)) - 0.5).astype(np.float32)
        step = train_step_fn(model, x)
        rounds = 1 if quick or "CIFAR-10" in name else 10
        res = interleaved({"step": (None, step)}, rounds, warmup=1)["step"]
        rows.append({"model": name, "batch": batch, "threads": threads.get_threads(), **res})
        del model, step, x
    images = np.zeros((256, 32, 32, 3), np.uint8)
    rng = np.random.default_rng(0)
    t = interleaved({"noise": (None, lambda: dequantize(images, rng, np.float32))}, 10)["noise"]
    return {"steps": rows, "noise_s_per_cifar_image": t["min"] / len(images)}


# ---------------------------------------------------------------------- the alpha-beta model
def ring_allreduce_s(
    nodes: int, nbytes: int, alpha: float, bandwidth: float, gamma: float
) -> float:
    """Ring all-reduce of ``nbytes`` over ``nodes``: ``2 (p-1)`` messages of ``n/p`` bytes
    (reduce-scatter, then all-gather), ``(p-1)/p n`` bytes added locally."""
    p = nodes
    if p == 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bandwidth + (p - 1) / p * nbytes * gamma


def scaling_model(reduce: dict[str, Any], compute: dict[str, Any]) -> list[dict[str, Any]]:
    steps = {r["model"]: r for r in compute["steps"]}
    rows = []
    for m in reduce["models"]:
        if m["model"] not in steps:
            continue
        c = steps[m["model"]]
        t_c = c["min"] * BATCH_PER_NODE / c["batch"]  # per 64 images per node
        gamma = m["local_add_s"]["min"] / m["bytes"]
        for net, bandwidth, alpha in NETWORKS:
            for p in NODES:
                t_ar = ring_allreduce_s(p, m["bytes"], alpha, bandwidth, gamma)
                t_noise = compute["noise_s_per_cifar_image"] * BATCH_PER_NODE * p
                step = t_c + t_noise + t_ar
                n_steps = math.ceil(EPOCHS * TRAIN_IMAGES / (BATCH_PER_NODE * p))
                rows.append(
                    {
                        "model": m["model"],
                        "network": net,
                        "nodes": p,
                        "compute_s": t_c,
                        "allreduce_s": t_ar,
                        "noise_s": t_noise,
                        "step_s": step,
                        "efficiency": t_c / step,
                        "steps": n_steps,
                        "days": n_steps * step / 86400,
                    }
                )
    return rows


# ---------------------------------------------------------------------- processes (item: threads)
def cifar_shaped(path: Path, quick: bool) -> Path:
    """A CIFAR-shaped dataset (32x32x3) from the bundled MNIST: each digit padded by 2 pixels
    and tinted into three channels (real structure at CIFAR's shape), as ``train`` / ``test``
    arrays (9,000 / 1,000 images; quick: 512 / 128)."""
    from flownp.data import load_dataset

    d = load_dataset("mnist")

    def shape(u: np.ndarray) -> np.ndarray:
        u = np.pad(u[..., 0], ((0, 0), (2, 2), (2, 2))).astype(np.float64)
        return np.stack([u, 0.8 * u + 20, 255 - 0.6 * u], axis=-1).clip(0, 255).astype(np.uint8)

    train, test = (d.train[:512], d.test[:128]) if quick else (d.train, d.test)
    np.savez(path, train=shape(train), test=shape(test))
    return path


def _train_run(n: int, args: list[str], out: Path, work: Path, timeout: float) -> dict[str, Any]:
    """``flownp train ARGS`` on ``n`` processes (1: without mpiexec); the time per step (median
    of the steps' durations from metrics.csv, evaluations and checkpoints left out), the
    command's wall time and the final held-out bits/dim."""
    import csv

    cmd = [sys.executable, "-m", "flownp", "train", *args, "--out", str(out), "--no-progress"]
    if n > 1:
        cmd = [_mpiexec(), "-n", str(n), *cmd]
    t0 = time.perf_counter()
    res = _run(cmd, timeout=timeout, cwd=work)
    wall = time.perf_counter() - t0
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    elapsed = np.array([float(r["elapsed"]) for r in rows])
    steps = np.diff(elapsed)
    held = [float(r["heldout_bpd"]) for r in rows if r["heldout_bpd"]]
    import re

    found = re.search(r"processes, (\d+) thread", res.stdout)
    return {
        "processes": n,
        "threads": int(found.group(1)) if found else threads.usable_cpus(),
        "steps": len(rows),
        "step_s_median": float(np.median(steps)) if len(steps) else float("nan"),
        "train_s": float(elapsed[-1]),
        "wall_s": wall,
        "heldout_bpd": held[-1] if held else float("nan"),
        "train_bpd": [float(r["bpd"]) for r in rows],
    }


def bench_processes(quick: bool, work: Path) -> list[dict[str, Any]]:
    """``mpiexec -n 2 flownp train`` (one thread each, the default) against ``flownp train``
    (every usable CPU), the default model and a CIFAR-shaped depth-4 model; each pair takes
    turns (one process first)."""
    data = cifar_shaped(work / "cifar_shaped.npz", quick)
    common = ["--eval-every", "0", "--checkpoint-every", "0"]
    if quick:
        cases = {
            "tiny MNIST-shaped": ["--depth", "1", "--width", "8", "--steps", "20"],
            "tiny CIFAR-shaped": [
                "--dataset", f"array:{data}", "--levels", "3", "--depth", "1", "--width", "16",
                "--coupling", "quad", "--steps", "10",
            ],
        }  # fmt: skip
    else:
        cases = {
            "default model (MNIST, L=2, D=8, w64), the default 2400 steps": [],
            "CIFAR-shaped (32x32x3 MNIST), L=3, D=4, w512, CInC + quad, 60 steps": [
                "--dataset", f"array:{data}", "--levels", "3", "--depth", "4", "--width",
                "512", "--conv", "cinc", "--coupling", "quad", "--steps", "60",
            ],
        }  # fmt: skip
    rows = []
    for name, opts in cases.items():
        for n in (1, 2):
            out = work / f"processes-{len(rows)}"
            row = _train_run(n, common + opts, out, work, timeout=7200)
            rows.append({"model": name, **row})
    return rows


# ---------------------------------------------------------------------- grid
def bench_grid(quick: bool, work: Path) -> dict[str, Any]:
    """A small ``flownp experiment`` grid (steps budget) on one process and on two: the
    commands' wall times and whether the reports agree but for the wall-clock columns."""
    grid = ["experiment", "--conv", "cinc,1x1", "--coupling", "affine,quad", "--seeds", "1"]
    grid += ["--budget", "steps"]
    if quick:
        grid += ["--depth", "1", "--width", "8", "--steps", "6", "--eval-every", "3"]
    else:
        grid += ["--depth", "4", "--steps", "300"]
    rows = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "flownp", *grid, "--out", str(work / f"grid-{n}")]
        if n > 1:
            cmd = [_mpiexec(), "-n", str(n), *cmd]
        t0 = time.perf_counter()
        _run(cmd, timeout=7200, cwd=work)
        rows[n] = time.perf_counter() - t0
    reports = [(work / f"grid-{n}" / "report" / "report.md").read_text() for n in (1, 2)]
    same = report_without_clock(reports[0]) == report_without_clock(reports[1])
    return {"command": "flownp " + " ".join(grid), "wall_s": rows, "reports_agree": same}


def report_without_clock(report: str) -> list[list[str]]:
    """An experiment report's lines without its wall-clock figures: table rows as cells
    without the training and sampling seconds columns, and no total training time line."""
    out, drop = [], set()
    for line in report.splitlines():
        if "min of training in total" in line:
            line = re.sub(r"; [0-9.]+ min of training in total", "", line)
        if not line.startswith("|"):
            out.append([line])
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "training s" in cells:
            drop = {i for i, c in enumerate(cells) if c in ("training s", "sampling s")}
        out.append([c for i, c in enumerate(cells) if i not in drop])
    return out


# ---------------------------------------------------------------------- helpers and report
def _mpiexec() -> str:
    here = os.path.dirname(sys.executable)
    found = shutil.which("mpiexec", path=os.pathsep.join([here, os.environ.get("PATH", "")]))
    if found is None:
        raise SystemExit("bench_distributed: no mpiexec (pip install 'flownp[mpi]')")
    return found


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def _ms(s: float) -> str:
    return f"{1e3 * s:.3g} ms" if s < 1 else f"{s:.3g} s"


def render(results: dict[str, Any]) -> str:
    lines = ["# Several processes: measurements", "", f"Command: `{results['command']}`", ""]
    lines += [f"Machine: {results['machine']['cpu']}, {results['machine']['usable_cpus']} usable "
              f"CPUs; {results['load']}", ""]  # fmt: skip
    if "reduce" in results:
        r = results["reduce"]
        lines += [
            f"## The step's all-reduce ({r['processes']} processes, this machine)",
            "",
            f"8-byte all-reduce (latency): {_ms(r['latency_s']['min'])} (median "
            f"{_ms(r['latency_s']['median'])})",
            "",
            "| model | parameters | buffer | all-reduce (min / median) | local a += b |",
            "|---|---|---|---|---|",
        ]
        for m in r["models"]:
            lines.append(
                f"| {m['model']} | {m['parameters']:,} | {m['bytes'] / 1e6:.1f} MB {m['dtype']} | "
                f"{_ms(m['allreduce_s']['min'])} / {_ms(m['allreduce_s']['median'])} | "
                f"{_ms(m['local_add_s']['min'])} |"
            )
        lines.append("")
    if "compute" in results:
        c = results["compute"]
        lines += ["## Compute time of a training step (one process, every usable CPU)", ""]
        lines += ["| model | images | threads | step (min) | median |", "|---|---|---|---|---|"]
        for s in c["steps"]:
            lines.append(
                f"| {s['model']} | {s['batch']} | {s['threads']} | {_ms(s['min'])} | "
                f"{_ms(s['median'])} |"
            )
        lines += [
            "",
            f"Dequantisation noise of one 32x32x3 image: {1e6 * c['noise_s_per_cifar_image']:.3g} "
            "us (every process draws the noise of the whole global batch).",
            "",
        ]
    if "processes" in results:
        lines += [
            "## One process with every CPU against one process per CPU",
            "",
            "| model | processes | threads each | steps | time per step (median) | training s | "
            "held-out bits/dim | largest per-step loss difference |",
            "|---|---|---|---|---|---|---|---|",
        ]
        base: dict[str, Any] = {}
        for row in results["processes"]:
            ref = base.setdefault(row["model"], row)
            diff = max(
                (abs(a - b) for a, b in zip(row["train_bpd"], ref["train_bpd"], strict=False)),
                default=0.0,
            )
            lines.append(
                f"| {row['model']} | {row['processes']} | {row['threads']} | {row['steps']} | "
                f"{_ms(row['step_s_median'])} | {row['train_s']:.1f} | "
                f"{row['heldout_bpd']:.4f} | {diff:.2g} |"
            )
        lines.append("")
    if "grid" in results:
        g = results["grid"]
        lines += [
            "## An experiment grid on one process and on two",
            "",
            f"`{g['command']}`: {g['wall_s']['1']:.0f} s on one process (every usable CPU), "
            f"{g['wall_s']['2']:.0f} s on two (`mpiexec -n 2`, one thread each): "
            f"{g['wall_s']['1'] / g['wall_s']['2']:.2f}x; the reports "
            + ("agree but for the wall-clock columns." if g["reports_agree"] else "DIFFER."),
            "",
        ]
    if "model" in results:
        lines += [
            "## Beyond this machine: a ring all-reduce between nodes like this one",
            "",
            "Assumed networks: " + "; ".join(
                f"{n}: bandwidth {b * 8 / 1e9:g} Gb/s, latency alpha = {a * 1e6:g} us"
                for n, b, a in NETWORKS
            ) + f". {BATCH_PER_NODE} images per node and step (global batch "
            f"{BATCH_PER_NODE} x nodes); {EPOCHS} epochs of {TRAIN_IMAGES:,} images.",
            "",
            "| model | network | nodes | step compute | all-reduce | noise | efficiency | "
            "500 epochs |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for row in results["model"]:
            lines.append(
                f"| {row['model']} | {row['network']} | {row['nodes']} | {_ms(row['compute_s'])} "
                f"| {_ms(row['allreduce_s'])} | {_ms(row['noise_s'])} | "
                f"{100 * row['efficiency']:.1f} % | {row['days']:.3g} days |"
            )
        lines.append("")
    return "\n".join(lines)


SECTIONS = ("reduce", "compute", "model", "processes", "grid")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verification.bench_distributed")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the commands only")
    ap.add_argument("--out", default=None, help="folder of report.md and results.json")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections")
    ap.add_argument("--worker", choices=("reduce",), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "reduce":
        reduce_worker(args.quick, Path(args.json))
        return 0
    from verification.bench._common import machine_info

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_distributed_"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["python -m verification.bench_distributed", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "load": "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    # The sections that start other processes first: once `compute` has built the paper's
    # CIFAR-10 models, this process keeps gigabytes that the training runs would compete for.
    if "processes" in sections:
        results["processes"] = bench_processes(args.quick, out)
    if "grid" in sections:
        results["grid"] = bench_grid(args.quick, out)
        results["grid"]["wall_s"] = {str(k): v for k, v in results["grid"]["wall_s"].items()}
    if "reduce" in sections or "model" in sections:
        results["reduce"] = bench_reduce(args.quick, out)
    if "compute" in sections or "model" in sections:
        results["compute"] = bench_compute(args.quick)
    if "model" in sections:
        results["model"] = scaling_model(results["reduce"], results["compute"])
    results["load_end"] = "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "report.md").write_text(render(results))
    print(render(results))
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
