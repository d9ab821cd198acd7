r"""Several processes working as one: the communicator of data-parallel training and grids.

One code path for one and for many processes. :func:`world` returns a :class:`SerialComm`
(one process: every collective is the identity, nothing is imported) or, when flownp was
started by an MPI launcher with more than one process, an :class:`MpiComm` (mpi4py, the
optional extra ``flownp[mpi]``). The training loop talks to either through the same methods;
layers and kernels never see it.

Launch detection (:func:`detect_launch`) reads only environment variables, so a plain
install never imports mpi4py unless it was started that way::

    MPICH / Hydra, Intel MPI, Cray     PMI_SIZE, PMI_RANK
    Open MPI                           OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK
    MVAPICH                            MV2_COMM_WORLD_SIZE, MV2_COMM_WORLD_RANK
    Slurm srun (inside a job step)     SLURM_STEP_NUM_TASKS, SLURM_PROCID (with SLURM_STEP_ID)
    Flux                               FLUX_JOB_SIZE, FLUX_TASK_RANK
    PMIx (size unknown)                PMIX_RANK

A batch script or an ``salloc`` shell is not a job step: ``SLURM_NTASKS`` alone does not make
flownp start MPI. Started with more than one process and without mpi4py, :func:`world`
raises :class:`DistributedError` naming the extra (the command exits 2, process 0 says why).

Data-parallel training (``docs/distributed.md``): each process computes the loss sum, the
image count and the gradient of its share of the global batch (:func:`share`); one
:meth:`~MpiComm.allreduce_sum` of one flat buffer (:class:`FlatBuffer`, in the gradients'
dtype) per step sums them together with the flags (a non-finite share, a stop signal), so that
every process applies the same update and takes the same decisions. One process gets back
exactly what it packed, so its run is bit for bit the run of a plain install.

Errors: an error every process raises together (the same decision, taken from reduced values
or broadcast from process 0) carries ``collective = True`` (:func:`collective`); the command
prints it on process 0 only. Any other error on one process is printed by that process and
ends the whole job (:meth:`MpiComm.abort`), so that no process waits forever for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from flownp.errors import FlownpError

T = TypeVar("T")

#: What a user installs to run flownp under an MPI launcher.
EXTRA = "flownp[mpi]"


class DistributedError(FlownpError, RuntimeError):
    """Processes that cannot work together: mpi4py missing under an MPI launcher, processes
    that disagree on the flownp version, options or data, or a failure on one process."""


E = TypeVar("E", bound=BaseException)


def collective(exc: E) -> E:
    """Mark ``exc`` as raised by every process together (printed by process 0 only)."""
    exc.collective = True  # type: ignore[attr-defined]
    return exc


def is_collective(exc: BaseException) -> bool:
    return bool(getattr(exc, "collective", False))


# ---------------------------------------------------------------------- launch detection
@dataclass(frozen=True)
class Launch:
    """How this process was started: the launcher, the number of processes (None: unknown,
    e.g. PMIx alone), this process's rank and the processes on this node (None: unknown)."""

    launcher: str
    size: int | None
    rank: int
    local_size: int | None = None


