"""The layer contract (``flownp/layers/base.py``), checked once for every layer in a registry.

Every flow layer (and the split, through a two-output adapter) is built in float64 with
random, non-identity parameters and checked for: the round trip ``inverse(forward(x)) == x``,
the log-determinant against ``slogdet`` of the dense finite-difference Jacobian, the backward
against central finite differences (:func:`flownp.testing.check_layer_gradients`), the
backward protocol (one forward, one backward; gradients accumulate) and clear errors for a
wrong rank, channel count, dtype or a NaN. Layer-specific behaviour (solvers, masks, the
guard's bound, singular kernels, ...) stays in each layer's own test file.

A new layer joins by adding one :class:`Case` to :data:`CASES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from flownp.errors import NonFiniteError
from flownp.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    CInCConv,
    ConditionalPrior,
    Conv1x1,
    EmergingConv,
    Layer,
    LearnedPrior,
    PeriodicConv,
    QuadCoupling,
    Split,
    Squeeze,
)
from flownp.testing import check_layer_gradients, dense_jacobian, randomize_params

SHAPE = (4, 4, 4)  # H, W, C of the test inputs: 64 Jacobian columns


class SplitAsLayer(Layer):
    """A :class:`Split` (the ``FactorOut`` contract) seen as ``x -> concat(h, eps)``."""

    def __init__(self, split: Split) -> None:
        super().__init__(split.dtype)
        self.split = self.add_layer("split", split)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, eps, logdet = self.split.forward(x)
        return np.concatenate([h, eps], axis=-1), logdet

    def inverse(self, y: np.ndarray) -> np.ndarray:
        C1 = self.split.half
        return self.split.inverse(y[..., :C1].copy(), y[..., C1:].copy())

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        C1 = self.split.half
        return self.split.backward(dy[..., :C1], dy[..., C1:], dlogdet)


class LabelledPrior(Layer):
    """A :class:`ConditionalPrior` with the labels ``n mod K`` bound (a plain layer)."""

    def __init__(self, prior: ConditionalPrior) -> None:
        super().__init__(prior.dtype)
        self.prior = self.add_layer("prior", prior)

    def _labels(self, x: np.ndarray) -> np.ndarray | None:
        n = len(x) if isinstance(x, np.ndarray) and x.ndim else 0
        return np.arange(n) % self.prior.num_classes if n else None

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.prior.forward(x, self._labels(x))

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return self.prior.inverse(y, self._labels(y))

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        return self.prior.backward(dy, dlogdet)


@dataclass(frozen=True)
class Case:
    """``build(dtype, seed)`` returns a fresh layer for ``SHAPE`` inputs; ``noise`` is the
    scale of the parameter perturbation (after a data-dependent initialisation forward).
    ``channels``: the forward checks the channel count. ``names``: how the layer calls its
    input and the inverse's input in error messages. ``owner``: the class named in them."""

    build: Callable[[Any, int], Layer]
    noise: float = 0.1
    channels: bool = True
    names: tuple[str, str] = ("x", "y")
    owner: str = ""


def _coupling(cls, scale):
    return lambda dt, seed: cls(SHAPE[2], 6, scale=scale, seed=seed, dtype=dt)


