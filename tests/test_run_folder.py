"""The run folder of ``flownp train``: one process at a time (its lock), never a user's own
files replaced, a resume never goes backwards (docs/reliability.md, sections 3 and 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flownp import checkpoint as ck
from flownp import cli
from flownp.testing import rectangles_dataset
from flownp.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--levels", "1", "--depth", "1", "--width", "4", "--batch-size", "16"]
TINY += ["--init-batch-size", "32", "--eval-every", "0", "--no-progress"]


def make_data():
    return rectangles_dataset(96, 32, 0, (8, 8, 1))


def one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flownp train: error: "), err
    for w in words:
        assert w in err, err
    return err


# ---------------------------------------------------------------------- the lock
def test_lock_is_exclusive_names_its_holder_and_ends_with_it(tmp_path):
    from flownp.train.run_folder import RunLock

    folder = tmp_path / "run"
    assert RunLock.holder(folder) is None and not folder.exists()  # asking creates nothing
    with RunLock(folder):
        assert RunLock.holder(folder) == os.getpid()
        with pytest.raises(Exception, match=rf"in use: another flownp process \(pid {os.getpid()}"):
            RunLock(folder).acquire()
    assert RunLock.holder(folder) is None
    RunLock(folder).acquire().release()  # free again
    # a holder that is killed releases it (the operating system does)
    code = f"from flownp.train.run_folder import RunLock; RunLock({str(folder)!r}).acquire(); "
    code += "print('held', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        assert RunLock.holder(folder) == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert RunLock.holder(folder) is None


def test_a_second_train_into_a_folder_in_use_is_refused(tmp_path, fake_dataset, capsys):
    from flownp.train.run_folder import RunLock

    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "2", "--out", str(run), *TINY]) == 0
    assert RunLock.holder(run) is None  # released at the end of the run
    capsys.readouterr()
    before = (run / "checkpoint.h5").read_bytes()
    with RunLock(run):  # as if another process were training into it
        assert cli.main(["train", "--resume", str(run / "checkpoint.h5"), "--steps", "4"]) == 2
        one_line(capsys, f"{run} is in use", f"pid {os.getpid()}")
        assert cli.main(["train", "--steps", "2", "--out", str(run), "--overwrite", *TINY]) == 2
        one_line(capsys, "is in use")
    assert (run / "checkpoint.h5").read_bytes() == before
    assert cli.main(["train", "--resume", str(run / "checkpoint.h5"), "--steps", "3"]) == 0


def test_resume_while_the_run_is_still_training_is_refused(tmp_path):
    """Two real processes: ``flownp train --out F`` is training; ``flownp train --resume
    F/checkpoint.h5`` is refused (one line, exit 2); the first then ends on SIGTERM (130)."""
    from flownp.train.run_folder import RunLock

    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "flownp", "train", "--out", str(run), "--steps", "100000"]
        + ["--levels", "1", "--depth", "1", "--width", "4", "--batch-size", "8"]
        + ["--eval-every", "0", "--checkpoint-every", "0", "--no-progress"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.h5").exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.2)
        assert RunLock.holder(run) == first.pid
        second = subprocess.run(
            [sys.executable, "-m", "flownp", "train", "--resume", str(run / "checkpoint.h5")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert RunLock.holder(run) is None


# ---------------------------------------------------------------------- a user's own folder
def test_a_folder_with_a_users_files_is_not_a_run_folder(tmp_path, fake_dataset, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "metrics.csv").write_text("my,numbers\n")
    assert cli.main(["train", "--steps", "2", "--out", str(mine), *TINY]) == 2
    one_line(capsys, "is not a run folder", "config.json, metrics.csv", "--overwrite")
    assert (mine / "config.json").read_text() == '{"my": "settings"}'
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "metrics.csv"]
    assert cli.main(["train", "--steps", "2", "--out", str(mine), "--overwrite", *TINY]) == 0
    assert (mine / "checkpoint.h5").exists()


# ---------------------------------------------------------------------- resume never goes back
def test_resume_with_fewer_steps_than_done_is_refused(tmp_path, fake_dataset, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "4", "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    before = (run / "checkpoint.h5").read_bytes()
    assert cli.main(["train", "--resume", str(run / "checkpoint.h5"), "--steps", "2"]) == 2
    one_line(capsys, "--steps 2", "at step 4 already", "--steps 5 or more")
    assert (run / "checkpoint.h5").read_bytes() == before
    assert cli.main(["train", "--resume", str(run / "checkpoint.h5"), "--steps", "4"]) == 0
    assert ck.read_checkpoint(run / "checkpoint.h5").train_state["step"] == 4


def test_a_seed_a_checkpoint_cannot_store_is_refused_before_anything_is_made(tmp_path, capsys):
    with pytest.raises(ValueError, match="seed must be at most 2"):
        TrainConfig(seed=2**63)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--seed", "99999999999999999999", "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    assert "argument --seed: must be between 0 and" in capsys.readouterr().err
