"""Faults a careful user or an adversary can provoke: corrupt checkpoints, full disks, killed
writers, divergence, Ctrl-C / SIGTERM, bad options, singular or broken weights.

The corruption fuzz runs ``FLOWNP_FUZZ_CASES`` cases (default 40; the measured runs in
docs/reliability.md used 300 and 1000) on a small checkpoint, or on the checkpoint file
``FLOWNP_FUZZ_FILE`` (read only): ``FLOWNP_FUZZ_CASES=300 python3 -m pytest -q -s
tests/test_reliability.py -k fuzz``.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flownp import checkpoint as ck
from flownp import cli, figures, files
from flownp import train as T
from flownp.errors import (
    CheckpointError,
    DataError,
    NonFiniteError,
    SingularKernelError,
    UsageError,
)
from flownp.model import FlowConfig, FlowModel
from flownp.optim import Adam
from flownp.testing import rectangles_dataset
from flownp.train import step as step_module

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 1)


def make_data(n_train=96, n_test=32, seed=0):
    return rectangles_dataset(n_train, n_test, seed, SHAPE)


def tiny_model(**kw):
    kw = {"levels": 1, "depth": 2, "width": 8, "coupling": "affine", **kw}
    return FlowConfig(image_shape=SHAPE, dtype="float32", **kw)


def tiny_train(**kw):
    kw = {
        "steps": 6,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "init_batch_size": 32,
        "eval_every": 0,
        "checkpoint_every": 3,
        "stability_images": 0,
        "seed": 4,
        **kw,
    }
    return T.TrainConfig(**kw)


def quiet(trainer, messages=None):
    trainer.log = (lambda m: None) if messages is None else messages.append
    return trainer


def small_checkpoint(path, rng):
    """A complete checkpoint (model, Adam with EMA, training state, metrics) of a tiny model."""
    model = FlowModel(FlowConfig(image_shape=(4, 4, 1), levels=1, depth=1, width=4), seed=1)
    model.initialize(rng.uniform(-0.5, 0.5, (8, 4, 4, 1)).astype(model.dtype))
    opt = Adam(model.params, lr=1e-3, ema_decay=0.9)
    opt.step({k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in model.params.items()})
    state = {
        "step": 1,
        "epoch": 0,
        "position": 16,
        "consecutive_bad": 0,
        "rejected_total": 0,
        "elapsed": 0.5,
        "rng_state": np.random.default_rng(3).bit_generator.state,
        "history": [],
    }
    metrics = {"train": {"step": [1.0], "bpd": [7.5]}}
    ck.save_checkpoint(
        path, model, optimizer=opt, train_state=state, train_config={"steps": 9}, metrics=metrics
    )
    return ck.read_checkpoint(path)


def same_content(a: ck.Checkpoint, b: ck.Checkpoint) -> bool:
    """Everything a checkpoint carries, compared exactly (dtype, shape, bits)."""

    def arrays_equal(x, y):
        if (x is None) != (y is None):
            return False
        if x is None:
            return True
        return x.keys() == y.keys() and all(
            x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k], equal_nan=True) for k in x
        )

    oa, ob = a.optimizer_state or {}, b.optimizer_state or {}
    return (
        a.model_config == b.model_config
        and a.model_seed == b.model_seed
        and a.train_config == b.train_config
        and a.train_state == b.train_state
        and a.attrs == b.attrs
        and arrays_equal(a.model_state, b.model_state)
        and oa.get("t") == ob.get("t")
        and oa.get("hparams") == ob.get("hparams")
        and all(arrays_equal(oa.get(n), ob.get(n)) for n in ("m", "v", "ema"))
        and a.metrics.keys() == b.metrics.keys()
        and all(arrays_equal(a.metrics[t], b.metrics[t]) for t in a.metrics)
    )


def corrupt(data: bytes, rng: np.random.Generator, case: int) -> bytes:
    """One of three corruptions: a flipped bit, 4 random bytes, a random run of 1..64 bytes."""
    buf = bytearray(data)
    kind = case % 3
    if kind == 0:
        buf[rng.integers(len(buf))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        for pos in rng.integers(0, len(buf), 4):
            buf[pos] = int(rng.integers(256))
    else:
        pos, n = int(rng.integers(len(buf))), int(rng.integers(1, 65))
        run = rng.integers(0, 256, n, dtype=np.uint8).tobytes()[: len(buf) - pos]
        buf[pos : pos + len(run)] = run
    return bytes(buf)


# ---------------------------------------------------------------------- reads verify
def test_corruption_fuzz_no_traceback_no_silent_load(tmp_path, rng):
    cases = int(os.environ.get("FLOWNP_FUZZ_CASES", "40"))
    path = Path(os.environ.get("FLOWNP_FUZZ_FILE", tmp_path / "c.h5"))
    original = ck.read_checkpoint(path) if path.exists() else small_checkpoint(path, rng)
    data = path.read_bytes()
    fuzz = np.random.default_rng(2024)
    outcome = {"refused": 0, "unchanged": 0}
    silent, tracebacks = [], []
    bad = tmp_path / "bad.h5"
    for case in range(cases):
        bad.write_bytes(corrupt(data, fuzz, case))
        try:
            loaded = ck.read_checkpoint(bad)
            ck.model_from_checkpoint(loaded)
        except CheckpointError:
            outcome["refused"] += 1
            continue
        except Exception as exc:  # anything else is a traceback the user would see
            tracebacks.append((case, repr(exc)))
            continue
        if same_content(loaded, original):
            outcome["unchanged"] += 1  # the bytes hit unused space: what loads is the original
        else:
            silent.append(case)
    print(f"fuzz: {cases} cases, {outcome}, silent {len(silent)}, tracebacks {len(tracebacks)}")
    assert not tracebacks
    assert not silent
    assert outcome["refused"] > cases // 3  # the corruptions do reach the data


def test_every_dataset_byte_is_covered(tmp_path, rng):
    """Flip one bit in the middle of every dataset's raw bytes: each one is refused, naming the
    dataset (no dataset is outside the checksum table)."""
    import h5py

    path = tmp_path / "c.h5"
    small_checkpoint(path, rng)
    data = path.read_bytes()
    spots = []
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name != ck.CHECKSUMS and obj.id.get_offset():
                spots.append((name, obj.id.get_offset() + obj.id.get_storage_size() // 2))

        f.visititems(visit)
    assert len(spots) > 20
    for name, offset in spots:
        buf = bytearray(data)
        buf[offset] ^= 0x10
        path.write_bytes(bytes(buf))
        with pytest.raises(CheckpointError, match=f"dataset /{name} is damaged"):
            ck.read_checkpoint(path)


# ---------------------------------------------------------------------- writes fail safe
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("call", ["mkstemp", "write-1", "write-3", "fsync", "chmod", "replace"])
def test_disk_full_at_each_write_call_loses_nothing(tmp_path, rng, monkeypatch, call):
    path = tmp_path / "checkpoint.h5"
    small_checkpoint(path, rng)
    before = path.read_bytes()
    model = ck.model_from_checkpoint(ck.read_checkpoint(path), use_ema=False)
    for p in model.params.values():
        p += 1.0  # a new state that must not half-replace the old one
    if call.startswith("write"):
        fail_at, calls, real_write = int(call.split("-")[1]), [0], os.write

        def write(fd, data):  # short writes of 4 KiB, then the disk is full
            calls[0] += 1
            if calls[0] == fail_at:
                _enospc()
            return real_write(fd, bytes(data[:4096]))

        monkeypatch.setattr(files.os, "write", write)
    elif call == "mkstemp":
        monkeypatch.setattr(files.tempfile, "mkstemp", _enospc)
    else:
        monkeypatch.setattr(files.os, call, _enospc)
    with pytest.raises(CheckpointError) as info:
        ck.save_checkpoint(path, model)
    msg = str(info.value)
    assert str(path) in msg and "No space left on device (ENOSPC)" in msg
    assert "\n" not in msg
    monkeypatch.undo()
    assert path.read_bytes() == before  # previous checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.h5"]  # no temp left
    ck.read_checkpoint(path)


def test_file_size_limit_on_a_real_filesystem(tmp_path, rng):
    """The kernel refuses the write (RLIMIT_FSIZE, EFBIG) in a child process: a clean
    CheckpointError, the previous file intact, no temp left (no root or mount needed)."""
    path = tmp_path / "checkpoint.h5"
    small_checkpoint(path, rng)
    before = path.read_bytes()
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from flownp import checkpoint as ck
from flownp.errors import CheckpointError
c = ck.read_checkpoint({str(path)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    ck.write_checkpoint({str(path)!r}, c)
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert f"cannot write checkpoint {path}: File too large (EFBIG)" in proc.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.h5"]


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path, rng):
    path = tmp_path / "checkpoint.h5"
    stale = [tmp_path / ".checkpoint.h5.abc123.tmp", tmp_path / ".checkpoint.h5.x_9.tmp"]
    for s in stale:
        s.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.h5.abc.tmp"  # another file's temporary: not ours to remove
    other.write_bytes(b"x")
    small_checkpoint(path, rng)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.h5.abc.tmp", "checkpoint.h5"]


def test_non_finite_state_is_never_written(tmp_path, rng):
    path = tmp_path / "checkpoint.h5"
    c = small_checkpoint(path, rng)
    before = path.read_bytes()
    key = next(iter(c.optimizer_state["ema"]))
    c.optimizer_state["ema"][key] = c.optimizer_state["ema"][key] * np.nan
    with pytest.raises(NonFiniteError, match=f"optimizer/ema/{key}"):
        ck.write_checkpoint(path, c)
    assert path.read_bytes() == before


# ---------------------------------------------------------------------- divergence
def test_real_divergence_keeps_a_usable_checkpoint(tmp_path):
    """lr 100 without warmup: the first update wrecks the model (finite loss and gradient,
    so it is applied), later steps are NaN. The folder keeps the initial state, which
    evaluates to a finite bits/dim, and the advice printed is accepted by --resume."""
    tr = quiet(
        T.Trainer(
            tiny_model(),
            tiny_train(steps=40, lr=100.0, warmup_steps=0, checkpoint_every=2),
            make_data(),
            out_dir=tmp_path,
        )
    )
    with pytest.raises(T.TrainingDiverged) as info:
        tr.run()
    msg = str(info.value)
    assert f"holds step {info.value.checkpoint_step}, the last usable state" in msg
    c = ck.read_checkpoint(tmp_path / "checkpoint.h5")
    assert c.train_state["step"] == info.value.checkpoint_step < tr.step
    for ema in (True, False):
        model = ck.model_from_checkpoint(c, use_ema=ema)
        assert np.isfinite(T.evaluate_bpd(model, make_data().test))
    assert "--resume" in msg and "--lr 0.001" in msg


def test_a_climbing_finite_loss_stops_training(tmp_path, monkeypatch):
    """A loss that climbs without becoming NaN (here: +200 bits/dim from step 13 on) is a
    blow-up: 5 steps above twice the recent level stop training; the checkpoint holds the
    last state before the climb."""
    tr = quiet(
        T.Trainer(
            tiny_model(), tiny_train(steps=40, checkpoint_every=4), make_data(), out_dir=tmp_path
        )
    )
    real = T.bpd_loss

    def climbing(z, logdet, **kw):
        loss, dz, dld = real(z, logdet, **kw)
        return (loss + 200.0 if tr.step >= 12 else loss), dz, dld

    monkeypatch.setattr(step_module, "bpd_loss", climbing)
    with pytest.raises(T.TrainingDiverged, match="5 bad steps in a row.*more than twice"):
        tr.run()
    assert tr.step == 17
    assert ck.read_checkpoint(tmp_path / "checkpoint.h5").train_state["step"] == 12


def test_single_spikes_do_not_stop_training(monkeypatch):
    tr = quiet(T.Trainer(tiny_model(), tiny_train(steps=30), make_data()))
    real = T.bpd_loss

    def spiky(z, logdet, **kw):
        loss, dz, dld = real(z, logdet, **kw)
        return (loss * 10 if tr.step in (14, 20, 21) else loss), dz, dld

    monkeypatch.setattr(step_module, "bpd_loss", spiky)
    result = tr.run()
    assert result.steps == 30 and result.rejected_total == 3
    rejected = np.asarray(tr.metrics["train"]["rejected"])
    np.testing.assert_array_equal(np.flatnonzero(rejected), [14, 20, 21])  # the spiked rows
    assert tr.optimizer.t == 27  # the spikes' updates were not applied


def test_loss_monitor_rule():
    m = T.LossMonitor(window=50, margin=1.0, min_history=10)
    for _ in range(9):
        m.add(3.0)
    assert not m.is_high(1e9)  # not judged before 10 losses
    m.add(3.0)
    assert m.level() == 3.0 and m.threshold() == 6.0
    assert m.is_high(6.01) and not m.is_high(6.0)
    small = T.LossMonitor()
    for _ in range(10):
        small.add(0.5)
    assert small.threshold() == 1.5  # at least 1 bit/dim above a small level


# ---------------------------------------------------------------------- signals
def test_sigterm_from_the_python_api_saves_after_the_step(tmp_path, monkeypatch):
    tr = quiet(
        T.Trainer(
            tiny_model(), tiny_train(steps=50, checkpoint_every=20), make_data(), out_dir=tmp_path
        )
    )
    real_step = tr.train_step

    def step_then_signal(x):
        if tr.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 7
        return real_step(x)

    monkeypatch.setattr(tr, "train_step", step_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(T.TrainingInterrupted, match="SIGTERM: stopped after step 7 of 50"):
        tr.run()
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    c = ck.read_checkpoint(tmp_path / "checkpoint.h5")
    assert c.train_state["step"] == 7 and c.optimizer_state["t"] == 7
    assert (tmp_path / "loss_curve.png").exists()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 7
    # --resume without --steps keeps the run's own target (50), not the CLI default
    resumed = T.Trainer.from_checkpoint(tmp_path / "checkpoint.h5", make_data())
    assert resumed.config.steps == 50 and resumed.step == 7


def test_ctrl_c_during_command_line_training_saves(tmp_path):
    """``flownp train`` on the bundled MNIST in a child process; SIGINT once the first
    checkpoint exists: exit 130, checkpoint of the last complete step, curves written."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "flownp", "train", "--levels", "1", "--depth", "2"]
    argv += ["--width", "16", "--batch-size", "16", "--eval-every", "0", "--no-progress"]
    argv += ["--steps", "100000", "--checkpoint-every", "100000", "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.h5").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # some steps
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, err
    c = ck.read_checkpoint(out / "checkpoint.h5")
    step = c.train_state["step"]
    assert step > 0
    assert f"stopped after step {step} of 100000" in err and "--resume" in err
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + step
    assert (out / "loss_curve.png").stat().st_size > 0


