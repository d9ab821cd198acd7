"""The training loop (:class:`Trainer`): what happens in which order.

::

    construction   data checked (and fingerprinted), model built, actnorms initialised on a
                   first batch, Adam or Adamax (warmup, clipping, EMA weights)
    run            config.json and the initial checkpoint (step 0), then per step:
                     batch = data stream's next batch           (flownp.train.data_stream)
                     (a) gradients of the batch                  (flownp.train.step)
                     (b) update applied and step judged          (flownp.train.step.StepRule)
                     metrics row; stop after max_bad_steps bad steps in a row, or on a signal
                     every eval_every steps: held-out bits/dim (EMA weights)
                     every checkpoint_every steps: observers, checkpoint if usable, curves
                                                                 (flownp.train.observers,
                                                                  flownp.train.run_folder)
                   at the end: held-out bits/dim on all held-out images, observers (stability,
                   digit share), checkpoint if usable, curves, samples

Several processes (``mpiexec -n N flownp train``, :mod:`flownp.distributed`): every process
builds the same model (process 0's initialised state is broadcast), draws the same global
batch and computes (a) on its share; :class:`~flownp.train.step.StepReduction` sums the shares
in one all-reduce per step, so (b) and every decision (Adam, EMA, clipping, rejection,
blow-up, signals, time limit) are the same on every process. Held-out evaluations are split
over the processes and reduced. Process 0 alone writes the run folder, logs, runs the
observers and decides whether a state is usable (broadcast to the others); an error of a
decision taken together is raised on every process.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flownp import distributed
from flownp.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint
from flownp.errors import (
    CheckpointError,
    NonFiniteError,
    SingularKernelError,
    UsageError,
    WriteError,
)
from flownp.model import SAMPLE_TEMPERATURE, FlowConfig, FlowModel
from flownp.optim import make_optimizer
from flownp.progress import Progress
from flownp.train import data_stream as _data
from flownp.train import observers
from flownp.train.config import TrainConfig, TrainResult
from flownp.train.data_stream import Batch, DataStream, check_data
from flownp.train.evaluation import evaluate_bpd, evaluate_classes
from flownp.train.metrics import append_row, empty_metrics
from flownp.train.run_folder import (
    CHECK_IMAGES,
    RunFolder,
    StopOnSignal,
    check_run_folder,
    held_out_check,
    unusable_reason,
)
from flownp.train.step import StepFlags, StepRecord, StepReduction, StepRule, batch_gradients

#: Classes shown (one row each) in the ``samples.png`` of a class-conditional model.
SAMPLE_ROWS = 10


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
    comm : the processes that train together (:func:`flownp.distributed.world`, the default;
        one process: :class:`flownp.distributed.SerialComm`).
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
        comm: Any = None,
        _initialize: bool = True,
    ) -> None:
        from flownp.data import absolute_spec, check_fingerprint, fingerprint

        self.comm = comm = distributed.world() if comm is None else comm
        if out_dir is not None and _initialize:
            distributed.on_root(comm, lambda: check_run_folder(out_dir, overwrite=overwrite))
        self.model_config = model_config
        tc = dataclasses.replace(train_config, dataset=absolute_spec(train_config.dataset))

        def local_data() -> Any:  # each process reads its own copy; it must be the same
            d = data if data is not None else _data.load_data(tc.dataset, tc.holdout)
            check_data(d, model_config.image_shape, tc.batch_size, model_config.num_classes)
            if tc.dataset_fingerprint is not None:  # a resumed run: the data must be the same
                check_fingerprint(d, tc.dataset_fingerprint, "resume")
            return d

        self.data = distributed.together(comm, local_data)
        if tc.dataset_fingerprint is None:  # a new run: remember what it trains on
            tc = dataclasses.replace(tc, dataset_fingerprint=fingerprint(self.data))
        distributed.agree(
            comm,
            {
                "the model configuration": model_config.to_dict(),
                # the data's place may differ between nodes: its fingerprint must not
                "the training configuration": {
                    **tc.to_dict(),
                    "dataset": None,
                    "dataset_fingerprint": None,
                },
                "the training data": tc.dataset_fingerprint,
            },
        )
        self.config = tc
        self.folder = RunFolder(out_dir)
        self.progress = progress and comm.is_root
        self.log = (log or _default_log) if comm.is_root else _silent
        self.model = FlowModel(model_config, seed=tc.seed, recompute=tc.recompute)
        self.stream = DataStream(
            self.data.train,
            seed=tc.seed,
            dtype=self.model.dtype,
            labels=self.data.train_labels if model_config.num_classes else None,
            n_bits=model_config.n_bits,
        )
        self.rule = StepRule()
        self.reduction = StepReduction(comm, self.model)
        self.flags = StepFlags()  # of the last step
        # (signal handler, training clock) that run() lets train_step read
        self._watch: tuple[Any, Callable[[], float] | None] = (None, None)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []  # settings changed at each resume
        self.metrics = empty_metrics()
        if _initialize:
            self.data_dependent_init()
        self.optimizer = make_optimizer(
            tc.optimizer,
            self.model.params,
            lr=tc.lr,
            warmup_steps=tc.warmup_steps,
            warmup_start=tc.warmup_start,
            max_grad_norm=tc.max_grad_norm,
            ema_decay=tc.ema_decay,
        )

    # ------------------------------------------------------------------ state, by its owner
    out_dir = property(lambda self: self.folder.path, doc="The run folder (None: no files).")
    epoch = property(lambda self: self.stream.epoch)
    position = property(lambda self: self.stream.position)
    rng = property(lambda self: self.stream.rng, doc="The dequantisation noise generator.")
    monitor = property(lambda self: self.rule.monitor)
    consecutive_bad = property(lambda self: self.rule.consecutive_bad)
    rejected_total = property(lambda self: self.rule.rejected_total)

    @property
    def checkpoint_step(self) -> int | None:
        """The step ``out_dir/checkpoint.h5`` holds."""
        return self.folder.checkpoint_step

    def _say(self, msg: str) -> None:  # self.log may be replaced after construction
        self.log(msg)

    # ------------------------------------------------------------------ construction
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
        comm: Any = None,
    ) -> Trainer:
        """Continue the training saved in ``path`` exactly where it stopped.

        ``steps`` overrides the total number of steps (default: the run's own). ``lr`` and
        ``warmup_steps`` change the learning rate from here on (e.g. after a divergence); a
        new ``warmup_steps`` restarts the warmup at the resumed step. Every change is recorded
        in the checkpoint's ``history``. ``dataset`` points at the training data when it has
        moved (it must have the fingerprint stored at training time). ``out_dir`` (default: the
        checkpoint's folder) must not hold another run unless ``overwrite``. Several processes
        (``comm``): process 0 reads the file, every process resumes from the same state, and
        the run goes on as it would on one process (whatever the number that wrote it).
        """
        comm = distributed.world() if comm is None else comm
        ckpt = read_checkpoint(path, comm=comm)
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
        at = int(ckpt.train_state["step"])
        if steps is not None and int(steps) < at:
            raise UsageError(
                f"cannot resume {path} with --steps {steps}: the run is at step {at} already; "
                f"give --steps {at + 1} or more to train on (without --steps: its own target, "
                f"{old.steps})"
            )
        if out_dir is not None:
            distributed.on_root(
                comm, lambda: check_run_folder(out_dir, overwrite=overwrite, resume_from=path)
            )
        self = cls(
            mc,
            tc,
            data,
            out_dir=out_dir if out_dir is not None else Path(path).parent,
            progress=progress,
            log=log,
            comm=comm,
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
            self.folder.checkpoint_step = None  # a new folder: nothing written there yet
        return self

    def _restore(self, ckpt: Checkpoint) -> None:
        loaded = model_from_checkpoint(ckpt, use_ema=False)
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(ckpt.optimizer_state)  # type: ignore[arg-type]
        ts = ckpt.train_state
        assert ts is not None
        self.step = ts["step"]
        self.stream.restore(ts["epoch"], ts["position"], ts["rng_state"])
        self.rule.consecutive_bad = ts["consecutive_bad"]
        self.rule.rejected_total = ts["rejected_total"]
        self.elapsed = ts["elapsed"]
        self.history = list(ts.get("history") or [])
        self.folder.checkpoint_step = self.step
        for table, cols in self.metrics.items():
            stored = ckpt.metrics.get(table, {})
            for c in cols:
                cols[c] = [float(v) for v in stored.get(c, [])]
        tr = self.metrics["train"]
        self.rule.replay(tr["bpd"], tr["rejected"])  # as the live run judged them

    def data_dependent_init(self) -> None:
        """Initialise every actnorm from ``init_batch_size`` random training images (on every
        process the whole init batch; then process 0's state goes to all, so that every
        process starts from the very same parameters)."""
        self.model.initialize(self.stream.init_batch(self.config.init_batch_size))
        if self.comm.size > 1:
            state = self.comm.bcast(self.model.state_dict() if self.comm.is_root else None)
            self.model.load_state_dict(state)

    # ------------------------------------------------------------------ one step
    def next_batch(self) -> Batch:
        """The next training batch (advances the data stream)."""
        return self.stream.next_batch(self.config.batch_size)

    def train_step(self, batch: Batch) -> StepRecord:
        """(a) the gradients of this process's share of the batch, their sum over the
        processes, (b) the update applied and the step judged (:mod:`flownp.train.step`). A
        rejected step (NaN/Inf on any process) updates nothing.

        Inside :meth:`run` the reduction also carries the step's flags (:attr:`flags`): a
        signal this process received, and whether process 0's clock passed the time limit,
        both read just before the reduction."""
        comm, n = self.comm, batch.num_images
        mine = batch.part(distributed.share(n, comm.rank, comm.size)) if comm.size > 1 else batch
        g = batch_gradients(self.model, mine, num_images=n if comm.size > 1 else None)
        stop, clock = self._watch
        signum = None if stop is None else stop.signum
        time_up = clock is not None and comm.is_root and self._time_up(clock())
        g, self.flags = self.reduction(g, signum=signum, time_up=time_up)
        return self.rule.apply(self.model, self.optimizer, g)

    # ------------------------------------------------------------------ evaluation, observers
    def heldout_labels(self, size: int | None = None) -> np.ndarray | None:
        """The labels of the first ``size`` held-out images for a class-conditional model
        (None otherwise)."""
        if not self.model_config.num_classes:
            return None
        y = np.asarray(self.data.test_labels)
        return y if size is None else y[:size]

    def evaluate(self, size: int | None = None) -> float:
        """Held-out bits/dim (with the EMA weights when enabled) on the first ``size`` test
        images (all when None); given the labels for a class-conditional model, whose
        generative (and linear) classifier accuracy then goes to ``metrics["classes"]``."""
        images = self.data.test if size is None else self.data.test[:size]
        labels = self.heldout_labels(size)
        with self.optimizer.ema_weights():
            try:
                if labels is None:
                    return evaluate_bpd(self.model, images, batch_size=500, comm=self.comm)
                res = evaluate_classes(self.model, images, labels, batch_size=500, comm=self.comm)
            except (NonFiniteError, FloatingPointError) as exc:
                self.model.clear_cache()
                self.log(f"evaluation produced a non-finite value: {exc}")
                return float("nan")
        clf = res.classifier_accuracy
        row = {"step": self.step, "accuracy": res.accuracy}
        row["classifier_accuracy"] = float("nan") if clf is None else clf
        append_row(self.metrics, "classes", row)
        text = f"generative classifier accuracy {res.accuracy:.2%}"
        if clf is not None:
            text += f", linear classifier accuracy {clf:.2%}"
        self.log(f"step {self.step}: {text} ({res.num_images} held-out images)")
        return res.bpd

    def check_stability(self) -> Any:
        """:func:`flownp.train.observers.observe_stability` with the EMA weights on the first
        ``stability_images`` held-out images; the row goes to ``metrics["stability"]``. Returns
        the :class:`flownp.stability.ModelStability` (None when disabled or failed)."""
        tc = self.config
        if not tc.stability_images or not self.comm.is_root:  # process 0 observes
            return None
        with self.optimizer.ema_weights():
            row, rep = observers.observe_stability(
                self.model,
                self.data.test[: tc.stability_images],
                step=self.step,
                seed=tc.seed,
                threshold=tc.stability_threshold,
                log=self._say,
                folder=self.folder,
            )
        append_row(self.metrics, "stability", row)
        return rep

    def score_digits(self) -> Any:
        """:func:`flownp.train.observers.observe_digits` with the EMA weights; the row goes to
        ``metrics["digits"]`` (a class-conditional digit model: also the requested-digit share,
        :func:`~flownp.train.observers.observe_requested_digits`, to ``digits_requested``).
        Returns the :class:`flownp.digits.DigitScore` or None."""
        if not self.comm.is_root:  # process 0 observes
            return None
        with self.optimizer.ema_weights():
            row, score = observers.observe_digits(
                self.model, self.data.test, step=self.step, seed=self.config.seed, log=self._say
            )
            requested, _ = observers.observe_requested_digits(
                self.model, step=self.step, seed=self.config.seed, log=self._say
            )
        if row is not None:
            append_row(self.metrics, "digits", row)
        if requested is not None:
            append_row(self.metrics, "digits_requested", requested)
        return score

    # ------------------------------------------------------------------ saving
    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            **self.stream.state(),
            "consecutive_bad": self.rule.consecutive_bad,
            "rejected_total": self.rule.rejected_total,
            "elapsed": self.elapsed,
            "history": self.history,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Atomic checkpoint of everything needed to resume (default ``out_dir/checkpoint.h5``).

        The state must be finite (:class:`NonFiniteError` otherwise, nothing written); the
        training loop also checks :meth:`unusable_reason` first."""
        return self.folder.write_checkpoint(
            path,
            self.model,
            step=self.step,
            optimizer=self.optimizer,
            train_state=self.train_state(),
            train_config=self.config.to_dict(),
            metrics=self.metrics,
        )

    def held_out_check(self) -> tuple[float, float]:
        """Bits/dim of the first ``CHECK_IMAGES`` held-out images with the raw and with the EMA
        weights (:func:`flownp.train.run_folder.held_out_check`)."""
        images = self.data.test[:CHECK_IMAGES]
        labels = self.heldout_labels(CHECK_IMAGES)
        return held_out_check(self.model, self.optimizer, images, self.config.seed + 5, labels)

    def unusable_reason(self) -> tuple[str | None, bool]:
        """Why the current state must not be written, or None; and whether that is fatal
        (:func:`flownp.train.run_folder.unusable_reason`)."""
        images = self.data.test[:CHECK_IMAGES]
        return unusable_reason(
            self.model,
            self.optimizer,
            self.rule.consecutive_bad,
            images,
            self.config.seed + 5,
            self.heldout_labels(CHECK_IMAGES),
        )

    def save_if_usable(self) -> bool:
        """Write the checkpoint if :meth:`unusable_reason` allows it; otherwise log why (and
        raise :class:`TrainingDiverged` when the state is broken). Returns whether written.
        Several processes: process 0 decides and writes, every process learns the outcome."""
        if self.out_dir is None:
            return False
        written, reason, fatal = self._save_on_root()
        if fatal:
            self._diverged(f"the state is not usable: {reason}")
        if not written:
            self.log(f"step {self.step}: checkpoint not written: {reason}; {self.folder.holds()}")
        return written

    def _save_on_root(self) -> tuple[bool, str | None, bool]:
        """``(written, why not, fatal)``: process 0 checks :meth:`unusable_reason` and writes
        when usable; a failed write raises on every process."""

        def decide() -> tuple[bool, str | None, bool]:
            reason, fatal = self.unusable_reason()
            if reason is None:
                self._save_or_explain()
                return True, None, False
            return False, reason, fatal

        written, reason, fatal = distributed.on_root(self.comm, decide)
        if written:
            self.folder.checkpoint_step = self.step
        return written, reason, fatal

    def _save_or_explain(self) -> None:
        try:
            self.save()
        except CheckpointError as exc:
            raise self.folder.explain_failed_write(self.step, exc) from exc

    def _write_curves(self) -> None:
        if self.comm.is_root:
            self.folder.write_curves(self.metrics, self.step, self.log)

    def _diverged(self, why: str) -> None:
        """Write the curves (not the state) and raise :class:`TrainingDiverged` (every process
        decided it together)."""
        self._write_curves()
        tc = self.config
        raise distributed.collective(self.folder.diverged(why, self.step, tc.lr, tc.warmup_steps))

    def _interrupted(self, signum: int) -> None:
        """Save (if usable) and write the curves, then raise :class:`TrainingInterrupted`
        (every process stops after the same step)."""
        written = False
        if self.out_dir is not None:
            written, reason, _ = self._save_on_root()
            if not written:
                self.log(f"step {self.step}: checkpoint not written: {reason}")
            self._write_curves()
        raise distributed.collective(
            self.folder.interrupted(signum, self.step, self.config.steps, written)
        )

    def save_samples(
        self,
        path: str | os.PathLike | None = None,
        n: int = 64,
        temperature: float = SAMPLE_TEMPERATURE,
    ) -> Path:
        """``n`` samples (EMA weights, the run's seed) as an image grid (default: the run
        folder's ``samples.png``). A class-conditional model draws one row per class instead
        (its first :data:`SAMPLE_ROWS` classes, ``ceil(n / rows)`` samples each)."""
        from flownp.digits import grid_labels

        K = self.model_config.num_classes
        labels, ncols, title = None, None, f"samples, T = {temperature:g}, step {self.step}"
        if K:
            rows = min(K, SAMPLE_ROWS)
            ncols = -(-n // rows)
            labels = grid_labels(rows, ncols)
            n = len(labels)
            title += f", one row per class (0..{rows - 1})"
        with self.optimizer.ema_weights():
            x = self.model.sample(n, temperature=temperature, seed=self.config.seed, labels=labels)
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))  # (process 0 calls this)
        if bad:  # drawn black in the picture, never silently
            self.log(f"step {self.step}: {bad} non-finite pixel value(s) in the samples")
        n_bits = self.model_config.n_bits
        return self.folder.write_samples(x, title, path, ncols=ncols, n_bits=n_bits)

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train until ``config.steps`` (or ``time_limit``), evaluate, save, plot.

        Raises :class:`TrainingDiverged` (the run folder keeps its last usable checkpoint)
        or, on SIGINT / SIGTERM, :class:`TrainingInterrupted` after saving
        (:mod:`flownp.train.run_folder`).
        """
        try:
            with StopOnSignal(self._say) as stop:
                return self._run(stop)
        finally:
            self.folder.close()  # the run folder's lock

    def _run(self, stop: StopOnSignal) -> TrainResult:
        tc, comm = self.config, self.comm
        if self.out_dir is not None:
            config = {"model": self.model_config.to_dict(), "train": tc.to_dict()}
            distributed.on_root(comm, lambda: self.folder.start(config))
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
        # The time limit and the signals: one process stops as soon as it sees them; several
        # stop together, on process 0's clock (checked before the first step, then carried by
        # every step's reduction: the step during which the limit passes is the last) and on
        # a signal any of them received before a reduction.
        time_up = comm.bcast(self._time_up())
        self._watch = (stop, lambda: elapsed0 + (time.perf_counter() - t_start))
        try:
            while self.step < tc.steps:
                if time_up or (comm.size == 1 and self._time_up()):
                    stopped_early = True
                    self.log(f"time limit {tc.time_limit:g} s reached at step {self.step}")
                    break
                t0 = time.perf_counter()
                rec = self.train_step(self.next_batch())
                time_up = self.flags.time_up
                self.step += 1
                dt = time.perf_counter() - t0
                self.elapsed = elapsed0 + (time.perf_counter() - t_start)
                speed = (
                    tc.batch_size / dt
                    if math.isnan(speed)
                    else 0.9 * speed + 0.1 * (tc.batch_size / dt)
                )
                smooth = self._report_step(rec, smooth)
                self._record_train(rec, speed)
                self._record_classifier(rec)
                bar.update(1, bpd=smooth, img_s=speed)
                if self.consecutive_bad >= tc.max_bad_steps:
                    self._diverged(f"{self.consecutive_bad} bad steps in a row (last: {rec.error})")
                signum = stop.signum if comm.size == 1 else self.flags.signum
                if signum is not None:  # all processes stop after this step
                    self._interrupted(signum)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    self._periodic_evaluation()
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
            self._watch = (None, None)
        final = self.evaluate(None)
        self.elapsed = elapsed0 + (time.perf_counter() - t_start)
        self._record_eval(final)
        self.check_stability()
        self.score_digits()
        if self.out_dir is not None:
            # A bad last step (fewer than max_bad_steps in a row) leaves the previous usable
            # checkpoint in place; save_if_usable says so, and a broken state still raises.
            self.save_if_usable()
            self._write_curves()
            if comm.is_root:
                try:
                    self.save_samples()
                except (NonFiniteError, SingularKernelError, WriteError) as exc:  # reported
                    self.log(f"samples.png not written: {exc}")
        # a signal during the final evaluation: all is written; any process's counts
        late = comm.allreduce_max(float(stop.signum or 0)) if comm.size > 1 else stop.signum
        if late:
            self._interrupted(int(late))
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

    def _time_up(self, elapsed: float | None = None) -> bool:
        """Has training run ``time_limit`` seconds (``elapsed``: default the trainer's)?"""
        limit = self.config.time_limit
        return limit is not None and (self.elapsed if elapsed is None else elapsed) >= limit

    def _report_step(self, rec: StepRecord, smooth: float) -> float:
        """Log a bad step; return the smoothed loss of the progress bar."""
        if rec.high:
            self.log(
                f"step {self.step}: LOSS BLOW-UP ({self.consecutive_bad} in a row): {rec.error}; "
                "update not applied, parameters kept at the last good state"
            )
        elif rec.accepted:
            return rec.bpd if math.isnan(smooth) else 0.98 * smooth + 0.02 * rec.bpd
        else:
            self.log(
                f"step {self.step}: REJECTED ({self.consecutive_bad} in a row): "
                f"{rec.error}; parameters kept at the last good state"
            )
        return smooth

    def _periodic_evaluation(self) -> None:
        tc = self.config
        bpd = self.evaluate(tc.eval_size)
        self._record_eval(bpd)
        n_eval = min(tc.eval_size or len(self.data.test), len(self.data.test))
        which = "all" if n_eval == len(self.data.test) else "first"
        self.log(f"step {self.step}: held-out bits/dim {bpd:.4f} ({which} {n_eval} images)")

    def _record_train(self, rec: StepRecord, speed: float) -> None:
        row = {
            "step": self.step,
            "epoch": self.epoch,
            "bpd": rec.bpd,
            "lr": rec.lr,
            "grad_norm": rec.grad_norm,
            "rejected": 0.0 if rec.accepted else 1.0,
            "images_per_s": speed,
            "elapsed": self.elapsed,
        }
        append_row(self.metrics, "train", row)

    def _record_classifier(self, rec: StepRecord) -> None:
        if self.model.classifier is None:
            return
        row = {"step": self.step, "bits_x": rec.bits_x, "bits_y": rec.bits_y}
        append_row(self.metrics, "classifier", row | {"error": rec.class_error})

    def _record_eval(self, bpd: float) -> None:
        append_row(self.metrics, "eval", {"step": self.step, "bpd": bpd, "elapsed": self.elapsed})


def _silent(msg: str) -> None:
    """The log of processes other than 0: process 0 says everything."""


def _default_log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
