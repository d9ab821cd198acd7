r"""Controlled comparisons of the paper's variants: a resumable grid of training runs and its
report (held-out bits/dim as mean ± standard deviation over seeds, parameters, training time,
sampling time, legible-digit share, learning curves).

The grid (``GridConfig``)::

    budget   in budgets                      "steps": every run trains `steps` steps
                                             "seconds": every run trains `seconds` s of wall time
    conv     in convs       (1x1, 1x1+emerging, cinc: Glow, Emerging as in the paper, CInC;
                             any of flownp.model.CONVS, e.g. periodic, 1x1+cinc, shuffle)
    coupling in couplings   (affine, quad; or additive)
    depth    in depths      (4, 8)           steps per level D
    seed     in 0 .. seeds[depth] - 1        the same seeds for every variant (paired)

Every run is one :class:`flownp.train.Trainer` with ``FlowConfig(conv, coupling, depth, **model)``
and ``TrainConfig(seed, **train)`` and its own run folder
``<out>/runs/<budget><value>/<conv>-<coupling>-d<depth>/seed<k>/`` (checkpoint.h5,
metrics.csv, train.log, ...). Resuming: a run folder with ``result.json`` is complete and
skipped; one with only ``checkpoint.h5`` continues from it exactly (the seconds budget counts
the time already trained); a run folder made with another configuration is an error (nothing
is overwritten). So a killed grid continues where it stopped when the same command is run
again.

After training, each run measures the time to sample ``sample_images`` images at
``temperature`` (EMA weights; the inverse of every layer included, kernels already compiled)
and, for MNIST-shaped data, the share of those samples that the digit classifier of
:mod:`flownp.digits` assigns to one digit with probability >= 0.9. When those samples contain
a NaN/Inf (an undertrained model whose inverse overflows), the run records that and times the
same computation on the latent mode (temperature 0) instead, so that every run has a sampling
time; the report counts such runs. The result names the digit measure
(:data:`flownp.digits.MEASURE`); a finished run scored by another one is scored again from its
checkpoint (the same samples) when the grid command runs again. Training time is the
trainer's clock: it includes the periodic held-out evaluations and checkpoints (the same
schedule in steps for every variant) and the final evaluation on all held-out images; the
seconds budget stops the steps, the final evaluation follows. Before the first run, every layer
of the grid is compiled on a tiny model, so that no run's clock includes Numba compilation.

The report (``<out>/report/``, rewritten after every run): ``report.md`` (one table per budget),
``results.csv`` (one row per run) and ``curves_<budget>.png`` (held-out bits/dim against steps
and against seconds; per variant the mean over seeds, shaded between the lowest and the highest
seed).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flownp.data.pixels import dequantize
from flownp.digits import MEASURE as DIGIT_MEASURE
from flownp.errors import DataError, FlownpError, NonFiniteError, SingularKernelError, UsageError
from flownp.files import write_atomic
from flownp.model import CONVS, COUPLINGS, SAMPLE_TEMPERATURE, FlowConfig, FlowModel, bpd_loss
from flownp.train import TrainConfig, Trainer, TrainingDiverged

BUDGETS = ("steps", "seconds")
RESULT_FILE = "result.json"
GRID_FILE = "grid.json"


class ExperimentError(FlownpError, ValueError):
    """A grid declaration is invalid or a run folder does not match it."""


# ---------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class GridConfig:
    """A declared grid of training runs.

    Parameters
    ----------
    convs, couplings : tuple of str
        Invertible convolutions (:data:`flownp.model.CONVS`) and couplings.
    depths : tuple of int
        Steps per level D.
    seeds : tuple of (depth, count) pairs
        Seeds ``0 .. count - 1`` for each depth (every depth of ``depths`` listed once).
    budgets : tuple of str
        ``"steps"`` and/or ``"seconds"``.
    steps : int
        Training steps of each run of the ``"steps"`` budget.
    seconds : float
        Training wall time of each run of the ``"seconds"`` budget.
    max_steps : int
        Step cap of the ``"seconds"`` budget (a run stops at whichever comes first).
    model : dict
        Other :class:`~flownp.model.FlowConfig` fields (levels, width, ...), the same for all.
    train : dict
        Other :class:`~flownp.train.TrainConfig` fields (dataset, batch_size, lr, ...), the
        same for all (``steps``, ``seed`` and ``time_limit`` are set per run).
    sample_images : int
        Images of the sampling-time measurement.
    temperature : float
        Latent temperature of those samples.
    """

    convs: tuple[str, ...] = ("1x1", "1x1+emerging", "cinc")
    couplings: tuple[str, ...] = ("affine", "quad")
    depths: tuple[int, ...] = (4, 8)
    seeds: tuple[tuple[int, int], ...] = ((4, 3), (8, 3))
    budgets: tuple[str, ...] = BUDGETS
    steps: int = 2000
    seconds: float = 300.0
    max_steps: int = 1_000_000
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    sample_images: int = 100
    temperature: float = SAMPLE_TEMPERATURE

    def __post_init__(self) -> None:
        for name, allowed in (("convs", CONVS), ("couplings", COUPLINGS), ("budgets", BUDGETS)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise ExperimentError(
                    f"GridConfig: {name} must be distinct values from {', '.join(allowed)}, "
                    f"got {list(values)}"
                )
        depths = tuple(int(d) for d in self.depths)
        if not depths or min(depths) < 1 or len(set(depths)) != len(depths):
            raise ExperimentError(f"GridConfig: depths must be distinct ints >= 1, got {depths}")
        object.__setattr__(self, "depths", depths)
        seeds = tuple((int(d), int(n)) for d, n in self.seeds)
        object.__setattr__(self, "seeds", seeds)
        per = dict(seeds)
        if sorted(per) != sorted(depths) or len(per) != len(seeds):
            raise ExperimentError(
                f"GridConfig: seeds must give one count per depth {list(depths)}, got {dict(seeds)}"
            )
        if min(per.values()) < 1:
            raise ExperimentError(f"GridConfig: seed counts must be >= 1, got {dict(seeds)}")
        if int(self.steps) < 1 or int(self.max_steps) < 1:
            raise ExperimentError(
                f"GridConfig: steps and max_steps must be >= 1, got {self.steps}, {self.max_steps}"
            )
        if not float(self.seconds) > 0:
            raise ExperimentError(f"GridConfig: seconds must be > 0, got {self.seconds}")
        if int(self.sample_images) < 1 or not float(self.temperature) >= 0:
            raise ExperimentError(
                "GridConfig: sample_images must be >= 1 and temperature >= 0, got "
                f"{self.sample_images}, {self.temperature}"
            )
        for key in ("conv", "coupling", "depth", "image_shape"):
            if key in self.model:
                raise ExperimentError(f"GridConfig: model may not set {key!r} (a grid axis)")
        for key in ("steps", "seed", "time_limit"):
            if key in self.train:
                raise ExperimentError(f"GridConfig: train may not set {key!r} (set per run)")
        try:  # every field name and value checked once, before any training
            FlowConfig(conv=self.convs[0], coupling=self.couplings[0], **self.flow_model(2))
            TrainConfig(**self.train)
        except (TypeError, ValueError) as exc:
            raise ExperimentError(f"GridConfig: {exc}") from None

    def flow_model(self, num_classes: int) -> dict[str, Any]:
        """:attr:`model` as FlowConfig fields: ``class_conditional`` becomes ``num_classes``."""
        model = dict(self.model)
        if model.pop("class_conditional", False):
            model["num_classes"] = int(num_classes)
        return model

    def seed_count(self, depth: int) -> int:
        return dict(self.seeds)[depth]

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major (seed 0 of every budget and variant first, then seed 1, ...),
        so that an interrupted grid has whole comparisons rather than whole variants."""
        out = []
        for seed in range(max(n for _, n in self.seeds)):
            for budget in self.budgets:
                for depth in self.depths:
                    if seed >= self.seed_count(depth):
                        continue
                    for conv in self.convs:
                        for coupling in self.couplings:
                            out.append(RunSpec(budget, conv, coupling, depth, seed))
        return out

    def budget_value(self, budget: str) -> float:
        return float(self.steps) if budget == "steps" else float(self.seconds)

    def budget_tag(self, budget: str) -> str:
        """Folder name of a budget: ``steps2000``, ``seconds300``."""
        return f"{budget}{self.budget_value(budget):g}"

    def configs(
        self, spec: RunSpec, image_shape: Sequence[int], num_classes: int | None = None
    ) -> tuple[FlowConfig, TrainConfig]:
        """The model and training configuration of one run. ``model["class_conditional"]``
        (a class-conditional grid) takes the number of classes of the data, ``num_classes``."""
        if self.model.get("class_conditional") and not num_classes:
            raise UsageError("--class-conditional: the dataset has no labels")
        model = self.flow_model(num_classes or 0)
        mc = FlowConfig(
            image_shape=tuple(image_shape),
            conv=spec.conv,
            coupling=spec.coupling,
            depth=spec.depth,
            **model,
        )
        if spec.budget == "steps":
            tc = TrainConfig(steps=int(self.steps), seed=spec.seed, **self.train)
        else:
            tc = TrainConfig(
                steps=int(self.max_steps),
                seed=spec.seed,
                time_limit=float(self.seconds),
                **self.train,
            )
        return mc, tc

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["seeds"] = [list(p) for p in self.seeds]
        return d


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    budget: str
    conv: str
    coupling: str
    depth: int
    seed: int

    @property
    def variant(self) -> str:
        """``cinc-quad-d4``: the folder name of the variant (conv, coupling, depth)."""
        return f"{self.conv}-{self.coupling}-d{self.depth}"

    def folder(self, grid: GridConfig) -> Path:
        return Path("runs") / grid.budget_tag(self.budget) / self.variant / f"seed{self.seed}"


