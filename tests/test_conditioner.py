"""ConditionerNet: the coupling layers' (non-invertible) network, its init and its backward."""

import numpy as np
import pytest

from flownp.errors import NonFiniteError
from flownp.layers.conditioner import ConditionerNet
from flownp.testing import check_layer_gradients, randomize_params

KEYS = {
    "conv_in/weight": lambda ci, co, w: (3, 3, ci, w),
    "norm_in/bias": lambda ci, co, w: (w,),
    "norm_in/logs": lambda ci, co, w: (w,),
    "conv_mid/weight": lambda ci, co, w: (1, 1, w, w),
    "norm_mid/bias": lambda ci, co, w: (w,),
    "norm_mid/logs": lambda ci, co, w: (w,),
    "conv_out/weight": lambda ci, co, w: (3, 3, w, co),
    "conv_out/bias": lambda ci, co, w: (co,),
    "conv_out/logs": lambda ci, co, w: (co,),
}


def ready(net: ConditionerNet, x: np.ndarray, rng: np.random.Generator) -> ConditionerNet:
    """Random weights (zero-init output conv included), data-initialised actnorms, then every
    parameter perturbed again so that nothing sits at its initial value."""
    randomize_params(net, rng, 0.1)
    net.forward(x)
    net.clear_cache()
    randomize_params(net, rng, 0.05)
    return net


class AsFlowLayer:
    """Adapter so that :func:`check_layer_gradients` (which differentiates
    ``sum(y * dy) + sum(logdet * dlogdet)``) can check ``forward(x) -> h`` with a zero log-det."""

    def __init__(self, net: ConditionerNet) -> None:
        self.net = net

    def forward(self, x):
        return self.net.forward(x), np.zeros(x.shape[0])

    def backward(self, dh, dlogdet):
        return self.net.backward(dh)

    params = property(lambda self: self.net.params)
    grads = property(lambda self: self.net.grads)
    zero_grad = property(lambda self: self.net.zero_grad)
    clear_cache = property(lambda self: self.net.clear_cache)


# ---------------------------------------------------------------------- a loop reference
def conv_same_loops(x, K, bias=None):
    """Direct loops of the "same"-padded convolution, y[n,i,j,o] = sum x[n,i-p+a,j-p+b,c] K."""
    N, H, W, C = x.shape
    k, Co = K.shape[0], K.shape[3]
    p = (k - 1) // 2
    y = np.zeros((N, H, W, Co))
    for n in range(N):
        for i in range(H):
            for j in range(W):
                for a in range(k):
                    for b in range(k):
                        ii, jj = i - p + a, j - p + b
                        if 0 <= ii < H and 0 <= jj < W:
                            y[n, i, j] += x[n, ii, jj] @ K[a, b]
    return y if bias is None else y + bias


def net_reference(net: ConditionerNet, x: np.ndarray) -> np.ndarray:
    p = net.params
    a1 = conv_same_loops(x, p["conv_in/weight"])
    r1 = np.maximum((a1 + p["norm_in/bias"]) * np.exp(p["norm_in/logs"]), 0)
    a2 = conv_same_loops(r1, p["conv_mid/weight"])
    r2 = np.maximum((a2 + p["norm_mid/bias"]) * np.exp(p["norm_mid/logs"]), 0)
    o = conv_same_loops(r2, p["conv_out/weight"], p["conv_out/bias"])
    return o * np.exp(3 * p["conv_out/logs"])


# ---------------------------------------------------------------------- structure and init
def test_param_paths_shapes_and_init():
    ci, co, w = 3, 4, 64
    net = ConditionerNet(ci, co, w, seed=1)
    assert set(net.params) == set(KEYS) == set(net.grads)
    for key, shape in KEYS.items():
        assert net.params[key].shape == shape(ci, co, w), key
        assert net.params[key].dtype == np.float64
    assert set(net.buffers) == {"norm_in/initialized", "norm_mid/initialized"}
    for key in ("conv_out/weight", "conv_out/bias", "conv_out/logs"):
        assert not np.any(net.params[key]), key  # zero initialised
    for key in ("conv_in/weight", "conv_mid/weight"):
        std = net.params[key].std()
        assert 0.045 < std < 0.055, (key, std)  # Glow's N(0, 0.05^2)
    other = ConditionerNet(ci, co, w, seed=2)
    assert not np.allclose(net.params["conv_in/weight"], other.params["conv_in/weight"])


