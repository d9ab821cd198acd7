"""Datasets: the bundled MNIST test set and loaders of the image formats the paper uses.

All images are uint8 NHWC ``(N, H, W, C)`` (row, column, channel: ``x.reshape(N, -1)`` is the
paper's vectorisation); labels, when a format has them, are int64 ``(N,)``. The model-side
preprocessing (``x/256 - 1/2`` plus uniform dequantisation) lives in :mod:`flownp.train`.

Spec strings of :func:`load_dataset` (full description in docs/data.md)::

    mnist                    bundled MNIST test set: first 9000 train, last 1000 held out
    mnist:DIR_OR_FILE        IDX files (gz or raw)
    cifar10:PATH             python pickle batches directory or cifar-10-python.tar.gz
    imagenet32:PATH          downsampled ImageNet npz batches (directory or one npz)
    imagenet64:PATH
    folder:DIR               PNG images of one size (grayscale -> C=1, RGB -> C=3)
    array:FILE               .npz / .npy / .h5 / .hdf5 of uint8 images: 'train' [+ 'test'],
                             Keras 'x_train' / 'y_train' / 'x_test' / 'y_test', 'images' /
                             'labels', 'x' / 'y', or a single array
    array:FILE:KEY           the image array KEY (its test split KEY_test, if present)

Held-out split. ``holdout=None``: the format's own test split if it has one (MNIST t10k,
CIFAR-10 test_batch, ImageNet val_data, ``test`` arrays, ``folder/test``), else the last 10% of
the images (``max(1, round(N / 10))``; bundled MNIST: 1000). ``holdout=k``: the last ``k`` images
of the training pool are held out and the format's own test split, if any, is not returned.
The split is deterministic (no shuffling), so it is the same on every machine.

Security: CIFAR-10 batches are pickles. They are read with an unpickler that only admits numpy
array reconstruction, but pickle remains an unsafe format: only load files you trust.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from flownp.data.formats import (
    Source,
    parse_idx,
    read_array,
    read_cifar10,
    read_idx,
    read_imagenet,
    read_mnist,
    read_png_folder,
    split_array_spec,
)
from flownp.errors import DataError

__all__ = [
    "Dataset",
    "load_dataset",
    "load_mnist_bundled",
    "split_holdout",
    "read_idx",
    "read_mnist",
    "read_cifar10",
    "read_imagenet",
    "read_png_folder",
    "read_array",
    "BUNDLED_MNIST_FILES",
    "MNIST_HOLDOUT",
    "SPEC_NAMES",
    "absolute_spec",
    "fingerprint",
    "check_fingerprint",
]

# The bundled files (package data of flownp.data) and the sha256 of the .gz bytes.
BUNDLED_MNIST_FILES: dict[str, str] = {
    "t10k-images-idx3-ubyte.gz": "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
    "t10k-labels-idx1-ubyte.gz": "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
}
MNIST_HOLDOUT = 1000  # spec "mnist": images 0..8999 train, 9000..9999 held out
SPEC_NAMES = ("mnist", "cifar10", "imagenet32", "imagenet64", "folder", "array")


@dataclass(frozen=True)
class Dataset:
    """A train / held-out pair of uint8 image arrays.

    Attributes
    ----------
    name : str
        The spec string it was loaded from.
    train : np.ndarray
        uint8 (N, H, W, C).
    test : np.ndarray
        uint8 (M, H, W, C), the held-out images (same H, W, C).
    train_labels, test_labels : np.ndarray or None
        int64 (N,) and (M,) class labels, or None when the format has none.
    num_classes : int or None
        The number of classes K of labelled data (labels are ``0 .. K-1``): the format's own
        (MNIST 10, ImageNet 1000, a PNG folder's class subfolders) or, by default, the
        largest label + 1. None for unlabelled data.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, split)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(
                    f"Dataset {self.name!r}: {split} must be a uint8 (N, H, W, C) array, got "
                    f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
                )
            y = getattr(self, f"{split}_labels")
            if y is not None and (not isinstance(y, np.ndarray) or y.shape != (len(x),)):
                raise DataError(
                    f"Dataset {self.name!r}: {split}_labels must be ({len(x)},), got "
                    f"{getattr(y, 'shape', type(y).__name__)}"
                )
        if self.train.shape[1:] != self.test.shape[1:]:
            raise DataError(
                f"Dataset {self.name!r}: train images are {self.train.shape[1:]} but test "
                f"images are {self.test.shape[1:]}"
            )
        labels = [y for y in (self.train_labels, self.test_labels) if y is not None and len(y)]
        if not labels:
            object.__setattr__(self, "num_classes", None)
            return
        low = min(int(y.min()) for y in labels)
        high = max(int(y.max()) for y in labels)
        k = self.num_classes
        if k is None:
            k = high + 1
        if low < 0 or high >= k:
            bad = low if low < 0 else high
            raise DataError(f"Dataset {self.name!r}: label {bad} is outside the classes 0..{k - 1}")
        object.__setattr__(self, "num_classes", int(k))

    @property
    def labelled(self) -> bool:
        """True when both splits have labels (what a class-conditional model trains on)."""
        return self.train_labels is not None and self.test_labels is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Image shape (H, W, C)."""
        H, W, C = self.train.shape[1:]
        return (int(H), int(W), int(C))

    def __repr__(self) -> str:
        labels = f"{self.num_classes} classes" if self.labelled else "unlabelled"
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"shape={self.shape}, {labels})"
        )


# ---------------------------------------------------------------------------- bundled MNIST
def _bundled_bytes(filename: str) -> bytes:
    """The bytes of a bundled file, checked against its sha256."""
    try:
        raw = resources.files("flownp.data").joinpath(filename).read_bytes()
    except OSError as e:
        raise DataError(f"bundled {filename}: missing from the flownp package ({e})") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BUNDLED_MNIST_FILES[filename]:
        raise DataError(
            f"bundled {filename}: sha256 {digest} does not match the expected "
            f"{BUNDLED_MNIST_FILES[filename]} (corrupt installation; reinstall flownp)"
        )
    return raw


def load_mnist_bundled() -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test set shipped with flownp (LeCun, Cortes and Burges; CC BY-SA 3.0).

    Returns
    -------
    images : np.ndarray
        uint8 (10000, 28, 28, 1), 0 = background, 255 = ink.
    labels : np.ndarray
        int64 (10000,), digits 0..9 (starting 7 2 1 0 4 1 4 9 5 9).

    Raises
    ------
    DataError
        A bundled file is missing or its sha256 does not match (corrupt installation).
    """
    names = list(BUNDLED_MNIST_FILES)
    images = parse_idx(gzip.decompress(_bundled_bytes(names[0])), f"bundled {names[0]}")
    labels = parse_idx(gzip.decompress(_bundled_bytes(names[1])), f"bundled {names[1]}")
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise DataError(f"bundled MNIST: unexpected shapes {images.shape}, {labels.shape}")
    return images[..., None], labels.astype(np.int64)  # (10000, 28, 28, 1), (10000,)


