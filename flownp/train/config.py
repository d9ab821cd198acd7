"""The training configuration (:class:`TrainConfig`) and what a run returns
(:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flownp.optim import OPTIMIZERS

#: The largest seed: a checkpoint stores it as a 64-bit integer.
MAX_SEED = 2**63 - 1


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
    optimizer : {"adam", "adamax"}
        :class:`flownp.optim.Adam` or :class:`flownp.optim.Adamax` (the official training
        script's default); a checkpoint written before this field existed is Adam's.
    lr, warmup_steps, max_grad_norm, ema_decay
        Optimizer settings (:class:`flownp.optim.Optimizer`).
    recompute : bool
        Memory-saving backward (:class:`flownp.model.FlowModel` ``recompute=True``, gradient
        checkpointing): every layer's input is rebuilt from its output by the inverse instead
        of being stored; about one extra forward and inverse per step.
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
        see :class:`flownp.train.step.LossMonitor`) before training stops.
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
        :class:`flownp.train.Trainer` when training starts; data loaded to resume or evaluate
        the run is checked against it.
    warmup_start : int
        Optimizer step after which the warmup starts (a resume with a new ``warmup_steps``
        sets it to the step it resumes from, see :class:`flownp.optim.Optimizer`).
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
    optimizer: str = "adam"
    recompute: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "init_batch_size", "max_bad_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed", "warmup_start"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"TrainConfig: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if not isinstance(self.recompute, (bool, np.bool_)):
            raise ValueError(
                f"TrainConfig: recompute must be True or False, got {self.recompute!r}"
            )
        if int(self.seed) > MAX_SEED:
            raise ValueError(f"TrainConfig: seed must be at most 2**63 - 1, got {self.seed!r}")
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


@dataclass
class TrainResult:
    """What :meth:`flownp.train.Trainer.run` returns."""

    steps: int
    heldout_bpd: float
    train_bpd: float
    wall_time: float
    rejected_total: int
    stopped_early: bool
    out_dir: Path | None
