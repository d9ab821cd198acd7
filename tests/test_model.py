"""FlowConfig / FlowModel: validation, layout, round trips, whole-model log-det against a dense
Jacobian, and an end-to-end finite-difference check of the bits/dim loss."""

from __future__ import annotations

import numpy as np
import pytest

from flownp.model import CONVS, COUPLINGS, FlowConfig, FlowModel, log_normal
from flownp.testing import check_layer_gradients, dense_jacobian, randomize_params

KINDS = [(conv, coupling) for conv in CONVS for coupling in COUPLINGS]


def tiny(conv="cinc", coupling="affine", shape=(8, 8, 1), dtype="float64", **kw) -> FlowConfig:
    # sigmoid scale and triangular corner (not the training defaults exp / lu): with every
    # parameter randomised, exp scales compound through a quad coupling into |z| ~ 1e2 and the
    # finite differences lose digits to round-off; the defaults get their own cases below.
    kw = {
        "levels": 2,
        "depth": 1,
        "width": 4,
        "scale": "sigmoid",
        "cinc_corner": "triangular",
        **kw,
    }
    return FlowConfig(image_shape=shape, conv=conv, coupling=coupling, dtype=dtype, **kw)


def ready_model(config: FlowConfig, rng: np.random.Generator, scale: float = 0.05) -> FlowModel:
    """A model with data-initialised actnorms and every parameter (zero-init ones included)
    randomised, so that no layer is the identity. (Much larger noise, e.g. 0.1 on every
    conditioner weight and log-scale, saturates the sigmoid scales of a quad coupling and
    makes the whole map ill-conditioned, cond(J) ~ 1e10-1e16, so round trips lose digits for
    a reason that is not a bug; 0.05 keeps cond(J) ~ 10.)"""
    model = FlowModel(config, seed=3)
    model.initialize(images(rng, config, 16))
    randomize_params(model, rng, scale)
    return model


