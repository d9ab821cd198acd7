"""Class-conditional and n-bit models on the command line and in the tools around them:
``flownp sample --label``, the requested-digit share, the latent tools on such models, and
one-line errors (exit 2) for bad labels."""

from __future__ import annotations

import re

import numpy as np
import pytest

from flownp import cli, latent
from flownp import digits as G
from flownp.checkpoint import save_checkpoint
from flownp.data import load_dataset, pixels
from flownp.model import FlowConfig, FlowModel
from flownp.testing import randomize_params, rectangles_dataset

K = 3


def tiny_model(rng, **kw) -> FlowModel:
    cfg = FlowConfig(
        image_shape=(8, 8, 1),
        levels=2,
        depth=1,
        width=4,
        dtype="float64",
        **{"num_classes": K, **kw},
    )
    model = FlowModel(cfg, seed=1)
    model.initialize(rng.uniform(-0.5, 0.5, (16, 8, 8, 1)))
    randomize_params(model, rng, 0.02)
    return model


@pytest.fixture
def ckpt(tmp_path, rng):
    path = tmp_path / "cond.h5"
    save_checkpoint(path, tiny_model(rng))
    return path


@pytest.fixture
def plain_ckpt(tmp_path, rng):
    path = tmp_path / "plain.h5"
    save_checkpoint(path, tiny_model(rng, num_classes=0))
    return path


# ---------------------------------------------------------------------- flownp sample
def test_sample_one_label(ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    npz = tmp_path / "s.npz"
    code = cli.main(
        ["sample", str(ckpt), "--label", "2", "-n", "5", "--out", str(out), "--npz", str(npz)]
    )
    assert code == 0
    assert (out / "samples_T0.8_label2.png").exists()
    assert "5 samples of class 2" in capsys.readouterr().out
    saved = np.load(npz)
    assert saved["images"].shape == (5, 8, 8, 1) and saved["labels"].tolist() == [2] * 5


def test_sample_one_row_per_class_is_the_default(ckpt, tmp_path, capsys):
    out = tmp_path / "grid.npz"
    args = ["sample", str(ckpt), "-n", "4", "--out", str(tmp_path), "--npz", str(out)]
    assert cli.main(args) == 0
    assert (tmp_path / "samples_T0.8.png").exists()  # the default name: no --label given
    assert "12 samples, one row per class" in capsys.readouterr().out
    assert np.load(out)["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cli.main(["sample", str(ckpt), "--label", "all", "-n", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples_T0.8_classes.png").exists()
    # the same draw as the library call with those labels
    from flownp.checkpoint import load_model

    model = load_model(ckpt)
    x = model.sample(12, 0.8, seed=0, labels=np.repeat(np.arange(K), 4))
    np.testing.assert_array_equal(np.load(out)["images"], pixels.to_uint8(x))


def test_label_outside_the_classes_is_one_line_exit_2(ckpt, capsys):
    assert cli.main(["sample", str(ckpt), "--label", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(
        r"flownp sample: error: --label 3: the model in .* has the classes 0\.\.2", err
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "argument --label: a class number is >= 0, got -1"),
        ("two", "argument --label: expected a class number or 'all', got 'two'"),
    ],
)
def test_bad_label_value_is_one_line_exit_2(ckpt, capsys, value, message):
    with pytest.raises(SystemExit) as ei:
        cli.main(["sample", str(ckpt), "--label", value])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unconditional_model_refuses_a_label(plain_ckpt, capsys):
    assert cli.main(["sample", str(plain_ckpt), "--label", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--label: the model in" in err and "is not class-conditional" in err
    assert len(err.splitlines()) == 1


# ---------------------------------------------------------------------- the requested digit
def test_requested_share_counts_only_the_requested_digit():
    data = load_dataset("mnist")
    x, y = data.test[:200], data.test_labels[:200]
    right = G.score_requested(x, y)
    real = G.bundled_classifier().confident_share(x)
    # real digits asked for their own label: every confident one is a hit (accuracy ~ 0.96)
    assert right.share >= real - 0.05 and right.share <= real
    wrong = G.score_requested(x, (y + 1) % 10)
    assert wrong.share <= 0.02
    shares = right.class_shares()
    assert set(shares) == set(range(10))
    for k, v in shares.items():
        assert v == pytest.approx(np.mean(right.hits[y == k]))
    assert "per digit: 0:" in right.format()
    assert G.score_requested(np.zeros((2, 8, 8, 1)), np.array([0, 1])) is None
    nan = np.full((1, 28, 28, 1), np.nan)
    assert not G.score_requested(nan, np.array([3])).hits[0]


def test_grid_labels():
    assert G.grid_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------------- latent tools
def test_latent_tools_work_on_a_class_conditional_n_bit_model(rng):
    model = tiny_model(rng, weight_y=0.5, n_bits=5)
    images = rectangles_dataset(8, 4, 0, (8, 8, 1)).train
    report, rec = latent.reconstruction_report(model, images)
    assert report.exact_uint8 and report.max_abs_error < 1e-10
    # the model sees the 5-bit bin centres
    np.testing.assert_allclose(
        latent.prepare_images(model, images), pixels.images_to_model(images, np.float64, 5)
    )
    paths = latent.interpolate(model, images[:2], images[2:4], 3)
    np.testing.assert_allclose(paths[:, 0], pixels.images_to_model(images[:2], np.float64, 5))
    v = rng.standard_normal(model.config.num_dims)
    edited = latent.manipulate(model, images[:2], v, np.array([-1.0, 0.0, 1.0]))
    assert edited.shape == (2, 3, 8, 8, 1) and np.isfinite(edited).all()
