"""HDF5 checkpoints (h5py): the model, the optimizer, the training position and the metrics.

The exact layout (every path, shape, dtype and attribute) is in ``docs/checkpoint-format.md``;
in short, format version 2::

    /                       attrs format="flownp-checkpoint", format_version=2, flownp_version,
                            created (ISO 8601 UTC), checksums_sha256
    /checksums              uint8 dataset: UTF-8 JSON {object: SHA-256 hex} of every dataset
                            and every attribute set in the file (below)
    /config                 attrs model (FlowConfig JSON), model_seed, train (TrainConfig JSON
                            or "null")
    /model/params/<path>    every parameter, by its path (e.g. level0/step2/conv/weight)
    /model/buffers/<path>   every buffer (actnorm "initialized" flags, signs, permutations)
    /optimizer              (optional) attrs t, hparams (JSON, with "optimizer": "adam" or
                            "adamax"; absent: Adam); groups m/, v/ (Adam) or u/ (Adamax)
                            and ema/ (same paths as the parameters; ema/ only with EMA)
    /state                  (optional) attrs step, epoch, position, rng_state (JSON of numpy's
                            bit_generator.state), consecutive_bad, rejected_total, elapsed,
                            history (JSON list of the settings changed at each resume)
    /metrics/<table>/<col>  (optional) 1-D float64 columns of equal length (tables "train",
                            "eval", "stability", "digits")

**Writes are checked, then atomic.** Every parameter, optimizer moment and EMA weight must be
finite (:class:`~flownp.errors.NonFiniteError` otherwise: nothing is written). The whole file
is built in memory, then its bytes go to a temporary file ``.<name>.<random>.tmp`` in the same
directory, which is fsync'ed and moved over the destination with :func:`os.replace` (and the
directory is fsync'ed). Any ``OSError`` on the way (disk full, permissions) becomes a
:class:`~flownp.errors.CheckpointError` naming the path and the cause; the temporary file is
removed and the previous checkpoint is untouched. Temporary files left behind by a killed
writer are removed by the next write to the same path (one writer per path).

**Reads verify.** The checksum table covers every dataset (dtype, shape, bytes) and every
object's attributes; a read recomputes all of them. Any difference, a missing or unexpected
object, or any error of the HDF5 library while reading, raises :class:`CheckpointError` naming
the damaged part: a corrupt file never loads. Files of format version 1 (written before
checksums existed) cannot be verified: :func:`read_checkpoint` refuses them unless called with
``allow_unverified=True`` (then re-save them to add checksums).
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flownp.errors import CheckpointError, NonFiniteError
from flownp.files import write_atomic

FORMAT = "flownp-checkpoint"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: no checksums, read only with allow_unverified=True
CHECKSUMS = "checksums"  # the table dataset
CHECKSUMS_ATTR = "checksums_sha256"  # root attribute: SHA-256 of the table's bytes
#: The optimizers' second statistics: Adam's second moment, Adamax's infinity norm.
SECOND_MOMENTS = ("v", "u")


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
        ``Optimizer.state_dict()`` layout (``hparams``, ``t``, ``m``, ``v`` or ``u``, ``ema``).
    train_state : dict or None
        ``step``, ``epoch``, ``position``, ``rng_state``, ``consecutive_bad``,
        ``rejected_total``, ``elapsed`` and (optional) ``history``: a list of
        ``{"step", "time", "changes": {setting: [old, new]}}``, one per resume that changed a
        setting.
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


# ---------------------------------------------------------------------- checksums
def _canonical(value: Any) -> Any:
    """An attribute value as plain JSON-able Python (bytes decoded, NumPy unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, np.ndarray):
        return [_canonical(v) for v in value.tolist()] if value.ndim else _canonical(value[()])
    if isinstance(value, np.generic):
        return _canonical(value.item())
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _digest_attrs(obj: Any, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 of an object's attributes: sorted ``(name, type, value)`` as JSON."""
    items = []
    for key in sorted(obj.attrs.keys()):
        if key in skip:
            continue
        val = obj.attrs[key]
        items.append([key, type(val).__name__, _canonical(val)])
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


def _digest_array(arr: np.ndarray, dtype: np.dtype | None = None) -> str:
    """SHA-256 of a dtype (default: the array's), the array's shape and its bytes (C order)."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{(dtype or arr.dtype).str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _manifest(f: Any) -> dict[str, str]:
    """``{"data:/path": sha256, "attrs:/path": sha256}`` of every dataset and every object's
    attributes in the open file ``f`` (the checksum table itself excluded)."""
    import h5py

    out = {"attrs:/": _digest_attrs(f, skip=(CHECKSUMS_ATTR,))}

    def visit(name: str, obj: Any) -> None:
        if name == CHECKSUMS:
            return
        out[f"attrs:/{name}"] = _digest_attrs(obj)
        if isinstance(obj, h5py.Dataset):
            # booleans are HDF5 enums read back as any-nonzero -> True: hash the stored bytes
            # (with the dtype bool, so that a datatype corrupted to int8 differs too)
            data = obj.astype(np.int8)[()] if obj.dtype == np.bool_ else obj[()]
            out[f"data:/{name}"] = _digest_array(np.asarray(data), obj.dtype)

    f.visititems(visit)
    return out


def _add_checksums(f: Any) -> None:
    """Store the checksum table of the (complete) file ``f`` and the table's own digest."""
    table = json.dumps(_manifest(f), sort_keys=True).encode()
    f.create_dataset(CHECKSUMS, data=np.frombuffer(table, dtype=np.uint8))
    f.attrs[CHECKSUMS_ATTR] = hashlib.sha256(table).hexdigest()


def _verify(f: Any) -> None:
    """Recompute every checksum of ``f`` and compare with its table; raise ``ValueError``
    naming the first damaged part."""
    if CHECKSUMS not in f or CHECKSUMS_ATTR not in f.attrs:
        raise ValueError("the checksum table is missing")
    stored = f.attrs[CHECKSUMS_ATTR]
    stored = stored.decode() if isinstance(stored, bytes) else str(stored)
    raw = np.asarray(f[CHECKSUMS][()])
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError("the checksum table is damaged (wrong type)")
    table_bytes = raw.tobytes()
    if hashlib.sha256(table_bytes).hexdigest() != stored:
        raise ValueError("the checksum table is damaged (its own SHA-256 does not match)")
    expected = json.loads(table_bytes.decode())
    actual = _manifest(f)
    for key in sorted(expected):
        if key not in actual:
            raise ValueError(f"{_part(key)} is missing")
        if actual[key] != expected[key]:
            raise ValueError(f"{_part(key)} is damaged (SHA-256 mismatch)")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise ValueError(f"{_part(extra[0])} is not in the checksum table")


def _part(key: str) -> str:
    kind, _, where = key.partition(":")
    return f"dataset {where}" if kind == "data" else f"the attributes of {where}"


# ---------------------------------------------------------------------- writing
def _write_group(group: Any, arrays: dict[str, np.ndarray]) -> None:
    """Write ``{path: array}`` as datasets under ``group`` (paths create sub-groups)."""
    for key, arr in arrays.items():
        group.create_dataset(key, data=np.asarray(arr))


def _write(f: Any, ckpt: Checkpoint) -> None:
    """Fill an open, empty h5py file with ``ckpt`` (without the checksums)."""
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
        for second in SECOND_MOMENTS:  # Adam's v or Adamax's u
            if st.get(second) is not None:
                _write_group(opt.create_group(second), st[second])
        if st.get("ema") is not None:
            _write_group(opt.create_group("ema"), st["ema"])
    if ckpt.train_state is not None:
        ts = ckpt.train_state
        g = f.create_group("state")
        for key in ("step", "epoch", "position", "consecutive_bad", "rejected_total"):
            g.attrs[key] = int(ts[key])
        g.attrs["elapsed"] = float(ts["elapsed"])
        g.attrs["rng_state"] = json.dumps(ts["rng_state"])
        g.attrs["history"] = json.dumps(list(ts.get("history") or []), sort_keys=True)
    if ckpt.metrics:
        m = f.create_group("metrics")
        for table, cols in ckpt.metrics.items():
            t = m.create_group(table)
            lengths = {len(v) for v in cols.values()}
            if len(lengths) > 1:
                raise ValueError(f"save_checkpoint: metrics/{table} columns differ in length")
            for col, values in cols.items():
                t.create_dataset(col, data=np.asarray(values, dtype=np.float64))


def check_finite_state(ckpt: Checkpoint) -> None:
    """Raise :class:`NonFiniteError` naming every parameter, buffer, optimizer moment or EMA
    weight that holds a NaN or Inf (such a state cannot be evaluated, sampled or resumed)."""
    groups: list[tuple[str, dict[str, Any]]] = [("model", ckpt.model_state)]
    opt = ckpt.optimizer_state or {}
    for name in ("m", *SECOND_MOMENTS, "ema"):
        if opt.get(name) is not None:
            groups.append((f"optimizer/{name}", opt[name]))
    bad = []
    for prefix, arrays in groups:
        for key, arr in arrays.items():
            a = np.asarray(arr)
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                bad.append(f"{prefix}/{key}")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"the state holds NaN/Inf values in {', '.join(bad[:5])}{more}; it is not usable "
            "and is not written"
        )


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """The complete checkpoint file (with its checksums) as bytes, built in memory."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        _write(f, ckpt)
        _add_checksums(f)
    return buf.getvalue()


def write_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Check ``ckpt`` (finite state), then write it to ``path`` atomically with checksums.

    Raises
    ------
    NonFiniteError
        The state holds NaN/Inf (nothing is written).
    CheckpointError
        The file could not be written (disk full, permissions, ...): the message names the
        path and the cause; the previous file at ``path`` is untouched, no temporary is left.
    """
    path = Path(path)
    check_finite_state(ckpt)
    data = checkpoint_bytes(ckpt)
    try:
        write_atomic(path, data)
    except OSError as exc:
        cause = exc.strerror or str(exc)
        name = errno.errorcode.get(exc.errno or 0)
        raise CheckpointError(
            f"cannot write checkpoint {path}: {cause}{f' ({name})' if name else ''}; the "
            "previous checkpoint there (if any) is unchanged; free space or choose another "
            "folder, then run again"
        ) from exc
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
    """Save a :class:`~flownp.model.FlowModel` (and optionally the training state): checked,
    atomic, with checksums (see :func:`write_checkpoint`).

    Parameters
    ----------
    path : file to write (replaced atomically if it exists)
    model : FlowModel
    optimizer : Adam, Adamax or None
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


def _file_bytes(path: Path) -> bytes:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None


def read_checkpoint(
    path: str | os.PathLike, *, allow_unverified: bool = False, comm: Any = None
) -> Checkpoint:
    """Read and verify a checkpoint file.

    Raises :class:`CheckpointError` (never an h5py exception) if it is missing, truncated, not
    a flownp checkpoint, of an unsupported format version, incomplete, or if any checksum
    differs (the message names the damaged dataset or attribute set). Version-1 files (no
    checksums) are refused unless ``allow_unverified`` is True.

    ``comm`` (a :mod:`flownp.distributed` communicator, several processes): process 0 reads
    the file and every process verifies the same bytes, so a file that only process 0 sees
    is enough, and every process gets the same state or the same error.
    """
    path = Path(path)
    if comm is None or comm.size == 1:
        data = _file_bytes(path)
    else:
        from flownp.distributed import on_root

        data = on_root(comm, lambda: _file_bytes(path))
    try:
        return _read(path, data, allow_unverified)
    except CheckpointError:
        raise
    except Exception as exc:  # any failure of the HDF5 library on a damaged file
        raise CheckpointError(
            f"checkpoint {path} is damaged: {type(exc).__name__}: {exc}; use an intact copy"
        ) from None


def _read(path: Path, data: bytes, allow_unverified: bool) -> Checkpoint:
    import h5py

    try:
        f = h5py.File(io.BytesIO(data), "r")
    except Exception as exc:
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
        verified = CHECKSUMS_ATTR in f.attrs or CHECKSUMS in f
        if verified:
            try:
                _verify(f)
            except Exception as exc:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: {exc}; it cannot be used (use an intact copy)"
                ) from None
        if not verified and version >= 2:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its checksum table is missing; use an intact copy"
            )
        if not verified and not allow_unverified:
            raise CheckpointError(
                f"checkpoint {path} has format version {version}, written before checksums "
                "existed, so it cannot be verified; load it explicitly with "
                "flownp.checkpoint.read_checkpoint(path, allow_unverified=True) and write it "
                "again with write_checkpoint to add checksums"
            )
        try:
            attrs = {
                k: (v.decode() if isinstance(v, bytes) else v)
                for k, v in f.attrs.items()
                if k != CHECKSUMS_ATTR
            }
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
                    **{k: _read_group(g[k]) for k in SECOND_MOMENTS if k in g},
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
                ts["history"] = json.loads(g.attrs["history"]) if "history" in g.attrs else []
            metrics: dict[str, dict[str, np.ndarray]] = {}
            if "metrics" in f:
                for table in f["metrics"]:
                    metrics[table] = _read_group(f["metrics"][table])
        except (KeyError, ValueError, OSError, TypeError, json.JSONDecodeError) as exc:
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


def load_model(path: str | os.PathLike, *, use_ema: bool = True, comm: Any = None) -> Any:
    """Read ``path`` and return the trained :class:`~flownp.model.FlowModel` (EMA weights by
    default when the checkpoint has them); ``comm`` as in :func:`read_checkpoint`."""
    return model_from_checkpoint(read_checkpoint(path, comm=comm), use_ema=use_ema)