# ---------------------------------------------------------------------------- splitting
def default_holdout(n: int) -> int:
    """Held-out images when a format has no test split: 10% of ``n`` (at least 1)."""
    return max(1, round(n / 10))


def split_holdout(
    images: np.ndarray, labels: np.ndarray | None, holdout: int, where: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Hold out the LAST ``holdout`` images: ``(train, train_labels, test, test_labels)``.

    ``1 <= holdout <= N - 1``; no shuffling, so the split is reproducible.

    Raises
    ------
    DataError
        Fewer than 2 images, or ``holdout`` outside ``1 .. N - 1`` (a ``ValueError``).
    TypeError
        ``holdout`` is not an int.
    """
    n = len(images)
    if isinstance(holdout, bool) or not isinstance(holdout, int | np.integer):
        raise TypeError(f"{where}: holdout must be an int, got {type(holdout).__name__}")
    if n < 2:
        raise DataError(
            f"{where}: {n} image(s); at least 2 are needed, one to train on and one held out"
        )
    if not 1 <= holdout <= n - 1:
        raise DataError(
            f"{where}: holdout must be between 1 and N-1 = {n - 1} (N = {n} images), got {holdout}"
        )
    cut = n - int(holdout)
    ytr = None if labels is None else labels[:cut]
    yte = None if labels is None else labels[cut:]
    return images[:cut], ytr, images[cut:], yte


# the number of classes of the formats that fix it (others: the PNG folder's subfolders, or
# the largest label + 1)
FORMAT_CLASSES = {"mnist": 10, "imagenet32": 1000, "imagenet64": 1000}


def _to_dataset(name: str, src: Source, holdout: int | None, classes: int | None) -> Dataset:
    classes = classes if classes is not None else src.num_classes
    if src.test is not None and holdout is None:
        return Dataset(name, src.train, src.test, src.train_labels, src.test_labels, classes)
    k = default_holdout(len(src.train)) if holdout is None else holdout
    train, ytr, test, yte = split_holdout(src.train, src.train_labels, k, name)
    return Dataset(name, train, test, ytr, yte, classes)


# ---------------------------------------------------------------------------- the entry point
def load_dataset(spec: str, *, holdout: int | None = None) -> Dataset:
    """Load images from a spec string ``NAME`` or ``NAME:PATH`` (see the module docstring).

    Parameters
    ----------
    spec : str
        ``"mnist"`` (bundled), ``"mnist:DIR_OR_FILE"``, ``"cifar10:PATH"``,
        ``"imagenet32:PATH"``, ``"imagenet64:PATH"``, ``"folder:DIR"`` or ``"array:FILE"``.
        ``~`` in PATH is expanded.
    holdout : int or None
        None: the format's own test split, or the last 10% when it has none ("mnist": 1000).
        An int k: the last k images of the training pool are held out instead (the format's own
        test split is then not used).

    Returns
    -------
    Dataset
        uint8 NHWC train / test arrays, int64 labels or None.

    Raises
    ------
    DataError
        Unknown spec, a missing / corrupt / inconsistent file (the message names the file), a
        file declaring more images than the memory available, a label outside its format's
        classes, or a ``holdout`` outside ``1 .. N - 1``.
    TypeError
        A ``holdout`` that is not an int.
    """
    if not isinstance(spec, str):
        raise TypeError(f"load_dataset: spec must be a str, got {type(spec).__name__}")
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in SPEC_NAMES:
        raise DataError(
            f"load_dataset: unknown dataset {name!r} in spec {spec!r}; use one of "
            f"{', '.join(SPEC_NAMES)} (docs/data.md)"
        )
    if name == "mnist" and not sep:
        images, labels = load_mnist_bundled()
        k = MNIST_HOLDOUT if holdout is None else holdout
        train, ytr, test, yte = split_holdout(images, labels, k, "mnist (bundled)")
        return Dataset(spec, train, test, ytr, yte, FORMAT_CLASSES["mnist"])
    if not arg.strip():
        raise DataError(f"load_dataset: spec {spec!r} needs a path: '{name}:PATH'")
    key = None
    if name == "array":
        path, key = split_array_spec(arg.strip())
    else:
        path = Path(arg.strip()).expanduser()
    if name == "mnist":
        src = read_mnist(path)
    elif name == "cifar10":
        src = read_cifar10(path)
    elif name in ("imagenet32", "imagenet64"):
        src = read_imagenet(path, int(name.removeprefix("imagenet")))
    elif name == "folder":
        src = read_png_folder(path)
    else:
        src = read_array(path, key)
    return _to_dataset(spec, src, holdout, FORMAT_CLASSES.get(name))


def absolute_spec(spec: str) -> str:
    """``spec`` with its path made absolute (``~`` expanded), so that a checkpoint that stores
    it still finds the data when a command runs from another folder. ``"mnist"`` is kept."""
    name, sep, arg = spec.strip().partition(":")
    if not sep or not arg.strip():
        return spec.strip()
    arg = arg.strip()
    if name.strip().lower() == "array":
        path, key = split_array_spec(arg)
        return f"{name}:{path.resolve()}" + (f":{key}" if key else "")
    return f"{name}:{Path(arg).expanduser().resolve()}"


def fingerprint(data: Dataset) -> dict[str, object]:
    """What identifies a dataset's pixels: the shape of all its images (train and held out
    together), their dtype and the SHA-256 of their bytes (train, then held out, C order).
    A different held-out count of a format without its own test split keeps the fingerprint
    (the same images, cut elsewhere). Stored in a checkpoint at training time and compared by
    :func:`check_fingerprint` when the data is loaded again."""
    h = hashlib.sha256()
    for arr in (data.train, data.test):
        h.update(np.ascontiguousarray(arr).data)
    return {
        "shape": [len(data.train) + len(data.test), *data.shape],
        "dtype": str(data.train.dtype),
        "sha256": h.hexdigest(),
    }


def check_fingerprint(data: Dataset, expected: dict[str, object] | None, where: str) -> None:
    """Refuse ``data`` when its :func:`fingerprint` differs from ``expected`` (None: nothing
    was stored, nothing to check).

    Raises
    ------
    DataError
        Naming what differs (shape, dtype or pixels) and the spec that was loaded.
    """
    if not expected:
        return
    got = fingerprint(data)
    diffs = [
        f"{k} {got[k]} (the training data had {expected.get(k)})"
        for k in ("shape", "dtype")
        if got[k] != expected.get(k)
    ]
    if not diffs and got["sha256"] != expected.get("sha256"):
        diffs.append("same shape, but the pixels differ (SHA-256 mismatch)")
    if diffs:
        raise DataError(
            f"{where}: dataset {data.name!r} is not the data this model was trained on: "
            f"{'; '.join(diffs)}. Point --dataset at the original data"
        )
