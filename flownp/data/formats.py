"""Readers of the on-disk image formats behind :func:`flownp.data.load_dataset`.

Every reader returns a :class:`Source`: uint8 NHWC images (row, column, channel, as everywhere
in flownp) with optional int64 labels, and the source's own test split when the format has one.
Splitting into train / held-out is done by :func:`flownp.data.load_dataset`, not here.

Every problem with a file (missing, wrong magic, truncated, wrong dtype, inconsistent sizes, a
pickle without ``'data'`` ...) raises :class:`~flownp.errors.DataError` naming the file and the
problem; lower-level exceptions (``KeyError``, ``struct.error``, ``EOFError``, ``zlib.error``,
``OSError`` of Pillow / h5py) are converted and chained, never leaked bare.

Formats (details, with the channel orders, in docs/data.md)
-----------------------------------------------------------
- IDX (MNIST, Fashion-MNIST): big-endian header ``00 00 <type> <ndim>``, ``ndim`` uint32 sizes,
  then the raw array. Images: type 0x08 (uint8), ndim 3 (N, H, W) -> (N, H, W, 1).
  Labels: type 0x08, ndim 1. Gzip-compressed or not (detected by the gzip magic 1f 8b).
- CIFAR-10 python batches: pickled dicts with ``data`` (N, 3072) uint8, each row the 1024 red,
  then 1024 green, then 1024 blue values in row-major order (CHW), and ``labels`` (N,) 0..9.
- Downsampled ImageNet (Chrabaszcz et al. 2017) npz batches: ``data`` (N, 3*S*S) uint8 rows in
  CHW order like CIFAR, ``labels`` 1..1000 (returned as 0..999).
- PNG folder: 8-bit grayscale (C=1) or RGB (C=3) images of one size.
- Array files: ``.npz`` / ``.npy`` / ``.h5`` / ``.hdf5`` uint8 NHWC (or NHW) arrays in the
  layouts of :data:`ARRAY_LAYOUTS` (``train``/``test``, Keras ``x_train``..., ``images``/
  ``labels``, ``x``/``y``), a single array, or one named by the user.
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from flownp.errors import DataError
from flownp.limits import check_allocation

__all__ = [
    "Source",
    "read_idx",
    "read_mnist",
    "read_cifar10",
    "read_imagenet",
    "read_png_folder",
    "read_array",
    "resolve_array_layout",
    "split_array_spec",
    "ARRAY_LAYOUTS",
    "chw_rows_to_nhwc",
]

GZIP_MAGIC = b"\x1f\x8b"
#: MNIST, Fashion-MNIST and the other IDX data sets of ``mnist:`` have the labels 0..9.
MNIST_CLASSES = 10

# IDX type byte -> big-endian numpy dtype (LeCun's IDX description).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Errors a damaged gzip / zip (npz) / tar stream can raise while being read.
_STREAM_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    tarfile.TarError,
    zipfile.BadZipFile,
)


@dataclass(frozen=True)
class Source:
    """What a reader found: images uint8 (N, H, W, C), labels int64 (N,) or None.

    ``test`` / ``test_labels`` are the format's own test split, or None when it has none.
    ``num_classes``: the number of classes when the format says it (CIFAR-10: 10, a PNG folder:
    its class subfolders), else None (derived from the labels by
    :class:`~flownp.data.Dataset`).
    """

    train: np.ndarray
    train_labels: np.ndarray | None
    test: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    num_classes: int | None = None


# ---------------------------------------------------------------------------- helpers
def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{path}: {what} not found (no such file or directory)")


def _check_images(images: Any, where: str, *, allow_nhw: bool = True) -> np.ndarray:
    """uint8 (N, H, W, C) with N, H, W, C >= 1; (N, H, W) becomes (N, H, W, 1)."""
    if not isinstance(images, np.ndarray):
        raise DataError(f"{where}: expected a numpy array of images, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8, got dtype {images.dtype}")
    if images.ndim == 3 and allow_nhw:
        images = images[..., None]  # (N, H, W) -> (N, H, W, 1)
    if images.ndim != 4:
        raise DataError(f"{where}: images must be (N, H, W, C), got shape {images.shape}")
    if min(images.shape) < 1:
        raise DataError(f"{where}: empty image array of shape {images.shape}")
    return images


#: Labels of an array file are class numbers 0 .. MAX_CLASSES - 1 (a class-conditional model
#: holds one row of parameters per class; a label of 10**12 is a corrupt file, not a class).
MAX_CLASSES = 65536


def _check_labels(labels: Any, n: int, where: str, classes: int = MAX_CLASSES) -> np.ndarray:
    """Integer labels (n,) in ``0 .. classes - 1``, as int64."""
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: labels are not an array ({e})") from e
    if arr.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "O" and len(arr) == 0):
        raise DataError(f"{where}: labels must be integers, got dtype {arr.dtype}")
    if len(arr) != n:
        raise DataError(f"{where}: {n} images but {len(arr)} labels")
    out = arr.astype(np.int64)
    bad = (out < 0) | (out >= classes) if len(out) else np.zeros(0, bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{where}: label {int(arr[i])} (image {i}) is outside 0..{classes - 1}; "
            "the file is corrupt or not of this format"
        )
    return out


def _check_declared(arrays: dict[str, tuple[tuple[int, ...], Any]], where: str) -> None:
    """Refuse arrays whose declared shapes and dtypes (``{name: (shape, dtype)}``, from a file
    header, before any of them is read) need more memory than the machine has available."""
    nbytes = sum(
        int(np.prod([int(d) for d in shape], dtype=object)) * np.dtype(dtype).itemsize
        for shape, dtype in arrays.values()
    )
    what = ", ".join(
        f"{name + ' ' if name else ''}{tuple(int(d) for d in shape)} {np.dtype(dtype).name}"
        for name, (shape, dtype) in arrays.items()
    )
    check_allocation(nbytes, f"{where}: the file declares {what}, which")


def _npy_header(fp: BinaryIO) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from the header of an ``.npy`` stream (None: a version this reader does
    not know; ``np.load`` then judges the file)."""
    from numpy.lib import format as npy

    version = npy.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = npy.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = npy.read_array_header_2_0(fp)
    else:  # pragma: no cover - numpy writes versions 1 to 3
        return None
    return tuple(shape), dtype


