"""HDF5 checkpoints: save/load identity, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import contextlib
import os

import h5py
import numpy as np
import pytest

from flownp import checkpoint as ck
from flownp.errors import CheckpointError
from flownp.model import FlowConfig, FlowModel
from flownp.optim import Adam, Adamax
from flownp.testing import randomize_params


def trained_state(rng, dtype="float32"):
    cfg = FlowConfig(
        image_shape=(8, 8, 1), levels=2, depth=1, width=4, conv="cinc", coupling="quad", dtype=dtype
    )
    model = FlowModel(cfg, seed=5)
    model.initialize(rng.uniform(-0.5, 0.5, (8, 8, 8, 1)).astype(dtype))
    randomize_params(model, rng, 0.05)
    opt = Adam(model.params, lr=1e-3, warmup_steps=10, max_grad_norm=5.0, ema_decay=0.99)
    for _ in range(3):
        opt.step({k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in model.params.items()})
    gen = np.random.default_rng(7)
    gen.random(5)
    train_state = {
        "step": 3,
        "epoch": 1,
        "position": 64,
        "consecutive_bad": 0,
        "rejected_total": 2,
        "elapsed": 1.5,
        "rng_state": gen.bit_generator.state,
        "history": [{"step": 2, "time": "t", "changes": {"lr": [1e-3, 1e-4]}}],
    }
    metrics = {
        "train": {"step": [1.0, 2.0, 3.0], "bpd": [8.1, 7.9, np.nan]},
        "eval": {"step": [3.0], "bpd": [7.5]},
    }
    return model, opt, train_state, metrics, gen


def save(path, rng, **kw):
    model, opt, ts, metrics, gen = trained_state(rng, **kw)
    ck.save_checkpoint(
        path, model, optimizer=opt, train_state=ts, train_config={"steps": 10}, metrics=metrics
    )
    return model, opt, ts, metrics, gen


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_identity(tmp_path, rng, dtype):
    path = tmp_path / "run" / "checkpoint.h5"
    model, opt, ts, metrics, gen = save(path, rng, dtype=dtype)
    c = ck.read_checkpoint(path)
    assert c.format_version == ck.FORMAT_VERSION and c.attrs["format"] == ck.FORMAT
    assert c.model_config == model.config.to_dict() and c.model_seed == 5
    assert c.train_config == {"steps": 10}
    state = model.state_dict()
    assert set(c.model_state) == set(state)
    for k, v in state.items():
        assert c.model_state[k].dtype == v.dtype, k
        np.testing.assert_array_equal(c.model_state[k], v)
    o = opt.state_dict()
    assert c.optimizer_state["t"] == 3 and c.optimizer_state["hparams"] == o["hparams"]
    for name in ("m", "v", "ema"):
        for k, v in o[name].items():
            np.testing.assert_array_equal(c.optimizer_state[name][k], v)
    assert c.train_state == ts
    restored = np.random.default_rng(0)
    restored.bit_generator.state = c.train_state["rng_state"]
    np.testing.assert_array_equal(restored.random(4), gen.random(4))
    np.testing.assert_array_equal(c.metrics["train"]["bpd"], metrics["train"]["bpd"])
    np.testing.assert_array_equal(c.metrics["eval"]["step"], [3.0])
    # the model comes back bit-identical (raw weights) or with the EMA weights
    raw = ck.load_model(path, use_ema=False)
    x = rng.uniform(-0.5, 0.5, (2, 8, 8, 1)).astype(dtype)
    z0, l0 = model.forward(x)
    z1, l1 = raw.forward(x)
    np.testing.assert_array_equal(z0, z1)
    np.testing.assert_array_equal(l0, l1)
    ema = ck.load_model(path)
    for k, p in ema.params.items():
        np.testing.assert_array_equal(p, opt.ema[k])
    assert ema.initialized
    assert not [p for p in path.parent.iterdir() if p.name != "checkpoint.h5"]  # no temp left


def test_adamax_state_and_the_new_layers_round_trip(tmp_path, rng):
    """An Adamax state (group u/, hparams optimizer="adamax") and a model with a periodic
    convolution and shuffled channels come back exactly; Adam refuses the Adamax state."""
    for conv in ("periodic", "shuffle"):
        cfg = FlowConfig((8, 8, 1), 2, 1, 4, conv=conv, coupling="additive", dtype="float64")
        model = FlowModel(cfg, seed=4)
        model.initialize(rng.uniform(-0.5, 0.5, (8, 8, 8, 1)))
        randomize_params(model, rng, 0.05)
        opt = Adamax(model.params, lr=1e-3, ema_decay=0.9)
        for _ in range(2):
            opt.step({k: rng.standard_normal(p.shape) for k, p in model.params.items()})
        path = tmp_path / f"{conv}.h5"
        ck.save_checkpoint(path, model, optimizer=opt)
        with h5py.File(path, "r") as f:
            assert "u" in f["optimizer"] and "v" not in f["optimizer"]
        c = ck.read_checkpoint(path)
        assert c.optimizer_state["hparams"]["optimizer"] == "adamax"
        fresh = Adamax({k: p.copy() for k, p in model.params.items()}, lr=1e-3, ema_decay=0.9)
        fresh.load_state_dict(c.optimizer_state)
        for k in model.params:
            np.testing.assert_array_equal(fresh.u[k], opt.u[k])
            np.testing.assert_array_equal(fresh.m[k], opt.m[k])
        with pytest.raises(ValueError, match="'adamax' optimizer, not 'adam'"):
            Adam(dict(model.params)).load_state_dict(c.optimizer_state)
        loaded = ck.load_model(path, use_ema=False)
        x = rng.uniform(-0.5, 0.5, (2, 8, 8, 1))
        np.testing.assert_array_equal(loaded.forward(x)[0], model.forward(x)[0])


def test_a_checkpoint_written_before_adamax_loads_as_adam(tmp_path, rng):
    """Files written before the optimizer was named (hparams without "optimizer") are Adam's."""
    model, opt, ts, metrics, _ = trained_state(rng)
    state = opt.state_dict()
    del state["hparams"]["optimizer"]
    ckpt = ck.Checkpoint(
        model_config=model.config.to_dict(),
        model_seed=5,
        model_state=model.state_dict(),
        optimizer_state=state,
        train_state=ts,
        train_config={"steps": 10},
        metrics=metrics,
    )
    ck.write_checkpoint(tmp_path / "old.h5", ckpt)
    c = ck.read_checkpoint(tmp_path / "old.h5")
    assert "optimizer" not in c.optimizer_state["hparams"]
    again = Adam({k: p.copy() for k, p in model.params.items()}, ema_decay=0.99)
    again.load_state_dict(c.optimizer_state)
    assert again.t == 3
    for k in model.params:
        np.testing.assert_array_equal(again.v[k], opt.v[k])


