"""Tests of flownp.stability: exact amplification measurements, the dominance bounds, the
detection of unstable kernels, and the guard parameterisation (values and exact backward)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flownp import stability as S
from flownp.errors import SingularKernelError
from flownp.kernels import conv as K_
from flownp.layers.base import Layer
from flownp.layers.cinc import CInCConv, corner_mask
from flownp.testing import randomize_params
from verification.fixed_kernel import FixedKernelCInC


def _dense(layer: Layer, H: int, W: int) -> np.ndarray:
    return S.dense_matrix(lambda e: S._forward_only(layer, e), H, W, layer.channels)


def _random_kernel(rng, k, C, scale, *, masked=True, sign=None):
    """Random (k, k, C, C) kernel: corner diagonal `sign`*1 (or random-signed 0.5..2)."""
    K = scale * rng.standard_normal((k, k, C, C))
    if masked:
        K[-1, -1] = np.triu(K[-1, -1])
    d = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C) if sign is None else sign * np.ones(C)
    K[-1, -1, np.arange(C), np.arange(C)] = d
    return K


def _worst_sign_kernel(k, C, m):
    """Unit corner diagonal, every other tap -m (an M-matrix: all-positive inverse)."""
    K = -m * np.ones((k, k, C, C))
    K[-1, -1] = np.triu(K[-1, -1])
    K[-1, -1, np.arange(C), np.arange(C)] = 1.0
    return K


def _scale_to_ratio(K, ratio):
    """Rescale the off-diagonal taps of every output channel to r_o / |d_o| = ratio."""
    k, C = K.shape[0], K.shape[2]
    idx = np.arange(C)
    d = K[k - 1, k - 1, idx, idx].copy()
    K = K.copy()
    K[k - 1, k - 1, idx, idx] = 0
    r = np.abs(K).sum(axis=(0, 1, 2))
    K *= ratio * np.abs(d) / np.where(r > 0, r, 1.0)
    K[k - 1, k - 1, idx, idx] = d
    return K


# --------------------------------------------------------------------------- measurements


@pytest.mark.parametrize("corner", ["triangular", "unit", "lu"])
def test_solve_transpose_inverts_the_backward_convolution(corner, rng):
    lay = CInCConv(3, 3, corner=corner, init_std=0.3, seed=2)
    randomize_params(lay, rng, 0.1)
    K = lay.kernel
    z = rng.standard_normal((2, 4, 5, 3))
    w = S.solve_transpose(z, K)
    assert np.abs(K_.conv_backward_input(w, K) - z).max() < 1e-12
    M = _dense(lay, 4, 5)
    w0 = np.linalg.solve(M.T, z[0].reshape(-1))
    assert np.abs(w[0].reshape(-1) - w0).max() < 1e-10 * max(1.0, np.abs(w0).max())


@given(
    k=st.integers(1, 3),
    C=st.integers(1, 3),
    H=st.integers(1, 5),
    W=st.integers(1, 5),
    scale=st.sampled_from([0.05, 0.3, 0.8]),
    seed=st.integers(0, 10**6),
)
def test_impulse_norms_equal_dense_inverse_norms(k, C, H, W, scale, seed):
    rng = np.random.default_rng(seed)
    K = _random_kernel(rng, k, C, scale)
    Minv = np.linalg.inv(_dense(FixedKernelCInC(K), H, W))
    h = S.impulse_responses(K, H, W)
    ht = S.impulse_responses(K, H, W, transpose=True)
    n1 = np.abs(Minv).sum(axis=0).max()
    ninf = np.abs(Minv).sum(axis=1).max()
    assert S._abs_max_sum(h) == pytest.approx(n1, rel=1e-9)
    assert S._abs_max_sum(ht) == pytest.approx(ninf, rel=1e-9)
    # the truncation property: the n x n norm is read from the same impulse response
    a = S.amplification_by_size(ht)
    for n in range(1, min(H, W) + 1):
        Mn = np.linalg.inv(_dense(FixedKernelCInC(K), n, n))
        assert a[n - 1] == pytest.approx(np.abs(Mn).sum(axis=1).max(), rel=1e-9)


def test_power_iteration_matches_svd(rng):
    K = _random_kernel(rng, 3, 2, 0.4)
    lay = FixedKernelCInC(K)
    est = S.measure_layer(lay, 5, 4).norm_2
    exact = np.linalg.norm(np.linalg.inv(_dense(lay, 5, 4)), 2)
    assert est <= exact * (1 + 1e-12)
    assert est == pytest.approx(exact, rel=1e-6)


# --------------------------------------------------------------------------- the bounds


@given(
    k=st.integers(1, 3),
    C=st.integers(1, 3),
    H=st.integers(1, 6),
    W=st.integers(1, 6),
    ratio=st.floats(0.0, 0.98),
    masked=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_dominance_bounds_hold_for_exact_inverse(k, C, H, W, ratio, masked, seed):
    rng = np.random.default_rng(seed)
    K = _scale_to_ratio(_random_kernel(rng, k, C, 1.0, masked=masked), ratio)
    m = S.kernel_margins(K)
    has_taps = k > 1 or C > 1
    assert m.max_ratio == pytest.approx(ratio if has_taps else 0.0, abs=1e-12)
    Minv = np.linalg.inv(_dense(FixedKernelCInC(K, masked=masked), H, W))
    ninf = np.abs(Minv).sum(axis=1).max()
    assert np.isfinite(m.row_bound)
    assert ninf <= m.row_bound * (1 + 1e-10)
    if m.block_ratio < 1:
        assert ninf <= m.block_bound * (1 + 1e-10)


def test_varah_bound_is_attained_by_m_matrix_kernels():
    # all taps -m against d = 1: M^{-1} >= 0 and its row sums tend to 1 / (1 - r) with size
    K = _worst_sign_kernel(3, 1, 0.1)  # r = 0.8
    m = S.kernel_margins(K)
    assert m.row_bound == pytest.approx(5.0)
    a = S.amplification_by_size(S.impulse_responses(K, 40, 40, transpose=True))
    assert np.all(np.diff(a) >= 0) and a[-1] <= 5.0 * (1 + 1e-12)
    assert a[-1] > 0.99 * 5.0


def test_violating_dominance_grows_exponentially_and_breaks_float64():
    K = _worst_sign_kernel(3, 16, 0.1)  # r / d = 14.3
    lay = FixedKernelCInC(K)
    rep = S.measure_layer(lay, 14, 14, power_iters=0)
    assert rep.max_ratio > 1 and not rep.dominant
    assert rep.norm_inf > 1e20 and rep.growth > 10
    assert rep.roundtrip_f64 > 1e-2  # order-1 garbage even in float64
    assert rep.status == "unstable"
    a = S.amplification_by_size(S.impulse_responses(K, 14, 14, transpose=True))
    slope = np.polyfit(np.arange(7, 15), np.log(a[6:]), 1)[0]
    assert slope > 2.0  # log-linear: exponential growth with the image side


def test_unstable_kernel_is_detected_and_reported(rng):
    bad = FixedKernelCInC(_worst_sign_kernel(3, 4, 0.3))
    good = FixedKernelCInC(_scale_to_ratio(_random_kernel(rng, 3, 4, 1.0), 0.5))
    rows = [
        S.measure_layer(good, 14, 14, name="flow/good"),
        S.measure_layer(bad, 14, 14, name="flow/bad"),
    ]
    assert rows[0].status == "ok" and rows[0].dominant
    assert rows[0].norm_inf <= rows[0].bound * (1 + 1e-10)
    assert rows[1].status == "unstable" and rows[1].roundtrip_f32 > 1e-4
    assert any("not diagonally dominant" in n for n in rows[1].notes)
    with pytest.warns(S.InverseInstabilityWarning, match="flow/bad"):
        flagged = S.warn_unstable(rows)
    assert [r.name for r in flagged] == ["flow/bad"]
    table = S.format_report(rows)
    assert "flow/bad" in table and "unstable" in table


def test_at_risk_when_condition_is_large_but_roundtrip_passes():
    lay = FixedKernelCInC(_worst_sign_kernel(3, 1, 0.2))  # ratio 1.6, moderate growth
    rep = S.measure_layer(lay, 8, 8, thresholds=S.StabilityThresholds(max_condition=10.0))
    assert rep.roundtrip_f32 < 1e-4
    assert rep.status == "at-risk" and rep.condition > 10.0


def test_measurement_is_reproducible(rng):
    lay = CInCConv(4, 3, corner="triangular", init_std=0.2, seed=5, dtype=np.float32)
    randomize_params(lay, rng, 0.2)
    a = S.measure_layer(lay, 9, 7, seed=3).as_dict()
    b = S.measure_layer(lay, 9, 7, seed=3).as_dict()
    c = S.measure_layer(S.cast_layer(lay, np.float64), 9, 7, seed=3).as_dict()
    assert a == b
    for key in ("norm_inf", "norm_1", "norm_2", "max_ratio", "roundtrip_f32"):
        assert a[key] == c[key]


def test_cast_layer_copies_and_converts():
    lay = CInCConv(3, 2, corner="lu", init_std=0.2, seed=1)
    lay32 = S.cast_layer(lay, np.float32)
    assert lay32.dtype == np.float32 and lay.dtype == np.float64
    assert all(p.dtype == np.float32 for p in lay32.params.values())
    assert lay32.params["weight"] is not lay.params["weight"]
    assert np.allclose(lay32.kernel, lay.kernel, atol=1e-6)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
    assert lay32.forward(x)[0].dtype == np.float32


class _Wrapped(Layer):
    """A layer that is not CInC-like but declares its kernel (dense measurement path)."""

    def __init__(self, inner: CInCConv) -> None:
        super().__init__(inner.dtype)
        self.channels = inner.channels
        self.inner = self.add_layer("inner", inner)

    def stability_kernels(self):
        K = self.inner.kernel
        return [(K, (K.shape[0] - 1, K.shape[0] - 1))]

    def forward(self, x):
        return self.inner.forward(x)

    def inverse(self, y):
        return self.inner.inverse(y)


def test_dense_path_agrees_with_impulse_path(rng):
    inner = FixedKernelCInC(_random_kernel(rng, 3, 2, 0.5))
    fast = S.measure_layer(inner, 5, 6)
    dense = S.measure_layer(_Wrapped(inner), 5, 6)
    for key in ("norm_1", "norm_inf", "norm_2", "condition", "max_ratio", "bound"):
        assert getattr(dense, key) == pytest.approx(getattr(fast, key), rel=1e-7)
    big = S.measure_layer(_Wrapped(inner), 5, 6, max_dense=10)
    assert big.norm_inf is None and "not computed" in big.notes[0]


class _Pair(Layer):
    def __init__(self) -> None:
        super().__init__(np.float64)
        self.a = self.add_layer("a", CInCConv(2, 3, init_std=0.1, seed=1))
        self.b = self.add_layer("b", CInCConv(8, 2, init_std=0.1, seed=2))

    def forward(self, x):
        y, l1 = self.a.forward(x)
        N, H, W, C = y.shape  # squeeze 2x2 -> 4C channels, then a second conv
        y = y.reshape(N, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 2, 4, 5)
        z, l2 = self.b.forward(np.ascontiguousarray(y.reshape(N, H // 2, W // 2, 4 * C)))
        return z, l1 + l2


def test_model_helpers_find_layers_and_shapes():
    model = _Pair()
    x = np.random.default_rng(0).standard_normal((2, 8, 6, 2))
    shapes = S.record_input_shapes(model, lambda: model.forward(x))
    assert shapes == {"a": (8, 6), "b": (4, 3)}
    assert "forward" not in vars(model.a)  # the spies are removed
    rows = S.measure_model(model, shapes)
    assert [(r.name, r.shape) for r in rows] == [("a", (8, 6, 2)), ("b", (4, 3, 8))]


# --------------------------------------------------------------------------- the guard


def _guard_inputs(rng, k, C, u_scale, dtype=np.float64):
    w = rng.standard_normal((k, k, C, C)) * corner_mask(k, C, full_corner=False)
    d = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    s = np.abs(w).sum(axis=(0, 1, 2))
    w *= u_scale * 0.7 * np.abs(d) / s  # u_o = s_o / (rho |d_o|) around u_scale (rho = 0.7)
    return w.astype(dtype), d.astype(dtype)


@pytest.mark.parametrize("mode", S.GUARD_MODES)
@pytest.mark.parametrize("u_scale", [1e-3, 0.5, 3.0, 40.0])
def test_guard_backward_matches_finite_differences(mode, u_scale, rng):
    if mode == "clip" and u_scale == 1e-3:
        u_scale = 0.2
    k, C, rho, eps = 3, 3, 0.7, 1e-6
    w, d = _guard_inputs(rng, k, C, u_scale)
    G = rng.standard_normal(w.shape)
    mask = corner_mask(k, C, full_corner=False)

    def loss(w_, d_):
        return float(np.sum(S.guard_kernel(w_, d_, rho, mode) * G))

    dw, dd = S.guard_kernel_backward(G, w, d, rho, mode)
    num_w = np.zeros_like(w)
    for idx in zip(*np.nonzero(mask), strict=True):
        wp, wm = w.copy(), w.copy()
        wp[idx] += eps
        wm[idx] -= eps
        num_w[idx] = (loss(wp, d) - loss(wm, d)) / (2 * eps)
    num_d = np.zeros_like(d)
    for o in range(C):
        dp, dm = d.copy(), d.copy()
        dp[o] += eps
        dm[o] -= eps
        num_d[o] = (loss(w, dp) - loss(w, dm)) / (2 * eps)
    assert np.abs(dw * mask - num_w).max() < 1e-7
    assert np.abs(dd - num_d).max() < 1e-7
    assert np.all(dw[k - 1, k - 1, np.arange(C), np.arange(C)] == 0)


@pytest.mark.parametrize("mode", S.GUARD_MODES)
def test_guard_taps_backward_budget(mode, rng):
    w = rng.standard_normal((2, 2, 3, 4))
    t = rng.uniform(0.5, 3.0, 4)
    G = rng.standard_normal(w.shape)
    _, dt = S.guard_taps_backward(G, w, t, mode)
    eps = 1e-6
    for o in range(4):
        tp, tm = t.copy(), t.copy()
        tp[o] += eps
        tm[o] -= eps
        num = np.sum(S.guard_taps(w, tp, mode) * G) - np.sum(S.guard_taps(w, tm, mode) * G)
        assert dt[o] == pytest.approx(num / (2 * eps), abs=1e-7)


def test_guard_is_identity_like_for_small_taps_and_keeps_the_diagonal(rng):
    w, d = _guard_inputs(rng, 3, 2, 0.5)
    K = S.guard_kernel(w, d, 0.7, "clip")  # u < 1: clip leaves the taps unchanged
    assert np.array_equal(K[:, :, :, :] * corner_mask(3, 2, full_corner=False), w)
    assert np.array_equal(np.diagonal(K[-1, -1]), d)


@pytest.mark.parametrize("mode", S.GUARD_MODES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_guard_keeps_layer_dominant_through_random_steps(mode, dtype):
    rng = np.random.default_rng(7)
    k, C, rho = 3, 4, 0.9
    mask = corner_mask(k, C, full_corner=False).astype(dtype)
    weight = (0.01 * rng.standard_normal((k, k, C, C)) * mask).astype(dtype)
    log_diag = np.zeros(C, dtype=dtype)
    sign = rng.choice([-1.0, 1.0], C).astype(dtype)
    raw_weight, raw_logd = weight.copy(), log_diag.copy()  # the same walk, unguarded
    worst = 0.0
    for step in range(300):
        g_w = rng.standard_cauchy(weight.shape).clip(-1e3, 1e3) - 0.5 * np.sign(weight)
        g_d = rng.standard_normal(C)
        for w_, ld_ in ((weight, log_diag), (raw_weight, raw_logd)):
            w_ -= (0.05 * g_w * mask).astype(dtype)  # in place, as the optimiser does
            ld_ -= (0.05 * g_d).astype(dtype)
        d = sign * np.exp(log_diag)
        K = S.guard_kernel(weight * mask, d, rho, mode)
        assert K.dtype == dtype
        m = S.kernel_margins(K)
        worst = max(worst, m.max_ratio)
        assert m.max_ratio <= rho * (1 + 1e-5)
        if step % 60 == 59:
            bound = 1.0 / ((1 - rho) * np.abs(d.astype(np.float64)).min())
            assert m.row_bound <= bound * (1 + 1e-4)
            lay = FixedKernelCInC(K)
            rep = S.measure_layer(lay, 16, 16, power_iters=0)
            assert rep.norm_inf <= bound * (1 + 1e-4)
            assert rep.roundtrip_f32 < 1e-5 and rep.status == "ok"
    assert worst > 0.5 * rho  # the walk did push against the boundary
    unguarded = raw_weight * mask
    unguarded[-1, -1, np.arange(C), np.arange(C)] = sign * np.exp(raw_logd)
    assert S.kernel_margins(unguarded).max_ratio > 1.0  # without the guard it leaves


def test_guard_rejects_bad_arguments(rng):
    w, d = _guard_inputs(rng, 3, 2, 1.0)
    with pytest.raises(ValueError, match="rho"):
        S.guard_kernel(w, d, 1.0)
    with pytest.raises(ValueError, match="mode"):
        S.guard_kernel(w, d, 0.5, "softplus")
    bad = w.copy()
    bad[-1, -1, 0, 0] = 1.0
    with pytest.raises(ValueError, match="corner diagonal"):
        S.guard_kernel(bad, d, 0.5)
    with pytest.raises(SingularKernelError):
        S.guard_kernel(w, np.array([1.0, 0.0]), 0.5)
    nan = w.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        S.guard_kernel(nan, d, 0.5)


def test_lu_block_guard_budget_and_gradient(rng):
    A = np.eye(3) + 0.3 * rng.standard_normal((3, 3))
    n, dn = S.corner_inverse_norm(A)
    assert n == pytest.approx(np.abs(np.linalg.inv(A)).sum(axis=1).max())
    eps = 1e-6
    num = np.zeros_like(A)
    for i in range(3):
        for j in range(3):
            Ap, Am = A.copy(), A.copy()
            Ap[i, j] += eps
            Am[i, j] -= eps
            num[i, j] = (S.corner_inverse_norm(Ap)[0] - S.corner_inverse_norm(Am)[0]) / (2 * eps)
    assert np.abs(dn - num).max() < 1e-6
    # off-corner taps guarded with budget rho / ||A^-1||: block ratio < rho
    W = 5.0 * rng.standard_normal((3, 3, 3, 3))
    W[-1, -1] = 0
    K = S.guard_taps(W, np.full(3, 0.8 / n))
    K[-1, -1] = A.T
    m = S.kernel_margins(K)
    assert m.block_ratio < 0.8
    Minv = np.linalg.inv(_dense(FixedKernelCInC(K, masked=False), 5, 5))
    assert np.abs(Minv).sum(axis=1).max() <= m.block_bound * (1 + 1e-10)


def test_verification_section_quick(tmp_path):
    from verification import stability as V

    results = V.run(str(tmp_path), quick=True)
    assert [r.name for r in results] == [
        "stability_dominance_bound",
        "stability_violation",
        "stability_guard",
    ]
    assert all(r.passed for r in results), [r.name for r in results if not r.passed]
    assert (tmp_path / V.FIGURE).stat().st_size > 10_000


# --------------------------------------------------------------------------- whole models


def _tiny_model(shape=(16, 16, 1), **kw):
    """Unguarded by default (so that an unstable kernel can be injected)."""
    from flownp.model import FlowConfig, FlowModel

    kw.setdefault("guard", None)
    cfg = FlowConfig(
        image_shape=shape,
        levels=1,
        depth=2,
        width=8,
        cinc_corner="triangular",
        dtype="float32",
        **kw,
    )
    model = FlowModel(cfg, seed=1)
    x = np.random.default_rng(2).uniform(-0.5, 0.5, (8, *shape)).astype(np.float32)
    model.initialize(x)
    return model, x


def _make_unstable(weight):
    """Worst-sign taps of 0.2 against the unit diagonal (ratio 7 for C = 4)."""
    C = weight.shape[2]
    weight[...] = -0.2 * corner_mask(3, C, full_corner=False)


def test_model_report_detects_an_unstable_layer(monkeypatch):
    model, x = _tiny_model()
    ok = S.measure_model_stability(model, x)
    assert ok.status == "ok" and ok.warning() is None
    assert ok.roundtrip_f32 < 1e-5 and ok.roundtrip_f64 < 1e-12
    assert [r.name for r in ok.layers] == ["level0/step0/conv", "level0/step1/conv"]
    _make_unstable(model.params["level0/step1/conv/weight"])
    bad = S.measure_model_stability(model, x)
    assert bad.status == "unstable"
    assert bad.roundtrip_f32 > 1e-4  # the model's reconstructions are wrong in float32
    assert [r.status for r in bad.layers] == ["ok", "unstable"]
    assert bad.layers[1].growth > 2 and bad.layers[1].norm_inf > 1e6
    msg = bad.warning()
    assert "level0/step1/conv" in msg and "level0/step0/conv" not in msg
    assert "float32 reconstruction error" in msg
    assert "level0/step1/conv" in bad.format() and "unstable" in bad.format()
    # solving the substitutions in float64 does not repair it: the float32 forward's rounding
    # is amplified by ||M^-1|| whatever the precision of the solve (docs/stability.md)
    assert bad.solve_f64_roundtrip_f32 > 1e-4
    choice = S.choose_solve_dtypes(model, "auto")
    assert choice == {"level0/step0/conv": None, "level0/step1/conv": np.float64}
    # the choice reaches the layers: "auto" solves step1 in float64, as "float64" does, and
    # step0 in the model's dtype
    z, _ = model.forward(x)
    model.clear_cache()
    step0 = dict(S.iter_invertible_convs(model))["level0/step0/conv"]
    calls = []
    real = type(step0).inverse

    def spy(self, y, method=None, *, solve_dtype=None):
        calls.append((self is step0, solve_dtype))
        return real(self, y, method, solve_dtype=solve_dtype)

    monkeypatch.setattr(type(step0), "inverse", spy)
    model.inverse(z, solve_precision="auto")
    model.inverse(z)
    assert calls == [(False, np.float64), (True, None), (False, None), (True, None)]


def test_guarded_model_cannot_be_made_unstable_by_the_same_taps():
    model, x = _tiny_model(guard=0.9)
    _make_unstable(model.params["level0/step1/conv/weight"])
    rep = S.measure_model_stability(model, x)
    assert rep.status == "ok" and rep.roundtrip_f32 < 1e-5
    assert max(r.max_ratio for r in rep.layers) <= 0.9 * (1 + 1e-6)


def test_training_checkpoints_log_warn_and_store_stability(tmp_path):
    from types import SimpleNamespace

    from flownp.checkpoint import load_model, read_checkpoint
    from flownp.data.pixels import dequantize
    from flownp.model import FlowConfig
    from flownp.train import STABILITY_COLUMNS, TrainConfig, Trainer

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (80, 16, 16, 1)).astype(np.uint8)
    data = SimpleNamespace(train=imgs[:64], test=imgs[64:], shape=(16, 16, 1))
    cfg = FlowConfig(
        image_shape=(16, 16, 1), levels=1, depth=1, width=4, cinc_corner="triangular", guard=None
    )
    tc = TrainConfig(
        steps=4, batch_size=16, init_batch_size=16, eval_every=0, checkpoint_every=2, seed=3
    )
    logs: list[str] = []
    tr = Trainer(cfg, tc, data, out_dir=tmp_path, log=logs.append)
    tr.run()
    stab = tr.metrics["stability"]
    assert stab["step"] == [2.0, 4.0]  # every checkpoint, including the final one
    assert sum("inverse stability" in m for m in logs) == 2
    assert not any("WARNING" in m for m in logs)
    assert "level0/step0/conv" in (tmp_path / "stability.txt").read_text()
    # the report of the checkpoint is reproducible: same numbers from the saved EMA weights
    ck = read_checkpoint(tmp_path / "checkpoint.h5")
    for c in STABILITY_COLUMNS:
        assert ck.metrics["stability"][c].tolist() == stab[c]
    x = dequantize(data.test[: tc.stability_images], np.random.default_rng([3, 4]), np.float32)
    reports = [S.measure_model_stability(load_model(tmp_path / "checkpoint.h5"), x) for _ in "ab"]
    assert reports[0].summary() == reports[1].summary()
    assert reports[0].format() == reports[1].format()
    again = reports[0].summary()
    assert [again[c] for c in STABILITY_COLUMNS[1:]] == [stab[c][-1] for c in STABILITY_COLUMNS[1:]]
    # an unstable layer (in the weights the measurement uses: the EMA) is warned about clearly
    for store in (tr.model.params, tr.optimizer.ema):
        _make_unstable(store["level0/step0/conv/weight"])
    with pytest.warns(S.InverseInstabilityWarning, match="level0/step0/conv"):
        rep = tr.check_stability()
    assert rep.status == "unstable"
    assert any(m.startswith("step 4: WARNING: INVERSE UNSTABLE") for m in logs)
    assert tr.metrics["stability"]["layers_not_ok"][-1] == 1.0


def test_evaluate_command_prints_a_reproducible_stability_report(tmp_path, capsys):
    from flownp import cli
    from flownp.checkpoint import save_checkpoint

    model, _ = _tiny_model((28, 28, 1))  # the bundled MNIST
    ckpt = save_checkpoint(tmp_path / "m.h5", model, train_config={"dataset": "mnist"})
    outs = []
    for _ in range(2):
        argv = ["evaluate", str(ckpt), "--no-progress", "--limit", "8", "--dataset", "mnist"]
        assert cli.main(argv) != 2
        outs.append(capsys.readouterr())
    assert "model round trip x -> z -> x on 8 image(s)" in outs[0].out
    assert "level0/step1/conv" in outs[0].out and "status: ok" in outs[0].out
    strip = [o.out.split("):\n", 1)[1].split("mnist test")[0] for o in outs]  # drop timings
    assert strip[0] == strip[1]
    _make_unstable(model.params["level0/step1/conv/weight"])
    ckpt = save_checkpoint(tmp_path / "bad.h5", model, train_config={"dataset": "mnist"})
    cli.main(["evaluate", str(ckpt), "--no-progress", "--limit", "8", "--dataset", "mnist"])
    out = capsys.readouterr()
    assert "status: unstable" in out.out
    assert "WARNING: INVERSE UNSTABLE" in out.err and "level0/step1/conv" in out.err


def test_sample_command_solve_precision(tmp_path, capsys):
    from flownp import cli
    from flownp.checkpoint import save_checkpoint

    model, _ = _tiny_model()
    ckpt = save_checkpoint(tmp_path / "m.h5", model)
    out = {}
    for p in ("model", "float64", "auto"):
        npz = tmp_path / f"{p}.npz"
        argv = ["sample", str(ckpt), "-n", "4", "--out", str(tmp_path / f"{p}.png")]
        assert cli.main([*argv, "--npz", str(npz), "--solve-precision", p]) == 0
        out[p] = np.load(npz)["images"]
    x64 = model.sample(4, temperature=0.8, seed=0, solve_precision="float64")
    from flownp.data.pixels import to_uint8

    np.testing.assert_array_equal(out["float64"], to_uint8(x64))
    # a well-conditioned model: the precision changes no pixel
    np.testing.assert_array_equal(out["model"], out["float64"])
    with pytest.raises(SystemExit):  # argparse rejects an unknown precision
        cli.main(["sample", str(ckpt), "--solve-precision", "float16"])


def test_stability_log_of_a_model_without_substitutions_names_that(tmp_path):
    from types import SimpleNamespace

    from flownp.model import FlowConfig
    from flownp.train import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (48, 8, 8, 1)).astype(np.uint8)
    data = SimpleNamespace(train=imgs[:32], test=imgs[32:], shape=(8, 8, 1))
    cfg = FlowConfig(image_shape=(8, 8, 1), levels=1, depth=1, width=4, conv="1x1")
    tc = TrainConfig(steps=2, batch_size=16, init_batch_size=16, eval_every=0, seed=3)
    logs: list[str] = []
    Trainer(cfg, tc, data, out_dir=tmp_path, log=logs.append).run()
    (line,) = [m for m in logs if "inverse stability" in m]
    assert "no layer inverts by substitution" in line and "nan" not in line
