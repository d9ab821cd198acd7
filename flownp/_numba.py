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
* ``error_model="numpy"``: division by zero gives inf/nan like NumPy instead of raising inside
  a compiled loop (singular kernels are caught *before* a kernel runs).

Set ``NUMBA_DISABLE_JIT=1`` to run every kernel as plain Python (slow, for debugging).
"""

from __future__ import annotations

import numba

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

NJIT_OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
PARALLEL_OPTIONS = dict(NJIT_OPTIONS, parallel=True)


def jit(fn):
    """Compile ``fn`` as a serial Numba kernel with the project options."""
    return numba.njit(**NJIT_OPTIONS)(fn)


def pjit(fn):
    """Compile ``fn`` as a parallel Numba kernel (``prange`` loops) with the project options."""
    return numba.njit(**PARALLEL_OPTIONS)(fn)


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
