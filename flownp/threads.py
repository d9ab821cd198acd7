"""Multi-core execution of flownp: one thread pool, one setting, one limiter.

Design (measured in ``docs/performance.md``). Every kernel that uses more than one core
splits its work into a **fixed** list of chunks (fixed by the shapes, never by the thread
count) and hands them to :func:`parallel_for`. The calling thread works through the chunks
itself; the pool's other threads, woken without spinning, take chunks from the same list as
soon as the operating system runs them. So:

* the caller never waits for a thread that has not started: on a busy machine, where another
  process holds a core, it simply does more chunks itself (worst case: one thread's speed,
  plus waiting for at most one chunk a late thread took);
* one parallel region per kernel call (a layer's convolution, a conditioner's matrix
  product), not one per row or anti-diagonal;
* work below a threshold stays in one chunk and never wakes a thread;
* BLAS always runs single-threaded *inside* chunks (the matrix products of the conditioner
  networks are split into row or column blocks here); no thread pool spins or yields while
  it waits, so nothing competes with the caller between regions;
* results are bitwise the same for every thread count: the chunks and every sum over them
  are the same whichever thread computes them.

Why not the thread pools of the libraries: OpenBLAS' threaded GEMM, and Numba's OpenMP
layer (one static share per thread, and a barrier at the end of every ``prange`` loop),
both make the caller wait for every thread of the team. When another process holds a core
each such wait can last a scheduler time slice (milliseconds), and a training step has
hundreds of them: 2 threads were up to 25x slower than 1 on a busy 2-core machine.

Numba's own pool is still used by the explicitly requested ``wavefront`` inverse (one
``prange`` loop per anti-diagonal); it gets the same thread count.

``GOMP_SPINCOUNT=30000`` and ``OPENBLAS_THREAD_TIMEOUT=4`` (set at import if the user did
not set them, and if they can still take effect) keep idle OpenMP / OpenBLAS threads from
spinning for long where those pools are used at all.

Usage::

    from flownp import threads
    threads.configure()        # n = usable CPUs (the default of the flownp commands)
    threads.configure(1)       # everything on one core
    with threads.limit(1): ... # temporarily
    threads.parallel_for(fn, n_chunks)   # fn(i) for i < n_chunks, on the pool
    threads.info()             # what is in effect (for benchmark reports)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
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


_DEFAULT: int | None = None  # set_default(): the processes of a node share its CPUs


def default_threads() -> int:
    """The default thread count of flownp (library and commands): every usable CPU, or what
    :func:`set_default` chose (several processes on one node share its CPUs)."""
    return usable_cpus() if _DEFAULT is None else _DEFAULT


def set_default(n: int | None) -> None:
    """Make ``n`` the default thread count (None: every usable CPU again)."""
    global _DEFAULT
    _DEFAULT = None if n is None else _check_n(n, "threads.set_default")


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


# --------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------


class _Task:
    """``fn(i)`` for ``i < n``: chunks handed out in order to whichever thread asks first."""

    def __init__(self, fn: Callable[[int], Any], n: int) -> None:
        self.fn = fn
        self.n = n
        self._next = itertools.count()  # next() is atomic under the GIL
        self._lock = threading.Lock()
        self._done = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run chunks until none is left (the caller and every woken worker do this)."""
        while True:
            i = next(self._next)
            if i >= self.n:
                return
            try:
                self.fn(i)
            except BaseException as exc:  # re-raised by the caller of parallel_for
                self.error = self.error or exc
            with self._lock:
                self._done += 1
                if self._done == self.n:
                    self.finished.set()


class _Pool:
    """Worker threads that sleep on a lock (no spinning) until :meth:`run` wakes them."""

    def __init__(self) -> None:
        self._wake: list[threading.Lock] = []
        self._task: _Task | None = None
        self._busy = threading.Lock()  # one region at a time; nested / concurrent: serial
        self._workers: set[int] = set()

    def _worker(self, k: int) -> None:
        self._workers.add(threading.get_ident())
        wake = self._wake[k]
        while True:
            wake.acquire()  # released by run(): sleeps in the kernel, no spinning
            task = self._task
            if task is not None:
                task.work()  # an already finished task has no chunk left: returns at once

    def _start(self, n_workers: int) -> None:
        while len(self._wake) < n_workers:
            lock = threading.Lock()
            lock.acquire()
            self._wake.append(lock)
            t = threading.Thread(
                target=self._worker,
                args=(len(self._wake) - 1,),
                daemon=True,
                name=f"flownp-{len(self._wake)}",
            )
            t.start()

    def run(self, fn: Callable[[int], Any], n: int, n_threads: int) -> None:
        if n_threads <= 1 or n <= 1 or threading.get_ident() in self._workers:
            for i in range(n):
                fn(i)
            return
        if not self._busy.acquire(blocking=False):  # another thread's region is running
            for i in range(n):
                fn(i)
            return
        try:
            task = _Task(fn, n)
            helpers = min(n_threads, n) - 1
            self._start(helpers)
            self._task = task
            for k in range(helpers):
                try:
                    self._wake[k].release()
                except RuntimeError:  # still awake from an earlier wake-up: it will see task
                    pass
            task.work()
            task.finished.wait()  # only chunks a worker has already taken can be pending
            self._task = None
            for k in range(helpers):  # take back wake-ups not yet consumed: a worker the OS
                self._wake[k].acquire(blocking=False)  # did not run in time stays asleep
        finally:
            self._busy.release()
        if task.error is not None:
            raise task.error


