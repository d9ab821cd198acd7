"""CInCConv with the stability guard (issue 8): gradients, exact inverse, the bound holds."""

import numpy as np
import pytest

from flownp.layers import CInCConv
from flownp.stability import kernel_margins
from flownp.testing import check_layer_gradients


@pytest.mark.parametrize("corner", ["triangular", "unit"])
@pytest.mark.parametrize("mode", ["tanh", "clip"])
def test_guarded_layer_gradients_and_round_trip(corner, mode, rng):
    # init_std 0.5 puts the raw kernel far outside the dominance region, so the guard is active
    layer = CInCConv(3, 3, corner=corner, init_std=0.5, guard=0.8, guard_mode=mode, seed=3)
    if corner == "triangular":
        layer.params["log_diag"][...] = rng.normal(0, 0.3, 3)
    res = check_layer_gradients(layer, rng.standard_normal((2, 4, 5, 3)), rng)
    assert res.max_error < 1e-6, str(res)
    x = rng.standard_normal((2, 6, 7, 3))
    y, _ = layer.forward(x)
    np.testing.assert_allclose(layer.inverse(y), x, atol=1e-10)
    m = kernel_margins(layer.kernel)
    assert np.all(m.ratio <= 0.8 + 1e-6)  # the guaranteed dominance ratio
    assert np.max(m.ratio) > 0.5  # and the guard did not simply zero the taps


def test_guard_keeps_bound_through_random_training_steps(rng):
    layer = CInCConv(4, 3, init_std=0.05, guard=0.9, seed=0)
    for _ in range(200):
        for p in layer.params.values():
            p += rng.normal(0, 0.3, p.shape)  # large random steps, as a diverging optimiser would
        # tanh(u) rounds to 1 for large u, so the ratio reaches rho itself
        assert np.all(kernel_margins(layer.kernel).ratio <= 0.9 * (1 + 1e-12))
    x = rng.standard_normal((1, 16, 16, 4))
    assert np.max(np.abs(layer.inverse(layer.forward(x)[0]) - x)) < 1e-9


def test_guard_rejected_for_lu_and_bad_rho():
    with pytest.raises(ValueError, match="guard"):
        CInCConv(4, guard=0.5, corner="lu")
    with pytest.raises(ValueError, match="rho"):
        CInCConv(4, guard=1.5)
