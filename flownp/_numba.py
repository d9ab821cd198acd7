"""Every Numba option flownp uses, in one place.

Kernels are written as plain Python functions and compiled here, once, at import time of the
module that defines them (``jit(fn)`` / ``pjit(fn)``), so the undecorated function stays
importable as a readable fallback (``kernel.py_func``).

* ``cache=True``: compiled machine code is written next to the module (``__pycache__``) and
  reused by the next process, so only the first run on a fresh install compiles.
* ``fastmath``: only the flags that do not change results in the presence of NaN/Inf
  (``nnan``/``ninf`` are deliberately *off*, so that non-finite values propagate and are
  reported by the callers, never silently turned into garbage). ``reassoc``/``contract`` let
  LLVM vectorise reductions; results still do not depend on the thread count because every
  parallel loop writes disjoint outputs (no cross-thread reductions).
* A kernel called from another compiled kernel is either inlined into its callers
  (:func:`jit_inline`) or compiled without ``fastmath`` (:func:`jit_exact`). A called kernel
  that is not inlined exists twice in a process: its own compiled code and the copy linked
  into (and optimised again with) its caller, and the caller runs whichever of the two was
  loaded first: its own copy when it comes from the on-disk cache, the kernel's own code
  when that was compiled (or called) earlier in the process. Fast-math lets the two copies
  round differently (another vector width or remainder loop of a reduction, a fused
  multiply-add in one of them), so a first run that compiles would give other numbers than
  the runs after it. Without fast-math every operation rounds as written in both copies;
  an inlined kernel has only one copy (its caller's). Kernels with reductions are inlined.
* ``error_model="numpy"``: division by zero gives inf/nan like NumPy instead of raising inside
  a compiled loop (singular kernels are caught *before* a kernel runs).

Set ``NUMBA_DISABLE_JIT=1`` to run every kernel as plain Python (slow, for debugging).
"""

from __future__ import annotations

import numba

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

NJIT_OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
PARALLEL_OPTIONS = dict(NJIT_OPTIONS, parallel=True)
EXACT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")


def jit(fn):
    """Compile ``fn`` as a serial Numba kernel with the project options."""
    return numba.njit(**NJIT_OPTIONS)(fn)


def pjit(fn):
    """Compile ``fn`` as a parallel Numba kernel (``prange`` loops) with the project options."""
    return numba.njit(**PARALLEL_OPTIONS)(fn)


def jit_exact(fn):
    """Compile ``fn`` as a serial Numba kernel without ``fastmath`` (every operation rounds as
    written): for kernels called from other compiled kernels, whose results must not depend
    on which compiled copy runs (module docstring)."""
    return numba.njit(**EXACT_OPTIONS)(fn)


def jit_inline(fn):
    """Compile ``fn`` as a serial kernel that Numba inlines into its callers at the IR level
    (``inline="always"``): small register-blocked micro-kernels whose local accumulator arrays
    only stay in registers when the caller sees their loops (see :mod:`flownp.kernels.conv`)."""
    return numba.njit(inline="always", **NJIT_OPTIONS)(fn)


prange = numba.prange


def set_num_threads(n: int) -> None:
    """Set the number of Numba threads (BLAS threads are managed by :mod:`flownp.threads`)."""
    numba.set_num_threads(int(n))


def get_num_threads() -> int:
    return int(numba.get_num_threads())
