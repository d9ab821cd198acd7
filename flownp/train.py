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
event is reported and counted, and training goes on with the next batch; after
``max_bad_steps`` rejections in a row the last good state is saved and
:class:`TrainingDiverged` is raised.

Exact resume: the checkpoint holds the dequantisation RNG state (numpy ``bit_generator.state``)
and the data position (epoch, index in that epoch's permutation; the permutation of epoch
``e`` is ``default_rng([seed, 3, e]).permutation(n)``), so a resumed run computes the same
losses as an uninterrupted one (same machine and thread count).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flownp.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from flownp.errors import DataError, NonFiniteError, SingularKernelError
from flownp.model import FlowConfig, FlowModel
from flownp.optim import Adam

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


class TrainingDiverged(NonFiniteError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# ---------------------------------------------------------------------- data <-> model space
def dequantize(images: np.ndarray, rng: np.random.Generator | None, dtype: Any) -> np.ndarray:
    """uint8 images ``u`` -> ``u / 256 - 0.5 + U(0, 1/256)`` in ``dtype``.

    The uniform noise is drawn on a grid of ``2**-b`` of a bin (b = 16 in float32, 32 in
    float64), so that ``(u + noise) / 256 - 0.5`` is computed exactly and always lies inside
    the pixel's bin ``[u/256 - 0.5, (u+1)/256 - 0.5)`` (a rounded float noise could land on
    the next bin's edge). ``rng=None`` gives the bin centres ``u / 256 - 0.5 + 1/512``.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"dequantize: images must be uint8, got dtype {images.dtype}")
    dt = np.dtype(dtype)
    if rng is None:
        noise = np.full(images.shape, 0.5, dtype=dt)
    else:
        bits = 16 if dt == np.float32 else 32
        grid = rng.integers(0, 1 << bits, size=images.shape, dtype=np.uint64)  # U{0..2^b-1}
        noise = grid.astype(dt) * dt.type(2.0**-bits)  # in [0, 1), exact
    return (images.astype(dt) + noise) / dt.type(256) - dt.type(0.5)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model space -> uint8: ``clip(floor((x + 0.5) * 256), 0, 255)``."""
    return np.clip(np.floor((np.asarray(x, dtype=np.float64) + 0.5) * 256), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- the loss
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
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=math.ceil(n / batch_size), desc="evaluate", unit="batch", leave=False)
    for start in it:
        x = dequantize(images[start : start + batch_size], rng, model.dtype)
        z, logdet = model.forward(x)
        model.clear_cache()
        total += float(np.sum(bits_per_dim(z, logdet)))
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
        Consecutive rejected (non-finite) steps before training stops.
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
    """

    dataset: str = "mnist"
    holdout: int | None = None
    steps: int = 2000
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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "init_batch_size", "max_bad_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr!r}")
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
    progress : show a tqdm progress bar.
    log : where messages go (default: ``tqdm.write`` to stderr).
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
        _initialize: bool = True,
    ) -> None:
        self.model_config = model_config
        self.config = tc = train_config
        self.data = data if data is not None else load_data(tc.dataset, tc.holdout)
        self._check_data()
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
        self.metrics: dict[str, dict[str, list[float]]] = {
            "train": {c: [] for c in TRAIN_COLUMNS},
            "eval": {c: [] for c in EVAL_COLUMNS},
            "stability": {c: [] for c in STABILITY_COLUMNS},
        }
        self._perm_cache: tuple[int, np.ndarray] | None = None
        if _initialize:
            self.data_dependent_init()
        self.optimizer = Adam(
            self.model.params,
            lr=tc.lr,
            warmup_steps=tc.warmup_steps,
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
        out_dir: str | os.PathLike | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Trainer:
        """Continue the training saved in ``path`` exactly where it stopped (``steps``
        overrides the total number of steps, e.g. to train longer)."""
        ckpt = read_checkpoint(path)
        if ckpt.train_state is None or ckpt.optimizer_state is None or ckpt.train_config is None:
            from flownp.errors import CheckpointError

            raise CheckpointError(f"{path} holds a model only, no training state to resume")
        tc = TrainConfig.from_dict(ckpt.train_config)
        if steps is not None:
            tc = dataclasses.replace(tc, steps=int(steps))
        mc = FlowConfig.from_dict(ckpt.model_config)
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
        for table, cols in self.metrics.items():
            stored = ckpt.metrics.get(table, {})
            for c in cols:
                cols[c] = [float(v) for v in stored.get(c, [])]

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
        self.log(
            f"step {self.step}: inverse stability ({rep.num_images} held-out images): "
            f"reconstruction error float32 {rep.roundtrip_f32:.2e}, float64 "
            f"{rep.roundtrip_f64:.2e}; worst layer ||M^-1||_inf {summ['max_norm_inf']:.3g}, "
            f"round trip {summ['max_layer_roundtrip_f32']:.2e}; {rep.status}"
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
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Atomic checkpoint of everything needed to resume (default ``out_dir/checkpoint.h5``)."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("Trainer.save: no path and no out_dir")
            path = self.out_dir / "checkpoint.h5"
        return save_checkpoint(
            path,
            self.model,
            optimizer=self.optimizer,
            train_state=self.train_state(),
            train_config=self.config.to_dict(),
            metrics=self.metrics,
        )

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train until ``config.steps`` (or ``time_limit``), evaluate, save, plot."""
        tc = self.config
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(
                json.dumps({"model": self.model_config.to_dict(), "train": tc.to_dict()}, indent=2)
                + "\n"
            )
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=tc.steps,
                initial=min(self.step, tc.steps),
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
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
                if rec["ok"]:
                    self.consecutive_bad = 0
                    smooth = rec["bpd"] if math.isnan(smooth) else 0.98 * smooth + 0.02 * rec["bpd"]
                else:
                    self.consecutive_bad += 1
                    self.rejected_total += 1
                    self.log(
                        f"step {self.step}: REJECTED ({self.consecutive_bad} in a row): "
                        f"{rec['error']}; parameters kept at the last good state"
                    )
                self._record_train(rec, speed)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{rec['bpd']:.3f}",
                        bpd=f"{smooth:.3f}",
                        img_s=f"{speed:.0f}",
                        refresh=False,
                    )
                if self.consecutive_bad >= tc.max_bad_steps:
                    msg = (
                        f"training diverged: {self.consecutive_bad} consecutive steps with a "
                        f"non-finite loss or gradient (last: {rec['error']}) at step {self.step}"
                    )
                    if self.out_dir is not None:
                        path = self.save()
                        msg += f"; last good state saved to {path} (resume with a lower --lr)"
                    raise TrainingDiverged(msg)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    bpd = self.evaluate(tc.eval_size)
                    self._record_eval(bpd)
                    self.log(
                        f"step {self.step}: held-out bits/dim {bpd:.4f} "
                        f"(first {tc.eval_size or len(self.data.test)} images)"
                    )
                if (
                    self.out_dir is not None
                    and tc.checkpoint_every
                    and self.step % tc.checkpoint_every == 0
                    and self.step < tc.steps
                ):
                    self.check_stability()
                    self.save()
                    self.write_metrics_csv()
        finally:
            if bar is not None:
                bar.close()
        final = self.evaluate(None)
        self.elapsed = elapsed0 + (time.perf_counter() - t_start)
        self._record_eval(final)
        self.check_stability()
        if self.out_dir is not None:
            self.save()
            self.write_metrics_csv()
            self.plot_loss_curve(self.out_dir / "loss_curve.png")
            try:
                self.save_samples(self.out_dir / "samples.png")
            except (NonFiniteError, SingularKernelError) as exc:  # reported, not hidden
                self.log(f"samples.png not written: sampling failed: {exc}")
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
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(TRAIN_COLUMNS) + ["heldout_bpd"])
            for i in range(len(tr["step"])):
                step = int(tr["step"][i])
                row = [step, int(tr["epoch"][i])] + [repr(tr[c][i]) for c in TRAIN_COLUMNS[2:]]
                w.writerow(row + [repr(held[step]) if step in held else ""])
        os.replace(tmp, path)
        return path

    def plot_loss_curve(self, path: str | os.PathLike) -> Path:
        return plot_loss_curve(self.metrics, path)

    def save_samples(self, path: str | os.PathLike, n: int = 64, temperature: float = 0.8) -> Path:
        with self.optimizer.ema_weights():
            x = self.model.sample(n, temperature=temperature, seed=self.config.seed)
        return save_grid(x, path, title=f"samples, T = {temperature:g}, step {self.step}")


