"""Squeeze (2x2 space-to-depth), Split (learned conditional prior) and LearnedPrior."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flownp.errors import NonFiniteError
from flownp.layers.split import LearnedPrior, Split
from flownp.layers.squeeze import Squeeze, squeeze2d, unsqueeze2d
from flownp.testing import check_layer_gradients, dense_jacobian, randomize_params


def log_normal(z, mean, logs):
    """Sum over (H, W, C) of log N(z; mean, exp(logs)^2), written out independently."""
    v = -0.5 * np.log(2 * np.pi) - logs - 0.5 * ((z - mean) / np.exp(logs)) ** 2
    return v.reshape(z.shape[0], -1).sum(axis=1)


# ====================================================================== Squeeze
@given(N=st.integers(1, 2), h=st.integers(1, 3), w=st.integers(1, 3), C=st.integers(1, 3))
def test_squeeze_index_formula(N, h, w, C):
    # y[n, i, j, 4c + 2a + b] = x[n, 2i + a, 2j + b, c]  (openai/glow squeeze2d order)
    x = np.arange(N * 2 * h * 2 * w * C, dtype=np.float64).reshape(N, 2 * h, 2 * w, C)
    y, logdet = Squeeze().forward(x)
    assert y.shape == (N, h, w, 4 * C)
    assert np.array_equal(logdet, np.zeros(N))
    for n in range(N):
        for i in range(h):
            for j in range(w):
                for c in range(C):
                    for a in range(2):
                        for b in range(2):
                            assert y[n, i, j, 4 * c + 2 * a + b] == x[n, 2 * i + a, 2 * j + b, c]


def test_squeeze_matches_glow_reshape_transpose(rng):
    x = rng.standard_normal((2, 4, 6, 3))
    glow = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 2, 3, 12)
    assert np.array_equal(squeeze2d(x), glow)


def test_squeeze_round_trips_are_exact(rng):
    layer = Squeeze()
    x = rng.standard_normal((2, 4, 6, 3))
    y, _ = layer.forward(x)
    assert np.array_equal(layer.inverse(y), x)
    z = rng.standard_normal((2, 2, 3, 8))
    assert np.array_equal(layer.forward(layer.inverse(z))[0], z)
    assert np.array_equal(unsqueeze2d(squeeze2d(x)), x)


def test_squeeze_jacobian_is_a_permutation(rng):
    x = rng.standard_normal((1, 2, 4, 2))
    J = dense_jacobian(lambda v: Squeeze().forward(v)[0], x)
    np.testing.assert_allclose(J, np.round(J), atol=1e-9)
    P = np.round(J)
    assert np.all(P.sum(axis=0) == 1) and np.all(P.sum(axis=1) == 1)
    assert abs(np.linalg.slogdet(J)[1]) < 1e-9


def test_squeeze_backward(rng):
    layer = Squeeze()
    x = rng.standard_normal((2, 2, 4, 3))
    res = check_layer_gradients(layer, x, rng)
    assert set(res.errors) == {"x"} and res.max_error < 1e-8, str(res)
    y, _ = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    # <squeeze(x), dy> == <x, backward(dy)>: backward is the adjoint (= inverse) permutation
    dx = layer.backward(dy, np.zeros(2))
    assert abs(np.sum(y * dy) - np.sum(x * dx)) < 1e-12
    with pytest.raises(RuntimeError):
        layer.backward(dy, np.zeros(2))


def test_squeeze_validation():
    layer = Squeeze()
    with pytest.raises(ValueError, match="Squeeze: height and width must be even.*3, 4"):
        layer.forward(np.zeros((1, 3, 4, 1)))
    with pytest.raises(ValueError, match="Squeeze: height and width must be even"):
        layer.forward(np.zeros((1, 4, 5, 1)))
    with pytest.raises(ValueError, match="Squeeze.inverse: y must have a multiple of 4"):
        layer.inverse(np.zeros((1, 2, 2, 6)))
    # rank, dtype, NaN, the backward protocol: tests/test_layer_contract.py


def test_squeeze_float32(rng):
    layer = Squeeze(dtype=np.float32)
    x = rng.standard_normal((1, 2, 2, 2)).astype(np.float32)
    y, logdet = layer.forward(x)
    assert y.dtype == np.float32 and logdet.dtype == np.float32
    assert np.array_equal(layer.inverse(y), x)
    assert layer.backward(y, np.zeros(1, np.float32)).dtype == np.float32
    assert layer.state_dict() == {}


# ====================================================================== Split
def make_split(C, rng, dtype=np.float64) -> Split:
    layer = Split(C, dtype=dtype)
    randomize_params(layer, rng, scale=0.3)
    return layer


def test_split_at_init_is_identity_prior(rng):
    layer = Split(4)
    assert {k: v.shape for k, v in layer.params.items()} == {
        "prior/weight": (3, 3, 2, 4),
        "prior/bias": (4,),
    }
    x = rng.standard_normal((2, 3, 3, 4))
    h, eps, logdet = layer.forward(x)
    assert np.array_equal(h, x[..., :2]) and np.array_equal(eps, x[..., 2:])
    assert np.array_equal(logdet, np.zeros(2))


def test_split_mean_and_logs_are_interleaved(rng):
    # weight 0, bias = [m0, s0, m1, s1]: mean = out[..., 0::2], logs = out[..., 1::2]
    layer = Split(4)
    layer.params["prior/bias"][...] = [0.5, -0.3, -1.0, 0.7]
    x = rng.standard_normal((1, 2, 2, 4))
    h, eps, logdet = layer.forward(x)
    mean, logs = np.array([0.5, -1.0]), np.array([-0.3, 0.7])
    np.testing.assert_allclose(eps, (x[..., 2:] - mean) / np.exp(logs), rtol=1e-14)
    np.testing.assert_allclose(logdet, -4 * logs.sum(), rtol=1e-14)


def test_split_prior_reads_h_through_a_same_3x3_conv(rng):
    # one tap: out[n,i,j,1] (= logs of channel 0) = weight[0,2,c,1] * h[n,i-1,j+1,c]
    layer = Split(2)
    layer.params["prior/weight"][0, 2, 0, 1] = 0.8
    x = rng.standard_normal((1, 3, 3, 2))
    mean, logs = layer.prior(np.ascontiguousarray(x[..., :1]))
    expected = np.zeros((1, 3, 3, 1))
    expected[0, 1:, :2, 0] = 0.8 * x[0, :2, 1:, 0]
    np.testing.assert_allclose(logs, expected, rtol=1e-14)
    assert np.all(mean == 0)


def test_split_log_likelihood_identity(rng):
    # log N(z2; mean, exp(logs)) == log N(eps; 0, I) + logdet, per sample
    layer = make_split(6, rng)
    x = rng.standard_normal((3, 2, 3, 6))
    h, eps, logdet = layer.forward(x)
    mean, logs = layer.prior(h)
    assert np.std(logs) > 0.05  # the prior really depends on h
    direct = log_normal(x[..., 3:], mean, logs)
    standard = log_normal(eps, 0.0, np.zeros_like(eps)) + logdet
    np.testing.assert_allclose(standard, direct, rtol=1e-12)


def test_split_round_trips(rng):
    layer = make_split(4, rng)
    x = rng.standard_normal((2, 3, 4, 4))
    h, eps, _ = layer.forward(x)
    assert np.max(np.abs(eps - x[..., 2:])) > 0.1  # not the identity
    assert np.max(np.abs(layer.inverse(h, eps) - x)) < 1e-10
    h2, e2 = rng.standard_normal((2, 3, 4, 2)), rng.standard_normal((2, 3, 4, 2))
    hh, ee, _ = layer.forward(layer.inverse(h2, e2))
    assert np.max(np.abs(hh - h2)) < 1e-10 and np.max(np.abs(ee - e2)) < 1e-10


def test_split_validation():
    with pytest.raises(ValueError, match="Split: channels must be an even int"):
        Split(3)
    with pytest.raises(ValueError, match="Split: channels must be an even int"):
        Split(0)
    layer = Split(4)  # rank, channels, dtype, NaN of x: tests/test_layer_contract.py
    with pytest.raises(ValueError, match="Split: eps has 4 channels"):
        layer.inverse(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="Split.inverse: h and eps must have the same shape"):
        layer.inverse(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 3, 2)))
    with pytest.raises(NonFiniteError, match="Split: h contains"):
        layer.inverse(np.full((1, 2, 2, 2), np.nan), np.zeros((1, 2, 2, 2)))
    layer.forward(np.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="Split.backward: deps"):
        layer.backward(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 4)), np.zeros(1))


def test_split_float32_and_state_dict(rng):
    src = make_split(4, rng, dtype=np.float32)
    assert all(p.dtype == np.float32 for p in src.params.values())
    x = rng.standard_normal((2, 2, 2, 4)).astype(np.float32)
    h, eps, logdet = src.forward(x)
    assert h.dtype == eps.dtype == logdet.dtype == np.float32
    assert np.max(np.abs(src.inverse(h, eps) - x)) < 1e-5
    dx = src.backward(np.ones_like(h), np.ones_like(eps), np.ones(2, np.float32))
    assert dx.dtype == np.float32 and dx.shape == x.shape
    dst = Split(4, dtype=np.float64)
    dst.load_state_dict(src.state_dict())
    assert set(src.state_dict()) == {"params/prior/weight", "params/prior/bias"}
    h64, eps64, l64 = dst.forward(x.astype(np.float64))
    assert np.max(np.abs(eps64 - eps)) < 1e-5 and np.max(np.abs(l64 - logdet)) < 1e-4


# ====================================================================== LearnedPrior
def make_prior(shape, rng, dtype=np.float64) -> LearnedPrior:
    layer = LearnedPrior(shape, dtype=dtype)
    randomize_params(layer, rng, scale=0.3)
    return layer


def test_prior_init_and_formula(rng):
    layer = LearnedPrior((2, 3, 2))
    assert {k: v.shape for k, v in layer.params.items()} == {"mean": (2, 3, 2), "logs": (2, 3, 2)}
    z = rng.standard_normal((2, 2, 3, 2))
    eps, logdet = layer.forward(z)
    assert np.array_equal(eps, z) and np.array_equal(logdet, np.zeros(2))
    randomize_params(layer, rng, scale=0.3)
    eps, logdet = layer.forward(z)
    m, s = layer.params["mean"], layer.params["logs"]
    np.testing.assert_allclose(eps, (z - m) / np.exp(s), rtol=1e-14)
    np.testing.assert_allclose(
        log_normal(eps, 0.0, np.zeros_like(eps)) + logdet, log_normal(z, m, s), rtol=1e-12
    )


def test_prior_round_trips_and_logdet(rng):
    layer = make_prior((2, 2, 3), rng)
    z = rng.standard_normal((3, 2, 2, 3))
    eps, _ = layer.forward(z)
    assert np.max(np.abs(eps - z)) > 0.1
    assert np.max(np.abs(layer.inverse(eps) - z)) < 1e-10
    e2 = rng.standard_normal(z.shape)
    assert np.max(np.abs(layer.forward(layer.inverse(e2))[0] - e2)) < 1e-10
    J = dense_jacobian(lambda v: layer.forward(v)[0], z[:1])
    assert abs(layer.forward(z[:1])[1][0] - np.linalg.slogdet(J)[1]) < 1e-8


def test_prior_validation_float32_state(rng):
    with pytest.raises(ValueError, match="LearnedPrior: shape must be"):
        LearnedPrior((2, 2))
    with pytest.raises(ValueError, match="LearnedPrior: shape must be"):
        LearnedPrior((2, 0, 3))
    layer = make_prior((2, 2, 3), rng, dtype=np.float32)
    with pytest.raises(ValueError, match=r"LearnedPrior: z must have shape \(N, 2, 2, 3\)"):
        layer.forward(np.zeros((1, 2, 4, 3), np.float32))
    with pytest.raises(ValueError, match="LearnedPrior: eps has 2 channels"):
        layer.inverse(np.zeros((1, 2, 2, 2), np.float32))
    with pytest.raises(TypeError, match="LearnedPrior"):
        layer.forward(np.zeros((1, 2, 2, 3)))
    with pytest.raises(NonFiniteError, match="LearnedPrior"):
        layer.forward(np.full((1, 2, 2, 3), np.nan, np.float32))
    z = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    eps, logdet = layer.forward(z)
    assert eps.dtype == logdet.dtype == np.float32
    assert np.max(np.abs(layer.inverse(eps) - z)) < 1e-5
    assert layer.backward(eps, np.ones(2, np.float32)).dtype == np.float32
    other = LearnedPrior((2, 2, 3), dtype=np.float32)
    other.load_state_dict(layer.state_dict())
    assert np.array_equal(other.forward(z)[0], eps)
