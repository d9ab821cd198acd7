"""CInCConv with the stability guard: gradients, exact inverse, the bound holds through
optimisation, the model/config plumbing, the float64 substitution."""

import numpy as np
import pytest

from flownp import stability as S
from flownp.layers import CInCConv
from flownp.layers.precision import choose_solve_dtypes
from flownp.model import FlowConfig, FlowModel
from flownp.optim import Adam
from flownp.stability import kernel_margins
from flownp.testing import check_layer_gradients


def _ratio(layer: CInCConv) -> float:
    """The guarded quantity: row ratio (masked corners) or block ratio q (lu corner)."""
    m = kernel_margins(layer.kernel)
    return m.block_ratio if layer.corner == "lu" else m.max_ratio


def _guaranteed_bound(layer: CInCConv, rho: float) -> float:
    """The size-independent bound on ||M^-1||_inf the guard promises."""
    if layer.corner == "lu":
        return S.corner_inverse_norm(layer.corner_matrix())[0] / (1 - rho)
    return 1.0 / ((1 - rho) * np.abs(layer.diagonal()).min())


def _exact_norm_inf(layer: CInCConv, n: int) -> float:
    h = S.impulse_responses(layer.kernel, n, n, transpose=True)
    return float(S.amplification_by_size(h)[-1])


@pytest.mark.parametrize("corner", ["triangular", "unit", "lu"])
@pytest.mark.parametrize("mode", ["tanh", "clip"])
def test_guarded_layer_gradients_and_round_trip(corner, mode, rng):
    # init_std 0.5 puts the raw kernel far outside the dominance region, so the guard is active
    layer = CInCConv(3, 3, corner=corner, init_std=0.5, guard=0.8, guard_mode=mode, seed=3)
    if corner == "triangular":
        layer.params["log_diag"][...] = rng.normal(0, 0.3, 3)
    if corner == "lu":
        for key in ("lower", "upper", "log_s"):
            layer.params[key][...] += rng.normal(0, 0.3, layer.params[key].shape)
    res = check_layer_gradients(layer, rng.standard_normal((2, 4, 5, 3)), rng)
    assert res.max_error < 1e-6, str(res)
    x = rng.standard_normal((2, 6, 7, 3))
    y, _ = layer.forward(x)
    np.testing.assert_allclose(layer.inverse(y), x, atol=1e-10)
    assert _ratio(layer) <= 0.8 + 1e-6  # the guaranteed dominance ratio
    assert _ratio(layer) > 0.5  # and the guard did not simply zero the taps


def test_guard_keeps_bound_through_random_training_steps(rng):
    layer = CInCConv(4, 3, init_std=0.05, guard=0.9, seed=0)
    for _ in range(200):
        for p in layer.params.values():
            p += rng.normal(0, 0.3, p.shape)  # large random steps, as a diverging optimiser would
        # tanh(u) rounds to 1 for large u, so the ratio reaches rho itself
        assert np.all(kernel_margins(layer.kernel).ratio <= 0.9 * (1 + 1e-12))
    x = rng.standard_normal((1, 16, 16, 4))
    assert np.max(np.abs(layer.inverse(layer.forward(x)[0]) - x)) < 1e-9


def _adam_walk(layer: CInCConv, rng, steps: int, check_every: int, rho: float | None, keys=None):
    """Adam (lr 0.05) on a random linear loss sum(G * forward(x)) with a fixed drift plus fresh
    noise in G at every step: the unguarded taps grow steadily. With ``rho``, check the
    guarantees every ``check_every`` steps. Returns the last (ratio, exact norm, bound).
    ``keys``: train only these parameters."""
    params = {k: v for k, v in layer.params.items() if keys is None or k in keys}
    opt = Adam(params, lr=0.05)
    x = rng.standard_normal((2, 6, 6, layer.channels))
    G0 = rng.standard_normal(x.shape)
    out = None
    for t in range(1, steps + 1):
        G = G0 + rng.standard_normal(x.shape)
        layer.zero_grad()
        layer.forward(x)
        layer.backward(G, rng.standard_normal(2))
        opt.step({k: g for k, g in layer.grads.items() if k in params})
        if t % check_every == 0:
            out = (_ratio(layer), _exact_norm_inf(layer, 24), _guaranteed_bound(layer, 0.9))
            if rho is not None:
                assert out[0] <= rho * (1 + 1e-9), (t, out)
                assert out[1] <= out[2] * (1 + 1e-9), (t, out)
    return out


