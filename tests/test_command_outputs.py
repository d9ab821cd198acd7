"""Every command as safe as ``train``: what each writes, what it refuses, its exit codes.

Outputs that exist are refused without ``--overwrite`` (and kept byte for byte), outputs are
written whole or not at all and at the path printed, a size is checked before it is allocated,
SIGTERM is Ctrl-C (exit 130) in every command, and bad inputs are one line with exit code 2
(docs/reliability.md, "Every command").
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flownp import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny initialised MNIST-shaped model that says it was trained on the bundled MNIST
    with the default split (1000 held out)."""
    from flownp.checkpoint import save_checkpoint
    from flownp.data import load_dataset
    from flownp.data.pixels import images_to_model
    from flownp.model import FlowConfig, FlowModel

    cfg = FlowConfig(image_shape=(28, 28, 1), levels=1, depth=1, width=4, dtype="float32")
    model = FlowModel(cfg, seed=0)
    model.initialize(images_to_model(load_dataset("mnist").train[:32], np.float32))
    path = tmp_path_factory.mktemp("run") / "checkpoint.h5"
    return save_checkpoint(path, model, train_config={"dataset": "mnist", "holdout": None})


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, command: str, *words: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"flownp {command}: error: "), err
    for w in words:
        assert w in err, err


# ------------------------------------------------------------------ existing outputs are kept
def _cases(ckpt: Path, out: Path) -> dict[str, tuple[list, Path]]:
    """command -> (argv, the output file it would write)."""
    latent = ["--num-images", "2", "--batch-size", "8"]
    return {
        "sample --out": (["sample", ckpt, "-n", "2", "--out", out / "s.png"], out / "s.png"),
        "sample --npz": (
            ["sample", ckpt, "-n", "2", "--out", out / "s2.png", "--npz", out / "s.npz"],
            out / "s.npz",
        ),
        "sample default": (["sample", ckpt, "-n", "2"], ckpt.parent / "samples_T0.8.png"),
        "reconstruct": (["reconstruct", ckpt, *latent, "--out", out / "r.png"], out / "r.png"),
        "interpolate": (
            ["interpolate", ckpt, "--num-pairs", "1", "--steps", "2", "--out", out / "i.png"],
            out / "i.png",
        ),
        "manipulate --out": (
            ["manipulate", ckpt, *latent, "--max-images", "16", "--steps", "1"]
            + ["--attribute", "digit_1", "--out", out / "m.png"],
            out / "m.png",
        ),
        "manipulate --save-directions": (
            ["manipulate", ckpt, *latent, "--max-images", "16", "--steps", "1"]
            + ["--attribute", "digit_1", "--out", out / "m2.png"]
            + ["--save-directions", out / "d.npz"],
            out / "d.npz",
        ),
        "export-reference": (["export-reference", out / "ref.h5"], out / "ref.h5"),
        "verify": (["verify", "--quick", "--section", "cinc", "--out", out], out / "report.md"),
        "bench": (["bench", "--quick", "--section", "startup", "--out", out], out / "report.md"),
    }


CASES = list(_cases(Path("c"), Path("o")))


@pytest.mark.parametrize("case", CASES)
def test_an_existing_output_is_refused_without_overwrite_and_kept(case, ckpt, tmp_path, capsys):
    argv, target = _cases(ckpt, tmp_path)[case]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"the user's own file")
    try:
        code, _, err = run(argv, capsys)
        one_line_error(code, err, argv[0], str(target.name), "--overwrite")
        assert target.read_bytes() == b"the user's own file"
    finally:
        if target.parent == ckpt.parent:
            target.unlink()


@pytest.mark.parametrize(
    "case", ["sample --out", "sample --npz", "reconstruct", "manipulate --save-directions"]
)
def test_overwrite_replaces_the_output_with_a_complete_file(case, ckpt, tmp_path, capsys):
    argv, target = _cases(ckpt, tmp_path)[case]
    target.write_bytes(b"old")
    code, out, err = run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert str(target) in out  # the path printed is the file written
    data = target.read_bytes()
    assert data[:4] in (b"\x89PNG", b"PK\x03\x04")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["sample", "{ckpt}", "-n", "2", "--npz", "{tmp}/out.txt"], ["--npz", ".npz"]),
        (["sample", "{ckpt}", "-n", "2", "--out", "{tmp}/x.h5"], ["--out", ".png"]),
        (["reconstruct", "{ckpt}", "--out", "{tmp}/x.h5"], ["--out", ".png"]),
        (["interpolate", "{ckpt}", "--out", "{tmp}/x.h5"], ["--out", ".png"]),
        (["manipulate", "{ckpt}", "--out", "{tmp}/x.jpg"], ["--out", ".png"]),
        (["export-reference", "{tmp}/ref.txt"], [".h5"]),
        (["export-reference", "{tmp}"], ["is a folder"]),
    ],
)
def test_an_output_name_of_another_format_is_refused(argv, words, ckpt, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    one_line_error(code, err, argv[0], *words)
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no temporary left
    assert not (tmp_path.parent / f"{tmp_path.name}.tmp").exists()


def test_printed_paths_are_the_files_written(ckpt, tmp_path, capsys):
    png, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    code, out, err = run(["sample", ckpt, "-n", "3", "--out", png, "--npz", npz], capsys)
    assert code == 0, err
    assert f": {png}\n" in out and f"uint8 samples: {npz}\n" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.npz"]
    with np.load(npz) as z:
        assert z["images"].shape == (3, 28, 28, 1) and z["images"].dtype == np.uint8


def test_sampling_in_batches_draws_the_same_samples(ckpt, tmp_path, capsys, monkeypatch):
    """``sample`` draws its latents in batches from one stream: the same samples as one call."""
    from flownp.checkpoint import load_model
    from flownp.commands import sample
    from flownp.data.pixels import to_uint8

    monkeypatch.setattr(sample, "SAMPLE_BATCH", 2)
    code, _, err = run(
        ["sample", ckpt, "-n", "5", "--npz", tmp_path / "a.npz", "--out", tmp_path / "a.png"],
        capsys,
    )
    assert code == 0, err
    want = to_uint8(load_model(ckpt).sample(5, temperature=0.8, seed=0))
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["images"], want)


