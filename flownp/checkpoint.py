"""HDF5 checkpoints (h5py): the model, the optimizer, the training position and the metrics.

The exact layout (every path, shape, dtype and attribute) is in ``docs/checkpoint-format.md``;
in short, format version 1::

    /                       attrs format="flownp-checkpoint", format_version=1, flownp_version,
                            created (ISO 8601 UTC)
    /config                 attrs model (FlowConfig JSON), model_seed, train (TrainConfig JSON
                            or "null")
    /model/params/<path>    every parameter, by its path (e.g. level0/step2/conv/weight)
    /model/buffers/<path>   every buffer (actnorm "initialized" flags, signs, permutations)
    /optimizer              (optional) attrs t, hparams (JSON); groups m/, v/ and ema/ (same
                            paths as the parameters; ema/ only with EMA)
    /state                  (optional) attrs step, epoch, position, rng_state (JSON of numpy's
                            bit_generator.state), consecutive_bad, rejected_total, elapsed
    /metrics/<table>/<col>  (optional) 1-D float64 columns of equal length (tables "train",
                            "eval")

Writes are atomic: the file is written to a temporary file in the same directory, flushed and
fsync'ed, then moved over the destination with :func:`os.replace` (and the directory is
fsync'ed). A crash at any point leaves either the old or the new file, never a mix.

Reading a missing, truncated, foreign (any HDF5 file without the format attribute) or
newer-version file raises :class:`~flownp.errors.CheckpointError` with the reason.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flownp.errors import CheckpointError

FORMAT = "flownp-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


@dataclass
class Checkpoint:
    """The content of a checkpoint file, as plain Python / NumPy objects.

    Attributes
    ----------
    model_config : dict
        ``FlowConfig.to_dict()``.
    model_seed : int
    model_state : dict[str, ndarray]
        ``FlowModel.state_dict()`` layout: ``"params/<path>"`` and ``"buffers/<path>"``.
    optimizer_state : dict or None
        ``Adam.state_dict()`` layout (``hparams``, ``t``, ``m``, ``v``, ``ema``).
    train_state : dict or None
        ``step``, ``epoch``, ``position``, ``rng_state``, ``consecutive_bad``,
        ``rejected_total``, ``elapsed``.
    train_config : dict or None
    metrics : dict[str, dict[str, ndarray]]
        ``{table: {column: 1-D array}}``.
    format_version : int
    attrs : dict
        The root attributes (format, version, flownp version, creation time).
    """

    model_config: dict[str, Any]
    model_seed: int
    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, Any] | None = None
    train_state: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None
    metrics: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    attrs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- writing
def _write_group(group: Any, arrays: dict[str, np.ndarray]) -> None:
    """Write ``{path: array}`` as datasets under ``group`` (paths create sub-groups)."""
    for key, arr in arrays.items():
        group.create_dataset(key, data=np.asarray(arr))


def _write(f: Any, ckpt: Checkpoint) -> None:
    """Fill an open, empty h5py file with ``ckpt`` (format version 1)."""
    from flownp import __version__

    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["flownp_version"] = __version__
    f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    cfg = f.create_group("config")
    cfg.attrs["model"] = json.dumps(ckpt.model_config, sort_keys=True)
    cfg.attrs["model_seed"] = int(ckpt.model_seed)
    cfg.attrs["train"] = json.dumps(ckpt.train_config, sort_keys=True)
    params = {
        k[len("params/") :]: v for k, v in ckpt.model_state.items() if k.startswith("params/")
    }
    buffers = {
        k[len("buffers/") :]: v for k, v in ckpt.model_state.items() if k.startswith("buffers/")
    }
    if len(params) + len(buffers) != len(ckpt.model_state):
        raise ValueError("save_checkpoint: model_state keys must start with params/ or buffers/")
    model = f.create_group("model")
    _write_group(model.create_group("params"), params)
    _write_group(model.create_group("buffers"), buffers)
    if ckpt.optimizer_state is not None:
        st = ckpt.optimizer_state
        opt = f.create_group("optimizer")
        opt.attrs["t"] = int(st["t"])
        opt.attrs["hparams"] = json.dumps(st["hparams"], sort_keys=True)
        _write_group(opt.create_group("m"), st["m"])
        _write_group(opt.create_group("v"), st["v"])
        if st.get("ema") is not None:
            _write_group(opt.create_group("ema"), st["ema"])
    if ckpt.train_state is not None:
        ts = ckpt.train_state
        g = f.create_group("state")
        for key in ("step", "epoch", "position", "consecutive_bad", "rejected_total"):
            g.attrs[key] = int(ts[key])
        g.attrs["elapsed"] = float(ts["elapsed"])
        g.attrs["rng_state"] = json.dumps(ts["rng_state"])
    if ckpt.metrics:
        m = f.create_group("metrics")
        for table, cols in ckpt.metrics.items():
            t = m.create_group(table)
            lengths = {len(v) for v in cols.values()}
            if len(lengths) > 1:
                raise ValueError(f"save_checkpoint: metrics/{table} columns differ in length")
            for col, values in cols.items():
                t.create_dataset(col, data=np.asarray(values, dtype=np.float64))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every OS/filesystem allows fsync of a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temp file + fsync + :func:`os.replace`)."""
    import h5py

    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            _write(f, ckpt)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def save_checkpoint(
    path: str | os.PathLike,
    model: Any,
    *,
    optimizer: Any = None,
    train_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Save a :class:`~flownp.model.FlowModel` (and optionally the training state) atomically.

    Parameters
    ----------
    path : file to write (replaced atomically if it exists)
    model : FlowModel
    optimizer : Adam or None
    train_state : dict or None (see :class:`Checkpoint`)
    train_config : dict or None (``TrainConfig.to_dict()``)
    metrics : ``{table: {column: sequence}}`` or None
    """
    ckpt = Checkpoint(
        model_config=model.config.to_dict(),
        model_seed=model.seed,
        model_state=model.state_dict(),
        optimizer_state=None if optimizer is None else optimizer.state_dict(),
        train_state=train_state,
        train_config=train_config,
        metrics={
            t: {c: np.asarray(v) for c, v in cols.items()} for t, cols in (metrics or {}).items()
        },
    )
    return write_checkpoint(path, ckpt)


# ---------------------------------------------------------------------- reading
def _read_group(group: Any) -> dict[str, np.ndarray]:
    """``{relative path: array}`` of every dataset below ``group``."""
    import h5py

    out: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[()]

    group.visititems(visit)
    return {k: np.asarray(v) for k, v in out.items()}


def _attr(obj: Any, key: str, where: str) -> Any:
    if key not in obj.attrs:
        raise KeyError(f"attribute {key!r} missing on {where}")
    val = obj.attrs[key]
    return val.decode() if isinstance(val, bytes) else val


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file. Raises :class:`CheckpointError` if it is missing, truncated,
    not a flownp checkpoint, of an unsupported format version, or incomplete."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be opened as HDF5 (truncated, corrupt or not an HDF5 "
            f"file): {exc}"
        ) from None
    with f:
        fmt = f.attrs.get("format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT:
            raise CheckpointError(
                f"{path} is an HDF5 file but not a flownp checkpoint "
                f"(root attribute 'format' is {fmt!r}, expected {FORMAT!r})"
            )
        version = f.attrs.get("format_version")
        try:
            version = int(version)
        except (TypeError, ValueError):
            version = None
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(
                f"{path}: checkpoint format version {version!r} is not supported by this flownp "
                f"(it reads versions {list(SUPPORTED_VERSIONS)}); upgrade flownp"
            )
        try:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            cfg = f["config"]
            model_config = json.loads(_attr(cfg, "model", "/config"))
            model_seed = int(_attr(cfg, "model_seed", "/config"))
            train_config = json.loads(_attr(cfg, "train", "/config"))
            state = {f"params/{k}": v for k, v in _read_group(f["model/params"]).items()}
            state.update({f"buffers/{k}": v for k, v in _read_group(f["model/buffers"]).items()})
            opt = None
            if "optimizer" in f:
                g = f["optimizer"]
                opt = {
                    "t": int(_attr(g, "t", "/optimizer")),
                    "hparams": json.loads(_attr(g, "hparams", "/optimizer")),
                    "m": _read_group(g["m"]),
                    "v": _read_group(g["v"]),
                    "ema": _read_group(g["ema"]) if "ema" in g else None,
                }
            ts = None
            if "state" in f:
                g = f["state"]
                ts = {
                    k: int(_attr(g, k, "/state"))
                    for k in ("step", "epoch", "position", "consecutive_bad", "rejected_total")
                }
                ts["elapsed"] = float(_attr(g, "elapsed", "/state"))
                ts["rng_state"] = json.loads(_attr(g, "rng_state", "/state"))
            metrics: dict[str, dict[str, np.ndarray]] = {}
            if "metrics" in f:
                for table in f["metrics"]:
                    metrics[table] = _read_group(f["metrics"][table])
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {exc}") from None
    return Checkpoint(
        model_config=model_config,
        model_seed=model_seed,
        model_state=state,
        optimizer_state=opt,
        train_state=ts,
        train_config=train_config,
        metrics=metrics,
        format_version=version,
        attrs=attrs,
    )


def model_from_checkpoint(ckpt: Checkpoint, *, use_ema: bool = True) -> Any:
    """Build the :class:`~flownp.model.FlowModel` stored in ``ckpt``.

    With ``use_ema`` (default) and EMA weights present, the parameters are the EMA (Polyak)
    averages, which are the ones meant for evaluation and sampling.
    """
    from flownp.model import FlowConfig, FlowModel

    try:
        config = FlowConfig.from_dict(ckpt.model_config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint has an invalid model configuration: {exc}") from None
    model = FlowModel(config, seed=ckpt.model_seed)
    try:
        model.load_state_dict(ckpt.model_state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint does not match its model configuration: {exc}") from None
    ema = (ckpt.optimizer_state or {}).get("ema")
    if use_ema and ema is not None:
        params = model.params
        if set(ema) != set(params):
            diff = sorted(set(ema) ^ set(params))
            raise CheckpointError(f"checkpoint EMA weights do not match the model: {diff[:5]}")
        for k, p in params.items():
            if ema[k].shape != p.shape:
                raise CheckpointError(
                    f"checkpoint EMA weight {k} has shape {ema[k].shape}, expected {p.shape}"
                )
            p[...] = ema[k]
    return model


def load_model(path: str | os.PathLike, *, use_ema: bool = True) -> Any:
    """Read ``path`` and return the trained :class:`~flownp.model.FlowModel` (EMA weights by
    default when the checkpoint has them)."""
    return model_from_checkpoint(read_checkpoint(path), use_ema=use_ema)
