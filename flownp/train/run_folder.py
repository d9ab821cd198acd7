r"""The run folder: what a training run writes, when, and what happens on a signal.

Files (all written through :class:`RunFolder`)::

    config.json      the model and training configurations        at the start
    checkpoint.h5    everything needed to resume (atomic)         start, checkpoints, end, signal
    metrics.csv      one row per step (atomic)                     with every checkpoint
    loss_curve.png   the training and held-out bits/dim            with every checkpoint
    stability.txt    the last inverse-stability table              every stability measurement
    samples.png      64 samples (EMA weights)                      at the end

Save policy: a state is written only when it is *usable* (:func:`unusable_reason`): the last
step was not bad, every parameter, optimizer moment and EMA weight is finite, and the bits/dim of
the first ``CHECK_IMAGES`` = 16 held-out images is finite with the raw and with the EMA
weights. A fresh run writes its initialised state (step 0) first, so the folder always holds a
usable checkpoint. A state that is not usable at a periodic checkpoint is not written (the
previous file stays); a broken state (NaN/Inf, or a non-finite held-out check) stops training
as diverged (:class:`TrainingDiverged`), and the message says which step the folder holds
and how to go on (``--resume`` with a smaller ``--lr`` and a new ``--warmup-steps``).

One process at a time (:class:`RunLock`): a process that trains into a folder holds an
exclusive lock on ``FOLDER/.lock`` from before it writes anything until it ends; a second
process (another ``train --out``, a ``--resume`` of a run still training) is refused with a
:class:`~flownp.errors.UsageError` naming the process that holds it. A folder that holds a
run's files (``config.json``, ``metrics.csv`` ...) but no checkpoint is not a run folder: it is
refused without ``overwrite`` (:func:`check_run_folder`), so a user's own files are never
replaced.

Signals (:class:`StopOnSignal`, installed by :meth:`flownp.train.Trainer.run` from the main
thread): SIGINT (Ctrl-C) or SIGTERM lets the current step finish, writes the checkpoint (if
usable), ``metrics.csv`` and ``loss_curve.png``, and raises :class:`TrainingInterrupted` (a
``KeyboardInterrupt``; the command exits with 130). A second signal aborts at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flownp.checkpoint import save_checkpoint
from flownp.errors import (
    CheckpointError,
    NonFiniteError,
    SingularKernelError,
    UsageError,
    WriteError,
)
from flownp.figures import plot_loss_curve, save_grid
from flownp.files import write_atomic
from flownp.model import FlowModel
from flownp.train.evaluation import evaluate_bpd
from flownp.train.metrics import Metrics, write_metrics_csv

CHECK_IMAGES = 16  # held-out images of the usability check before each write


class TrainingDiverged(NonFiniteError):
    """Too many bad steps in a row (non-finite, or the loss far above its recent level), or a
    state that gives a non-finite held-out loss. ``checkpoint_step`` is the step the run
    folder's checkpoint holds (None without one)."""

    checkpoint_step: int | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :meth:`flownp.train.Trainer.run` after a complete step; the
    checkpoint and the curves were written (``checkpoint_step`` is the step the checkpoint
    holds)."""

    checkpoint_step: int | None = None


class StopOnSignal:
    """Context manager: SIGINT / SIGTERM set ``signum`` instead of interrupting, so the loop can
    finish its step and save; a second signal raises ``KeyboardInterrupt`` at once. Installed
    only in the main thread (Python delivers signals there); elsewhere it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                with contextlib.suppress(ValueError, OSError):
                    previous = signal.signal(sig, self._handle)
                    # None: a handler not installed from Python, which cannot be put back
                    self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborted at once")
        self.signum = signum
        self.log(
            f"{signal.Signals(signum).name} received: finishing the current step, then saving "
            "(send it again to abort at once, without saving)"
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: The files a run writes into its folder (besides the lock).
RUN_FILES = (
    "checkpoint.h5",
    "config.json",
    "metrics.csv",
    "loss_curve.png",
    "stability.txt",
    "samples.png",
)


class RunLock:
    """An exclusive lock on a folder, so that one process at a time writes into it.

    ``acquire()`` creates the folder if needed and takes an advisory ``flock`` on
    ``FOLDER/.lock`` (which records the holder's process id); it raises
    :class:`~flownp.errors.UsageError` at once when another process holds it. The operating
    system releases the lock when the holder ends, also when it is killed, so a stale lock
    cannot block a folder. Use as a context manager or with ``acquire()`` / ``release()``;
    :meth:`holder` asks without taking it. (Where ``fcntl`` does not exist the lock does
    nothing.)
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = _read_pid(fd)
            os.close(fd)
            raise UsageError(self._busy(pid)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @classmethod
    def holder(cls, folder: str | os.PathLike) -> int | None:
        """The process id holding the lock of ``folder`` (0 if unknown), or None when no
        process holds it. Creates nothing."""
        path = Path(folder) / cls.NAME
        try:
            import fcntl

            fd = os.open(path, os.O_RDWR)
        except (ImportError, OSError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd)
        finally:
            os.close(fd)  # closing also releases a lock this call took
        return None

    def _busy(self, pid: int) -> str:
        who = f"another flownp process (pid {pid})" if pid else "another flownp process"
        return (
            f"{self.folder} is in use: {who} is training into it; wait for it to end, or "
            "choose another --out"
        )


def _read_pid(fd: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    return 0


def check_run_folder(
    out_dir: str | os.PathLike, *, overwrite: bool = False, resume_from: Any = None
) -> None:
    """Refuse, before any data is loaded: a run folder that is a file; one another process is
    training into (:class:`RunLock`, whatever ``overwrite``); one that already holds a
    checkpoint (unless it is the one being resumed, or ``overwrite``); and a folder that holds
    files a run writes (``config.json``, ``metrics.csv``, ...) without a checkpoint, i.e. not
    a run folder (unless ``overwrite``). An existing run or a user's files are never replaced
    silently."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"run folder {out} exists and is not a folder; give --out a folder")
    pid = RunLock.holder(out)
    if pid is not None:
        raise UsageError(RunLock(out)._busy(pid))
    ckpt = out / "checkpoint.h5"
    if not ckpt.exists():
        found = [n for n in RUN_FILES if (out / n).exists()]
        if found and not overwrite:
            raise UsageError(
                f"{out} is not a run folder (no checkpoint.h5) but holds {', '.join(found)}, "
                "which a run would replace; choose another --out, or give --overwrite"
            )
        return
    if overwrite:
        return
    if resume_from is not None and ckpt.resolve() == Path(resume_from).resolve():
        return
    raise UsageError(
        f"{out} already holds a training run ({ckpt}); continue it with --resume {ckpt}, "
        "replace it with --overwrite, or choose another --out"
    )


# ---------------------------------------------------------------------- the usable-state rule
def held_out_check(
    model: FlowModel,
    optimizer: Any,
    images: np.ndarray,
    seed: int,
    labels: np.ndarray | None = None,
) -> tuple[float, float]:
    """Bits/dim of ``images`` (fixed noise from ``seed``; given their ``labels`` for a
    class-conditional model) with the raw and with the EMA weights (NaN when non-finite)."""

    def bpd() -> float:
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return evaluate_bpd(model, images, labels=labels, batch_size=len(images), seed=seed)
        except (NonFiniteError, FloatingPointError, SingularKernelError):
            model.clear_cache()
            return float("nan")

    raw = bpd()
    with optimizer.ema_weights():
        ema = bpd()
    return raw, ema


def unusable_reason(
    model: FlowModel,
    optimizer: Any,
    consecutive_bad: int,
    images: np.ndarray,
    seed: int,
    labels: np.ndarray | None = None,
) -> tuple[str | None, bool]:
    """Why the current state must not be written, or None; and whether that is fatal.

    Not usable: the last step was bad (the state may be the result of a blow-up; not
    fatal, the next checkpoint may be fine), a NaN/Inf in a parameter, optimizer moment or EMA
    weight (fatal), or a non-finite :func:`held_out_check` on ``images`` (fatal)."""
    if consecutive_bad:
        return (
            f"the last {consecutive_bad} step(s) were bad (non-finite, or the loss far "
            "above its recent level)",
            False,
        )
    arrays = {f"params/{k}": p for k, p in model.params.items()}
    for name in ("m", "v", "u", "ema"):  # Adam's v or Adamax's u
        for k, a in (getattr(optimizer, name, None) or {}).items():
            arrays[f"optimizer/{name}/{k}"] = a
    bad = [k for k, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        return f"NaN/Inf values in {', '.join(bad[:5])}", True
    raw, ema = held_out_check(model, optimizer, images, seed, labels)
    if not (math.isfinite(raw) and math.isfinite(ema)):
        return (
            f"the held-out check ({len(images)} images) gives bits/dim {raw} with the raw "
            f"weights and {ema} with the EMA weights",
            True,
        )
    return None, False


# ---------------------------------------------------------------------- the folder
class RunFolder:
    """The files of one run under ``path`` (None: a run that writes nothing).

    ``checkpoint_step`` is the step ``checkpoint.h5`` holds (None before the first write).
    Every file a run writes goes through this object.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.checkpoint_step: int | None = None
        self.lock = None if self.path is None else RunLock(self.path)

    @property
    def checkpoint(self) -> Path | None:
        return None if self.path is None else self.path / "checkpoint.h5"

    def holds(self) -> str:
        """``"<path> holds step N"`` (or that there is none)."""
        if self.path is None:
            return "no run folder, nothing was saved"
        if self.checkpoint_step is None:
            return f"no checkpoint was written to {self.checkpoint}"
        return f"{self.checkpoint} holds step {self.checkpoint_step}"

    def start(self, config: dict[str, Any]) -> None:
        """Create the folder, take its :class:`RunLock` (held until :meth:`close`) and write
        ``config.json``."""
        if self.path is None or self.lock is None:
            return
        try:
            self.lock.acquire()  # before anything is written
            write_atomic(self.path / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        except OSError as exc:
            self.close()
            raise WriteError(
                f"cannot write the run folder {self.path}: {exc.strerror or exc}"
            ) from None

    def close(self) -> None:
        """Release the folder's lock (the files stay)."""
        if self.lock is not None:
            self.lock.release()

    def write_checkpoint(
        self,
        path: str | os.PathLike | None,
        model: FlowModel,
        *,
        step: int,
        optimizer: Any,
        train_state: dict[str, Any],
        train_config: dict[str, Any],
        metrics: Metrics,
    ) -> Path:
        """Atomic checkpoint to ``path`` (default: the folder's ``checkpoint.h5``)."""
        default = self.checkpoint
        if path is None:
            if default is None:
                raise ValueError("Trainer.save: no path and no out_dir")
            path = default
        written = save_checkpoint(
            path,
            model,
            optimizer=optimizer,
            train_state=train_state,
            train_config=train_config,
            metrics=metrics,
        )
        if default is not None and Path(path).resolve() == default.resolve():
            self.checkpoint_step = step
        return written

    def explain_failed_write(self, step: int, exc: CheckpointError) -> CheckpointError:
        """A failed checkpoint write (disk full, ...) that says which step the file holds."""
        return CheckpointError(f"step {step}: {exc}; {self.holds()}")

    def write_curves(self, metrics: Metrics, step: int, log: Callable[[str], None]) -> None:
        """metrics.csv and loss_curve.png (a failure is logged)."""
        if self.path is None:
            return
        try:
            write_metrics_csv(metrics, self.path / "metrics.csv")
            self.plot_loss_curve(metrics, self.path / "loss_curve.png")
        except WriteError as exc:
            log(f"step {step}: {exc}")

    @staticmethod
    def plot_loss_curve(metrics: Metrics, path: str | os.PathLike) -> Path:
        try:
            return plot_loss_curve(metrics, path)
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write_samples(
        self,
        x: np.ndarray,
        title: str,
        path: str | os.PathLike | None = None,
        *,
        ncols: int | None = None,
        n_bits: int = 8,
    ) -> Path:
        """``x`` as an image grid (default: the folder's ``samples.png``) of ``ncols`` columns
        (default: square); ``n_bits`` of the model that drew them."""
        path = Path(path) if path is not None else self.path / "samples.png"  # type: ignore[operator]
        try:
            return save_grid(x, path, title=title, ncols=ncols, n_bits=n_bits)
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write_text(self, name: str, text: str) -> None:
        """``name`` in the folder (nothing without a folder)."""
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / name).write_text(text)

    # ------------------------------------------------------------------ stopping
    def diverged(self, why: str, step: int, lr: float, warmup_steps: int) -> TrainingDiverged:
        """The error of a diverged run: which step the folder holds and how to go on."""
        msg = f"training diverged at step {step}: {why}; {self.holds()}"
        if self.checkpoint is not None and self.checkpoint_step is not None:
            msg += (
                f", the last usable state; to go on from it with a smaller learning rate: "
                f"flownp train --resume {self.checkpoint} --lr {min(lr / 10, 1e-3):.3g} "
                f"--warmup-steps {max(warmup_steps, 100)}"
            )
        else:
            msg += f"; start again with a smaller learning rate (--lr {min(lr / 10, 1e-3):.3g})"
        exc = TrainingDiverged(msg)
        exc.checkpoint_step = self.checkpoint_step
        return exc

    def interrupted(self, signum: int, step: int, steps: int, written: bool) -> TrainingInterrupted:
        """The error of an interrupted run (``written``: the state at the signal was saved)."""
        name = signal.Signals(signum).name
        msg = f"{name}: stopped after step {step} of {steps}; {self.holds()}"
        if self.checkpoint_step is not None:
            msg += f"; go on with: flownp train --resume {self.checkpoint}"
        if not written and self.path is not None:
            msg += " (the state at the interruption was not usable)"
        exc = TrainingInterrupted(msg)
        exc.checkpoint_step = self.checkpoint_step
        return exc
