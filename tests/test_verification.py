"""The explicit-matrix verification: the dense builder on hand-computed cases, every claim
passes (quick sizes), a deliberately wrong kernel makes claims FAIL, the report command."""

import dataclasses
import os

import numpy as np
import pytest

import flownp.kernels.conv as conv_module
from flownp import cli
from flownp.layers import CInCConv
from verification import claims as V
from verification import dense as D
from verification.__main__ import SECTIONS, run_verification
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
    layer = CInCConv.from_kernel(Km)
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
    """Every claim of the Section 3.1 report, quick sizes, run once for this module."""
    out = tmp_path_factory.mktemp("report")
    return out, V.run_claims(str(out), quick=True, verbose=False)


EXPECTED = [
    "lemma1",
    "theorem1",
    "general_c",
    "symmetric_counterexamples",
    "layer_vs_dense",
    "layer_jacobians",
    "figure1",
]


@pytest.mark.parametrize("name", EXPECTED)
def test_claim_passes(name, quick_results):
    res = {r.name: r for r in quick_results[1]}[name]
    assert isinstance(res, ClaimResult)
    assert res.passed, V.describe(res)
    assert res.statement and res.computed and res.numbers


def test_claims_cover_the_issue(quick_results):
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
    assert any(name.startswith("ActNorm") for name in V.LAYER_FACTORIES)
    for corner in ("triangular", "unit", "lu"):
        for k in (1, 2, 3):
            assert f"CInCConv(k={k}, corner={corner})" in V.LAYER_FACTORIES


# --------------------------------------------------------------------------------------------
# Wrong kernels make claims FAIL
# --------------------------------------------------------------------------------------------


def test_wrong_forward_kernel_fails(monkeypatch):
    """A forward that reads the kernel's taps transposed (K[b, a]): the layer no longer
    matches its dense matrix."""
    good = conv_module.conv_forward
    monkeypatch.setattr(
        conv_module, "conv_forward", lambda x, K, out=None: good(x, K.transpose(1, 0, 2, 3))
    )
    res = V.claim_layer_dense(verbose=False, modes=("triangular", "lu"), kernel_sizes=(3,))
    assert not res.passed
    assert max(r["max rel |y - M x|"] for r in res.numbers) > 1e-3


def test_wrong_inverse_kernel_fails(monkeypatch):
    """A wavefront solve that drops the taps of the previous row: the inverse is wrong."""
    good = conv_module.solve_wavefront

    def bad(y, K, L, U, perm):
        if K.shape[0] > 1:
            K = K.copy()
            K[-2] = 0.0  # taps (k-2, b): the row above
        return good(y, K, L, U, perm)

    monkeypatch.setattr(conv_module, "solve_wavefront", bad)
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
    assert not res.passed and res.numbers[0]["|difference|"] > 1e-3


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
    monkeypatch.setattr(V, "run_claims", lambda out_dir, quick: moved)
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
