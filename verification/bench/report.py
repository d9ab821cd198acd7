"""The benchmark report: ``report.md`` from the results of every section."""

from __future__ import annotations

from typing import Any

from verification.bench._common import (
    md_table,
)


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
