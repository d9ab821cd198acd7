"""Class labels from the loaders: the number of classes of each format, PNG folders with one
subfolder per class, npz / HDF5 label arrays, and labels outside the classes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from flownp.data import Dataset, load_dataset
from flownp.errors import DataError


def images(rng, n, h=6, w=5, c=1):
    return rng.integers(0, 256, (n, h, w, c)).astype(np.uint8)


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path, format="PNG")


def test_bundled_mnist_has_ten_classes():
    ds = load_dataset("mnist")
    assert ds.num_classes == 10 and ds.labelled
    assert ds.train_labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert "10 classes" in repr(ds)


def test_png_folder_one_subfolder_per_class(tmp_path, rng):
    x = images(rng, 7)
    names = ["cat", "dog", "emu"]
    y = np.array([0, 0, 1, 2, 2, 2, 1])
    counts = dict.fromkeys(names, 0)
    for i in range(7):
        name = names[y[i]]
        save_png(tmp_path / name / f"{counts[name]:02d}.png", x[i])
        counts[name] += 1
    (tmp_path / ".hidden").mkdir()  # not a class
    ds = load_dataset(f"folder:{tmp_path}", holdout=2)
    assert ds.num_classes == 3
    # classes in sorted order, files sorted within a class, the last 2 held out
    order = np.argsort(y, kind="stable")
    np.testing.assert_array_equal(np.concatenate([ds.train, ds.test]), x[order])
    np.testing.assert_array_equal(np.concatenate([ds.train_labels, ds.test_labels]), np.sort(y))


def test_png_folder_train_test_with_class_subfolders(tmp_path, rng):
    x = images(rng, 5)
    save_png(tmp_path / "train" / "a" / "0.png", x[0])
    save_png(tmp_path / "train" / "b" / "0.png", x[1])
    save_png(tmp_path / "train" / "c" / "0.png", x[2])
    save_png(tmp_path / "test" / "c" / "0.png", x[3])  # test uses the training class indices
    save_png(tmp_path / "test" / "a" / "0.png", x[4])
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.num_classes == 3
    assert ds.train_labels.tolist() == [0, 1, 2] and ds.test_labels.tolist() == [0, 2]
    np.testing.assert_array_equal(ds.test, x[[4, 3]])


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unknown-class", r"class subfolder\(s\) \['z'\] are not classes of the training split"),
        ("mixed", "one of train/ and test/ has class subfolders, the other not"),
        ("empty-class", "no .png files"),
        ("sizes", "all images must have the same size"),
    ],
)
def test_png_folder_class_errors(tmp_path, rng, case, match):
    x = images(rng, 3)
    save_png(tmp_path / "train" / "a" / "0.png", x[0])
    save_png(tmp_path / "train" / "b" / "0.png", x[1])
    if case == "unknown-class":
        save_png(tmp_path / "test" / "z" / "0.png", x[2])
    elif case == "mixed":
        save_png(tmp_path / "test" / "0.png", x[2])
    elif case == "empty-class":
        (tmp_path / "train" / "c").mkdir()
        save_png(tmp_path / "test" / "a" / "0.png", x[2])
    elif case == "sizes":
        save_png(tmp_path / "train" / "c" / "0.png", images(rng, 1, 7, 5)[0])
        save_png(tmp_path / "test" / "a" / "0.png", x[2])
    with pytest.raises(DataError, match=match):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize(
    "names", [("x_train", "y_train", "x_test", "y_test"), ("images", "labels", None, None)]
)
def test_array_labels_give_the_classes(tmp_path, rng, suffix, names):
    x, y = images(rng, 20), rng.integers(0, 4, 20)
    y[3] = 4  # 5 classes: the largest label + 1
    arrays = {names[0]: x, names[1]: y}
    if names[2]:
        arrays[names[2]], arrays[names[3]] = x[:4], y[:4]
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f[k] = v
    ds = load_dataset(f"array:{path}")
    assert ds.labelled and ds.num_classes == 5
    held = ds.test_labels if names[2] else y[-2:]
    np.testing.assert_array_equal(ds.test_labels, held)


def test_unlabelled_data_has_no_classes(rng):
    ds = Dataset("d", images(rng, 4), images(rng, 2))
    assert ds.num_classes is None and not ds.labelled
    half = Dataset("d", images(rng, 4), images(rng, 2), np.arange(4), None)
    assert not half.labelled  # the held-out split has no labels


def test_labels_outside_the_classes(rng):
    x = images(rng, 4)
    with pytest.raises(DataError, match=r"label 10 is outside the classes 0\.\.9"):
        Dataset("d", x, x[:2], np.array([0, 1, 10, 2]), np.array([0, 1]), 10)
    with pytest.raises(DataError, match=r"label -1 is outside the classes"):
        Dataset("d", x, x[:2], np.array([0, 1, -1, 2]), np.array([0, 1]))
