"""flownp under a real MPI launcher (``mpiexec -n 2`` and ``-n 3``, oversubscribed on two
cores): the same run as one process, resume across process counts, Ctrl-C, a killed process,
disagreeing processes. Tiny models, every launch bounded by a timeout (the process group is
killed on expiry, so no test can hang).

Skipped with a reason where mpi4py or mpiexec is missing; with ``FLOWNP_REQUIRE_MPI=1`` (set by
``.ci/run``) that is a failure instead: CI must run these.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 240  # seconds: any launch taking longer is a failure (and is killed)


def _find_mpiexec() -> str | None:
    here = os.path.dirname(sys.executable)  # the environment's own launcher first
    return shutil.which("mpiexec", path=os.pathsep.join([here, os.environ.get("PATH", "")]))


def _unavailable() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install '.[mpi]')"
    if _find_mpiexec() is None:
        return "no mpiexec on PATH (pip install '.[mpi]' provides one)"
    return None


@pytest.fixture(autouse=True, scope="module")
def _mpi_available():
    """Before every fixture of this module (module scope, autouse): the module-scoped runs
    below launch ``mpiexec`` and must not start where it is missing."""
    reason = _unavailable()
    if reason is None:
        return
    if os.environ.get("FLOWNP_REQUIRE_MPI") == "1":
        pytest.fail(f"FLOWNP_REQUIRE_MPI=1 but {reason}")
    pytest.skip(reason)


def _env() -> dict[str, str]:
    """The environment of a launch: no launcher variables of an enclosing job."""
    drop = ("PMI_", "OMPI_", "MV2_", "SLURM_", "PMIX_", "FLUX_", "MPI_LOCAL", "HYDRA_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def _command(n: int, args: tuple[str, ...]) -> list[str]:
    return [_find_mpiexec(), "-n", str(n), sys.executable, "-m", "flownp", *args]


def start(n: int, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``mpiexec -n N python -m flownp ARGS`` in ``cwd``, started in its own process group
    (:func:`finish` waits for it with a timeout)."""
    return subprocess.Popen(
        _command(n, args),
        cwd=cwd,
        env={**_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Wait for ``proc``; on ``timeout`` kill its whole process group and fail the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args[1:])} still running after {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch(
    n: int, *args: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT
) -> subprocess.CompletedProcess:
    """``mpiexec -n N python -m flownp ARGS`` to its end (at most ``timeout`` seconds)."""
    return finish(start(n, *args, cwd=cwd), timeout)


def test_commands_of_one_process_refuse_several(tmp_path):
    out = launch(2, "verify", cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "one process only" in lines[0], out.stderr


def test_disagreeing_processes_stop_at_start_with_one_line(tmp_path):
    """Different options on different processes (mpiexec's MPMD syntax)."""
    cmd = [_find_mpiexec(), "-n", "1", sys.executable, "-m", "flownp", "train", "--steps", "2"]
    cmd += [":", "-n", "2", sys.executable, "-m", "flownp", "train", "--steps", "3"]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "disagree on options" in lines[0] and "--steps 2" in lines[0]
    assert "--steps 3" in lines[0] and "process 1" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing was written


# ---------------------------------------------------------------------- a tiny trained model
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of a tiny model trained for a few steps on 8x8 synthetic data (in this
    process: no MPI needed)."""
    from flownp.model import FlowConfig
    from flownp.testing import rectangles_dataset
    from flownp.train import TrainConfig, Trainer

    folder = tmp_path_factory.mktemp("tiny")
    data = rectangles_dataset(96, 32, 0, (8, 8, 1))
    np.savez(folder / "data.npz", train=data.train, test=data.test)
    mc = FlowConfig(image_shape=(8, 8, 1), levels=2, depth=1, width=8, dtype="float32")
    tc = TrainConfig(
        dataset=f"array:{folder / 'data.npz'}",
        steps=4,
        batch_size=16,
        init_batch_size=32,
        eval_every=0,
        checkpoint_every=0,
        stability_images=0,
    )
    Trainer(mc, tc, out_dir=folder / "run").run()
    return folder / "run" / "checkpoint.h5"


def test_sample_on_three_processes_draws_the_same_images_as_one(tmp_path, tiny_checkpoint):
    """Each process inverts its share of every batch of the one latent stream; process 0
    gathers and writes: the images of one process."""
    common = ["sample", str(tiny_checkpoint), "-n", "50", "--seed", "7", "--no-ema"]
    one = launch(1, *common, "--out", "one.png", "--npz", "one.npz", cwd=tmp_path)
    three = launch(3, *common, "--out", "three.png", "--npz", "three.npz", cwd=tmp_path)
    assert one.returncode == 0 and three.returncode == 0, one.stderr + three.stderr
    a = np.load(tmp_path / "one.npz")["images"]
    b = np.load(tmp_path / "three.npz")["images"]
    assert a.shape == (50, 8, 8, 1) and b.shape == a.shape
    # per image the same computation on fewer images: at most a pixel at a bin's edge differs
    differ = np.abs(a.astype(int) - b.astype(int))
    assert differ.max() <= 1 and np.count_nonzero(differ) <= 2
    assert three.stdout.count("50 samples") == 1  # process 0 speaks, once


# ---------------------------------------------------------------------- training
TINY = (
    "--levels", "2", "--depth", "1", "--width", "8", "--init-batch-size", "32",
    "--eval-every", "0", "--eval-size", "16", "--no-progress", "--seed", "4",
)  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """``data.npz`` (8x8 synthetic images) and ``other.npz`` (the same shapes, other images)."""
    from flownp.testing import rectangles_dataset

    folder = tmp_path_factory.mktemp("data")
    for name, seed in (("data.npz", 0), ("other.npz", 1)):
        d = rectangles_dataset(192, 48, seed, (8, 8, 1))
        np.savez(folder / name, train=d.train, test=d.test)
    return folder


def train(n, data_dir, out, *extra, steps=50, dtype="float64", batch=16, data="data.npz"):
    args = ("train", "--dataset", f"array:{data_dir / data}", *TINY, "--dtype", dtype)
    args += ("--batch-size", str(batch), "--steps", str(steps), "--out", str(out), *extra)
    return launch(n, *args, cwd=data_dir)


def column(run: Path, name: str = "bpd") -> np.ndarray:
    import csv

    with open(run / "metrics.csv") as fh:
        return np.array([float(row[name] or "nan") for row in csv.DictReader(fh)])


@pytest.fixture(scope="module")
def float64_runs(data_dir):
    """The same 50-step float64 run on 1, 2 and 3 processes (checkpoints every 25 steps)."""
    runs = {}
    for n in (1, 2, 3):
        out = data_dir / f"f64-{n}"
        res = train(n, data_dir, out, "--checkpoint-every", "25", "--batch-size", "15")
        assert res.returncode == 0, res.stderr
        runs[n] = (out, res)
    return runs


def test_float64_runs_on_two_and_three_processes_are_the_one_process_run(float64_runs):
    """Per-step training losses within 1e-10 (relative) over 50 steps; a batch of 15 images
    is split 8 + 7 and 5 + 5 + 5 (unequal shares weighted exactly); every decision equal."""
    base = column(float64_runs[1][0])
    assert len(base) == 50 and np.isfinite(base).all()
    for n in (2, 3):
        run = float64_runs[n][0]
        got = column(run)
        assert len(got) == 50
        assert np.max(np.abs(got - base) / np.abs(base)) <= 1e-10, n
        for name in ("lr", "rejected", "epoch"):
            np.testing.assert_array_equal(column(run, name), column(float64_runs[1][0], name))
        np.testing.assert_allclose(
            column(run, "grad_norm"), column(float64_runs[1][0], "grad_norm"), rtol=1e-10
        )


def test_only_process_zero_speaks_and_threads_share_the_node(float64_runs):
    from flownp.threads import usable_cpus

    for n in (2, 3):
        out = float64_runs[n][1]
        assert out.stdout.count("run folder:") == 1 and out.stdout.count("done:") == 1
        assert out.stderr.count("inverse stability") == 2  # steps 25 and 50, once each
        assert f"{n} processes, {max(1, usable_cpus() // n)} thread(s)" in out.stdout


def test_checkpoint_of_three_processes_evaluates_alone_and_on_two(float64_runs):
    """The 3-process checkpoint loads in one process; ``flownp evaluate`` on 1 and on 2
    processes prints the held-out bits/dim the run measured at its end."""
    run = float64_runs[3][0]
    heldout = column(run, "heldout_bpd")
    final = heldout[np.isfinite(heldout)][-1]
    for n in (1, 2):
        out = launch(n, "evaluate", str(run / "checkpoint.h5"), "--no-progress", cwd=run)
        assert out.returncode == 0, out.stderr
        assert f"bits/dim: {final:.4f}" in out.stdout
        assert out.stdout.count("bits/dim:") == 1


def test_float32_runs_agree_to_1e4_bits_per_dim_after_200_steps(data_dir):
    """float32: the processes' shares round differently from the whole batch (about 1e-7
    per step); in a stable regime (a small learning rate) that stays far below 1e-4 bits/dim
    over 200 steps. (Chaotic training amplifies such differences, as any change of rounding:
    docs/distributed.md.)"""
    runs = {}
    for n in (1, 2, 3):
        out = data_dir / f"f32-{n}"
        res = train(n, data_dir, out, "--lr", "3e-4", steps=200, dtype="float32", batch=32)
        assert res.returncode == 0, res.stderr
        runs[n] = column(out)
    assert len(runs[1]) == 200 and runs[1][-1] < runs[1][0] - 1.0  # it learns
    for n in (2, 3):
        assert np.max(np.abs(runs[n] - runs[1])) <= 1e-4, n


@pytest.mark.parametrize("first, then", [(1, 2), (2, 1), (2, 3)])
def test_resume_on_another_number_of_processes(data_dir, float64_runs, first, then):
    """A checkpoint of step 25 written by ``first`` processes, resumed on ``then``: steps
    26-50 as the uninterrupted run's."""
    out = data_dir / f"resume-{first}-{then}"
    res = train(first, data_dir, out, "--batch-size", "15", steps=25)
    assert res.returncode == 0, res.stderr
    args = ("train", "--resume", str(out / "checkpoint.h5"), "--steps", "50", "--no-progress")
    res = launch(then, *args, cwd=data_dir)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stdout and "at step 25 of 50" in res.stdout
    got, base = column(out), column(float64_runs[1][0])
    assert len(got) == 50
    assert np.max(np.abs(got - base) / np.abs(base)) <= 1e-10


def test_processes_training_on_different_data_stop_at_start(data_dir, tmp_path):
    """The same command, but ``data.npz`` holds other images on process 1 (a stale copy on
    another node: here another working folder): the fingerprints differ, one line, exit 2."""
    for name, src in (("a", "data.npz"), ("b", "other.npz")):
        (tmp_path / name).mkdir()
        shutil.copy(data_dir / src, tmp_path / name / "data.npz")
    args = ("train", *TINY, "--dataset", "array:data.npz", "--steps", "2")
    args += ("--out", str(tmp_path / "run"))
    cmd = [_find_mpiexec(), "-n", "1", "-wdir", str(tmp_path / "a")] + _command(1, args)[3:]
    cmd += [":", "-n", "1", "-wdir", str(tmp_path / "b")] + _command(1, args)[3:]
    out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "disagree on the training data" in lines[0] and "process 1" in lines[0]
    assert not (tmp_path / "run" / "checkpoint.h5").exists()


def test_process_zero_cannot_write_every_process_exits_2_with_one_message(data_dir, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    res = train(2, data_dir, tmp_path / "a-file" / "run", steps=5)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the run folder" in lines[0], res.stderr


# ---------------------------------------------------------------------- faults
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``path`` exists (the run reached a checkpoint) while ``proc`` runs."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended early ({proc.returncode}):\n{out}\n{err}")
        if time.monotonic() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {path.name} after {timeout} s")
        time.sleep(0.1)


def _long_run(n: int, data_dir: Path, out: Path, mark: str) -> subprocess.Popen:
    args = ("train", "--dataset", f"array:{data_dir / 'data.npz'}", *TINY, "--batch-size", "16")
    args += ("--steps", "100000", "--checkpoint-every", "10", "--time-limit", "150")
    return start(n, *args, "--out", str(out), cwd=data_dir, env={"FLOWNP_TEST_MARK": mark})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_to_mpiexec_stops_every_process_after_the_same_step(data_dir, tmp_path, sig):
    """The launcher passes the signal on; the step's reduction carries it, so every process
    stops after the same step; process 0 saves; exit 130; the run resumes."""
    out = tmp_path / "run"
    proc = _long_run(2, data_dir, out, "ctrl-c")
    _wait_for(out / "metrics.csv", proc)  # step 10 is done
    proc.send_signal(sig)
    res = finish(proc, timeout=60)
    assert res.returncode == 130, res.stderr
    lines = [line for line in res.stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1, res.stderr
    assert signal.Signals(sig).name in lines[0] and "process 1" not in res.stderr
    from flownp.checkpoint import read_checkpoint

    step = read_checkpoint(out / "checkpoint.h5").train_state["step"]
    assert f"stopped after step {step} of 100000" in lines[0]
    assert len(column(out)) == step  # the metrics of every step, saved with it
    args = ("train", "--resume", str(out / "checkpoint.h5"), "--steps", str(step + 3))
    res = launch(1, *args, "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(column(out)) == step + 3


def _pids_of(mark: str, rank: int) -> list[int]:
    """Processes started with ``FLOWNP_TEST_MARK=mark`` as MPI rank ``rank``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FLOWNP_TEST_MARK={mark}".encode() in env and f"PMI_RANK={rank}".encode() in env:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_process_ends_the_job_and_the_last_checkpoint_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    mark = f"kill-{os.getpid()}"
    proc = _long_run(3, data_dir, out, mark)
    _wait_for(out / "metrics.csv", proc)
    pids = _pids_of(mark, 1)
    assert len(pids) == 1, pids
    t0 = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    res = finish(proc, timeout=60)  # the whole job ends within 60 s
    assert res.returncode != 0 and time.monotonic() - t0 < 60
    from flownp.checkpoint import read_checkpoint

    step = read_checkpoint(out / "checkpoint.h5").train_state["step"]  # intact
    assert step >= 10 and step % 10 == 0
    args = ("train", "--resume", str(out / "checkpoint.h5"), "--steps", str(step + 3))
    res = launch(2, *args, "--no-progress", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(column(out)) == step + 3


def test_class_conditional_run_on_two_processes_is_the_one_process_run(tmp_path):
    """Each share of a batch carries its labels: a class-conditional run with the classifier
    term (float64, 20 steps, batch 15 split 8 + 7) has the one-process losses, the same parts
    of the loss and the same held-out accuracies; ``flownp evaluate`` on two processes prints
    the run's own final numbers."""
    from flownp.checkpoint import read_checkpoint
    from flownp.testing import rectangles_dataset

    d = rectangles_dataset(192, 48, 0, (8, 8, 1))
    labels = np.arange(240) % 3
    np.savez(tmp_path / "l.npz", x_train=d.train, y_train=labels[:192], x_test=d.test,
             y_test=labels[192:])  # fmt: skip
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"c{n}"
        res = train(n, tmp_path, out, "--class-conditional", "--weight-y", "0.3",
                    "--batch-size", "15", "--eval-every", "10", steps=20, data="l.npz")  # fmt: skip
        assert res.returncode == 0, res.stderr
        runs[n] = read_checkpoint(out / "checkpoint.h5").metrics
    for table, col in (("train", "bpd"), ("classifier", "bits_y"), ("classifier", "bits_x")):
        a, b = runs[1][table][col], runs[2][table][col]
        assert len(a) == 20 and np.max(np.abs(b - a) / np.abs(a)) <= 1e-10, (table, col)
    np.testing.assert_allclose(runs[2]["classes"]["accuracy"], runs[1]["classes"]["accuracy"])
    out = launch(2, "evaluate", str(tmp_path / "c2" / "checkpoint.h5"), "--no-progress",
                 cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    acc = runs[2]["classes"]["accuracy"][-1]
    assert f"generative classifier accuracy (argmax_y log p(x | y)): {acc:.2%}" in out.stdout


# ---------------------------------------------------------------------- experiment grids
def test_a_grid_on_two_processes_writes_the_serial_grids_report(data_dir, tmp_path):
    """Four runs dealt to two processes (each trains alone, one thread): the report equals
    the one-process grid's but for the wall-clock columns, every run's numbers bit for bit;
    the grid stays resumable."""
    import json

    grid = ("experiment", "--dataset", f"array:{data_dir / 'data.npz'}", "--conv", "cinc,1x1")
    grid += ("--coupling", "affine", "--depth", "1", "--seeds", "2", "--levels", "1")
    grid += ("--width", "8", "--batch-size", "16", "--init-batch-size", "32", "--eval-every")
    grid += ("2", "--eval-size", "16", "--budget", "steps", "--steps", "6")
    one = launch(1, *grid, "--out", "one", cwd=tmp_path)
    two = launch(2, *grid, "--out", "two", cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "4 to train (0 partially trained) on 2 processes" in two.stdout
    assert two.stdout.count("(process 1)") == 2  # runs 2 and 4, reported by process 0
    a = (tmp_path / "one" / "report" / "report.md").read_text()
    b = (tmp_path / "two" / "report" / "report.md").read_text()
    from verification.bench_distributed import report_without_clock

    assert report_without_clock(a) == report_without_clock(b)
    assert report_without_clock(a) != report_without_clock(a.replace("8.", "9."))
    for path in (tmp_path / "one").glob("runs/*/*/seed*/result.json"):
        other = tmp_path / "two" / path.relative_to(tmp_path / "one")
        r1, r2 = json.loads(path.read_text()), json.loads(other.read_text())
        assert r1["heldout_bpd"] == r2["heldout_bpd"] and r1["curve"]["bpd"] == r2["curve"]["bpd"]
    again = launch(2, *grid, "--out", "two", cwd=tmp_path)
    assert again.returncode == 0 and "training" not in again.stdout