def _check_npz_sizes(path: Path, names: list[str], where: str) -> None:
    """:func:`_check_declared` for the members ``names`` of an ``.npz`` (zip) file, from their
    ``.npy`` headers: a compressed member is never inflated before its size is known."""
    declared = {}
    with zipfile.ZipFile(path) as z:
        for name in names:
            with z.open(f"{name}.npy") as fp:
                found = _npy_header(fp)
            if found is not None:
                declared[name] = found
    _check_declared(declared, where)


def chw_rows_to_nhwc(rows: np.ndarray, size: int, where: str) -> np.ndarray:
    """(N, 3*S*S) uint8 rows in CHW order (CIFAR, downsampled ImageNet) -> (N, S, S, 3).

    Row layout: the S*S red values (row-major), then green, then blue; pixel ``(i, j)`` of
    channel ``c`` is column ``c*S*S + i*S + j``.
    """
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8:
        dt = getattr(rows, "dtype", type(rows).__name__)
        raise DataError(f"{where}: 'data' must be a uint8 array, got {dt}")
    if rows.ndim != 2 or rows.shape[1] != 3 * size * size:
        raise DataError(
            f"{where}: 'data' must be (N, {3 * size * size}) = (N, 3*{size}*{size}), "
            f"got shape {rows.shape}"
        )
    if rows.shape[0] == 0:
        raise DataError(f"{where}: 'data' holds no images")
    nchw = rows.reshape(-1, 3, size, size)  # (N, C, S, S)
    return np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))  # (N, S, S, C)


def _batch_number(path: Path) -> int:
    m = re.search(r"(\d+)(?:\.npz)?$", path.name)
    return int(m.group(1)) if m else 0


