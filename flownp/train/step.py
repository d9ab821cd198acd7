r"""One training step, in two parts.

(a) :func:`batch_gradients`: forward, loss and backward of one batch
    (:class:`~flownp.train.data_stream.Batch`; a function of the model and the batch
    only): the loss, the image count and the
    gradients, or the error that makes them unusable (a NaN/Inf loss, a NaN inside a layer).
(b) :meth:`StepRule.apply`: the one place where the step is judged and the optimizer applies
    the update. A step is *rejected* when (a) failed, the gradient is not finite, or its loss
    is *high*, far above its recent level (:class:`LossMonitor`, judged before the update):
    the update is not applied, the parameters, moments and EMA stay at the last good state.
    Rejected steps are *bad*; :attr:`StepRule.consecutive_bad` counts them in a row (the loop
    stops after ``max_bad_steps``).

Between (a) and (b), :class:`StepReduction` combines the shares of several processes: each
computes (a) on its share of the global batch with the global image count, so the shares'
losses and gradients add up to the whole batch's; one all-reduce of one flat buffer sums
them, with the step's flags (a failed share, a stop signal, the time limit), and every
process then takes the same decision in (b). One process: nothing to combine, (a) goes to (b)
unchanged.

Blow-up rule (:class:`LossMonitor`): a loss is high when ``loss > level + max(BLOWUP_MARGIN,
level)``, ``BLOWUP_MARGIN`` = 1 bit/dim, ``level`` the median of the last ``BLOWUP_WINDOW`` = 50
accepted, not-high losses (judged once ``BLOWUP_MIN_HISTORY`` = 10 such losses exist). A high
step is not applied: one batch that the model maps far out (a loss of 1e19 bits/dim was seen
in a default run) would otherwise fill Adam's moments with its clipped gradient and set the
run back for hundreds of steps; a sustained climb stops the run after ``max_bad_steps``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.errors import NonFiniteError, SingularKernelError
from flownp.model import FlowModel, bpd_loss, classifier_loss
from flownp.train.data_stream import Batch

BLOWUP_WINDOW = 50  # accepted losses the recent level is the median of
BLOWUP_MARGIN = 1.0  # bad: loss > level + max(BLOWUP_MARGIN, level) (bits/dim)
BLOWUP_MIN_HISTORY = 10  # losses needed before the rule judges

#: What a failing forward / loss / backward / update raises; the step is rejected.
STEP_ERRORS = (NonFiniteError, FloatingPointError, SingularKernelError)


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


# ---------------------------------------------------------------------- (a) the gradients
@dataclass
class BatchGradients:
    """What :func:`batch_gradients` computed.

    ``loss``: the batch's loss summed and divided by the ``num_images`` given to
    :func:`batch_gradients` (by default the batch's own: the mean): its bits/dim, plus
    ``weight_y`` times the classifier's cross-entropy in bits for a model with a classifier;
    ``batch_images``: the batch's image count; ``grads``: the parameter gradients of ``loss``
    (the model's ``grads`` dict, None on error); ``error``: why the batch is unusable, or
    None. A model with a classifier also gives ``bits_x`` (the bits/dim part of ``loss``),
    ``bits_y`` (the cross-entropy in bits) and ``class_error`` (the misclassified share),
    each summed and divided by ``num_images`` like ``loss`` (NaN without a classifier).
    """

    loss: float
    batch_images: int
    grads: dict[str, np.ndarray] | None
    error: str | None = None
    bits_x: float = float("nan")
    bits_y: float = float("nan")
    class_error: float = float("nan")


def batch_gradients(
    model: FlowModel, batch: Batch, *, num_images: int | None = None
) -> BatchGradients:
    """Forward, loss and backward of ``batch``: the bits/dim loss (:func:`flownp.model.bpd_loss`,
    the model's ``n_bits``) given the batch's labels for a class-conditional model, plus
    ``weight_y`` times the classifier's cross-entropy (:func:`flownp.model.classifier_loss`)
    for a model with a classifier.

    ``num_images`` is the count the loss sum is divided by (default: the batch's). A NaN/Inf
    loss or a NaN inside a layer gives ``error`` (and a clean model: no cache, zero grads).
    """
    cfg = model.config
    if cfg.num_classes and batch.labels is None:
        raise ValueError("batch_gradients: a class-conditional model needs the batch's labels")
    n = batch.num_images if num_images is None else int(num_images)
    model.zero_grad()
    if batch.num_images == 0:  # an empty share (more processes than images): adds nothing
        return BatchGradients(0.0, 0, model.grads)
    loss = float("nan")
    terms: dict[str, float] = {}
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            z, logdet = model.forward(batch.x, batch.labels)  # checked explicitly just below
            loss, dz, dlogdet = bpd_loss(z, logdet, num_images=n, n_bits=cfg.n_bits)
            dlogits = None
            if model.classifier is not None:
                assert model.logits is not None and batch.labels is not None
                loss_y, bits_y, err, dlogits = classifier_loss(
                    model.logits, batch.labels, cfg.weight_y, num_images=n
                )
                terms = {"bits_x": loss, "bits_y": bits_y, "class_error": err}
                loss += loss_y
            if not np.isfinite(loss):
                raise NonFiniteError(f"loss is {loss}")
            if dlogits is None:
                model.backward(dz, dlogdet)
            else:
                model.backward(dz, dlogdet, dlogits)
    except STEP_ERRORS as exc:
        model.clear_cache()
        model.zero_grad()
        return BatchGradients(loss, batch.num_images, None, str(exc), **terms)
    return BatchGradients(loss, batch.num_images, model.grads, **terms)


# ---------------------------------------------------------------------- several processes
@dataclass(frozen=True)
class StepFlags:
    """What some process asked for at this step: ``signum`` (SIGINT or SIGTERM arrived: stop
    after this step; None: no signal) and ``time_up`` (process 0's clock passed the time
    limit: stop after this step)."""

    signum: int | None = None
    time_up: bool = False


class StepReduction:
    """The one collective of a training step: the sum over processes of the shares' losses,
    image counts and gradients, and of the flags, in one :class:`~flownp.distributed.FlatBuffer`
    (the model's dtype) with one :meth:`~flownp.distributed.SerialComm.allreduce_sum`.

    Every process gets the same sums, so :meth:`StepRule.apply` takes the same decision
    everywhere: a share that failed (a NaN/Inf loss, a NaN inside a layer) rejects the step on
    every process, a NaN in a share's gradient makes the sum non-finite (rejected by the
    optimizer everywhere). One process: returns its batch's gradients and flags unchanged.
    """

    SCALARS = (
        "loss",
        "images",
        "failed",
        "sigint",
        "sigterm",
        "time_up",
        "bits_x",
        "bits_y",
        "class_error",
    )

    def __init__(self, comm: Any, model: FlowModel) -> None:
        from flownp.distributed import FlatBuffer

        self.comm = comm
        self.model = model
        self.seconds, self.calls = 0.0, 0  # time in the all-reduce (waits included)
        self.buffer = None
        if comm.size > 1:
            shapes = {k: p.shape for k, p in model.params.items()}
            self.buffer = FlatBuffer(shapes, self.SCALARS, model.dtype)

    def __call__(
        self, g: BatchGradients, *, signum: int | None = None, time_up: bool = False
    ) -> tuple[BatchGradients, StepFlags]:
        if self.buffer is None:
            return g, StepFlags(signum, time_up)
        import signal

        fb, comm = self.buffer, self.comm
        fb.pack(
            g.grads if g.error is None else None,
            loss=g.loss,
            images=g.batch_images,
            failed=float(g.error is not None),
            sigint=float(signum == signal.SIGINT),
            sigterm=float(signum == signal.SIGTERM),
            time_up=float(time_up),
            bits_x=g.bits_x,
            bits_y=g.bits_y,
            class_error=g.class_error,
        )
        t0 = time.perf_counter()
        comm.allreduce_sum(fb.data)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        total = fb.unpack(self.model.grads)
        error = None
        if total["failed"]:
            n = int(round(total["failed"]))
            where = f"the shares of {n} of {comm.size} processes"
            error = f"{where}: {g.error}" if g.error is not None else f"NaN/Inf in {where}"
        flags = StepFlags(
            signal.SIGINT if total["sigint"] else signal.SIGTERM if total["sigterm"] else None,
            bool(total["time_up"]),
        )
        grads = None if error is not None else self.model.grads
        terms = {k: total[k] for k in ("bits_x", "bits_y", "class_error")}  # NaN: no classifier
        summed = BatchGradients(total["loss"], int(round(total["images"])), grads, error, **terms)
        return summed, flags


# ---------------------------------------------------------------------- (b) update and judge
@dataclass
class StepRecord:
    """The outcome of one step: ``accepted`` (the update was applied), ``high`` (the loss is a
    blow-up), ``bpd`` (the loss), ``lr`` and ``grad_norm`` (of the update; NaN when rejected)
    and ``error`` (why the step is bad, or None); ``bits_x``, ``bits_y`` and ``class_error``
    as in :class:`BatchGradients` (a model with a classifier)."""

    accepted: bool
    high: bool
    bpd: float
    lr: float
    grad_norm: float
    error: str | None = None
    bits_x: float = float("nan")
    bits_y: float = float("nan")
    class_error: float = float("nan")

    @property
    def bad(self) -> bool:
        """Rejected (a high step is rejected too)."""
        return not self.accepted


class StepRule:
    """Applies updates and judges steps (module docstring, part (b)); counts bad steps in a
    row (``consecutive_bad``) and rejected steps (``rejected_total``)."""

    def __init__(self, monitor: LossMonitor | None = None) -> None:
        self.monitor = monitor if monitor is not None else LossMonitor()
        self.consecutive_bad = 0
        self.rejected_total = 0

    def apply(self, model: FlowModel, optimizer: Any, g: BatchGradients) -> StepRecord:
        """Judge ``g`` and apply it with ``optimizer``, unless it is rejected: unusable, a
        blow-up (judged before the update) or not finite (refused by the optimizer)."""
        error, info, high = g.error, None, False
        if error is None and self.monitor.is_high(g.loss):
            high = True
            error = (
                f"loss {g.loss:.4g} bits/dim is more than twice its recent level "
                f"{self.monitor.level():.4g} (threshold {self.monitor.threshold():.4g})"
            )
        elif error is None:
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    info = optimizer.step(g.grads)  # refuses non-finite gradients
            except STEP_ERRORS as exc:
                error = str(exc)
        terms = {"bits_x": g.bits_x, "bits_y": g.bits_y, "class_error": g.class_error}
        if error is not None or info is None:  # rejected: nothing of this step is kept
            model.clear_cache()
            model.zero_grad()
            self.consecutive_bad += 1
            self.rejected_total += 1
            nan = float("nan")
            return StepRecord(False, high, g.loss, nan, nan, error, **terms)
        self.consecutive_bad = 0
        self.monitor.add(g.loss)
        return StepRecord(True, False, g.loss, info["lr"], info["grad_norm"], **terms)

    def replay(self, losses: Iterable[float], rejected: Iterable[float]) -> None:
        """Refill the monitor from a run's recorded losses, judging them as the live run did
        (a resumed run applies the same rule as an uninterrupted one)."""
        for bpd, rej in zip(losses, rejected, strict=True):
            if not rej and not self.monitor.is_high(bpd):
                self.monitor.add(bpd)
