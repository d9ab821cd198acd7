"""The explicit-matrix verification: the dense builder on hand-computed cases, every claim
passes (quick sizes), a deliberately wrong kernel makes claims FAIL, the report command."""

import dataclasses
import os

import numpy as np
import pytest

import flownp.kernels.conv as conv_module
import flownp.kernels.solve as solve_module
from flownp import cli, threads
from flownp.layers import CInCConv
from verification import claims as V
from verification import dense as D
from verification.__main__ import SECTIONS, run_verification
from verification.claims import layers as VL
from verification.fixed_kernel import FixedKernelCInC
from verification.result import ClaimResult

# --------------------------------------------------------------------------------------------
# The dense builder on cases computed by hand
# --------------------------------------------------------------------------------------------


def test_vectorisation_is_numpy_reshape():
    H, W, C = 3, 4, 2
    x = np.arange(H * W * C).reshape(H, W, C)
    for i, j, c in np.ndindex(H, W, C):
        assert x.reshape(-1)[D.vec_index(i, j, c, W, C)] == x[i, j, c]


def test_dense_top_left_k2_by_hand():
    # K[a, b] = [[1, 2], [3, 4]], C = 1, 2x2 image, padding (t, b, l, r) = (1, 0, 1, 0):
    # y[i, j] = sum_ab x[i + a - 1, j + b - 1] K[a, b]
    #   y00 = 4 x00
    #   y01 = 3 x00 + 4 x01
    #   y10 = 2 x00 + 4 x10
    #   y11 = 1 x00 + 2 x01 + 3 x10 + 4 x11
    K = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    expected = np.array([[4, 0, 0, 0], [3, 4, 0, 0], [2, 0, 4, 0], [1, 2, 3, 4]], dtype=float)
    np.testing.assert_array_equal(D.conv_matrix(K, 2, 2, "top_left"), expected)
    assert D.exact_det(expected) == 4**4