CASES: dict[str, Case] = {
    "actnorm": Case(lambda dt, s: ActNorm(SHAPE[2], dtype=dt)),
    "squeeze": Case(lambda dt, s: Squeeze(dtype=dt), channels=False),
    "cinc-triangular": Case(lambda dt, s: CInCConv(SHAPE[2], 3, seed=s, dtype=dt)),
    "cinc-unit": Case(lambda dt, s: CInCConv(SHAPE[2], 3, corner="unit", seed=s, dtype=dt)),
    "cinc-lu": Case(lambda dt, s: CInCConv(SHAPE[2], 3, corner="lu", seed=s, dtype=dt)),
    "cinc-triangular-guard": Case(
        lambda dt, s: CInCConv(SHAPE[2], 3, seed=s, dtype=dt, guard=0.9), noise=0.3
    ),
    "cinc-lu-guard": Case(  # the default of FlowConfig
        lambda dt, s: CInCConv(SHAPE[2], 3, corner="lu", seed=s, dtype=dt, guard=0.9), noise=0.3
    ),
    "conv1x1": Case(lambda dt, s: Conv1x1(SHAPE[2], seed=s, dtype=dt)),
    "conv1x1-lu": Case(lambda dt, s: Conv1x1(SHAPE[2], lu=True, seed=s, dtype=dt)),
    "emerging": Case(lambda dt, s: EmergingConv(SHAPE[2], 3, seed=s, dtype=dt)),
    "emerging-guard": Case(
        lambda dt, s: EmergingConv(SHAPE[2], 3, seed=s, dtype=dt, guard=0.9), noise=0.3
    ),
    "reverse": Case(lambda dt, s: ChannelPermutation(SHAPE[2], "reverse", dtype=dt)),
    "shuffle": Case(lambda dt, s: ChannelPermutation(SHAPE[2], "shuffle", seed=s, dtype=dt)),
    "periodic": Case(lambda dt, s: PeriodicConv(SHAPE[2], 3, seed=s, dtype=dt), noise=0.2),
    "periodic-guard": Case(
        lambda dt, s: PeriodicConv(SHAPE[2], 3, seed=s, dtype=dt, guard=0.9), noise=0.3
    ),
    "additive": Case(lambda dt, s: AdditiveCoupling(SHAPE[2], 6, seed=s, dtype=dt), noise=0.03),
    "affine-exp": Case(_coupling(AffineCoupling, "exp"), noise=0.03),
    "affine-sigmoid": Case(_coupling(AffineCoupling, "sigmoid"), noise=0.03),
    "quad-exp": Case(_coupling(QuadCoupling, "exp"), noise=0.03),
    "quad-sigmoid": Case(_coupling(QuadCoupling, "sigmoid"), noise=0.03),
    "affine-softclamp": Case(_coupling(AffineCoupling, "softclamp"), noise=0.03),
    "quad-softclamp": Case(_coupling(QuadCoupling, "softclamp"), noise=0.03),
    "learned-prior": Case(lambda dt, s: LearnedPrior(SHAPE, dtype=dt), names=("z", "eps")),
    "conditional-prior": Case(
        lambda dt, s: LabelledPrior(ConditionalPrior(SHAPE, 3, dtype=dt)),
        names=("z", "eps"),
        owner="ConditionalPrior",
    ),
    "conditional-prior-position": Case(
        lambda dt, s: LabelledPrior(ConditionalPrior(SHAPE, 3, per_position=True, dtype=dt)),
        names=("z", "eps"),
        owner="ConditionalPrior",
    ),
    "split": Case(
        lambda dt, s: SplitAsLayer(Split(SHAPE[2], dtype=dt)), names=("x", "h"), owner="Split"
    ),
}


def make(name: str, rng: np.random.Generator, dtype: Any = np.float64, n: int = 2):
    """A ready layer of case ``name`` (data-initialised, parameters perturbed) and an input."""
    case = CASES[name]
    layer = case.build(dtype, int(rng.integers(1 << 31)))
    x = rng.standard_normal((n, *SHAPE)).astype(dtype)
    layer.forward(x)  # data-dependent initialisation (ActNorm, the conditioners' ActNorms)
    layer.clear_cache()
    randomize_params(layer, rng, case.noise)
    return layer, x


def owner(name: str, layer: Layer) -> str:
    return re.escape(CASES[name].owner or type(layer).__name__)


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", CASES)
def test_round_trip(name, rng):
    layer, x = make(name, rng)
    y, logdet = layer.forward(x)
    layer.clear_cache()
    assert y.shape[0] == x.shape[0] and logdet.shape == (x.shape[0],)
    assert np.max(np.abs(layer.inverse(y) - x)) <= 1e-10 * np.max(np.abs(x))


