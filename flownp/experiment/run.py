r"""Training the runs of a grid: one run (:func:`run_one`), the whole grid (:func:`run_grid`).

Each run folder holds checkpoint.h5, metrics.csv, train.log, ... of its
:class:`flownp.train.Trainer`. Resuming: a run folder with ``result.json`` is complete and
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
of the grid is compiled on a tiny model (:func:`warm_up`), so that no run's clock includes
Numba compilation. The report (:mod:`flownp.experiment.report`) is rewritten after every run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flownp import distributed
from flownp.data.pixels import dequantize
from flownp.digits import MEASURE as DIGIT_MEASURE
from flownp.errors import DataError, NonFiniteError, SingularKernelError
from flownp.experiment.grid import ExperimentError, GridConfig, RunSpec
from flownp.experiment.report import write_report
from flownp.files import write_atomic
from flownp.model import FlowConfig, FlowModel, bpd_loss
from flownp.train import TrainConfig, Trainer, TrainingDiverged

RESULT_FILE = "result.json"
GRID_FILE = "grid.json"


# ---------------------------------------------------------------------- one run
def _json_safe(obj: Any) -> Any:
    """Round-trip a config dict through JSON types (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(obj))


# Filled in by the Trainer (not chosen by the grid): the training data's fingerprint, the
# dataset spec made absolute, and the warmup restart point of a resumed run.
_TRAINER_FIELDS = ("dataset_fingerprint", "dataset", "warmup_start")

#: A grid's run trains on one process, whatever the processes of the grid.
_ALONE = distributed.SerialComm()


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
            ckpt, data, out_dir=run_dir, progress=progress, log=file_log, comm=_ALONE
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
        trainer = Trainer(
            mc, tc, data, out_dir=run_dir, progress=progress, log=file_log, comm=_ALONE
        )
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
    comm: Any = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every run of ``grid`` into ``out`` and write the report after each.

    ``train=False`` trains nothing: the report is built from the finished runs. Returns the
    results of the finished runs, in grid order.

    Several processes (``comm``, default :func:`flownp.distributed.world`): the runs still to
    train are dealt round robin in grid order, each trains on one process; process 0 writes
    the report after each of its runs (from every run finished so far) and, once every
    process is done, the final one; every process returns all the results. An error or a
    signal on one process lets the others finish their current run, then is raised on
    every process.
    """
    from flownp.train.data_stream import load_data

    comm = distributed.world() if comm is None else comm
    out = Path(out)
    if data is None:
        data = distributed.together(
            comm,
            lambda: load_data(grid.train.get("dataset", "mnist"), grid.train.get("holdout")),
        )
    declared = _json_safe({"grid": grid.to_dict(), "image_shape": list(data.shape)})
    runs = grid.runs()

    def start() -> list[str]:
        out.mkdir(parents=True, exist_ok=True)
        if train:
            _write_json(out / GRID_FILE, declared)
        return [run_state(out / s.folder(grid)) for s in runs]

    states = distributed.on_root(comm, start)
    todo = [i for i, state in enumerate(states) if state != "done"] if train else []
    mine = set(todo[comm.rank :: comm.size])
    if todo:
        log(
            f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to train "
            f"({sum(states[i] == 'partial' for i in todo)} partially trained)"
            + (f" on {comm.size} processes" if comm.size > 1 else "")
        )
    if mine:
        t0 = time.perf_counter()
        warm_up(grid, data.shape)
        log(f"kernels compiled in {time.perf_counter() - t0:.1f} s")
    results: dict[int, dict[str, Any]] = {}
    error: BaseException | None = None
    with _StopBetweenRuns(comm) as stop:
        try:
            for i, spec in enumerate(runs):
                if stop.signum is not None:
                    raise KeyboardInterrupt(f"stopped before run {i + 1} of {len(runs)}")
                mine_to_train = i in mine
                if not mine_to_train and (i in todo or states[i] != "done" or not comm.is_root):
                    continue  # another process's run; finished runs are read by process 0
                prefix = f"[{i + 1}/{len(runs)}]"
                result = run_one(
                    grid,
                    spec,
                    data,
                    out,
                    log=lambda m, p=prefix: log(f"{p} {m}"),
                    progress=progress,
                )
                results[i] = result
                if not result["skipped"]:
                    log(f"{prefix}   {_result_line(result)}")
                    if comm.is_root:
                        write_report(grid, _so_far(grid, runs, results, out), out / "report")
        except BaseException as exc:  # one process: as it is; several: after the others
            if comm.size == 1:
                raise
            error = exc
    if comm.size > 1:
        results = _gather_results(comm, results, error, runs, log)
    ordered = [results[i] for i in sorted(results)]
    if comm.is_root:
        write_report(grid, ordered, out / "report")
    return ordered


class _StopBetweenRuns:
    """Several processes: SIGINT / SIGTERM between runs are remembered (``signum``), so the
    process starts no new run and meets the others at the end; during a run the trainer's own
    handler stops it after its step and saves. One process: does nothing (a signal
    interrupts as it always did)."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopBetweenRuns:
        import signal
        import threading

        if self.comm.size > 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _so_far(
    grid: GridConfig, runs: list[RunSpec], results: dict[int, dict[str, Any]], out: Path
) -> list[dict[str, Any]]:
    """The finished runs in grid order: this process's, and the others' finished so far
    (their ``result.json``; a run still training has none)."""
    found = dict(results)
    for i, spec in enumerate(runs):
        path = out / spec.folder(grid) / RESULT_FILE
        if i not in found and path.exists():
            result = _read_result(path)
            result["skipped"] = False
            found[i] = result
    return [found[i] for i in sorted(found)]


def _gather_results(
    comm: Any,
    results: dict[int, dict[str, Any]],
    error: BaseException | None,
    runs: list[RunSpec],
    log: Callable[[str], None],
) -> dict[int, dict[str, Any]]:
    """Every process's results (process 0 logs the runs the others trained), or the error of
    the lowest process that had one, raised on every process."""
    gathered = comm.allgather((results, distributed.failure(error)))
    distributed.raise_first_failure(comm, [f for _, f in gathered], error)
    merged: dict[int, dict[str, Any]] = {}
    for rank, (theirs, _) in enumerate(gathered):
        for i, result in theirs.items():
            if rank != comm.rank and not result["skipped"]:
                log(f"[{i + 1}/{len(runs)}] (process {rank})   {_result_line(result)}")
            merged.setdefault(i, result)
    return merged


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
