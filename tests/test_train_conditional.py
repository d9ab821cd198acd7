"""Training class-conditional and n-bit models: labels through the data stream and the step,
the loss with the classifier term (finite differences through batch_gradients), evaluation
given the label, exact resume, and the command line (one line and exit 2 for bad input)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flownp import cli
from flownp import train as T
from flownp.checkpoint import read_checkpoint
from flownp.data import Dataset, pixels
from flownp.errors import DataError
from flownp.model import FlowConfig, FlowModel, bits_per_dim, bpd_loss, log_normal
from flownp.testing import randomize_params, rectangles_dataset
from flownp.train.data_stream import Batch, DataStream
from flownp.train.evaluation import evaluate_classes
from flownp.train.step import batch_gradients

SHAPE = (8, 8, 1)
K = 4


def quadrants(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright 4x4 squares in quadrant ``label`` (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right) on a dark background: the label is what the picture shows."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 30, (n, *SHAPE)).astype(np.uint8)
    y = rng.integers(0, K, n)
    for i in range(n):
        r, c = 4 * (y[i] // 2), 4 * (y[i] % 2)
        x[i, r : r + 4, c : c + 4] = rng.integers(200, 256)
    return x, y.astype(np.int64)


def labelled_data(n_train=96, n_test=32) -> Dataset:
    x, y = quadrants(n_train + n_test, 0)
    return Dataset("quadrants", x[:n_train], x[n_train:], y[:n_train], y[n_train:], K)


def tiny_model(**kw) -> FlowConfig:
    kw = {"levels": 2, "depth": 1, "width": 8, "num_classes": K, "dtype": "float64", **kw}
    return FlowConfig(image_shape=SHAPE, **kw)


def tiny_train(**kw) -> T.TrainConfig:
    kw = {
        "steps": 6,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "init_batch_size": 32,
        "eval_every": 3,
        "eval_size": 16,
        "checkpoint_every": 3,
        "seed": 4,
        "stability_images": 0,
        **kw,
    }
    return T.TrainConfig(**kw)


# ---------------------------------------------------------------------- stream and step
def test_stream_carries_the_labels_of_its_images():
    data = labelled_data()
    plain = DataStream(data.train, seed=3, dtype=np.float64)
    lab = DataStream(data.train, seed=3, dtype=np.float64, labels=data.train_labels)
    for _ in range(8):  # across an epoch boundary (96 / 16 = 6 batches)
        a, b = plain.next_batch(16), lab.next_batch(16)
        np.testing.assert_array_equal(a.x, b.x)  # the same images and noise
        assert a.labels is None
        u = pixels.to_uint8(b.x)
        idx = [int(np.flatnonzero((data.train == img).all(axis=(1, 2, 3)))[0]) for img in u]
        np.testing.assert_array_equal(b.labels, data.train_labels[idx])
    part = b.part(slice(3, 7))
    np.testing.assert_array_equal(part.x, b.x[3:7])
    np.testing.assert_array_equal(part.labels, b.labels[3:7])


def test_stream_of_n_bit_data():
    data = labelled_data()
    s = DataStream(data.train, seed=1, dtype=np.float32, n_bits=3)
    x = s.next_batch(16).x.astype(np.float64)
    v = np.floor((x + 0.5) * 8)  # the 3-bit value of each dequantised pixel
    assert v.min() >= 0 and v.max() <= 7
    assert set(np.unique(v)) <= set(range(8))
    np.testing.assert_array_equal(pixels.to_uint8(x, 3), pixels.quantize(pixels.to_uint8(x), 3))


def test_bits_per_dim_counts_n_bits():
    z = np.zeros((2, 12))
    ld = np.array([0.0, 12 * math.log(2.0)])
    for n in (1, 5, 8):
        expected = n + 0.5 * math.log2(2 * math.pi) - np.array([0.0, 1.0])
        np.testing.assert_allclose(bits_per_dim(z, ld, n), expected, rtol=1e-14)
    # n_bits shifts the loss only: the gradients are the same
    a, b = bpd_loss(z + 0.3, ld, n_bits=5), bpd_loss(z + 0.3, ld)
    assert a[0] == pytest.approx(b[0] - 3.0, rel=1e-14)
    np.testing.assert_array_equal(a[1], b[1])


def _ready(cfg: FlowConfig, rng) -> FlowModel:
    model = FlowModel(cfg, seed=2)
    model.initialize(rng.uniform(-0.5, 0.5, (16, *SHAPE)))
    randomize_params(model, rng, 0.05)
    return model


def test_batch_loss_is_bits_x_plus_weight_times_bits_y(rng):
    cfg = tiny_model(weight_y=0.7, n_bits=5)
    model = _ready(cfg, rng)
    x = rng.uniform(-0.5, 0.5, (5, *SHAPE))
    y = np.array([0, 3, 1, 1, 2])
    g = batch_gradients(model, Batch(x, y))
    assert g.error is None
    z, logdet = model.forward(x, y)
    model.clear_cache()
    D = cfg.num_dims
    bits_x = np.mean((-(log_normal(z) + logdet) + D * 5 * math.log(2)) / (D * math.log(2)))
    a = model.logits
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    bits_y = np.mean(-np.log2(p[np.arange(5), y]))
    assert g.bits_x == pytest.approx(bits_x, rel=1e-12)
    assert g.bits_y == pytest.approx(bits_y, rel=1e-12)
    assert g.loss == pytest.approx(bits_x + 0.7 * bits_y, rel=1e-12)
    assert g.class_error == pytest.approx(np.mean(np.argmax(a, 1) != y))
    # an unconditional step has no classifier terms
    plain = batch_gradients(_ready(tiny_model(num_classes=0), rng), Batch(x))
    assert math.isnan(plain.bits_y) and plain.error is None
    with pytest.raises(ValueError, match="needs the batch's labels"):
        batch_gradients(model, Batch(x))


def test_batch_gradients_match_finite_differences_of_the_whole_loss(rng):
    """d(bits_x + W bits_y)/d theta through the flow, the prior's label embedding and the
    classifier, against central differences of the loss batch_gradients reports."""
    model = _ready(tiny_model(weight_y=2.0), rng)
    model.params["prior/label_mean"] += 0.2 * rng.standard_normal((K, 8))
    x = rng.uniform(-0.5, 0.5, (4, *SHAPE))
    y = np.array([1, 3, 3, 0])
    batch = Batch(x, y)
    grads = {k: g.copy() for k, g in batch_gradients(model, batch).grads.items()}
    worst = 0.0
    for key in (
        "classifier/weight",
        "classifier/bias",
        "prior/label_mean",
        "prior/label_logs",
        "prior/logs",
        "level1/step0/coupling/net/conv_out/weight",
        "level0/step0/conv/weight",
    ):
        arr = model.params[key].reshape(-1)
        for i in rng.choice(arr.size, size=min(4, arr.size), replace=False):
            old = arr[i]
            arr[i] = old + 1e-6
            lp = batch_gradients(model, batch).loss
            arr[i] = old - 1e-6
            lm = batch_gradients(model, batch).loss
            arr[i] = old
            num = (lp - lm) / 2e-6
            worst = max(worst, abs(grads[key].reshape(-1)[i] - num) / max(1.0, abs(num)))
    assert worst < 1e-6


# ---------------------------------------------------------------------- training and evaluation
def test_class_conditional_training_evaluates_given_the_label_and_resumes(tmp_path):
    data = labelled_data()
    mc, tc = tiny_model(weight_y=0.5), tiny_train(steps=8, eval_every=4, checkpoint_every=4)
    full = T.Trainer(mc, tc, data, log=lambda m: None)
    full.run()
    losses = full.metrics["train"]["bpd"]
    # the parts of the loss, per step
    cl = full.metrics["classifier"]
    assert cl["step"] == [float(s) for s in range(1, 9)]
    np.testing.assert_allclose(
        np.array(cl["bits_x"]) + 0.5 * np.array(cl["bits_y"]), losses, rtol=1e-12
    )
    assert full.metrics["classes"]["step"] == [4.0, 8.0]
    # the final evaluation: bits/dim given the label, as evaluate_bpd with the labels gives it
    with full.optimizer.ema_weights():
        res = evaluate_classes(full.model, data.test, data.test_labels)
        bpd = T.evaluate_bpd(full.model, data.test, labels=data.test_labels)
        L = full.model.class_log_probs(pixels.dequantize(data.test, None, np.float64))
    assert res.bpd == pytest.approx(bpd, rel=1e-10)
    assert full.metrics["eval"]["bpd"][-1] == pytest.approx(res.bpd, rel=1e-12)
    assert full.metrics["classes"]["accuracy"][-1] == res.accuracy
    assert 0 <= res.accuracy <= 1 and res.classifier_accuracy is not None
    assert L.shape == (32, K)
    # interrupted after 4 steps and resumed: the same losses
    first = T.Trainer(mc, tiny_train(steps=4, eval_every=4, checkpoint_every=4), data,
                      out_dir=tmp_path / "run", log=lambda m: None)  # fmt: skip
    first.run()
    resumed = T.Trainer.from_checkpoint(
        tmp_path / "run" / "checkpoint.h5", data, steps=8, log=lambda m: None
    )
    resumed.run()
    np.testing.assert_array_equal(resumed.metrics["train"]["bpd"], losses)
    np.testing.assert_array_equal(resumed.metrics["classifier"]["bits_y"], cl["bits_y"])
    ck = read_checkpoint(tmp_path / "run" / "checkpoint.h5")
    assert ck.model_config["num_classes"] == K and ck.model_config["weight_y"] == 0.5
    assert len(ck.metrics["classes"]["step"]) == 2


def test_classifiers_learn_the_quadrants():
    """A class-conditional flow with the classifier term, trained briefly on images whose
    label is visible, classifies held-out images by argmax_y log p(x | y) and by its linear
    classifier far above chance (1/4). (Measured: 0.98-1.0 for seeds 4-6; without the
    classifier term 0.4-0.6 after 500 steps: the term shapes the top latent by class.)"""
    data = labelled_data(256, 64)
    tr = T.Trainer(
        tiny_model(dtype="float32", weight_y=1.0),
        tiny_train(steps=150, batch_size=32, lr=1e-2, eval_every=0, checkpoint_every=0),
        data,
        log=lambda m: None,
    )
    tr.run()
    assert tr.metrics["classes"]["accuracy"][-1] >= 0.9
    assert tr.metrics["classes"]["classifier_accuracy"][-1] >= 0.9


def test_unlabelled_data_is_refused():
    data = rectangles_dataset(96, 32, 0, SHAPE)
    with pytest.raises(DataError, match="needs labelled data, but 'rects' has no labels"):
        T.Trainer(tiny_model(), tiny_train(), data)
    half = labelled_data()
    half = Dataset("half", half.train, half.test, half.train_labels, None, K)
    with pytest.raises(DataError, match="no labels for its held-out images"):
        T.Trainer(tiny_model(), tiny_train(), half)
    with pytest.raises(DataError, match=r"train label 3 is outside the model's classes 0\.\.2"):
        T.Trainer(tiny_model(num_classes=3), tiny_train(), labelled_data())
    with pytest.raises(ValueError, match="evaluated given the labels"):
        T.evaluate_bpd(FlowModel(tiny_model()), labelled_data().test)


# ---------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-bits", "9"], "argument --n-bits: must be in 1..8 (bits per pixel), got 9"),
        (["--n-bits", "0"], "argument --n-bits: must be in 1..8 (bits per pixel), got 0"),
        (["--n-bits", "five"], "argument --n-bits: expected an integer in 1..8, got 'five'"),
    ],
)
def test_bad_n_bits_is_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["train", *args])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_weight_y_needs_class_conditional(tmp_path, capsys):
    assert cli.main(["train", "--weight-y", "0.5", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "flownp train: error: --weight-y 0.5 needs --class-conditional (the classifier is "
        "trained on the labels of a class-conditional model)"
    )


def test_label_prior_needs_class_conditional(tmp_path, capsys):
    assert cli.main(["train", "--label-prior", "position", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "flownp train: error: --label-prior position needs --class-conditional (it shapes the "
        "label's term of the top prior)"
    )


def test_class_conditional_on_unlabelled_data_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "x.npz"
    np.savez(path, x=rectangles_dataset(40, 10, 0, SHAPE).train)
    code = cli.main(["train", "--class-conditional", "--dataset", f"array:{path}",
                     "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flownp train: error: --class-conditional: dataset ")
    assert err.endswith("has no labels (docs/data.md: labels and classes)")
    assert len(err.splitlines()) == 1


def test_train_evaluate_sample_a_class_conditional_5_bit_model(tmp_path, capsys, serve_dataset):
    serve_dataset(labelled_data())
    out = tmp_path / "run"
    args = ["train", "--class-conditional", "--weight-y", "0.1", "--n-bits", "5", "--levels",
            "2", "--depth", "1", "--width", "8", "--steps", "4", "--batch-size", "16",
            "--init-batch-size", "32", "--eval-every", "2", "--checkpoint-every", "0",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert f"{K} classes" in text and "5-bit" in text
    assert "given the label" in text and "generative classifier accuracy" in text
    assert "linear classifier accuracy" in text
    ck = read_checkpoint(out / "checkpoint.h5")
    assert (ck.model_config["num_classes"], ck.model_config["n_bits"]) == (K, 5)
    assert cli.main(["evaluate", str(out / "checkpoint.h5"), "--stability-images", "0"]) == 0
    text = capsys.readouterr().out
    assert "bits/dim given the label (5-bit data):" in text
    assert "generative classifier accuracy (argmax_y log p(x | y)):" in text
    assert cli.main(["sample", str(out / "checkpoint.h5"), "--label", "2", "-n", "3",
                     "--npz", str(tmp_path / "s.npz")]) == 0  # fmt: skip
    u = np.load(tmp_path / "s.npz")["images"]
    assert not (u % 8).any()  # 5-bit pixels: multiples of 2^3
