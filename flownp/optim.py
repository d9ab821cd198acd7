r"""Adam written by hand, over flat ``{path: array}`` dicts (Kingma & Ba 2015, Algorithm 1).

The optimizer keeps, for every parameter path ``k``, the first and second moments ``m[k]`` and
``v[k]`` (same shape and dtype as the parameter) and, optionally, an exponential moving
average ``ema[k]`` of the parameter (Polyak averaging, as in openai/glow). One step ``t``
(1-based) with gradients ``g``::

    lr_t   = lr * min(1, (t - t0) / warmup_steps)             (linear warmup from step t0 =
                                                               warmup_start; warmup 0: lr)
    n      = sqrt(sum_k sum(g[k]^2))                          (global gradient norm, float64)
    g[k]  *= min(1, max_grad_norm / n)                        (clipping; None: no clipping)
    m[k]   = beta1 m[k] + (1 - beta1) g[k]
    v[k]   = beta2 v[k] + (1 - beta2) g[k]^2
    p[k]  -= lr_t * (m[k] / (1 - beta1^t)) / (sqrt(v[k] / (1 - beta2^t)) + eps)
    d_t    = min(ema_decay, (1 + t) / (10 + t))               (EMA warm-up; None: no EMA)
    ema[k] = d_t ema[k] + (1 - d_t) p[k]

Parameters are updated **in place** (the arrays are the layers' own). Gradients are not
modified (clipping scales a temporary). ``ema`` starts as a copy of the parameters at
construction, so build the optimizer *after* the data-dependent initialisation. The EMA decay
warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=t)``, so that a short run's
average is not dominated by the initial weights.

:meth:`Adam.step` refuses non-finite gradients (``NonFiniteError``) *before* touching any
state, so a rejected step leaves parameters, moments, EMA and ``t`` exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from flownp.errors import NonFiniteError


def global_norm(grads: dict[str, np.ndarray]) -> float:
    """``sqrt(sum over arrays of sum(g^2))`` accumulated in float64 (inf/nan propagate)."""
    total = 0.0
    for g in grads.values():
        g64 = g.astype(np.float64, copy=False).reshape(-1)
        total += float(np.dot(g64, g64))
    return float(np.sqrt(total))


class Adam:
    """Adam with bias correction, linear warmup, global-norm clipping and optional EMA weights.

    Parameters
    ----------
    params : dict[str, ndarray]
        The model's parameters (``model.params``), updated in place.
    lr : float
        Peak learning rate.
    betas : (float, float)
        ``(beta1, beta2)``.
    eps : float
        Added to ``sqrt(v_hat)``.
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
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"Adam: lr must be a finite number > 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Adam: betas must be in [0, 1), got {betas!r}")
        if warmup_steps < 0:
            raise ValueError(f"Adam: warmup_steps must be >= 0, got {warmup_steps!r}")
        if warmup_start < 0:
            raise ValueError(f"Adam: warmup_start must be >= 0, got {warmup_start!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Adam: max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if ema_decay is not None and not 0 <= ema_decay < 1:
            raise ValueError(f"Adam: ema_decay must be in [0, 1) or None, got {ema_decay!r}")
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
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.ema = {k: p.copy() for k, p in params.items()} if ema_decay is not None else None

    def lr_at(self, t: int) -> float:
        """Learning rate of step ``t`` (1-based), with the linear warmup."""
        if self.warmup_steps == 0:
            return self.lr
        return self.lr * min(1.0, max(t - self.warmup_start, 0) / self.warmup_steps)

    def ema_decay_at(self, t: int) -> float:
        """EMA decay used at step ``t`` (1-based): ``min(ema_decay, (1 + t) / (10 + t))``."""
        if self.ema_decay is None:
            raise ValueError("Adam: no EMA (ema_decay is None)")
        return min(self.ema_decay, (1.0 + t) / (10.0 + t))

    def step(self, grads: dict[str, np.ndarray]) -> dict[str, float]:
        """One update. Returns ``{"lr", "grad_norm", "clip"}`` (``clip`` = the factor applied).

        Raises :class:`NonFiniteError` (state untouched) if any gradient is NaN/Inf.
        """
        if grads.keys() != self.params.keys():
            missing = sorted(set(self.params) ^ set(grads))
            raise KeyError(f"Adam.step: gradient keys differ from parameter keys: {missing}")
        norm = global_norm(grads)
        if not np.isfinite(norm):
            bad = [k for k, g in grads.items() if not np.isfinite(g).all()]
            raise NonFiniteError(f"Adam.step: non-finite gradient in {bad[:5]} (norm {norm})")
        clip = 1.0
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            clip = self.max_grad_norm / norm
        self.t += 1
        t = self.t
        lr = self.lr_at(t)
        b1, b2 = self.betas
        c1 = 1.0 - b1**t  # bias corrections
        c2 = 1.0 - b2**t
        d = self.ema_decay_at(t) if self.ema is not None else 0.0
        for k, p in self.params.items():
            g = grads[k] * clip if clip != 1.0 else grads[k]
            m, v = self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * np.square(g)
            p -= (lr / c1) * m / (np.sqrt(v / c2) + self.eps)
            if self.ema is not None:
                e = self.ema[k]
                e *= d
                e += (1.0 - d) * p
        return {"lr": lr, "grad_norm": norm, "clip": clip}

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
            "v": {k: a.copy() for k, a in self.v.items()},
            "ema": None if self.ema is None else {k: a.copy() for k, a in self.ema.items()},
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore ``t``, moments and EMA (copied into the existing arrays)."""
        self.t = int(state["t"])  # type: ignore[arg-type]
        for name in ("m", "v", "ema"):
            dst = getattr(self, name)
            src = state.get(name)
            if dst is None:
                continue
            if src is None:
                if name == "ema":  # EMA switched on at resume: start from the parameters
                    for k, p in self.params.items():
                        dst[k][...] = p
                    continue
                raise KeyError(f"Adam.load_state_dict: missing {name!r}")
            if src.keys() != dst.keys():  # type: ignore[union-attr]
                diff = sorted(set(src) ^ set(dst))  # type: ignore[arg-type]
                raise KeyError(f"Adam.load_state_dict: {name} keys differ: {diff[:5]}")
            for k, a in dst.items():
                s = np.asarray(src[k])  # type: ignore[index]
                if s.shape != a.shape:
                    raise ValueError(
                        f"Adam.load_state_dict: {name}/{k} has shape {s.shape}, expected {a.shape}"
                    )
                a[...] = s
