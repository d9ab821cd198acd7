"""Checking tools shared by the test suite and the verification report.

* :func:`dense_jacobian`: the Jacobian of ``x -> y`` for one sample, column by column by
  central differences (exact for linear maps up to round-off), in the paper's vectorisation
  ``x.reshape(-1)`` (row, column, channel).
* :func:`check_layer_gradients`: central finite differences of the scalar
  ``L = sum(y * dy) + sum(logdet * dlogdet)`` against a layer's ``backward``, for the input and
  every parameter, with random ``dy`` and ``dlogdet``.
* :func:`randomize_params`: perturb every parameter so nothing is trivially the identity
  (zero-initialised output convolutions, unit actnorm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def dense_jacobian(
    fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """Jacobian ``d fn(x).reshape(-1) / d x.reshape(-1)`` for a single sample ``x`` (N = 1),
    by central differences. Use float64."""
    if x.shape[0] != 1:
        raise ValueError(f"dense_jacobian: expects a single sample (N = 1), got shape {x.shape}")
    x = np.array(x, dtype=np.float64)
    flat = x.reshape(-1)
    y0 = np.asarray(fn(x)).reshape(-1)
    J = np.empty((y0.size, flat.size))
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        yp = np.asarray(fn(x)).reshape(-1)
        flat[i] = old - eps
        ym = np.asarray(fn(x)).reshape(-1)
        flat[i] = old
        J[:, i] = (yp - ym) / (2 * eps)
    return J


def randomize_params(layer, rng: np.random.Generator, scale: float = 0.1) -> None:
    """Add ``scale * N(0, 1)`` noise to every parameter of ``layer`` (in place)."""
    for p in layer.params.values():
        p += scale * rng.standard_normal(p.shape).astype(p.dtype)


@dataclass
class GradCheckResult:
    """Per-array maximum relative error ``|analytic - numeric| / max(1, |numeric|)``."""

    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else 0.0

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v:.2e}" for k, v in self.errors.items())


def check_layer_gradients(
    layer,
    x: np.ndarray,
    rng: np.random.Generator,
    eps: float = 1e-6,
    max_entries: int = 40,
    forward: Callable | None = None,
) -> GradCheckResult:
    """Compare ``layer.backward`` with central differences of
    ``L = sum(y * dy) + sum(logdet * dlogdet)`` (float64).

    For each array (``"x"`` and every parameter) at most ``max_entries`` randomly chosen entries
    are perturbed. ``forward`` defaults to ``layer.forward`` and must return ``(y, logdet)``.
    """
    forward = forward or layer.forward
    x = np.array(x, dtype=np.float64)
    y, logdet = forward(x)
    dy = rng.standard_normal(y.shape)
    dlogdet = rng.standard_normal(logdet.shape)
    layer.zero_grad()
    dx = layer.backward(dy, dlogdet)
    analytic = {"x": dx.copy()}
    analytic.update({k: g.copy() for k, g in layer.grads.items()})

    def loss() -> float:
        yy, ll = forward(x)
        layer.clear_cache()
        return float(np.sum(yy * dy) + np.sum(ll * dlogdet))

    targets = {"x": x}
    targets.update(layer.params)
    result = GradCheckResult()
    for name, arr in targets.items():
        flat = arr.reshape(-1)
        idx = rng.choice(flat.size, size=min(max_entries, flat.size), replace=False)
        err = 0.0
        for i in idx:
            old = flat[i]
            flat[i] = old + eps
            lp = loss()
            flat[i] = old - eps
            lm = loss()
            flat[i] = old
            num = (lp - lm) / (2 * eps)
            ana = analytic[name].reshape(-1)[i]
            err = max(err, abs(ana - num) / max(1.0, abs(num)))
        result.errors[name] = err
    return result


def rectangles_dataset(
    n_train: int = 96,
    n_test: int = 32,
    seed: int = 0,
    shape: tuple[int, int, int] = (8, 8, 1),
    name: str = "rects",
):
    """A tiny synthetic dataset for tests: bright 4 x 4 squares at random places on a dark
    background (easy structure for a tiny flow to learn). Returns an object with ``name``,
    uint8 ``train`` / ``test`` arrays ``(N, H, W, C)`` and ``shape``, as
    :class:`flownp.data.Dataset` has."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    n = n_train + n_test
    img = rng.integers(0, 30, (n, *shape)).astype(np.uint8)
    for i in range(n):
        r, c = rng.integers(0, min(shape[:2]) - 4, 2)  # the square stays inside the image
        img[i, r : r + 4, c : c + 4] = rng.integers(200, 256)
    return SimpleNamespace(name=name, train=img[:n_train], test=img[n_train:], shape=shape)