def parse_seeds(text: str, depths: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``"3"`` (3 seeds for every depth) or ``"4:3,8:2"`` (per depth) -> ((depth, count), ...)."""
    text = text.strip()
    try:
        if ":" not in text:
            n = int(text)
            return tuple((int(d), n) for d in depths)
        pairs = []
        for item in text.split(","):
            d, _, n = item.partition(":")
            pairs.append((int(d), int(n)))
    except ValueError:
        raise ExperimentError(
            f"seeds: expected a count like '3' or per depth like '4:3,8:2', got {text!r}"
        ) from None
    given = [d for d, _ in pairs]
    if sorted(given) != sorted(int(d) for d in depths) or len(set(given)) != len(given):
        raise ExperimentError(f"seeds: {text!r} must give one count for each depth {list(depths)}")
    return tuple(pairs)


# ---------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (``ddof = 1``; NaN for one value) and count.

    ``std = sqrt(sum_i (v_i - mean)^2 / (n - 1))``. NaN values are not dropped here: the
    caller decides what a failed run means (the report counts them separately).
    """
    v = np.asarray(list(values), dtype=np.float64)
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if n > 1 else float("nan")
    return mean, std, n


def format_mean_std(
    values: Iterable[float], digits: int = 3, scale: float = 1.0, *, signed: bool = False
) -> str:
    """``"2.134 ± 0.012"`` (one value: ``"2.134"``; none: ``"–"``; ``signed``: ``"+0.134"``)."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    sign = "+" if signed else ""
    if n == 1:
        return f"{mean * scale:{sign}.{digits}f}"
    return f"{mean * scale:{sign}.{digits}f} ± {std * scale:.{digits}f}"


# ---------------------------------------------------------------------- one run
def _json_safe(obj: Any) -> Any:
    """Round-trip a config dict through JSON types (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(obj))


# Filled in by the Trainer (not chosen by the grid): the training data's fingerprint, the
# dataset spec made absolute, and the warmup restart point of a resumed run.
_TRAINER_FIELDS = ("dataset_fingerprint", "dataset", "warmup_start")


def _config_mismatch(
    expected: dict[str, Any], found: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """The differences of two configurations; a field missing from ``found`` (a result written
    before the field existed) has its value in ``defaults``, as when a checkpoint loads."""
    found = {**(defaults or {}), **found}
    keys = sorted((set(expected) | set(found)) - set(_TRAINER_FIELDS))
    return [
        f"{k}: {found.get(k)!r} instead of {expected.get(k)!r}"
        for k in keys
        if expected.get(k) != found.get(k)
    ]


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _read_result(path: Path) -> dict[str, Any]:
    """A finished run's ``result.json``; a damaged one is an :class:`ExperimentError` that
    says how to go on (the run's checkpoint is kept)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExperimentError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); remove it and run the same "
            "command again: the run is finished again from its checkpoint"
        ) from None
    if not isinstance(result, dict):
        raise ExperimentError(f"{path} is damaged (not a JSON object); remove it and run again")
    return result


def _check_finished_data(result: dict[str, Any], run_dir: Path, data: Any) -> None:
    """A finished run must have been trained on ``data``, checked as strictly as a partially
    trained one: the fingerprint in ``result.json``, else the one its checkpoint stores."""
    from flownp.data import check_fingerprint

    stored = result.get("data_fingerprint")
    ckpt = run_dir / "checkpoint.h5"
    if stored is None and ckpt.exists():
        from flownp.checkpoint import read_checkpoint

        stored = (read_checkpoint(ckpt).train_config or {}).get("dataset_fingerprint")
    try:
        check_fingerprint(data, stored, f"{run_dir} (a finished run)")
    except DataError as exc:
        raise ExperimentError(f"{exc}; use another --out for this data") from None


def run_state(run_dir: Path) -> str:
    """``"done"`` (result.json), ``"partial"`` (a checkpoint only) or ``"todo"``."""
    if (run_dir / RESULT_FILE).exists():
        return "done"
    if (run_dir / "checkpoint.h5").exists():
        return "partial"
    return "todo"


def warm_up(grid: GridConfig, image_shape: Sequence[int]) -> None:
    """Compile every layer of the grid (forward, backward, inverse) on a tiny model, so that
    no run's clock includes Numba compilation."""
    rng = np.random.default_rng(0)
    x = dequantize(rng.integers(0, 256, (2, *image_shape), dtype=np.uint8), rng, "float32")
    for conv in grid.convs:
        for coupling in grid.couplings:
            model_kw = {**grid.flow_model(2), "width": 4}
            mc = FlowConfig(
                image_shape=tuple(image_shape), conv=conv, coupling=coupling, depth=1, **model_kw
            )
            model = FlowModel(mc, seed=0)
            xm = x.astype(model.dtype)
            model.initialize(xm)
            z, logdet = model.forward(xm)
            _, dz, dlogdet = bpd_loss(z, logdet)
            model.backward(dz, dlogdet)
            model.clear_cache()
            model.zero_grad()
            model.inverse(z)


def run_one(
    grid: GridConfig,
    spec: RunSpec,
    data: Any,
    out: Path,
    *,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or resume, or skip) one run and return its result (also ``result.json``)."""
    run_dir = out / spec.folder(grid)
    mc, tc = grid.configs(spec, data.shape, getattr(data, "num_classes", None))
    expected = _json_safe({"model": mc.to_dict(), "train": tc.to_dict()})
    result_path = run_dir / RESULT_FILE
    if result_path.exists():
        result = _read_result(result_path)
        stored = _json_safe(result.get("config", {}))
        model_defaults = _json_safe(FlowConfig.from_dict({}).to_dict())
        train_defaults = _json_safe(TrainConfig().to_dict())
        bad = _config_mismatch(
            expected["model"], stored.get("model", {}), model_defaults
        ) + _config_mismatch(expected["train"], stored.get("train", {}), train_defaults)
        if bad:
            raise ExperimentError(
                f"{run_dir} holds a finished run of another configuration ({'; '.join(bad)}); "
                "use another --out"
            )
        _check_finished_data(result, run_dir, data)
        if "sample_nonfinite" not in result and result.get("status") == "done":
            _complete_sampling(result, run_dir, grid, log)  # written by an older version
            _write_json(result_path, result)
        if _needs_rescore(result):
            _rescore_digits(result, run_dir, grid, data, log)
            _write_json(result_path, result)
        result["skipped"] = True
        return result

    file_log = _file_logger(run_dir / "train.log")
    ckpt = run_dir / "checkpoint.h5"
    if ckpt.exists():
        trainer = Trainer.from_checkpoint(
            ckpt, data, out_dir=run_dir, progress=progress, log=file_log
        )
        found = _json_safe(
            {"model": trainer.model_config.to_dict(), "train": trainer.config.to_dict()}
        )
        bad = _config_mismatch(expected["model"], found["model"]) + _config_mismatch(
            expected["train"], found["train"]
        )
        if bad:
            raise ExperimentError(
                f"{ckpt} was trained with another configuration ({'; '.join(bad)}); "
                "use another --out"
            )
        resumed_at = trainer.step
    else:
        trainer = Trainer(mc, tc, data, out_dir=run_dir, progress=progress, log=file_log)
        resumed_at = 0
    log(
        f"{spec.budget} {grid.budget_value(spec.budget):g}, {spec.variant}, seed {spec.seed}: "
        + (f"resuming at step {resumed_at}" if resumed_at else "training")
        + f" ({trainer.model.num_params()} parameters)"
    )
    status = "done"
    try:
        res = trainer.run()
        heldout, steps, stopped = res.heldout_bpd, res.steps, res.stopped_early
    except TrainingDiverged as exc:
        file_log(str(exc))
        status, heldout, steps, stopped = "diverged", float("nan"), trainer.step, True
    if status == "done" and not math.isfinite(heldout):
        status = "non-finite"
    sample_s, digit, nonfinite = float("nan"), None, False
    if status == "done":
        with trainer.optimizer.ema_weights():
            sample_s, digit, nonfinite = _measure_sampling(
                trainer.model, grid, data, trainer.config.seed, file_log
            )
    ev = trainer.metrics["eval"]
    result = {
        "budget": spec.budget,
        "budget_value": grid.budget_value(spec.budget),
        "conv": spec.conv,
        "coupling": spec.coupling,
        "depth": spec.depth,
        "seed": spec.seed,
        "status": status,
        "heldout_bpd": heldout,
        "steps": steps,
        "train_seconds": trainer.elapsed,
        "stopped_by_time": bool(stopped and status == "done"),
        "rejected_steps": trainer.rejected_total,
        "parameters": trainer.model.num_params(),
        "sample_images": grid.sample_images,
        "sample_seconds": sample_s,
        "sample_nonfinite": nonfinite,
        "digit_share": None if digit is None else digit.share,
        "digit_real_share": None if digit is None else digit.real_share,
        "digit_measure": None if digit is None else DIGIT_MEASURE,
        "curve": {"step": ev["step"], "seconds": ev["elapsed"], "bpd": ev["bpd"]},
        "config": expected,
        "data_fingerprint": trainer.config.dataset_fingerprint,
    }
    _write_json(result_path, result)  # the completion marker, written last
    result["skipped"] = False
    return result


_SAMPLING_FAILURES = (NonFiniteError, SingularKernelError, FloatingPointError)


def _sample(model: FlowModel, n: int, temperature: float, seed: int) -> np.ndarray:
    """``model.sample``; a class-conditional model draws the classes in turn (as
    :func:`flownp.train.observers.observe_digits`)."""
    from flownp.digits import grid_labels

    K = getattr(getattr(model, "config", None), "num_classes", 0)
    if not K:
        return model.sample(n, temperature=temperature, seed=seed)
    labels = grid_labels(K, -(-n // K))[:n]
    return model.sample(n, temperature=temperature, seed=seed, labels=labels)


def _measure_sampling(
    model: FlowModel, grid: GridConfig, data: Any, seed: int, log: Callable[[str], None]
) -> tuple[float, Any, bool]:
    """``(seconds, digit score, non-finite)`` of sampling ``grid.sample_images`` images with
    the model's current weights (inverses included).

    The digit score is None when the data is not MNIST-shaped. When the samples at
    ``grid.temperature`` contain a NaN/Inf, the failure is logged, the score is None, the flag
    is True and the seconds are those of :func:`_time_mode_sampling`.
    """
    from flownp.digits import score_samples

    try:
        t0 = time.perf_counter()
        x = _sample(model, grid.sample_images, grid.temperature, seed)
        seconds = time.perf_counter() - t0
    except _SAMPLING_FAILURES as exc:
        log(f"sampling at temperature {grid.temperature:g} failed: {exc}")
        return _time_mode_sampling(model, grid, seed, log), None, True
    return seconds, score_samples(x, data.test), False


def _time_mode_sampling(
    model: FlowModel, grid: GridConfig, seed: int, log: Callable[[str], None]
) -> float:
    """Seconds of the sampling computation on the latent mode (temperature 0): the same
    inverses, on a latent that an undertrained model can still invert. NaN if it fails."""
    try:
        t0 = time.perf_counter()
        _sample(model, grid.sample_images, 0.0, seed)
        seconds = time.perf_counter() - t0
    except _SAMPLING_FAILURES as exc:
        log(f"sampling at temperature 0 failed too: {exc}")
        return float("nan")
    log(f"sampling time measured at temperature 0 instead: {seconds:.3f} s")
    return seconds


def _complete_sampling(
    result: dict[str, Any], run_dir: Path, grid: GridConfig, log: Callable[[str], None]
) -> None:
    """Add ``sample_nonfinite`` to a finished run's result written without it, re-timing a
    failed sampling on the latent mode from the run's checkpoint (EMA weights)."""
    failed = not math.isfinite(result.get("sample_seconds", float("nan")))
    result["sample_nonfinite"] = failed
    ckpt = run_dir / "checkpoint.h5"
    if not failed or not ckpt.exists():
        return
    from flownp.checkpoint import load_model

    model = load_model(ckpt, use_ema=True)
    seconds = _time_mode_sampling(
        model, grid, int(result["seed"]), _file_logger(run_dir / "train.log")
    )
    result["sample_seconds"] = seconds
    log(f"{run_dir}: samples were non-finite; timed at temperature 0: {seconds:.2f} s")


def _needs_rescore(result: dict[str, Any]) -> bool:
    """True for a finished run whose legible share was measured by another digit classifier
    than :data:`flownp.digits.MEASURE` (its samples were finite and scored)."""
    return (
        result.get("status") == "done"
        and result.get("digit_share") is not None
        and result.get("digit_measure") != DIGIT_MEASURE
    )


def _rescore_digits(
    result: dict[str, Any], run_dir: Path, grid: GridConfig, data: Any, log: Callable[[str], None]
) -> None:
    """Score the run's samples again with the current digit classifier: the same samples
    (checkpoint's EMA weights, the grid's temperature and image count, the run's seed), so only
    the measure changes; the sampling time is kept. Without a checkpoint the share is dropped."""
    from flownp.checkpoint import load_model
    from flownp.digits import score_samples

    ckpt = run_dir / "checkpoint.h5"
    result["digit_measure"] = DIGIT_MEASURE
    score = None
    if not ckpt.exists():
        log(f"{run_dir}: no checkpoint to score its samples with the current digit classifier")
    else:
        model = load_model(ckpt, use_ema=True)
        try:
            seed = int(result["seed"])
            x = _sample(model, grid.sample_images, grid.temperature, seed)
            score = score_samples(x, data.test)
        except _SAMPLING_FAILURES as exc:
            log(f"{run_dir}: sampling failed while scoring with the current classifier: {exc}")
    result["digit_share"] = None if score is None else score.share
    result["digit_real_share"] = None if score is None else score.real_share
    if score is not None:
        log(f"{run_dir}: samples scored with the current digit classifier: {score.share:.0%}")


def _file_logger(path: Path) -> Callable[[str], None]:
    def log(msg: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(msg + "\n")

    return log


# ---------------------------------------------------------------------- the grid
def run_grid(
    grid: GridConfig,
    out: str | os.PathLike,
    data: Any = None,
    *,
    log: Callable[[str], None] = print,
    progress: bool = False,
    train: bool = True,
) -> list[dict[str, Any]]:
    """Run (or resume) every run of ``grid`` into ``out`` and write the report after each.

    ``train=False`` trains nothing: the report is built from the finished runs. Returns the
    results of the finished runs, in grid order.
    """
    from flownp.train.data_stream import load_data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid_file = out / GRID_FILE
    if data is None:
        data = load_data(grid.train.get("dataset", "mnist"), grid.train.get("holdout"))
    declared = _json_safe({"grid": grid.to_dict(), "image_shape": list(data.shape)})
    if train:
        _write_json(grid_file, declared)
    runs = grid.runs()
    results: list[dict[str, Any]] = []
    todo = [s for s in runs if run_state(out / s.folder(grid)) != "done"]
    if train and todo:
        log(
            f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to train "
            f"({sum(run_state(out / s.folder(grid)) == 'partial' for s in todo)} partially "
            "trained)"
        )
        t0 = time.perf_counter()
        warm_up(grid, data.shape)
        log(f"kernels compiled in {time.perf_counter() - t0:.1f} s")
    for i, spec in enumerate(runs):
        run_dir = out / spec.folder(grid)
        if not train and run_state(run_dir) != "done":
            continue
        prefix = f"[{i + 1}/{len(runs)}]"
        result = run_one(
            grid, spec, data, out, log=lambda m, p=prefix: log(f"{p} {m}"), progress=progress
        )
        results.append(result)
        if not result["skipped"]:
            log(f"{prefix}   {_result_line(result)}")
            write_report(grid, results, out / "report")
    write_report(grid, results, out / "report")
    return results


def _result_line(r: dict[str, Any]) -> str:
    if r["status"] != "done":
        return f"{r['status']} at step {r['steps']}"
    text = (
        f"held-out {r['heldout_bpd']:.4f} bits/dim after {r['steps']} steps, "
        f"{r['train_seconds']:.0f} s; {r['sample_images']} samples in "
        + (
            f"{r['sample_seconds']:.2f} s"
            if math.isfinite(r["sample_seconds"])
            else "- (sampling failed, see train.log)"
        )
        + (
            " (timed at temperature 0: the samples had NaN/Inf values)"
            if r.get("sample_nonfinite")
            else ""
        )
    )
    if r.get("digit_share") is not None:
        text += f"; {r['digit_share']:.0%} legible digits"
    return text


def grid_status(grid: GridConfig, out: str | os.PathLike) -> list[tuple[RunSpec, str]]:
    """``(spec, state)`` of every run (``done`` / ``partial`` / ``todo``)."""
    out = Path(out)
    return [(s, run_state(out / s.folder(grid))) for s in grid.runs()]


# ---------------------------------------------------------------------- the report
REPORT_COLUMNS = (
    "budget",
    "conv",
    "coupling",
    "D",
    "seeds",
    "parameters",
    "held-out bits/dim",
    "steps",
    "training s",
    "sampling s",
    "legible samples %",
    "failed",
)


def _variant_key(r: dict[str, Any]) -> tuple[str, int, str, str]:
    return (r["budget"], r["depth"], r["conv"], r["coupling"])


def summarize(grid: GridConfig, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (budget, depth, conv, coupling), in grid order: the finished runs'
    numbers as lists (failed runs counted apart, their numbers not averaged)."""
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(_variant_key(r), []).append(r)
    rows = []
    for budget in grid.budgets:
        for depth in grid.depths:
            for conv in grid.convs:
                for coupling in grid.couplings:
                    rs = groups.get((budget, depth, conv, coupling), [])
                    if not rs:
                        continue
                    ok = [r for r in rs if r["status"] == "done"]
                    rows.append(
                        {
                            "budget": budget,
                            "budget_value": grid.budget_value(budget),
                            "conv": conv,
                            "coupling": coupling,
                            "depth": depth,
                            "seeds": [r["seed"] for r in ok],
                            "failed": len(rs) - len(ok),
                            "parameters": rs[0]["parameters"],
                            "bpd": [r["heldout_bpd"] for r in ok],
                            "steps": [r["steps"] for r in ok],
                            "train_seconds": [r["train_seconds"] for r in ok],
                            "sample_seconds": [r["sample_seconds"] for r in ok],
                            "sample_nonfinite": [bool(r.get("sample_nonfinite")) for r in ok],
                            "digit_share": [
                                r["digit_share"] for r in ok if r.get("digit_share") is not None
                            ],
                            "digit_real_share": [
                                r["digit_real_share"]
                                for r in ok
                                if r.get("digit_real_share") is not None
                            ],
                            "curves": [r["curve"] for r in ok],
                        }
                    )
    return rows


def _sampling_cell(seconds: Sequence[float], nonfinite: Sequence[bool] | None = None) -> str:
    """Mean ± std of the sampling times that were measured, with the count of runs whose
    samples were non-finite (timed on the latent mode) and of runs not timed at all."""
    ok = [s for s in seconds if math.isfinite(s)]
    cell = format_mean_std(ok, 2)
    notes = []
    n_nonfinite = sum(bool(b) for b in nonfinite or ())
    if n_nonfinite:
        notes.append(f"{n_nonfinite} non-finite")
    if len(seconds) - len(ok):
        notes.append(f"{len(seconds) - len(ok)} failed")
    return f"{cell} ({', '.join(notes)})" if notes else cell


def format_table(rows: Sequence[dict[str, Any]], budget: str) -> str:
    """The Markdown table of one budget."""
    lines = ["| " + " | ".join(REPORT_COLUMNS[1:]) + " |", "|" + "---|" * (len(REPORT_COLUMNS) - 1)]
    for row in rows:
        if row["budget"] != budget:
            continue
        cells = [
            row["conv"],
            row["coupling"],
            str(row["depth"]),
            str(len(row["seeds"])),
            f"{row['parameters']:,}",
            format_mean_std(row["bpd"], 3),
            format_mean_std(row["steps"], 0),
            format_mean_std(row["train_seconds"], 0),
            _sampling_cell(row["sample_seconds"], row["sample_nonfinite"]),
            format_mean_std(row["digit_share"], 1, scale=100.0) if row["digit_share"] else "–",
            str(row["failed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The paper's comparisons: ``(axis, candidate, baseline)``; the candidate is compared with
#: the baseline at every other setting of the grid (where the grid has both). The paper's
#: Emerging baseline is ``1x1+emerging`` (a 1x1 convolution before the emerging one).
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("conv", "cinc", "1x1+emerging"),
    ("conv", "cinc", "emerging"),
    ("conv", "cinc", "1x1"),
    ("coupling", "quad", "affine"),
    # the other options of the official training script
    ("conv", "periodic", "cinc"),
    ("conv", "periodic", "1x1+emerging"),
    ("conv", "periodic", "emerging"),
    ("conv", "1x1+cinc", "cinc"),
    ("conv", "1x1", "shuffle"),
    ("conv", "1x1", "reverse"),
    ("coupling", "additive", "affine"),
)


def paired_differences(
    results: Sequence[dict[str, Any]], budget: str, axis: str, candidate: str, baseline: str
) -> list[dict[str, Any]]:
    """Seed-paired differences of held-out bits/dim, candidate minus baseline.

    For every setting of the other axes (conv or coupling, and depth) with both variants
    finished on some common seeds: ``diffs`` (one per common seed; negative means the
    candidate is better), ``spread`` (the largest of three standard deviations over those
    seeds: each variant's bits/dim and the paired differences; NaN with one seed) and
    ``verdict``: ``"better"`` / ``"worse"`` when the mean difference is larger than the spread,
    ``"within spread"`` when it is not, ``"one seed"`` when there is nothing to compare with.
    """
    other = "coupling" if axis == "conv" else "conv"
    done = [
        r
        for r in results
        if r["budget"] == budget and r["status"] == "done" and math.isfinite(r["heldout_bpd"])
    ]
    by_key = {(r[axis], r[other], r["depth"], r["seed"]): r["heldout_bpd"] for r in done}
    out = []
    for setting in sorted({(r[other], r["depth"]) for r in done}, key=lambda t: (t[1], t[0])):
        seeds = sorted(
            s
            for (v, o, d, s) in by_key
            if v == candidate and (o, d) == setting and (baseline, o, d, s) in by_key
        )
        if not seeds:
            continue
        a = [by_key[(candidate, *setting, s)] for s in seeds]
        b = [by_key[(baseline, *setting, s)] for s in seeds]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        mean = float(np.mean(diffs))
        if len(seeds) < 2:
            spread, verdict = math.nan, "one seed"
        else:
            spread = max(float(np.std(v, ddof=1)) for v in (a, b, diffs))
            verdict = (
                "within spread" if not abs(mean) > spread else ("better" if mean < 0 else "worse")
            )
        out.append(
            {
                other: setting[0],
                "depth": setting[1],
                "seeds": seeds,
                "diffs": diffs,
                "spread": spread,
                "verdict": verdict,
            }
        )
    return out


def format_claims(results: Sequence[dict[str, Any]], budget: str) -> str:
    """The Markdown table of :data:`CLAIMS` for one budget (:func:`paired_differences`)."""
    lines = [
        "| claim | setting | D | seeds | difference (bits/dim) | seed spread | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for axis, candidate, baseline in CLAIMS:
        for row in paired_differences(results, budget, axis, candidate, baseline):
            setting = row["coupling"] if axis == "conv" else row["conv"]
            spread = "–" if math.isnan(row["spread"]) else f"{row['spread']:.3f}"
            verdict = {
                "better": f"{candidate} better",
                "worse": f"{baseline} better",
                "within spread": "within the seed spread",
                "one seed": "one seed: not resolved",
            }[row["verdict"]]
            lines.append(
                f"| {candidate} vs {baseline} | {setting} | {row['depth']} | {len(row['seeds'])} "
                f"| {format_mean_std(row['diffs'], 3, signed=True)} | {spread} | {verdict} |"
            )
    return "\n".join(lines)


def write_report(
    grid: GridConfig, results: Sequence[dict[str, Any]], folder: str | os.PathLike
) -> Path:
    """Write ``report.md``, ``results.csv`` and ``curves_<budget>.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize(grid, results)
    _write_results_csv(results, folder / "results.csv")
    total = sum(r["train_seconds"] for r in results)
    parts = [
        "# Experiment report",
        "",
        f"{len(results)} of {len(grid.runs())} runs finished; {total / 60:.1f} min of training "
        "in total.",
        "",
        "Held-out bits/dim (all held-out images, EMA weights), training steps, training time "
        "(seconds, including the held-out evaluations and checkpoints), time to sample "
        f"{grid.sample_images} images at temperature {grid.temperature:g} (inverses included, "
        "after training; when the samples of a run contain NaN/Inf values, the same "
        "computation is timed on the latent mode, temperature 0, and the run is counted in "
        "brackets as non-finite; its legible share is not measured): "
        "mean ± standard deviation over the seeds (ddof = 1). "
        "Failed: runs that diverged or ended with a non-finite held-out value (not averaged).",
    ]
    reals = [v for row in rows for v in row["digit_real_share"]]
    if reals:
        parts += [
            "",
            "Legible samples: the share of those samples that the digit classifier assigns to "
            f"one digit with probability >= 0.9; the same share for the real held-out images is "
            f"{100 * float(np.mean(reals)):.0f} %.",
        ]

    def options(d: dict[str, Any]) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items()) or "defaults"

    parts += [
        "",
        f"Model: {options(grid.model)}. Training: {options(grid.train)}. "
        f"Seeds per depth: {', '.join(f'D={d}: {n}' for d, n in grid.seeds)}.",
    ]
    for budget in grid.budgets:
        if not any(r["budget"] == budget for r in rows):
            continue
        title = (
            f"Equal steps: {grid.steps} steps per run"
            if budget == "steps"
            else f"Equal wall-clock time: {grid.seconds:g} s of training per run"
        )
        figure = plot_curves(rows, budget, folder / f"curves_{budget}.png", title)
        parts += [
            "",
            f"## {title}",
            "",
            format_table(rows, budget),
            "",
            f"![held-out bits/dim]({figure.name})",
            "",
            "Paired comparisons (held-out bits/dim of the candidate minus the baseline, per "
            "seed, then mean ± std over the common seeds; negative: the candidate is better). "
            "Seed spread: the largest standard deviation over those seeds of either variant's "
            "bits/dim and of the paired differences; a difference within it is not resolved "
            "by these seeds.",
            "",
            format_claims(results, budget),
        ]
    path = folder / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def _write_results_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    cols = (
        "budget",
        "budget_value",
        "conv",
        "coupling",
        "depth",
        "seed",
        "status",
        "heldout_bpd",
        "steps",
        "train_seconds",
        "parameters",
        "sample_seconds",
        "sample_nonfinite",
        "digit_share",
    )
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(cols)
    for r in results:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    write_atomic(path, buf.getvalue().encode())


def seed_band(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 100
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lowest and highest of several ``(x, y)`` curves on a common grid of ``x`` (linear
    interpolation over the range every curve covers). Returns ``(x, mean, low, high)``."""
    curves = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not curves:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    lo = max(x[0] for x, _ in curves)
    hi = min(x[-1] for x, _ in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([hi])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # (seeds, points)
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot_curves(rows: Sequence[dict[str, Any]], budget: str, path: Path, title: str) -> Path:
    """Held-out bits/dim against steps and against seconds, one line per variant (the mean
    over seeds), shaded between the lowest and the highest seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    convs = sorted({r["conv"] for r in rows}, key=lambda c: CONVS.index(c))
    depths = sorted({r["depth"] for r in rows})
    lows: list[float] = []
    highs: list[float] = []
    for row in rows:
        if row["budget"] != budget:
            continue
        color = f"C{convs.index(row['conv'])}"
        style = "-" if row["coupling"] == "affine" else "--"
        width = 1.0 + 1.2 * depths.index(row["depth"])
        label = f"{row['conv']} {row['coupling']} D={row['depth']} ({len(row['seeds'])} seeds)"
        for ax, key in zip(axes, ("step", "seconds"), strict=True):
            curves = []
            for c in row["curves"]:
                x, y = np.asarray(c[key], float), np.asarray(c["bpd"], float)
                ok = np.isfinite(y)
                curves.append((x[ok], y[ok]))
            x, mean, low, high = seed_band(curves)
            if not len(x):
                continue
            ax.plot(x, mean, style, color=color, lw=width, label=label)
            ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)
            lows.append(float(low.min()))
            highs.append(float(high.max()))
    for ax, xlabel in zip(axes, ("training step", "training seconds"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits/dim")
        ax.grid(alpha=0.3)
        if lows:  # the interesting range: from the best value up to 3 bits/dim above it
            bottom = min(lows) - 0.05
            ax.set_ylim(bottom, min(max(highs), bottom + 3.0) + 0.05)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{title}: mean over seeds, shaded from the lowest to the highest seed", fontsize=10
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