def test_dense_same_k2_and_k3_by_hand():
    # k = 2 "same": (t, b, l, r) = (0, 1, 0, 1), y[i, j] = sum_ab x[i + a, j + b] K[a, b]
    K = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    expected = np.array([[1, 2, 3, 4], [0, 1, 0, 3], [0, 0, 1, 2], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(D.conv_matrix(K, 2, 2, "same"), expected)
    # k = 3 "same" on a 1x3 image: y[j] = sum_b x[j + b - 1] K[1, b] (rows 0, 2 read padding)
    K3 = np.arange(1.0, 10.0).reshape(3, 3, 1, 1)  # K[1] = [4, 5, 6]
    expected3 = np.array([[5, 6, 0], [4, 5, 6], [0, 4, 5]], dtype=float)
    np.testing.assert_array_equal(D.conv_matrix(K3, 1, 3, "same"), expected3)
    # Definition 2 with explicit amounts: a VALID convolution shrinks the output
    assert D.conv_matrix(K3, 3, 4, (0, 0, 0, 0)).shape == (1 * 2, 3 * 4)


def test_dense_channel_order_and_mask_by_hand():
    # k = 1, one row of 2 pixels, C = 2: y[o] = sum_c x[c] K[c, o]; K[0, 0] = [[1, 2], [3, 4]]
    # per pixel block [[K00, K10], [K01, K11]] = [[1, 3], [2, 4]] (rows o, columns c);
    # the mask removes K[c=1, o=0] = 3: output channel 0 must not read input channel 1
    K = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    blk = np.array([[1.0, 3.0], [2.0, 4.0]])
    np.testing.assert_array_equal(D.conv_matrix(K, 1, 2), np.kron(np.eye(2), blk))
    masked = np.array([[1.0, 0.0], [2.0, 4.0]])
    np.testing.assert_array_equal(
        D.conv_matrix(K, 1, 2, corner="masked"), np.kron(np.eye(2), masked)
    )
    # the layer's convention is the same: its dense Jacobian on this kernel
    Km = D.masked_kernel(K)
    layer = FixedKernelCInC(Km)
    e = np.eye(4).reshape(4, 1, 2, 2)
    cols = np.stack([layer.forward(e[i : i + 1])[0].reshape(-1) for i in range(4)], axis=1)
    np.testing.assert_array_equal(cols, np.kron(np.eye(2), masked))


def test_exact_det():
    assert D.exact_det(np.array([[0, 1], [1, 0]])) == -1  # needs a row swap
    assert D.exact_det(np.array([[2, -1, 0], [-1, 2, -1], [0, -1, 2]])) == 4
    assert D.exact_det(np.array([[1, 2], [2, 4]])) == 0
    assert D.exact_det(np.zeros((3, 3))) == 0
    assert D.exact_det(np.array([[7]])) == 7
    big = np.diag([3.0] * 40)  # 3^40 > 2^53: exact only in integers
    assert D.exact_det(big) == 3**40
    with pytest.raises(ValueError, match="non-integer"):
        D.exact_det(np.array([[0.5]]))


def test_masked_kernel_uses_the_current_pixel_tap():
    K = np.ones((3, 3, 2, 2))
    tl = D.masked_kernel(K, "top_left")
    assert tl[2, 2, 1, 0] == 0 and tl.sum() == K.sum() - 1
    same = D.masked_kernel(K, "same")
    assert same[1, 1, 1, 0] == 0 and same.sum() == K.sum() - 1


# --------------------------------------------------------------------------------------------
# Every claim passes (quick)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every claim of the sections cinc, layers and beyond, quick sizes, run once for this
    module (one thread, as ``python -m verification`` runs them)."""
    out = tmp_path_factory.mktemp("report")
    with threads.limit(1):
        results = V.run_claims(str(out), quick=True, verbose=False)
        results += V.run_layer_claims(str(out), quick=True, verbose=False)
        results += V.run_beyond_claims(str(out), quick=True, verbose=False)
    return out, results


EXPECTED = [
    # section cinc (paper Section 3.1)
    "lemma1",
    "theorem1",
    "general_c",
    "symmetric_counterexamples",
    "layer_vs_dense",
    "figure1",
    # section layers
    "layer_jacobians",
    "layer_gradients",
    "quad_structure",
    "models",
    # section beyond
    "wavefront_depth",
    "quad_official_reverse_bug",
    "periodic_convolution",
]


@pytest.mark.parametrize("name", EXPECTED)
def test_claim_passes(name, quick_results):
    res = {r.name: r for r in quick_results[1]}[name]
    assert isinstance(res, ClaimResult)
    assert res.passed, V.describe(res)
    assert res.statement and res.computed and res.numbers


def test_the_report_has_every_expected_claim(quick_results):
    assert [r.name for r in quick_results[1]] == EXPECTED


def test_figure1_claim(quick_results):
    out, results = quick_results
    res = {r.name: r for r in results}["figure1"]
    assert len(res.figures) == 1 and (out / "figure1.png").stat().st_size > 10_000
    ranks = {p["panel"]: p["rank"] for p in res.numbers}
    assert ranks == {"(a) symmetric": 32, "(b) top-left": 32, "(c) top-left, masked": 32}


def test_symmetric_counterexamples_are_singular(quick_results):
    res = {r.name: r for r in quick_results[1]}["symmetric_counterexamples"]
    rows = res.numbers["counterexamples"]
    assert len(rows) >= 2 and any(r["C"] == 2 for r in rows)
    for r in rows:
        assert r["same pad: exact det"] == 0 and r["top-left: exact det"] != 0


def test_layer_factories_registry():
    names = set(V.LAYER_FACTORIES)
    for corner in ("triangular", "unit", "lu"):
        for k in (1, 2, 3):
            assert f"CInCConv(k={k}, corner={corner})" in names
    for k in (1, 3, 5):
        assert f"EmergingConv(k={k})" in names
    for cls in ("AffineCoupling", "QuadCoupling"):
        for scale in ("sigmoid", "exp", "softclamp"):
            assert f"{cls}(scale={scale})" in names
    for name in ("ActNorm", "Conv1x1(lu=False)", "Conv1x1(lu=True)", "Squeeze", "Split"):
        assert name in names
    assert "LearnedPrior" in names and any("Conditioner" in n for n in V.GRADIENT_ONLY_FACTORIES)


def test_every_layer_class_is_registered():
    """Every flow layer class exported by flownp.layers appears in a registry."""
    import flownp.layers as L

    made = {}
    rng = np.random.default_rng(0)
    for name, make in {**V.LAYER_FACTORIES, **V.GRADIENT_ONLY_FACTORIES}.items():
        layer, _ = make(rng)
        inner = layer
        for wrapped in ("split", "net", "prior"):
            inner = getattr(layer, wrapped, None) or inner
        made[type(inner).__name__] = name
    assert set(L.__all__) - {"Layer"} <= set(made), set(L.__all__) - set(made)


def test_model_claim_covers_every_conv_and_coupling(quick_results):
    from flownp.model import CONVS, COUPLINGS

    cases = {(c, cp) for c, cp, _ in VL._model_cases(quick=False)}
    assert cases >= {(c, cp) for c in CONVS for cp in COUPLINGS}
    res = {r.name: r for r in quick_results[1]}["models"]
    assert len(res.numbers) >= 2 and res.figures
    assert all(r["grad arrays"] > 30 for r in res.numbers)  # every parameter array checked


def test_figures_written(quick_results):
    out, results = quick_results
    for name in ("figure1.png", "model_jacobian.png", "quad_coupling_jacobian.png"):
        assert (out / name).stat().st_size > 10_000
    by = {r.name: r for r in results}
    assert by["quad_structure"].figures and by["models"].figures


def test_wavefront_depth_measures_the_dag():
    """dependency_levels is a real measurement: a kernel whose only off-corner tap is the left
    neighbour makes every row independent (depth W, level = column + 1); one with the upper
    neighbour only gives depth H."""
    H, W, C = 4, 6, 2
    K = np.zeros((2, 2, C, C))
    K[1, 1] = np.eye(C)
    K[1, 0] = 1.0  # tap (1, 0): the pixel to the left
    lev, slev = V.dependency_levels(D.conv_matrix(K, H, W, "top_left", "masked"), C)
    assert lev.max() == W and np.array_equal(
        lev.reshape(H, W), np.tile(np.arange(1, W + 1), (H, 1))
    )
    K[1, 0], K[0, 1] = 0.0, 1.0  # only the pixel above
    lev, _ = V.dependency_levels(D.conv_matrix(K, H, W, "top_left", "masked"), C)
    assert lev.max() == H
    with pytest.raises(ValueError, match="not block lower triangular"):
        V.dependency_levels(D.conv_matrix(np.ones((3, 3, 1, 1)), 3, 3, "same"), 1)


def test_wavefront_claim_numbers(quick_results):
    res = {r.name: r for r in quick_results[1]}["wavefront_depth"]
    for r in res.numbers:
        expect = r["H"] + r["W"] - 1 if r["k"] >= 2 else 1
        assert r["pixel DAG depth"] == expect and r["one-channel depth"] == expect * r["C"]


def test_quad_bug_claim_fails_if_the_reverse_were_correct(monkeypatch):
    """The reproduction is only a reproduction if it differs: with the correct inverse in
    place of the official reverse, the claim must fail."""
    from verification.claims import beyond

    monkeypatch.setattr(beyond, "official_bug_inverse", lambda layer, y: layer.inverse(y))
    res = V.claim_quad_official_bug(verbose=False)
    assert not res.passed
    assert max(r["official reverse: max |reverse(y) - x|"] for r in res.numbers) < 1e-10


def test_quad_bug_numbers(quick_results):
    res = {r.name: r for r in quick_results[1]}["quad_official_reverse_bug"]
    for r in res.numbers:
        assert (
            r["flownp inverse: max |inverse(y) - x|"]
            < 1e-10
            < 0.1
            < r["official reverse: max |reverse(y) - x|"]
        )


def test_periodic_claim_fails_with_a_wrong_logdet_or_without_the_singularity_rule(monkeypatch):
    """Counting every column of the half spectrum once (a plausible porting slip) must fail
    the claim, and so must a layer that accepts the singular Laplacian."""
    from flownp.layers import periodic

    with monkeypatch.context() as m:
        m.setattr(periodic, "frequency_weights", lambda W: np.ones(W // 2 + 1))
        assert not V.claim_periodic(verbose=False).passed
    real = periodic.block_factors
    monkeypatch.setattr(periodic, "block_factors", lambda B, dtype, who: real(B + 1e-3, dtype, who))
    res = V.claim_periodic(verbose=False)
    assert not res.passed
    assert res.numbers["Laplacian kernel: the layer refuses it"] == "NOT REFUSED"


# --------------------------------------------------------------------------------------------
# Wrong kernels make claims FAIL
# --------------------------------------------------------------------------------------------


def test_wrong_forward_kernel_fails(monkeypatch):
    """A forward that reads the kernel's taps transposed (K[b, a]): the layer no longer
    matches its dense matrix."""
    from flownp.kernels import conv_planar

    good = conv_module.conv_forward
    monkeypatch.setattr(
        conv_module, "conv_forward", lambda x, K, out=None: good(x, K.transpose(1, 0, 2, 3))
    )
    good_planar = conv_planar.conv_forward_planar  # the path of layers of <= 8 channels
    monkeypatch.setattr(
        conv_planar, "conv_forward_planar", lambda x, K: good_planar(x, K.transpose(1, 0, 2, 3))
    )
    res = V.claim_layer_dense(verbose=False, modes=("triangular", "lu"), kernel_sizes=(3,))
    assert not res.passed
    assert max(r["max rel |y - M x|"] for r in res.numbers) > 1e-3


def test_wrong_inverse_kernel_fails(monkeypatch):
    """A wavefront solve that drops the taps of the previous row: the inverse is wrong."""
    good = solve_module.solve_wavefront

    def bad(y, K, L, U, perm):
        if K.shape[0] > 1:
            K = K.copy()
            K[-2] = 0.0  # taps (k-2, b): the row above
        return good(y, K, L, U, perm)

    monkeypatch.setattr(solve_module, "solve_wavefront", bad)
    res = V.claim_layer_dense(verbose=False, modes=("triangular", "lu"), kernel_sizes=(3,))
    assert not res.passed
    assert max(r["max rel |inverse - dense solve|"] for r in res.numbers) > 1e-3


def test_wrong_logdet_fails():
    class OffByOne(CInCConv):
        def logdet_per_pixel(self):
            return super().logdet_per_pixel() + 1e-3

    def make(rng):
        return OffByOne(2, 2, seed=1), rng.standard_normal((1, 2, 3, 2))

    res = V.claim_layer_jacobians(verbose=False, factories={"bad": make})
    assert not res.passed and res.numbers[0]["max |logdet - slogdet(J)|"] > 1e-3


def test_wrong_backward_fails_gradient_claim():
    """An ActNorm whose backward forgets the dlogdet term of d/dlogs."""
    from flownp.layers import ActNorm

    class NoLogdetGrad(ActNorm):
        def backward(self, dy, dlogdet):
            return super().backward(dy, np.zeros_like(dlogdet))

    def make(rng):
        layer = NoLogdetGrad(2)
        x = rng.standard_normal((2, 2, 3, 2))
        layer.forward(x)
        layer.clear_cache()
        return layer, x

    res = V.claim_layer_gradients(verbose=False, factories={"bad": make})
    assert not res.passed and res.numbers[0]["worst array"] == "logs"


def test_wrong_model_logdet_fails_model_claim(monkeypatch):
    """A top prior that adds 1e-3 to the log-det: the whole-model check must fail."""
    from flownp.layers.split import LearnedPrior

    good = LearnedPrior.forward

    def bad(self, z):
        eps, logdet = good(self, z)
        return eps, logdet + 1e-3

    monkeypatch.setattr(LearnedPrior, "forward", bad)
    monkeypatch.setattr(VL, "_model_cases", lambda quick: [("cinc", "affine", {})])
    res = V.claim_models(verbose=False, out_dir=None)
    assert not res.passed and res.numbers[0]["max |logdet - slogdet(J)|"] > 9e-4


def test_wrong_dense_builder_fails_lemma1(monkeypatch):
    """If the 'top-left' matrix were the symmetric one, Lemma 1's check must fail."""
    good = D.conv_matrix
    monkeypatch.setattr(
        D, "conv_matrix", lambda K, H, W, padding="top_left", corner="full": good(K, H, W, "same")
    )
    assert not V.claim_lemma1(quick=True, verbose=False).passed


# --------------------------------------------------------------------------------------------
# The report command
# --------------------------------------------------------------------------------------------


def test_report_command_writes_report(tmp_path, capsys, monkeypatch, quick_results):
    """``flownp verify`` end to end, with the (already computed) quick results of the
    Section 3.1 claims standing in for a second identical run."""
    src, results = quick_results
    (tmp_path / "figure1.png").write_bytes((src / "figure1.png").read_bytes())
    moved = [
        dataclasses.replace(r, figures=[str(tmp_path / os.path.basename(f)) for f in r.figures])
        for r in results
    ]
    from verification.claims import cinc as VC

    monkeypatch.setattr(VC, "run", lambda out_dir, quick: moved)
    status = cli.main(["verify", "--quick", "--out", str(tmp_path), "--section", "cinc"])
    assert status == 0
    text = (tmp_path / "report.md").read_text()
    for name in ("lemma1", "theorem1", "general_c", "symmetric_counterexamples"):
        assert f"### {name}: PASS" in text
    assert "figure1.png" in text and (tmp_path / "figure1.png").exists()
    assert "claims pass" in capsys.readouterr().out


def test_report_exit_status_is_1_on_failure(tmp_path, monkeypatch, capsys):
    def fake(out_dir, quick):
        return [
            ClaimResult("good", "s", "c", {"x": 1.0}, True),
            ClaimResult("bad", "s", "c", [{"err": 0.5}], False),
        ]

    monkeypatch.setitem(SECTIONS, "fake", ("Fake section", "builtins:print"))
    monkeypatch.setattr("verification.__main__._section_runner", lambda spec: fake)
    assert run_verification(str(tmp_path), quick=True, sections=["fake"]) == 1
    text = (tmp_path / "report.md").read_text()
    assert "### bad: **FAIL**" in text and "### good: PASS" in text
    assert "FAILED: bad" in capsys.readouterr().out
