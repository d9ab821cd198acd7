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


@pytest.fixture(autouse=True)
def _mpi_available():
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


def launch(
    n: int, *args: str, cwd: Path, timeout: float = LAUNCH_TIMEOUT
) -> subprocess.CompletedProcess:
    """``mpiexec -n N python -m flownp ARGS`` in ``cwd``; the whole process group is killed
    when ``timeout`` expires (then the test fails)."""
    cmd = [_find_mpiexec(), "-n", str(n), sys.executable, "-m", "flownp", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:])} still running after {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