@pytest.mark.parametrize("name", CASES)
def test_logdet_matches_dense_jacobian(name, rng):
    layer, x = make(name, rng, n=1)
    _, logdet = layer.forward(x)
    layer.clear_cache()

    def f(a: np.ndarray) -> np.ndarray:
        y, _ = layer.forward(a)
        layer.clear_cache()
        return y

    sign, expected = np.linalg.slogdet(dense_jacobian(f, x))
    assert sign != 0
    assert abs(logdet[0] - expected) <= 1e-6 * max(1.0, abs(expected))


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_finite_differences(name, rng):
    layer, x = make(name, rng)
    res = check_layer_gradients(layer, x, rng)
    assert res.max_error < 1e-6, str(res)


# ---------------------------------------------------------------------- the backward protocol
@pytest.mark.parametrize("name", CASES)
def test_backward_protocol(name, rng):
    """One backward per forward; gradients accumulate with +=; upstream shapes are checked."""
    layer, x = make(name, rng)
    cls = owner(name, layer)
    y, logdet = layer.forward(x)
    dy, dld = rng.standard_normal(y.shape), rng.standard_normal(logdet.shape)
    layer.zero_grad()
    dx1 = layer.backward(dy, dld)
    assert dx1.shape == x.shape
    once = {k: g.copy() for k, g in layer.grads.items()}
    with pytest.raises(RuntimeError, match=f"{cls}.backward called without a preceding forward"):
        layer.backward(dy, dld)
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(dy, dld), dx1)
    for key, g in layer.grads.items():
        np.testing.assert_allclose(g, 2 * once[key], rtol=1e-13, atol=0, err_msg=key)
    layer.forward(x)
    with pytest.raises(ValueError, match=f"{cls}.backward: d[a-z]+ has shape"):
        layer.backward(dy[..., :1], dld)
    layer.forward(x)
    with pytest.raises(ValueError, match=f"{cls}.backward: dlogdet has shape"):
        layer.backward(dy, np.zeros(3))


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_named(name, rng):
    layer, x = make(name, rng)
    cls = owner(name, layer)
    xname, yname = CASES[name].names
    with pytest.raises(TypeError, match=f"{cls}: {xname} must be a numpy array"):
        layer.forward(x.tolist())
    with pytest.raises(ValueError, match=f"{cls}: {xname} must be NHWC \\(rank 4\\)"):
        layer.forward(x[0])
    if CASES[name].channels:
        with pytest.raises(ValueError, match=f"{cls}: {xname} has 3 channels"):
            layer.forward(np.ascontiguousarray(x[..., :3]))
    with pytest.raises(TypeError, match=f"{cls}: {xname} has dtype float32"):
        layer.forward(x.astype(np.float32))
    bad = x.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(NonFiniteError, match=f"{cls}: {xname} contains 1 NaN"):
        layer.forward(bad)
    y, _ = layer.forward(x)
    layer.clear_cache()
    y[-1, 0, 0, 0] = np.inf
    with pytest.raises(NonFiniteError, match=f"{cls}: {yname} contains 1 NaN/Inf"):
        layer.inverse(y)


@pytest.mark.parametrize("name", CASES)
def test_float32_layer_keeps_float32(name, rng):
    layer, x = make(name, rng, dtype=np.float32)
    y, logdet = layer.forward(x)
    dx = layer.backward(np.ones_like(y), np.ones_like(logdet))
    assert y.dtype == logdet.dtype == dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())
    assert np.max(np.abs(layer.inverse(y) - x)) <= 1e-4 * np.max(np.abs(x))


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip(name, rng):
    """Parameters and buffers restore the layer exactly into one built with another seed."""
    layer, x = make(name, rng)
    other = CASES[name].build(np.float64, 999)
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other.forward(x)[0], layer.forward(x)[0])
