"""Data loaders: small files in each exact on-disk format, built here, loaded back; bad files."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import flownp.data as fd
from flownp.data import Dataset, load_dataset, load_mnist_bundled, read_idx
from flownp.errors import DataError


# ---------------------------------------------------------------------------- writers
def idx_bytes(arr: np.ndarray) -> bytes:
    """The IDX encoding (LeCun): 00 00 <type> <ndim>, big-endian uint32 sizes, big-endian data."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[arr.dtype.type]
    head = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def chw_rows(x: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) -> (N, 3*S*S), written pixel by pixel from the documented layout."""
    N, S, _, C = x.shape
    rows = np.zeros((N, C * S * S), np.uint8)
    for n in range(N):
        for c in range(C):
            for i in range(S):
                for j in range(S):
                    rows[n, c * S * S + i * S + j] = x[n, i, j, c]
    return rows


def cifar_dict(x: np.ndarray, y: np.ndarray) -> dict:
    return {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in y],
        b"data": chw_rows(x),
        b"filenames": [b"f%d.png" % i for i in range(len(x))],
    }


def images(rng, n: int, h: int, w: int, c: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


# ---------------------------------------------------------------------------- bundled MNIST
def test_bundled_mnist_facts():
    x, y = load_mnist_bundled()
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (10000,) and y.dtype == np.int64
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(y, minlength=10).tolist() == counts
    assert x.max() == 255 and x.min() == 0
    assert x[0, 0, 0, 0] == 0  # background corner; ink at the centre of the first digit (a 7)
    assert x[0, 10:20, 10:20].mean() > 40


def test_bundled_mnist_fixed_split():
    x, y = load_mnist_bundled()
    ds = load_dataset("mnist")
    assert isinstance(ds, Dataset) and ds.name == "mnist"
    assert ds.shape == (28, 28, 1)
    assert ds.train.shape == (9000, 28, 28, 1) and ds.test.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(ds.train, x[:9000])
    np.testing.assert_array_equal(ds.test, x[9000:])
    np.testing.assert_array_equal(ds.train_labels, y[:9000])
    np.testing.assert_array_equal(ds.test_labels, y[9000:])
    ds2 = load_dataset("mnist", holdout=500)
    assert len(ds2.train) == 9500 and len(ds2.test) == 500
    np.testing.assert_array_equal(ds2.test, x[9500:])


def test_bundled_mnist_corrupt_raises(tmp_path, monkeypatch):
    pkg = Path(fd.__file__).parent
    for name in fd.BUNDLED_MNIST_FILES:
        raw = bytearray((pkg / name).read_bytes())
        if name.startswith("t10k-images"):
            raw[len(raw) // 2] ^= 0xFF
        (tmp_path / name).write_bytes(bytes(raw))

    class FakeResources:
        @staticmethod
        def files(package):
            return tmp_path

    monkeypatch.setattr(fd, "resources", FakeResources)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*sha256"):
        load_mnist_bundled()
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*missing"):
        load_mnist_bundled()


# ---------------------------------------------------------------------------- IDX / MNIST
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_directory(tmp_path, rng, gz):
    sfx = ".gz" if gz else ""
    xtr, xte = images(rng, 7, 5, 4, 1), images(rng, 3, 5, 4, 1)
    ytr, yte = rng.integers(0, 10, 7).astype(np.uint8), rng.integers(0, 10, 3).astype(np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", xtr[..., 0], gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", ytr, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", xte[..., 0], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", yte, gz)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.shape == (5, 4, 1) and ds.train.dtype == np.uint8
    np.testing.assert_array_equal(ds.train, xtr)
    np.testing.assert_array_equal(ds.test, xte)
    np.testing.assert_array_equal(ds.train_labels, ytr)
    np.testing.assert_array_equal(ds.test_labels, yte)
    assert ds.train_labels.dtype == np.int64
    # an explicit holdout takes the last k of the training pool instead of t10k
    ds = load_dataset(f"mnist:{tmp_path}", holdout=2)
    np.testing.assert_array_equal(ds.test, xtr[5:])
    np.testing.assert_array_equal(ds.test_labels, ytr[5:])


def test_mnist_single_file_and_holdout(tmp_path, rng):
    x = images(rng, 20, 3, 3, 1)
    y = rng.integers(0, 10, 20).astype(np.uint8)
    f = write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[..., 0], True)
    ds = load_dataset(f"mnist:{f}")  # no labels file: unlabelled, last 10% held out
    assert ds.train_labels is None and ds.test_labels is None
    np.testing.assert_array_equal(ds.train, x[:18])
    np.testing.assert_array_equal(ds.test, x[18:])
    write_idx(tmp_path / "train-labels-idx1-ubyte", y, False)  # sibling, not gzipped
    ds = load_dataset(f"mnist:{f}", holdout=5)
    np.testing.assert_array_equal(ds.train, x[:15])
    np.testing.assert_array_equal(ds.test_labels, y[15:])
    # a directory with only the train files: same as the single file
    ds = load_dataset(f"mnist:{tmp_path}")
    np.testing.assert_array_equal(ds.test, x[18:])


def test_read_idx_other_dtypes(tmp_path):
    a = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    got = read_idx(write_idx(tmp_path / "a.idx", a, False))
    np.testing.assert_array_equal(got, a)
    assert got.dtype == np.int32 and got.flags.writeable


def _mnist_dir(tmp_path: Path, rng) -> tuple[Path, bytes, bytes]:
    x = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    y = np.arange(4, dtype=np.uint8)
    return tmp_path, idx_bytes(x), idx_bytes(y)


@pytest.mark.parametrize(
    "case, match",
    [
        ("wrong_magic", "wrong magic"),
        ("truncated", "truncated IDX file"),
        ("truncated_header", "truncated IDX header"),
        ("tiny", "truncated IDX file"),
        ("trailing", "trailing bytes"),
        ("truncated_gz", "corrupt or truncated gzip"),
        ("int32_images", "must be uint8"),
        ("label_count", "3 labels but"),
        ("not_3d", "must be 3-D"),
    ],
)
def test_mnist_bad_files(tmp_path, rng, case, match):
    _, xb, yb = _mnist_dir(tmp_path, rng)
    img = tmp_path / "train-images-idx3-ubyte"
    lab = tmp_path / "train-labels-idx1-ubyte"
    lab.write_bytes(yb)
    if case == "wrong_magic":
        img.write_bytes(b"\x00\x00\x08\x09" + xb[4:])  # ndim 9
    elif case == "truncated":
        img.write_bytes(xb[:-5])
    elif case == "truncated_header":
        img.write_bytes(xb[:9])
    elif case == "tiny":
        img.write_bytes(xb[:2])
    elif case == "trailing":
        img.write_bytes(xb + b"\x00")
    elif case == "truncated_gz":
        img = tmp_path / "train-images-idx3-ubyte.gz"
        img.write_bytes(gzip.compress(xb)[:-12])
    elif case == "int32_images":
        img.write_bytes(idx_bytes(np.zeros((4, 3, 3), np.int32)))
    elif case == "label_count":
        img.write_bytes(xb)
        lab.write_bytes(idx_bytes(np.arange(3, dtype=np.uint8)))
    elif case == "not_3d":
        img.write_bytes(idx_bytes(np.zeros((4, 9), np.uint8)))
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(f"mnist:{tmp_path}")
    assert str(tmp_path) in str(ei.value)  # names the file


def test_mnist_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"mnist:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no MNIST IDX images"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_inconsistent_train_test(tmp_path, rng):
    write_idx(tmp_path / "train-images-idx3-ubyte", images(rng, 3, 4, 4, 1)[..., 0], False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images(rng, 3, 5, 4, 1)[..., 0], False)
    with pytest.raises(DataError, match="inconsistent sizes"):
        load_dataset(f"mnist:{tmp_path}")


# ---------------------------------------------------------------------------- CIFAR-10
def _write_cifar_dir(root: Path, rng, protocol: int = 2):
    root.mkdir(parents=True, exist_ok=True)
    xs = []
    for b in (3, 1, 2):  # written out of order: loading must sort numerically
        x = images(rng, 2, 32, 32, 3)
        y = np.array([b, b + 3])
        with open(root / f"data_batch_{b}", "wb") as f:
            pickle.dump(cifar_dict(x, y), f, protocol=protocol)
        xs.append((b, x, y))
    xte, yte = images(rng, 3, 32, 32, 3), np.array([9, 8, 7])
    with open(root / "test_batch", "wb") as f:
        pickle.dump(cifar_dict(xte, yte), f, protocol=protocol)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"]}, f, protocol=protocol)
    xs.sort(key=lambda t: t[0])
    xtr = np.concatenate([t[1] for t in xs])
    ytr = np.concatenate([t[2] for t in xs])
    return xtr, ytr, xte, yte


def test_cifar_channel_layout(tmp_path):
    rows = np.zeros((1, 3072), np.uint8)
    rows[0, 1024 + 5 * 32 + 7] = 200  # green (c=1), row 5, column 7
    rows[0, 2 * 1024 + 31] = 17  # blue, row 0, column 31
    (tmp_path / "b").write_bytes(pickle.dumps({b"data": rows, b"labels": [4]}, protocol=2))
    src = fd.read_cifar10(tmp_path / "b")
    assert src.train.shape == (1, 32, 32, 3)
    assert src.train[0, 5, 7, 1] == 200 and src.train[0, 0, 31, 2] == 17
    assert src.train.sum() == 217


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_directory(tmp_path, rng, protocol):
    xtr, ytr, xte, yte = _write_cifar_dir(tmp_path / "cifar-10-batches-py", rng, protocol)
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{tmp_path / 'cifar-10-batches-py'}"):
        ds = load_dataset(spec)
        assert ds.shape == (32, 32, 3)
        np.testing.assert_array_equal(ds.train, xtr)
        np.testing.assert_array_equal(ds.train_labels, ytr)
        np.testing.assert_array_equal(ds.test, xte)
        np.testing.assert_array_equal(ds.test_labels, yte)


def test_cifar_tar_gz(tmp_path, rng):
    xtr, ytr, xte, yte = _write_cifar_dir(tmp_path / "src" / "cifar-10-batches-py", rng)
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset(f"cifar10:{tgz}")
    np.testing.assert_array_equal(ds.train, xtr)
    np.testing.assert_array_equal(ds.train_labels, ytr)
    np.testing.assert_array_equal(ds.test, xte)
    np.testing.assert_array_equal(ds.test_labels, yte)
    # truncated archive
    bad = tmp_path / "trunc.tar.gz"
    bad.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    with pytest.raises(DataError, match="trunc.tar.gz: corrupt or truncated tar"):
        load_dataset(f"cifar10:{bad}")


def test_cifar_no_test_batch_holds_out(tmp_path, rng):
    xtr, ytr, _, _ = _write_cifar_dir(tmp_path, rng)
    (tmp_path / "test_batch").unlink()
    ds = load_dataset(f"cifar10:{tmp_path}")  # 6 images -> last round(0.6) = 1 held out
    np.testing.assert_array_equal(ds.train, xtr[:5])
    np.testing.assert_array_equal(ds.test, xtr[5:])
    np.testing.assert_array_equal(ds.test_labels, ytr[5:])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload, match",
    [
        ({b"labels": [1]}, "pickle without 'data'"),
        ({b"data": np.zeros((1, 3000), np.uint8)}, r"must be \(N, 3072\)"),
        ({b"data": np.zeros((1, 3072), np.float32)}, "must be a uint8 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 images but 1 labels"),
        ([1, 2, 3], "not a batch dict"),
        ({b"data": _Evil()}, "not allowed"),
    ],
)
def test_cifar_bad_batches(tmp_path, payload, match):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(f"cifar10:{tmp_path}")
    assert "data_batch_1" in str(ei.value)


def test_cifar_truncated_and_missing(tmp_path, rng):
    raw = pickle.dumps(cifar_dict(images(rng, 2, 32, 32, 3), np.array([0, 1])), protocol=2)
    (tmp_path / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_1.*not a readable CIFAR"):
        load_dataset(f"cifar10:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 data_batch"):
        load_dataset(f"cifar10:{empty}")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"cifar10:{tmp_path / 'missing.tar.gz'}")


# ---------------------------------------------------------------------------- ImageNet npz
def _imagenet_npz(path: Path, x: np.ndarray, labels1: np.ndarray, **extra) -> Path:
    np.savez(path, data=chw_rows(x), labels=labels1, **extra)
    return path


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_directory(tmp_path, rng, size):
    train_dir, val_dir = tmp_path / f"Imagenet{size}_train_npz", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    parts = []
    for b in (10, 2, 1):  # numeric order 1, 2, 10
        x = images(rng, 2, size, size, 3)
        y = rng.integers(1, 1001, 2)
        _imagenet_npz(train_dir / f"train_data_batch_{b}.npz", x, y, mean=np.zeros(3))
        parts.append((b, x, y))
    parts.sort(key=lambda t: t[0])
    xv, yv = images(rng, 3, size, size, 3), np.array([1, 1000, 5])
    _imagenet_npz(val_dir / "val_data.npz", xv, yv)
    ds = load_dataset(f"imagenet{size}:{tmp_path}")
    assert ds.shape == (size, size, 3)
    np.testing.assert_array_equal(ds.train, np.concatenate([t[1] for t in parts]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate([t[2] for t in parts]) - 1)
    np.testing.assert_array_equal(ds.test, xv)
    np.testing.assert_array_equal(ds.test_labels, [0, 999, 4])


def test_imagenet_single_npz_and_layout(tmp_path, rng):
    x = images(rng, 10, 32, 32, 3)
    f = _imagenet_npz(tmp_path / "val_data.npz", x, np.arange(1, 11))
    ds = load_dataset(f"imagenet32:{f}")
    np.testing.assert_array_equal(ds.train, x[:9])
    np.testing.assert_array_equal(ds.test, x[9:])
    np.testing.assert_array_equal(ds.test_labels, [9])
    rows = np.zeros((1, 3 * 32 * 32), np.uint8)
    rows[0, 2 * 1024 + 3 * 32 + 1] = 99  # blue, row 3, column 1
    np.savez(tmp_path / "one.npz", data=rows, labels=np.array([1]))
    src = fd.read_imagenet(tmp_path / "one.npz", 32)
    assert src.train[0, 3, 1, 2] == 99 and src.train.sum() == 99


@pytest.mark.parametrize(
    "case, match",
    [
        ("wrong_size", r"must be \(N, 12288\)"),
        ("no_data", "npz without 'data'"),
        ("zero_label", "labels are 1..1000"),
        ("float", "must be a uint8 array"),
        ("truncated", "not a readable npz"),
        ("label_count", "2 images but 3 labels"),
    ],
)
def test_imagenet_bad_files(tmp_path, case, match):
    f = tmp_path / "train_data_batch_1.npz"
    ok = np.zeros((2, 3 * 64 * 64), np.uint8)
    if case == "wrong_size":
        np.savez(f, data=np.zeros((2, 3072), np.uint8), labels=np.array([1, 2]))
    elif case == "no_data":
        np.savez(f, labels=np.array([1, 2]))
    elif case == "zero_label":
        np.savez(f, data=ok, labels=np.array([0, 2]))
    elif case == "float":
        np.savez(f, data=ok.astype(np.float32), labels=np.array([1, 2]))
    elif case == "truncated":
        np.savez(f, data=ok, labels=np.array([1, 2]))
        f.write_bytes(f.read_bytes()[:200])
    elif case == "label_count":
        np.savez(f, data=ok, labels=np.array([1, 2, 3]))
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(f"imagenet64:{tmp_path}")
    assert "train_data_batch_1.npz" in str(ei.value)


def test_imagenet_missing_batches(tmp_path):
    with pytest.raises(DataError, match="no train_data_batch"):
        load_dataset(f"imagenet32:{tmp_path}")


# ---------------------------------------------------------------------------- PNG folder
def _save_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(arr, mode=mode).save(path, format="PNG")


def test_png_folder_gray_and_rgb(tmp_path, rng):
    gray, rgb = tmp_path / "gray", tmp_path / "rgb"
    gray.mkdir()
    rgb.mkdir()
    xg, xc = images(rng, 10, 6, 5, 1), images(rng, 10, 4, 7, 3)
    for i in range(10):
        _save_png(gray / f"img_{i:02d}.png", xg[i, ..., 0])
        _save_png(rgb / f"img_{i:02d}.PNG", xc[i])
    (gray / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{gray}")
    assert ds.shape == (6, 5, 1) and ds.train_labels is None
    np.testing.assert_array_equal(ds.train, xg[:9])
    np.testing.assert_array_equal(ds.test, xg[9:])
    ds = load_dataset(f"folder:{rgb}", holdout=3)
    assert ds.shape == (4, 7, 3)
    np.testing.assert_array_equal(ds.train, xc[:7])
    np.testing.assert_array_equal(ds.test, xc[7:])


def test_png_folder_train_test_and_alpha(tmp_path, rng):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    x = images(rng, 3, 4, 4, 3)
    opaque = np.concatenate([x, np.full((3, 4, 4, 1), 255, np.uint8)], axis=-1)
    for i in range(2):
        _save_png(tmp_path / "train" / f"{i}.png", opaque[i])  # RGBA, fully opaque
    _save_png(tmp_path / "test" / "0.png", x[2])
    ds = load_dataset(f"folder:{tmp_path}")
    np.testing.assert_array_equal(ds.train, x[:2])
    np.testing.assert_array_equal(ds.test, x[2:])


@pytest.mark.parametrize(
    "case, match",
    [
        ("sizes", "same size"),
        ("channels", "same size and channel count"),
        ("corrupt", "unreadable or truncated PNG"),
        ("truncated", "unreadable or truncated PNG"),
        ("sixteen_bit", "only 8-bit"),
        ("transparent", "transparent alpha"),
        ("jpeg", "not a PNG"),
        ("empty", "no .png files"),
    ],
)
def test_png_folder_bad(tmp_path, rng, case, match):
    _save_png(tmp_path / "a.png", images(rng, 1, 8, 8, 1)[0, ..., 0])
    bad = tmp_path / "b.png"
    if case == "sizes":
        _save_png(bad, images(rng, 1, 8, 9, 1)[0, ..., 0])
    elif case == "channels":
        _save_png(bad, images(rng, 1, 8, 8, 3)[0])
    elif case == "corrupt":
        bad.write_bytes(b"not a png at all")
    elif case == "truncated":
        _save_png(bad, images(rng, 1, 8, 8, 3)[0])
        bad.write_bytes(bad.read_bytes()[:60])
    elif case == "sixteen_bit":
        Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(bad, format="PNG")
    elif case == "transparent":
        _save_png(bad, np.zeros((8, 8, 4), np.uint8))
    elif case == "jpeg":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad, format="JPEG")
    elif case == "empty":
        (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(f"folder:{tmp_path}")
    assert str(tmp_path) in str(ei.value)


# ---------------------------------------------------------------------------- npz / npy / h5
def test_array_npz_and_h5(tmp_path, rng):
    xtr, xte = images(rng, 5, 3, 4, 2), images(rng, 2, 3, 4, 2)
    ytr, yte = np.arange(5), np.array([7, 8])
    np.savez(tmp_path / "a.npz", train=xtr, test=xte, train_labels=ytr, test_labels=yte)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["train"], f["test"], f["train_labels"], f["test_labels"] = xtr, xte, ytr, yte
    for name in ("a.npz", "a.h5"):
        ds = load_dataset(f"array:{tmp_path / name}")
        assert ds.shape == (3, 4, 2)
        np.testing.assert_array_equal(ds.train, xtr)
        np.testing.assert_array_equal(ds.test, xte)
        np.testing.assert_array_equal(ds.train_labels, ytr)
        np.testing.assert_array_equal(ds.test_labels, yte)


def test_array_single(tmp_path, rng):
    x = images(rng, 10, 3, 3, 3)
    np.savez(tmp_path / "one.npz", x)
    np.save(tmp_path / "one.npy", x[..., 0])  # NHW -> C = 1
    with h5py.File(tmp_path / "one.hdf5", "w") as f:
        f["images"] = x
    for name, want in (("one.npz", x), ("one.npy", x[..., :1]), ("one.hdf5", x)):
        ds = load_dataset(f"array:{tmp_path / name}")
        np.testing.assert_array_equal(ds.train, want[:9])
        np.testing.assert_array_equal(ds.test, want[9:])
        assert ds.train_labels is None


@pytest.mark.parametrize("ext", ["npz", "h5"])
@pytest.mark.parametrize(
    "case, match",
    [
        ("float", "must be uint8"),
        ("shapes", "inconsistent sizes"),
        ("two_no_train", r"cannot tell which array holds the images: found \['a', 'b'\]"),
        ("ndim", r"must be \(N, H, W, C\)"),
        ("truncated", "not a readable"),
    ],
)
def test_array_bad(tmp_path, rng, ext, case, match):
    f = tmp_path / f"d.{ext}"
    arrays = {
        "float": {"train": np.zeros((2, 3, 3, 1), np.float32)},
        "shapes": {"train": images(rng, 2, 3, 3, 1), "test": images(rng, 2, 3, 4, 1)},
        "two_no_train": {"a": images(rng, 2, 3, 3, 1), "b": images(rng, 2, 3, 3, 1)},
        "ndim": {"train": np.zeros((2, 3), np.uint8)},
        "truncated": {"train": images(rng, 20, 8, 8, 1)},
    }[case]
    if ext == "npz":
        np.savez(f, **arrays)
    else:
        with h5py.File(f, "w") as h:
            for k, v in arrays.items():
                h[k] = v
    if case == "truncated":
        f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(f"array:{f}")
    assert str(f) in str(ei.value)


def test_array_object_and_extension(tmp_path):
    np.savez(tmp_path / "obj.npz", train=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        load_dataset(f"array:{tmp_path / 'obj.npz'}")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="x.csv.*expects a .npz"):
        load_dataset(f"array:{tmp_path / 'x.csv'}")


@pytest.mark.parametrize("ext", ["npz", "h5"])
@pytest.mark.parametrize(
    "layout",
    [
        {"train": "x_train", "test": "x_test", "train_labels": "y_train", "test_labels": "y_test"},
        {"train": "images", "train_labels": "labels"},
        {"train": "x", "train_labels": "y"},
        {"train": "train", "test": "test"},
    ],
    ids=["keras", "images-labels", "x-y", "train-test"],
)
@pytest.mark.parametrize("channels", [None, 1, 3, 2])
def test_array_common_layouts(tmp_path, rng, ext, layout, channels):
    shape = (6, 5) if channels is None else (6, 5, channels)  # (N, H, W) is grayscale
    pool = rng.integers(0, 256, (30, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, 30)
    arrays = {layout["train"]: pool[:24]}
    if "test" in layout:
        arrays[layout["test"]] = pool[24:]
    if "train_labels" in layout:
        arrays[layout["train_labels"]] = labels[:24]
    if "test_labels" in layout:
        arrays[layout["test_labels"]] = labels[24:]
    f = tmp_path / f"d.{ext}"
    if ext == "npz":
        np.savez(f, **arrays)
    else:
        with h5py.File(f, "w") as h:
            for k, v in arrays.items():
                h[k] = v
    ds = load_dataset(f"array:{f}")
    nhwc = pool if channels is not None else pool[..., None]
    assert ds.shape == (6, 5, channels or 1)
    # the file's own test split, else the last 10% of the 24 training images are held out
    cut, end = (24, 30) if "test" in layout else (22, 24)
    np.testing.assert_array_equal(ds.train, nhwc[:cut])
    np.testing.assert_array_equal(ds.test, nhwc[cut:end])
    if "train_labels" in layout:
        np.testing.assert_array_equal(ds.train_labels, labels[:cut])
    else:
        assert ds.train_labels is None


def test_array_named_key_with_its_test_split(tmp_path, rng):
    a, b = images(rng, 12, 4, 4, 1), images(rng, 3, 4, 4, 1)
    other = images(rng, 7, 4, 4, 1)
    np.savez(tmp_path / "d.npz", digits=a, digits_test=b, digits_labels=np.arange(12), other=other)
    ds = load_dataset(f"array:{tmp_path / 'd.npz'}:digits")
    np.testing.assert_array_equal(ds.train, a)
    np.testing.assert_array_equal(ds.test, b)
    np.testing.assert_array_equal(ds.train_labels, np.arange(12))
    assert ds.test_labels is None
    ds = load_dataset(f"array:{tmp_path / 'd.npz'}:other", holdout=2)
    np.testing.assert_array_equal(ds.test, other[5:])
    # Keras names: x_train -> x_test and y_train / y_test
    np.savez(tmp_path / "k.npz", x_train=a, x_test=b, y_train=np.arange(12), y_test=np.arange(3))
    ds = load_dataset(f"array:{tmp_path / 'k.npz'}:x_train")
    np.testing.assert_array_equal(ds.test, b)
    np.testing.assert_array_equal(ds.test_labels, np.arange(3))
    with pytest.raises(DataError, match=r"no array 'nope'; the file holds \['digits'"):
        load_dataset(f"array:{tmp_path / 'd.npz'}:nope")
    with pytest.raises(DataError, match="one array; drop ':x'"):
        np.save(tmp_path / "one.npy", a)
        load_dataset(f"array:{tmp_path / 'one.npy'}:x")


def test_array_unknown_layout_lists_keys_and_layouts(tmp_path, rng):
    np.savez(tmp_path / "d.npz", pics=images(rng, 4, 2, 2, 1), targets=np.arange(4))
    with pytest.raises(DataError) as ei:
        load_dataset(f"array:{tmp_path / 'd.npz'}")
    msg = str(ei.value)
    for needle in ("['pics', 'targets']", "x_train", "images [+ labels", "array:FILE:KEY"):
        assert needle in msg


def test_absolute_spec_and_fingerprint(tmp_path, rng, monkeypatch):
    from flownp.data import absolute_spec, check_fingerprint, fingerprint

    x = images(rng, 20, 4, 4, 1)
    np.savez(tmp_path / "d.npz", x)
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("array:d.npz") == f"array:{tmp_path / 'd.npz'}"
    assert absolute_spec("array:d.npz:arr_0") == f"array:{tmp_path / 'd.npz'}:arr_0"
    assert absolute_spec("mnist") == "mnist"
    ds = load_dataset("array:d.npz")
    fp = fingerprint(ds)
    assert fp["shape"] == [20, 4, 4, 1] and fp["dtype"] == "uint8"
    check_fingerprint(load_dataset("array:d.npz", holdout=5), fp, "here")  # same pixels
    y = x.copy()
    y[3, 1, 1, 0] ^= 1  # one bit of one pixel
    np.savez(tmp_path / "e.npz", y)
    with pytest.raises(DataError, match="pixels differ"):
        check_fingerprint(load_dataset("array:e.npz"), fp, "here")
    np.savez(tmp_path / "f.npz", x[:19])
    with pytest.raises(DataError, match=r"shape \[19, 4, 4, 1\] \(the training data had"):
        check_fingerprint(load_dataset("array:f.npz"), fp, "here")
    check_fingerprint(load_dataset("array:f.npz"), None, "here")  # nothing stored


# ---------------------------------------------------------------------------- specs, splits
def test_spec_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn:/x")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"array:{tmp_path / 'nothing.npz'}")


@pytest.mark.parametrize("bad", [0, 10000, -1])
def test_bad_holdout(bad):
    with pytest.raises(ValueError, match="holdout"):
        load_dataset("mnist", holdout=bad)
    with pytest.raises(TypeError, match="holdout"):
        load_dataset("mnist", holdout=1.5)  # type: ignore[arg-type]


def test_dataset_validates():
    x = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(DataError, match="train images are"):
        Dataset("t", x, np.zeros((1, 2, 3, 1), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        Dataset("t", x.astype(np.float32), x)
    with pytest.raises(DataError, match="train_labels"):
        Dataset("t", x, x, np.zeros(2, np.int64), None)
    ds = Dataset("t", x, x[:1])
    assert ds.shape == (2, 2, 1) and "train=3" in repr(ds)
    with pytest.raises(AttributeError):
        ds.name = "u"  # type: ignore[misc]


def test_chw_reader_accepts_bytesio_batch(rng):
    x = images(rng, 2, 32, 32, 3)
    src = fd.formats.cifar_batch(io.BytesIO(pickle.dumps(cifar_dict(x, np.array([1, 2])))), "m")
    np.testing.assert_array_equal(src.train, x)


# ------------------------------------------------- sizes checked before allocating, labels
HUGE = 10**10  # images of 28x28: 7.8 TB, more than any machine that runs the suite


def npy_header(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    """The header of an ``.npy`` file declaring ``shape`` (the data is left out)."""
    from numpy.lib import format as npy

    buf = io.BytesIO()
    descr = npy.dtype_to_descr(np.dtype(dtype))
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR declares ``width x height`` grayscale pixels, with one empty IDAT."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _declaring_file(tmp_path: Path, case: str) -> str:
    """A small file whose header declares far more than the memory; returns its spec."""
    if case == "h5_images":
        f = tmp_path / "d.h5"
        with h5py.File(f, "w") as h:
            h.create_dataset("train", shape=(HUGE, 28, 28, 1), dtype=np.uint8, chunks=True)
        return f"array:{f}"
    if case == "h5_labels":
        f = tmp_path / "d.h5"
        with h5py.File(f, "w") as h:
            h["train"] = np.zeros((4, 3, 3, 1), np.uint8)
            h.create_dataset("train_labels", shape=(10**12,), dtype=np.int64, chunks=True)
        return f"array:{f}"
    if case == "npy":
        f = tmp_path / "d.npy"
        f.write_bytes(npy_header((HUGE, 28, 28)) + b"\x00" * 64)
        return f"array:{f}"
    if case == "npz":
        f = tmp_path / "d.npz"
        import zipfile

        with zipfile.ZipFile(f, "w") as z:
            z.writestr("train.npy", npy_header((HUGE, 28, 28)) + b"\x00" * 64)
        return f"array:{f}"
    if case == "imagenet_npz":
        f = tmp_path / "train_data_batch_1.npz"
        import zipfile

        with zipfile.ZipFile(f, "w") as z:
            z.writestr("data.npy", npy_header((HUGE, 3 * 32 * 32)) + b"\x00" * 64)
        return f"imagenet32:{f}"
    if case == "idx_gz":
        f = tmp_path / "train-images-idx3-ubyte.gz"
        f.write_bytes(gzip.compress(struct.pack(">HBB3I", 0, 8, 3, 2**32 - 1, 28, 28)))
        return f"mnist:{f}"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["h5_images", "h5_labels", "npy", "npz", "imagenet_npz", "idx_gz"])
def test_declared_sizes_are_checked_before_allocating(tmp_path, case):
    spec = _declaring_file(tmp_path, case)
    with pytest.raises(DataError, match="declares .* more than the .* available") as ei:
        load_dataset(spec)
    assert str(tmp_path) in str(ei.value)


def test_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    """An IDX .gz whose header declares 2x2 images followed by 100 MB of zeros (100 KB on
    disk): refused as trailing bytes, decompressed in 1 MiB pieces (not the 100 MB)."""
    import tracemalloc

    f = tmp_path / "train-images-idx3-ubyte.gz"
    head = struct.pack(">HBB3I", 0, 8, 3, 1, 2, 2) + b"\x00" * 4
    f.write_bytes(gzip.compress(head + b"\x00" * 100_000_000, compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="more than 64 MiB of trailing bytes"):
            load_dataset(f"mnist:{f}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000, peak


def test_png_decompression_bomb_is_a_data_error(tmp_path):
    png_header_only(tmp_path / "a.png", 20000, 20000)
    with pytest.raises(DataError, match=r"a\.png: image too large to decode safely"):
        load_dataset(f"folder:{tmp_path}")


def test_png_folder_larger_than_memory_is_refused_before_stacking(tmp_path, rng, monkeypatch):
    import flownp.limits

    for i in range(3):
        _save_png(tmp_path / f"{i}.png", images(rng, 1, 8, 8, 1)[0, ..., 0])
    monkeypatch.setattr(flownp.limits, "available_memory", lambda: 150)  # 3 x 64 bytes > 150
    with pytest.raises(DataError, match=r"declares 3 images \(3, 8, 8, 1\) uint8.*192 B"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize("label", [10, 200])
def test_mnist_label_outside_0_to_9_is_refused(tmp_path, rng, label):
    x = images(rng, 3, 4, 4, 1)[..., 0]
    write_idx(tmp_path / "train-images-idx3-ubyte", x, False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, label, 2], np.uint8), False)
    with pytest.raises(DataError, match=f"label {label} \\(image 1\\) is outside 0..9"):
        load_dataset(f"mnist:{tmp_path}")


@pytest.mark.parametrize("labels", [[0, -1, 2], [0, 10**12, 2]])
def test_array_labels_must_be_class_numbers(tmp_path, rng, labels):
    f = tmp_path / "d.npz"
    np.savez(f, train=images(rng, 3, 4, 4, 1), train_labels=np.array(labels, np.int64))
    with pytest.raises(DataError, match=f"label {labels[1]} .*outside 0..65535"):
        load_dataset(f"array:{f}")


def test_imagenet_label_above_1000_is_refused(tmp_path):
    f = tmp_path / "train_data_batch_1.npz"
    np.savez(f, data=np.zeros((2, 3 * 32 * 32), np.uint8), labels=np.array([1, 1001]))
    with pytest.raises(DataError, match="labels are 1..1000, found 1001"):
        load_dataset(f"imagenet32:{f}")


@pytest.mark.parametrize("n, holdout", [(1, None), (1, 1), (5, 5), (5, 9)])
def test_a_split_that_cannot_be_made_is_a_data_error(tmp_path, rng, n, holdout):
    np.save(tmp_path / "x.npy", images(rng, n, 4, 4, 1))
    with pytest.raises(DataError, match="at least 2 are needed|holdout must be between"):
        load_dataset(f"array:{tmp_path / 'x.npy'}", holdout=holdout)


@pytest.mark.parametrize(
    "case", ["h5_images", "h5_labels", "idx_gz", "png_bomb", "one_image", "holdout"]
)
def test_bad_data_is_one_line_and_exit_code_2_on_the_command_line(tmp_path, capsys, case):
    from flownp import cli

    extra = []
    if case == "png_bomb":
        (tmp_path / "png").mkdir()
        png_header_only(tmp_path / "png" / "a.png", 20000, 20000)
        spec = f"folder:{tmp_path / 'png'}"
    elif case == "one_image":
        np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 1), np.uint8))
        spec = f"array:{tmp_path / 'x.npy'}"
    elif case == "holdout":
        spec, extra = "mnist", ["--holdout", "10000"]
    else:
        spec = _declaring_file(tmp_path, case)
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", spec, *extra, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("flownp train: error: "), err
    assert not out.exists()
