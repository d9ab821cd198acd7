"""Training: dequantisation, the bits/dim loss, the loop (learning, NaN rejection, exact resume)
and the train / sample / evaluate commands, on tiny synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flownp import cli
from flownp import train as T
from flownp.checkpoint import read_checkpoint
from flownp.data import pixels
from flownp.errors import DataError
from flownp.model import FlowConfig
from flownp.testing import rectangles_dataset
from flownp.train import step as step_module

SHAPE = (8, 8, 1)


def make_data(n_train=96, n_test=32, seed=0):
    return rectangles_dataset(n_train, n_test, seed, SHAPE)


def tiny_model(**kw):
    kw = {"levels": 2, "depth": 1, "width": 8, "conv": "cinc", "coupling": "affine", **kw}
    return FlowConfig(image_shape=SHAPE, dtype=kw.pop("dtype", "float64"), **kw)


def tiny_train(**kw):
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
        **kw,
    }
    return T.TrainConfig(**kw)


# ---------------------------------------------------------------------- data and loss
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dequantize_stays_in_the_pixel_bin(dtype):
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(50, axis=0)
    x = pixels.dequantize(u, np.random.default_rng(0), dtype)
    assert x.dtype == dtype
    assert x.min() >= -0.5 and x.max() < 0.5
    np.testing.assert_array_equal(np.floor((x.astype(np.float64) + 0.5) * 256), u)
    np.testing.assert_array_equal(pixels.to_uint8(x), u)
    centre = pixels.dequantize(u[:1], None, np.float64)
    np.testing.assert_array_equal(centre, (u[:1] + 0.5) / 256 - 0.5)
    with pytest.raises(DataError, match="uint8"):
        pixels.dequantize(u.astype(np.int16), None, dtype)


def test_bits_per_dim_by_hand():
    D = 12
    z = np.zeros((2, D))
    bpd = T.bits_per_dim(z, np.array([0.0, D * math.log(2.0)]))
    # -log p = 0.5 D ln(2 pi) - logdet; + D ln 256, over D ln 2
    assert bpd[0] == pytest.approx(8 + 0.5 * math.log2(2 * math.pi), rel=1e-14)
    assert bpd[1] == pytest.approx(7 + 0.5 * math.log2(2 * math.pi), rel=1e-14)


def test_bpd_loss_gradients_by_finite_differences(rng):
    z = rng.standard_normal((3, 5))
    ld = rng.standard_normal(3)
    _, dz, dld = T.bpd_loss(z, ld)
    eps = 1e-6
    for arr, grad in ((z, dz), (ld, dld)):
        flat = arr.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            lp = T.bpd_loss(z, ld)[0]
            flat[i] = old - eps
            lm = T.bpd_loss(z, ld)[0]
            flat[i] = old
            assert grad.reshape(-1)[i] == pytest.approx((lp - lm) / (2 * eps), abs=1e-8)


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        T.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        T.TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="unknown field"):
        T.TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(DataError, match="batch_size 200 exceeds"):
        T.Trainer(tiny_model(), tiny_train(batch_size=200), make_data())
    with pytest.raises(DataError, match="model expects"):
        T.Trainer(
            FlowConfig(image_shape=(16, 16, 1), levels=2, depth=1, width=4),
            tiny_train(),
            make_data(),
        )


# ---------------------------------------------------------------------- the loop
def test_training_lowers_the_loss_and_writes_the_run_folder(tmp_path):
    data = make_data()
    tr = T.Trainer(
        tiny_model(dtype="float32"),
        tiny_train(steps=40, eval_every=20),
        data,
        out_dir=tmp_path / "run",
    )
    assert tr.model.initialized  # data-dependent init happened on construction
    before = T.evaluate_bpd(tr.model, data.test)
    res = tr.run()
    assert res.steps == 40 and res.rejected_total == 0
    assert res.heldout_bpd < before - 0.3, (before, res.heldout_bpd)
    bpd = tr.metrics["train"]["bpd"]
    assert np.mean(bpd[-10:]) < np.mean(bpd[:10]) - 0.3
    for name in ("checkpoint.h5", "metrics.csv", "loss_curve.png", "samples.png", "config.json"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,bpd") and len(lines) == 41
    assert lines[20].endswith(repr(tr.metrics["eval"]["bpd"][0]))  # held-out value at step 20
    ck = read_checkpoint(tmp_path / "run" / "checkpoint.h5")
    assert ck.train_state["step"] == 40
    assert list(ck.metrics["eval"]["step"]) == [20.0, 40.0]


def test_resume_gives_identical_losses(tmp_path):
    data = make_data()
    full = T.Trainer(tiny_model(), tiny_train(steps=8), data, out_dir=tmp_path / "full")
    full.run()
    first = T.Trainer(tiny_model(), tiny_train(steps=5), data, out_dir=tmp_path / "part")
    first.run()
    resumed = T.Trainer.from_checkpoint(tmp_path / "part" / "checkpoint.h5", data, steps=8)
    assert resumed.step == 5 and resumed.optimizer.t == 5
    resumed.run()
    a, b = full.metrics["train"], resumed.metrics["train"]
    assert a["step"] == b["step"] == [float(s) for s in range(1, 9)]
    assert a["bpd"] == b["bpd"]  # bit-identical losses, including the 3 steps after resuming
    assert a["grad_norm"] == b["grad_norm"]
    for k, p in full.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[k], p)
        np.testing.assert_array_equal(resumed.optimizer.ema[k], full.optimizer.ema[k])
    assert full.metrics["eval"]["bpd"][-1] == resumed.metrics["eval"]["bpd"][-1]
    # the epoch boundary was crossed (96 images / 16 = 6 batches per epoch)
    assert resumed.epoch == full.epoch == 1


def test_adamax_and_recompute_train_resume_exactly_and_are_saved(tmp_path):
    """optimizer="adamax" and recompute=True: the run learns, the checkpoint holds the Adamax
    state and both settings, and a resume continues with the same losses."""
    data = make_data()
    tc = dict(optimizer="adamax", recompute=True)
    mc = tiny_model(conv="periodic", coupling="additive")
    full = T.Trainer(mc, tiny_train(steps=8, **tc), data, out_dir=tmp_path / "full")
    assert type(full.optimizer).__name__ == "Adamax" and full.model.recompute
    full.run()
    bpd = full.metrics["train"]["bpd"]
    assert all(math.isfinite(b) for b in bpd) and bpd[-1] < bpd[0]
    first = T.Trainer(mc, tiny_train(steps=5, **tc), data, out_dir=tmp_path / "part")
    first.run()
    ck = read_checkpoint(tmp_path / "part" / "checkpoint.h5")
    assert ck.train_config["optimizer"] == "adamax" and ck.train_config["recompute"] is True
    assert "u" in ck.optimizer_state and "v" not in ck.optimizer_state
    resumed = T.Trainer.from_checkpoint(tmp_path / "part" / "checkpoint.h5", data, steps=8)
    assert type(resumed.optimizer).__name__ == "Adamax" and resumed.model.recompute
    resumed.run()
    assert full.metrics["train"]["bpd"] == resumed.metrics["train"]["bpd"]
    for k, p in full.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[k], p)


def test_recompute_gives_the_stored_path_s_gradients():
    """The same run with and without recompute: the losses agree to round-off (float64)."""
    data = make_data()
    runs = [T.Trainer(tiny_model(), tiny_train(steps=4, recompute=r), data) for r in (False, True)]
    for tr in runs:
        tr.run()
    np.testing.assert_allclose(*(tr.metrics["train"]["bpd"] for tr in runs), rtol=1e-10)


def test_a_train_config_written_before_the_optimizer_field_is_adam():
    old = tiny_train().to_dict()
    del old["optimizer"], old["recompute"]
    tc = T.TrainConfig.from_dict(old)
    assert tc.optimizer == "adam" and tc.recompute is False
    with pytest.raises(ValueError, match="optimizer must be one of"):
        T.TrainConfig(optimizer="sgd")


def test_non_finite_step_is_rejected_and_training_continues(tmp_path, monkeypatch):
    tr = T.Trainer(tiny_model(), tiny_train(steps=6, eval_every=0), make_data())
    messages = []
    tr.log = messages.append
    real_backward = tr.model.backward
    snapshots = {}

    def poisoned_backward(dz, dlogdet):
        dx = real_backward(dz, dlogdet)
        if tr.step == 2:  # the third step (0-based counter before increment)
            snapshots["before"] = {k: p.copy() for k, p in tr.model.params.items()}
            tr.model.grads["level0/step0/conv/weight"][0, 0, 0, 0] = np.nan
        return dx

    monkeypatch.setattr(tr.model, "backward", poisoned_backward)
    res = tr.run()
    assert res.rejected_total == 1 and res.steps == 6
    assert tr.metrics["train"]["rejected"] == [0, 0, 1, 0, 0, 0]
    assert tr.optimizer.t == 5  # one update skipped
    assert any("step 3: REJECTED" in m and "non-finite gradient" in m for m in messages)
    assert np.isfinite(res.heldout_bpd)
    for p in tr.model.params.values():
        assert np.isfinite(p).all()


def test_rejected_step_keeps_the_last_good_parameters():
    tr = T.Trainer(tiny_model(), tiny_train(), make_data())
    batch = tr.next_batch()
    before = {k: p.copy() for k, p in tr.model.params.items()}
    bad = batch.x.copy()
    bad[0, 0, 0, 0] = np.nan
    rec = tr.train_step(T.Batch(bad))
    assert not rec.accepted and rec.bad and "NaN" in rec.error
    assert tr.rejected_total == tr.consecutive_bad == 1 and tr.optimizer.t == 0
    for k, p in tr.model.params.items():
        np.testing.assert_array_equal(p, before[k])
    assert tr.train_step(batch).accepted  # no stale cache from the failed forward
    assert tr.consecutive_bad == 0 and tr.optimizer.t == 1


def test_persistent_nan_stops_with_a_clear_error(tmp_path, monkeypatch):
    tr = T.Trainer(
        tiny_model(),
        tiny_train(steps=20, max_bad_steps=3, eval_every=0),
        make_data(),
        out_dir=tmp_path,
    )
    tr.log = lambda m: None
    good_steps = 2
    real_loss = T.bpd_loss

    def diverging_loss(z, logdet, **kw):
        loss, dz, dld = real_loss(z, logdet, **kw)
        return (loss if tr.step < good_steps else float("inf")), dz, dld

    monkeypatch.setattr(step_module, "bpd_loss", diverging_loss)
    with pytest.raises(T.TrainingDiverged, match="3 bad steps in a row") as info:
        tr.run()
    # the bad state is not written: the folder keeps the last usable checkpoint (the initial
    # state; the periodic one at step 3 came after a bad step and was skipped)
    assert "holds step 0, the last usable state" in str(info.value)
    assert info.value.checkpoint_step == 0
    ck = read_checkpoint(tmp_path / "checkpoint.h5")
    assert ck.train_state["step"] == 0 and ck.optimizer_state["t"] == 0
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "loss_curve.png").exists()
    # the advice printed works: resume with a smaller lr and a new warmup
    advice = str(info.value).split("flownp train ")[1].split()
    assert advice[:2] == ["--resume", str(tmp_path / "checkpoint.h5")]
    lr, warmup = float(advice[advice.index("--lr") + 1]), int(advice[-1])
    monkeypatch.setattr(step_module, "bpd_loss", real_loss)
    resumed = T.Trainer.from_checkpoint(
        tmp_path / "checkpoint.h5", make_data(), lr=lr, warmup_steps=warmup, steps=4
    )
    resumed.log = lambda m: None
    assert resumed.run().steps == 4
    ck = read_checkpoint(tmp_path / "checkpoint.h5")
    assert ck.train_state["step"] == 4 and ck.train_config["lr"] == lr
    (entry,) = ck.train_state["history"]
    assert entry["step"] == 0
    assert entry["changes"] == {
        "lr": [3e-3, lr],
        "warmup_steps": [2, warmup],
        "steps": [20, 4],
    }


# ---------------------------------------------------------------------- the commands


TINY_ARGS = [
    "--levels",
    "2",
    "--depth",
    "1",
    "--width",
    "8",
    "--batch-size",
    "16",
    "--init-batch-size",
    "32",
    "--eval-every",
    "4",
    "--eval-size",
    "16",
    "--no-progress",
]


@pytest.mark.parametrize("extra", [[], ["--optimizer", "adamax", "--recompute"]])
def test_train_sample_evaluate_commands(tmp_path, fake_dataset, capsys, extra):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "6", "--out", str(out), *TINY_ARGS, *extra]) == 0
    text = capsys.readouterr().out
    assert "held-out bits/dim" in text
    ckpt = out / "checkpoint.h5"
    for name in ("checkpoint.h5", "metrics.csv", "loss_curve.png", "samples.png"):
        assert (out / name).exists()
    assert (
        cli.main(
            [
                "sample",
                str(ckpt),
                "-n",
                "9",
                "--out",
                str(tmp_path / "s.png"),
                "--npz",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s.png").stat().st_size > 0
    assert np.load(tmp_path / "s.npz")["images"].shape == (9, *SHAPE)
    capsys.readouterr()
    assert cli.main(["evaluate", str(ckpt), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    value = float(printed.split("bits/dim:")[1])
    held = read_checkpoint(ckpt).metrics["eval"]["bpd"][-1]
    assert value == pytest.approx(held, abs=5e-5)  # printed with 4 decimals; same weights+noise
    # resume to 8 steps
    assert cli.main(["train", "--resume", str(ckpt), "--steps", "8", "--no-progress"]) == 0
    assert read_checkpoint(ckpt).train_state["step"] == 8
    optimizer = read_checkpoint(ckpt).train_config["optimizer"]
    assert optimizer == ("adamax" if extra else "adam")


def test_commands_exit_codes_on_bad_input(tmp_path, fake_dataset, capsys):
    assert cli.main(["train", "--levels", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "levels" in capsys.readouterr().err
    assert cli.main(["train", "--levels", "4", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path / "missing.h5")]) == 2
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert cli.main(["sample", str(tmp_path / "junk.h5")]) == 2
    assert "cannot be opened as HDF5" in capsys.readouterr().err
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "2", "--out", str(out), *TINY_ARGS]) == 0
    rc = cli.main(["train", "--resume", str(out / "checkpoint.h5"), "--width", "16"])
    assert rc == 2 and "--width" in capsys.readouterr().err
    rc = cli.main(["train", "--resume", str(out / "checkpoint.h5"), "--optimizer", "adamax"])
    assert rc == 2 and "--optimizer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--conv", "5x5"])
    assert exc.value.code == 2


def test_train_command_diverged_exit_code(tmp_path, fake_dataset, monkeypatch, capsys):
    monkeypatch.setattr(step_module, "bpd_loss", lambda z, ld, **kw: (float("nan"), z, ld))
    rc = cli.main(
        ["train", "--steps", "10", "--max-bad-steps", "2", "--out", str(tmp_path), *TINY_ARGS]
    )
    assert rc == 1
    assert "training diverged" in capsys.readouterr().err


def test_train_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in (
        "--resume",
        "--steps",
        "--time-limit",
        "--levels",
        "--conv",
        "--coupling",
        "--ema-decay",
        "--max-grad-norm",
        "--max-bad-steps",
        "--out",
        "--dataset",
        "--optimizer",
        "--recompute",
    ):
        assert opt in text, opt


# ---------------------------------------------------------------------- the step's two parts
def test_batch_gradients_of_two_halves_add_up_to_the_whole_batch():
    """(a) with ``num_images`` = the whole batch's count: the halves' losses and gradients sum
    to the whole batch's (what combining the batches of several processes relies on)."""
    tr = T.Trainer(tiny_model(), tiny_train(), make_data())
    batch = tr.next_batch()
    whole = T.batch_gradients(tr.model, batch)
    whole_grads = {k: g.copy() for k, g in whole.grads.items()}
    n = batch.num_images
    halves = [T.Batch(batch.x[: n // 2]), T.Batch(batch.x[n // 2 :])]
    parts = []
    for half in halves:
        g = T.batch_gradients(tr.model, half, num_images=n)
        parts.append((g.loss, {k: v.copy() for k, v in g.grads.items()}, g.batch_images))
    assert [p[2] for p in parts] == [n // 2, n - n // 2] and whole.batch_images == n
    assert parts[0][0] + parts[1][0] == pytest.approx(whole.loss, rel=1e-13)
    assert parts[0][0] == pytest.approx(whole.loss / 2, rel=0.2)  # each half about half
    for k, g in whole_grads.items():
        np.testing.assert_allclose(parts[0][1][k] + parts[1][1][k], g, rtol=1e-9, atol=1e-12)


def test_step_rule_judges_and_counts():
    tr = T.Trainer(tiny_model(), tiny_train(), make_data())
    rule = T.StepRule(T.LossMonitor(window=50, margin=1.0, min_history=2))
    rule.replay([3.0, 3.0, 50.0], [0.0, 0.0, 1.0])  # a rejected loss is not part of the level
    assert rule.monitor.level() == 3.0
    before = {k: v.copy() for k, v in tr.model.params.items()}
    g = T.batch_gradients(tr.model, tr.next_batch())
    rec = rule.apply(tr.model, tr.optimizer, g)  # the first real loss is > 6: high, not applied
    assert not rec.accepted and rec.high and rec.bad and "more than twice" in rec.error
    assert tr.optimizer.t == 0 and rule.consecutive_bad == 1 and rule.rejected_total == 1
    for k, v in tr.model.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert not any(np.any(v) for v in tr.model.grads.values())  # nothing left for a next step
    assert rule.monitor.level() == 3.0  # a high loss is not part of the level
    bad = T.BatchGradients(float("nan"), 4, None, "loss is nan")
    rec = rule.apply(tr.model, tr.optimizer, bad)
    assert not rec.accepted and not rec.high and rec.error == "loss is nan"
    assert tr.optimizer.t == 0 and rule.consecutive_bad == 2 and rule.rejected_total == 2
    g = T.batch_gradients(tr.model, tr.next_batch())
    rule.monitor.add(50.0)  # the level: median of [3, 3, 50, 50] = 26.5
    rule.monitor.add(50.0)
    rec = rule.apply(tr.model, tr.optimizer, g)  # below 2 x 26.5: applied
    assert rec.accepted and not rec.bad and tr.optimizer.t == 1 and rule.consecutive_bad == 0


# ---------------------------------------------------------------------- evaluation memory
def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_evaluation_stores_no_activations_and_gives_the_same_numbers():
    """evaluate_bpd and encode equal, bit for bit, a forward pass that stores every layer's
    activations (same noise); they and log_prob need a fraction of that pass's memory and
    leave the model's recompute setting and empty caches behind."""
    from flownp.model import FlowModel, bits_per_dim

    data = make_data(n_test=64)
    model = FlowModel(tiny_model(depth=4, width=16), seed=0)
    model.initialize(pixels.dequantize(data.train[:32], np.random.default_rng(0), np.float64))

    def stored() -> float:
        x = pixels.dequantize(data.test, np.random.default_rng(1234), np.float64)
        z, logdet = model.forward(x)
        model.clear_cache()
        return float(np.sum(bits_per_dim(z, logdet))) / len(x)

    from flownp.latent import encode

    expected = stored()
    assert T.evaluate_bpd(model, data.test, batch_size=64) == expected
    x = pixels.dequantize(data.test, np.random.default_rng(1234), np.float64)
    z_stored, _ = model.forward(x)
    model.clear_cache()
    np.testing.assert_array_equal(encode(model, x, batch_size=64), z_stored)
    peak_stored = _peak_bytes(stored)
    for name, run in {
        "evaluate_bpd": lambda: T.evaluate_bpd(model, data.test, batch_size=64),
        "log_prob": lambda: model.log_prob(x),
        "encode": lambda: encode(model, x, batch_size=64),
    }.items():
        peak = _peak_bytes(run)
        assert peak < 0.5 * peak_stored, (name, peak, peak_stored)
        assert model.recompute is False and model._cache is None, name


def test_initialization_stores_no_activations_and_sets_the_same_parameters():
    """FlowModel.initialize gives, bit for bit, the parameters of a data-dependent forward pass
    that stores every layer's activations, with a fraction of its memory."""
    from flownp.model import FlowModel

    x = pixels.dequantize(make_data().train[:64], np.random.default_rng(0), np.float64)
    stored, model = (FlowModel(tiny_model(depth=4, width=16), seed=0) for _ in range(2))

    def init_storing() -> None:
        stored.forward(x)
        stored.clear_cache()

    peak_stored = _peak_bytes(init_storing)
    peak_init = _peak_bytes(lambda: model.initialize(x))
    assert model.initialized and peak_init < 0.5 * peak_stored, (peak_init, peak_stored)
    for name, value in stored.params.items():
        np.testing.assert_array_equal(model.params[name], value, err_msg=name)
    assert model.recompute is False and model._cache is None
