"""EmergingConv with the stability guard: both masked convolutions stay row dominant,
exact gradients, exact inverse, bounded amplification through Adam steps, float64 solves."""

import numpy as np
import pytest

from flownp import stability as S
from flownp.layers.emerging import EmergingConv
from flownp.optim import Adam
from flownp.testing import check_layer_gradients


def _ratios(layer: EmergingConv) -> list[float]:
    return [S.kernel_margins(K, c).max_ratio for K, c in layer.stability_kernels()]


def _dense_inverse_norm(layer: EmergingConv, n: int) -> float:
    """||M^-1||_inf of the whole layer on n x n images, from its explicit inverse (float64)."""
    Minv = S.dense_matrix(layer.inverse, n, n, layer.channels)
    return float(np.abs(Minv).sum(axis=1).max())


def _bound(layer: EmergingConv, rho: float) -> float:
    """prod over the two convolutions of 1 / ((1 - rho) min|d|) (Proposition 1, twice)."""
    d1, d2 = layer.conv1.diagonal(), layer.conv2.diagonal()
    return 1.0 / ((1 - rho) ** 2 * np.abs(d1).min() * np.abs(d2).min())


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("mode", ["tanh", "clip"])
def test_guarded_emerging_gradients_round_trip_and_ratio(k, mode, rng):
    layer = EmergingConv(3, k, init_std=0.5, guard=0.8, guard_mode=mode, seed=3)
    for conv in (layer.conv1, layer.conv2):
        conv.params["log_diag"][...] = rng.normal(0, 0.3, 3)
    res = check_layer_gradients(layer, rng.standard_normal((2, 4, 5, 3)), rng)
    assert res.max_error < 1e-6, str(res)
    x = rng.standard_normal((2, 6, 7, 3))
    y, logdet = layer.forward(x)
    np.testing.assert_allclose(layer.inverse(y), x, atol=1e-10)
    # the log-determinant is untouched by the guard: H W (sum log|d1| + sum log|d2|)
    ld = 42 * sum(c.params["log_diag"].sum() for c in (layer.conv1, layer.conv2))
    np.testing.assert_allclose(logdet, ld, rtol=1e-12)
    ratios = _ratios(layer)
    assert max(ratios) <= 0.8 + 1e-6
    if k > 1:
        assert min(ratios) > 0.5  # raw taps of 0.5 are far outside: the guard is active


def test_guard_matches_unguarded_layer_inside_the_region(rng):
    """clip is the identity inside the region: same kernels, outputs and gradients."""
    a = EmergingConv(4, 3, init_std=0.005, seed=2)
    b = EmergingConv(4, 3, init_std=0.005, seed=2, guard=0.9, guard_mode="clip")
    assert max(_ratios(a)) < 0.9  # really inside
    for Ka, Kb in zip(a.stability_kernels(), b.stability_kernels(), strict=True):
        np.testing.assert_array_equal(Ka[0], Kb[0])
    x = rng.standard_normal((2, 5, 5, 4))
    dy = rng.standard_normal(x.shape)
    for lay in (a, b):
        lay.forward(x)
        lay.backward(dy, np.ones(2))
    for key in a.grads:
        np.testing.assert_allclose(a.grads[key], b.grads[key], rtol=1e-12, atol=1e-15)


def test_guard_keeps_emerging_stable_under_adam_on_a_random_loss():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 6, 3))
    G0 = rng.standard_normal(x.shape)

    def walk(layer, check):
        opt = Adam(layer.params, lr=0.05)
        for t in range(1, 201):
            layer.zero_grad()
            layer.forward(x)
            layer.backward(G0 + rng.standard_normal(x.shape), rng.standard_normal(2))
            opt.step(layer.grads)
            if check and t % 25 == 0:
                assert max(_ratios(layer)) <= 0.9 * (1 + 1e-9), t
                assert _dense_inverse_norm(layer, 8) <= _bound(layer, 0.9) * (1 + 1e-9), t
        return layer

    guarded = walk(EmergingConv(3, 3, init_std=0.05, seed=1, guard=0.9), True)
    xt = rng.standard_normal((1, 24, 24, 3)).astype(np.float32)
    # Proposition 3 for each solve, the second one's error carried back through M1^{-1}:
    # rel. error <= 2 g k + 2 g k cond_inf(M1), k = (1+rho)/(1-rho), g = gamma_(kk^2 C),
    # cond_inf(M1) <= k max|d1| / min|d1|
    g = 12 * 2.0**-24 / (1 - 12 * 2.0**-24)
    kappa = 1.9 / 0.1
    d1 = np.abs(guarded.conv1.diagonal())
    bound = 2 * g * kappa * (1 + kappa * d1.max() / d1.min())
    assert S.roundtrip_error(S.cast_layer(guarded, np.float32), xt) <= bound
    free = walk(EmergingConv(3, 3, init_std=0.05, seed=1), False)  # the test can fail
    assert max(_ratios(free)) > 1.0
    assert _dense_inverse_norm(free, 8) > _dense_inverse_norm(guarded, 8)


def test_emerging_float64_substitution_matches_float64_layer(rng):
    lay64 = EmergingConv(4, 3, init_std=0.3, seed=4)  # outside the region, unguarded
    lay32 = S.cast_layer(lay64, np.float32)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    y, _ = lay32.forward(x)
    lay32.clear_cache()
    x_hi = lay32.inverse(y, solve_dtype=np.float64)
    assert x_hi.dtype == np.float32
    # the float64 solve of the float32 kernel equals the float64 layer's solve of the same
    # (float32-rounded) kernel, rounded once to float32
    ref = S.cast_layer(lay32, np.float64)
    np.testing.assert_array_equal(x_hi, ref.inverse(y.astype(np.float64)).astype(np.float32))


def test_guarded_emerging_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        EmergingConv(3, 3, guard=1.0)
    with pytest.raises(ValueError, match="guard_mode"):
        EmergingConv(3, 3, guard=0.5, guard_mode="hard")
