"""The communicator layer of several processes (flownp.distributed), without MPI: launch
detection from the environment, batch shares, the flat buffer, the agreement check and the
error rules, the per-node thread default; several "processes" are threads here
(:class:`ThreadWorld`), the real thing runs under mpiexec in tests/test_mpi.py."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from flownp import distributed as D
from flownp.errors import CheckpointError, DataError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- launch detection
@pytest.mark.parametrize(
    "env, launcher, size, rank",
    [
        ({"PMI_SIZE": "3", "PMI_RANK": "2", "MPI_LOCALNRANKS": "3"}, "MPICH", 3, 2),
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}, "Open MPI", 4, 1),
        ({"MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_RANK": "0"}, "MVAPICH", 2, 0),
        ({"FLUX_JOB_SIZE": "8", "FLUX_TASK_RANK": "5"}, "Flux", 8, 5),
        (
            {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "6", "SLURM_PROCID": "4",
             "SLURM_NTASKS": "12", "SLURM_JOB_ID": "7"},
            "Slurm", 6, 4,
        ),
        ({"PMIX_RANK": "3"}, "PMIx", None, 3),
    ],
)  # fmt: skip
def test_launchers_are_recognised_from_their_environment(env, launcher, size, rank):
    launch = D.detect_launch(env)
    assert launch is not None and launcher in launch.launcher
    assert (launch.size, launch.rank) == (size, rank)


def test_no_launcher_and_a_slurm_batch_script_are_one_process():
    assert D.detect_launch({}) is None
    assert D.detect_launch({"HOME": "/x", "PATH": "/bin"}) is None
    # a batch script or salloc shell: a job, but not a job step started by srun
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_NNODES": "4"}
    assert D.detect_launch(batch) is None
    assert D.detect_launch({"PMI_SIZE": "1", "PMI_RANK": "0"}).size == 1


# ---------------------------------------------------------------------- shares
@pytest.mark.parametrize("n, size", [(64, 1), (64, 2), (64, 3), (10, 4), (5, 7), (1, 2)])
def test_shares_cover_the_batch_once_and_differ_by_at_most_one(n, size):
    parts = [D.share(n, r, size) for r in range(size)]
    covered = np.concatenate([np.arange(n)[s] for s in parts])
    np.testing.assert_array_equal(covered, np.arange(n))
    lengths = [s.stop - s.start for s in parts]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == n


# ---------------------------------------------------------------------- flat buffer
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_buffer_round_trip_is_exact(dtype):
    """One process gets back bit for bit the gradients and the float64 scalars it packed."""
    rng = np.random.default_rng(0)
    arrays = {
        "a/w": rng.standard_normal((3, 3, 2, 4)).astype(dtype),
        "b": rng.standard_normal(5).astype(dtype),
        "c": dtype(1e-30) * rng.standard_normal((2, 2)).astype(dtype),
    }
    fb = D.FlatBuffer({k: a.shape for k, a in arrays.items()}, ("loss_sum", "count"), dtype)
    words = 1 if dtype == np.float64 else 3
    assert fb.data.size == 72 + 5 + 4 + 2 * words and fb.data.dtype == dtype
    assert fb.nbytes == fb.data.size * np.dtype(dtype).itemsize
    loss_sum = float(np.sum(rng.random(64) * 3.0))  # a float64 with all 53 bits in use
    for value in (loss_sum, 1 / 3, 12345.678901234567, -2.5e-7, 0.0):
        buf = fb.pack(arrays, loss_sum=value, count=64)
        assert buf is fb.data
        out = {k: np.zeros_like(a) for k, a in arrays.items()}
        assert fb.unpack(out) == {"loss_sum": value, "count": 64.0}
        for k, a in arrays.items():
            np.testing.assert_array_equal(out[k], a)
    fb.pack(None, loss_sum=1.0, count=2)
    assert not fb.data[: fb.num_values].any()


def test_flat_buffer_sums_scalars_of_several_processes_closely():
    """Summed word by word (what an all-reduce does), float32 scalars keep about float32
    accuracy of the total, far better than the total's float32 rounding error would allow
    to matter for a loss."""
    rng = np.random.default_rng(1)
    fb = D.FlatBuffer({"g": (3,)}, ("loss_sum",), np.float32)
    parts = rng.random(3) * 100
    total = np.zeros_like(fb.data)
    for p in parts:
        total += fb.pack({"g": np.ones(3, np.float32)}, loss_sum=p)
    fb.data[...] = total
    got = fb.unpack({"g": np.zeros(3, np.float32)})["loss_sum"]
    assert abs(got - parts.sum()) <= 1e-6 * parts.sum()


def test_flat_buffer_refuses_other_keys_shapes_and_scalars():
    fb = D.FlatBuffer({"a": (2,), "b": (3,)}, ("s",))
    with pytest.raises(KeyError, match="differ"):
        fb.pack({"a": np.zeros(2)}, s=0)
    with pytest.raises(ValueError, match="shape"):
        fb.pack({"a": np.zeros(3), "b": np.zeros(3)}, s=0)
    with pytest.raises(KeyError, match="scalars"):
        fb.pack({"a": np.zeros(2), "b": np.zeros(3)}, t=0)


# ---------------------------------------------------------------------- several "processes"
class ThreadWorld:
    """``size`` communicators whose collectives meet at a barrier: each rank runs in its own
    thread (the interface of flownp.distributed.MpiComm, for tests without MPI)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.slots: list = [None] * size

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def run(self, fn):
        """``fn(comm)`` on every rank; returns the results (or raised exceptions) by rank."""
        out: list = [None] * self.size

        def target(r: int) -> None:
            try:
                out[r] = fn(self.comm(r))
            except BaseException as exc:  # returned for the test to look at
                out[r] = exc

        threads = [
            threading.Thread(target=target, args=(r,), name=f"rank-{r}") for r in range(self.size)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a rank hangs"
        return out


class ThreadComm(D.SerialComm):
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        super().__init__()
        self.world, self.rank, self.size = world, rank, world.size

    def allgather(self, obj):
        self.world.slots[self.rank] = obj
        self.world.barrier.wait()
        out = list(self.world.slots)
        self.world.barrier.wait()
        return out

    def bcast(self, obj):
        return self.allgather(obj)[0]

    def allreduce_sum(self, buf):
        total = np.sum(self.allgather(buf.copy()), axis=0)
        buf[...] = total
        return buf


def test_agree_passes_equal_fields_and_names_the_first_difference():
    world = ThreadWorld(3)
    same = world.run(lambda c: D.agree(c, {"options": "train --steps 2", "data": {"n": 5}}))
    assert same == [None, None, None]

    def differ(c):
        data = {"shape": [9, 8, 8, 1], "sha256": "ab" if c.rank != 2 else "cd"}
        D.agree(c, {"flownp version": {"version": "1"}, "training data": data})

    out = world.run(differ)
    assert all(isinstance(e, D.DistributedError) and D.is_collective(e) for e in out)
    messages = {str(e) for e in out}
    assert len(messages) == 1  # the same line on every process
    (msg,) = messages
    assert "training data sha256" in msg and '"ab" on process 0' in msg
    assert '"cd" on process 2' in msg and "\n" not in msg


def test_on_root_gives_everyone_the_result_or_the_root_error():
    world = ThreadWorld(3)
    assert world.run(lambda c: D.on_root(c, lambda: c.rank + 40)) == [40, 40, 40]

    def failing(c):
        def write():
            raise CheckpointError("cannot write run/checkpoint.h5: No space left on device")

        return D.on_root(c, write)

    out = world.run(failing)
    assert all(isinstance(e, CheckpointError) and D.is_collective(e) for e in out)
    assert len({str(e) for e in out}) == 1


def test_together_raises_the_lowest_failing_process_error_everywhere():
    world = ThreadWorld(3)

    def load(c):
        def body():
            if c.rank == 2:
                raise DataError("dataset 'array:/x.npz': file not found")
            return "data"

        return D.together(c, body)

    out = world.run(load)
    assert all(isinstance(e, DataError) and D.is_collective(e) for e in out)
    assert {str(e) for e in out} == {"process 2: dataset 'array:/x.npz': file not found"}
    assert world.run(lambda c: D.together(c, lambda: c.rank)) == [0, 1, 2]


def test_one_process_runs_the_function_itself_with_its_own_errors():
    comm = D.SerialComm()
    with pytest.raises(DataError) as info:
        D.together(comm, lambda: (_ for _ in ()).throw(DataError("bad")))
    assert not D.is_collective(info.value)
    assert D.on_root(comm, lambda: 3) == 3
    buf = np.arange(4.0)
    assert comm.allreduce_sum(buf) is buf and comm.reduce_calls == 1


class NodeComm(D.SerialComm):
    def __init__(self, size, local, cpus):
        super().__init__()
        self.size, self._local, self._cpus = size, local, cpus

    def local_size(self):
        return self._local

    def node_cpus(self):
        return self._cpus


@pytest.mark.parametrize(
    "size, local, cpus, expected",
    [(2, 2, 2, 1), (3, 3, 2, 1), (4, 2, 2, 1), (2, 2, 64, 32), (8, 4, 48, 12), (2, 1, 1, 1)],
)
def test_threads_per_process_share_the_node(monkeypatch, size, local, cpus, expected):
    monkeypatch.setattr(D, "_affinity", lambda: set(range(1000)))
    assert D.default_threads(NodeComm(size, local, cpus)) == expected
    monkeypatch.setattr(D, "_affinity", lambda: {0})  # a launcher bound this process to one CPU
    assert D.default_threads(NodeComm(size, local, cpus)) == 1


def test_one_process_keeps_every_usable_cpu():
    from flownp.threads import usable_cpus

    assert D.default_threads(D.SerialComm()) == usable_cpus()


# ---------------------------------------------------------------------- the plain install
def _flownp(args, env_extra, block_mpi4py=True):
    """``flownp ARGS`` in a fresh interpreter with ``env_extra``; with mpi4py made
    unimportable, as in a plain install. Prints whether mpi4py was loaded."""
    import os

    code = (
        "import sys\n"
        + ("sys.modules['mpi4py'] = None\n" if block_mpi4py else "")
        + "from flownp import cli\n"
        + "try:\n    rc = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        + "print('MPI4PY', 'mpi4py.MPI' in sys.modules)\nsys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "PMI_RANK")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plain_run_never_imports_mpi4py():
    for env in ({}, {"PMI_SIZE": "1", "PMI_RANK": "0"}):
        out = _flownp(["train", "--help"], env, block_mpi4py=False)
        assert out.returncode == 0, out.stderr
        assert "MPI4PY False" in out.stdout


def test_several_processes_without_mpi4py_is_one_line_naming_the_extra():
    out = _flownp(["train", "--steps", "1"], {"PMI_SIZE": "2", "PMI_RANK": "0"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "flownp[mpi]" in lines[0] and "2 processes" in lines[0]
    # the other processes say nothing: one line for the whole job
    out = _flownp(["train", "--steps", "1"], {"PMI_SIZE": "2", "PMI_RANK": "1"})
    assert out.returncode == 2 and out.stderr == ""


def test_the_mpi_extra_declares_mpi4py_and_an_mpi():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {d.split(">")[0].split("=")[0].strip() for d in extras["mpi"]}
    assert names == {"mpi4py", "mpich"}


# ---------------------------------------------------------------------- the loop on threads
def _tiny_trainer(comm, out_dir=None, **train):
    from flownp.model import FlowConfig
    from flownp.testing import rectangles_dataset
    from flownp.train import TrainConfig, Trainer

    mc = FlowConfig(image_shape=(8, 8, 1), levels=2, depth=1, width=8, dtype="float64")
    kw = {"steps": 6, "batch_size": 15, "init_batch_size": 32, "eval_every": 0, "seed": 4}
    kw.update(checkpoint_every=0, stability_images=0)
    tc = TrainConfig(**{**kw, **train})
    data = rectangles_dataset(96, 32, 0, (8, 8, 1))
    return Trainer(mc, tc, data, out_dir=out_dir, log=lambda m: None, comm=comm)


def _rank() -> int:
    return int(threading.current_thread().name.split("-")[1])


def test_a_non_finite_share_rejects_the_step_on_every_process(monkeypatch):
    """Process 1's share has a NaN loss at step 2 and a NaN gradient (no error raised) at
    step 4: both steps are rejected on both processes, which stay equal."""
    from flownp.train import loop, step

    real = step.batch_gradients
    steps: dict[int, int] = {}

    def share_gradients(model, batch, *, num_images=None):
        g = real(model, batch, num_images=num_images)
        k = steps[_rank()] = steps.get(_rank(), 0) + 1
        if _rank() == 1 and k == 2:
            return step.BatchGradients(float("nan"), g.batch_images, None, "loss is nan")
        if _rank() == 1 and k == 4:
            next(iter(g.grads.values())).flat[0] = np.nan
        return g

    monkeypatch.setattr(loop, "batch_gradients", share_gradients)

    def train(comm):
        tr = _tiny_trainer(comm)
        tr.run()
        return tr.metrics["train"]["rejected"], tr.model.state_dict(), tr.rule.rejected_total

    out = ThreadWorld(2).run(train)
    for rejected, _, total in out:
        assert rejected == [0, 1, 0, 1, 0, 0] and total == 2
    for k, v in out[0][1].items():
        np.testing.assert_array_equal(v, out[1][1][k])


def test_process_zero_failing_to_write_a_checkpoint_stops_every_process(monkeypatch, tmp_path):
    from flownp.train import run_folder

    real = run_folder.RunFolder.write_checkpoint

    def write(self, path, model, *, step, **kw):
        if step == 4:
            raise CheckpointError(f"cannot write {self.checkpoint}: No space left on device")
        return real(self, path, model, step=step, **kw)

    monkeypatch.setattr(run_folder.RunFolder, "write_checkpoint", write)
    out = ThreadWorld(2).run(
        lambda c: _tiny_trainer(c, out_dir=tmp_path / "run", checkpoint_every=2).run()
    )
    assert all(isinstance(e, CheckpointError) and D.is_collective(e) for e in out), out
    assert len({str(e) for e in out}) == 1
    assert "No space left" in str(out[0]) and "holds step 2" in str(out[0])