def _concat(parts: list[Source], where: str) -> Source:
    """Concatenate the training parts of several batches (same image shape required)."""
    shapes = {p.train.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise DataError(f"{where}: batches have inconsistent image shapes {sorted(shapes)}")
    has_labels = [p.train_labels is not None for p in parts]
    labels = None
    if all(has_labels):
        labels = np.concatenate([p.train_labels for p in parts])  # type: ignore[misc]
    return Source(np.concatenate([p.train for p in parts]), labels)


# ---------------------------------------------------------------------------- IDX / MNIST
def parse_idx(raw: bytes, where: str) -> np.ndarray:
    """Decode the bytes of one IDX file (already gunzipped) into a native-endian array."""
    return _read_idx_stream(io.BytesIO(raw), where)


def _read_idx_stream(f: BinaryIO, where: str) -> np.ndarray:
    """One IDX array from a stream: the header first, its declared size checked against the
    available memory (:func:`_check_declared`), then exactly that many bytes, then nothing."""
    head = f.read(4)
    if len(head) < 4:
        raise DataError(f"{where}: truncated IDX file ({len(head)} bytes, no header)")
    zero, type_code, ndim = struct.unpack(">HBB", head)
    if zero != 0 or type_code not in IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(
            f"{where}: wrong magic number 0x{head.hex()} (not an IDX file; expected "
            "00 00 <type 08..0e> <ndim 1..4>, e.g. 0x00000803 for images)"
        )
    header = 4 + 4 * ndim
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataError(f"{where}: truncated IDX header ({4 + len(sizes)} < {header} bytes)")
    dims = struct.unpack(f">{ndim}I", sizes)
    dtype = IDX_DTYPES[type_code]
    _check_declared({"": (dims, dtype)}, where)
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    body = f.read(expected - header)
    if len(body) < expected - header:
        raise DataError(
            f"{where}: truncated IDX file: header says {dims} {dtype.name} "
            f"({expected} bytes), file has {header + len(body)} bytes"
        )
    extra = 0
    while chunk := f.read(1 << 20):  # counted, not kept
        extra += len(chunk)
        if extra > 1 << 26:
            break
    if extra:
        raise DataError(
            f"{where}: IDX file has {extra if extra <= 1 << 26 else 'more than 64 MiB of'} "
            f"trailing bytes after the {dims} {dtype.name} array (inconsistent header)"
        )
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # a native-endian, writeable copy


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw, detected by content) into a numpy array. A gzip file
    is decompressed as a stream, so a header declaring more than the memory available is refused
    before anything large is decompressed."""
    path = Path(path)
    _require_exists(path, "file")
    if path.is_dir():
        raise DataError(f"{path}: expected a file, got a directory")
    with open(path, "rb") as raw:
        gz = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        try:
            return _read_idx_stream(gzip.GzipFile(fileobj=raw) if gz else raw, str(path))
        except _STREAM_ERRORS as e:
            raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from e


def _idx_images(path: Path) -> np.ndarray:
    arr = read_idx(path)
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: IDX images must be uint8 (type 0x08), got {arr.dtype}")
    if arr.ndim != 3:
        raise DataError(f"{path}: IDX images must be 3-D (N, H, W), got shape {arr.shape}")
    return _check_images(arr, str(path))  # (N, H, W, 1)


def _idx_labels(path: Path, n: int, images_path: Path) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"{path}: IDX labels must be 1-D integers, got {arr.dtype} {arr.shape}")
    if len(arr) != n:
        raise DataError(f"{path}: {len(arr)} labels but {images_path.name} has {n} images")
    return _check_labels(arr, n, str(path), classes=MNIST_CLASSES)


def read_mnist_pair(images: Path, labels: Path | None) -> Source:
    """One IDX images file and, if given, its IDX labels file."""
    x = _idx_images(images)
    y = None if labels is None else _idx_labels(labels, len(x), images)
    return Source(x, y)


def _find_one(root: Path, prefix: str, kind: str) -> Path | None:
    """The file ``<prefix>-<kind>[-.]idxN-ubyte[.gz]`` in ``root`` (None if absent)."""
    pat = re.compile(rf"^{prefix}-{kind}[-.]idx[13]-ubyte(\.gz)?$")
    hits = sorted(p for p in root.iterdir() if p.is_file() and pat.match(p.name))
    if len(hits) > 1:
        # Both raw and .gz present: they must hold the same thing; take the raw one.
        hits = [p for p in hits if not p.name.endswith(".gz")] or hits
    return hits[0] if hits else None


def _sibling_labels(images: Path) -> Path | None:
    """``train-images-idx3-ubyte[.gz]`` -> ``train-labels-idx1-ubyte[.gz]`` if it exists."""
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    if name == images.name:
        return None
    for cand in (name, name.removesuffix(".gz"), name + ".gz"):
        p = images.with_name(cand)
        if p.is_file():
            return p
    return None


def read_mnist(path: str | Path) -> Source:
    """MNIST-style IDX files: a directory or a single images file.

    A directory must hold ``train-images-idx3-ubyte[.gz]`` and/or ``t10k-images-idx3-ubyte[.gz]``
    (``.`` instead of the second ``-`` is accepted), with optional matching ``*-labels-idx1-*``
    files. With both, the t10k files are the test split; with only one of them it is the training
    pool. A single file is an images file; its labels are taken from the sibling file named with
    ``labels``/``idx1`` if that exists.
    """
    path = Path(path)
    _require_exists(path, "MNIST IDX file or directory")
    if path.is_file():
        return read_mnist_pair(path, _sibling_labels(path))
    train_x = _find_one(path, "train", "images")
    test_x = _find_one(path, "t10k", "images")
    if train_x is None and test_x is None:
        raise DataError(
            f"{path}: no MNIST IDX images file (train-images-idx3-ubyte[.gz] or "
            "t10k-images-idx3-ubyte[.gz]) in this directory"
        )
    parts = [
        read_mnist_pair(x, _find_one(path, pre, "labels"))
        for x, pre in ((train_x, "train"), (test_x, "t10k"))
        if x is not None
    ]
    if len(parts) == 1:
        return parts[0]
    train, test = parts
    if train.train.shape[1:] != test.train.shape[1:]:
        raise DataError(
            f"{path}: train images are {train.train.shape[1:]} but t10k images are "
            f"{test.train.shape[1:]} (inconsistent sizes)"
        )
    return Source(train.train, train.train_labels, test.train, test.train_labels)


# ---------------------------------------------------------------------------- CIFAR-10
# The only globals a CIFAR batch (a dict of a uint8 ndarray and lists) may reference. numpy 1
# pickles name numpy.core.*, numpy 2 ones numpy._core.*; protocol 5 uses _frombuffer.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except what a numpy array needs.

    This blocks the classic ``os.system`` pickle payloads, but pickle is still not a safe format:
    load only files you trust (docs/data.md).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _unpickle_batch(f: BinaryIO, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(f, encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # a damaged pickle can raise almost anything
        msg = f"not a readable CIFAR python batch ({type(e).__name__}: {e})"
        raise DataError(f"{where}: {msg}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: pickle holds a {type(obj).__name__}, not a batch dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_batch(f: BinaryIO, where: str) -> Source:
    """One CIFAR-10 python batch: ``data`` (N, 3072) uint8 CHW rows, ``labels`` (N,)."""
    d = _unpickle_batch(f, where)
    if "data" not in d:
        raise DataError(f"{where}: pickle without 'data' (keys: {sorted(map(str, d))})")
    images = chw_rows_to_nhwc(d["data"], 32, where)  # (N, 32, 32, 3)
    labels = d.get("labels", d.get("fine_labels"))
    classes = 10 if "labels" in d else 100  # CIFAR-10 'labels', CIFAR-100 'fine_labels'
    y = None if labels is None else _check_labels(labels, len(images), where, classes)
    return Source(images, y)


def _cifar_from_batches(batches: dict[str, Callable[[], Source]], where: str) -> Source:
    """``batches``: name (data_batch_K / test_batch) -> reader; train = data_batch_* in order."""
    train_names = sorted(
        (n for n in batches if re.fullmatch(r"data_batch_\d+", n)),
        key=lambda n: int(n.rsplit("_", 1)[1]),
    )
    if not train_names:
        raise DataError(f"{where}: no CIFAR-10 data_batch_* files found")
    stray = [n for n in train_names if not 1 <= int(n.rsplit("_", 1)[1]) <= 5]
    if stray:
        raise DataError(
            f"{where}: {stray[0]} is not a CIFAR-10 file (CIFAR-10 has data_batch_1..5); remove it"
        )
    train = _concat([batches[n]() for n in train_names], where)
    if "test_batch" not in batches:
        return train
    test = batches["test_batch"]()
    return Source(train.train, train.train_labels, test.train, test.train_labels)


def read_cifar10(path: str | Path) -> Source:
    """CIFAR-10 python version: the batches directory, its parent, the tar.gz, or one batch.

    Directory: ``data_batch_1..5`` (train, in numeric order) and ``test_batch`` (test), directly
    or inside ``cifar-10-batches-py/``. Archive: ``cifar-10-python.tar.gz`` (any tar, detected by
    content). A single batch file: the training pool, no test split.
    """
    path = Path(path)
    _require_exists(path, "CIFAR-10 batches directory or archive")
    where = str(path)
    if path.is_dir():
        root = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path

        def reader(p: Path) -> Callable[[], Source]:
            def read() -> Source:
                with open(p, "rb") as f:
                    return cifar_batch(f, str(p))

            return read

        found = {p.name: reader(p) for p in root.iterdir() if p.is_file()}
        return _cifar_from_batches(found, str(root))
    with open(path, "rb") as f:
        head = f.read(265)
    is_tar = head[:2] == GZIP_MAGIC or head[257:262] == b"ustar" or ".tar" in path.name
    if not is_tar:
        with open(path, "rb") as f:
            return cifar_batch(f, where)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

            def member_reader(name: str) -> Callable[[], Source]:
                def read() -> Source:
                    check_allocation(
                        members[name].size,
                        f"{where}:{members[name].name}: a member of {members[name].size} bytes",
                    )
                    f = tar.extractfile(members[name])
                    assert f is not None  # isfile() members always have a file object
                    return cifar_batch(io.BytesIO(f.read()), f"{where}:{members[name].name}")

                return read

            return _cifar_from_batches({n: member_reader(n) for n in members}, where)
    except DataError:
        raise
    except _STREAM_ERRORS as e:
        raise DataError(f"{where}: corrupt or truncated tar archive ({e})") from e


# ---------------------------------------------------------------------------- ImageNet npz
def imagenet_batch(path: Path, size: int) -> Source:
    """One downsampled-ImageNet npz batch: ``data`` (N, 3*S*S) uint8 CHW, ``labels`` 1..1000."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "data" not in z.files:
                raise DataError(f"{where}: npz without 'data' (keys: {sorted(z.files)})")
            _check_npz_sizes(path, [n for n in ("data", "labels") if n in z.files], where)
            rows = z["data"]
            labels = z["labels"] if "labels" in z.files else None
    except DataError:
        raise
    except (*_STREAM_ERRORS, ValueError) as e:
        raise DataError(f"{where}: not a readable npz file ({type(e).__name__}: {e})") from e
    images = chw_rows_to_nhwc(rows, size, where)  # (N, S, S, 3)
    y = None
    if labels is not None:
        y = _check_labels(labels, len(images), where)
        if len(y) and (y.min() < 1 or y.max() > 1000):
            bad = int(y.min()) if y.min() < 1 else int(y.max())
            raise DataError(f"{where}: downsampled-ImageNet labels are 1..1000, found {bad}")
        y = y - 1  # 1..1000 -> 0..999
    return Source(images, y)


