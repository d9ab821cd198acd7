"""Thread counts of the two pools flownp uses: Numba's parallel kernels and BLAS.

flownp alternates between Numba kernels (the invertible convolutions, data movement) and BLAS
matrix products (the conditioner networks), always from one Python thread, so the two pools
never run at the same time. Giving each the same count ``n`` (default: the CPUs this process
may use) therefore never puts more than ``n`` busy threads on the machine; what can still
oversubscribe is *idle* threads that busy-wait after their last job. Two defaults avoid that,
set only if the user has not set them and only if they can still take effect:

* ``GOMP_SPINCOUNT=30000``: Numba's OpenMP threading layer (GNU libgomp) spins for about
  30 000 iterations (tens of microseconds) after a parallel region before sleeping, instead
  of the default 300 000. Long enough for the back-to-back regions of the wavefront solver
  (``OMP_WAIT_POLICY=PASSIVE``, sleeping at once, made it 3-4x slower), short enough not to
  steal a core from the BLAS call that follows a kernel (the default made a mixed
  kernel/GEMM loop ~25 % slower). Read when the layer starts (the first parallel kernel
  call); ignored if ``OMP_WAIT_POLICY`` is set.
* ``OPENBLAS_THREAD_TIMEOUT=4``: idle OpenBLAS workers spin for 2^4 CPU cycles (the
  minimum) before sleeping, instead of the default 2^28 (about 0.1 s, during which a spinning
  worker competes with Numba's threads: a kernel right after a GEMM ran up to 3x slower).
  Read when OpenBLAS is loaded, i.e. when NumPy is first imported: importing this module
  first (it imports neither NumPy nor Numba) is in time; :func:`info` reports what was set.

Measurements: ``docs/performance.md``.

Determinism. Every Numba kernel of flownp writes disjoint outputs per task and sums parameter
gradients over a fixed chunking of the batch (:mod:`flownp.kernels.conv`), so its results are
bitwise identical for any Numba thread count. BLAS products are reproducible for a fixed BLAS
thread count (OpenBLAS splits a product by its output blocks, which may change with the count).
Hence: results are deterministic for a given :func:`configure` setting.

Usage::

    from flownp import threads
    threads.configure()        # n = usable CPUs, both pools
    threads.configure(1)       # everything on one core
    with threads.limit(1): ... # temporarily
    threads.info()             # what is in effect (for benchmark reports)
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

_ENV_DEFAULTS = {"GOMP_SPINCOUNT": "30000", "OPENBLAS_THREAD_TIMEOUT": "4"}


def _set_env_defaults() -> dict[str, str]:
    """Set the idle-thread defaults that can still take effect; return what was set."""
    done = {}
    for key, value in _ENV_DEFAULTS.items():
        if key in os.environ:
            continue
        if key == "OPENBLAS_THREAD_TIMEOUT" and "numpy" in sys.modules:
            continue  # OpenBLAS already loaded: too late, do not pretend
        if key == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in os.environ:
            continue  # the user chose a wait policy
        os.environ[key] = value
        done[key] = value
    return done


_ENV_SET = _set_env_defaults()  # at import: before NumPy when flownp.threads comes first


def usable_cpus() -> int:
    """CPUs this process may run on (scheduler affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _load_blas() -> None:
    """Load every BLAS flownp uses (NumPy's and SciPy's own OpenBLAS builds), so that a limit
    set now covers both (threadpoolctl only sees libraries already loaded)."""
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401


_BLAS_LIMITER: Any = None  # keeps the threadpoolctl limiter of configure() alive


def configure(n: int | None = None) -> dict[str, Any]:
    """Use ``n`` threads (default :func:`usable_cpus`) for Numba kernels and for BLAS.

    ``n`` is capped at Numba's pool size (``NUMBA_NUM_THREADS``, fixed when Numba is
    imported). Returns :func:`info`.
    """
    global _BLAS_LIMITER
    import numba
    import threadpoolctl

    _load_blas()
    if n is None:
        n = usable_cpus()
    if not isinstance(n, (int,)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads.configure: n must be a positive int, got {n!r}")
    n = min(int(n), int(numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    _BLAS_LIMITER = threadpoolctl.threadpool_limits(limits=n, user_api="blas")
    return info()


@contextlib.contextmanager
def limit(n: int) -> Iterator[None]:
    """Temporarily use ``n`` threads in both pools (restored on exit)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads.limit: n must be a positive int, got {n!r}")
    import numba
    import threadpoolctl

    _load_blas()
    old = numba.get_num_threads()
    n = min(n, int(numba.config.NUMBA_NUM_THREADS))
    with threadpoolctl.threadpool_limits(limits=n, user_api="blas"):
        numba.set_num_threads(n)
        try:
            yield
        finally:
            numba.set_num_threads(old)


def info() -> dict[str, Any]:
    """Thread settings in effect: Numba threads and layer, BLAS libraries and their threads,
    and the idle-thread environment defaults (``env_set_by_flownp`` lists those set here)."""
    import numba
    import threadpoolctl

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not started (priority: " + ", ".join(numba.config.THREADING_LAYER_PRIORITY) + ")"
    blas = [
        {
            "library": d.get("internal_api"),
            "version": d.get("version"),
            "threading": d.get("threading_layer"),
            "architecture": d.get("architecture"),
            "num_threads": d.get("num_threads"),
        }
        for d in threadpoolctl.threadpool_info()
        if d.get("user_api") == "blas"
    ]
    return {
        "usable_cpus": usable_cpus(),
        "numba_threads": int(numba.get_num_threads()),
        "numba_pool_size": int(numba.config.NUMBA_NUM_THREADS),
        "numba_threading_layer": layer,
        "blas": blas,
        "env": {
            k: os.environ.get(k)
            for k in (*_ENV_DEFAULTS, "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")
        },
        "env_set_by_flownp": dict(_ENV_SET),
    }