_POOL = _Pool()
_THREADS: int | None = None  # threads of parallel_for (None: not configured yet)
_BLAS_LIMITER: Any = None  # keeps the threadpoolctl limiter of configure() alive


def get_threads() -> int:
    """Threads :func:`parallel_for` uses (configuring the default on first use)."""
    if _THREADS is None:
        configure()
    return int(_THREADS)  # type: ignore[arg-type]


def parallel_for(fn: Callable[[int], Any], n: int) -> None:
    """Call ``fn(i)`` for every ``i < n`` on the pool (the caller takes part; module docstring).

    ``fn`` must write disjoint outputs for different ``i`` and release the GIL for its heavy
    part (a Numba ``nogil`` kernel, a NumPy matrix product). Exceptions are re-raised here
    after every chunk has finished. Nested calls and calls made while another thread's
    region runs execute serially in the calling thread.
    """
    _POOL.run(fn, int(n), get_threads() if n > 1 else 1)


#: Smallest estimated work of one chunk (nanoseconds of one core). Each chunk a worker takes
#: costs a hand-over of the GIL (an operating-system wake-up, slow on a busy machine), so
#: smaller work stays serial; 250 us and at most 16 chunks measured best on 2 busy cores
#: (against 100 us / 64 chunks: MNIST quad step 0.82 vs 1.03 x the 1-thread time).
MIN_CHUNK_NS = 250_000
#: Most chunks of one region (load balance against GIL hand-overs).
MAX_CHUNKS = 16


def chunk_bounds(n: int, ns_per_item: float) -> list[int]:
    """Split ``range(n)`` into consecutive chunks of at least :data:`MIN_CHUNK_NS` estimated
    work each (at most :data:`MAX_CHUNKS`); returns the boundaries ``[0, ..., n]``.

    Depends on the work only, never on the thread count: a kernel that reduces over chunks
    gets the same sums (bitwise) with any number of threads.
    """
    k = int(min(n, MAX_CHUNKS, max(1.0, n * float(ns_per_item) / MIN_CHUNK_NS)))
    k = max(k, 1)
    return [n * c // k for c in range(k + 1)]


def parallel_range(fn: Callable[[int, int], Any], n: int, ns_per_item: float) -> None:
    """``fn(lo, hi)`` over the chunks :func:`chunk_bounds` makes of ``range(n)``, on the pool."""
    if n <= 0:
        return
    b = chunk_bounds(n, ns_per_item)
    if len(b) == 2:
        fn(0, n)
        return
    parallel_for(lambda c: fn(b[c], b[c + 1]), len(b) - 1)


def thread_count_option(text: str) -> int:
    """argparse ``type`` of every ``--threads`` option: an int in ``1 .. usable_cpus()``
    (a bad value is a one-line usage error naming the rule)."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    most = usable_cpus()
    if not 1 <= n <= most:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {most} (the CPUs this process may use), got {n}"
        )
    return n


def _check_n(n: Any, where: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{where}: n must be a positive int, got {n!r}")
    return n


def configure(n: int | None = None) -> dict[str, Any]:
    """Use ``n`` threads (None: :func:`default_threads`) for flownp's kernels; BLAS gets one
    thread (flownp splits matrix products into blocks itself).

    Also sets Numba's own thread count (used only by the ``wavefront`` inverse), capped at
    its pool size (``NUMBA_NUM_THREADS``, fixed when Numba is imported). Returns :func:`info`.
    """
    global _BLAS_LIMITER, _THREADS
    import numba
    import threadpoolctl

    n = default_threads() if n is None else _check_n(n, "threads.configure")
    _load_blas()
    _THREADS = n
    numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))
    _BLAS_LIMITER = threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    return info()


@contextlib.contextmanager
def limit(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` threads (None: :func:`default_threads`), restored on exit; BLAS
    keeps one thread. The commands' ``--threads`` option goes through here."""
    global _THREADS
    n = default_threads() if n is None else _check_n(n, "threads.limit")
    import numba

    old = get_threads()  # configures the defaults (and BLAS) on first use
    old_numba = numba.get_num_threads()
    _THREADS = n
    numba.set_num_threads(min(n, int(numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        _THREADS = old
        numba.set_num_threads(old_numba)


def info() -> dict[str, Any]:
    """Thread settings in effect: flownp's threads, Numba's threads and layer, BLAS libraries
    and their threads, and the idle-thread environment defaults (``env_set_by_flownp`` lists
    those set here)."""
    import numba
    import threadpoolctl

    try:
        layer = numba.threading_layer()
    except ValueError:  # no Numba-parallel kernel has run (the default path uses none)
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
        "flownp_threads": _THREADS,
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
