r"""The stability guard: a reparameterisation of a padded convolution's taps that keeps its
substitution inside a diagonal-dominance region for *any* parameter values.

Used by :class:`~flownp.layers.cinc.CInCConv` (corners ``"triangular"``, ``"unit"``, ``"lu"``)
and by both masked convolutions of :class:`~flownp.layers.emerging.EmergingConv`. Proofs and
measurements: ``docs/stability.md`` (section "Guard"); the measurements live in
:mod:`flownp.stability`, which imports this module (never the reverse).

Notation (kernel ``K (k, k, C_in, C_out)``, corner tap ``(k-1, k-1)``, ``A[o, c] =
K[k-1, k-1, c, o]``)::

    d_o    corner diagonal (triangular / unit corners)
    s_o    = sum_{a,b,c} |W[a, b, c, o]|        raw absolute tap sum of output channel o
                                               (every tap the guard rescales)
    t_o    budget: rho |d_o| (triangular/unit), rho / ||A^{-1}||_inf (lu)
    u_o    = s_o / t_o
    h(u)   "tanh": tanh(u) / u      -> guarded sum t_o tanh(u_o) <  t_o
           "clip": 1 / max(1, u)    -> guarded sum min(s_o, t_o) <= t_o
    taps   W[..., o] * h(u_o)

Triangular / unit corner (:func:`guard_kernel`): every tap of output channel ``o`` other
than the diagonal ``d_o`` is rescaled with budget ``rho |d_o|``: the dominance ratio of
``M`` is ``< rho``, hence ``||M^{-1}||_inf <= 1 / ((1 - rho) min_o |d_o|)`` (Varah) on every
image size. LU corner (:func:`guard_taps` with budget ``rho / n``, ``n = ||A^{-1}||_inf``
from :func:`corner_inverse_norm`): the off-corner taps are rescaled, the corner ``A`` is
kept, the block ratio ``q <= rho`` and ``||M^{-1}||_inf <= n / (1 - rho)``.

Backward (exact; ``S_o = sum(dtaps[..., o] * W[..., o])``)::

    dW[..., o] = dtaps[..., o] h(u_o) + S_o h'(u_o) / t_o * sign(W[..., o])
    dt_o       = -S_o h'(u_o) u_o / t_o
    triangular: d d_o = dK[corner, o, o] + rho sign(d_o) dt_o
    lu:         dA   += (-rho / n^2) (sum_o dt_o) dn/dA,   dn/dA = -B^T e_r sign(B[r]) B^T
                (B = A^{-1}, r the row of B with the largest absolute sum)
"""

from __future__ import annotations

import numpy as np

from flownp.errors import SingularKernelError

GUARD_MODES = ("tanh", "clip")


def check_guard(guard: float | None, mode: str, who: str) -> float | None:
    """Validate a layer's ``guard`` (``rho`` in (0, 1) or None) and ``guard_mode``; return
    ``float(rho)`` or None. Raises ``ValueError`` naming ``who``."""
    if mode not in GUARD_MODES:
        raise ValueError(f"{who}: guard_mode must be one of {GUARD_MODES}, got {mode!r}")
    if guard is None:
        return None
    if isinstance(guard, bool) or not 0.0 < float(guard) < 1.0:
        raise ValueError(f"{who}: guard (rho) must be in (0, 1), got {guard!r}")
    return float(guard)


