r"""The report of a grid (``<out>/report/``, rewritten after every run): ``report.md`` (one
table per budget, with seed-paired comparisons per claim), ``results.csv`` (one row per run)
and ``curves_<budget>.png`` (held-out bits/dim against steps and against seconds; per variant
the mean over seeds, shaded between the lowest and the highest seed). Numbers are the mean ±
sample standard deviation over seeds (:func:`mean_std`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flownp.experiment.grid import GridConfig
from flownp.files import write_atomic
from flownp.model import CONVS


# ---------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (``ddof = 1``; NaN for one value) and count.

    ``std = sqrt(sum_i (v_i - mean)^2 / (n - 1))``. NaN values are not dropped here: the
    caller decides what a failed run means (the report counts them separately).
    """
    v = np.asarray(list(values), dtype=np.float64)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if n > 1 else float("nan")
    return mean, std, n


def format_mean_std(
    values: Iterable[float], digits: int = 3, scale: float = 1.0, *, signed: bool = False
) -> str:
    """``"2.134 ± 0.012"`` (one value: ``"2.134"``; none: ``"–"``; ``signed``: ``"+0.134"``)."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    sign = "+" if signed else ""
    if n == 1:
        return f"{mean * scale:{sign}.{digits}f}"
    return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}"


# ---------------------------------------------------------------------- the report
REPORT_COLUMNS = (
    "budget",
    "conv",
    "coupling",
    "D",
    "seeds",
    "parameters",
    "held-out bits/dim",
    "steps",
    "training s",
    "sampling s",
    "legible samples %",
    "failed",
)


def _variant_key(r: dict[str, Any]) -> tuple[str, int, str, str]:
    return (r["budget"], r["depth"], r["conv"], r["coupling"])


def summarize(grid: GridConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (budget, depth, conv, coupling), in grid order: the finished runs'
    numbers as lists (failed runs counted apart, their numbers not averaged)."""
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_variant_key(r), []).append(r)
    rows = []
    for budget in grid.budgets:
        for depth in grid.depths:
            for conv in grid.convs:
                for coupling in grid.couplings:
                    rs = groups.get((budget, depth, conv, coupling), [])
                    if not rs:
                        continue
                    ok = [r for r in rs if r["status"] == "done"]
                    rows.append(
                        {
                            "budget": budget,
                            "budget_value": grid.budget_value(budget),
                            "conv": conv,
                            "coupling": coupling,
                            "depth": depth,
                            "seeds": [r["seed"] for r in ok],
                            "failed": len(rs) - len(ok),
                            "parameters": rs[0]["parameters"],
                            "bpd": [r["heldout_bpd"] for r in ok],
                            "steps": [r["steps"] for r in ok],
                            "train_seconds": [r["train_seconds"] for r in ok],
                            "sample_seconds": [r["sample_seconds"] for r in ok],
                            "sample_nonfinite": [bool(r.get("sample_nonfinite")) for r in ok],
                            "digit_share": [
                                r["digit_share"] for r in ok if r.get("digit_share") is not None
                            ],
                            "digit_real_share": [
                                r["digit_real_share"]
                                for r in ok
                                if r.get("digit_real_share") is not None
                            ],
                            "curves": [r["curve"] for r in ok],
                        }
                    )
    return rows


def _sampling_cell(seconds: Sequence[float], nonfinite: Sequence[bool] | None = None) -> str:
    """Mean ± std of the sampling times that were measured, with the count of runs whose
    samples were non-finite (timed on the latent mode) and of runs not timed at all."""
    ok = [s for s in seconds if math.isfinite(s)]
    cell = format_mean_std(ok, 2)
    notes = []
    n_nonfinite = sum(bool(b) for b in nonfinite or ())
    if n_nonfinite:
        notes.append(f"{n_nonfinite} non-finite")
    if len(seconds) - len(ok):
        notes.append(f"{len(seconds) - len(ok)} failed")
    return f"{cell} ({', '.join(notes)})" if notes else cell