# ---------------------------------------------------------------------- run folders, options
def test_existing_run_folder_is_never_overwritten(tmp_path):
    tr = quiet(T.Trainer(tiny_model(), tiny_train(steps=2), make_data(), out_dir=tmp_path))
    tr.run()
    before = (tmp_path / "checkpoint.h5").read_bytes()
    with pytest.raises(UsageError, match="already holds a training run.*--overwrite"):
        T.Trainer(tiny_model(), tiny_train(steps=2), make_data(), out_dir=tmp_path)
    assert (tmp_path / "checkpoint.h5").read_bytes() == before
    quiet(
        T.Trainer(tiny_model(), tiny_train(steps=1), make_data(), out_dir=tmp_path, overwrite=True)
    ).run()
    assert ck.read_checkpoint(tmp_path / "checkpoint.h5").train_state["step"] == 1


def test_resume_with_new_lr_and_warmup_is_recorded(tmp_path):
    quiet(T.Trainer(tiny_model(), tiny_train(steps=4), make_data(), out_dir=tmp_path)).run()
    tr = T.Trainer.from_checkpoint(
        tmp_path / "checkpoint.h5", make_data(), lr=1e-4, warmup_steps=10, steps=6
    )
    assert tr.optimizer.lr == 1e-4 and tr.optimizer.warmup_start == 4
    assert tr.optimizer.lr_at(5) == pytest.approx(1e-5)  # the warmup restarts at the resume
    quiet(tr).run()
    c = ck.read_checkpoint(tmp_path / "checkpoint.h5")
    assert c.train_config["warmup_start"] == 4 and c.optimizer_state["hparams"]["lr"] == 1e-4
    (entry,) = c.train_state["history"]
    assert entry["step"] == 4
    assert entry["changes"] == {"steps": [4, 6], "lr": [3e-3, 1e-4], "warmup_steps": [2, 10]}


