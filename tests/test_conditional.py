"""The class-conditional top prior, the linear classifier on the top latent and its
cross-entropy in bits (flownp/layers/conditional.py): formulas, finite differences in float64,
round trips, and the errors of bad labels. The generic layer contract (dense log-det, bad
input, float32) is in tests/test_layer_contract.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flownp.layers import ConditionalPrior, LatentClassifier, LearnedPrior
from flownp.layers.conditional import cross_entropy_bits
from flownp.testing import dense_jacobian, randomize_params

SHAPE = (2, 3, 4)  # H, W, C of the top latent
K = 3


def make_prior(rng, dtype=np.float64) -> ConditionalPrior:
    layer = ConditionalPrior(SHAPE, K, dtype=dtype)
    randomize_params(layer, rng, scale=0.3)
    return layer


def test_zero_initialised_prior_is_standard_normal_and_ignores_the_label(rng):
    layer = ConditionalPrior(SHAPE, K)
    assert {k: v.shape for k, v in layer.params.items()} == {
        "mean": SHAPE,
        "logs": SHAPE,
        "label_mean": (K, SHAPE[2]),
        "label_logs": (K, SHAPE[2]),
    }
    assert all(not p.any() for p in layer.params.values())
    z = rng.standard_normal((4, *SHAPE))
    eps, logdet = layer.forward(z, np.array([0, 1, 2, 1]))
    assert np.array_equal(eps, z) and np.array_equal(logdet, np.zeros(4))


def test_formula_per_label(rng):
    """eps = (z - mean - W_mean[y]) exp(-(logs + W_logs[y])), logdet = -sum(logs + W_logs[y])."""
    layer = make_prior(rng)
    p = layer.params
    z = rng.standard_normal((5, *SHAPE))
    y = np.array([2, 0, 2, 1, 0])
    eps, logdet = layer.forward(z, y)
    for n in range(5):
        mean = p["mean"] + p["label_mean"][y[n]]  # (H, W, C) + (C,)
        logs = p["logs"] + p["label_logs"][y[n]]
        np.testing.assert_allclose(eps[n], (z[n] - mean) * np.exp(-logs), rtol=1e-13)
        np.testing.assert_allclose(logdet[n], -logs.sum(), rtol=1e-13)


def test_without_labels_it_is_the_unconditional_prior(rng):
    layer = make_prior(rng)
    plain = LearnedPrior(SHAPE)
    plain.params["mean"][...] = layer.params["mean"]
    plain.params["logs"][...] = layer.params["logs"]
    z = rng.standard_normal((3, *SHAPE))
    eps, logdet = layer.forward(z)
    eps0, logdet0 = plain.forward(z)
    assert np.array_equal(eps, eps0) and np.array_equal(logdet, logdet0)
    assert np.max(np.abs(layer.inverse(eps) - z)) < 1e-12


def test_round_trip_and_dense_logdet_per_label(rng):
    layer = make_prior(rng)
    z = rng.standard_normal((1, *SHAPE))
    for k in range(K):
        y = np.array([k])
        eps, logdet = layer.forward(z, y)
        assert np.max(np.abs(layer.inverse(eps, y) - z)) <= 1e-12
        J = dense_jacobian(lambda v, y=y: layer.forward(v, y)[0], z)
        assert abs(logdet[0] - np.linalg.slogdet(J)[1]) < 1e-8
    # the labels really matter: another label gives another latent
    e0, _ = layer.forward(z, np.array([0]))
    e1, _ = layer.forward(z, np.array([1]))
    assert np.max(np.abs(e0 - e1)) > 0.1


def _fd(loss, arr, idx, h=1e-6):
    flat = arr.reshape(-1)
    old = flat[idx]
    flat[idx] = old + h
    lp = loss()
    flat[idx] = old - h
    lm = loss()
    flat[idx] = old
    return (lp - lm) / (2 * h)


@pytest.mark.parametrize("per_position", [False, True], ids=["per-channel", "per-position"])
def test_backward_matches_finite_differences_including_the_label_embedding(rng, per_position):
    """Every entry of z, mean, logs and the label embedding (one offset per channel, or per
    position and channel), with repeated labels (the gradient of W[k] sums over the images of
    class k) and one class absent (zero gradient)."""
    layer = ConditionalPrior(SHAPE, 4, per_position=per_position)
    randomize_params(layer, rng, scale=0.3)
    z = rng.standard_normal((5, *SHAPE))
    y = np.array([2, 0, 2, 1, 0])  # class 3 absent
    eps, logdet = layer.forward(z, y)
    deps = rng.standard_normal(eps.shape)
    dld = rng.standard_normal(logdet.shape)
    layer.zero_grad()
    dz = layer.backward(deps, dld)
    grads = {"z": dz, **{k: g.copy() for k, g in layer.grads.items()}}
    assert not grads["label_mean"][3].any() and not grads["label_logs"][3].any()

    def loss() -> float:
        e, ld = layer.forward(z, y)
        layer.clear_cache()
        return float(np.sum(e * deps) + np.sum(ld * dld))

    for name, arr in {"z": z, **layer.params}.items():
        for i in range(arr.size):
            num = _fd(loss, arr, i)
            assert abs(grads[name].reshape(-1)[i] - num) <= 1e-7 * max(1.0, abs(num)), (name, i)


def test_class_log_likelihoods_scores_every_class_on_one_latent(rng):
    layer = make_prior(rng)
    z = rng.standard_normal((4, *SHAPE))
    L = layer.class_log_likelihoods(z)
    assert L.shape == (4, K) and L.dtype == np.float64
    D = int(np.prod(SHAPE))
    for k in range(K):
        eps, logdet = layer.forward(z, np.full(4, k))
        layer.clear_cache()
        e = eps.reshape(4, -1)
        expected = -0.5 * np.sum(e * e, axis=1) - 0.5 * D * math.log(2 * math.pi) + logdet
        np.testing.assert_allclose(L[:, k], expected, rtol=1e-13)


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.array([0, 3]), ValueError, r"ConditionalPrior: label 3 is outside the classes 0\.\.2"),
        (np.array([-1, 0]), ValueError, r"label -1 is outside the classes 0\.\.2"),
        (np.array([0]), ValueError, r"labels must have shape \(2,\), got \(1,\)"),
        (np.array([0.0, 1.0]), TypeError, "labels must be integers, got dtype float64"),
        (np.array([True, False]), TypeError, "labels must be integers, got dtype bool"),
    ],
)
def test_bad_labels_are_named(rng, labels, error, match):
    layer = make_prior(rng)
    z = rng.standard_normal((2, *SHAPE))
    with pytest.raises(error, match=match):
        layer.forward(z, labels)
    with pytest.raises(error, match=match):
        layer.inverse(z, labels)


def test_constructor_validation():
    for bad in (0, 1, 2.0, True, None):
        with pytest.raises(ValueError, match="ConditionalPrior: num_classes must be an int >= 2"):
            ConditionalPrior(SHAPE, bad)
    with pytest.raises(ValueError, match="ConditionalPrior: shape must be"):
        ConditionalPrior((2, 2), 3)
    with pytest.raises(ValueError, match="LatentClassifier: num_classes must be an int >= 2"):
        LatentClassifier(4, 1)
    with pytest.raises(ValueError, match="LatentClassifier: channels must be an int >= 1"):
        LatentClassifier(0, 3)


def test_float32_prior_keeps_float32(rng):
    layer = make_prior(rng, dtype=np.float32)
    z = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    y = np.array([0, 2, 1])
    eps, logdet = layer.forward(z, y)
    assert eps.dtype == logdet.dtype == np.float32
    assert layer.backward(eps, np.ones(3, np.float32)).dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert np.max(np.abs(layer.inverse(eps, y) - z)) < 1e-5


# ---------------------------------------------------------------------- the classifier
def test_cross_entropy_bits_formula_and_gradient(rng):
    a = rng.standard_normal((6, K)) * 2
    y = np.array([0, 1, 2, 2, 1, 0])
    bits, dbits, error = cross_entropy_bits(a, y)
    p = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(bits, -np.log2(p[np.arange(6), y]), rtol=1e-13)
    np.testing.assert_array_equal(error, (np.argmax(a, axis=1) != y).astype(float))
    for n in range(6):
        for k in range(K):
            b = a.copy()
            b[n, k] += 1e-6
            hi = cross_entropy_bits(b, y)[0][n]
            b[n, k] -= 2e-6
            lo = cross_entropy_bits(b, y)[0][n]
            assert abs(dbits[n, k] - (hi - lo) / 2e-6) < 1e-8
    # zero logits: log2 K bits for every image; huge logits stay finite
    assert np.allclose(cross_entropy_bits(np.zeros((2, K)), np.array([0, 2]))[0], math.log2(K))
    big = cross_entropy_bits(np.array([[1000.0, 0.0, -1000.0]]), np.array([2]))[0]
    assert np.isfinite(big).all() and abs(big[0] - 2000 / math.log(2)) < 1e-9


def test_classifier_formula_and_finite_differences(rng):
    clf = LatentClassifier(SHAPE[2], K)
    h = rng.standard_normal((5, *SHAPE))
    assert not clf.forward(h).any()  # zero initialised: all logits 0
    clf.clear_cache()
    randomize_params(clf, rng, scale=0.5)
    logits = clf.forward(h)
    m = h.mean(axis=(1, 2))
    np.testing.assert_allclose(logits, m @ clf.params["weight"] + clf.params["bias"], rtol=1e-13)
    y = np.array([0, 2, 1, 1, 0])
    w = 0.7  # the loss of a training step: mean_n(w * bits_y_n)
    bits, dbits, _ = cross_entropy_bits(logits, y)
    clf.zero_grad()
    dh = clf.backward(w * dbits / len(h))
    grads = {"h": dh, **{k: g.copy() for k, g in clf.grads.items()}}

    def loss() -> float:
        a = clf.forward(h)
        clf.clear_cache()
        return float(w * np.mean(cross_entropy_bits(a, y)[0]))

    for name, arr in {"h": h, **clf.params}.items():
        for i in range(arr.size):
            num = _fd(loss, arr, i)
            assert abs(grads[name].reshape(-1)[i] - num) <= 1e-7 * max(1.0, abs(num)), (name, i)


def test_classifier_bad_input(rng):
    clf = LatentClassifier(SHAPE[2], K)
    with pytest.raises(ValueError, match="LatentClassifier: h has 3 channels"):
        clf.forward(rng.standard_normal((2, 2, 3, 3)))
    clf.forward(rng.standard_normal((2, *SHAPE)))
    with pytest.raises(ValueError, match=r"LatentClassifier.backward: dlogits has shape"):
        clf.backward(np.zeros((2, K + 1)))
    with pytest.raises(ValueError, match=r"cross_entropy_bits: label 5 is outside"):
        cross_entropy_bits(np.zeros((1, K)), np.array([5]))


# ---------------------------------------------------------------------- per-position label prior
def test_per_position_label_embedding_shapes_formula_and_round_trip(rng):
    """per_position=True: W_mean, W_logs (K, H, W, C), one offset per position and channel:
    eps = (z - mean - W_mean[y]) exp(-(logs + W_logs[y])), logdet = -sum(logs + W_logs[y])."""
    layer = ConditionalPrior(SHAPE, K, per_position=True)
    assert layer.params["label_mean"].shape == (K, *SHAPE)
    assert layer.params["label_logs"].shape == (K, *SHAPE)
    z = rng.standard_normal((3, *SHAPE))
    eps, logdet = layer.forward(z, np.array([0, 1, 2]))
    assert np.array_equal(eps, z) and not logdet.any()  # zero initialised: N(0, I)
    randomize_params(layer, rng, scale=0.3)
    p = layer.params
    y = np.array([2, 0, 2, 1, 0])
    z = rng.standard_normal((5, *SHAPE))
    eps, logdet = layer.forward(z, y)
    for n in range(5):
        mean = p["mean"] + p["label_mean"][y[n]]  # (H, W, C) + (H, W, C)
        logs = p["logs"] + p["label_logs"][y[n]]
        np.testing.assert_allclose(eps[n], (z[n] - mean) * np.exp(-logs), rtol=1e-13)
        np.testing.assert_allclose(logdet[n], -logs.sum(), rtol=1e-13)
    assert np.max(np.abs(layer.inverse(eps, y) - z)) <= 1e-12
    scores = layer.class_log_likelihoods(z)
    for k in range(K):
        e, ld = layer.forward(z, np.full(5, k))
        ref = -0.5 * (e.reshape(5, -1) ** 2).sum(1) - 0.5 * e[0].size * math.log(2 * math.pi) + ld
        np.testing.assert_allclose(scores[:, k], ref, rtol=1e-12)
