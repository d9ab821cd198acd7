"""Class-conditional FlowModel (num_classes, weight_y) and n-bit configurations: labels through
forward / inverse / sampling, the generative classifier's scores, the classifier's gradient
through the whole model (finite differences in float64), configuration errors and old
configurations."""

from __future__ import annotations

import numpy as np
import pytest

from flownp.layers import ConditionalPrior, LatentClassifier, LearnedPrior
from flownp.model import FlowConfig, FlowModel, log_normal
from flownp.testing import randomize_params

K = 3


def tiny(**kw) -> FlowConfig:
    base = {
        "image_shape": (8, 8, 1),
        "levels": 2,
        "depth": 1,
        "width": 4,
        "scale": "sigmoid",
        "cinc_corner": "triangular",
        "dtype": "float64",
        "num_classes": K,
    }
    return FlowConfig(**{**base, **kw})


def ready(cfg: FlowConfig, rng: np.random.Generator, scale: float = 0.05) -> FlowModel:
    model = FlowModel(cfg, seed=3)
    model.initialize(rng.uniform(-0.5, 0.5, (16, *cfg.image_shape)).astype(cfg.dtype))
    randomize_params(model, rng, scale)
    for k in ("prior/label_mean", "prior/label_logs"):  # labels that matter
        if k in model.params:
            model.params[k] += 0.3 * rng.standard_normal(model.params[k].shape)
    return model


