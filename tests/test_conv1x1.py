"""Conv1x1 (Glow's invertible 1x1 convolution), plain and LU, and the shared LU helpers."""

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from flownp.errors import SingularKernelError
from flownp.layers import _linalg
from flownp.layers.conv1x1 import Conv1x1
from flownp.testing import dense_jacobian, randomize_params

MODES = [False, True]


def make(C: int, lu: bool, rng: np.random.Generator, dtype=np.float64, seed: int = 3) -> Conv1x1:
    layer = Conv1x1(C, lu, seed=seed, dtype=dtype)
    randomize_params(layer, rng, scale=0.3)
    return layer


# ---------------------------------------------------------------------- the map itself
@pytest.mark.parametrize("lu", MODES)
def test_forward_is_per_pixel_matmul_in_kernel_layout(lu, rng):
    layer = make(3, lu, rng)
    x = rng.standard_normal((2, 3, 4, 3))
    y, _ = layer.forward(x)
    W = layer.weight_matrix
    for n, i, j in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        for o in range(3):
            ref = sum(x[n, i, j, c] * W[c, o] for c in range(3))
            assert abs(y[n, i, j, o] - ref) < 1e-13


def test_lu_weight_is_P_L_U_in_kernel_layout(rng):
    layer = make(4, True, rng)
    p, b = layer.params, layer.buffers
    P = np.zeros((4, 4))
    P[b["perm"], np.arange(4)] = 1.0  # P[perm[j], j] = 1
    L = np.tril(p["lower"], -1) + np.eye(4)
    U = np.triu(p["upper"], 1) + np.diag(b["sign"] * np.exp(p["log_s"]))
    np.testing.assert_allclose(layer.weight_matrix, P @ L @ U, rtol=0, atol=1e-14)


def test_init_is_the_same_rotation_in_both_modes():
    plain, lu = Conv1x1(5, seed=7), Conv1x1(5, lu=True, seed=7)
    W = plain.params["weight"]
    np.testing.assert_allclose(W @ W.T, np.eye(5), atol=1e-13)
    np.testing.assert_allclose(lu.weight_matrix, W, atol=1e-13)
    assert abs(plain.logdet_per_pixel()) < 1e-12
    assert abs(lu.logdet_per_pixel()) < 1e-12
    assert not np.allclose(W, Conv1x1(5, seed=8).params["weight"])  # the seed matters


# ---------------------------------------------------------------------- round trips, log-det


@given(C=st.integers(1, 6), H=st.integers(1, 3), W=st.integers(1, 3), lu=st.booleans())
def test_round_trip_shapes(C, H, W, lu):
    rng = np.random.default_rng(C * 100 + H * 10 + W)
    layer = make(C, lu, rng)
    x = rng.standard_normal((2, H, W, C))
    assert np.max(np.abs(layer.inverse(layer.forward(x)[0]) - x)) < 1e-10


@pytest.mark.parametrize("lu", MODES)
def test_logdet_matches_dense_jacobian(lu, rng):
    layer = make(3, lu, rng)
    x = rng.standard_normal((1, 2, 3, 3))
    J = dense_jacobian(lambda v: layer.forward(v)[0], x)
    sign, ld = np.linalg.slogdet(J)
    assert sign != 0
    _, logdet = layer.forward(x)
    assert abs(logdet[0] - ld) < 1e-8
    assert abs(layer.logdet_per_pixel()) > 0.05  # randomised: log|det W| is not 0
    # block diagonal in the paper's vectorisation, every block W^T
    W = layer.weight_matrix
    np.testing.assert_allclose(J, np.kron(np.eye(6), W.T), atol=1e-8)


def test_logdet_same_for_every_sample_and_scales_with_pixels(rng):
    layer = make(3, False, rng)
    _, l1 = layer.forward(rng.standard_normal((2, 1, 1, 3)))
    _, l6 = layer.forward(rng.standard_normal((2, 2, 3, 3)))
    assert l1[0] == l1[1]
    assert abs(l6[0] - 6 * l1[0]) < 1e-12
    assert abs(l1[0] - np.linalg.slogdet(layer.params["weight"])[1]) < 1e-12


# ---------------------------------------------------------------------- backward


@pytest.mark.parametrize("lu", MODES)
def test_backward_logdet_term_alone(lu, rng):
    # dy = 0: only d(logdet)/d params is left (W^{-T} for plain, H W for log_s)
    layer = make(3, lu, rng)
    x = rng.standard_normal((2, 2, 2, 3))
    layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(np.zeros_like(x), np.array([0.5, 1.5]))
    assert np.all(dx == 0)
    if lu:
        np.testing.assert_allclose(layer.grads["log_s"], 2.0 * 4, rtol=1e-14)
        assert np.all(layer.grads["lower"] == 0) and np.all(layer.grads["upper"] == 0)
    else:
        W = layer.params["weight"]
        np.testing.assert_allclose(layer.grads["weight"], 8.0 * np.linalg.inv(W).T, rtol=1e-12)


