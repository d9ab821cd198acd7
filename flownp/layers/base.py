"""The contract every flow layer follows, and the small amount of machinery they share.

Direction: ``forward`` maps data -> latent (as in Glow, nflows, FrEIA and the paper's
``f_theta``), ``inverse`` maps latent -> data. (TFP, distrax and normflows use the opposite
naming.)

* ``forward(x) -> (y, logdet)``: ``logdet`` has shape ``(N,)`` and is ``log|det dy/dx|`` per
  sample. The input is remembered (by reference) for one ``backward`` call.
* ``inverse(y) -> x``: exact up to round-off in the input dtype.
* ``backward(dy, dlogdet) -> dx``: takes the upstream gradient of *both* outputs (a flow's
  loss depends on the log-determinant directly), returns the gradient with respect to the
  input of the last ``forward`` and *adds* parameter gradients into ``grads`` (``+=``, so
  several backward calls accumulate; call :meth:`Layer.zero_grad` between steps). The
  remembered activations are released by ``backward``; calling it twice is an error.
* ``params`` / ``grads``: dicts with identical keys (``"weight"``, sub-layers as
  ``"net/conv_in/weight"``). The keys double as HDF5 paths and as the porting name map. Arrays
  are updated *in place* (``p -= lr * g``); never rebind them.
* ``buffers``: non-trainable state that is part of a saved model (signs of a diagonal, a
  permutation, actnorm's "initialised" flag).

All arrays are NHWC and of the layer's ``dtype`` (float32 or float64).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from flownp.errors import NonFiniteError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(dtype: Any) -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is float32 or float64, else raise ``TypeError``."""
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"flownp works in float32 or float64, got dtype {dt}")
    return dt


class Module:
    """Base class of every part of a model: parameter/gradient/buffer registry, sub-modules,
    input validation and the one-shot activation cache. No forward/inverse contract of its
    own (see :class:`Layer`, :class:`FactorOut`, :class:`Network`); a plain ``Module`` is a
    container (a level of a model)."""

    def __init__(self, dtype: Any = np.float64) -> None:
        self.dtype = check_dtype(dtype)
        self._params: dict[str, np.ndarray] = {}
        self._grads: dict[str, np.ndarray] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self._layers: dict[str, Module] = {}
        self._cache: Any = None

    # ---------------------------------------------------------------- registry
    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(value, dtype=self.dtype)
        self._params[name] = arr
        self._grads[name] = np.zeros_like(arr)
        return arr

    def add_buffer(self, name: str, value: np.ndarray) -> np.ndarray:
        arr = np.array(value)  # keeps its own dtype (int permutations, bool flags)
        self._buffers[name] = arr
        return arr

    def add_layer(self, name: str, layer: M) -> M:
        """Register a sub-module under ``name`` (its keys become ``name/<key>``); returns it."""
        self._layers[name] = layer
        return layer

    def _collect(self, attr: str) -> dict[str, np.ndarray]:
        out = dict(getattr(self, attr))
        for lname, layer in self._layers.items():
            for key, val in layer._collect(attr).items():
                out[f"{lname}/{key}"] = val
        return out

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Trainable parameters, flat, keyed by path. The arrays are the layer's own."""
        return self._collect("_params")

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Accumulated gradients, same keys and shapes as :attr:`params`."""
        return self._collect("_grads")

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        """Non-trainable saved state, flat, keyed by path."""
        return self._collect("_buffers")

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, keyed ``params/<path>`` / ``buffers/<path>``."""
        out = {f"params/{k}": v.copy() for k, v in self.params.items()}
        out.update({f"buffers/{k}": v.copy() for k, v in self.buffers.items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Copy values into the existing arrays (shapes must match exactly)."""
        targets = {f"params/{k}": v for k, v in self.params.items()}
        targets.update({f"buffers/{k}": v for k, v in self.buffers.items()})
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: missing {missing}, unexpected {unexpected}"
            )
        for key, dst in targets.items():
            src = np.asarray(state[key])
            if src.shape != dst.shape:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: {key} has shape {src.shape}, "
                    f"expected {dst.shape}"
                )
            dst[...] = src
        self.after_load()

    def after_load(self) -> None:
        """Hook for layers that derive state from their buffers after loading."""
        for layer in self._layers.values():
            layer.after_load()

    # ---------------------------------------------------------------- validation
    def check_input(self, x: Any, channels: int | None = None, name: str = "x") -> np.ndarray:
        """Validate an NHWC input: rank 4, channel count, dtype equal to the layer's, finite.

        Returns a C-contiguous array (the input itself when it already is one).
        """
        cls = type(self).__name__
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{cls}: {name} must be a numpy array, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{cls}: {name} must be NHWC (rank 4), got shape {x.shape}")
        if min(x.shape) < 1:
            raise ValueError(f"{cls}: {name} has an empty dimension, shape {x.shape}")
        if channels is not None and x.shape[3] != channels:
            raise ValueError(
                f"{cls}: {name} has {x.shape[3]} channels (shape {x.shape}), expected {channels}"
            )
        if x.dtype != self.dtype:
            raise TypeError(
                f"{cls}: {name} has dtype {x.dtype}, the layer is {self.dtype}; "
                f"convert with x.astype(np.{self.dtype})"
            )
        if not np.isfinite(x).all():
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise NonFiniteError(f"{cls}: {name} contains {bad} NaN/Inf value(s)")
        return np.ascontiguousarray(x)

    def check_grad(self, g: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
        """Validate an upstream gradient's shape (dtype is converted to the layer's)."""
        g = np.asarray(g)
        if g.shape != tuple(shape):
            raise ValueError(
                f"{type(self).__name__}.backward: {name} has shape {g.shape}, expected {shape}"
            )
        g = np.ascontiguousarray(g, dtype=self.dtype)
        if not np.isfinite(g).all():  # never propagate a NaN gradient silently
            bad = int(g.size - np.count_nonzero(np.isfinite(g)))
            raise NonFiniteError(
                f"{type(self).__name__}.backward: {name} has {bad} NaN/Inf value(s)"
            )
        return g

    def pop_cache(self) -> Any:
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called without a preceding forward "
                "(each forward supports exactly one backward)"
            )
        cache, self._cache = self._cache, None
        return cache

    def clear_cache(self) -> None:
        """Drop remembered activations (used by the memory-saving recompute path)."""
        self._cache = None
        for layer in self._layers.values():
            layer.clear_cache()

    def __repr__(self) -> str:
        n = sum(v.size for v in self.params.values())
        return f"{type(self).__name__}(params={n}, dtype={self.dtype})"


M = TypeVar("M", bound=Module)


class Layer(Module):
    """A flow layer (module docstring): ``forward(x) -> (y, logdet)``, ``inverse(y) -> x``,
    ``backward(dy, dlogdet) -> dx``."""

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def inverse(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class FactorOut(Module):
    """A multi-scale split (module docstring): ``x (N, H, W, C) -> (h, eps, logdet)`` with
    ``h`` and ``eps`` of ``C/2`` channels each; ``logdet`` of the map ``x -> concat(h, eps)``.

    ``backward(dh, deps, dlogdet)`` takes the upstream gradients of all three outputs and adds
    parameter gradients into ``grads``, as a layer's does."""

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def inverse(self, h: np.ndarray, eps: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dh: np.ndarray, deps: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Network(Module):
    """A conditioner network (module docstring): ``forward(x) -> h``, ``backward(dh) -> dx``;
    not invertible, no log-determinant."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dh: np.ndarray) -> np.ndarray:
        raise NotImplementedError
