"""Reference vectors for ports: the committed file is what flownp computes today, it is
self-contained (a model built from its weights alone reproduces it), and the checker flags
a wrong, missing or misshapen tensor."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest

from flownp import cli
from flownp.model import CONVS, COUPLINGS, FlowConfig, FlowModel
from flownp.optim import OPTIMIZERS
from verification import reference as R


@pytest.fixture(scope="module")
def committed():
    assert R.DEFAULT_PATH.exists(), "regenerate with: flownp export-reference " + str(
        R.DEFAULT_PATH
    )
    return R.read(R.DEFAULT_PATH)


@pytest.fixture(scope="module")
def regenerated():
    return R.generate()


def test_regenerated_vectors_match_the_committed_file(committed, regenerated):
    """A behaviour change anywhere in the model, the loss or Adam shows up here."""
    assert set(regenerated) == set(committed) == set(R.REFERENCE_MODELS)
    for name in committed:
        assert set(regenerated[name]) == set(committed[name]), name
    rows = R.compare(regenerated, committed)
    assert len(rows) > 400
    assert not R.failed(rows), "\n".join(str(r) for r in R.failed(rows)[:10])
    # the inputs (weights, x, sample z) are compared too, at the same tolerance
    for name in committed:
        for path, a in committed[name].items():
            if R.is_input(path):
                b = regenerated[name][path]
                assert a.shape == b.shape and a.dtype == b.dtype, path
                assert np.allclose(a, b, rtol=R.RTOL, atol=R.ATOL), path


def test_the_file_is_self_contained(committed):
    """A fresh model (another seed) with the file's weights loaded reproduces every tensor:
    the file is all a port needs."""
    rows = R.compare(R.replay(R.DEFAULT_PATH), committed)
    assert not R.failed(rows), "\n".join(str(r) for r in R.failed(rows)[:10])


def test_layout_is_the_documented_one(committed):
    """Paths are the checkpoint paths, z is the documented concatenation, the logdets add up,
    and every layer kind is present."""
    for name, (config, seed, _) in R.REFERENCE_MODELS.items():
        v = committed[name]
        model = FlowModel(config, seed=seed)
        assert {k[len("model/") :] for k in v if k.startswith("model/")} == set(model.state_dict())
        assert {k[len("grads/params/") :] for k in v if k.startswith("grads/params/")} == set(
            model.params
        )
        opt = R.optimizer_of(name)
        assert {k[len(f"{opt}/params/") :] for k in v if k.startswith(f"{opt}/params/")} == set(
            model.params
        )
        N = v["input/x"].shape[0]
        pieces = [v[f"forward/level{l}/split/eps"] for l in range(config.levels - 1)]
        pieces.append(v["forward/prior/output"])
        assert np.array_equal(np.concatenate([p.reshape(N, -1) for p in pieces], 1), v["latent/z"])
        logdets = sum(a for k, a in v.items() if k.startswith("forward/") and k.endswith("logdet"))
        assert np.allclose(logdets, v["latent/logdet"], rtol=1e-12, atol=1e-12)
        assert np.allclose(v["inverse/x"], v["input/x"], atol=1e-12)
        losses = v[f"{opt}/loss"]
        assert losses.shape == (R.ADAM_STEPS + 1,) and losses[-1] < losses[0]
        other = "adam/" if opt == "adamax" else "adamax/"
        assert not any(k.startswith(other) for k in v)
    kinds = {k.split("/")[3] for name in committed for k in committed[name] if "/step" in k}
    assert {"actnorm", "conv", "conv1x1", "coupling"} <= kinds
    with h5py.File(R.DEFAULT_PATH, "r") as f:
        assert f.attrs["format"] == R.FORMAT and f.attrs["format_version"] == R.FORMAT_VERSION
        assert FlowConfig.from_json(f["cinc_quad"].attrs["config"]).coupling == "quad"
        assert f["cinc_quad/latent/z"].dtype == np.float64
    assert R.DEFAULT_PATH.stat().st_size < 3_000_000
    # every convolution, coupling and optimizer of flownp is in some model
    configs = [c for c, _, _ in R.REFERENCE_MODELS.values()]
    assert {c.conv for c in configs} == set(CONVS)
    assert {c.coupling for c in configs} == set(COUPLINGS)
    assert {R.optimizer_of(n) for n in R.REFERENCE_MODELS} == set(OPTIMIZERS)
    with h5py.File(R.DEFAULT_PATH, "r") as f:
        for name in R.REFERENCE_MODELS:
            assert f[name].attrs["optimizer"] == R.optimizer_of(name)
    # the default configuration is covered: LU corner, guard 0.9, softclamp scale, mixed signs
    default = R.REFERENCE_MODELS["cinc_default"][0]
    assert (default.conv, default.cinc_corner, default.guard, default.scale) == (
        FlowConfig().conv,
        FlowConfig().cinc_corner,
        FlowConfig().guard,
        FlowConfig().scale,
    )
    for name in R.MIXED_SIGNS:
        signs = [a for k, a in committed[name].items() if k.endswith("/sign")]
        assert signs and all(np.any(a > 0) and np.any(a < 0) for a in signs), name


def _port_that_ignores(what: str, name: str) -> dict[str, np.ndarray]:
    """A simulated port of model ``name``, computed from the file's weights and inputs, that
    either drops the guard (``"guard"``) or reads every sign buffer as +1 (``"signs"``)."""
    cfg = R.read_configs(R.DEFAULT_PATH)[name]
    if what == "guard":
        cfg = FlowConfig.from_dict({**cfg.to_dict(), "guard": None})
    ref = R.read(R.DEFAULT_PATH)[name]
    state = {k[len("model/") :]: a for k, a in ref.items() if k.startswith("model/")}
    if what == "signs":
        state = {k: np.ones_like(a) if k.endswith("/sign") else a for k, a in state.items()}
    model = FlowModel(cfg, seed=5)
    model.load_state_dict(state)
    inputs = {k: ref[k] for k in ("input/x", "input/y", "sample/z") if k in ref}
    return R.compute(model, inputs, R.optimizer_of(name))


#: The table of docs/reference-vectors.md ("Why these"): for each group, the node where a port
#: that ignores the guard / reads every sign buffer as +1 first fails (None: it passes, the
#: group has no guard / no mixed sign buffer).
CATCHES = {
    "cinc_quad": (None, None),
    "emerging_affine": (None, "conv1x1"),
    "cinc_default": ("conv", "conv"),
    "cinc_unit": ("conv", None),
    "glow_1x1": (None, None),
    "emerging": ("conv", "conv"),
    "periodic_additive": ("conv", "conv"),
    "periodic_free": (None, "conv"),
    "reverse_quad": (None, None),
    "shuffle": (None, None),
    "1x1_cinc": ("conv", "conv1x1"),
    "cinc_ycond": ("conv", "conv"),
}
_WHAT = ("guard", "signs")


def test_the_port_error_table_covers_every_group():
    assert list(CATCHES) == list(R.read_configs(R.DEFAULT_PATH))


@pytest.mark.parametrize(
    "what, name, first",
    [(w, n, c[i]) for n, c in CATCHES.items() for i, w in enumerate(_WHAT) if c[i]],
)
def test_a_port_that_ignores_the_guard_or_the_signs_fails(what, name, first, tmp_path, capsys):
    """The guard and the mixed sign buffers change the outputs: such a port is NOT OK, and the
    first mismatch reported is the first convolution, in forward order."""
    path = R.write(tmp_path / "port.h5", {name: _port_that_ignores(what, name)})
    assert cli.main(["check-reference", str(path), "--allow-missing"]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [ln for ln in lines if ln.endswith("NOT OK")]
    assert len(bad) > 20
    assert bad[0].startswith(f"{name}/forward/level0/step0/{first}/output ")
    assert (
        f"first mismatch in computation order: {name}/forward/level0/step0/{first}/output"
        in (lines[-2])
    )
    # the squeeze and actnorm before the convolution still match
    ok = [ln.split()[0] for ln in lines if ln.endswith(" OK") and not ln.endswith("NOT OK")]
    assert f"{name}/forward/level0/step0/actnorm/output" in ok


@pytest.mark.parametrize(
    "what, name", [(w, n) for n, c in CATCHES.items() for i, w in enumerate(_WHAT) if not c[i]]
)
def test_the_groups_a_port_that_ignores_the_guard_or_the_signs_passes(what, name):
    """The other half of the table: these groups have no guard, or no mixed sign buffer, so
    they cannot catch that port error (the groups above do)."""
    configs = R.read_configs(R.DEFAULT_PATH)
    ref = {name: R.read(R.DEFAULT_PATH)[name]}
    rows = R.compare({name: _port_that_ignores(what, name)}, ref, configs={name: configs[name]})
    assert rows and not R.failed(rows)


def test_checker_prints_in_forward_order(committed):
    """Rows follow the computation: forward (layers in forward order, not alphabetical), then
    latent, loss, gradients, inverse, sample, Adam; models in the file's order."""
    rows = R.compare(committed, committed, configs=R.read_configs(R.DEFAULT_PATH))
    names = [r.name for r in rows]
    assert [n.split("/")[0] for n in names[:: len(names) // 6]][0] == "cinc_quad"
    model_order = list(dict.fromkeys(n.split("/")[0] for n in names))
    assert model_order == list(R.REFERENCE_MODELS)
    quad = [n[len("cinc_quad/") :] for n in names if n.startswith("cinc_quad/")]
    fwd = [n for n in quad if n.startswith("forward/")]
    assert fwd[:6] == [
        "forward/level0/squeeze/output",
        "forward/level0/squeeze/logdet",
        "forward/level0/step0/actnorm/output",
        "forward/level0/step0/actnorm/logdet",
        "forward/level0/step0/conv/output",
        "forward/level0/step0/conv/logdet",
    ]
    assert fwd.index("forward/level0/step1/conv/output") < fwd.index("forward/level0/split/h")
    assert fwd.index("forward/level0/split/logdet") < fwd.index("forward/level1/squeeze/output")
    assert fwd[-1] == "forward/prior/logdet"
    sections = [R.SECTIONS.index(next(s for s in R.SECTIONS if n.startswith(s))) for n in quad]
    assert sections == sorted(sections)
    grads = [n for n in quad if n.startswith("grads/params/")]
    assert grads[0].startswith("grads/params/level0/step0/actnorm/")
    assert grads[-1].startswith("grads/params/prior/")


def test_checker_flags_a_perturbed_tensor(committed, tmp_path, capsys):
    port = copy.deepcopy(committed)
    target = "forward/level0/step0/conv/output"
    port["cinc_quad"][target][0, 1, 2, 3] += 1e-6
    path = R.write(tmp_path / "port.h5", port)
    assert cli.main(["check-reference", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    bad = [ln for ln in lines if ln.endswith("NOT OK")]
    assert len(bad) == 1 and bad[0].startswith(f"cinc_quad/{target} ")
    assert "1.000e-06" in bad[0]
    n_ok = sum(ln.endswith(" OK") and not ln.endswith("NOT OK") for ln in lines)
    assert n_ok == len(R.compare(committed, committed)) - 1


def test_checker_passes_an_exact_copy_and_reports_every_tensor(committed, tmp_path, capsys):
    path = R.write(tmp_path / "port.h5", committed)
    assert cli.main(["check-reference", str(path), "--reference", str(R.DEFAULT_PATH)]) == 0
    out = capsys.readouterr().out.splitlines()
    n = len(R.compare(committed, committed))
    assert len(out) == n + 1 and out[-1].startswith(f"{n}/{n} tensors OK")


def test_checker_missing_shape_and_nan(committed):
    port = copy.deepcopy(committed)
    del port["emerging_affine"]["latent/z"]
    port["cinc_quad"]["loss/dz"] = port["cinc_quad"]["loss/dz"][:1]
    port["cinc_quad"]["sample/x"] = np.full_like(port["cinc_quad"]["sample/x"], np.nan)
    rows = {r.name: r.status for r in R.compare(port, committed)}
    assert rows["emerging_affine/latent/z"] == "MISSING"
    assert rows["cinc_quad/loss/dz"].startswith("NOT OK (shape")
    assert rows["cinc_quad/sample/x"] == "NOT OK"
    relaxed = {r.name: r.status for r in R.compare(port, committed, allow_missing=True)}
    assert relaxed["emerging_affine/latent/z"] == "SKIPPED"
    assert len(R.failed(R.compare(port, committed, allow_missing=True))) == 2


def test_float32_replay_needs_float32_tolerances(tmp_path):
    """flownp in float32 from the same weights: NOT OK at the float64 defaults, OK at the
    float32 tolerances the docs suggest."""
    port = R.replay(R.DEFAULT_PATH, "float32")
    ref = R.read(R.DEFAULT_PATH)
    assert len(R.failed(R.compare(port, ref))) > 100
    assert not R.failed(R.compare(port, ref, rtol=1e-4, atol=1e-5))


def test_export_command_writes_a_checkable_file(tmp_path, capsys):
    out = tmp_path / "ref.h5"
    assert cli.main(["export-reference", str(out)]) == 0
    assert cli.main(["check-reference", str(out)]) == 0
    assert cli.main(["export-reference", str(tmp_path / "x.h5"), "--dtype", "float32"]) == 2
    assert "needs --replay" in capsys.readouterr().err
