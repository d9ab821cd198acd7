"""Memory-saving backpropagation (``FlowModel(..., recompute=True)``): every node's input is
rebuilt from its output by the inverse instead of being stored. The gradients (parameters and
input) must equal the stored-activation path's up to the inverses' round-off (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from flownp.model import FlowConfig, FlowModel, bpd_loss
from flownp.testing import randomize_params

CONFIGS = [
    FlowConfig((8, 8, 1), 2, 2, 8, "cinc", "quad", dtype="float64"),
    FlowConfig((8, 8, 3), 2, 1, 6, "1x1+emerging", "affine", dtype="float64", lu=True),
]


def _model(cfg: FlowConfig, rng: np.random.Generator) -> tuple[FlowModel, np.ndarray]:
    m = FlowModel(cfg, seed=3)
    x = rng.random((4,) + cfg.image_shape) - 0.5
    m.initialize(x)
    randomize_params(m, rng, scale=0.01)  # leave the zero-initialised couplings and priors
    return m, x


def _grads(m: FlowModel, x: np.ndarray, recompute: bool):
    m.recompute = recompute
    m.zero_grad()
    z, logdet = m.forward(x)
    loss, dz, dlogdet = bpd_loss(z, logdet)
    dx = m.backward(dz, dlogdet)
    return loss, dx, {k: v.copy() for k, v in m.grads.items()}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.conv}+{c.coupling}")
def test_recompute_gradients_equal_stored(cfg, rng):
    m, x = _model(cfg, rng)
    loss_s, dx_s, g_s = _grads(m, x, recompute=False)
    loss_r, dx_r, g_r = _grads(m, x, recompute=True)
    assert loss_r == loss_s  # the forward pass is the same computation
    scale = max(np.abs(v).max() for v in g_s.values())
    assert scale > 0
    for k, v in g_s.items():
        assert np.abs(g_r[k] - v).max() <= 1e-10 * scale, k
    assert np.abs(dx_r - dx_s).max() <= 1e-10 * np.abs(dx_s).max()


def test_recompute_forward_stores_no_activations(rng):
    m, x = _model(CONFIGS[0], rng)
    m.recompute = True
    m.forward(x)
    for path, node in m.flow:
        stack = [node]
        while stack:  # the node and every sub-layer
            layer = stack.pop()
            assert layer._cache is None, path
            stack.extend(layer._layers.values())
    m.backward(*bpd_loss(*m.forward(x))[1:])
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        m.backward(np.zeros((4, 64)), np.zeros(4))  # one forward, one backward


def test_recompute_is_a_constructor_option(rng):
    cfg = CONFIGS[0]
    assert FlowModel(cfg).recompute is False
    assert FlowModel(cfg, recompute=True).recompute is True
