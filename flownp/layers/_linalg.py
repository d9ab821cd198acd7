r"""Small dense linear-algebra helpers shared by the layers with a ``C x C`` channel matrix
(:class:`~flownp.layers.conv1x1.Conv1x1`, the ``corner="lu"`` mode of
:class:`~flownp.layers.cinc.CInCConv`, and the measurements of :mod:`flownp.stability`).

One factorisation, one singularity rule (:func:`plu`). A free ``C x C`` matrix ``A`` is
factorised once, in float64, with partial pivoting, ``A = P L U``. It is treated as singular
when ``A`` is not finite or when a pivot is indistinguishable from zero::

    min_c |U[c, c]|  <=  C * eps * max_{i,j} |U[i, j]|        (eps of the working dtype)

The computed factors satisfy ``L U = P^T A + E`` with ``|E| <= gamma_C |L| |U|`` and
``|L| <= 1`` (Higham, Accuracy and Stability of Numerical Algorithms, Thm. 9.3), so a pivot
below that size may be pure round-off: ``A`` is singular to working precision. A float LU
of an exactly singular matrix rarely gives an exact zero pivot, hence the threshold. Every
inverse and every ``log|det|`` of a free channel matrix goes through :func:`plu`, so
``logdet == -inf`` exactly when ``inverse`` raises :class:`~flownp.errors.SingularKernelError`.
The measurements of :mod:`flownp.stability` call ``plu(A, check=False)``: their job is to
quantify how ill-conditioned a matrix is, so they only refuse an exact zero pivot (with which
no substitution is possible). Triangular corners (CInC ``"triangular"``/``"unit"``, Emerging)
are not factorised: their pivots are their diagonal entries, exactly, and a zero there is
Theorem 1's singular case, checked as ``d == 0``.

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


def plu(
    A: np.ndarray, *, dtype: Any = None, who: str = "plu", check: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(perm, L, U)`` with ``A = P L U``, ``P = eye(C)[:, perm]``, in float64.

    Partial pivoting (``scipy.linalg.lu``) of the float64 copy of ``A``. ``dtype`` is the
    working precision whose ``eps`` enters the singularity rule (module docstring); default
    ``A``'s dtype (float64 for a non-float array). Raises :class:`SingularKernelError` naming
    ``who`` when ``A`` is not finite or singular to working precision (``check=False``: only
    for an exact zero pivot).
    """
    A = np.asarray(A)
    dt = np.dtype(dtype) if dtype is not None else A.dtype
    eps = np.finfo(dt if dt.kind == "f" else np.float64).eps
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{who}: expected a square matrix, got shape {A.shape}")
    C = A.shape[0]
    if not np.all(np.isfinite(A)):
        raise SingularKernelError(f"{who}: the {C}x{C} matrix contains NaN/Inf")
    P, L, U = scipy.linalg.lu(A.astype(np.float64))
    u = np.abs(np.diag(U))
    tol = C * eps * np.abs(U).max() if check else 0.0
    if u.min() <= tol:
        raise SingularKernelError(
            f"{who}: the {C}x{C} matrix is singular to working precision (LU pivots "
            f"{np.diag(U).tolist()}, rule min|u_cc| <= C eps max|U|): the layer is not invertible"
        )
    return np.argmax(P, axis=0).astype(np.int64), L, U


def plu_logabsdet(A: np.ndarray, *, dtype: Any = None) -> float:
    """``log|det A|`` from :func:`plu` (float64); ``-inf`` exactly when :func:`plu` raises."""
    try:
        _, _, U = plu(A, dtype=dtype)
    except SingularKernelError:
        return -np.inf
    return float(np.sum(np.log(np.abs(np.diag(U)))))


def lu_init(M: np.ndarray) -> LUInit:
    """Factorise a nonsingular ``M = P L U`` (:func:`plu`) into LU parameters (float64).

    Raises :class:`SingularKernelError` when ``M`` is singular (``log_s`` would be ``-inf``).
    """
    perm, Lf, Uf = plu(M, who="lu_init")
    s = np.diag(Uf)
    return LUInit(
        perm=perm,
        lower=np.tril(Lf, -1),
        upper=np.triu(Uf, 1),
        log_s=np.log(np.abs(s)),
        sign=np.sign(s),
    )


def add_lu_parameters(module: Any, M: np.ndarray) -> None:
    """Register the LU parameterisation of the nonsingular ``M`` (:func:`lu_init`) on
    ``module``: parameters ``lower``, ``upper``, ``log_s``, then buffers ``sign``, ``perm``."""
    f = lu_init(M)
    module.add_param("lower", f.lower)
    module.add_param("upper", f.upper)
    module.add_param("log_s", f.log_s)
    module.add_buffer("sign", f.sign)
    module.add_buffer("perm", f.perm)


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
    """:func:`plu` of a free matrix with factors cast to ``M``'s dtype: ``(perm, L, U)``."""
    perm, L, U = plu(M, who=who)
    return perm, L.astype(M.dtype), U.astype(M.dtype)