def read_imagenet(path: str | Path, size: int) -> Source:
    """Downsampled ImageNet (``size`` 32 or 64): a directory of npz batches or one npz.

    Directory (searched recursively, so the extracted ``Imagenet32_train_npz/`` and
    ``Imagenet32_val_npz/`` may sit side by side): ``train_data_batch_<k>[.npz]`` in numeric
    order is the training pool, ``val_data[.npz]`` the test split. A single npz: the training pool.
    """
    path = Path(path)
    _require_exists(path, f"imagenet{size} npz file or directory")
    if path.is_file():
        return imagenet_batch(path, size)
    train_files = sorted(
        (p for p in path.rglob("train_data_batch_*") if p.is_file()), key=_batch_number
    )
    if not train_files:
        raise DataError(f"{path}: no train_data_batch_* npz files found")
    train = _concat([imagenet_batch(p, size) for p in train_files], str(path))
    val = [p for p in path.rglob("val_data*") if p.is_file()]
    if len(val) > 1:
        raise DataError(f"{path}: several val_data files: {sorted(map(str, val))}")
    if not val:
        return train
    test = imagenet_batch(val[0], size)
    return Source(train.train, train.train_labels, test.train, test.train_labels)


# ---------------------------------------------------------------------------- PNG folder
def read_png(path: Path) -> np.ndarray:
    """One 8-bit PNG as uint8 (H, W, C): grayscale ``L``/``1`` -> C=1, ``RGB``/palette -> C=3.

    An alpha channel is dropped only if fully opaque (else DataError); 16-bit and other modes
    are rejected.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise DataError(f"{path}: not a PNG file (format {im.format})")
            width, height = im.size
            _check_declared({"": ((height, width, len(im.getbands())), np.uint8)}, str(path))
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            arr = np.asarray(im)
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, before decoding
        raise DataError(f"{path}: image too large to decode safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable or truncated PNG ({e})") from e
    if arr.dtype != np.uint8:
        raise DataError(f"{path}: only 8-bit PNGs are supported, got mode {mode} ({arr.dtype})")
    if arr.ndim == 2:
        return arr[..., None]  # (H, W, 1)
    if arr.shape[2] in (2, 4):  # LA / RGBA
        if np.any(arr[..., -1] != 255):
            raise DataError(f"{path}: PNG has a transparent alpha channel (mode {mode})")
        arr = arr[..., :-1]
    if arr.shape[2] not in (1, 3):
        raise DataError(f"{path}: unsupported PNG mode {mode}")
    return arr  # (H, W, C)


def _png_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _stack_pngs(files: list[Path], where: str) -> np.ndarray:
    if not files:
        raise DataError(f"{where}: no .png files in this directory")
    first = read_png(files[0])
    _check_declared({f"{len(files)} images": ((len(files), *first.shape), np.uint8)}, where)
    out = np.empty((len(files), *first.shape), np.uint8)  # (N, H, W, C)
    out[0] = first
    for i, p in enumerate(files[1:], start=1):
        img = read_png(p)
        if img.shape != first.shape:
            raise DataError(
                f"{p}: image is {img.shape} (H, W, C) but {files[0].name} is {first.shape}; "
                "all images of a folder must have the same size and channel count"
            )
        out[i] = img
    return out


def _class_dirs(root: Path) -> list[Path]:
    """The subfolders of ``root`` that are classes (sorted by name; hidden ones skipped)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _png_split(root: Path, classes: list[str] | None = None) -> tuple[np.ndarray, Any, Any]:
    """``(images, labels, class names)`` of one folder: its PNG files (no labels), or, when it
    holds no PNG file, one subfolder of PNGs per class (label = the index of the subfolder's
    name in ``classes``, by default its own sorted subfolders)."""
    files = _png_files(root)
    if files:
        return _stack_pngs(files, str(root)), None, None
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError(f"{root}: no .png files and no class subfolders in this directory")
    names = [d.name for d in dirs] if classes is None else classes
    unknown = [d.name for d in dirs if d.name not in names]
    if unknown:
        raise DataError(
            f"{root}: class subfolder(s) {unknown} are not classes of the training split "
            f"({', '.join(names)})"
        )
    parts, labels = [], []
    for d in dirs:
        imgs = _stack_pngs(_png_files(d), str(d))
        if parts and imgs.shape[1:] != parts[0].shape[1:]:
            raise DataError(
                f"{d}: images are {imgs.shape[1:]} (H, W, C) but {dirs[0].name}'s are "
                f"{parts[0].shape[1:]}; all images must have the same size and channel count"
            )
        parts.append(imgs)
        labels.append(np.full(len(imgs), names.index(d.name), dtype=np.int64))
    return np.concatenate(parts), np.concatenate(labels), names