# (launcher, size variable, rank variable, processes-on-this-node variable)
_LAUNCHERS: tuple[tuple[str, str, str, str], ...] = (
    ("MPICH/Hydra or Intel MPI", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("Flux", "FLUX_JOB_SIZE", "FLUX_TASK_RANK", ""),
)


def _int(env: Mapping[str, str], key: str) -> int | None:
    try:
        return int(env[key]) if key and key in env else None
    except ValueError:
        return None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch | None:
    """The MPI launch this process is part of, from its environment (None: not launched by
    an MPI launcher or Slurm job step). Reads variables only; imports nothing."""
    env = os.environ if env is None else env
    for name, size_key, rank_key, local_key in _LAUNCHERS:
        size = _int(env, size_key)
        if size is not None:
            return Launch(name, size, _int(env, rank_key) or 0, _int(env, local_key))
    if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:  # srun: a job step, not the batch script
        size = _int(env, "SLURM_STEP_NUM_TASKS")
        if size is None:
            size = _int(env, "SLURM_NTASKS")
        if size is not None:
            return Launch("Slurm srun", size, _int(env, "SLURM_PROCID") or 0)
    rank = _int(env, "PMIX_RANK")
    if rank is not None:
        return Launch("PMIx", None, rank)
    return None


def _mpi4py_missing(launch: Launch) -> DistributedError:
    n = f"{launch.size} processes" if launch.size else "several processes"
    return collective(
        DistributedError(
            f"started by {launch.launcher} with {n}, but mpi4py is not installed: "
            f"pip install '{EXTRA}' (or mpi4py built against this site's MPI, "
            "docs/distributed.md)"
        )
    )


# ---------------------------------------------------------------------- communicators
class SerialComm:
    """One process: every collective returns its input. The interface of :class:`MpiComm`."""

    rank = 0
    size = 1
    launch: Launch | None = None

    def __init__(self) -> None:
        self.reduce_calls = 0
        self.reduce_seconds = 0.0
        self.reduce_bytes = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        """Sum ``buf`` (float32 or float64, contiguous) over the processes, in place;
        returns it."""
        self.reduce_calls += 1
        self.reduce_bytes += buf.nbytes
        return buf

    def bcast(self, obj: T) -> T:
        """Process 0's ``obj`` on every process."""
        return obj

    def allreduce_max(self, value: float) -> float:
        """The largest ``value`` of all processes (e.g. the slowest process's time)."""
        return float(value)

    def bcast_array(self, arr: np.ndarray) -> np.ndarray:
        """Process 0's array into ``arr`` (in place) on every process; returns it."""
        return arr

    def allgather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order."""
        return [obj]

    def gather(self, obj: T) -> list[T] | None:
        """Every process's ``obj`` in rank order on process 0, None elsewhere."""
        return [obj]

    def local_size(self) -> int:
        """Processes on this node."""
        return 1

    def node_cpus(self) -> int:
        """CPUs usable by the processes of this node together (union of their affinities)."""
        return len(_affinity())

    def abort(self, code: int) -> None:
        """End every process of the job with ``code`` (one process: exit)."""
        sys.exit(code)


class MpiComm(SerialComm):
    """``MPI.COMM_WORLD`` through mpi4py (imported here, on construction only)."""

    def __init__(self, launch: Launch | None = None) -> None:
        super().__init__()
        try:
            import mpi4py

            mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
            from mpi4py import MPI
        except ImportError:
            raise _mpi4py_missing(launch or Launch("an MPI launcher", None, 0)) from None
        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()  # type: ignore[misc]
        self.size = self._comm.Get_size()  # type: ignore[misc]
        self.launch = launch
        self._local: Any = None

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        if buf.dtype not in (np.float32, np.float64) or not buf.flags.c_contiguous:
            raise TypeError("allreduce_sum: expects a contiguous float32 or float64 buffer")
        t0 = time.perf_counter()
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        self.reduce_seconds += time.perf_counter() - t0
        self.reduce_calls += 1
        self.reduce_bytes += buf.nbytes
        return buf

    def bcast(self, obj: T) -> T:
        return self._comm.bcast(obj, root=0)

    def allreduce_max(self, value: float) -> float:
        buf = np.array([value], dtype=np.float64)
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.MAX)
        return float(buf[0])

    def bcast_array(self, arr: np.ndarray) -> np.ndarray:
        self._comm.Bcast(arr, root=0)
        return arr

    def allgather(self, obj: T) -> list[T]:
        return self._comm.allgather(obj)

    def gather(self, obj: T) -> list[T] | None:
        return self._comm.gather(obj, root=0)

    def _node(self) -> Any:
        if self._local is None:
            self._local = self._comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        return self._local

    def local_size(self) -> int:
        return int(self._node().Get_size())

    def node_cpus(self) -> int:
        cpus: set[int] = set()
        for mine in self._node().allgather(sorted(_affinity())):
            cpus.update(mine)
        return max(1, len(cpus))

    def abort(self, code: int) -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        self._comm.Abort(code)


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


_WORLD: SerialComm | None = None


def world() -> SerialComm:
    """The communicator of this process (created on first call, then the same object).

    :class:`MpiComm` when :func:`detect_launch` finds more than one process (or a PMIx launch
    of unknown size with mpi4py installed), :class:`SerialComm` otherwise. Raises
    :class:`DistributedError` when several processes were started and mpi4py is missing."""
    global _WORLD
    if _WORLD is None:
        launch = detect_launch()
        if launch is None or launch.size == 1:
            _WORLD = SerialComm()
        elif launch.size is None:  # PMIx alone: ask MPI when it is there
            try:
                _WORLD = MpiComm(launch)
            except DistributedError:
                if launch.rank != 0:
                    raise
                _WORLD = SerialComm()
        else:
            _WORLD = MpiComm(launch)
    return _WORLD