def images(rng: np.random.Generator, config: FlowConfig, n: int) -> np.ndarray:
    return rng.uniform(-0.5, 0.5, (n, *config.image_shape)).astype(config.dtype)


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"image_shape": (6, 8, 1), "levels": 2}, "not divisible by 2\\*\\*levels"),
        ({"image_shape": (8, 8)}, "image_shape"),
        ({"levels": 0}, "levels"),
        ({"depth": 0}, "depth"),
        ({"width": -1}, "width"),
        ({"conv": "3x3"}, "conv must be one of"),
        ({"coupling": "multiplicative"}, "coupling must be one of"),
        ({"scale": "softplus"}, "scale must be one of"),
        ({"dtype": "float16"}, "float32 or float64"),
        ({"cinc_corner": "full"}, "cinc_corner"),
        ({"conv": "emerging", "kernel_size": 2}, "odd kernel_size"),
        ({"conv": "periodic", "kernel_size": 4}, "periodic convolution needs an odd kernel_size"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        FlowConfig(**kw)


def test_config_json_round_trip_and_shapes():
    cfg = FlowConfig(image_shape=(28, 28, 1), levels=2, depth=3, coupling="quad", dtype="float64")
    assert FlowConfig.from_json(cfg.to_json()) == cfg
    assert cfg.level_shapes() == [(14, 14, 4), (7, 7, 8)]
    with pytest.raises(ValueError, match="unknown field"):
        FlowConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_latent_layout_and_param_paths(rng):
    cfg = tiny(levels=3, shape=(8, 8, 2))
    model = FlowModel(cfg)
    assert model.latent_shapes() == [(4, 4, 4), (2, 2, 8), (1, 1, 32)]
    assert sum(h * w * c for h, w, c in model.latent_shapes()) == cfg.num_dims
    keys = set(model.params)
    for key in (
        "level0/step0/actnorm/bias",
        "level0/step0/conv/weight",
        "level0/split/prior/weight",
        "level1/split/prior/bias",
        "prior/mean",
        "prior/logs",
    ):
        assert key in keys, key
    assert not any(k.startswith("level2/split") for k in keys)  # no split after the last level
    assert set(model.grads) == keys
    assert "level0/step0/actnorm/initialized" in model.buffers
    # the dict holds the layers' own arrays: an in-place update is seen by the layer
    p = model.params["prior/mean"]
    p += 1.0
    assert np.all(model.prior.params["mean"] == 1.0)


@pytest.mark.parametrize(
    "conv, layers",
    [
        ("cinc", ["actnorm", "conv:CInCConv", "coupling"]),
        ("1x1+cinc", ["actnorm", "conv1x1:Conv1x1", "conv:CInCConv", "coupling"]),
        ("1x1+emerging", ["actnorm", "conv1x1:Conv1x1", "conv:EmergingConv", "coupling"]),
        ("periodic", ["actnorm", "conv:PeriodicConv", "coupling"]),
        ("reverse", ["actnorm", "conv:ChannelPermutation", "coupling"]),
        ("shuffle", ["actnorm", "conv:ChannelPermutation", "coupling"]),
    ],
)
def test_step_layout_and_guard_per_conv(conv, layers):
    """The layers of a step, in order, and where the model's guard goes."""
    cfg = FlowConfig((8, 8, 1), levels=2, depth=2, width=4, conv=conv, guard=0.8)
    step = FlowModel(cfg, seed=1).levels[0].layers[1][1]
    assert [
        f"{n}:{type(l).__name__}" if n != "actnorm" and n != "coupling" else n
        for n, l in step._layers.items()
    ] == layers
    conv_layer = step._layers["conv"]
    if conv in ("reverse", "shuffle"):
        assert cfg.guard is None and conv_layer.kind == conv
    else:
        assert cfg.guard == 0.8 and conv_layer.guard == 0.8
    if conv == "1x1+cinc":  # the same seeds as "1x1+emerging": the 1x1 convolutions agree
        other = FlowModel(FlowConfig((8, 8, 1), 2, 2, 4, conv="1x1+emerging"), seed=1)
        a = step._layers["conv1x1"].params["weight"]
        b = other.levels[0].layers[1][1]._layers["conv1x1"].params["weight"]
        np.testing.assert_array_equal(a, b)


def test_shuffle_permutations_differ_between_steps_and_levels():
    model = FlowModel(FlowConfig((8, 8, 1), 2, 3, 4, conv="shuffle"), seed=0)
    perms = [tuple(v) for k, v in model.buffers.items() if k.endswith("conv/perm")]
    assert len(perms) == 6 and len(set(perms)) == 6


def test_additive_coupling_model_has_shift_only_networks():
    model = FlowModel(FlowConfig((8, 8, 1), 2, 1, 4, coupling="additive"), seed=0)
    w = model.params["level0/step0/coupling/net/conv_out/weight"]
    assert w.shape == (3, 3, 4, 2)  # C = 4 channels at level 0: the shift of the 2 last


def test_latent_order_is_level0_first_then_top(rng):
    """z = [eps_0 (level 0's split, NHWC order), ..., eps_top], checked against the layers run
    by hand."""
    cfg = tiny(shape=(8, 8, 1), levels=3)
    model = ready_model(cfg, rng)
    x = images(rng, cfg, 2)
    z, _ = model.forward(x)
    model.clear_cache()
    h = x
    expected = []
    for name, layer in model.flow:
        if name.endswith("/split"):
            h, eps, _ = layer.forward(h)
            expected.append(eps.reshape(2, -1))
        else:
            h, _ = layer.forward(h)
    eps_top, _ = model.prior.forward(h)
    expected.append(eps_top.reshape(2, -1))
    model.clear_cache()
    np.testing.assert_array_equal(z, np.concatenate(expected, axis=1))
    assert [e.shape[1] for e in expected] == [h * w * c for h, w, c in model.latent_shapes()]


def test_input_validation():
    model = FlowModel(tiny(dtype="float32"))
    with pytest.raises(TypeError, match="dtype"):
        model.forward(np.zeros((1, 8, 8, 1)))  # float64 into a float32 model
    with pytest.raises(ValueError, match="shape"):
        model.forward(np.zeros((1, 4, 8, 1), np.float32))
    with pytest.raises(ValueError, match="z must have shape"):
        model.inverse(np.zeros((1, 10), np.float32))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        model.backward(np.zeros((1, 64), np.float32), np.zeros(1, np.float32))


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("conv, coupling", KINDS)
def test_round_trip_float64(conv, coupling, rng):
    cfg = tiny(conv, coupling)
    model = ready_model(cfg, rng)
    x = images(rng, cfg, 3)
    z, logdet = model.forward(x)
    model.clear_cache()
    assert z.shape == (3, cfg.num_dims) and logdet.shape == (3,)
    x_rec = model.inverse(z)
    np.testing.assert_allclose(x_rec, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("conv, coupling", KINDS)
def test_logdet_matches_dense_jacobian(conv, coupling, rng):
    cfg = tiny(conv, coupling)
    model = ready_model(cfg, rng)
    x = images(rng, cfg, 1)
    _, logdet = model.forward(x)
    model.clear_cache()

    def f(a):
        z, _ = model.forward(a)
        model.clear_cache()
        return z

    J = dense_jacobian(f, x)
    sign, ref = np.linalg.slogdet(J)
    assert sign != 0
    assert abs(logdet[0] - ref) < 1e-6 * max(1.0, abs(ref)), (logdet[0], ref)


def test_log_prob_is_change_of_variables(rng):
    cfg = tiny("cinc", "quad")
    model = ready_model(cfg, rng)
    x = images(rng, cfg, 2)
    z, logdet = model.forward(x)
    model.clear_cache()
    D = cfg.num_dims
    expected = -0.5 * np.sum(z * z, axis=1) - 0.5 * D * np.log(2 * np.pi) + logdet
    np.testing.assert_allclose(model.log_prob(x), expected, rtol=1e-12)
    np.testing.assert_allclose(log_normal(np.zeros((1, 3))), [-1.5 * np.log(2 * np.pi)])


# the training defaults of the options tiny() pins (read from FlowConfig, so this case follows
# any change of the defaults)
TRAINING_DEFAULTS = {k: getattr(FlowConfig(), k) for k in ("scale", "cinc_corner", "guard")}


# ("cinc", "quad") with the triangular corner and sigmoid scale, and ("1x1+emerging", "affine"),
# are checked by the verification report's quick run in the same CI job (claim "models": the
# same tiny model, the same finite-difference helper); not repeated here.
@pytest.mark.parametrize(
    "conv, coupling, extra",
    [
        ("cinc", "affine", {}),
        ("emerging", "quad", {}),
        ("1x1", "quad", {}),
        ("cinc", "affine", TRAINING_DEFAULTS),
        ("periodic", "additive", TRAINING_DEFAULTS),
        ("1x1+cinc", "affine", {}),
        ("shuffle", "affine", {}),
    ],
)
def test_model_backward_matches_finite_differences(conv, coupling, extra, rng):
    """model.backward vs central differences of sum(z dz) + sum(logdet dlogdet) (random dz,
    dlogdet; :func:`flownp.testing.check_layer_gradients`) for x and every parameter array.
    The bits/dim loss's own gradient (dz, dlogdet) is tests/test_train.py's."""
    cfg = tiny(conv, coupling, **extra)
    model = ready_model(cfg, rng)
    res = check_layer_gradients(model, images(rng, cfg, 2), rng, max_entries=3)
    assert set(res.errors) == {"x", *model.params}
    assert res.max_error < 1e-6, str(res)


def test_float32_model_runs_and_matches_float64(rng):
    cfg64 = tiny("cinc", "quad")
    m64 = ready_model(cfg64, rng)
    m32 = FlowModel(tiny("cinc", "quad", dtype="float32"), seed=3)
    m32.load_state_dict(m64.state_dict())
    x = images(rng, cfg64, 2)
    z64, ld64 = m64.forward(x)
    z32, ld32 = m32.forward(x.astype(np.float32))
    assert z32.dtype == np.float32
    np.testing.assert_allclose(z32, z64, atol=1e-4)
    np.testing.assert_allclose(ld32, ld64, rtol=1e-4)
    xr = m32.inverse(z32)
    assert xr.dtype == np.float32
    np.testing.assert_allclose(xr, x, atol=1e-4)


# ---------------------------------------------------------------------- state, sampling, init
def test_state_dict_round_trip(rng):
    cfg = tiny("cinc", "affine")
    a = ready_model(cfg, rng)
    b = FlowModel(cfg, seed=99)
    assert not b.initialized
    b.load_state_dict(a.state_dict())
    assert b.initialized
    x = images(rng, cfg, 2)
    za, la = a.forward(x)
    zb, lb = b.forward(x)
    np.testing.assert_array_equal(za, zb)
    np.testing.assert_array_equal(la, lb)


def test_sample_shapes_temperature_and_seed(rng):
    cfg = tiny("cinc", "quad")
    model = ready_model(cfg, rng)
    s1 = model.sample(5, temperature=0.7, seed=1)
    s2 = model.sample(5, temperature=0.7, seed=1)
    assert s1.shape == (5, *cfg.image_shape)
    np.testing.assert_array_equal(s1, s2)
    s0 = model.sample(2, temperature=0.0)
    np.testing.assert_allclose(s0, model.inverse(np.zeros((2, cfg.num_dims))), atol=1e-12)
    z, _ = model.forward(s1)  # samples encode back to 0.7 * the standard-normal draw
    model.clear_cache()
    eps = np.random.default_rng(1).standard_normal((5, cfg.num_dims))
    np.testing.assert_allclose(z, 0.7 * eps, atol=1e-8)


def test_data_dependent_init_standardises_first_actnorm(rng):
    cfg = tiny("cinc", "affine")
    model = FlowModel(cfg, seed=0)
    assert not model.initialized
    x = images(rng, cfg, 64) * 0.3 + 0.1
    model.initialize(x)
    assert model.initialized
    squeeze = model.flow[0][1]
    actnorm = model.flow[1][1].order[0]
    h, _ = squeeze.forward(x)
    y, _ = actnorm.forward(h)
    model.clear_cache()
    flat = y.reshape(-1, y.shape[-1])
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(flat.std(0), 1, atol=1e-4)
    # a second initialise does not re-initialise
    before = {k: v.copy() for k, v in model.params.items()}
    model.initialize(x + 1.0)
    for k, v in model.params.items():
        np.testing.assert_array_equal(v, before[k])
