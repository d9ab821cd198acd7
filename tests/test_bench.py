"""Smoke test of the benchmark suite: ``--quick`` runs every section and writes its outputs.
No timing assertions (times depend on the machine); the correctness checks inside the suite
(the recompute path's gradients) must pass."""

from __future__ import annotations

import json

import numpy as np

from verification import bench


def test_quick_bench_writes_report(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["sections"]) == set(bench.SECTION_NAMES)
    report = (tmp_path / "report.md").read_text()
    # the command as a user would type it again, not the path of a script
    assert res["command"] == f"python3 -m verification.bench --quick --out {tmp_path}"
    assert f"Command: `python3 -m verification.bench --quick --out {tmp_path}`" in report
    for heading in ("## Machine", "## Targets", "## Per layer", "## Sampling", "## Training"):
        assert heading in report
    assert "## 1 thread against" in report
    rows = res["sections"]["threads"]["rows"]
    assert {(r["op"], r["machine"]) for r in rows} >= {("step", "idle"), ("sample 8", "idle")}
    assert all(r["1 thread s"] > 0 and r["speed-up"] > 0 for r in rows)
    assert (tmp_path / "inverse_vs_size.png").stat().st_size > 0
    # every layer/op was timed, with positive finite times
    ops = {(r["layer"], r["op"]) for r in res["sections"]["layers"]["rows"]}
    for op in ("forward", "backward", "inverse-raster", "inverse-wavefront"):
        assert ("cinc", op) in ops and ("emerging", op) in ops
    assert all(np.isfinite(r["ms"]) and r["ms"] > 0 for r in res["sections"]["layers"]["rows"])
    mem = res["sections"]["memory"]
    assert mem["checks"][0]["met"], mem["checks"][0]


def test_mac_count_matches_hand_formula():
    """model_forward_macs against the architecture written out by hand (cifar-d4 shapes)."""
    from flownp.model import FlowConfig, FlowModel

    cfg = FlowConfig(
        (32, 32, 3), 3, 2, 8, "cinc", "quad", cinc_corner="triangular", dtype="float32"
    )
    model = FlowModel(cfg, seed=0)
    width, expected = 8, 0
    for l, (H, W, C) in enumerate(cfg.level_shapes()):
        q = C // 4
        net = sum(9 * k * q * width + width * width + 9 * width * 2 * q for k in (1, 2, 3))
        step = 9 * C * C + net  # CInC 3x3 + the three conditioners of the quad coupling
        expected += H * W * cfg.depth * step
        if l < cfg.levels - 1:
            expected += H * W * 9 * (C // 2) * C  # split prior
    assert bench.model_forward_macs(model) == expected


def test_fused_actnorm_relu_matches_numpy_and_its_gradient(rng):
    """The fused conditioner kernels (flownp.kernels.conv_same) against NumPy, and their
    backward against central differences of L = sum(r * dr)."""
    from flownp.kernels.conv_same import actnorm_relu_backward, actnorm_relu_forward

    a = rng.standard_normal((3, 4, 5, 6))
    bias, logs = rng.standard_normal(6), 0.3 * rng.standard_normal(6)
    dr = rng.standard_normal(a.shape)
    for relu in (True, False):
        r, finite = actnorm_relu_forward(a, bias, logs, relu)
        n = (a + bias) * np.exp(logs)
        assert finite and np.array_equal(r, np.maximum(n, 0) if relu else n)
        da, dbias, dlogs = actnorm_relu_backward(dr, r, logs, relu)

        def loss(a_, b_, l_, relu=relu):
            return float(np.sum(actnorm_relu_forward(a_, b_, l_, relu)[0] * dr))

        eps = 1e-6
        for arr, grad in ((a, da), (bias, dbias), (logs, dlogs)):
            flat, g = arr.reshape(-1), grad.reshape(-1)
            for i in rng.choice(flat.size, size=min(flat.size, 12), replace=False):
                old = flat[i]
                flat[i] = old + eps
                lp = loss(a, bias, logs)
                flat[i] = old - eps
                lm = loss(a, bias, logs)
                flat[i] = old
                assert abs((lp - lm) / (2 * eps) - g[i]) <= 1e-6 * max(1.0, abs(g[i]))
    a[1, 2, 3, 4] = np.inf
    assert not actnorm_relu_forward(a, bias, logs)[1]


def test_competitor_is_started_and_stopped():
    """--compete's competing process runs inside the context and is gone after it."""
    with bench.Competitor() as comp:
        assert comp.proc.poll() is None
    assert comp.proc.poll() is not None
