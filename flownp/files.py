"""Writing output files: nothing replaced by surprise, nothing half-written.

Every command that writes a file goes through these two functions:

- :func:`refuse_existing` before the work starts: an output path that already exists is refused
  unless the user said ``--overwrite``, and a path that is a folder is refused always (one
  line naming the path and the fix);
- :func:`write_atomic` for the bytes: a temporary file ``.<name>.<random>.tmp`` in the same
  folder, fsync'ed, then moved over the destination with :func:`os.replace`. A crash, a full
  disk or a signal leaves the previous file (if any) as it was and no temporary behind; the
  temporaries of a killed writer are removed by the next write to the same path.

Files are built in memory first (an HDF5 file on a ``BytesIO``, a figure rendered to PNG
bytes, an ``.npz`` in a buffer), so a library never writes to the disk itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flownp.errors import UsageError

__all__ = [
    "refuse_existing",
    "refuse_existing_in",
    "write_atomic",
    "remove_stale_temporaries",
    "npz_bytes",
]


def refuse_existing(
    path: str | os.PathLike,
    overwrite: bool,
    *,
    option: str = "",
    suffixes: Iterable[str] = (),
) -> Path:
    """Check an output file before any work: ``path`` as a :class:`~pathlib.Path`.

    Raises :class:`~flownp.errors.UsageError` when ``path`` is a folder, when ``suffixes`` are
    given and ``path`` ends in none of them, or when ``path`` exists and ``overwrite`` is false.
    ``option`` (e.g. ``"--out"``) names where the path came from in the message.
    """
    path = Path(path)
    where = f"{option} {path}" if option else str(path)
    allowed = tuple(s.lower() for s in suffixes)
    if path.is_dir():
        raise UsageError(f"{where}: is a folder; give a file name")
    if allowed and path.suffix.lower() not in allowed:
        raise UsageError(
            f"{where}: give a file name ending in {' or '.join(allowed)} (the file is written "
            f"in that format)"
        )
    if path.exists() and not overwrite:
        raise UsageError(f"{where}: exists; give --overwrite to replace it, or another name")
    return path


def refuse_existing_in(
    folder: str | os.PathLike, names: Iterable[str], overwrite: bool, *, option: str = ""
) -> Path:
    """Check an output folder before any work: a file that is not a folder is refused, and so
    is a folder already holding one of ``names`` (the report of an earlier run) unless
    ``overwrite``. Returns ``folder`` as a :class:`~pathlib.Path`."""
    folder = Path(folder)
    where = f"{option} {folder}" if option else str(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{where}: is a file, not a folder")
    found = [n for n in names if (folder / n).exists()]
    if found and not overwrite:
        raise UsageError(
            f"{where}: holds {', '.join(found)} of an earlier run; give --overwrite to replace "
            "it, or another folder"
        )
    return folder


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every OS/filesystem allows fsync of a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.*.tmp`` files a killed writer of ``path`` left behind; returns
    them. (Only one process may write a given path at a time.)"""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    removed = []
    with contextlib.suppress(OSError):
        for tmp in directory.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` -> temp file in ``path``'s folder (created if missing) -> fsync ->
    :func:`os.replace`. Raises the ``OSError`` of the failing call; the temporary is removed
    and the previous file at ``path`` is untouched."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    return path


def npz_bytes(compressed: bool = True, **arrays: Any) -> bytes:
    """The bytes of an ``.npz`` file of ``arrays`` (for :func:`write_atomic`: ``np.savez``
    given a path would append ``.npz`` to a name without it)."""
    import numpy as np

    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()
