r"""Small dense linear-algebra helpers shared by the layers with a ``C x C`` channel matrix
(:class:`~flownp.layers.conv1x1.Conv1x1`, the ``corner="lu"`` mode of
:class:`~flownp.layers.cinc.CInCConv`).

LU parameterisation (Glow, Kingma & Dhariwal 2018, Section 3.2, Eq. 10-11)::

    M = P L U,   P = eye(C)[:, perm]   (fixed: P[perm[j], j] = 1)
                 L = tril(lower, -1) + I        (unit lower triangular)
                 U = triu(upper, 1) + diag(d),  d = sign * exp(log_s)   (sign fixed)
    log|det M| = sum_c log_s[c]

Gradient of a scalar loss through ``M = P L U`` given ``dM = dLoss/dM``::

    dL = P^T dM U^T        -> d lower = tril(dL, -1)
    dU = L^T P^T dM        -> d upper = triu(dU, 1),  d log_s = diag(dU) * d
                              (+ dLoss/d log|det M| from the log-det term, added by the caller)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from flownp.errors import SingularKernelError


def random_rotation(C: int, rng: np.random.Generator) -> np.ndarray:
    """Glow's initialisation: the Q factor of a ``C x C`` standard normal matrix (float64).

    Orthogonal, so ``log|det| = 0`` at initialisation.
    """
    return np.linalg.qr(rng.normal(size=(C, C)))[0]


def permutation_matrix(perm: np.ndarray, dtype: Any = np.float64) -> np.ndarray:
    """``P = eye(C)[:, perm]``, i.e. ``P[perm[j], j] = 1`` and ``(P^T X)[j] = X[perm[j]]``."""
    perm = np.asarray(perm)
    return np.eye(perm.size, dtype=dtype)[:, perm]


@dataclass(frozen=True)
class LUInit:
    """An LU parameterisation of a given matrix ``M = P L U`` (see the module docstring)."""

    perm: np.ndarray  # (C,) int64
    lower: np.ndarray  # (C, C), strictly lower part used
    upper: np.ndarray  # (C, C), strictly upper part used
    log_s: np.ndarray  # (C,)
    sign: np.ndarray  # (C,) in {-1, +1}


def lu_init(M: np.ndarray) -> LUInit:
    """Factorise a nonsingular ``M = P L U`` (``scipy.linalg.lu``) into LU parameters.

    Raises :class:`SingularKernelError` when a pivot of ``U`` is exactly zero (``log_s``
    would be ``-inf``).
    """
    P, Lf, Uf = scipy.linalg.lu(np.asarray(M, dtype=np.float64))
    s = np.diag(Uf)
    if np.any(s == 0):
        raise SingularKernelError(f"lu_init: the matrix is singular (LU pivots {s.tolist()})")
    return LUInit(
        perm=np.argmax(P, axis=0).astype(np.int64),
        lower=np.tril(Lf, -1),
        upper=np.triu(Uf, 1),
        log_s=np.log(np.abs(s)),
        sign=np.sign(s),
    )


def lu_factors(
    lower: np.ndarray, upper: np.ndarray, log_s: np.ndarray, sign: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(L, U, d)``: the unit lower factor, the upper factor and its diagonal ``d``."""
    C = log_s.shape[0]
    d = sign.astype(log_s.dtype) * np.exp(log_s)  # (C,)
    L = np.tril(lower, -1) + np.eye(C, dtype=lower.dtype)  # (C, C)
    U = np.triu(upper, 1) + np.diag(d)  # (C, C)
    return L, U, d


def lu_backward(
    dM: np.ndarray, perm: np.ndarray, L: np.ndarray, U: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(d lower, d upper, d log_s)`` of a loss through ``M = P L U``.

    ``dM`` is ``dLoss/dM``. The log-determinant term ``dLoss/d log|det M|`` is *not* included:
    the caller adds it to every entry of ``d log_s`` (``log|det M| = sum log_s``).
    """
    PtdM = dM[np.asarray(perm)]  # P^T dM, (C, C)
    dL = PtdM @ U.T
    dU = L.T @ PtdM
    return np.tril(dL, -1), np.triu(dU, 1), np.diag(dU) * d


def lu_solve_right(y: np.ndarray, perm: np.ndarray, L: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Solve ``x @ (P L U) = y`` for ``x`` (rows of ``y`` are independent right-hand sides).

    ``y`` is ``(R, C)``. With ``t = x P``: ``t L U = y``, i.e. ``U^T (L^T t^T) = y^T``, two
    triangular solves, then ``x = t P^T`` (``x[:, perm[j]] = t[:, j]``).
    """
    s = scipy.linalg.solve_triangular(U, y.T, trans="T", lower=False)  # L^T t^T, (C, R)
    tT = scipy.linalg.solve_triangular(L, s, trans="T", lower=True, unit_diagonal=True)
    x = np.empty_like(y)
    x[:, np.asarray(perm)] = tT.T  # x = t P^T
    return x


def lu_with_check(M: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partial-pivoting ``M = P L U`` of a free matrix, as ``(perm, L, U)`` in ``M``'s dtype.

    Raises :class:`SingularKernelError` naming ``who`` when ``M`` is singular or numerically
    singular: a zero pivot, or ``min|u_cc| <= C * eps * max|u_cc|`` (eps of ``M``'s dtype).
    """
    C = M.shape[0]
    P, Lf, Uf = scipy.linalg.lu(np.asarray(M, dtype=np.float64))
    u = np.abs(np.diag(Uf))
    eps = np.finfo(M.dtype).eps
    if not np.all(np.isfinite(M)) or np.any(u == 0) or u.min() <= C * eps * u.max():
        raise SingularKernelError(
            f"{who}: the {C}x{C} weight matrix is singular (LU pivots "
            f"{np.diag(Uf).tolist()}): the layer is not invertible"
        )
    return np.argmax(P, axis=0), Lf.astype(M.dtype), Uf.astype(M.dtype)