def _default_log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


# ---------------------------------------------------------------------- figures
def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 ``(N, H, W, C)`` images into one ``(R (H+pad), S (W+pad), C)`` image."""
    N, H, W, C = images.shape
    S = ncols or int(math.ceil(math.sqrt(N)))
    R = int(math.ceil(N / S))
    out = np.full((R * (H + pad) + pad, S * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i in range(N):
        r, s = divmod(i, S)
        out[
            pad + r * (H + pad) : pad + r * (H + pad) + H,
            pad + s * (W + pad) : pad + s * (W + pad) + W,
        ] = images[i]
    return out


def save_grid(
    x: np.ndarray, path: str | os.PathLike, *, ncols: int | None = None, title: str | None = None
) -> Path:
    """Save model-space images ``x`` (or uint8 images) as one PNG grid (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pix = x if x.dtype == np.uint8 else to_uint8(x)
    grid = image_grid(pix, ncols)
    fig = Figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - (0.4 / fig.get_size_inches()[1] if title else 0)))
    if grid.shape[2] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_loss_curve(metrics: dict[str, dict[str, list[float]]], path: str | os.PathLike) -> Path:
    """Training bits/dim per step (raw and smoothed) and the held-out evaluations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tr, ev = metrics["train"], metrics["eval"]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.asarray(tr["step"])
    bpd = np.asarray(tr["bpd"], dtype=np.float64)
    ok = np.isfinite(bpd)
    if ok.any():
        ax.plot(steps[ok], bpd[ok], lw=0.5, alpha=0.35, color="C0", label="train (batch)")
        k = min(50, int(ok.sum()))
        sm = np.convolve(bpd[ok], np.ones(k) / k, mode="valid")
        ax.plot(steps[ok][k - 1 :], sm, lw=1.5, color="C0", label=f"train ({k}-step mean)")
        lo = np.nanpercentile(bpd[ok], 1)
        hi = np.nanpercentile(bpd[ok][len(bpd[ok]) // 20 :], 99) if ok.sum() > 20 else bpd.max()
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
    if ev["step"]:
        ax.plot(ev["step"], ev["bpd"], "o-", color="C3", label="held-out (EMA weights)")
    bad = steps[np.asarray(tr["rejected"]) > 0] if tr["rejected"] else []
    for s in bad:
        ax.axvline(s, color="k", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
