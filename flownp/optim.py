r"""Adam and Adamax written by hand, over flat ``{path: array}`` dicts (Kingma & Ba 2015,
Algorithms 1 and 2).

The optimizer keeps, for every parameter path ``k``, the first moment ``m[k]`` and a second
statistic (Adam: the second moment ``v[k]``; Adamax: the exponentially weighted infinity norm
``u[k]``), same shape and dtype as the parameter, and, optionally, an exponential moving
average ``ema[k]`` of the parameter (Polyak averaging, as in openai/glow). One step ``t``
(1-based) with gradients ``g``::

    lr_t   = lr * min(1, (t - t0) / warmup_steps)             (linear warmup from step t0 =
                                                               warmup_start; warmup 0: lr)
    n      = sqrt(sum_k sum(g[k]^2))                          (global gradient norm, float64)
    g[k]  *= min(1, max_grad_norm / n)                        (clipping; None: no clipping)
    m[k]   = beta1 m[k] + (1 - beta1) g[k]
    Adam    v[k]  = beta2 v[k] + (1 - beta2) g[k]^2
            p[k] -= lr_t * (m[k] / (1 - beta1^t)) / (sqrt(v[k] / (1 - beta2^t)) + eps)
    Adamax  u[k]  = max(beta2 u[k], |g[k]|)
            p[k] -= lr_t * (m[k] / (1 - beta1^t)) / (u[k] + eps)
    d_t    = min(ema_decay, (1 + t) / (10 + t))               (EMA warm-up; None: no EMA)
    ema[k] = d_t ema[k] + (1 - d_t) p[k]

Adamax is Algorithm 2 of the paper with ``eps`` added to the denominator (as in TensorFlow and
the Glow-lineage training scripts; ``torch.optim.Adamax`` instead adds it inside the maximum,
``max(beta2 u, |g| + eps)``, which differs by ``O(eps / |g|)``). The Glow/Emerging/CInC
script's own Adamax also multiplies the step by ``sqrt(1 - beta2^t)`` (Adam's second-moment
bias correction, which the infinity norm does not need) and ties ``beta2`` and the Polyak
decay to ``1 - 1 / (steps per epoch * polyak_epochs)``; flownp keeps the paper's update and
``betas`` / ``ema_decay`` as separate settings.

Parameters are updated **in place** (the arrays are the layers' own). Gradients are not
modified (clipping scales a temporary). ``ema`` starts as a copy of the parameters at
construction, so build the optimizer *after* the data-dependent initialisation. The EMA decay
warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=t)``, so that a short run's
average is not dominated by the initial weights.

:meth:`Optimizer.step` refuses non-finite gradients (``NonFiniteError``) *before* touching any
state, so a rejected step leaves parameters, moments, EMA and ``t`` exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from flownp.errors import NonFiniteError

#: The optimizers by name (``TrainConfig.optimizer``, ``--optimizer``).
OPTIMIZERS = ("adam", "adamax")


def global_norm(grads: dict[str, np.ndarray]) -> float:
    """``sqrt(sum over arrays of sum(g^2))`` accumulated in float64 (inf/nan propagate)."""
    total = 0.0
    for g in grads.values():
        g64 = g.astype(np.float64, copy=False).reshape(-1)
        total += float(np.dot(g64, g64))
    return float(np.sqrt(total))


class Optimizer:
    """The shared machinery of :class:`Adam` and :class:`Adamax` (module docstring): linear
    warmup, global-norm clipping, optional EMA weights, non-finite rejection and the state.
    A subclass names itself (:attr:`name`) and its second statistic (:attr:`second`, an
    attribute holding one array per parameter) and writes :meth:`_update`.

    Parameters
    ----------
    params : dict[str, ndarray]
        The model's parameters (``model.params``), updated in place.
    lr : float
        Peak learning rate.
    betas : (float, float)
        ``(beta1, beta2)``.
    eps : float
        Added to the denominator (``sqrt(v_hat)`` or ``u``).
    warmup_steps : int
        Linear warmup length in steps (0 = none).
    warmup_start : int
        Optimizer step ``t0`` after which the warmup starts (0 = at the first step; a resumed
        run restarts its warmup by setting it to the step it resumes from).
    max_grad_norm : float or None
        Clip the global gradient norm to this value (None = no clipping).
    ema_decay : float or None
        Polyak/EMA decay in [0, 1) (None = no EMA weights).
    """

    name: str = ""
    second: str = ""

    def __init__(
        self,
        params: dict[str, np.ndarray],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        warmup_start: int = 0,
        max_grad_norm: float | None = None,
        ema_decay: float | None = None,
    ) -> None:
        who = type(self).__name__
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"{who}: lr must be a finite number > 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{who}: betas must be in [0, 1), got {betas!r}")
        if warmup_steps < 0:
            raise ValueError(f"{who}: warmup_steps must be >= 0, got {warmup_steps!r}")
        if warmup_start < 0:
            raise ValueError(f"{who}: warmup_start must be >= 0, got {warmup_start!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"{who}: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"{who}: ema_decay must be in [0, 1) or None, got {ema_decay!r}")
        self.params = params
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = int(warmup_start)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.t = 0
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        setattr(self, self.second, {k: np.zeros_like(p) for k, p in params.items()})
        self.ema = {k: p.copy() for k, p in params.items()} if ema_decay is not None else None

    def lr_at(self, t: int) -> float:
        """Learning rate of step ``t`` (1-based), with the linear warmup."""
        if self.warmup_steps == 0:
            return self.lr
        return self.lr * min(1.0, max(t - self.warmup_start, 0) / self.warmup_steps)

    def ema_decay_at(self, t: int) -> float:
        """EMA decay used at step ``t`` (1-based): ``min(ema_decay, (1 + t) / (10 + t))``."""
        if self.ema_decay is None:
            raise ValueError(f"{type(self).__name__}: no EMA (ema_decay is None)")
        return min(self.ema_decay, (1.0 + t) / (10.0 + t))

    def step(self, grads: dict[str, np.ndarray]) -> dict[str, float]:
        """One update. Returns ``{"lr", "grad_norm", "clip"}`` (``clip`` = the factor applied).

        Raises :class:`NonFiniteError` (state untouched) if any gradient is NaN/Inf.
        """
        who = type(self).__name__
        if grads.keys() != self.params.keys():
            missing = sorted(set(self.params) ^ set(grads))
            raise KeyError(f"{who}.step: gradient keys differ from parameter keys: {missing}")
        norm = global_norm(grads)
        if not np.isfinite(norm):
            bad = [k for k, g in grads.items() if not np.isfinite(g).all()]
            raise NonFiniteError(f"{who}.step: non-finite gradient in {bad[:5]} (norm {norm})")
        clip = 1.0
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            clip = self.max_grad_norm / norm
        self.t += 1
        t = self.t
        lr = self.lr_at(t)
        b1 = self.betas[0]
        d = self.ema_decay_at(t) if self.ema is not None else 0.0
        second = getattr(self, self.second)
        for k, p in self.params.items():
            g = grads[k] * clip if clip != 1.0 else grads[k]
            m = self.m[k]
            m *= b1
            m += (1.0 - b1) * g
            self._update(p, g, m, second[k], lr / (1.0 - b1**t), t)
            if self.ema is not None:
                e = self.ema[k]
                e *= d
                e += (1.0 - d) * p
        return {"lr": lr, "grad_norm": norm, "clip": clip}

    def _update(
        self, p: np.ndarray, g: np.ndarray, m: np.ndarray, s: np.ndarray, step: float, t: int
    ) -> None:
        """Update the second statistic ``s`` and the parameter ``p`` in place, given the
        clipped gradient ``g``, the updated first moment ``m`` and ``step = lr_t / (1 -
        beta1^t)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ EMA weights
    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Context manager: the parameters hold the EMA weights inside, their own values after.

        Without EMA (``ema_decay=None``) it does nothing.
        """
        if self.ema is None:
            yield
            return
        saved = {k: p.copy() for k, p in self.params.items()}
        try:
            for k, p in self.params.items():
                p[...] = self.ema[k]
            yield
        finally:
            for k, p in self.params.items():
                p[...] = saved[k]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, object]:
        """Everything needed to continue exactly: hyper-parameters, ``t``, moments, EMA."""
        return {
            "hparams": {
                "optimizer": self.name,
                "lr": self.lr,
                "beta1": self.betas[0],
                "beta2": self.betas[1],
                "eps": self.eps,
                "warmup_steps": self.warmup_steps,
                "warmup_start": self.warmup_start,
                "max_grad_norm": self.max_grad_norm,
                "ema_decay": self.ema_decay,
            },
            "t": self.t,
            "m": {k: a.copy() for k, a in self.m.items()},
            self.second: {k: a.copy() for k, a in getattr(self, self.second).items()},
            "ema": None if self.ema is None else {k: a.copy() for k, a in self.ema.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore ``t``, moments and EMA (copied into the existing arrays). A state of another
        optimizer (``hparams["optimizer"]``; absent: ``"adam"``, as written before Adamax
        existed) is refused: its statistics mean something else."""
        who = type(self).__name__
        hparams: dict[str, Any] = dict(state.get("hparams") or {})  # type: ignore[call-overload]
        kind = hparams.get("optimizer", "adam")
        if kind != self.name:
            raise ValueError(
                f"{who}.load_state_dict: the state is of the {kind!r} optimizer, not {self.name!r}"
            )
        self.t = int(state["t"])  # type: ignore[arg-type]
        for name in ("m", self.second, "ema"):
            dst = getattr(self, name)
            src = state.get(name)
            if dst is None:
                continue
            if src is None:
                if name == "ema":  # EMA switched on at resume: start from the parameters
                    for k, p in self.params.items():
                        dst[k][...] = p
                    continue
                raise KeyError(f"{who}.load_state_dict: missing {name!r}")
            if src.keys() != dst.keys():  # type: ignore[union-attr]
                diff = sorted(set(src) ^ set(dst))  # type: ignore[arg-type]
                raise KeyError(f"{who}.load_state_dict: {name} keys differ: {diff[:5]}")
            for k, a in dst.items():
                s = np.asarray(src[k])  # type: ignore[index]
                if s.shape != a.shape:
                    raise ValueError(
                        f"{who}.load_state_dict: {name}/{k} has shape {s.shape}, expected {a.shape}"
                    )
                a[...] = s


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) with bias correction, linear warmup, global-norm
    clipping and optional EMA weights (module docstring; parameters: :class:`Optimizer`).
    State: ``m`` and ``v``."""

    name = "adam"
    second = "v"

    def _update(
        self, p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, step: float, t: int
    ) -> None:
        b2 = self.betas[1]
        v *= b2
        v += (1.0 - b2) * np.square(g)
        p -= step * m / (np.sqrt(v / (1.0 - b2**t)) + self.eps)


class Adamax(Optimizer):
    """Adamax (Kingma & Ba 2015, Algorithm 2; the official training script's default) with
    linear warmup, global-norm clipping and optional EMA weights (module docstring; parameters:
    :class:`Optimizer`). State: ``m`` and ``u``, the exponentially weighted infinity norm."""

    name = "adamax"
    second = "u"

    def _update(
        self, p: np.ndarray, g: np.ndarray, m: np.ndarray, u: np.ndarray, step: float, t: int
    ) -> None:
        np.maximum(self.betas[1] * u, np.abs(g), out=u)
        p -= step * m / (u + self.eps)


def make_optimizer(name: str, params: dict[str, np.ndarray], **kw: Any) -> Optimizer:
    """``Adam(params, **kw)`` or ``Adamax(params, **kw)`` by ``name`` (one of
    :data:`OPTIMIZERS`)."""
    classes = {"adam": Adam, "adamax": Adamax}
    if name not in classes:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return classes[name](params, **kw)