def launch_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher): known
    before MPI starts, so that only process 0 speaks even about a failure to start it."""
    launch = detect_launch()
    return 0 if launch is None else launch.rank


# ---------------------------------------------------------------------- batch shares
def share(n: int, rank: int, size: int) -> slice:
    """The images ``[n * rank // size, n * (rank + 1) // size)`` of a batch of ``n``: shares
    differ by at most one image; the loss and gradient are sums over images divided by the
    global ``n``, so unequal shares are weighted exactly. A share may be empty when
    ``size > n``."""
    return slice(n * rank // size, n * (rank + 1) // size)


def default_threads(comm: SerialComm) -> int:
    """Threads per process by default: the CPUs usable on this node divided by the processes
    on this node (at least 1, at most this process's own CPUs), so a node is never
    oversubscribed; one process gets every usable CPU."""
    own = len(_affinity())
    if comm.size == 1:
        return max(1, own)
    return max(1, min(own, comm.node_cpus() // comm.local_size()))


# ---------------------------------------------------------------------- the flat buffer
class FlatBuffer:
    """One contiguous buffer holding named arrays and named float64 scalars, in ``dtype``
    (float32 or float64: the gradients' own type, so a float32 model sends 4 bytes per value).

    ``FlatBuffer({"a": (2, 3), ...}, ("loss_sum", "count"), dtype)`` lays the arrays out in
    the given order, then the scalars. :meth:`pack` copies arrays and scalars in, :meth:`unpack`
    copies the arrays out (cast to their own dtype) and returns the scalars. In a float32
    buffer each scalar takes three words ``hi + mid + lo`` (each the float32 rounding of what
    is left), which hold a float64 exactly: one process gets back the very scalars it packed,
    several get their sum to float32 accuracy.
    """

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], scalars: Sequence[str], dtype: Any = np.float64
    ) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"FlatBuffer: dtype must be float32 or float64, got {self.dtype}")
        self.offsets: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        at = 0
        for key, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            size = int(np.prod(shape, dtype=np.int64))
            self.offsets[key] = (at, at + size, shape)
            at += size
        self.num_values = at
        self.words = 1 if self.dtype == np.float64 else 3
        self.scalar_index = {name: at + self.words * i for i, name in enumerate(scalars)}
        if len(self.scalar_index) != len(scalars):
            raise ValueError(f"FlatBuffer: repeated scalar names {list(scalars)}")
        self.data = np.zeros(at + self.words * len(scalars), dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def pack(self, arrays: Mapping[str, np.ndarray] | None, **scalars: float) -> np.ndarray:
        """Copy ``arrays`` (None: zeros) and ``scalars`` into the buffer; returns it."""
        if arrays is None:
            self.data[: self.num_values] = 0.0
        else:
            if arrays.keys() != self.offsets.keys():
                diff = sorted(set(arrays) ^ set(self.offsets))
                raise KeyError(f"FlatBuffer.pack: array keys differ from the layout: {diff[:5]}")
            for key, (lo, hi, shape) in self.offsets.items():
                a = arrays[key]
                if a.shape != shape:
                    raise ValueError(f"FlatBuffer.pack: {key} has shape {a.shape}, not {shape}")
                self.data[lo:hi] = a.reshape(-1)
        if scalars.keys() != self.scalar_index.keys():
            raise KeyError(
                f"FlatBuffer.pack: scalars {sorted(scalars)}, expected {sorted(self.scalar_index)}"
            )
        for name, value in scalars.items():
            i, rest = self.scalar_index[name], float(value)
            for w in range(self.words):
                self.data[i + w] = rest
                rest -= float(self.data[i + w])  # exact: what the word did not hold
        return self.data

    def unpack(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Copy the buffer's arrays into ``arrays`` (in place, cast to their dtype); return
        the scalars (float64)."""
        for key, (lo, hi, shape) in self.offsets.items():
            arrays[key][...] = self.data[lo:hi].reshape(shape)
        out = {}
        for name, i in self.scalar_index.items():
            words = [float(v) for v in self.data[i : i + self.words]]
            out[name] = words[0] + (words[1] + words[2]) if self.words == 3 else words[0]
        return out


# ---------------------------------------------------------------------- agreement
def digest(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys; tuples as lists)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, str, str]:
    """``(where, a, b)``: the first place ``a`` and ``b`` differ (dicts by key, lists by
    index) and the two values there, shortened."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return sub, _short(a.get(key, "(none)")), _short(b.get(key, "(none)"))
            if digest(a[key]) != digest(b[key]):
                return _first_difference(a[key], b[key], sub)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if digest(x) != digest(y):
                return _first_difference(x, y, f"{path}[{i}]")
    return path, _short(a), _short(b)


def agree(comm: SerialComm, fields: Mapping[str, Any]) -> None:
    """Check that every process has the same ``fields`` (e.g. ``{"flownp version": ...,
    "options": ..., "training data": ...}``): one allgather of their hashes; when one
    differs, a second gathers the differing values so that the error names the difference.

    Raises :class:`DistributedError` (collective: every process raises it), one line:
    ``processes disagree on options: "train --steps 2" on process 0, "train --steps 3" on
    process 1``."""
    if comm.size == 1:
        return
    mine = {name: digest(value) for name, value in fields.items()}
    hashes = comm.allgather(mine)
    for name in fields:
        odd = [r for r, h in enumerate(hashes) if h.get(name) != hashes[0].get(name)]
        if not odd:
            continue
        values = comm.allgather(fields.get(name) if comm.rank in (0, odd[0]) else None)
        where, first, other = _first_difference(values[0], values[odd[0]])
        more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
        raise collective(
            DistributedError(
                f"processes disagree on {name}{' ' + where if where else ''}: {first} on "
                f"process 0, {other} on process {odd[0]}{more}; start every process with the "
                "same flownp, options and data"
            )
        )


# ---------------------------------------------------------------------- errors of all processes
def _rebuild(cls: type, message: str) -> BaseException:
    """An exception of class ``cls`` (DistributedError if it cannot be built) with ``message``."""
    try:
        exc = cls(message)
    except Exception:  # an exception class with another signature
        exc = DistributedError(message)
    return exc


def on_root(comm: SerialComm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on process 0 and give every process its result, or raise its error
    everywhere (collective): writes to the run folder go through here, so a failure on
    process 0 (disk full, read-only folder) ends every process with the same one message.

    One process: ``fn()`` itself (its exceptions unchanged)."""
    if comm.size == 1:
        return fn()
    if comm.is_root:
        try:
            result = fn()
        except Exception as exc:
            comm.bcast(("error", (type(exc), str(exc))))
            raise collective(exc) from None
        comm.bcast(("ok", result))
        return result
    kind, value = comm.bcast(None)
    if kind == "ok":
        return value
    raise collective(_rebuild(*value))


def together(comm: SerialComm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every process (local work only: no collective inside) and raise on every
    process when it failed on any (collective): the error of the lowest failing process,
    named ``process k: ...`` unless it is process 0's. So a bad option or a data file missing
    on one node gives one message, not a hang.

    One process: ``fn()`` itself."""
    if comm.size == 1:
        return fn()
    try:
        result, local = fn(), None
    except Exception as exc:
        result, local = None, exc
    raise_first_failure(comm, comm.allgather(failure(local)), local)
    return result  # type: ignore[return-value]


def failure(exc: BaseException | None) -> tuple[type, str] | None:
    """What other processes need to know of ``exc`` (None: no error)."""
    return None if exc is None else (type(exc), str(exc))


def raise_first_failure(
    comm: SerialComm, failures: Sequence[tuple[type, str] | None], local: BaseException | None
) -> None:
    """``failures``: every process's :func:`failure` (an allgather's result). Raise the
    lowest failing process's error on every process (collective), named ``process k: ...``
    unless it is process 0's; nothing when none failed."""
    failed = [r for r, f in enumerate(failures) if f is not None]
    if not failed:
        return
    first = failed[0]
    if first == comm.rank and first == 0 and local is not None:
        raise collective(local)
    cls, message = failures[first]  # type: ignore[misc]
    raise collective(_rebuild(cls, message if first == 0 else f"process {first}: {message}"))


def software() -> dict[str, str]:
    """flownp's version and a SHA-256 of its source files: two processes running different
    code (another install on another node) differ here even when the version is the same."""
    import flownp

    root = os.path.dirname(os.path.abspath(flownp.__file__))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return {"version": flownp.__version__, "source": h.hexdigest()[:16]}
