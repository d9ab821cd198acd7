"""Hand-written Adam and Adamax: steps computed by hand, warmup, clipping, EMA, non-finite
rejection, state round trip (the shared machinery is checked for both)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flownp.errors import NonFiniteError
from flownp.optim import Adam, Adamax, global_norm, make_optimizer

CLASSES = [Adam, Adamax]


def test_two_steps_match_hand_computation():
    p = {"w": np.array([1.0, -2.0])}
    opt = Adam(p, lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    # step 1, g = (0.5, 0.5): m = 0.05, v = 0.00025; m_hat = 0.5, v_hat = 0.25 -> update 0.1 each
    opt.step({"w": np.array([0.5, 0.5])})
    step1 = 0.1 * 0.5 / (math.sqrt(0.25) + 1e-8)
    np.testing.assert_allclose(p["w"], [1.0 - step1, -2.0 - step1], rtol=1e-15)
    # step 2, g = (-1, 0): first entry m = 0.045 - 0.1 = -0.055, v = 0.00024975 + 0.001
    m_hat = -0.055 / (1 - 0.9**2)
    v_hat = (0.999 * 0.00025 + 0.001 * 1.0) / (1 - 0.999**2)
    w0 = 1.0 - step1 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8)
    #                second entry m = 0.045, v = 0.00024975
    m_hat1 = 0.045 / (1 - 0.9**2)
    v_hat1 = (0.999 * 0.00025) / (1 - 0.999**2)
    w1 = -2.0 - step1 - 0.1 * m_hat1 / (math.sqrt(v_hat1) + 1e-8)
    opt.step({"w": np.array([-1.0, 0.0])})
    np.testing.assert_allclose(p["w"], [w0, w1], rtol=1e-12)
    assert abs(w0 - 0.93661) < 1e-5  # the number worked out on paper
    assert opt.t == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_parameters_updated_in_place_and_dtype_kept(cls):
    w = np.ones((2, 3), np.float32)
    p = {"a/b": w}
    opt = cls(p, lr=1e-2)
    opt.step({"a/b": np.full((2, 3), 0.3, np.float32)})
    assert p["a/b"] is w and w.dtype == np.float32
    assert opt.m["a/b"].dtype == np.float32
    np.testing.assert_allclose(w, 1 - 1e-2, rtol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_linear_warmup(cls):
    opt = cls({"w": np.zeros(1)}, lr=1.0, warmup_steps=4)
    assert [opt.lr_at(t) for t in (1, 2, 4, 10)] == [0.25, 0.5, 1.0, 1.0]
    info = opt.step({"w": np.ones(1)})
    assert info["lr"] == 0.25
    assert cls({"w": np.zeros(1)}, lr=0.3).lr_at(1) == 0.3


def test_clipping_scales_the_gradient_seen_by_the_moments():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}  # global norm 5
    assert global_norm(g) == 5.0
    opt = Adam({"a": np.zeros(2), "b": np.zeros((1, 1))}, max_grad_norm=1.0, betas=(0.5, 0.5))
    info = opt.step(g)
    assert info["grad_norm"] == 5.0 and info["clip"] == pytest.approx(0.2)
    np.testing.assert_allclose(opt.m["a"], [0.5 * 0.6, 0.0])  # (1 - beta1) * g * 0.2
    np.testing.assert_allclose(opt.v["b"], [[0.5 * 0.8**2]])
    np.testing.assert_array_equal(g["a"], [3.0, 0.0])  # the caller's gradient is untouched
    opt2 = Adam({"a": np.zeros(2)}, max_grad_norm=10.0)
    assert opt2.step({"a": np.array([3.0, 4.0])})["clip"] == 1.0  # below the threshold


@pytest.mark.parametrize("cls", CLASSES)
def test_non_finite_gradient_is_rejected_without_touching_state(cls):
    p = {"w": np.array([1.0, 2.0]), "v": np.array([0.5])}
    opt = cls(p, lr=0.1, ema_decay=0.9)
    opt.step({"w": np.array([0.1, 0.2]), "v": np.array([0.3])})
    snapshot = {k: a.copy() for k, a in p.items()}
    second = getattr(opt, cls.second)
    m, v, ema = ({k: a.copy() for k, a in d.items()} for d in (opt.m, second, opt.ema))
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteError, match="non-finite gradient in \\['v'\\]"):
            opt.step({"w": np.array([0.1, 0.2]), "v": np.array([bad])})
    assert opt.t == 1
    for k in p:
        np.testing.assert_array_equal(p[k], snapshot[k])
        np.testing.assert_array_equal(opt.m[k], m[k])
        np.testing.assert_array_equal(second[k], v[k])
        np.testing.assert_array_equal(opt.ema[k], ema[k])


def test_ema_values_schedule_and_swap():
    p = {"w": np.array([0.0])}
    opt = Adam(p, lr=1.0, ema_decay=0.5)
    assert opt.ema_decay_at(1) == pytest.approx(2 / 11)
    assert opt.ema_decay_at(100) == 0.5
    opt.step({"w": np.array([1.0])})  # Adam's first step moves by -lr: w = -1
    d = 2 / 11
    np.testing.assert_allclose(p["w"], [-1.0], atol=1e-7)
    np.testing.assert_allclose(opt.ema["w"], [d * 0.0 + (1 - d) * -1.0], atol=1e-7)
    raw = p["w"].copy()
    with opt.ema_weights():
        np.testing.assert_array_equal(p["w"], opt.ema["w"])
    np.testing.assert_array_equal(p["w"], raw)
    with pytest.raises(RuntimeError), opt.ema_weights():  # restored even on an exception
        raise RuntimeError
    np.testing.assert_array_equal(p["w"], raw)


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip_continues_identically(cls, rng):
    def make():
        return {"w": rng.standard_normal(4), "b": rng.standard_normal((2, 2))}

    p1 = make()
    p2 = {k: v.copy() for k, v in p1.items()}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p1.items()} for _ in range(6)]
    kw = dict(lr=0.01, warmup_steps=3, max_grad_norm=1.0, ema_decay=0.9)
    a = cls(p1, **kw)
    for g in grads[:3]:
        a.step(g)
    b = cls(p2, **kw)  # fresh optimizer: t = 0, zero moments
    for k in p2:
        p2[k][...] = p1[k]
    b.load_state_dict(a.state_dict())
    for g in grads[3:]:
        a.step(g)
        b.step(g)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
        np.testing.assert_array_equal(a.ema[k], b.ema[k])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": 0.0}, "lr"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"warmup_steps": -1}, "warmup"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ],
)
@pytest.mark.parametrize("cls", CLASSES)
def test_bad_hyper_parameters(cls, kw, match):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {match}"):
        cls({"w": np.zeros(1)}, **kw)


@pytest.mark.parametrize("cls", CLASSES)
def test_gradient_keys_must_match(cls):
    opt = cls({"w": np.zeros(1)})
    with pytest.raises(KeyError, match="gradient keys"):
        opt.step({"x": np.zeros(1)})


def test_adamax_two_steps_match_hand_computation():
    p = {"w": np.array([1.0, -2.0])}
    opt = Adamax(p, lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    # step 1, g = (0.5, -0.25): m = (0.05, -0.025), u = |g|; m_hat = g -> step lr * sign(g)
    opt.step({"w": np.array([0.5, -0.25])})
    np.testing.assert_allclose(opt.u["w"], [0.5, 0.25], rtol=0)
    w1 = np.array([1.0 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 + 0.1 * 0.25 / (0.25 + 1e-8)])
    np.testing.assert_allclose(p["w"], w1, rtol=1e-15)
    # step 2, g = (0.1, -1.0): u = (max(0.4995, 0.1), max(0.24975, 1.0)) = (0.4995, 1.0)
    m = np.array([0.9 * 0.05 + 0.1 * 0.1, 0.9 * -0.025 + 0.1 * -1.0])  # (0.055, -0.1225)
    u = np.array([0.999 * 0.5, 1.0])
    opt.step({"w": np.array([0.1, -1.0])})
    np.testing.assert_allclose(opt.u["w"], u, rtol=1e-15)
    np.testing.assert_allclose(opt.m["w"], m, rtol=1e-15)
    w2 = w1 - 0.1 / (1 - 0.9**2) * m / (u + 1e-8)
    np.testing.assert_allclose(p["w"], w2, rtol=1e-14)
    assert abs(w2[0] - 0.842047) < 1e-6 and abs(w2[1] - -1.835526) < 1e-6  # worked out on paper


def test_adamax_clipping_scales_the_gradient_seen_by_both_statistics():
    opt = Adamax({"a": np.zeros(2)}, max_grad_norm=1.0, betas=(0.5, 0.5))
    info = opt.step({"a": np.array([3.0, -4.0])})  # norm 5 -> clipped to (0.6, -0.8)
    assert info["clip"] == pytest.approx(0.2)
    np.testing.assert_allclose(opt.m["a"], [0.3, -0.4])
    np.testing.assert_allclose(opt.u["a"], [0.6, 0.8])


def test_adamax_and_adam_differ_and_make_optimizer_names_them():
    a, b = make_optimizer("adam", {"w": np.zeros(2)}), make_optimizer("adamax", {"w": np.zeros(2)})
    assert type(a) is Adam and type(b) is Adamax
    for g in ([0.3, -2.0], [1.0, 0.5], [-0.2, 0.1]):
        a.step({"w": np.array(g)})
        b.step({"w": np.array(g)})
    assert not np.allclose(a.params["w"], b.params["w"])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("sgd", {"w": np.zeros(2)})


def test_a_state_of_the_other_optimizer_is_refused():
    adam = Adam({"w": np.zeros(2)})
    adam.step({"w": np.ones(2)})
    state = adam.state_dict()
    assert state["hparams"]["optimizer"] == "adam" and "v" in state
    with pytest.raises(ValueError, match="the state is of the 'adam' optimizer, not 'adamax'"):
        Adamax({"w": np.zeros(2)}).load_state_dict(state)
    del state["hparams"]["optimizer"]  # a state written before Adamax existed is Adam's
    fresh = Adam({"w": np.zeros(2)})
    fresh.load_state_dict(state)
    assert fresh.t == 1 and np.array_equal(fresh.v["w"], adam.v["w"])