def images(rng, cfg, n):
    return rng.uniform(-0.5, 0.5, (n, *cfg.image_shape)).astype(cfg.dtype)


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_classes": 1}, "num_classes must be 0 .unconditional. or an int in 2..100000"),
        ({"num_classes": -2}, "num_classes must be 0"),
        ({"num_classes": 10**12 + 1}, "num_classes must be 0"),
        ({"num_classes": 2.5}, "num_classes must be 0"),
        ({"num_classes": 0, "weight_y": 1.0}, "weight_y > 0 needs a class-conditional model"),
        ({"weight_y": -0.1}, "weight_y must be a finite number >= 0"),
        ({"weight_y": float("nan")}, "weight_y must be a finite number >= 0"),
        ({"n_bits": 0}, "n_bits must be an int in 1..8"),
        ({"n_bits": 9}, "n_bits must be an int in 1..8"),
        ({"n_bits": 5.0}, "n_bits must be an int in 1..8"),
        ({"label_prior": "pixel"}, "label_prior must be one of"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_config_of_an_older_checkpoint_loads_unconditional_8_bit():
    old = tiny(num_classes=0).to_dict()
    for key in ("num_classes", "weight_y", "n_bits"):
        del old[key]  # written before the fields existed
    cfg = FlowConfig.from_dict(old)
    assert (cfg.num_classes, cfg.weight_y, cfg.n_bits) == (0, 0.0, 8)
    assert not cfg.class_conditional
    new = tiny(weight_y=0.5, n_bits=5)
    assert FlowConfig.from_json(new.to_json()) == new and new.class_conditional


def test_layers_and_parameter_paths():
    plain = FlowModel(tiny(num_classes=0))
    assert type(plain.prior) is LearnedPrior and plain.classifier is None
    cond = FlowModel(tiny())
    assert isinstance(cond.prior, ConditionalPrior) and cond.classifier is None
    both = FlowModel(tiny(weight_y=1.0))
    assert isinstance(both.classifier, LatentClassifier)
    C = both.latent_shapes()[-1][2]
    shapes = {k: v.shape for k, v in both.params.items()}
    assert shapes["prior/label_mean"] == shapes["prior/label_logs"] == (K, C)
    assert shapes["classifier/weight"] == (C, K) and shapes["classifier/bias"] == (K,)
    # everything else is the unconditional model's, path for path
    extra = {"prior/label_mean", "prior/label_logs", "classifier/weight", "classifier/bias"}
    assert set(shapes) - extra == set(plain.params)
    pos = FlowModel(tiny(label_prior="position"))
    top = pos.latent_shapes()[-1]
    assert pos.params["prior/label_mean"].shape == pos.params["prior/label_logs"].shape
    assert pos.params["prior/label_mean"].shape == (K, *top)


# ---------------------------------------------------------------------- labels
@pytest.mark.parametrize("label_prior", ["channel", "position"])
def test_round_trip_with_labels_and_label_free(rng, label_prior):
    cfg = tiny(weight_y=1.0, label_prior=label_prior)
    model = ready(cfg, rng)
    x = images(rng, cfg, 4)
    y = np.array([0, 2, 1, 2])
    z, _ = model.forward(x, y)
    model.clear_cache()
    np.testing.assert_allclose(model.inverse(z, y), x, rtol=0, atol=1e-10)
    assert np.max(np.abs(model.inverse(z, (y + 1) % K) - x)) > 1e-3  # the label matters
    zf, _ = model.forward(x)  # label-free latent: its own exact bijection
    model.clear_cache()
    np.testing.assert_allclose(model.inverse(zf), x, rtol=0, atol=1e-10)
    # only the top latent depends on the label
    n_top = int(np.prod(model.latent_shapes()[-1]))
    np.testing.assert_array_equal(z[:, :-n_top], zf[:, :-n_top])
    assert np.max(np.abs(z[:, -n_top:] - zf[:, -n_top:])) > 1e-3


@pytest.mark.parametrize("label_prior", ["channel", "position"])
def test_class_log_probs_is_log_prob_given_each_label(rng, label_prior):
    cfg = tiny(label_prior=label_prior)
    model = ready(cfg, rng)
    x = images(rng, cfg, 3)
    L = model.class_log_probs(x)
    assert L.shape == (3, K)
    for k in range(K):
        np.testing.assert_allclose(L[:, k], model.log_prob(x, np.full(3, k)), rtol=1e-12)
    z, logdet = model.forward(x, np.array([1, 0, 2]))
    model.clear_cache()
    np.testing.assert_allclose(
        model.log_prob(x, np.array([1, 0, 2])), log_normal(z) + logdet, rtol=1e-13
    )


def test_labels_are_required_or_refused(rng):
    cond = ready(tiny(), rng)
    x = images(rng, cond.config, 2)
    with pytest.raises(ValueError, match="log_prob: this model is class-conditional"):
        cond.log_prob(x)
    with pytest.raises(ValueError, match="sample: this model is class-conditional"):
        cond.sample(2)
    with pytest.raises(ValueError, match=r"FlowModel: label 3 is outside the classes 0\.\.2"):
        cond.forward(x, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"label 7 is outside the classes"):
        cond.sample(2, labels=7)
    plain = FlowModel(tiny(num_classes=0))
    with pytest.raises(ValueError, match="labels were given, but this model is not class-cond"):
        plain.forward(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.sample(2, labels=1)
    with pytest.raises(ValueError, match="not class-conditional"):
        plain.class_log_probs(x)
    with pytest.raises(ValueError, match="has no classifier"):
        cond.predict_labels(x)


def test_sample_takes_one_label_or_one_per_sample(rng):
    model = ready(tiny(), rng)
    a = model.sample(4, temperature=0.7, seed=1, labels=2)
    b = model.sample(4, temperature=0.7, seed=1, labels=np.array([2, 2, 2, 2]))
    np.testing.assert_array_equal(a, b)
    c = model.sample(4, temperature=0.7, seed=1, labels=np.array([0, 1, 2, 0]))
    z, _ = model.forward(c, np.array([0, 1, 2, 0]))  # encodes back to the same draw
    model.clear_cache()
    eps = np.random.default_rng(1).standard_normal((4, model.config.num_dims))
    np.testing.assert_allclose(z, 0.7 * eps, atol=1e-8)


# ---------------------------------------------------------------------- gradients
def _model_fd(model, x, y, rng, recompute=False, entries=3):
    """Analytic vs central differences of L = sum(z dz) + sum(logdet dld) + sum(logits da)."""
    z, logdet = model.forward(x, y)
    dz = rng.standard_normal(z.shape)
    dld = rng.standard_normal(logdet.shape)
    da = rng.standard_normal(model.logits.shape)
    model.zero_grad()
    model.recompute = recompute
    model.forward(x, y)
    dx = model.backward(dz, dld, da)
    model.recompute = False
    grads = {"x": dx, **{k: g.copy() for k, g in model.grads.items()}}

    def loss() -> float:
        zz, ll = model.forward(x, y)
        model.clear_cache()
        return float(np.sum(zz * dz) + np.sum(ll * dld) + np.sum(model.logits * da))

    worst = {}
    for name, arr in {"x": x, **model.params}.items():
        flat = arr.reshape(-1)
        err = 0.0
        for i in rng.choice(flat.size, size=min(entries, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + 1e-6
            lp = loss()
            flat[i] = old - 1e-6
            lm = loss()
            flat[i] = old
            num = (lp - lm) / 2e-6
            err = max(err, abs(grads[name].reshape(-1)[i] - num) / max(1.0, abs(num)))
        worst[name] = err
    return worst, grads


@pytest.mark.parametrize(
    ("recompute", "label_prior"), [(False, "channel"), (True, "channel"), (False, "position")]
)
def test_backward_with_the_classifier_matches_finite_differences(rng, recompute, label_prior):
    cfg = tiny(weight_y=1.0, label_prior=label_prior)
    model = ready(cfg, rng)
    x = images(rng, cfg, 3)
    y = np.array([2, 0, 2])
    worst, _ = _model_fd(model, x, y, rng, recompute=recompute)
    assert set(worst) == {"x", *model.params}
    assert max(worst.values()) < 1e-6, worst


def test_classifier_gradient_reaches_the_flow(rng):
    """With dz = dlogdet = 0, a nonzero dlogits moves the flow's parameters (through the top
    latent) and no dlogits leaves the classifier's gradient at zero."""
    cfg = tiny(weight_y=1.0)
    model = ready(cfg, rng)
    x = images(rng, cfg, 2)
    z, logdet = model.forward(x, np.array([0, 1]))
    model.zero_grad()
    model.backward(np.zeros_like(z), np.zeros_like(logdet), np.ones((2, K)) - 3 * np.eye(K)[:2])
    assert np.abs(model.grads["level0/step0/conv/weight"]).max() > 0
    assert np.abs(model.grads["classifier/weight"]).max() > 0
    model.forward(x, np.array([0, 1]))
    model.zero_grad()
    model.backward(z * 0 + 1, logdet * 0 + 1)
    assert not model.grads["classifier/weight"].any()
    plain = ready(tiny(), rng)
    z, logdet = plain.forward(x, np.array([0, 1]))
    with pytest.raises(ValueError, match="dlogits given, but the model has no classifier"):
        plain.backward(z, logdet, np.zeros((2, K)))
