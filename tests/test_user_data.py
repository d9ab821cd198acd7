"""The data users already have, end to end through the commands: npz layouts, channel counts
other than 1 and 3, data that moved after training (fingerprint), and where outputs go."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from flownp import cli
from flownp.checkpoint import read_checkpoint

TINY = [
    "--levels", "1", "--depth", "1", "--width", "8", "--batch-size", "8",
    "--init-batch-size", "16", "--eval-every", "0", "--eval-size", "8",
    "--checkpoint-every", "0", "--no-progress", "--steps", "3",
]  # fmt: skip


def _images(rng, n, c=None):
    shape = (n, 8, 8) if c is None else (n, 8, 8, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize(
    "layout", ["keras", "images-labels"], ids=["x_train/y_train", "images/labels"]
)
def test_train_on_common_npz_layouts(tmp_path, layout, capsys):
    rng = np.random.default_rng(0)
    f = tmp_path / "data.npz"
    if layout == "keras":  # grayscale (N, H, W), as keras.datasets.mnist.load_data() returns
        np.savez(f, x_train=_images(rng, 40), y_train=np.arange(40) % 10,
                 x_test=_images(rng, 12), y_test=np.arange(12) % 10)  # fmt: skip
    else:
        np.savez(f, images=_images(rng, 50, 1), labels=np.arange(50) % 10)
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", f"array:{f}", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    held = 12 if layout == "keras" else 5
    assert f"held-out bits/dim ({held} images" in text
    ck = read_checkpoint(out / "checkpoint.h5")
    assert ck.train_config["dataset"] == f"array:{f.resolve()}"
    assert ck.train_config["dataset_fingerprint"]["shape"][1:] == [8, 8, 1]
    assert (out / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("channels", [2, 4])
def test_other_channel_counts_train_and_are_drawn(tmp_path, channels, capsys):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", train=_images(rng, 40, channels))
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", f"array:{tmp_path / 'd.npz'}", "--out", str(out),
                     *TINY]) == 0  # fmt: skip
    png = mpimg.imread(out / "samples.png")
    assert png.shape[1] > 1.5 * channels * png.shape[0] / 2  # C panels side by side
    assert cli.main(["sample", str(out / "checkpoint.h5"), "-n", "4",
                     "--out", str(tmp_path / "s.png")]) == 0  # fmt: skip
    assert (tmp_path / "s.png").stat().st_size > 0


def test_moved_data_resume_and_evaluate(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(2)
    src = tmp_path / "a" / "d.npz"
    src.parent.mkdir()
    np.savez(src, images=_images(rng, 40, 1))
    monkeypatch.chdir(src.parent)  # a relative spec is stored absolute
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "array:d.npz", "--out", str(out), *TINY]) == 0
    ckpt = str(out / "checkpoint.h5")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", ckpt, "--no-progress", "--stability-images", "0"]) == 0
    moved = tmp_path / "b" / "d.npz"
    moved.parent.mkdir()
    shutil.move(src, moved)
    capsys.readouterr()
    assert cli.main(["evaluate", ckpt, "--no-progress", "--stability-images", "0"]) == 2
    assert "d.npz" in capsys.readouterr().err  # names the missing file
    assert cli.main(["evaluate", ckpt, "--dataset", f"array:{moved}", "--no-progress",
                     "--stability-images", "0"]) == 0  # fmt: skip
    assert cli.main(["train", "--resume", ckpt, "--dataset", f"array:{moved}", "--steps", "4",
                     "--no-progress"]) == 0  # fmt: skip
    assert read_checkpoint(ckpt).train_state["step"] == 4
    # other pixels of the same shape: refused with a message that says so
    np.savez(tmp_path / "other.npz", images=_images(rng, 40, 1))
    capsys.readouterr()
    spec = f"array:{tmp_path / 'other.npz'}"
    assert cli.main(["evaluate", ckpt, "--dataset", spec, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not the data this model was trained on" in err and "pixels differ" in err
    assert cli.main(["train", "--resume", ckpt, "--dataset", spec, "--steps", "5"]) == 2
    assert "not the data this model was trained on" in capsys.readouterr().err
    assert cli.main(["evaluate", ckpt, "--dataset", spec, "--other-data", "--no-progress",
                     "--stability-images", "0"]) == 0  # fmt: skip


def test_sample_out_is_a_png_or_a_folder(tmp_path, capsys):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "d.npz", train=_images(rng, 40, 1))
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", f"array:{tmp_path / 'd.npz'}", "--out", str(out),
                     *TINY]) == 0  # fmt: skip
    ckpt = str(out / "checkpoint.h5")
    capsys.readouterr()
    assert cli.main(["sample", ckpt, "-n", "4", "-t", "0.7", "--out", str(tmp_path / "dir")]) == 0
    written = tmp_path / "dir" / "samples_T0.7.png"
    assert written.exists() and not (tmp_path / "dir.png").exists()
    assert str(written) in capsys.readouterr().out
    assert cli.main(["sample", ckpt, "-n", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()
    assert cli.main(["sample", ckpt, "-n", "4", "--out", str(tmp_path / "g.jpg")]) == 2
    assert "give a .png file or a folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["sample", ckpt, "-n", "4", "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
