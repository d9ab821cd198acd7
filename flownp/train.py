r"""Training: dequantisation, the bits/dim loss, the training loop, evaluation, run folders.

The recipe (openai/glow lineage, ``docs/training.md``)::

    x      = u / 256 - 0.5 + U(0, 1/256)            u in {0..255}: uniform dequantisation
    log p  = sum_i log N(z_i; 0, 1) + logdet(x)     (z, logdet) = model.forward(x)
    bpd    = (-log p(x) + D ln 256) / (D ln 2)      bits per dimension, D = H * W * C
    loss   = mean over the batch of bpd

    d loss / d z      = z / (N D ln 2)
    d loss / d logdet = -1 / (N D ln 2)

A uniform model (p = 1 on [-0.5, 0.5]^D) scores exactly 8 bits/dim.

Training loop (:class:`Trainer`): data-dependent initialisation of every actnorm on a first
batch; Adam (:mod:`flownp.optim`) with warmup, clipping and EMA weights; held-out evaluation
with the EMA weights every ``eval_every`` steps and at the end; atomic checkpoints every
``checkpoint_every`` steps and at the end. A step whose loss or gradient is NaN/Inf is
*rejected*: the update is not applied (so the parameters stay at the last good state), the
event is reported and counted, and training goes on with the next batch.

Blow-up rule (:class:`LossMonitor`): a step is *bad* when it is rejected, or when its loss is
more than twice its recent level, ``loss > level + max(BLOWUP_MARGIN, level)`` with
``BLOWUP_MARGIN`` = 1 bit/dim and ``level`` the median of the last ``BLOWUP_WINDOW`` = 50
accepted, not-bad losses (judged once 10 such losses exist). Single-batch spikes of small
batches recover within a step or two; a blow-up does not. After ``max_bad_steps`` bad
steps in a row, training stops with :class:`TrainingDiverged`, and the current state is *not*
saved: the run folder keeps its last usable checkpoint, and the message says which step it
holds and how to go on (``--resume`` with a smaller ``--lr`` and a new ``--warmup-steps``).

A state is written only when it is *usable* (:meth:`Trainer.unusable_reason`): the last step
was not bad, every parameter, Adam moment and EMA weight is finite, and the bits/dim of the
first 16 held-out images is finite with the raw and with the EMA weights. A fresh run writes
its initialised state (step 0) first, so the run folder always holds a usable checkpoint. A
state that is not usable at a periodic checkpoint is not written (the previous file stays);
a non-finite held-out check stops training as diverged.

Interruption: inside :meth:`Trainer.run` (from the main thread, also from the Python API),
SIGINT (Ctrl-C) or SIGTERM lets the current step finish, writes the checkpoint (if usable),
``metrics.csv`` and ``loss_curve.png``, and raises :class:`TrainingInterrupted` (a
``KeyboardInterrupt``; the command exits with 130). A second signal aborts at once.

Exact resume: the checkpoint holds the dequantisation RNG state (numpy ``bit_generator.state``)
and the data position (epoch, index in that epoch's permutation; the permutation of epoch
``e`` is ``default_rng([seed, 3, e]).permutation(n)``), so a resumed run computes the same
losses as an uninterrupted one (same machine and thread count).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flownp.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from flownp.data.pixels import dequantize
from flownp.digits import report_training as report_digits
from flownp.errors import (
    CheckpointError,
    DataError,
    NonFiniteError,
    SingularKernelError,
    UsageError,
    WriteError,
)
from flownp.figures import plot_loss_curve, save_grid
from flownp.model import SAMPLE_TEMPERATURE, FlowConfig, FlowModel
from flownp.optim import Adam
from flownp.progress import Progress

LN2 = math.log(2.0)
LN256 = math.log(256.0)

TRAIN_COLUMNS = ("step", "epoch", "bpd", "lr", "grad_norm", "rejected", "images_per_s", "elapsed")
EVAL_COLUMNS = ("step", "bpd", "elapsed")
STABILITY_COLUMNS = (
    "step",
    "roundtrip_f32",
    "roundtrip_f64",
    "max_layer_roundtrip_f32",
    "max_norm_inf",
    "max_growth",
    "max_block_ratio",
    "layers_not_ok",
)
# the end-of-training digit-classifier report of MNIST-shaped models (flownp.digits)
DIGITS_COLUMNS = ("step", "temperature", "samples", "share", "real_share")


BLOWUP_WINDOW = 50  # accepted losses the recent level is the median of
BLOWUP_MARGIN = 1.0  # bad: loss > level + max(BLOWUP_MARGIN, level) (bits/dim)
BLOWUP_MIN_HISTORY = 10  # losses needed before the rule judges
CHECK_IMAGES = 16  # held-out images of the usability check before each write


class TrainingDiverged(NonFiniteError):
    """Too many bad steps in a row (non-finite, or the loss far above its recent level), or a
    state that gives a non-finite held-out loss. ``checkpoint_step`` is the step the run
    folder's checkpoint holds (None without one)."""

    checkpoint_step: int | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :meth:`Trainer.run` after a complete step; the checkpoint and
    the curves were written (``checkpoint_step`` is the step the checkpoint holds)."""

    checkpoint_step: int | None = None


class LossMonitor:
    """The blow-up rule: is a loss far above its recent level?

    ``level`` is the median of the last ``window`` accepted losses that were not themselves
    high; a loss is *high* when ``loss > level + max(margin, level)`` (bits/dim: more than
    twice the level, and at least ``margin`` above it), once ``min_history`` losses exist. A
    high loss is not added to the window, so a sustained climb stays high.
    """

    def __init__(
        self,
        window: int = BLOWUP_WINDOW,
        margin: float = BLOWUP_MARGIN,
        min_history: int = BLOWUP_MIN_HISTORY,
    ) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.margin = float(margin)
        self.min_history = int(min_history)

    def level(self) -> float:
        """Median of the recent losses (NaN while fewer than ``min_history``)."""
        if len(self.recent) < self.min_history:
            return float("nan")
        return float(np.median(np.asarray(self.recent)))

    def is_high(self, loss: float) -> bool:
        lvl = self.level()
        return bool(np.isfinite(lvl) and loss > lvl + max(self.margin, lvl))

    def threshold(self) -> float:
        """The loss above which a step is high: ``level + max(margin, level)``."""
        lvl = self.level()
        return lvl + max(self.margin, lvl)

    def add(self, loss: float) -> None:
        if np.isfinite(loss):
            self.recent.append(float(loss))


class _StopOnSignal:
    """Context manager: SIGINT / SIGTERM set ``signum`` instead of interrupting, so the loop can
    finish its step and save; a second signal raises ``KeyboardInterrupt`` at once. Installed
    only in the main thread (Python delivers signals there); elsewhere it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
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


