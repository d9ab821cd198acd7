r"""Glow's invertible 1x1 convolution (Kingma & Dhariwal 2018, Section 3.2, Eq. 9-11).

A 1x1 convolution mixes the C channels of every pixel with the same ``C x C`` matrix. The
weight is stored in the kernel layout ``(C_in, C_out)`` (the ``(1, 1, C, C)`` kernel of
Definition 1 without its unit spatial axes), exactly as openai/glow stores ``W``::

    forward   y[n,i,j,:] = x[n,i,j,:] @ W               (y[.., o] = sum_c x[.., c] W[c, o])
    matrix    y_vec = (I_{HW} kron W^T) x_vec            (block diagonal, block W^T)
    logdet    H W log|det W|                             (Glow Eq. 9; float64 slogdet)
    inverse   x[n,i,j,:] = y[n,i,j,:] @ W^{-1}           (an LU solve, no explicit inverse)
    backward  dx = dy @ W^T
              dW = sum_{n,i,j} x[n,i,j,:]^T dy[n,i,j,:]  +  H W sum_n dlogdet[n] * W^{-T}

LU parameterisation (``lu=True``, Glow Eq. 10-11), same orientation (kernel layout)::

    W = P L U,  P = eye(C)[:, perm] fixed,  L = tril(lower, -1) + I,
                U = triu(upper, 1) + diag(sign * exp(log_s)),  sign fixed
    logdet = H W sum_c log_s[c]
    backward: dW as above without the log-det term, then through ``W = P L U``
              (:func:`flownp.layers._linalg.lu_backward`), d log_s += H W sum_n dlogdet[n]

Initialisation (both modes): a random rotation ``Q`` (``qr`` of a standard normal matrix,
:func:`flownp.layers._linalg.random_rotation`), so ``log|det W| = 0``. With ``lu=True`` the
same ``Q`` is factorised once, ``Q = P L U`` (``scipy.linalg.lu``); for a given ``seed`` both
modes start from the same matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.errors import SingularKernelError
from flownp.layers import _linalg
from flownp.layers.base import Layer


class Conv1x1(Layer):
    """Invertible 1x1 convolution, NHWC, C -> C channels (Glow).

    Parameters
    ----------
    channels : int
        Number of channels C (input = output).
    lu : bool
        ``False``: a free weight ``weight (C, C)``. ``True``: ``W = P L U`` with parameters
        ``lower (C, C)``, ``upper (C, C)``, ``log_s (C,)`` and buffers ``perm (C,)`` (int64),
        ``sign (C,)``.
    seed : int
        Seed of the random-rotation initialisation.
    dtype : float32 or float64
    """

    def __init__(
        self, channels: int, lu: bool = False, *, seed: int = 0, dtype: Any = np.float64
    ) -> None:
        super().__init__(dtype)
        if not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"Conv1x1: channels must be a positive int, got {channels!r}")
        if not isinstance(lu, (bool, np.bool_)):
            raise TypeError(f"Conv1x1: lu must be a bool, got {lu!r}")
        self.channels = C = int(channels)
        self.lu = bool(lu)
        q = _linalg.random_rotation(C, np.random.default_rng(seed))  # (C, C), float64
        if not self.lu:
            self.add_param("weight", q)
            return
        f = _linalg.lu_init(q)
        self.add_param("lower", f.lower)
        self.add_param("upper", f.upper)
        self.add_param("log_s", f.log_s)
        self.add_buffer("perm", f.perm)
        self.add_buffer("sign", f.sign)

    # ------------------------------------------------------------------ the matrix
    def _lu_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(L, U, d)`` of the LU mode (module docstring)."""
        p = self._params
        return _linalg.lu_factors(p["lower"], p["upper"], p["log_s"], self._buffers["sign"])

    @property
    def weight_matrix(self) -> np.ndarray:
        """The effective ``(C_in, C_out)`` matrix ``W`` with ``y = x @ W`` (a new array)."""
        if not self.lu:
            return self._params["weight"].copy()
        L, U, _ = self._lu_factors()
        return _linalg.permutation_matrix(self._buffers["perm"], self.dtype) @ L @ U

    def logdet_per_pixel(self) -> float:
        """``log|det W|`` in float64. Plain weight: from the same PLU factorisation and
        singularity rule as :meth:`inverse` (:func:`_linalg.plu_logabsdet`), so it is ``-inf``
        exactly when ``inverse`` raises :class:`SingularKernelError`."""
        if self.lu:
            return float(np.sum(self._params["log_s"], dtype=np.float64))
        return _linalg.plu_logabsdet(self._params["weight"])

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        N, H, W_, C = x.shape
        Wm = self.weight_matrix  # (C, C)
        y = (x.reshape(-1, C) @ Wm).reshape(x.shape)  # (N, H, W, C)
        logdet = np.full(N, H * W_ * self.logdet_per_pixel(), dtype=self.dtype)
        self._cache = (x, Wm)
        return y, logdet

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Solve ``y = x @ W`` per pixel. Raises :class:`SingularKernelError` for a singular
        plain weight."""
        y = self.check_input(y, self.channels, name="y")
        C = self.channels
        if self.lu:
            L, U, _ = self._lu_factors()
            perm = self._buffers["perm"]
        else:
            perm, L, U = _linalg.lu_with_check(self._params["weight"], "Conv1x1.inverse")
        # W^{-1} once (C x C, float64, from the factors), then one BLAS product for all
        # pixels: the same work as the forward (two triangular solves with N*H*W right-hand
        # sides cost ~6x more); differs from substitution by O(cond(W) eps)
        f64 = np.float64
        Winv = _linalg.lu_solve_right(np.eye(C), perm, L.astype(f64), U.astype(f64))  # (C, C)
        x = y.reshape(-1, C) @ Winv.astype(y.dtype)  # (N*H*W, C)
        return x.reshape(y.shape)

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        x, Wm = self.pop_cache()
        N, H, W_, C = x.shape
        dy = self.check_grad(dy, x.shape, "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dy2 = dy.reshape(-1, C)  # (N*H*W, C)
        dx = (dy2 @ Wm.T).reshape(x.shape)
        dW = x.reshape(-1, C).T @ dy2  # (C_in, C_out)
        g_ld = H * W_ * float(np.sum(dlogdet, dtype=np.float64))  # dL / d log|det W|
        g = self._grads
        if not self.lu:
            g["weight"] += dW
            if g_ld != 0.0:  # d log|det W| / dW = W^{-T}
                try:
                    Winv = np.linalg.inv(Wm.astype(np.float64))
                except np.linalg.LinAlgError as e:
                    raise SingularKernelError(
                        "Conv1x1.backward: the weight matrix is singular, "
                        "d log|det W| / dW = W^{-T} does not exist"
                    ) from e
                g["weight"] += (g_ld * Winv.T).astype(self.dtype)
            return dx
        L, U, d = self._lu_factors()
        dlower, dupper, dlog_s = _linalg.lu_backward(dW, self._buffers["perm"], L, U, d)
        g["lower"] += dlower
        g["upper"] += dupper
        g["log_s"] += dlog_s + g_ld
        return dx