def test_fresh_net_outputs_zero_and_initialises_its_actnorms(rng):
    net = ConditionerNet(2, 4, 8)
    x = rng.standard_normal((5, 4, 3, 2))
    h = net.forward(x)
    net.clear_cache()
    assert h.shape == (5, 4, 3, 4)
    assert np.all(h == 0)  # zero-initialised output conv
    assert all(bool(v) for v in net.buffers.values())
    # the first actnorm's output has zero mean and unit variance on that batch
    p = net.params
    from flownp.kernels.conv_same import conv_same_forward

    n1 = (conv_same_forward(x, p["conv_in/weight"]) + p["norm_in/bias"]) * np.exp(p["norm_in/logs"])
    np.testing.assert_allclose(n1.reshape(-1, 8).mean(0), 0, atol=1e-10)
    np.testing.assert_allclose(n1.reshape(-1, 8).std(0), 1, atol=1e-4)
    # a second batch does not re-initialise
    before = {k: v.copy() for k, v in net.params.items()}
    net.forward(3.0 * rng.standard_normal((2, 4, 3, 2)))
    for k, v in net.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_forward_matches_loop_reference(rng):
    x = rng.standard_normal((2, 4, 3, 3))
    net = ready(ConditionerNet(3, 5, 6, seed=4), x, rng)
    h = net.forward(x)
    ref = net_reference(net, x)
    assert np.max(np.abs(ref)) > 0.1  # not the zero map
    np.testing.assert_allclose(h, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- backward
@pytest.mark.parametrize("shape, ci, co, w", [((2, 3, 3, 2), 2, 4, 6), ((1, 4, 2, 3), 3, 2, 5)])
def test_backward_matches_finite_differences(shape, ci, co, w, rng):
    x = rng.standard_normal(shape)
    net = ready(ConditionerNet(ci, co, w, seed=7), x, rng)
    res = check_layer_gradients(AsFlowLayer(net), x, rng, max_entries=30)
    assert set(res.errors) == {"x", *KEYS}
    assert res.max_error < 1e-6, str(res)


def test_backward_accumulates_and_releases_cache(rng):
    x = rng.standard_normal((2, 3, 3, 2))
    net = ready(ConditionerNet(2, 4, 4), x, rng)
    dh = rng.standard_normal((2, 3, 3, 4))
    net.forward(x)
    dx1 = net.backward(dh)
    g1 = {k: v.copy() for k, v in net.grads.items()}
    assert all(np.any(v) for v in g1.values())
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        net.backward(dh)
    net.forward(x)
    dx2 = net.backward(dh)
    np.testing.assert_array_equal(dx1, dx2)
    for k, v in net.grads.items():
        np.testing.assert_allclose(v, 2 * g1[k], rtol=1e-13, atol=0)


# ---------------------------------------------------------------------- dtypes and validation
def test_float32_matches_float64(rng):
    x = rng.standard_normal((2, 3, 4, 2))
    n64 = ready(ConditionerNet(2, 4, 6), x, rng)
    n32 = ConditionerNet(2, 4, 6, dtype=np.float32)
    n32.load_state_dict(n64.state_dict())
    h32 = n32.forward(x.astype(np.float32))
    assert h32.dtype == np.float32
    dx32 = n32.backward(np.ones_like(h32))
    assert dx32.dtype == np.float32
    assert all(g.dtype == np.float32 for g in n32.grads.values())
    h64 = n64.forward(x)
    np.testing.assert_allclose(h32, h64, rtol=0, atol=1e-4 * max(1.0, np.abs(h64).max()))


def test_validation(rng):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="ConditionerNet: width"):
            ConditionerNet(2, 2, bad)
    with pytest.raises(ValueError, match="ConditionerNet: in_channels"):
        ConditionerNet(0, 2, 4)
    net = ConditionerNet(2, 4, 4)
    with pytest.raises(ValueError, match="ConditionerNet: x has 3 channels"):
        net.forward(np.zeros((1, 3, 3, 3)))
    with pytest.raises(ValueError, match="rank 4"):
        net.forward(np.zeros((3, 3, 2)))
    with pytest.raises(TypeError, match="dtype float32"):
        net.forward(np.zeros((1, 3, 3, 2), np.float32))
    x = np.zeros((1, 3, 3, 2))
    x[0, 1, 1, 0] = np.nan
    with pytest.raises(NonFiniteError, match="ConditionerNet: x contains 1 NaN"):
        net.forward(x)
    net.forward(rng.standard_normal((1, 3, 3, 2)))
    with pytest.raises(ValueError, match="dh has shape"):
        net.backward(np.zeros((1, 3, 3, 2)))
    assert not hasattr(net, "inverse")  # a Network, not a flow layer: no inverse to call