def read_png_folder(path: str | Path) -> Source:
    """A directory of PNGs (sorted by file name; not recursive), no labels; or, when the
    directory holds no PNG file, one subfolder of PNGs per class: the labels are the indices
    of the subfolders' names in sorted order (``cat/ dog/`` -> 0, 1).

    If the directory has ``train/`` and ``test/`` subdirectories, they are the two splits
    (each one of the two layouts; the classes are the training split's subfolders).
    """
    path = Path(path)
    _require_exists(path, "PNG folder")
    if not path.is_dir():
        raise DataError(f"{path}: folder: expects a directory of PNG images")
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, ytr, names = _png_split(path / "train")
        test, yte, _ = _png_split(path / "test", names)
        if train.shape[1:] != test.shape[1:]:
            raise DataError(
                f"{path}: train images are {train.shape[1:]} but test images are "
                f"{test.shape[1:]} (inconsistent sizes)"
            )
        if (ytr is None) != (yte is None):
            raise DataError(
                f"{path}: one of train/ and test/ has class subfolders, the other not; "
                "use the same layout in both"
            )
        return Source(train, ytr, test, yte, None if names is None else len(names))
    images, labels, names = _png_split(path)
    return Source(images, labels, num_classes=None if names is None else len(names))


# ---------------------------------------------------------------------------- npz / npy / HDF5
# The array layouts :func:`read_array` recognises, tried in this order. Each maps the roles
# train / test / train_labels / test_labels to array names; only ``train`` is required.
ARRAY_LAYOUTS: tuple[tuple[str, dict[str, str]], ...] = (
    (
        "train [+ test, train_labels, test_labels]",
        {"train": "train", "test": "test", "train_labels": "train_labels",
         "test_labels": "test_labels"},
    ),
    (
        "x_train [+ y_train, x_test, y_test] (Keras)",
        {"train": "x_train", "test": "x_test", "train_labels": "y_train", "test_labels": "y_test"},
    ),
    (
        "images [+ labels, images_test, labels_test]",
        {"train": "images", "test": "images_test", "train_labels": "labels",
         "test_labels": "labels_test"},
    ),
    ("x [+ y, x_test, y_test]", {"train": "x", "test": "x_test", "train_labels": "y",
                                 "test_labels": "y_test"}),
)  # fmt: skip