def bits_per_dim(z: np.ndarray, logdet: np.ndarray) -> np.ndarray:
    """Per-sample bits/dim ``(-log p(x) + D ln 256) / (D ln 2)`` from ``model.forward``'s
    outputs (``z`` of shape ``(N, D)``), in float64."""
    from flownp.model import log_normal

    D = z.shape[1]
    log_p = log_normal(z) + logdet.astype(np.float64)
    return (-log_p + D * LN256) / (D * LN2)


def bpd_loss(z: np.ndarray, logdet: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``loss = mean(bits_per_dim(z, logdet))`` and its gradients ``(loss, dz, dlogdet)``."""
    N, D = z.shape
    loss = float(np.mean(bits_per_dim(z, logdet)))
    c = 1.0 / (N * D * LN2)
    dz = z * z.dtype.type(c)  # (N, D)
    dlogdet = np.full(N, -c)  # (N,)
    return loss, dz, dlogdet


def evaluate_bpd(
    model: FlowModel,
    images: np.ndarray,
    *,
    batch_size: int = 500,
    seed: int = 1234,
    progress: bool = False,
) -> float:
    """Mean bits/dim of uint8 ``images`` under ``model`` (dequantisation noise from a fixed
    ``seed``, so the number is reproducible). Returns NaN (never hides it) if any is NaN."""
    rng = np.random.default_rng(seed)
    total, n = 0.0, len(images)
    with Progress(n, desc="evaluate", unit="image", enabled=progress, lines=10) as bar:
        for start in range(0, n, batch_size):
            x = dequantize(images[start : start + batch_size], rng, model.dtype)
            z, logdet = model.forward(x)
            model.clear_cache()
            total += float(np.sum(bits_per_dim(z, logdet)))
            bar.update(len(x))
    return total / n


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the defaults are the measured ``flownp train`` defaults).

    Parameters
    ----------
    dataset : str
        Dataset spec for :func:`flownp.data.load_dataset` (``"mnist"`` = bundled MNIST).
    holdout : int or None
        Held-out images (None: the dataset's own split).
    steps : int
        Total training steps (batches), counting rejected ones.
    batch_size : int
    lr, warmup_steps, max_grad_norm, ema_decay
        Adam settings (:class:`flownp.optim.Adam`).
    init_batch_size : int
        Images for the data-dependent actnorm initialisation.
    eval_every : int
        Held-out evaluation period in steps (0 = only at the end).
    eval_size : int or None
        Held-out images used by the periodic evaluations (None = all); the final one uses all.
    checkpoint_every : int
        Checkpoint period in steps (0 = only at the end).
    max_bad_steps : int
        Consecutive bad steps (rejected as non-finite, or a loss far above its recent level,
        see :class:`LossMonitor`) before training stops.
    seed : int
        Seeds the model initialisation, the data order and the dequantisation noise.
    time_limit : float or None
        Stop (cleanly, with final evaluation and checkpoint) after this many seconds.
    stability_threshold : float
        At every checkpoint the inverse is measured on ``stability_images`` held-out images
        (:func:`flownp.stability.measure_model_stability`, EMA weights); a float32
        reconstruction error above this (or a layer over its own thresholds) is logged as a
        warning. The numbers go to ``metrics["stability"]``.
    stability_images : int
        Held-out images of that measurement (0 = no measurement).
    dataset_fingerprint : dict or None
        Shape, dtype and SHA-256 of the training data (:func:`flownp.data.fingerprint`), set by
        :class:`Trainer` when training starts; data loaded to resume or evaluate the run is
        checked against it.
    warmup_start : int
        Optimizer step after which the warmup starts (a resume with a new ``warmup_steps``
        sets it to the step it resumes from, see :class:`flownp.optim.Adam`).
    """

    dataset: str = "mnist"
    holdout: int | None = None
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    max_grad_norm: float | None = 100.0
    ema_decay: float | None = 0.999
    init_batch_size: int = 512
    eval_every: int = 500
    eval_size: int | None = 500
    checkpoint_every: int = 500
    max_bad_steps: int = 5
    seed: int = 0
    time_limit: float | None = None
    stability_threshold: float = 1e-4
    stability_images: int = 16
    dataset_fingerprint: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    warmup_start: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "init_batch_size", "max_bad_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed", "warmup_start"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got {self.lr!r}")
        if self.holdout is not None and int(self.holdout) < 1:
            raise ValueError(f"TrainConfig: holdout must be >= 1 or None, got {self.holdout!r}")
        if self.max_grad_norm is not None and not (
            self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)
        ):
            raise ValueError(
                f"TrainConfig: max_grad_norm must be a finite number > 0 or None, got "
                f"{self.max_grad_norm!r}"
            )
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(
                f"TrainConfig: ema_decay must be in [0, 1) or None, got {self.ema_decay!r}"
            )
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"TrainConfig: eval_size must be >= 1 or None, got {self.eval_size}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"TrainConfig: time_limit must be > 0, got {self.time_limit!r}")
        if not self.stability_threshold > 0:
            raise ValueError(
                f"TrainConfig: stability_threshold must be > 0, got {self.stability_threshold!r}"
            )
        if int(self.stability_images) < 0:
            raise ValueError(
                f"TrainConfig: stability_images must be >= 0, got {self.stability_images!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        return cls(**d)


def load_data(spec: str, holdout: int | None = None) -> Any:
    """:func:`flownp.data.load_dataset` (imported lazily)."""
    from flownp.data import load_dataset

    return load_dataset(spec, holdout=holdout)


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns."""

    steps: int
    heldout_bpd: float
    train_bpd: float
    wall_time: float
    rejected_total: int
    stopped_early: bool
    out_dir: Path | None


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Owns a model, its optimizer, the data stream and the metrics; runs the loop.

    Parameters
    ----------
    model_config : FlowConfig
    train_config : TrainConfig
    data : object with ``train`` and ``test`` uint8 NHWC arrays (a :class:`flownp.data.Dataset`)
        or None to load ``train_config.dataset``.
    out_dir : directory of the run (checkpoint.h5, metrics.csv, loss_curve.png, samples.png,
        config.json), or None to write nothing.
    progress : show progress (:class:`flownp.progress.Progress`: a bar on a terminal, plain
        lines every 2% of the run otherwise).
    log : where messages go (default: stderr, without breaking a bar).
    overwrite : allow ``out_dir`` to hold a checkpoint already (it is replaced); without it
        that is a :class:`~flownp.errors.UsageError` (see :func:`check_run_folder`).
    """

    def __init__(
        self,
        model_config: FlowConfig,
        train_config: TrainConfig,
        data: Any = None,
        *,
        out_dir: str | os.PathLike | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        overwrite: bool = False,
        _initialize: bool = True,
    ) -> None:
        from flownp.data import absolute_spec, check_fingerprint, fingerprint

        if out_dir is not None and _initialize:
            check_run_folder(out_dir, overwrite=overwrite)
        self.model_config = model_config
        self.config = tc = dataclasses.replace(
            train_config, dataset=absolute_spec(train_config.dataset)
        )
        self.data = data if data is not None else load_data(tc.dataset, tc.holdout)
        self._check_data()
        if tc.dataset_fingerprint is None:  # a new run: remember what it trains on
            tc = dataclasses.replace(tc, dataset_fingerprint=fingerprint(self.data))
        else:  # a resumed run: the data must be the same
            check_fingerprint(self.data, tc.dataset_fingerprint, "resume")
        self.config = tc
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress = progress
        self.log = log or _default_log
        self.model = FlowModel(model_config, seed=tc.seed)
        self.rng = np.random.default_rng([tc.seed, 1])  # dequantisation noise (saved)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.consecutive_bad = 0
        self.rejected_total = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []  # settings changed at each resume
        self.checkpoint_step: int | None = None  # the step out_dir/checkpoint.h5 holds
        self.monitor = LossMonitor()
        self.metrics: dict[str, dict[str, list[float]]] = {
            "train": {c: [] for c in TRAIN_COLUMNS},
            "eval": {c: [] for c in EVAL_COLUMNS},
            "stability": {c: [] for c in STABILITY_COLUMNS},
            "digits": {c: [] for c in DIGITS_COLUMNS},
        }
        self._perm_cache: tuple[int, np.ndarray] | None = None
        if _initialize:
            self.data_dependent_init()
        self.optimizer = Adam(
            self.model.params,
            lr=tc.lr,
            warmup_steps=tc.warmup_steps,
            warmup_start=tc.warmup_start,
            max_grad_norm=tc.max_grad_norm,
            ema_decay=tc.ema_decay,
        )

    # ------------------------------------------------------------------ construction
    def _check_data(self) -> None:
        tr, te = getattr(self.data, "train", None), getattr(self.data, "test", None)
        for name, arr in (("train", tr), ("test", te)):
            if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4:
                raise DataError(f"Trainer: data.{name} must be a uint8 NHWC array")
            if arr.shape[1:] != self.model_config.image_shape:
                raise DataError(
                    f"Trainer: data.{name} images are {arr.shape[1:]}, the model expects "
                    f"{self.model_config.image_shape}"
                )
            if len(arr) == 0:
                raise DataError(f"Trainer: data.{name} is empty")
        if self.config.batch_size > len(tr):
            raise DataError(
                f"Trainer: batch_size {self.config.batch_size} exceeds the {len(tr)} training "
                "images"
            )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        data: Any = None,
        *,
        steps: int | None = None,
        lr: float | None = None,
        warmup_steps: int | None = None,
        dataset: str | None = None,
        out_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Trainer:
        """Continue the training saved in ``path`` exactly where it stopped.

        ``steps`` overrides the total number of steps (default: the run's own). ``lr`` and
        ``warmup_steps`` change the learning rate from here on (e.g. after a divergence); a
        new ``warmup_steps`` restarts the warmup at the resumed step. Every change is recorded
        in the checkpoint's ``history``. ``dataset`` points at the training data when it has
        moved (it must have the fingerprint stored at training time). ``out_dir`` (default: the
        checkpoint's folder) must not hold another run unless ``overwrite``.
        """
        ckpt = read_checkpoint(path)
        if ckpt.train_state is None or ckpt.optimizer_state is None or ckpt.train_config is None:
            raise CheckpointError(f"{path} holds a model only, no training state to resume")
        try:
            old = TrainConfig.from_dict(ckpt.train_config)
            changes: dict[str, Any] = {}
            if steps is not None:
                changes["steps"] = int(steps)
            if lr is not None:
                changes["lr"] = float(lr)
            if warmup_steps is not None:
                changes["warmup_steps"] = int(warmup_steps)
                changes["warmup_start"] = int(ckpt.optimizer_state["t"])
            if dataset is not None:
                changes["dataset"] = dataset
            tc = dataclasses.replace(old, **changes)
            mc = FlowConfig.from_dict(ckpt.model_config)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"cannot resume {path}: {exc}") from None
        if out_dir is not None:
            check_run_folder(out_dir, overwrite=overwrite, resume_from=path)
        self = cls(
            mc,
            tc,
            data,
            out_dir=out_dir if out_dir is not None else Path(path).parent,
            progress=progress,
            log=log,
            _initialize=False,
        )
        self._restore(ckpt)
        diff = {
            k: [getattr(old, k), v]
            for k, v in changes.items()
            if getattr(old, k) != v and k != "warmup_start"
        }
        if diff:
            self.history.append(
                {
                    "step": self.step,
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "changes": diff,
                }
            )
        if (
            self.out_dir is not None
            and Path(path).resolve() != (self.out_dir / "checkpoint.h5").resolve()
        ):
            self.checkpoint_step = None  # a new folder: nothing written there yet
        return self

    def _restore(self, ckpt: Checkpoint) -> None:
        loaded = model_from_checkpoint(ckpt, use_ema=False)
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(ckpt.optimizer_state)  # type: ignore[arg-type]
        ts = ckpt.train_state
        assert ts is not None
        self.step = ts["step"]
        self.epoch = ts["epoch"]
        self.position = ts["position"]
        self.consecutive_bad = ts["consecutive_bad"]
        self.rejected_total = ts["rejected_total"]
        self.elapsed = ts["elapsed"]
        self.rng.bit_generator.state = ts["rng_state"]
        self.history = list(ts.get("history") or [])
        self.checkpoint_step = self.step
        for table, cols in self.metrics.items():
            stored = ckpt.metrics.get(table, {})
            for c in cols:
                cols[c] = [float(v) for v in stored.get(c, [])]
        tr = self.metrics["train"]
        for bpd, rejected in zip(tr["bpd"], tr["rejected"], strict=True):
            if not rejected and not self.monitor.is_high(bpd):  # as the live run judged it
                self.monitor.add(bpd)

    def data_dependent_init(self) -> None:
        """Initialise every actnorm from ``init_batch_size`` random training images."""
        tc = self.config
        rng = np.random.default_rng([tc.seed, 2])
        n = len(self.data.train)
        idx = np.sort(rng.choice(n, size=min(tc.init_batch_size, n), replace=False))
        x = dequantize(self.data.train[idx], rng, self.model.dtype)
        self.model.initialize(x)

    # ------------------------------------------------------------------ data stream
    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            n = len(self.data.train)
            perm = np.random.default_rng([self.config.seed, 3, epoch]).permutation(n)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def next_batch(self) -> np.ndarray:
        """The next dequantised training batch (advances epoch/position and the noise RNG)."""
        B, n = self.config.batch_size, len(self.data.train)
        if self.position + B > n:  # drop the incomplete last batch of an epoch
            self.epoch += 1
            self.position = 0
        idx = self._permutation(self.epoch)[self.position : self.position + B]
        self.position += B
        return dequantize(self.data.train[np.sort(idx)], self.rng, self.model.dtype)

    # ------------------------------------------------------------------ one step
    def train_step(self, x: np.ndarray) -> dict[str, Any]:
        """Forward, loss, backward, Adam update on the batch ``x``.

        Returns ``{"ok", "bpd", "lr", "grad_norm", "error"}``. A non-finite loss or gradient
        (or a NaN inside a layer) rejects the step: ``ok`` is False, nothing is updated.
        """
        model = self.model
        model.zero_grad()
        loss = float("nan")
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                z, logdet = model.forward(x)  # checked explicitly just below
                loss, dz, dlogdet = bpd_loss(z, logdet)
                if not np.isfinite(loss):
                    raise NonFiniteError(f"loss is {loss}")
                model.backward(dz, dlogdet)
                info = self.optimizer.step(model.grads)  # refuses non-finite gradients
        except (NonFiniteError, FloatingPointError, SingularKernelError) as exc:
            model.clear_cache()
            model.zero_grad()
            return {
                "ok": False,
                "bpd": loss,
                "lr": float("nan"),
                "grad_norm": float("nan"),
                "error": str(exc),
            }
        return {
            "ok": True,
            "bpd": loss,
            "lr": info["lr"],
            "grad_norm": info["grad_norm"],
            "error": None,
        }

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, size: int | None = None) -> float:
        """Held-out bits/dim (with the EMA weights when enabled) on the first ``size`` test
        images (all when None)."""
        images = self.data.test if size is None else self.data.test[:size]
        with self.optimizer.ema_weights():
            try:
                return evaluate_bpd(self.model, images, batch_size=500)
            except (NonFiniteError, FloatingPointError) as exc:
                self.model.clear_cache()
                self.log(f"evaluation produced a non-finite value: {exc}")
                return float("nan")

    def check_stability(self) -> Any:
        """Measure the inverse (EMA weights) on the first ``stability_images`` held-out images:
        log a summary (the full table goes to ``out_dir/stability.txt``), warn when over the
        threshold, append to ``metrics["stability"]``. Returns the
        :class:`flownp.stability.ModelStability` (None when disabled)."""
        from flownp import stability as S

        tc = self.config
        if not tc.stability_images:
            return None
        images = self.data.test[: tc.stability_images]
        x = dequantize(images, np.random.default_rng([tc.seed, 4]), self.model.dtype)
        try:
            with self.optimizer.ema_weights():
                rep = S.measure_model_stability(self.model, x, threshold=tc.stability_threshold)
        except (NonFiniteError, SingularKernelError, FloatingPointError) as exc:
            self.model.clear_cache()
            msg = f"step {self.step}: INVERSE UNSTABLE: the stability measurement failed: {exc}"
            self.log(msg)
            warnings.warn(msg, S.InverseInstabilityWarning, stacklevel=2)
            row = {c: float("inf") for c in STABILITY_COLUMNS}
            row["step"] = float(self.step)
            for c, v in row.items():
                self.metrics["stability"][c].append(v)
            return None
        summ = rep.summary()
        summ["step"] = float(self.step)
        for c in STABILITY_COLUMNS:
            self.metrics["stability"][c].append(float(summ[c]))
        worst = (
            f"worst layer ||M^-1||_inf {summ['max_norm_inf']:.3g}, "
            f"round trip {summ['max_layer_roundtrip_f32']:.2e}"
            if rep.layers
            else "no layer inverts by substitution"
        )
        self.log(
            f"step {self.step}: inverse stability ({rep.num_images} held-out images): "
            f"reconstruction error float32 {rep.roundtrip_f32:.2e}, float64 "
            f"{rep.roundtrip_f64:.2e}; {worst}; {rep.status}"
        )
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "stability.txt").write_text(
                f"step {self.step}, EMA weights\n{rep.format()}\n"
            )
        warning = rep.warning()
        if warning is not None:
            self.log(f"step {self.step}: WARNING: {warning}")
            warnings.warn(warning, S.InverseInstabilityWarning, stacklevel=2)
        return rep

    # ------------------------------------------------------------------ state
    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "consecutive_bad": self.consecutive_bad,
            "rejected_total": self.rejected_total,
            "elapsed": self.elapsed,
            "rng_state": self.rng.bit_generator.state,
            "history": self.history,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Atomic checkpoint of everything needed to resume (default ``out_dir/checkpoint.h5``).

        The state must be finite (:class:`NonFiniteError` otherwise, nothing written); the
        training loop also checks :meth:`unusable_reason` first."""
        default = self.out_dir / "checkpoint.h5" if self.out_dir is not None else None
        if path is None:
            if default is None:
                raise ValueError("Trainer.save: no path and no out_dir")
            path = default
        written = save_checkpoint(
            path,
            self.model,
            optimizer=self.optimizer,
            train_state=self.train_state(),
            train_config=self.config.to_dict(),
            metrics=self.metrics,
        )
        if default is not None and Path(path).resolve() == default.resolve():
            self.checkpoint_step = self.step
        return written

    def held_out_check(self) -> tuple[float, float]:
        """Bits/dim of the first ``CHECK_IMAGES`` held-out images (fixed noise) with the raw
        and with the EMA weights (NaN when non-finite); does not touch the training RNG."""
        images = self.data.test[:CHECK_IMAGES]
        seed = self.config.seed + 5

        def bpd() -> float:
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    return evaluate_bpd(self.model, images, batch_size=CHECK_IMAGES, seed=seed)
            except (NonFiniteError, FloatingPointError, SingularKernelError):
                self.model.clear_cache()
                return float("nan")

        raw = bpd()
        with self.optimizer.ema_weights():
            ema = bpd()
        return raw, ema

    def unusable_reason(self) -> tuple[str | None, bool]:
        """Why the current state must not be written, or None; and whether that is fatal.

        Not usable: the last step was bad (the state may be the result of a blow-up; not
        fatal, the next checkpoint may be fine), a NaN/Inf in a parameter, Adam moment or EMA
        weight (fatal), or a non-finite held-out check (fatal)."""
        if self.consecutive_bad:
            return (
                f"the last {self.consecutive_bad} step(s) were bad (non-finite, or the loss far "
                "above its recent level)",
                False,
            )
        arrays = {f"params/{k}": p for k, p in self.model.params.items()}
        for name in ("m", "v", "ema"):
            for k, a in (getattr(self.optimizer, name) or {}).items():
                arrays[f"optimizer/{name}/{k}"] = a
        bad = [k for k, a in arrays.items() if not np.isfinite(a).all()]
        if bad:
            return f"NaN/Inf values in {', '.join(bad[:5])}", True
        raw, ema = self.held_out_check()
        if not (math.isfinite(raw) and math.isfinite(ema)):
            return (
                f"the held-out check ({CHECK_IMAGES} images) gives bits/dim {raw} with the raw "
                f"weights and {ema} with the EMA weights",
                True,
            )
        return None, False

    def _checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.h5"

    def _holds(self) -> str:
        """``"<path> holds step N"`` (or that there is none)."""
        path = self._checkpoint_path()
        if path is None:
            return "no run folder, nothing was saved"
        if self.checkpoint_step is None:
            return f"no checkpoint was written to {path}"
        return f"{path} holds step {self.checkpoint_step}"

    def save_if_usable(self) -> bool:
        """Write the checkpoint if :meth:`unusable_reason` allows it; otherwise log why (and
        raise :class:`TrainingDiverged` when the state is broken). Returns whether written."""
        if self.out_dir is None:
            return False
        reason, fatal = self.unusable_reason()
        if reason is None:
            self._save_or_explain()
            return True
        if fatal:
            self._diverged(f"the state is not usable: {reason}")
        self.log(f"step {self.step}: checkpoint not written: {reason}; {self._holds()}")
        return False

    def _save_or_explain(self) -> None:
        """:meth:`save`; a failed write (disk full, ...) says which step the file still holds."""
        try:
            self.save()
        except CheckpointError as exc:
            raise CheckpointError(f"step {self.step}: {exc}; {self._holds()}") from exc

    def _write_curves(self) -> None:
        """metrics.csv and loss_curve.png of the run folder (a failure is logged)."""
        if self.out_dir is None:
            return
        try:
            self.write_metrics_csv()
            self.plot_loss_curve(self.out_dir / "loss_curve.png")
        except WriteError as exc:
            self.log(f"step {self.step}: {exc}")

    def _diverged(self, why: str) -> None:
        """Write the curves (not the state) and raise :class:`TrainingDiverged` saying which
        step the run folder's checkpoint holds and how to go on."""
        tc = self.config
        self._write_curves()
        msg = f"training diverged at step {self.step}: {why}; {self._holds()}"
        path = self._checkpoint_path()
        if path is not None and self.checkpoint_step is not None:
            msg += (
                f", the last usable state; to go on from it with a smaller learning rate: "
                f"flownp train --resume {path} --lr {min(tc.lr / 10, 1e-3):.3g} --warmup-steps "
                f"{max(tc.warmup_steps, 100)}"
            )
        else:
            msg += f"; start again with a smaller learning rate (--lr {min(tc.lr / 10, 1e-3):.3g})"
        exc = TrainingDiverged(msg)
        exc.checkpoint_step = self.checkpoint_step
        raise exc

    def _interrupted(self, signum: int) -> None:
        """Save (if usable) and write the curves, then raise :class:`TrainingInterrupted`."""
        name = signal.Signals(signum).name
        written = False
        if self.out_dir is not None:
            reason, _ = self.unusable_reason()
            if reason is None:
                self._save_or_explain()
                written = True
            else:
                self.log(f"step {self.step}: checkpoint not written: {reason}")
            self._write_curves()
        msg = f"{name}: stopped after step {self.step} of {self.config.steps}; {self._holds()}"
        if self.checkpoint_step is not None:
            msg += f"; go on with: flownp train --resume {self._checkpoint_path()}"
        if not written and self.out_dir is not None:
            msg += " (the state at the interruption was not usable)"
        exc = TrainingInterrupted(msg)
        exc.checkpoint_step = self.checkpoint_step
        raise exc

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train until ``config.steps`` (or ``time_limit``), evaluate, save, plot.

        Raises :class:`TrainingDiverged` (the run folder keeps its last usable checkpoint)
        or, on SIGINT / SIGTERM, :class:`TrainingInterrupted` after saving (module docstring).
        """
        with _StopOnSignal(self.log) as stop:
            return self._run(stop)

    def _run(self, stop: _StopOnSignal) -> TrainResult:
        tc = self.config
        if self.out_dir is not None:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                (self.out_dir / "config.json").write_text(
                    json.dumps(
                        {"model": self.model_config.to_dict(), "train": tc.to_dict()}, indent=2
                    )
                    + "\n"
                )
            except OSError as exc:
                raise WriteError(
                    f"cannot write the run folder {self.out_dir}: {exc.strerror or exc}"
                ) from None
            if self.checkpoint_step is None:  # the starting state: always a usable checkpoint
                self.save_if_usable()
        bar = Progress(
            tc.steps,
            min(self.step, tc.steps),
            desc="train",
            enabled=self.progress,
            seconds=None if tc.time_limit is None else max(0.0, tc.time_limit - self.elapsed),
        )
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        smooth, speed = float("nan"), float("nan")
        stopped_early = False
        try:
            while self.step < tc.steps:
                if tc.time_limit is not None and self.elapsed >= tc.time_limit:
                    stopped_early = True
                    self.log(f"time limit {tc.time_limit:g} s reached at step {self.step}")
                    break
                t0 = time.perf_counter()
                x = self.next_batch()
                rec = self.train_step(x)
                self.step += 1
                dt = time.perf_counter() - t0
                self.elapsed = elapsed0 + (time.perf_counter() - t_start)
                speed = (
                    tc.batch_size / dt
                    if math.isnan(speed)
                    else 0.9 * speed + 0.1 * (tc.batch_size / dt)
                )
                if rec["ok"] and self.monitor.is_high(rec["bpd"]):
                    self.consecutive_bad += 1
                    rec["error"] = (
                        f"loss {rec['bpd']:.4g} bits/dim is more than twice its recent level "
                        f"{self.monitor.level():.4g} (threshold {self.monitor.threshold():.4g})"
                    )
                    self.log(
                        f"step {self.step}: LOSS BLOW-UP ({self.consecutive_bad} in a row): "
                        f"{rec['error']}"
                    )
                elif rec["ok"]:
                    self.consecutive_bad = 0
                    self.monitor.add(rec["bpd"])
                    smooth = rec["bpd"] if math.isnan(smooth) else 0.98 * smooth + 0.02 * rec["bpd"]
                else:
                    self.consecutive_bad += 1
                    self.rejected_total += 1
                    self.log(
                        f"step {self.step}: REJECTED ({self.consecutive_bad} in a row): "
                        f"{rec['error']}; parameters kept at the last good state"
                    )
                self._record_train(rec, speed)
                bar.update(1, bpd=smooth, img_s=speed)
                if self.consecutive_bad >= tc.max_bad_steps:
                    self._diverged(
                        f"{self.consecutive_bad} bad steps in a row (last: {rec['error']})"
                    )
                if stop.signum is not None:
                    self._interrupted(stop.signum)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    bpd = self.evaluate(tc.eval_size)
                    self._record_eval(bpd)
                    n_eval = min(tc.eval_size or len(self.data.test), len(self.data.test))
                    which = "all" if n_eval == len(self.data.test) else "first"
                    self.log(
                        f"step {self.step}: held-out bits/dim {bpd:.4f} ({which} {n_eval} images)"
                    )
                if (
                    self.out_dir is not None
                    and tc.checkpoint_every
                    and self.step % tc.checkpoint_every == 0
                    and self.step < tc.steps
                ):
                    self.check_stability()
                    self.save_if_usable()
                    self._write_curves()
        finally:
            bar.close()
        final = self.evaluate(None)
        self.elapsed = elapsed0 + (time.perf_counter() - t_start)
        self._record_eval(final)
        self.check_stability()
        report_digits(self)  # MNIST-shaped models: share of legible samples (flownp.digits)
        if self.out_dir is not None:
            # A bad last step (fewer than max_bad_steps in a row) leaves the previous usable
            # checkpoint in place; save_if_usable says so, and a broken state still raises.
            self.save_if_usable()
            self._write_curves()
            try:
                self.save_samples(self.out_dir / "samples.png")
            except (NonFiniteError, SingularKernelError, WriteError) as exc:  # reported
                self.log(f"samples.png not written: {exc}")
        if stop.signum is not None:  # arrived during the final evaluation: all is written
            self._interrupted(stop.signum)
        train_bpd = [v for v in self.metrics["train"]["bpd"][-100:] if np.isfinite(v)]
        return TrainResult(
            steps=self.step,
            heldout_bpd=final,
            train_bpd=float(np.mean(train_bpd)) if train_bpd else float("nan"),
            wall_time=self.elapsed - elapsed0,
            rejected_total=self.rejected_total,
            stopped_early=stopped_early,
            out_dir=self.out_dir,
        )

    def _record_train(self, rec: dict[str, Any], speed: float) -> None:
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "bpd": rec["bpd"],
            "lr": rec["lr"],
            "grad_norm": rec["grad_norm"],
            "rejected": 0.0 if rec["ok"] else 1.0,
            "images_per_s": speed,
            "elapsed": self.elapsed,
        }
        for c, v in row.items():
            self.metrics["train"][c].append(float(v))

    def _record_eval(self, bpd: float) -> None:
        for c, v in (("step", self.step), ("bpd", bpd), ("elapsed", self.elapsed)):
            self.metrics["eval"][c].append(float(v))

    # ------------------------------------------------------------------ outputs
    def write_metrics_csv(self, path: str | os.PathLike | None = None) -> Path:
        """One row per step: the train columns and ``heldout_bpd`` where evaluated."""
        path = Path(path) if path is not None else self.out_dir / "metrics.csv"  # type: ignore[operator]
        tr, ev = self.metrics["train"], self.metrics["eval"]
        held = {int(s): b for s, b in zip(ev["step"], ev["bpd"], strict=True)}
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(list(TRAIN_COLUMNS) + ["heldout_bpd"])
                for i in range(len(tr["step"])):
                    step = int(tr["step"][i])
                    row = [step, int(tr["epoch"][i])]
                    row += [repr(tr[c][i]) for c in TRAIN_COLUMNS[2:]]
                    w.writerow(row + [repr(held[step]) if step in held else ""])
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    def plot_loss_curve(self, path: str | os.PathLike) -> Path:
        try:
            return plot_loss_curve(self.metrics, path)
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None

    def save_samples(
        self, path: str | os.PathLike, n: int = 64, temperature: float = SAMPLE_TEMPERATURE
    ) -> Path:
        with self.optimizer.ema_weights():
            x = self.model.sample(n, temperature=temperature, seed=self.config.seed)
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:  # drawn black in the picture, never silently
            self.log(f"step {self.step}: {bad} non-finite pixel value(s) in the samples")
        try:
            return save_grid(x, path, title=f"samples, T = {temperature:g}, step {self.step}")
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def _default_log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
