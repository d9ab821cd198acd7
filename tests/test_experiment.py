"""The experiment grid: end to end on a tiny grid, resuming after a kill, the statistics of
the report, and bad declarations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flownp import cli, digits
from flownp import experiment as E
from flownp import train as T
from flownp.experiment import run as experiment_run
from flownp.experiment.report import _sampling_cell as sampling_cell
from flownp.testing import rectangles_dataset

SHAPE = (8, 8, 1)


def make_data(n_train=64, n_test=16, seed=0):
    return rectangles_dataset(n_train, n_test, seed, SHAPE)


TINY = [
    "--conv",
    "cinc,1x1",
    "--coupling",
    "affine",
    "--depth",
    "1",
    "--seeds",
    "2",
    "--levels",
    "1",
    "--width",
    "8",
    "--batch-size",
    "16",
    "--init-batch-size",
    "32",
    "--eval-every",
    "2",
    "--eval-size",
    "16",
    "--sample-images",
    "10",
]


def tiny_grid(**kw):
    kw = {
        "convs": ("cinc", "1x1"),
        "couplings": ("affine",),
        "depths": (1,),
        "seeds": ((1, 2),),
        "budgets": ("steps",),
        "steps": 4,
        "model": {"levels": 1, "width": 8},
        "train": {
            "batch_size": 16,
            "init_batch_size": 32,
            "eval_every": 2,
            "eval_size": 16,
            "checkpoint_every": 2,
        },
        "sample_images": 10,
        **kw,
    }
    return E.GridConfig(**kw)


# ---------------------------------------------------------------------- end to end
def test_tiny_grid_end_to_end(tmp_path, fake_dataset, capsys):
    out = tmp_path / "exp"
    args = ["experiment", "--out", str(out), *TINY, "--steps", "4", "--seconds", "0.5"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "8 of 8 runs finished (0 failed)" in printed
    report = (out / "report" / "report.md").read_text()
    assert "## Equal steps: 4 steps per run" in report
    assert "## Equal wall-clock time: 0.5 s of training per run" in report
    for conv in ("cinc", "1x1"):
        rows = [line for line in report.splitlines() if line.startswith(f"| {conv} | affine | 1 |")]
        assert len(rows) == 2  # one per budget
        assert all(" ± " in row for row in rows)  # two seeds: mean ± std
    for budget in ("steps", "seconds"):
        assert (out / "report" / f"curves_{budget}.png").stat().st_size > 0
    lines = (out / "report" / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 8
    for path in out.glob("runs/steps4/*/seed*/result.json"):
        r = json.loads(path.read_text())
        assert r["status"] == "done" and r["steps"] == 4 and math.isfinite(r["heldout_bpd"])
        assert r["curve"]["step"] == [2.0, 4.0]  # a periodic evaluation, then the final one
        assert r["parameters"] > 0 and r["sample_seconds"] > 0
        assert r["digit_share"] is None  # 8x8 images: no digit classifier
    for path in out.glob("runs/seconds0.5/*/seed*/result.json"):
        r = json.loads(path.read_text())
        assert r["stopped_by_time"] and r["train_seconds"] >= 0.5  # the clock decided, not steps
    # the table's numbers are the runs' numbers
    finals = [
        json.loads(p.read_text())["heldout_bpd"]
        for p in sorted(out.glob("runs/steps4/cinc-affine-d1/seed*/result.json"))
    ]
    assert E.format_mean_std(finals, 3) in report
    # nothing left to do: a second invocation trains nothing
    assert cli.main(args) == 0
    assert "training" not in capsys.readouterr().out
    # a different configuration in the same folder is refused, nothing overwritten
    bad = [a if a != "8" else "16" for a in args]  # --width 16
    assert cli.main(bad) == 2
    assert "another configuration" in capsys.readouterr().err
    # status and report-only
    assert cli.main([*args, "--status"]) == 0
    assert capsys.readouterr().out.count("done") == 8
    (out / "report" / "report.md").unlink()
    assert cli.main([*args, "--report-only"]) == 0
    assert (out / "report" / "report.md").read_text() == report


def test_the_official_scripts_options_on_the_axes(tmp_path, fake_dataset, capsys):
    """The periodic convolution, 1x1+cinc, a channel shuffle and the additive coupling are
    grid values like the others, and the report pairs them with their baselines."""
    out = tmp_path / "exp"
    args = [*TINY, "--steps", "2", "--seeds", "1", "--budget", "steps"]
    args[args.index("cinc,1x1")] = "periodic,cinc,1x1+cinc,1x1,shuffle"
    args[args.index("affine")] = "additive,affine"
    assert cli.main(["experiment", "--out", str(out), *args]) == 0
    assert "10 of 10 runs finished (0 failed)" in capsys.readouterr().out
    report = (out / "report" / "report.md").read_text()
    for row in (
        "| periodic | additive | 1 |",
        "| 1x1+cinc | affine | 1 |",
        "| periodic vs cinc | affine | 1 | 1 |",
        "| 1x1+cinc vs cinc | additive | 1 | 1 |",
        "| 1x1 vs shuffle | affine | 1 | 1 |",
        "| additive vs affine | periodic | 1 | 1 |",
    ):
        assert row in report, row
    for path in out.glob("runs/steps2/*/seed0/result.json"):
        r = json.loads(path.read_text())
        assert r["status"] == "done" and r["sample_seconds"] > 0, path


def test_killed_grid_resumes_only_the_missing_runs(tmp_path, fake_dataset, monkeypatch):
    grid = tiny_grid()
    runs = grid.runs()
    target = runs[2].folder(grid)  # the third run is killed after its checkpoint at step 2
    real_save = T.Trainer.save

    def killing_save(self, path=None):
        saved = real_save(self, path)
        if self.step == 2 and self.out_dir == tmp_path / target:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(T.Trainer, "save", killing_save)
    with pytest.raises(KeyboardInterrupt):
        E.run_grid(grid, tmp_path, fake_dataset, log=lambda m: None)
    monkeypatch.setattr(T.Trainer, "save", real_save)
    states = [state for _, state in E.grid_status(grid, tmp_path)]
    assert states == ["done", "done", "partial", "todo"]
    first = json.loads((tmp_path / runs[0].folder(grid) / "result.json").read_text())

    # a finished run whose completion marker is lost resumes from its final checkpoint
    (tmp_path / runs[1].folder(grid) / "result.json").unlink()
    logs: list[str] = []
    results = E.run_grid(grid, tmp_path, fake_dataset, log=logs.append)
    started = [m for m in logs if "training" in m or "resuming" in m]
    assert len(started) == 3
    assert "seed 0: resuming at step 4" in started[0] and runs[1].conv in started[0]
    assert "seed 1: resuming at step 2" in started[1] and runs[2].conv in started[1]
    assert started[2].endswith(f"seed 1: training ({results[3]['parameters']} parameters)")
    assert [r["skipped"] for r in results] == [True, False, False, False]
    assert results[0]["heldout_bpd"] == first["heldout_bpd"]
    assert all(r["steps"] == 4 for r in results)

    # the killed-and-resumed run equals an uninterrupted one (exact resume)
    fresh = E.run_one(grid, runs[2], fake_dataset, tmp_path / "fresh", log=lambda m: None)
    assert fresh["heldout_bpd"] == results[2]["heldout_bpd"]
    assert fresh["curve"]["bpd"] == results[2]["curve"]["bpd"]


# ---------------------------------------------------------------------- statistics
def test_mean_std_by_hand():
    mean, std, n = E.mean_std([2.0, 2.2, 2.4])
    assert n == 3 and mean == pytest.approx(2.2) and std == pytest.approx(0.2)  # ddof = 1
    mean, std, n = E.mean_std([1.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2.0))  # not 1.0 (ddof = 0)
    assert E.format_mean_std([2.0, 2.2, 2.4]) == "2.200 ± 0.200"
    assert E.format_mean_std([2.1345]) == "2.135"
    assert E.format_mean_std([]) == "–"
    assert E.format_mean_std([0.25, 0.35], 0, scale=100.0) == "30 ± 7"


def _result(seed, bpd, status="done", conv="cinc"):
    return {
        "budget": "steps",
        "conv": conv,
        "coupling": "affine",
        "depth": 1,
        "seed": seed,
        "status": status,
        "heldout_bpd": bpd,
        "steps": 4,
        "train_seconds": 10.0 + seed,
        "parameters": 1234,
        "sample_seconds": 0.5,
        "digit_share": None,
        "digit_real_share": None,
        "curve": {"step": [2.0, 4.0], "seconds": [5.0, 10.0], "bpd": [3.0, bpd]},
    }


def test_report_table_by_hand(tmp_path):
    grid = tiny_grid(convs=("cinc",), seeds=((1, 4),))
    results = [
        _result(0, 2.0),
        _result(1, 2.2),
        _result(2, 2.4),
        _result(3, float("nan"), "diverged"),
    ]
    (row,) = E.summarize(grid, results)
    assert row["bpd"] == [2.0, 2.2, 2.4] and row["failed"] == 1
    table = E.format_table([row], "steps")
    assert (
        "| cinc | affine | 1 | 3 | 1,234 | 2.200 ± 0.200 | 4 ± 0 | 11 ± 1 | 0.50 ± 0.00 | – | 1 |"
        in (table)
    )
    path = E.write_report(grid, results, tmp_path)
    assert "2.200 ± 0.200" in path.read_text()


def test_seed_band_by_hand():
    a = ([0.0, 10.0], [4.0, 2.0])
    b = ([0.0, 5.0, 12.0], [6.0, 4.0, 0.0])
    x, mean, low, high = E.seed_band([a, b], points=3)
    np.testing.assert_allclose(x, [0.0, 5.0, 10.0])  # the range both curves cover
    # a at 0, 5, 10: 4, 3, 2; b: 6, 4, and 4 - 4 * (10 - 5) / (12 - 5) = 8/7
    np.testing.assert_allclose(mean, [5.0, 3.5, (2.0 + 8 / 7) / 2])
    np.testing.assert_allclose(low, [4.0, 3.0, 8 / 7])
    np.testing.assert_allclose(high, [6.0, 4.0, 2.0])


# ---------------------------------------------------------------------- declarations
def test_grid_declaration():
    grid = E.GridConfig(seeds=E.parse_seeds("4:3,8:2", (4, 8)))
    runs = grid.runs()
    assert len(runs) == 2 * (6 * 3 + 6 * 2)
    assert {r.seed for r in runs if r.depth == 8} == {0, 1}
    assert runs[0] == E.RunSpec("steps", "1x1", "affine", 4, 0)
    assert [r.seed for r in runs[:24]] == [0] * 24  # seed-major: whole comparisons first
    assert E.parse_seeds("3", (4, 8)) == ((4, 3), (8, 3))
    with pytest.raises(E.ExperimentError, match="each depth"):
        E.parse_seeds("4:3", (4, 8))
    with pytest.raises(E.ExperimentError, match="count"):
        E.parse_seeds("three", (4,))
    with pytest.raises(E.ExperimentError, match="convs"):
        E.GridConfig(convs=("3x3",))
    with pytest.raises(E.ExperimentError, match="grid axis"):
        E.GridConfig(model={"depth": 2})
    with pytest.raises(E.ExperimentError, match="width"):
        E.GridConfig(model={"width": 0})


def test_command_bad_input(tmp_path, fake_dataset, capsys):
    out = str(tmp_path / "x")
    assert cli.main(["experiment", "--out", out, "--conv", "3x3"]) == 2
    assert "convs" in capsys.readouterr().err
    assert cli.main(["experiment", "--out", out, "--depth", "4,8", "--seeds", "4:3"]) == 2
    assert "each depth" in capsys.readouterr().err
    assert cli.main(["experiment", "--out", out, "--temperature-sweep", "0.7"]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_failed_sampling_is_counted_not_averaged():
    assert sampling_cell([0.5, 0.7]) == "0.60 ± 0.14"
    assert sampling_cell([0.5, float("nan")]) == "0.50 (1 failed)"
    assert sampling_cell([0.5, 0.7], [False, True]) == "0.60 ± 0.14 (1 non-finite)"


class _OverflowingSampler:
    """A model stub whose samples are non-finite above a temperature."""

    def __init__(self, fails_above: float):
        self.fails_above, self.temperatures = fails_above, []

    def sample(self, n, *, temperature, seed):
        from flownp.errors import NonFiniteError

        self.temperatures.append(temperature)
        if temperature > self.fails_above:
            raise NonFiniteError("AffineCoupling.inverse: the output contains 3 NaN/Inf value(s)")
        return np.zeros((n, 8, 8, 1))


def test_non_finite_samples_are_timed_on_the_latent_mode():
    grid, logs = tiny_grid(temperature=0.8), []
    model = _OverflowingSampler(fails_above=0.0)
    seconds, digit, nonfinite = experiment_run._measure_sampling(model, grid, None, 0, logs.append)
    assert model.temperatures == [0.8, 0.0]
    assert nonfinite and digit is None and math.isfinite(seconds) and seconds >= 0
    assert "temperature 0.8 failed" in logs[0] and "3 NaN/Inf" in logs[0]
    # a model that cannot be sampled even at its mode is not timed
    model, logs = _OverflowingSampler(fails_above=-1.0), []
    seconds, digit, nonfinite = experiment_run._measure_sampling(model, grid, None, 0, logs.append)
    assert nonfinite and math.isnan(seconds) and "failed too" in logs[-1]


def test_result_of_an_older_version_gets_its_sampling_completed(tmp_path, fake_dataset):
    grid = tiny_grid()
    run = grid.runs()[0]
    E.run_one(grid, run, fake_dataset, tmp_path, log=lambda m: None)
    path = tmp_path / run.folder(grid) / "result.json"
    old = json.loads(path.read_text())
    del old["sample_nonfinite"]
    old["sample_seconds"] = float("nan")  # its sampling had failed
    path.write_text(json.dumps(old))
    logs: list[str] = []
    again = E.run_one(grid, run, fake_dataset, tmp_path, log=logs.append)
    assert again["skipped"] and again["sample_nonfinite"] is True
    assert math.isfinite(again["sample_seconds"]) and "temperature 0" in logs[0]
    stored = json.loads(path.read_text())
    assert stored["sample_nonfinite"] is True and stored["sample_seconds"] > 0
    assert "temperature 0" in (path.parent / "train.log").read_text()


def test_result_written_before_new_config_fields_is_still_this_grid_s(tmp_path, fake_dataset):
    """A finished result without the fields added since (here the optimizer and recompute)
    compares with their defaults, as a checkpoint loads; a real difference is still refused."""
    grid = tiny_grid()
    run = grid.runs()[0]
    E.run_one(grid, run, fake_dataset, tmp_path, log=lambda m: None)
    path = tmp_path / run.folder(grid) / "result.json"
    old = json.loads(path.read_text())
    del old["config"]["train"]["optimizer"], old["config"]["train"]["recompute"]
    path.write_text(json.dumps(old))
    assert E.run_one(grid, run, fake_dataset, tmp_path, log=lambda m: None)["skipped"]
    adamax = tiny_grid(train={**grid.train, "optimizer": "adamax"})
    with pytest.raises(E.ExperimentError, match="optimizer: 'adam' instead of 'adamax'"):
        E.run_one(adamax, run, fake_dataset, tmp_path, log=lambda m: None)


def test_result_scored_by_another_digit_measure_is_scored_again(tmp_path, serve_dataset):
    data = serve_dataset(rectangles_dataset(32, 16, 0, (28, 28, 1)))  # MNIST-shaped: scored
    grid = tiny_grid(steps=2)
    run = grid.runs()[0]
    first = E.run_one(grid, run, data, tmp_path, log=lambda m: None)
    assert first["digit_measure"] == digits.MEASURE and first["digit_share"] is not None
    path = tmp_path / run.folder(grid) / "result.json"
    old = json.loads(path.read_text())
    old["digit_measure"], old["digit_share"] = "an older classifier", 0.123
    path.write_text(json.dumps(old))
    logs: list[str] = []
    again = E.run_one(grid, run, data, tmp_path, log=logs.append)
    assert again["skipped"] and again["digit_measure"] == digits.MEASURE
    assert again["digit_share"] == first["digit_share"]  # the same samples, the same measure
    assert again["sample_seconds"] == first["sample_seconds"]  # timing kept
    assert "scored with the current digit classifier" in logs[0]
    assert json.loads(path.read_text())["digit_share"] == first["digit_share"]
    # without its checkpoint the old share is dropped, not kept under the new name
    old["digit_measure"] = "an older classifier"
    path.write_text(json.dumps(old))
    (path.parent / "checkpoint.h5").unlink()
    again = E.run_one(grid, run, data, tmp_path, log=lambda m: None)
    assert again["digit_share"] is None and again["digit_measure"] == digits.MEASURE


def _claim_result(conv, coupling, seed, bpd, *, budget="steps", depth=4, status="done"):
    return {
        "budget": budget,
        "conv": conv,
        "coupling": coupling,
        "depth": depth,
        "seed": seed,
        "status": status,
        "heldout_bpd": bpd,
    }


def test_paired_differences_by_hand():
    results = [
        *(_claim_result("cinc", "affine", s, v) for s, v in enumerate([2.0, 2.1, 2.2])),
        *(_claim_result("emerging", "affine", s, v) for s, v in enumerate([2.5, 2.6, 2.7])),
        *(_claim_result("1x1", "affine", s, v) for s, v in enumerate([2.0, 2.3, 1.9])),
        _claim_result("1x1", "affine", 3, 9.0),  # no cinc partner: not paired
        _claim_result("cinc", "affine", 0, 1.0, depth=8),
        _claim_result("1x1", "affine", 0, 1.5, depth=8),
        _claim_result("cinc", "affine", 1, float("nan"), depth=8, status="diverged"),
        _claim_result("1x1", "affine", 1, 1.0, depth=8),
        _claim_result("cinc", "affine", 0, 0.1, budget="seconds"),  # another budget
    ]
    (vs_emerging,) = E.paired_differences(results, "steps", "conv", "cinc", "emerging")
    assert vs_emerging["seeds"] == [0, 1, 2] and vs_emerging["coupling"] == "affine"
    assert np.allclose(vs_emerging["diffs"], [-0.5, -0.5, -0.5])
    assert vs_emerging["spread"] == pytest.approx(0.1)  # std of 2.0, 2.1, 2.2
    assert vs_emerging["verdict"] == "better"
    d4, d8 = E.paired_differences(results, "steps", "conv", "cinc", "1x1")
    assert np.allclose(d4["diffs"], [0.0, -0.2, 0.3]) and d4["verdict"] == "within spread"
    assert d4["spread"] == pytest.approx(np.std([0.0, -0.2, 0.3], ddof=1))  # the differences'
    assert d8["depth"] == 8 and d8["seeds"] == [0] and d8["verdict"] == "one seed"
    assert E.paired_differences(results, "steps", "coupling", "quad", "affine") == []
    table = E.format_claims(results, "steps")
    assert "| cinc vs emerging | affine | 4 | 3 | -0.500 ± 0.000 | 0.100 | cinc better |" in table
    assert "| cinc vs 1x1 | affine | 8 | 1 | -0.500 | – | one seed: not resolved |" in table


# ---------------------------------------------------------------------- finished runs checked
def _one_run_grid():
    return tiny_grid(convs=("1x1",), seeds=((1, 1),), steps=2)


def test_a_finished_run_of_other_data_is_refused(tmp_path, fake_dataset):
    """The data file changed after a run finished: resuming the grid refuses that run (it
    would be paired with runs of the new data), as it refuses a partially trained one."""
    grid = _one_run_grid()
    (done,) = E.run_grid(grid, tmp_path, fake_dataset, log=lambda m: None)
    other = make_data(seed=1)  # same shapes, other pixels
    with pytest.raises(E.ExperimentError, match="not the data this model was trained on"):
        E.run_grid(grid, tmp_path, other, log=lambda m: None)
    result = json.loads((tmp_path / grid.runs()[0].folder(grid) / "result.json").read_text())
    assert result["data_fingerprint"]["sha256"]
    # a result.json without the fingerprint (older files): the checkpoint's is used
    del result["data_fingerprint"]
    (tmp_path / grid.runs()[0].folder(grid) / "result.json").write_text(json.dumps(result))
    with pytest.raises(E.ExperimentError, match="not the data this model was trained on"):
        E.run_grid(grid, tmp_path, other, log=lambda m: None)
    (again,) = E.run_grid(grid, tmp_path, fake_dataset, log=lambda m: None)
    assert again["skipped"] and again["heldout_bpd"] == done["heldout_bpd"]


def test_a_truncated_result_is_one_line_on_the_command_line(tmp_path, fake_dataset, capsys):
    from flownp import cli

    argv = ["experiment", "--out", str(tmp_path), *TINY, "--conv", "1x1", "--seeds", "1"]
    argv += ["--budget", "steps"]
    assert cli.main([*argv, "--steps", "2"]) == 0
    capsys.readouterr()
    path = tmp_path / "runs" / "steps2" / "1x1-affine-d1" / "seed0" / "result.json"
    path.write_text(path.read_text()[:40])
    assert cli.main([*argv, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is damaged" in err and "remove it" in err, err
    path.unlink()  # as the message says: the run is finished again from its checkpoint
    assert cli.main([*argv, "--steps", "2"]) == 0
    assert json.loads(path.read_text())["steps"] == 2