def _key_layout(key: str) -> dict[str, str]:
    """The roles of a user-named image array ``KEY``: its test split is ``KEY_test`` (or the
    ``_train`` -> ``_test`` sibling), its labels ``KEY_labels`` (or, for Keras' ``x...``,
    the matching ``y...``)."""
    stem = key.removesuffix("_train")
    test = f"{stem}_test" if key.endswith("_train") else f"{key}_test"
    roles = {"train": key, "test": test}
    if key.startswith("x"):
        roles["train_labels"] = "y" + key[1:]
        roles["test_labels"] = "y" + test[1:]
    else:
        roles["train_labels"] = f"{key}_labels"
        roles["test_labels"] = f"{test}_labels"
    return roles


def resolve_array_layout(names: list[str], where: str, key: str | None = None) -> dict[str, str]:
    """Which stored arrays play the roles train / test / train_labels / test_labels.

    ``key`` (from ``array:FILE:KEY``) names the image array; otherwise the first layout of
    :data:`ARRAY_LAYOUTS` whose image array is present wins, and a file holding exactly one
    array uses it as the training pool. Returns only the roles that are present.

    Raises
    ------
    DataError
        No layout fits (the message lists the arrays found and the layouts accepted), or ``key``
        is not in the file.
    """
    present = set(names)
    if key is not None:
        if key not in present:
            raise DataError(f"{where}: no array {key!r}; the file holds {sorted(present)}")
        roles = _key_layout(key)
    else:
        roles = next((r for _, r in ARRAY_LAYOUTS if r["train"] in present), None)
        if roles is None and len(present) == 1:
            roles = {"train": names[0]}
        if roles is None:
            accepted = "; ".join(label for label, _ in ARRAY_LAYOUTS)
            raise DataError(
                f"{where}: cannot tell which array holds the images: found {sorted(present)}. "
                f"Accepted layouts: {accepted}; or a single array; or name it: array:FILE:KEY"
            )
    found = {role: name for role, name in roles.items() if name in present}
    if "test" not in found:  # labels of a missing test split are ignored
        found.pop("test_labels", None)
    return found