def test_model_only_checkpoint(tmp_path, rng):
    model, *_ = trained_state(rng)
    ck.save_checkpoint(tmp_path / "m.h5", model)
    c = ck.read_checkpoint(tmp_path / "m.h5")
    assert c.optimizer_state is None and c.train_state is None and c.metrics == {}
    loaded = ck.load_model(tmp_path / "m.h5")
    for k, p in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], p)


def test_crash_during_write_leaves_previous_checkpoint_intact(tmp_path, rng, monkeypatch):
    path = tmp_path / "checkpoint.h5"
    model, opt, *_ = save(path, rng)
    before = path.read_bytes()
    expected = model.state_dict()

    calls = {"n": 0}
    real = ck._write_group

    def crashing(group, arrays):
        calls["n"] += 1
        if calls["n"] == 2:  # after the parameters were written, during the buffers
            raise OSError("simulated crash (disk full) in the middle of the write")
        real(group, arrays)

    monkeypatch.setattr(ck, "_write_group", crashing)
    for p in model.params.values():
        p += 1.0  # a different state that must NOT end up in the file
    with pytest.raises(OSError, match="simulated crash"):
        ck.save_checkpoint(path, model, optimizer=opt)
    assert calls["n"] == 2
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.h5"]  # temp file removed
    c = ck.read_checkpoint(path)
    for k, v in expected.items():
        np.testing.assert_array_equal(c.model_state[k], v)


def test_crash_in_replace_keeps_old_file(tmp_path, rng, monkeypatch):
    path = tmp_path / "checkpoint.h5"
    model, *_ = save(path, rng)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="before the rename"):
        ck.save_checkpoint(path, model)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.h5"]


def test_truncated_file(tmp_path, rng):
    path = tmp_path / "checkpoint.h5"
    save(path, rng)
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cannot be opened as HDF5|truncated"):
            ck.read_checkpoint(bad)