# ------------------------------------------------------------------ sizes before allocating
def test_more_grid_columns_than_samples_draws_one_row(ckpt, tmp_path, capsys):
    """``--ncols 10**9`` allocated a 29-billion-pixel-wide grid (a MemoryError traceback)."""
    out = tmp_path / "s.png"
    code, _, err = run(["sample", ckpt, "-n", "3", "--ncols", "1000000000", "--out", out], capsys)
    assert code == 0, err
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] < 2000  # one row of three cells, not 10**9 columns


def test_sample_count_beyond_the_memory_is_one_line(ckpt, tmp_path, capsys):
    code, _, err = run(["sample", ckpt, "-n", "10000000000", "--out", tmp_path / "s.png"], capsys)
    one_line_error(code, err, "sample", "-n 10000000000", "memory", "fewer samples")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        ["interpolate", "--steps", "100000000"],
        ["interpolate", "--num-pairs", "100000000"],
        ["interpolate", "--pairs", "0:1,2:3", "--steps", "1251"],
        ["manipulate", "--steps", "100000000"],
        ["manipulate", "--num-images", "1000", "--steps", "2", "--attribute", "digit_1"],
    ],
)
def test_a_latent_figure_too_large_to_draw_is_refused_first(argv, ckpt, tmp_path, capsys):
    command, *options = argv
    code, _, err = run([command, ckpt, *options, "--out", tmp_path / "f.png"], capsys)
    one_line_error(code, err, command, "the figure would hold", "more than 2500")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ evaluate: held-out images
def test_evaluate_refuses_a_holdout_that_includes_training_images(ckpt, capsys):
    code, _, err = run(["evaluate", ckpt, "--holdout", "5000", "--no-progress"], capsys)
    one_line_error(code, err, "evaluate", "--holdout 5000", "1000 images held out")
    quick = ["--limit", "4", "--stability-images", "0", "--no-progress"]
    for ok in (
        ["--holdout", "1000"],
        ["--holdout", "500"],
        ["--holdout", "5000", "--split", "train"],
    ):
        code, out, err = run(["evaluate", ckpt, *ok, *quick], capsys)
        assert code == 0 and "bits/dim" in out, err


def test_evaluate_holdout_larger_than_the_data_is_one_line(ckpt, capsys):
    code, _, err = run(["evaluate", ckpt, "--holdout", "10000", "--no-progress"], capsys)
    one_line_error(code, err, "evaluate", "holdout must be between 1 and N-1")


# ------------------------------------------------------------------ check-reference
def test_check_reference_refuses_a_file_without_the_tensors(ckpt, tmp_path, capsys):
    code, _, err = run(["check-reference", ckpt, "--allow-missing"], capsys)
    one_line_error(code, err, "check-reference", "holds none of the", "tensors of the reference")
    empty = tmp_path / "empty.h5"
    import h5py

    h5py.File(empty, "w").close()
    code, _, err = run(["check-reference", empty, "--allow-missing"], capsys)
    one_line_error(code, err, "check-reference", "holds none of the")
    code, _, err = run(["check-reference", empty, "--reference", ckpt], capsys)
    one_line_error(code, err, "check-reference", "not a flownp reference-vector file")
    (tmp_path / "notes.txt").write_text("not HDF5")
    code, _, err = run(["check-reference", tmp_path / "notes.txt"], capsys)
    one_line_error(code, err, "check-reference", "not a readable HDF5 file")
    code, _, err = run(["check-reference", tmp_path / "missing.h5"], capsys)
    one_line_error(code, err, "check-reference", "no such file")
    code, _, err = run(["export-reference", tmp_path / "r.h5", "--replay", ckpt], capsys)
    one_line_error(code, err, "export-reference", "not a flownp reference-vector file")


# ------------------------------------------------------------------ signals
def test_sigterm_is_ctrl_c_in_every_command(ckpt, tmp_path, capsys, monkeypatch):
    """SIGTERM during ``sample``: one line, exit 130, no output file; the handler the caller
    had is restored afterwards."""
    from flownp.model import FlowModel

    def terminated(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    def callers_handler(signum, frame):
        raise AssertionError("the command left SIGTERM to its caller's handler")

    monkeypatch.setattr(FlowModel, "sample", terminated)
    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        code, _, err = run(["sample", ckpt, "-n", "2", "--out", tmp_path / "s.png"], capsys)
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 130 and err == "flownp sample: interrupted: SIGTERM\n", err
    assert not any(tmp_path.iterdir())


def test_sigterm_to_a_running_evaluate_exits_130(ckpt, tmp_path):
    """A real process: ``flownp evaluate`` on 9000 images one at a time, SIGTERM once its
    progress bar shows: exit code 130 (not 143) and one line."""
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flownp", "evaluate", str(ckpt), "--split", "train"]
            + ["--batch-size", "1", "--stability-images", "0"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 60
            while b"evaluate: image" not in err_path.read_bytes() and time.monotonic() < deadline:
                assert proc.poll() is None, err_path.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = err_path.read_text()
    assert code == 130, text
    assert text.rstrip().splitlines()[-1].endswith("flownp evaluate: interrupted: SIGTERM"), text