def _from_arrays(arrays: dict[str, Any], roles: dict[str, str], where: str) -> Source:
    """A :class:`Source` from the arrays of :func:`resolve_array_layout`'s roles."""
    train = _check_images(arrays[roles["train"]], f"{where}['{roles['train']}']")
    test = None
    if "test" in roles:
        test = _check_images(arrays[roles["test"]], f"{where}['{roles['test']}']")
        if test.shape[1:] != train.shape[1:]:
            raise DataError(
                f"{where}: {roles['train']!r} images are {train.shape[1:]} but {roles['test']!r} "
                f"images are {test.shape[1:]} (inconsistent sizes)"
            )
    labels = {}
    for role, images in (("train_labels", train), ("test_labels", test)):
        name = roles.get(role)
        if name is not None and images is not None:
            labels[role] = _check_labels(arrays[name], len(images), f"{where}['{name}']")
    return Source(train, labels.get("train_labels"), test, labels.get("test_labels"))


def split_array_spec(arg: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:KEY`` of an ``array:`` spec -> ``(path, key or None)``.

    A path that exists as given wins, so a file name containing ``:`` still works.
    """
    path = Path(arg).expanduser()
    if path.exists() or ":" not in arg:
        return path, None
    head, _, key = arg.rpartition(":")
    return Path(head).expanduser(), (key.strip() or None)


def read_array(path: str | Path, key: str | None = None) -> Source:
    """Images stored as arrays: ``.npz``, ``.npy``, ``.h5`` / ``.hdf5``.

    npz / HDF5 (datasets at the root of the file): the layouts of :data:`ARRAY_LAYOUTS`
    (``train``/``test``, Keras' ``x_train``/``y_train``/``x_test``/``y_test``,
    ``images``/``labels``, ``x``/``y``), a single array, or the array named by ``key``
    (its test split ``KEY_test``, see :func:`resolve_array_layout`). ``.npy``: one array.
    Images uint8 (N, H, W, C) or (N, H, W) (-> C=1). Object arrays are refused (no pickle).
    """
    path = Path(path)
    _require_exists(path, "array file")
    where = str(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _read_h5(path, key)
    if suffix not in (".npz", ".npy"):
        raise DataError(f"{where}: array: expects a .npz, .npy, .h5 or .hdf5 file")
    try:
        with open(path, "rb") as f:
            if suffix == ".npy":
                found = _npy_header(f)
                if found is not None:
                    _check_declared({"": found}, where)
                f.seek(0)
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                if key is not None:
                    raise DataError(f"{where}: a .npy file holds one array; drop ':{key}'")
                return Source(_check_images(loaded, where), None)
            with loaded as z:
                roles = resolve_array_layout(list(z.files), where, key)
                _check_npz_sizes(path, list(roles.values()), where)
                arrays = {name: z[name] for name in roles.values()}
    except DataError:
        raise
    except (*_STREAM_ERRORS, ValueError) as e:
        raise DataError(f"{where}: not a readable {suffix} file ({type(e).__name__}: {e})") from e
    return _from_arrays(arrays, roles, where)


def _read_h5(path: Path, key: str | None = None) -> Source:
    import h5py

    where = str(path)
    try:
        with h5py.File(path, "r") as f:
            datasets = {k: v for k, v in f.items() if isinstance(v, h5py.Dataset)}
            if not datasets:
                raise DataError(f"{where}: HDF5 file has no datasets at its root")
            roles = resolve_array_layout(list(datasets), where, key)
            for role in ("train", "test"):  # check the dtype before reading a large array
                name = roles.get(role)
                if name is not None and datasets[name].dtype != np.uint8:
                    raise DataError(
                        f"{where}['{name}']: images must be uint8, got dtype {datasets[name].dtype}"
                    )
            _check_declared(
                {name: (datasets[name].shape, datasets[name].dtype) for name in roles.values()},
                where,
            )
            arrays = {name: datasets[name][()] for name in roles.values()}
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{where}: not a readable HDF5 file ({type(e).__name__}: {e})") from e
    return _from_arrays(arrays, roles, where)
