"""Shared by the claim sections: printing a :class:`ClaimResult` and the small helpers
the claims draw their test cases with."""

from __future__ import annotations

import numpy as np

from verification.result import ClaimResult

KERNEL_SIZES = (1, 2, 3, 5)


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def _fmt(v: object) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3g}"
    return str(v)


def _table(rows: list[dict], indent: str = "    ") -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(k, "")) for k in keys] for r in rows]
    width = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = indent + "  ".join(k.rjust(w) for k, w in zip(keys, width, strict=True))
    out = [line]
    for c in cells:
        out.append(indent + "  ".join(v.rjust(w) for v, w in zip(c, width, strict=True)))
    return out


def describe(result: ClaimResult) -> str:
    """Plain-text rendering of a claim: verdict, statement, what was computed, the numbers."""
    out = [
        f"[{'PASS' if result.passed else 'FAIL'}] {result.name}",
        f"  claim:    {result.statement}",
        f"  computed: {result.computed}",
    ]
    nums = result.numbers
    if isinstance(nums, list):
        out += _table(nums)
    else:
        for key, val in nums.items():
            if isinstance(val, list) and val and isinstance(val[0], dict):
                out.append(f"  {key}:")
                out += _table(val)
            else:
                out.append(f"  {key}: {_fmt(val)}")
    if result.notes:
        out.append(f"  notes: {result.notes}")
    for f in result.figures:
        out.append(f"  figure: {f}")
    return "\n".join(out)


def _emit(result: ClaimResult, verbose: bool) -> ClaimResult:
    if verbose:
        print(describe(result), flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Kernels used by the claims
# --------------------------------------------------------------------------------------------


def _sizes(quick: bool) -> list[tuple[int, int]]:
    """Image sizes: odd, even, non-square, a single row and a single column."""
    s = [(1, 1), (1, 5), (4, 1), (3, 4), (4, 4)]
    return s if quick else s + [(5, 3), (2, 7), (5, 6)]


def _nonzero_ints(rng: np.random.Generator, size, high: int) -> np.ndarray:
    """Integers in ``{-high..-1, 1..high}``."""
    return rng.integers(1, high + 1, size) * rng.choice([-1, 1], size)
