"""``python -m verification [--quick] [--out DIR] [--section NAME ...]``: the verification report.

Runs every executable claim, prints each one (statement, what was computed, the numbers,
PASS/FAIL) and a summary, and writes ``DIR/report.md`` (one section per claim) next to the
figures. Exit status 0 when every claim passes, 1 otherwise. ``--quick`` runs the reduced
sizes used by CI (seconds per section); without it the larger sweeps run (minutes).

Sections (:data:`SECTIONS`): ``cinc`` (paper Section 3.1), ``layers`` (every layer and the
whole model: log-dets against dense Jacobians, round trips, gradient checks), ``beyond``
(what the paper states without proof and what the public code gets wrong, measured), all in
:mod:`verification.claims`, and ``stability`` (the numerical stability of the inverse,
:mod:`verification.stability`). ``flownp verify`` is the same command.

Everything runs with one Numba and one BLAS thread (:func:`flownp.threads.limit`): the
problems are tiny, and on a shared machine thread start-up and spinning cost far more than they
save (a CInC forward of a 3x4x3 image took 7.5 ms with two threads under load, 0.2 ms with one).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from flownp.errors import UsageError
from verification.result import ClaimResult

#: section name -> (title, "module:function"); the function is ``run(out_dir, quick)``
#: returning a list of :class:`ClaimResult`.
SECTIONS: dict[str, tuple[str, str]] = {
    "cinc": (
        "The invertible padded convolution (paper Section 3.1, Lemma 1, Theorem 1, Figure 1)",
        "verification.claims.cinc:run",
    ),
    "layers": (
        "Every layer and the whole model: log-determinants, inverses, gradients",
        "verification.claims.layers:run",
    ),
    "beyond": (
        "What the paper states without proof, and what the public code gets wrong",
        "verification.claims.beyond:run",
    ),
    "stability": (
        "Numerical stability of the inverse",
        "verification.stability:run",
    ),
}

#: sections whose claims print themselves as they run (the others are printed after)
SELF_PRINTING = ("cinc", "layers", "beyond")


def _section_runner(spec: str) -> Callable[[str, bool], list[ClaimResult]]:
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _md_value(v: object) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    return str(v).replace("|", "\\|")


def _md_table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(_md_value(k) for k in keys) + " |"]
    out.append("|" + "---|" * len(keys))
    for r in rows:
        out.append("| " + " | ".join(_md_value(r.get(k, "")) for k in keys) + " |")
    return out


def render_markdown(result: ClaimResult, out_dir: str) -> str:
    """One report section for a claim."""
    verdict = "PASS" if result.passed else "**FAIL**"
    out = [f"### {result.name}: {verdict}", "", f"**Claim.** {result.statement}", ""]
    out += [f"**Computed.** {result.computed}", "", "**Numbers.**", ""]
    nums = result.numbers
    if isinstance(nums, list):
        out += _md_table(nums)
    else:
        scalars = {k: v for k, v in nums.items() if not (isinstance(v, list) and v)}
        if scalars:
            out += _md_table([{"quantity": k, "value": v} for k, v in scalars.items()])
        for key, val in nums.items():
            if isinstance(val, list) and val:
                out += ["", f"*{key}*", ""]
                out += _md_table(val if isinstance(val[0], dict) else [{key: v} for v in val])
    if result.notes:
        out += ["", f"*Notes.* {result.notes}"]
    for f in result.figures:
        rel = os.path.relpath(f, out_dir)
        out += ["", f"![{result.name}]({rel})"]
    out += ["", f"**Result: {'PASS' if result.passed else 'FAIL'}**", ""]
    return "\n".join(out)


def _machine() -> str:
    """Machine facts for the report header: CPU count, architecture, load, Numba."""
    import numba

    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"Numba {numba.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"load average {load}, 1 thread"
    )


def write_report(
    sections: list[tuple[str, str, list[ClaimResult]]], out_dir: str, quick: bool, seconds: float
) -> str:
    """Write ``out_dir/report.md`` from ``(name, title, results)`` sections; returns its path."""
    claims = [r for _, _, rs in sections for r in rs]
    n_pass = sum(r.passed for r in claims)
    lines = [
        "# flownp verification report",
        "",
        f"{n_pass}/{len(claims)} claims pass ({'quick' if quick else 'full'} run, "
        f"{seconds:.1f} s, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"Python {platform.python_version()}, NumPy {np.__version__}, {_machine()}).",
        "",
        "| section | claim | result |",
        "|---|---|---|",
    ]
    for name, _, rs in sections:
        for r in rs:
            lines.append(f"| {name} | {r.name} | {'PASS' if r.passed else '**FAIL**'} |")
    for _, title, rs in sections:
        lines += ["", f"## {title}", ""]
        lines += [render_markdown(r, out_dir) for r in rs]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_verification(
    out_dir: str = "report",
    quick: bool = False,
    sections: Sequence[str] | None = None,
    *,
    overwrite: bool = True,
) -> int:
    """Run the chosen sections (default: all), print every claim and a summary, write
    ``out_dir/report.md``. Returns the exit status: 0 if every claim passes, else 1.
    ``overwrite=False`` refuses an ``out_dir`` holding the report of an earlier run
    (:class:`~flownp.errors.UsageError`, before any work)."""
    from flownp import threads
    from flownp.files import refuse_existing_in
    from verification.claims import describe

    refuse_existing_in(out_dir, ["report.md"], overwrite, option="--out")

    names = list(SECTIONS) if not sections else list(sections)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown verification section(s) {unknown}; choose from {list(SECTIONS)}")
    t0 = time.perf_counter()
    done: list[tuple[str, str, list[ClaimResult]]] = []
    with threads.limit(1):
        for name in names:
            title, spec = SECTIONS[name]
            print(f"=== {title} ===", flush=True)
            results = _section_runner(spec)(out_dir, quick)
            if name not in SELF_PRINTING:
                for r in results:
                    print(describe(r), flush=True)
            done.append((name, title, results))
    seconds = time.perf_counter() - t0
    path = write_report(done, out_dir, quick, seconds)
    claims = [r for _, _, rs in done for r in rs]
    failed = [r.name for r in claims if not r.passed]
    print(f"\n=== summary ({seconds:.1f} s) ===")
    for r in claims:
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.name}")
    print(f"{len(claims) - len(failed)}/{len(claims)} claims pass; report: {path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``python -m verification`` and ``flownp verify``."""
    parser.add_argument(
        "--quick", action="store_true", help="reduced sizes (seconds per section; used by CI)"
    )
    parser.add_argument("--out", default="report", help="output directory for report.md + PNGs")
    parser.add_argument(
        "--section",
        action="append",
        choices=list(SECTIONS),
        help="run only this section (repeatable; default: all)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the report of an earlier run in --out",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verification", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_verification(
            args.out, quick=args.quick, sections=args.section, overwrite=args.overwrite
        )
    except UsageError as exc:  # e.g. an --out holding an earlier report: one line, exit 2
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