def test_lu_backward_helper_matches_plain_gradient(rng):
    # Chain rule check of _linalg.lu_backward alone: d/dθ <dM, P L U> by central differences.
    C = 4
    f = _linalg.lu_init(_linalg.random_rotation(C, rng) + 0.2 * rng.standard_normal((C, C)))
    lower, upper, log_s = f.lower.copy(), f.upper.copy(), f.log_s.copy()
    dM = rng.standard_normal((C, C))

    def loss() -> float:
        L, U, _ = _linalg.lu_factors(lower, upper, log_s, f.sign)
        return float(np.sum(dM * (_linalg.permutation_matrix(f.perm) @ L @ U)))

    L, U, d = _linalg.lu_factors(lower, upper, log_s, f.sign)
    g_lower, g_upper, g_log_s = _linalg.lu_backward(dM, f.perm, L, U, d)
    grads = {"lower": g_lower, "upper": g_upper, "log_s": g_log_s}
    for name, arr in (("lower", lower), ("upper", upper), ("log_s", log_s)):
        flat = arr.reshape(-1)
        num = np.empty_like(flat)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + 1e-6
            lp = loss()
            flat[i] = old - 1e-6
            lm = loss()
            flat[i] = old
            num[i] = (lp - lm) / 2e-6
        np.testing.assert_allclose(grads[name].reshape(-1), num, atol=1e-8)


def test_lu_solve_right_helper(rng):
    M = rng.standard_normal((5, 5)) + 3 * np.eye(5)
    P, L, U = scipy.linalg.lu(M)
    perm = np.argmax(P, axis=0)
    y = rng.standard_normal((7, 5))
    x = _linalg.lu_solve_right(y, perm, L, U)
    assert np.max(np.abs(x @ M - y)) < 1e-12


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "W",
    [
        np.zeros((3, 3)),
        np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]]),  # rank 2
        np.array([[1.0, 1.0, 0.0], [1.0, 1.0 + 2**-52, 0.0], [0.0, 0.0, 1.0]]),  # numerically
    ],
)
def test_singular_plain_weight_raises(W, rng):
    layer = Conv1x1(3)
    layer.params["weight"][...] = W
    y = rng.standard_normal((1, 2, 2, 3))
    with pytest.raises(SingularKernelError, match="Conv1x1.inverse.*singular"):
        layer.inverse(y)
    _, logdet = layer.forward(y)
    assert logdet[0] == -np.inf or logdet[0] < -30  # no NaN, no pretend value


def test_singular_plain_weight_backward_of_logdet_raises(rng):
    layer = Conv1x1(3)
    layer.params["weight"][...] = 0.0
    x = rng.standard_normal((1, 1, 1, 3))
    layer.forward(x)
    with pytest.raises(SingularKernelError, match="Conv1x1.backward"):
        layer.backward(np.ones_like(x), np.ones(1))


def test_constructor_validation():
    with pytest.raises(ValueError, match="Conv1x1: channels"):
        Conv1x1(0)
    with pytest.raises(TypeError, match="Conv1x1: lu must be a bool"):
        Conv1x1(3, "lu")
    with pytest.raises(TypeError, match="float32 or float64"):
        Conv1x1(3, dtype=np.int32)


# ---------------------------------------------------------------------- float32, state
@pytest.mark.parametrize("lu", MODES)
def test_float32(lu, rng):
    layer = make(4, lu, rng, dtype=np.float32)
    assert all(p.dtype == np.float32 for p in layer.params.values())
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    y, logdet = layer.forward(x)
    assert y.dtype == np.float32 and logdet.dtype == np.float32 and logdet.shape == (2,)
    x64 = Conv1x1(4, lu, dtype=np.float64)
    x64.load_state_dict(layer.state_dict())
    y64, l64 = x64.forward(x.astype(np.float64))
    assert np.max(np.abs(y - y64)) < 1e-5 and np.max(np.abs(logdet - l64)) < 1e-4
    back = layer.inverse(y)
    assert back.dtype == np.float32 and np.max(np.abs(back - x)) < 1e-5
    dx = layer.backward(np.ones_like(y), np.ones(2, dtype=np.float32))
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 and np.all(np.isfinite(g)) for g in layer.grads.values())


@pytest.mark.parametrize("lu", MODES)
def test_state_dict_round_trip(lu, rng):
    src = make(3, lu, rng, seed=1)
    dst = Conv1x1(3, lu, seed=2)
    x = rng.standard_normal((2, 2, 2, 3))
    assert not np.allclose(src.forward(x)[0], dst.forward(x)[0])
    state = src.state_dict()
    keys = (
        {"params/weight"}
        if not lu
        else {"params/lower", "params/upper", "params/log_s", "buffers/perm", "buffers/sign"}
    )
    assert set(state) == keys
    dst.load_state_dict(state)
    src.clear_cache(), dst.clear_cache()
    ya, la = src.forward(x)
    yb, lb = dst.forward(x)
    assert np.array_equal(ya, yb) and np.array_equal(la, lb)
    assert np.array_equal(src.inverse(ya), dst.inverse(ya))
