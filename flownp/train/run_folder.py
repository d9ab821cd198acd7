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


def check_run_folder(
    out_dir: str | os.PathLike, *, overwrite: bool = False, resume_from: Any = None
) -> None:
    """Refuse a run folder that is a file, or that already holds a checkpoint (unless it is
    the one being resumed, or ``overwrite``): an existing run is never replaced silently."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"run folder {out} exists and is not a folder; give --out a folder")
    ckpt = out / "checkpoint.h5"
    if not ckpt.exists() or overwrite:
        return
    if resume_from is not None and ckpt.resolve() == Path(resume_from).resolve():
        return
    raise UsageError(
        f"{out} already holds a training run ({ckpt}); continue it with --resume {ckpt}, "
        "replace it with --overwrite, or choose another --out"
    )


# ---------------------------------------------------------------------- the usable-state rule
def held_out_check(
    model: FlowModel, optimizer: Any, images: np.ndarray, seed: int
) -> tuple[float, float]:
    """Bits/dim of ``images`` (fixed noise from ``seed``) with the raw and with the EMA weights
    (NaN when non-finite)."""

    def bpd() -> float:
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return evaluate_bpd(model, images, batch_size=len(images), seed=seed)
        except (NonFiniteError, FloatingPointError, SingularKernelError):
            model.clear_cache()
            return float("nan")

    raw = bpd()
    with optimizer.ema_weights():
        ema = bpd()
    return raw, ema


def unusable_reason(
    model: FlowModel, optimizer: Any, consecutive_bad: int, images: np.ndarray, seed: int
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
    raw, ema = held_out_check(model, optimizer, images, seed)
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
        """Create the folder and write ``config.json``."""
        if self.path is None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        except OSError as exc:
            raise WriteError(
                f"cannot write the run folder {self.path}: {exc.strerror or exc}"
            ) from None

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
        self, x: np.ndarray, title: str, path: str | os.PathLike | None = None
    ) -> Path:
        """``x`` as an image grid (default: the folder's ``samples.png``)."""
        path = Path(path) if path is not None else self.path / "samples.png"  # type: ignore[operator]
        try:
            return save_grid(x, path, title=title)
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