def format_table(rows: Sequence[dict[str, Any]], budget: str) -> str:
    """The Markdown table of one budget."""
    lines = ["| " + " | ".join(REPORT_COLUMNS[1:]) + " |", "|" + "---|" * (len(REPORT_COLUMNS) - 1)]
    for row in rows:
        if row["budget"] != budget:
            continue
        cells = [
            row["conv"],
            row["coupling"],
            str(row["depth"]),
            str(len(row["seeds"])),
            f"{row['parameters']:,}",
            format_mean_std(row["bpd"], 3),
            format_mean_std(row["steps"], 0),
            format_mean_std(row["train_seconds"], 0),
            _sampling_cell(row["sample_seconds"], row["sample_nonfinite"]),
            format_mean_std(row["digit_share"], 1, scale=100.0) if row["digit_share"] else "–",
            str(row["failed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The paper's comparisons: ``(axis, candidate, baseline)``; the candidate is compared with
#: the baseline at every other setting of the grid (where the grid has both). The paper's
#: Emerging baseline is ``1x1+emerging`` (a 1x1 convolution before the emerging one).
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("conv", "cinc", "1x1+emerging"),
    ("conv", "cinc", "emerging"),
    ("conv", "cinc", "1x1"),
    ("coupling", "quad", "affine"),
    # the other options of the official training script
    ("conv", "periodic", "cinc"),
    ("conv", "periodic", "1x1+emerging"),
    ("conv", "periodic", "emerging"),
    ("conv", "1x1+cinc", "cinc"),
    ("conv", "1x1", "shuffle"),
    ("conv", "1x1", "reverse"),
    ("coupling", "additive", "affine"),
)


def paired_differences(
    results: Sequence[dict[str, Any]], budget: str, axis: str, candidate: str, baseline: str
) -> list[dict[str, Any]]:
    """Seed-paired differences of held-out bits/dim, candidate minus baseline.

    For every setting of the other axes (conv or coupling, and depth) with both variants
    finished on some common seeds: ``diffs`` (one per common seed; negative means the
    candidate is better), ``spread`` (the largest of three standard deviations over those
    seeds: each variant's bits/dim and the paired differences; NaN with one seed) and
    ``verdict``: ``"better"`` / ``"worse"`` when the mean difference is larger than the spread,
    ``"within spread"`` when it is not, ``"one seed"`` when there is nothing to compare with.
    """
    other = "coupling" if axis == "conv" else "conv"
    done = [
        r
        for r in results
        if r["budget"] == budget and r["status"] == "done" and math.isfinite(r["heldout_bpd"])
    ]
    by_key = {(r[axis], r[other], r["depth"], r["seed"]): r["heldout_bpd"] for r in done}
    out = []
    for setting in sorted({(r[other], r["depth"]) for r in done}, key=lambda t: (t[1], t[0])):
        seeds = sorted(
            s
            for (v, o, d, s) in by_key
            if v == candidate and (o, d) == setting and (baseline, o, d, s) in by_key
        )
        if not seeds:
            continue
        a = [by_key[(candidate, *setting, s)] for s in seeds]
        b = [by_key[(baseline, *setting, s)] for s in seeds]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        mean = float(np.mean(diffs))
        if len(seeds) < 2:
            spread, verdict = math.nan, "one seed"
        else:
            spread = max(float(np.std(v, ddof=1)) for v in (a, b, diffs))
            verdict = (
                "within spread" if not abs(mean) > spread else ("better" if mean < 0 else "worse")
            )
        out.append(
            {
                other: setting[0],
                "depth": setting[1],
                "seeds": seeds,
                "diffs": diffs,
                "spread": spread,
                "verdict": verdict,
            }
        )
    return out


def format_claims(results: Sequence[dict[str, Any]], budget: str) -> str:
    """The Markdown table of :data:`CLAIMS` for one budget (:func:`paired_differences`)."""
    lines = [
        "| claim | setting | D | seeds | difference (bits/dim) | seed spread | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for axis, candidate, baseline in CLAIMS:
        for row in paired_differences(results, budget, axis, candidate, baseline):
            setting = row["coupling"] if axis == "conv" else row["conv"]
            spread = "–" if math.isnan(row["spread"]) else f"{row['spread']:.3f}"
            verdict = {
                "better": f"{candidate} better",
                "worse": f"{baseline} better",
                "within spread": "within the seed spread",
                "one seed": "one seed: not resolved",
            }[row["verdict"]]
            lines.append(
                f"| {candidate} vs {baseline} | {setting} | {row['depth']} | {len(row['seeds'])} "
                f"| {format_mean_std(row['diffs'], 3, signed=True)} | {spread} | {verdict} |"
            )
    return "\n".join(lines)


def write_report(
    grid: GridConfig, results: Sequence[dict[str, Any]], folder: str | os.PathLike
) -> Path:
    """Write ``report.md``, ``results.csv`` and ``curves_<budget>.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize(grid, results)
    _write_results_csv(results, folder / "results.csv")
    total = sum(r["train_seconds"] for r in results)
    parts = [
        "# Experiment report",
        "",
        f"{len(results)} of {len(grid.runs())} runs finished; {total / 60:.1f} min of training "
        "in total.",
        "",
        "Held-out bits/dim (all held-out images, EMA weights), training steps, training time "
        "(seconds, including the held-out evaluations and checkpoints), time to sample "
        f"{grid.sample_images} images at temperature {grid.temperature:g} (inverses included, "
        "after training; when the samples of a run contain NaN/Inf values, the same "
        "computation is timed on the latent mode, temperature 0, and the run is counted in "
        "brackets as non-finite; its legible share is not measured): "
        "mean ± standard deviation over the seeds (ddof = 1). "
        "Failed: runs that diverged or ended with a non-finite held-out value (not averaged).",
    ]
    reals = [v for row in rows for v in row["digit_real_share"]]
    if reals:
        parts += [
            "",
            "Legible samples: the share of those samples that the digit classifier assigns to "
            f"one digit with probability >= 0.9; the same share for the real held-out images is "
            f"{100 * float(np.mean(reals)):.0f} %.",
        ]

    def options(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items()) or "defaults"

    parts += [
        "",
        f"Model: {options(grid.model)}. Training: {options(grid.train)}. "
        f"Seeds per depth: {', '.join(f'D={d}: {n}' for d, n in grid.seeds)}.",
    ]
    for budget in grid.budgets:
        if not any(r["budget"] == budget for r in rows):
            continue
        title = (
            f"Equal steps: {grid.steps} steps per run"
            if budget == "steps"
            else f"Equal wall-clock time: {grid.seconds:g} s of training per run"
        )
        figure = plot_curves(rows, budget, folder / f"curves_{budget}.png", title)
        parts += [
            "",
            f"## {title}",
            "",
            format_table(rows, budget),
            "",
            f"![held-out bits/dim]({figure.name})",
            "",
            "Paired comparisons (held-out bits/dim of the candidate minus the baseline, per "
            "seed, then mean ± std over the common seeds; negative: the candidate is better). "
            "Seed spread: the largest standard deviation over those seeds of either variant's "
            "bits/dim and of the paired differences; a difference within it is not resolved "
            "by these seeds.",
            "",
            format_claims(results, budget),
        ]
    path = folder / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def _write_results_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    cols = (
        "budget",
        "budget_value",
        "conv",
        "coupling",
        "depth",
        "seed",
        "status",
        "heldout_bpd",
        "steps",
        "train_seconds",
        "parameters",
        "sample_seconds",
        "sample_nonfinite",
        "digit_share",
    )
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(cols)
    for r in results:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    write_atomic(path, buf.getvalue().encode())


def seed_band(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lowest and highest of several ``(x, y)`` curves on a common grid of ``x`` (linear
    interpolation over the range every curve covers). Returns ``(x, mean, low, high)``."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    lo = max(x[0] for x, _ in curves)
    hi = min(x[-1] for x, _ in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([hi])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # (seeds, points)
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot_curves(rows: Sequence[dict[str, Any]], budget: str, path: Path, title: str) -> Path:
    """Held-out bits/dim against steps and against seconds, one line per variant (the mean
    over seeds), shaded between the lowest and the highest seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    convs = sorted({r["conv"] for r in rows}, key=lambda c: CONVS.index(c))
    depths = sorted({r["depth"] for r in rows})
    lows: list[float] = []
    highs: list[float] = []
    for row in rows:
        if row["budget"] != budget:
            continue
        color = f"C{convs.index(row['conv'])}"
        style = "-" if row["coupling"] == "affine" else "--"
        width = 1.0 + 1.2 * depths.index(row["depth"])
        label = f"{row['conv']} {row['coupling']} D={row['depth']} ({len(row['seeds'])} seeds)"
        for ax, key in zip(axes, ("step", "seconds"), strict=True):
            curves = []
            for c in row["curves"]:
                x, y = np.asarray(c[key], float), np.asarray(c["bpd"], float)
                ok = np.isfinite(y)
                curves.append((x[ok], y[ok]))
            x, mean, low, high = seed_band(curves)
            if not len(x):
                continue
            ax.plot(x, mean, style, color=color, lw=width, label=label)
            ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)
            lows.append(float(low.min()))
            highs.append(float(high.max()))
    for ax, xlabel in zip(axes, ("training step", "training seconds"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits/dim")
        ax.grid(alpha=0.3)
        if lows:  # the interesting range: from the best value up to 3 bits/dim above it
            bottom = min(lows) - 0.05
            ax.set_ylim(bottom, min(max(highs), bottom + 3.0) + 0.05)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{title}: mean over seeds, shaded from the lowest to the highest seed", fontsize=10
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