def test_foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(CheckpointError, match="cannot be opened as HDF5"):
        ck.read_checkpoint(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("weights", data=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a flownp checkpoint"):
        ck.load_model(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.read_checkpoint(tmp_path / "missing.h5")
    with pytest.raises(CheckpointError, match="not a file"):
        ck.read_checkpoint(tmp_path)


@contextlib.contextmanager
def edited(path, resign=True):
    """Open ``path`` for editing; afterwards store fresh checksums (a deliberate, consistent
    edit, to reach the checks behind the checksum verification) unless ``resign`` is False."""
    with h5py.File(path, "r+") as f:
        yield f
        if resign:
            del f[ck.CHECKSUMS]
            del f.attrs[ck.CHECKSUMS_ATTR]
            ck._add_checksums(f)


def test_unknown_version_and_missing_parts(tmp_path, rng):
    path = tmp_path / "c.h5"
    save(path, rng)
    with edited(path) as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        ck.read_checkpoint(path)
    save(path, rng)
    with edited(path) as f:
        del f["model/buffers"]
    with pytest.raises(CheckpointError, match="incomplete"):
        ck.read_checkpoint(path)
    save(path, rng)
    with edited(path) as f:
        del f["model/params/prior/mean"]
    with pytest.raises(CheckpointError, match="does not match"):
        ck.load_model(path)
    save(path, rng)
    with edited(path) as f:
        f["config"].attrs["model"] = '{"levels": 0}'
    with pytest.raises(CheckpointError, match="invalid model configuration"):
        ck.load_model(path)


def _bool_to_int8(f):
    """The same value 1 with the datatype int8 instead of the boolean enum."""
    key = "model/buffers/level0/step0/actnorm/initialized"
    assert f[key].dtype == np.bool_
    del f[key]
    f.create_dataset(key, data=np.int8(1))


@pytest.mark.parametrize(
    ("edit", "part"),
    [
        (lambda f: f["model/params/prior/mean"].__setitem__((), 0.5), "/model/params/prior/mean"),
        (lambda f: f["optimizer/v/prior/mean"].__setitem__((), 0.5), "/optimizer/v/prior/mean"),
        (lambda f: f["config"].attrs.__setitem__("model_seed", 6), "attributes of /config"),
        (lambda f: f["state"].attrs.__setitem__("step", 4), "attributes of /state"),
        (lambda f: f.attrs.__setitem__("created", "yesterday"), "attributes of /"),
        (lambda f: f.__delitem__("metrics/eval/bpd"), "/metrics/eval/bpd is missing"),
        (lambda f: f.create_dataset("model/params/extra", data=1.0), "not in the checksum"),
        (_bool_to_int8, "/model/buffers/level0/step0/actnorm/initialized is damaged"),
        (lambda f: f.__delitem__(ck.CHECKSUMS), "checksum table is missing"),
        (lambda f: f.attrs.__setitem__(ck.CHECKSUMS_ATTR, "0" * 64), "checksum table is damaged"),
    ],
)
def test_any_edit_without_new_checksums_is_refused_naming_the_part(tmp_path, rng, edit, part):
    path = tmp_path / "c.h5"
    save(path, rng)
    with edited(path, resign=False) as f:
        edit(f)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        ck.read_checkpoint(path)
    assert part in str(info.value)


def test_version_1_files_load_only_when_asked(tmp_path, rng):
    path = tmp_path / "old.h5"
    model, *_ = save(path, rng)
    with edited(path, resign=False) as f:  # what a version-1 writer produced: no checksums
        del f[ck.CHECKSUMS]
        del f.attrs[ck.CHECKSUMS_ATTR]
        f.attrs["format_version"] = 1
    with pytest.raises(CheckpointError, match="cannot be verified.*allow_unverified=True"):
        ck.read_checkpoint(path)
    old = ck.read_checkpoint(path, allow_unverified=True)
    assert old.format_version == 1
    ck.write_checkpoint(tmp_path / "new.h5", old)  # re-saved: verified from now on
    new = ck.read_checkpoint(tmp_path / "new.h5")
    assert new.format_version == ck.FORMAT_VERSION
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(new.model_state[k], v)


def test_file_permissions_are_normal(tmp_path, rng):
    path = tmp_path / "c.h5"
    save(path, rng)
    assert os.stat(path).st_mode & 0o777 == 0o644
