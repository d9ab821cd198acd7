"""The digit classifier: accuracy on real held-out MNIST, no confidence on structureless
images, its gradient, determinism, and the reports of samples."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from flownp import digits as G
from flownp.data import load_dataset
from flownp.errors import DataError


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def clf():
    return G.bundled_classifier()


def test_accuracy_on_real_heldout_digits(clf, mnist):
    acc = clf.accuracy(mnist.test, mnist.test_labels)
    assert acc >= 0.93  # measured 0.954; a broken feature map or label order gives ~0.1
    share = clf.confident_share(mnist.test)
    assert 0.7 <= share <= 0.9  # measured 0.807


def test_structureless_images_are_not_confident(clf, mnist):
    outliers = G.outlier_images(mnist.test, 2000, np.random.default_rng(1))  # unseen seed
    for kind, x in zip(("noise", "shuffled", "blobs"), np.split(outliers[:1500], 3), strict=True):
        assert clf.confident_share(x) <= 0.02, kind  # measured 0.0, 0.0, 0.004
    assert clf.confident_share(outliers[1500:]) <= 0.2  # overlaid pairs: measured 0.08
    blank = np.zeros((4, 28, 28, 1), np.uint8)
    assert clf.confident_share(blank) == 0.0


def test_outlier_exposure_is_what_rejects_blobs(mnist):
    """The same network trained without outliers is often sure of a blob; with them it is not."""
    images, labels = mnist.train[:3000], mnist.train_labels[:3000]
    blobs = G.outlier_images(mnist.test, 400, np.random.default_rng(2))[200:300]
    plain = G.train_classifier(images, labels, epochs=4, num_outliers=0)
    exposed = G.train_classifier(images, labels, epochs=4, num_outliers=3000)
    assert plain.confident_share(blobs) >= 0.15  # measured 0.30
    assert exposed.confident_share(blobs) == 0.0
    assert exposed.accuracy(mnist.test, mnist.test_labels) >= 0.8  # measured 0.85


def test_outlier_images_are_the_documented_kinds(mnist):
    rng = np.random.default_rng(0)
    x = G.outlier_images(mnist.test[:50], 10, rng)  # sizes 3, 3, 2, 2
    assert x.shape == (10, 28, 28, 1) and x.dtype == np.uint8
    flat = x.reshape(10, -1).astype(np.int64)
    source = mnist.test[:50].reshape(50, -1).astype(np.int64)
    sorted_source = {tuple(np.sort(r)) for r in source}
    assert all(tuple(np.sort(r)) in sorted_source for r in flat[3:6])  # shuffled digits
    assert set(np.unique(flat[6:8])) <= {0, 255}  # thresholded blobs
    pairs = [np.maximum(source[i], source[j]) for i in range(50) for j in range(50)]
    assert all(any(np.array_equal(r, p) for p in pairs) for r in flat[8:])  # overlaid


def test_model_space_floats_match_uint8_bin_centres(clf, mnist):
    u = mnist.test[:50]
    x = u.astype(np.float64) / 256 - 0.5 + 1 / 512  # the bin centres in model space
    np.testing.assert_allclose(clf.predict_proba(x), clf.predict_proba(u), atol=1e-12)


def test_nonfinite_samples_count_as_not_confident(clf, mnist):
    x = mnist.test[:10].astype(np.float64) / 256 - 0.5
    assert clf.confident(x).sum() > 0
    x[3, 5, 5, 0] = np.nan
    p = clf.predict_proba(x)
    assert np.isnan(p[3]).all() and np.isfinite(np.delete(p, 3, axis=0)).all()
    x[:] = np.nan
    assert clf.confident(x).sum() == 0
    score = G.score_samples(x, mnist.test)
    assert score.num_nonfinite == 10 and score.num_confident == 0
    assert "non-finite" in score.format()


def test_loss_gradient_by_finite_differences(mnist):
    from flownp.testing import dense_jacobian

    rng = np.random.default_rng(0)
    F = G.features(mnist.train[:12])[:, 300:340]  # 40 pixels keep the check small
    F_out = G.features(G.outlier_images(mnist.train[:12], 6, rng))[:, 300:340]
    Y = np.eye(10)[mnist.train_labels[:12]]
    shapes = [(40, 6), (6,), (6, 10), (10,)]
    sizes = [int(np.prod(s)) for s in shapes]
    w = rng.standard_normal(sum(sizes))

    def unpack(v):
        parts = np.split(v, np.cumsum(sizes)[:-1])
        return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]

    def loss(v):
        return G.classifier_loss(unpack(v), F, Y, F_out, l2=0.3, outlier_weight=0.7)

    _, grads = loss(w)
    numeric = dense_jacobian(lambda v: np.array([loss(v[0])[0]]), w[None])
    np.testing.assert_allclose(
        np.concatenate([g.ravel() for g in grads]), numeric[0], rtol=1e-6, atol=1e-8
    )


def test_training_is_deterministic(mnist):
    images, labels = mnist.train[:256], mnist.train_labels[:256]
    a = G.train_classifier(images, labels, epochs=2, num_outliers=64)
    b = G.train_classifier(images, labels, epochs=2, num_outliers=64)
    start = G.train_classifier(images, labels, epochs=0, num_outliers=64)
    for pa, pb, p0 in zip(a.params(), b.params(), start.params(), strict=True):
        np.testing.assert_array_equal(pa, pb)
        assert not np.array_equal(pa, p0)  # it moved from the initialisation


def test_score_samples_shapes_and_report(mnist, capsys):
    assert G.score_samples(np.zeros((3, 8, 8, 1), np.uint8)) is None
    G.report_samples(np.zeros((3, 8, 8, 1), np.uint8))
    assert capsys.readouterr().out == ""
    score = G.score_samples(mnist.test[:100], mnist.test)
    assert score.num_samples == 100 and score.num_real == len(mnist.test)
    assert score.share == score.num_confident / 100
    G.report_samples(mnist.test[:20])
    assert "of 20 samples classified with probability >= 0.9" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"\(N, 28, 28, 1\)"):
        G.features(np.zeros((2, 28, 28, 3), np.uint8))


def _digits_below_half(mnist):
    """A stand-in model whose samples are real digits at T <= 0.5 and noise above."""

    class Fake:
        config = SimpleNamespace(image_shape=(28, 28, 1), num_dims=784, seed=0)
        dtype = np.float64

        def inverse(self, z, solve_precision="model"):
            t = np.abs(z).mean() / 0.8  # E|eps| = 0.8
            digits = mnist.test[: len(z)].astype(np.float64) / 256 - 0.5
            if t <= 0.5:
                return digits
            return np.random.default_rng(0).uniform(-0.5, 0.5, digits.shape)

        def sample(self, n, temperature=1.0, seed=0):
            eps = np.random.default_rng(seed).standard_normal((n, 784))
            return self.inverse(temperature * eps)

    return Fake()


def test_sweep_command_averages_the_given_checkpoints(mnist, monkeypatch, capsys):
    from flownp import checkpoint, cli

    monkeypatch.setattr(checkpoint, "load_model", lambda path: _digits_below_half(mnist))
    args = ["experiment", "--temperature-sweep", "0.3,1.0", "--sweep-images", "50"]
    assert cli.main([*args, "--checkpoint", "a.h5", "--checkpoint", "b.h5"]) == 0
    out = capsys.readouterr().out
    assert "a.h5:" in out and "b.h5:" in out  # one table per checkpoint
    assert "mean ± std over the given checkpoints" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| the 2 checkpoints |")]
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert float(cells[0].split(" ± ")[0]) > 20 and cells[1].startswith("0.0")  # digits, noise


def test_digit_observer_and_temperature_sweep(mnist):
    from flownp.train.observers import observe_digits

    Fake = lambda: _digits_below_half(mnist)  # noqa: E731
    rows = G.temperature_sweep(Fake(), [0.3, 1.0], n=100)
    assert rows[0][1].share > 0.3 and rows[1][1].share == 0.0
    assert "| 0.3 |" in G.format_sweep(rows)
    with pytest.raises(DataError, match="temperatures"):
        G.temperature_sweep(Fake(), [-1.0])

    logs = []
    row, score = observe_digits(
        Fake(), mnist.test, step=7, seed=0, log=logs.append, n=50, temperature=0.4
    )
    assert score.num_samples == 50 and score.num_confident > 0
    assert row["step"] == 7.0 and row["share"] == score.share and row["samples"] == 50.0
    assert row["real_share"] == score.real_share and row["temperature"] == 0.4
    assert "step 7: digit classifier" in logs[0]
    other = SimpleNamespace(config=SimpleNamespace(image_shape=(8, 8, 1)))
    assert observe_digits(other, mnist.test, step=1, seed=0, log=logs.append) == (None, None)


def test_training_run_reports_the_share(tmp_path, mnist):
    """A real (tiny) training run on MNIST-shaped data logs the line and stores the row."""
    from flownp.checkpoint import read_checkpoint
    from flownp.model import FlowConfig
    from flownp.train import TrainConfig, Trainer

    data = SimpleNamespace(train=mnist.train[:64], test=mnist.test[:32], shape=(28, 28, 1))
    mc = FlowConfig(levels=1, depth=1, width=4)
    tc = TrainConfig(steps=2, batch_size=16, init_batch_size=32, eval_every=0, stability_images=0)
    logs: list[str] = []
    Trainer(mc, tc, data, out_dir=tmp_path, log=logs.append).run()
    line = [m for m in logs if "digit classifier" in m]
    assert len(line) == 1 and line[0].startswith("step 2: digit classifier:")
    assert "of 100 samples" in line[0] and "of 32)" in line[0]  # the run's own held-out images
    table = read_checkpoint(tmp_path / "checkpoint.h5").metrics["digits"]
    assert list(table["step"]) == [2.0] and list(table["samples"]) == [100.0]
    assert 0.0 <= table["share"][0] <= 1.0
    clf = G.bundled_classifier()
    assert table["real_share"][0] == clf.confident_share(data.test)


# ---------------------------------------------------------------------- shipped weights
def _shipped_bytes() -> bytes:
    from importlib import resources

    return resources.files("flownp.data").joinpath(G.WEIGHTS_FILE).read_bytes()


def test_shipped_weights_are_what_training_on_the_bundled_split_gives(mnist, capsys):
    """Retrains (about 8 s on an idle core): the fallback of a missing file is the same
    classifier as the shipped one. Injected round-off of 2e-16 per gradient entry moved the
    trained weights by about 1e-15 relative, so the tolerance leaves room for another BLAS
    while a different training (other seed, epoch count, data) is far outside it."""
    import io

    shipped = G.load_weights(io.BytesIO(_shipped_bytes()), mnist.train, mnist.train_labels)
    trained = G.load_or_train("no such file.npz", mnist.train, mnist.train_labels)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "digit classifier" in err and "training" in err, err
    for name, a, b in zip(
        ("w1", "b1", "w2", "b2"), shipped.params(), trained.params(), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)
    assert G.bundled_classifier().accuracy(mnist.test, mnist.test_labels) == 0.954


def _rewrite(tmp_path, **changes):
    """The shipped file with some entries replaced; returns its path."""
    path = tmp_path / f"w{len(list(tmp_path.glob('w*.npz')))}.npz"
    with np.load(io_bytes(_shipped_bytes())) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def io_bytes(raw: bytes):
    import io

    return io.BytesIO(raw)


def test_a_bad_weights_file_is_never_used(tmp_path, mnist, monkeypatch, capsys):
    images, labels = mnist.train, mnist.train_labels
    assert G.load_weights(io_bytes(_shipped_bytes()), images, labels).w1.shape == (784, 256)
    raw = _shipped_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01  # inside w1's deflate stream: the CRC-32 catches it
    w1 = np.load(io_bytes(raw))["w1"]
    nan_w1 = w1.copy()
    nan_w1[3, 4] = np.nan
    bad = {
        "missing": tmp_path / "absent.npz",
        "empty": io_bytes(b""),
        "garbage": io_bytes(b"not a zip file at all"),
        "truncated": io_bytes(raw[: len(raw) // 3]),
        "one bit flipped": io_bytes(bytes(flipped)),
        "other measure": _rewrite(tmp_path, measure=np.array(G.MEASURE + " v2")),
        "other hyperparameters": _rewrite(tmp_path, hyperparameters=np.array('{"epochs": 19}')),
        "other data": _rewrite(tmp_path, fingerprint=np.array("0" * 64)),
        "other format": _rewrite(tmp_path, format=np.array(2)),
        "float32": _rewrite(tmp_path, w1=w1.astype(np.float32)),
        "shape": _rewrite(tmp_path, w1=w1[:, :128]),
        "nan": _rewrite(tmp_path, w1=nan_w1),
    }
    for kind, source in bad.items():
        with pytest.raises(DataError):
            G.load_weights(source, images, labels)
            pytest.fail(f"{kind}: loaded")
    # a wrong training split is refused too
    with pytest.raises(DataError, match="other data"):
        G.load_weights(io_bytes(raw), images[:-1], labels[:-1])
    # load_or_train falls back to training, after one line on stderr
    sentinel = object()
    monkeypatch.setattr(G, "train_classifier", lambda x, y: sentinel)
    for kind in ("missing", "truncated", "other measure"):
        source = bad[kind]
        if hasattr(source, "seek"):
            source.seek(0)
        assert G.load_or_train(source, images, labels) is sentinel, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("flownp: warning: digit classifier"), err


def test_written_weights_load_back_and_are_byte_reproducible(tmp_path, mnist):
    images, labels = mnist.train[:64], mnist.train_labels[:64]
    clf = G.train_classifier(images, labels, epochs=1, num_outliers=16)
    a = G.write_weights(tmp_path / "a.npz", clf, images, labels)
    b = G.write_weights(tmp_path / "b.npz", clf, images, labels)
    assert a.read_bytes() == b.read_bytes()
    back = G.load_weights(a, images, labels)
    for p, q in zip(back.params(), clf.params(), strict=True):
        np.testing.assert_array_equal(p, q)
    assert G.write_weights(a, clf, images, labels) == a and not list(tmp_path.glob("*.tmp"))