@pytest.mark.parametrize("corner", ["triangular", "lu"])
def test_guard_keeps_layer_stable_under_adam_on_a_random_loss(corner):
    """Triangular: everything trained, the bound 1/((1-rho) min|d|) holds at every check.
    lu: the guard bounds the recursion by ||A^-1||_inf / (1-rho) for the current corner A at
    every check (all parameters trained), but it cannot keep A itself well conditioned (this
    walk drives log_s to about 30, cond(A) ~ 1e16: an ill-conditioned 1x1 convolution, not a
    recursion); the float32 round trip is therefore checked on a walk of the taps only."""
    kw = dict(corner=corner, init_std=0.05, seed=1)
    guarded = CInCConv(4, 3, guard=0.9, **kw)
    ratio, norm, bound = _adam_walk(guarded, np.random.default_rng(7), 300, 20, rho=0.9)
    if corner == "lu":
        guarded = CInCConv(4, 3, guard=0.9, **kw)
        walk = _adam_walk(guarded, np.random.default_rng(7), 300, 20, 0.9, keys=["weight"])
        ratio, norm, bound = walk
    assert ratio > 0.5  # the walk does push against the budget
    x = np.random.default_rng(8).standard_normal((1, 24, 24, 4)).astype(np.float32)
    lay32 = S.cast_layer(guarded, np.float32)
    assert S.roundtrip_error(lay32, x) < 1e-5
    # the same walk without the guard leaves the dominance region: the test can fail
    free = CInCConv(4, 3, **kw)
    keys = ["weight"] if corner == "lu" else None
    ratio_free, norm_free, _ = _adam_walk(free, np.random.default_rng(7), 300, 300, None, keys)
    assert ratio_free > 1.0 and norm_free > norm


def test_guard_rejected_for_bad_rho_and_mode():
    with pytest.raises(ValueError, match="rho"):
        CInCConv(4, guard=1.5)
    with pytest.raises(ValueError, match="rho"):
        CInCConv(4, guard=0.0, corner="lu")
    with pytest.raises(ValueError, match="mode"):
        CInCConv(4, guard=0.5, guard_mode="soft")


# --------------------------------------------------------------------------- the model
def test_flowconfig_guard_is_validated_and_reaches_every_conv():
    for bad in (0.0, 1.0, -0.5, True, "0.5"):
        with pytest.raises(ValueError, match="guard"):
            FlowConfig(image_shape=(8, 8, 1), guard=bad)
    assert FlowConfig(image_shape=(8, 8, 1), conv="1x1", guard=0.9).guard is None  # no recursion
    for conv in ("cinc", "emerging", "1x1+emerging"):
        cfg = FlowConfig(image_shape=(8, 8, 1), levels=2, depth=1, width=4, conv=conv, guard=0.9)
        assert FlowConfig.from_json(cfg.to_json()) == cfg
        convs = list(S.iter_invertible_convs(FlowModel(cfg)))
        assert len(convs) == 2 and all(lay.guard == 0.9 for _, lay in convs)
    old = FlowConfig(image_shape=(8, 8, 1)).to_dict()
    del old["guard"]  # a checkpoint written before the option existed
    assert FlowConfig.from_dict(old).guard is None


@pytest.mark.parametrize("conv", ["cinc", "emerging"])
def test_guarded_model_round_trip_and_float64_substitution(conv, rng):
    cfg = FlowConfig(image_shape=(8, 8, 1), levels=2, depth=1, width=4, conv=conv, guard=0.9)
    model = FlowModel(cfg, seed=3)
    x = rng.uniform(-0.5, 0.5, (4, 8, 8, 1)).astype(np.float32)
    model.initialize(x)
    z, _ = model.forward(x)
    model.clear_cache()
    x32 = model.inverse(z)
    x64 = model.inverse(z, solve_precision="float64")
    assert x64.dtype == np.float32 and np.abs(x32 - x).max() < 1e-5
    assert np.abs(x64 - x).max() < 1e-5
    # "float64": every conv solves in float64; the choice is passed in, nothing is set on them
    choice = choose_solve_dtypes(model, "float64")
    assert len(choice) == 2 and all(dt == np.float64 for dt in choice.values())
    assert not any("solve_dtype" in vars(lay) for _, lay in S.iter_invertible_convs(model))
    # "auto": guarded layers are provably stable, so they keep float32
    assert all(dt is None for dt in choose_solve_dtypes(model, "auto").values())
    np.testing.assert_array_equal(model.inverse(z, solve_precision="auto"), x32)
    with pytest.raises(ValueError, match="precision"):
        model.inverse(z, solve_precision="float16")
