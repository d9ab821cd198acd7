"""AffineCoupling (Glow) and QuadCoupling (paper Section 3.2, Eq. 3-6)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.special import expit

from flownp.errors import NonFiniteError
from flownp.layers.coupling import AdditiveCoupling, AffineCoupling, QuadCoupling
from flownp.testing import dense_jacobian, randomize_params
from verification.official_bug import official_bug_inverse

CLASSES = [AffineCoupling, QuadCoupling]
SCALES = ["sigmoid", "exp", "softclamp"]
CASES = [(cls, scale) for cls in CLASSES for scale in SCALES]
IDS = [f"{cls.__name__}-{scale}" for cls, scale in CASES]
NETS = {AffineCoupling: ["net"], QuadCoupling: ["nn1", "nn2", "nn3"]}


def make(cls, C, rng, *, width=6, scale="sigmoid", dtype=np.float64, seed=3, shape=(3, 3)):
    """A coupling with random weights (the zero-initialised output convs included),
    data-initialised actnorms, and every parameter perturbed again afterwards."""
    layer = cls(C, width, scale=scale, seed=seed, dtype=dtype)
    randomize_params(layer, rng, 0.1)
    layer.forward(rng.standard_normal((4, *shape, C)).astype(dtype))
    layer.clear_cache()
    randomize_params(layer, rng, 0.05)
    return layer


def fwd(layer):
    def fn(v):
        y, _ = layer.forward(v)
        layer.clear_cache()
        return y

    return fn


def block_index(C: int, nblocks: int, H: int, W: int) -> list[np.ndarray]:
    """Indices of each channel block in the vectorisation x.reshape(-1) (row, column, channel)."""
    b = C // nblocks
    ch = np.arange(H * W * C) % C
    return [np.flatnonzero(ch // b == k) for k in range(nblocks)]


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cls, scale", CASES, ids=IDS)
def test_round_trips_float64(cls, scale, rng):
    layer = make(cls, 8, rng, scale=scale)
    x = rng.standard_normal((3, 3, 4, 8))
    y, logdet = layer.forward(x)
    layer.clear_cache()
    nb = len(NETS[cls]) + 1
    b = 8 // nb
    for k in range(1, nb):  # every transformed block really is transformed
        assert np.max(np.abs(y[..., k * b : (k + 1) * b] - x[..., k * b : (k + 1) * b])) > 0.1
    assert np.ptp(logdet) > 1e-3  # a per-sample log-det, not a constant
    assert np.max(np.abs(layer.inverse(y) - x)) < 1e-10
    z = rng.standard_normal((3, 3, 4, 8))
    assert np.max(np.abs(layer.forward(layer.inverse(z))[0] - z)) < 1e-10


@given(
    H=st.integers(1, 4),
    W=st.integers(1, 4),
    C=st.sampled_from([4, 8]),
    quad=st.booleans(),
    scale=st.sampled_from(SCALES),
)
def test_round_trip_shapes(H, W, C, quad, scale):
    rng = np.random.default_rng(H * 100 + W * 10 + C)
    cls = QuadCoupling if quad else AffineCoupling
    layer = make(cls, C, rng, width=4, scale=scale, shape=(H, W))
    x = rng.standard_normal((2, H, W, C))
    y, _ = layer.forward(x)
    assert np.max(np.abs(layer.inverse(y) - x)) < 1e-10


# ---------------------------------------------------------------------- log-det, Jacobian
@pytest.mark.parametrize("cls, scale", CASES, ids=IDS)
def test_logdet_matches_dense_jacobian(cls, scale, rng):
    layer = make(cls, 4, rng, scale=scale)
    x = rng.standard_normal((2, 3, 3, 4))
    _, logdet = layer.forward(x)
    layer.clear_cache()
    assert abs(logdet[0] - logdet[1]) > 1e-3
    for n in range(2):
        J = dense_jacobian(fwd(layer), x[n : n + 1])
        sign, ref = np.linalg.slogdet(J)
        assert sign > 0  # both scale functions are positive
        assert abs(logdet[n] - ref) < 1e-7, (logdet[n], ref)


@pytest.mark.parametrize("cls", CLASSES)
def test_jacobian_block_structure(cls, rng):
    """Eq. 3-6: block lower triangular in channel-block order, identity first diagonal block,
    diagonal blocks diag(s_k), and every below-diagonal block actually used."""
    C, H, W = 4, 3, 3
    layer = make(cls, C, rng)
    x = rng.standard_normal((1, H, W, C))
    J = dense_jacobian(fwd(layer), x)
    nb = len(NETS[cls]) + 1
    idx = block_index(C, nb, H, W)
    for p in range(nb):
        for q in range(nb):
            B = J[np.ix_(idx[p], idx[q])]
            if q > p:
                assert np.all(B == 0), (p, q)  # y_p does not read x_q at all: exactly zero
            elif q == p:
                assert np.all(B - np.diag(np.diag(B)) == 0), p  # elementwise map of x_p
                if p == 0:
                    np.testing.assert_allclose(np.diag(B), 1.0, rtol=0, atol=1e-9)
                else:
                    assert np.ptp(np.diag(B)) > 1e-3  # scales vary with position
            else:
                assert np.max(np.abs(B)) > 1e-3, (p, q)  # y_p depends on x_q through NN


def test_quad_first_block_is_copied_bit_for_bit(rng):
    for dtype in (np.float64, np.float32):
        layer = make(QuadCoupling, 8, rng, dtype=dtype)
        x = rng.standard_normal((2, 3, 3, 8)).astype(dtype)
        y, _ = layer.forward(x)
        assert np.array_equal(y[..., :2], x[..., :2])
        assert not np.array_equal(y[..., 2:], x[..., 2:])
        layer.clear_cache()
        xr = layer.inverse(y)
        assert np.array_equal(xr[..., :2], y[..., :2])


# ---------------------------------------------------------------------- layout and init
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("scale", SCALES)
def test_shift_scale_layout_and_scale_functions(cls, scale, rng):
    """With a constant conditioner output h = bias, block k is (x_k + bias[0::2]) *
    s(bias[1::2]), written out by hand."""
    C = 8
    layer = cls(C, 4, scale=scale)
    nb = len(NETS[cls]) + 1
    b = C // nb
    x = rng.standard_normal((2, 3, 3, C))
    biases = []
    for name in NETS[cls]:
        bias = rng.standard_normal(2 * b)
        layer.params[f"{name}/conv_out/bias"][...] = bias
        biases.append(bias)
    y, logdet = layer.forward(x)
    ref_ld = np.zeros(2)
    for k, bias in enumerate(biases, start=1):
        shift, raw = bias[0::2], bias[1::2]
        s = {
            "sigmoid": expit(raw + 2.0),
            "exp": np.exp(raw),
            "softclamp": np.exp(2.0 * np.tanh(raw / 2.0)),
        }[scale]
        blk = slice(k * b, (k + 1) * b)
        np.testing.assert_allclose(y[..., blk], (x[..., blk] + shift) * s, rtol=1e-14)
        ref_ld += 9 * np.sum(np.log(s))
    np.testing.assert_allclose(logdet, ref_ld, rtol=1e-13)


@pytest.mark.parametrize("cls", CLASSES)
def test_initial_map_and_param_paths(cls, rng):
    C, w = 8, 5
    layer = cls(C, w)
    nets = NETS[cls]
    nb = len(nets) + 1
    b = C // nb
    for k, name in enumerate(nets, start=1):  # net k reads blocks 1..k, outputs 2 * b
        assert layer.params[f"{name}/conv_in/weight"].shape == (3, 3, k * b, w)
        assert layer.params[f"{name}/conv_out/weight"].shape == (3, 3, w, 2 * b)
        assert f"{name}/norm_in/initialized" in layer.buffers
    assert set(layer.params) == set(layer.grads)
    assert len(layer.params) == 9 * len(nets)
    x = rng.standard_normal((2, 3, 3, C))
    y, logdet = layer.forward(x)  # zero-initialised nets: y_k = x_k * sigmoid(2)
    np.testing.assert_array_equal(y[..., :b], x[..., :b])
    np.testing.assert_allclose(y[..., b:], x[..., b:] * expit(2.0), rtol=1e-15)
    np.testing.assert_allclose(logdet, 9 * (C - b) * np.log(expit(2.0)), rtol=1e-13)
    exp_layer = cls(C, w, scale="exp")
    y, logdet = exp_layer.forward(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(logdet, 0)


def test_additive_coupling_is_a_shift_with_zero_logdet(rng):
    """y = [x_a, x_b + net(x_a)], the net outputs C/2 channels (the shift only), logdet 0."""
    C, w = 6, 5
    layer = AdditiveCoupling(C, w, seed=2)
    assert layer.params["net/conv_out/weight"].shape == (3, 3, w, C // 2)
    x = rng.standard_normal((2, 3, 4, C))
    layer.forward(x)  # data-dependent initialisation of the net's actnorms
    layer.clear_cache()
    randomize_params(layer, rng, 0.1)
    y, logdet = layer.forward(x)
    layer.clear_cache()
    shift = layer.nets[0].forward(np.ascontiguousarray(x[..., : C // 2]))
    layer.nets[0].clear_cache()
    np.testing.assert_array_equal(y[..., : C // 2], x[..., : C // 2])
    np.testing.assert_allclose(y[..., C // 2 :], x[..., C // 2 :] + shift, rtol=1e-15)
    np.testing.assert_array_equal(logdet, np.zeros(2))
    np.testing.assert_allclose(layer.inverse(y), x, atol=1e-14)
    J = dense_jacobian(fwd(layer), x[:1])
    np.testing.assert_allclose(np.diag(J), 1.0, atol=1e-8)  # unit diagonal: det 1


def test_nets_are_seeded_independently():
    layer = QuadCoupling(8, 4, seed=0)
    p = layer.params
    assert not np.allclose(p["nn2/conv_mid/weight"], p["nn3/conv_mid/weight"])
    again = QuadCoupling(8, 4, seed=0).params
    assert all(np.array_equal(p[k], again[k]) for k in p)
    other = QuadCoupling(8, 4, seed=1).params
    assert not np.allclose(p["nn1/conv_in/weight"], other["nn1/conv_in/weight"])


# ---------------------------------------------------------------------- gradients


def test_inverse_releases_a_pending_backward(rng):
    """(Accumulation and the one-backward rule: tests/test_layer_contract.py.)"""
    layer = make(QuadCoupling, 4, rng)
    x = rng.standard_normal((2, 3, 3, 4))
    dy, dl = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal(2)
    layer.forward(x)
    layer.inverse(x)  # re-evaluates the conditioners: the pending backward is released
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        layer.backward(dy, dl)


# ---------------------------------------------------------------------- the official bug
def test_official_reverse_is_not_an_inverse(rng):
    layer = make(QuadCoupling, 8, rng, scale="sigmoid")  # the official code's scale
    x = rng.standard_normal((3, 3, 3, 8))
    y, _ = layer.forward(x)
    layer.clear_cache()
    exact = layer.inverse(y)
    wrong = official_bug_inverse(layer, y)
    assert np.max(np.abs(exact - x)) < 1e-10
    assert np.max(np.abs(wrong - x)) > 1e-2  # >> 1e-10: not a round trip
    np.testing.assert_array_equal(wrong[..., :2], y[..., 6:])  # x_1 := y_4, the bug itself
    # with y_4 == y_1 the wrong block order would be harmless: the bug is the block order only
    y2 = y.copy()
    y2[..., 6:] = y2[..., :2]
    np.testing.assert_array_equal(official_bug_inverse(layer, y2), layer.inverse(y2))


# ---------------------------------------------------------------------- float32
@pytest.mark.parametrize("cls, scale", CASES, ids=IDS)
def test_float32_works_and_matches_float64(cls, scale, rng):
    l64 = make(cls, 8, rng, scale=scale)
    l32 = cls(8, 6, scale=scale, dtype=np.float32)
    l32.load_state_dict(l64.state_dict())
    x = rng.standard_normal((2, 3, 3, 8))
    y32, ld32 = l32.forward(x.astype(np.float32))
    assert y32.dtype == ld32.dtype == np.float32
    dx32 = l32.backward(np.ones_like(y32), np.ones(2, np.float32))
    assert dx32.dtype == np.float32
    assert all(g.dtype == np.float32 for g in l32.grads.values())
    y64, ld64 = l64.forward(x)
    l64.clear_cache()
    np.testing.assert_allclose(y32, y64, rtol=0, atol=1e-4 * np.abs(y64).max())
    np.testing.assert_allclose(ld32, ld64, rtol=1e-5)
    xr = l32.inverse(y32)
    assert xr.dtype == np.float32
    assert np.max(np.abs(xr - x)) < 1e-4
    with pytest.raises(TypeError, match="dtype float64"):
        l32.forward(x)


# ---------------------------------------------------------------------- validation
def test_constructor_validation():
    with pytest.raises(ValueError, match="QuadCoupling: channels must be divisible by 4"):
        QuadCoupling(6, 4)
    with pytest.raises(ValueError, match="AffineCoupling: channels must be divisible by 2"):
        AffineCoupling(3, 4)
    with pytest.raises(ValueError, match="AffineCoupling: scale must be one of"):
        AffineCoupling(4, 4, scale="softplus")
    with pytest.raises(ValueError, match="QuadCoupling: width must be a positive int"):
        QuadCoupling(4, 0)
    with pytest.raises(ValueError, match="QuadCoupling: channels must be a positive int"):
        QuadCoupling(0, 4)
    with pytest.raises(TypeError, match="float32 or float64"):
        QuadCoupling(4, 4, dtype=np.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("cls", CLASSES)
def test_overflow_is_reported_not_silenced(cls, rng):
    layer = cls(4, 4, scale="exp")
    layer.params[f"{NETS[cls][-1]}/conv_out/bias"][1::2] = 1000.0  # exp(1000) = inf
    x = rng.standard_normal((1, 3, 3, 4))
    with pytest.raises(NonFiniteError, match=f"{cls.__name__}.forward: the output contains"):
        layer.forward(x)
    sig = cls(4, 4, scale="sigmoid", dtype=np.float32)
    sig.params[f"{NETS[cls][-1]}/conv_out/bias"][1::2] = -1000.0  # sigmoid -> 0 in float32
    with pytest.raises(
        NonFiniteError,
        match=f"{cls.__name__}.inverse: the output block {len(NETS[cls]) + 1} contains",
    ):
        sig.inverse(x.astype(np.float32))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softclamp_bounds_what_overflows_exp(cls, dtype, rng):
    """Raw scales of +-1000 (exp(1000) = inf): the soft-clamped scale stays within e^-2..e^2,
    the log-det is exactly 2 or -2 per transformed element, and the inverse recovers x."""
    C, shape = 4, (2, 3, 3)
    for sign in (1.0, -1.0):
        layer = cls(C, 4, scale="softclamp", dtype=dtype)
        layer.params[f"{NETS[cls][-1]}/conv_out/bias"][1::2] = sign * 1000.0
        x = rng.standard_normal((*shape, C)).astype(dtype)
        y, logdet = layer.forward(x)
        layer.clear_cache()
        assert np.isfinite(y).all()
        lo = len(NETS[cls]) * C // (len(NETS[cls]) + 1)  # the last block, scaled by net k
        np.testing.assert_allclose(y[..., lo:] / (x[..., lo:] + 0.0), np.exp(2.0 * sign), rtol=1e-5)
        if cls is AffineCoupling:  # one network: every transformed element has log s = +-2
            np.testing.assert_allclose(logdet, sign * 2.0 * 9 * (C // 2), rtol=1e-6)
        np.testing.assert_allclose(layer.inverse(y), x, rtol=1e-5, atol=1e-5)