TINY = ["--levels", "1", "--depth", "2", "--width", "8", "--batch-size", "16"]
TINY += ["--init-batch-size", "32", "--eval-every", "0", "--no-progress"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--holdout", "0"], "argument --holdout: must be >= 1, got 0"),
        (["train", "--ema-decay", "1.5"], "argument --ema-decay: must be a finite number in"),
        (["train", "--max-grad-norm", "-1"], "argument --max-grad-norm: must be a finite"),
        (["train", "--seed", "-1"], "argument --seed: must be between 0 and"),
        (["train", "--seed", "99999999999999999999"], "argument --seed: must be between 0 and"),
        (["sample", "c.h5", "--seed", "99999999999999999999"], "argument --seed: must be between"),
        (["train", "--threads", "100000"], "argument --threads: must be between 1 and"),
        (["bench", "--threads", "0"], "argument --threads: must be between 1 and"),
        (["evaluate", "c.h5", "--threads", "0"], "argument --threads: must be between 1 and"),
        (["check-reference", "p.h5", "--rtol", "-1"], "argument --rtol: must be a finite"),
        (["check-reference", "p.h5", "--rtol", "nan"], "argument --rtol: must be a finite"),
        (["check-reference", "p.h5", "--rtol", "inf"], "argument --rtol: must be a finite"),
        (["check-reference", "p.h5", "--atol=-1e-9"], "argument --atol: must be a finite"),
        (["train", "--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
        (["train", "--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
        (["train", "--steps", "0"], "argument --steps: must be >= 1"),
        (["evaluate", "c.h5", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["evaluate", "c.h5", "--limit", "-5"], "argument --limit: must be >= 1, got -5"),
        (["sample", "c.h5", "-n", "0"], "argument -n/--num: must be >= 1"),
    ],
)
def test_bad_options_are_one_line_errors_with_exit_code_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "--help" in err


def test_run_folder_errors_on_the_command_line(tmp_path, fake_dataset, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["train", "--out", str(afile), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "2", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--steps", "2", "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {run / 'checkpoint.h5'}" in err
    assert cli.main(["train", "--steps", "3", "--out", str(run), "--overwrite", *TINY]) == 0
    # --resume keeps the run's own step target; --lr is accepted when resuming
    ckpt = run / "checkpoint.h5"
    assert cli.main(["train", "--resume", str(ckpt), "--lr", "1e-4", "--no-progress"]) == 0
    assert "at step 3 of 3" in capsys.readouterr().out
    assert ck.read_checkpoint(ckpt).train_config["lr"] == 1e-4


# ---------------------------------------------------------------------- linear algebra, NaN
def _saved_model(tmp_path, edit):
    model = FlowModel(FlowConfig(image_shape=(28, 28, 1), levels=1, depth=2, width=8), seed=0)
    model.initialize(np.random.default_rng(0).uniform(-0.5, 0.5, (8, 28, 28, 1)).astype("f4"))
    edit(model.params)
    path = tmp_path / "m.h5"
    ckpt = ck.Checkpoint(model.config.to_dict(), 0, model.state_dict(), train_config=None)
    path.write_bytes(ck.checkpoint_bytes(ckpt))  # unchecked, to reach the readers
    return model, path


@pytest.mark.parametrize("command", ["evaluate", "reconstruct", "sample"])
def test_singular_layer_is_a_named_error_in_every_command(tmp_path, capsys, command):
    def singular(params):
        params["level0/step1/conv/log_s"][0] = -1e4  # exp underflows to an exact 0

    _, path = _saved_model(tmp_path, singular)
    argv = {
        "evaluate": ["evaluate", str(path), "--no-progress", "--limit", "4"],
        "reconstruct": ["reconstruct", str(path), "--num-images", "4"],
        "sample": ["sample", str(path), "-n", "2", "--out", str(tmp_path / "s.png")],
    }[command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer level0/step1/conv" in err
    assert "singular" in err or "not invertible" in err


def test_nan_weights_are_named(tmp_path):
    def broken(params):
        params["level0/step0/conv/weight"][0, 0, 0, 0] = np.nan

    model, _ = _saved_model(tmp_path, broken)
    z = np.zeros((1, model.config.num_dims), dtype=model.dtype)
    with pytest.raises(NonFiniteError, match="layer level0/step0/conv: its parameter.*weight"):
        model.inverse(z)


def test_linalg_error_becomes_singular_kernel_error_naming_the_layer(monkeypatch):
    model = FlowModel(FlowConfig(image_shape=SHAPE, levels=1, depth=1, width=4), seed=0)
    conv = dict(model.flow)["level0/step0"]._layers["conv"]

    def boom(y, *a, **k):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(conv, "inverse", boom)
    with pytest.raises(SingularKernelError, match="layer level0/step0/conv: .*Singular matrix"):
        model.inverse(np.zeros((1, model.config.num_dims), dtype=model.dtype))


def test_backward_with_nan_upstream_gradient_is_an_error(rng):
    model = FlowModel(FlowConfig(image_shape=SHAPE, levels=1, depth=1, width=4), seed=0)
    x = rng.uniform(-0.5, 0.5, (2, *SHAPE)).astype(model.dtype)
    model.initialize(x)
    z, _ = model.forward(x)
    dz = np.zeros_like(z)
    dz[0, 3] = np.nan
    with pytest.raises(NonFiniteError, match="dz has 1 NaN/Inf"):
        model.backward(dz, np.zeros(2))
    model.forward(x)
    with pytest.raises(NonFiniteError, match="dlogdet"):
        model.backward(np.zeros_like(z), np.array([0.0, np.inf]))


def test_plot_with_only_rejected_steps_and_nan_evaluation(tmp_path):
    metrics = {
        "train": {"step": [1.0, 2.0], "bpd": [float("nan"), float("inf")], "rejected": [1, 1]},
        "eval": {"step": [2.0], "bpd": [float("nan")], "elapsed": [0.1]},
    }
    assert figures.plot_loss_curve(metrics, tmp_path / "c.png").stat().st_size > 0
    metrics["train"]["bpd"] = [7.0, float("nan")]
    metrics["train"]["rejected"] = [0, 1]
    assert figures.plot_loss_curve(metrics, tmp_path / "d.png").stat().st_size > 0


# ---------------------------------------------------------------------- data files
def _cifar_batch(path, labels):
    rows = np.zeros((len(labels), 3072), np.uint8)
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, b"labels": list(labels)}, f, protocol=2)


def test_cifar_label_out_of_range_and_stray_batch_are_rejected(tmp_path):
    from flownp.data import load_dataset

    for b in (1, 2):
        _cifar_batch(tmp_path / f"data_batch_{b}", [0, 9])
    _cifar_batch(tmp_path / "test_batch", [3])
    assert load_dataset(f"cifar10:{tmp_path}").train.shape == (4, 32, 32, 3)
    _cifar_batch(tmp_path / "data_batch_10", [1])
    with pytest.raises(DataError, match="data_batch_10 is not a CIFAR-10 file"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "data_batch_10").unlink()
    _cifar_batch(tmp_path / "data_batch_2", [0, 99])
    with pytest.raises(DataError, match="label 99 .*is outside 0..9"):
        load_dataset(f"cifar10:{tmp_path}")