def guard_h(u: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``h(u)`` and ``h'(u)`` of the guard (module docstring), elementwise, ``u >= 0``."""
    if mode == "tanh":
        small = u < 1e-2
        us = np.where(small, 1.0, u)  # avoid 0/0 in the unused branch
        th = np.tanh(us)
        h = np.where(small, 1 - u**2 / 3 + 2 * u**4 / 15, th / us)
        # h' = (u sech^2 u - tanh u) / u^2; series -2u/3 + 8u^3/15 - 34u^5/105 near 0
        dh = np.where(
            small,
            -2 * u / 3 + 8 * u**3 / 15 - 34 * u**5 / 105,
            (us * (1 - th**2) - th) / us**2,
        )
        return h, dh
    if mode == "clip":
        over = u > 1.0
        us = np.where(over, u, 1.0)
        return np.where(over, 1.0 / us, 1.0), np.where(over, -1.0 / us**2, 0.0)
    raise ValueError(f"guard: mode must be one of {GUARD_MODES}, got {mode!r}")


def guard_taps(weight: np.ndarray, budget: np.ndarray, mode: str = "tanh") -> np.ndarray:
    """Scale output channel ``o`` of ``weight (k, k, C_in, C)`` so its absolute sum is below
    ``budget[o] > 0``: ``taps[..., o] = weight[..., o] * h(s_o / budget_o)``,
    ``s_o = sum |weight[..., o]|``."""
    budget = np.asarray(budget)
    if np.any(~(budget > 0)):
        raise SingularKernelError(
            f"guard: every budget rho*|d_o| must be > 0, got {budget.tolist()} "
            "(a zero corner diagonal is not invertible, Theorem 1)"
        )
    s = np.abs(weight).sum(axis=(0, 1, 2))  # (C,)
    h, _ = guard_h(s / budget, mode)
    return weight * h.astype(weight.dtype)


def guard_taps_backward(
    dtaps: np.ndarray, weight: np.ndarray, budget: np.ndarray, mode: str = "tanh"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact backward of :func:`guard_taps`: ``(dweight, dbudget)`` from ``dtaps``.

    With ``u_o = s_o / t_o`` and ``S_o = sum(dtaps[..., o] * weight[..., o])``::

        dweight[..., o] = dtaps[..., o] h(u_o) + S_o h'(u_o) / t_o * sign(weight[..., o])
        dbudget[o]      = -S_o h'(u_o) u_o / t_o
    """
    t = np.asarray(budget, dtype=weight.dtype)
    s = np.abs(weight).sum(axis=(0, 1, 2))  # (C,)
    u = s / t
    h, dh = guard_h(u, mode)
    S = (dtaps * weight).sum(axis=(0, 1, 2))  # (C,)
    dweight = dtaps * h + (S * dh / t) * np.sign(weight)
    dbudget = -S * dh * u / t
    return dweight.astype(weight.dtype), dbudget.astype(weight.dtype)


def guard_kernel(
    weight_masked: np.ndarray, diag: np.ndarray, rho: float, mode: str = "tanh"
) -> np.ndarray:
    """Guarded effective kernel of a masked-corner CInC layer (``"triangular"``/``"unit"``).

    Parameters
    ----------
    weight_masked : (k, k, C, C) raw taps after the layer's mask (corner: ``c < o`` only; the
        corner diagonal must be zero: the diagonal is ``diag``).
    diag : (C,) corner diagonal ``d`` (nonzero).
    rho : target dominance ratio, ``0 < rho < 1``.
    mode : ``"tanh"`` (smooth, default) or ``"clip"``.

    Returns
    -------
    K_eff : (k, k, C, C) with ``K_eff[k-1, k-1, o, o] = d_o`` and every other tap of output
        channel ``o`` scaled by ``h(s_o / (rho |d_o|))``, so that its off-diagonal row sum is
        ``< rho |d_o|`` (``"clip"``: ``<=``) whatever the raw values: ``||M^{-1}||_inf <=
        1 / ((1 - rho) min|d|)`` for every image size.
    """
    k = _check_guard_args(weight_masked, diag, rho)
    K = guard_taps(weight_masked, rho * np.abs(diag), mode)
    idx = np.arange(K.shape[3])
    K[k - 1, k - 1, idx, idx] = diag
    return K


def guard_kernel_backward(
    dK_eff: np.ndarray,
    weight_masked: np.ndarray,
    diag: np.ndarray,
    rho: float,
    mode: str = "tanh",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact backward of :func:`guard_kernel`: ``(dweight, ddiag)`` from ``dK_eff``.

    ``ddiag[o] = dK_eff[k-1,k-1,o,o] + rho sign(d_o) dbudget[o]`` (the diagonal enters both
    directly and through the budget). ``dweight`` is zero on the corner diagonal; the caller
    multiplies it by its mask, as for the unguarded kernel.
    """
    k = _check_guard_args(weight_masked, diag, rho)
    dK = np.array(dK_eff, dtype=weight_masked.dtype)
    idx = np.arange(dK.shape[3])
    direct = dK[k - 1, k - 1, idx, idx].copy()
    dK[k - 1, k - 1, idx, idx] = 0.0
    dweight, dbudget = guard_taps_backward(dK, weight_masked, rho * np.abs(diag), mode)
    dweight[k - 1, k - 1, idx, idx] = 0.0
    ddiag = direct + rho * np.sign(diag) * dbudget
    return dweight, ddiag.astype(weight_masked.dtype)


def _check_guard_args(weight_masked: np.ndarray, diag: np.ndarray, rho: float) -> int:
    w = np.asarray(weight_masked)
    if w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[2] != w.shape[3]:
        raise ValueError(f"guard_kernel: weight_masked must be (k, k, C, C), got {w.shape}")
    k, C = w.shape[0], w.shape[3]
    if np.shape(diag) != (C,):
        raise ValueError(f"guard_kernel: diag must have shape ({C},), got {np.shape(diag)}")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"guard_kernel: rho must be in (0, 1), got {rho!r}")
    if np.any(np.diagonal(w[k - 1, k - 1]) != 0):
        raise ValueError(
            "guard_kernel: weight_masked has a nonzero corner diagonal "
            "(apply the layer's mask first; the diagonal is passed as diag)"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("guard_kernel: weight_masked contains NaN/Inf")
    return k


def corner_inverse_norm(A: np.ndarray) -> tuple[float, np.ndarray]:
    """``n = ||A^{-1}||_inf`` and ``dn/dA`` (for the block-dominance guard of the ``"lu"``
    corner: budget ``rho / n`` for the off-corner taps of every output channel).

    With ``B = A^{-1}`` and ``r*`` the row of largest absolute sum,
    ``dn/dB = e_{r*} sign(B[r*])`` and ``dn/dA = -B^T (dn/dB) B^T``.
    """
    B = np.linalg.inv(np.asarray(A, dtype=np.float64))
    rows = np.abs(B).sum(axis=1)
    r = int(np.argmax(rows))
    G = np.zeros_like(B)
    G[r] = np.sign(B[r])
    return float(rows[r]), -B.T @ G @ B.T
