r"""The CInC invertible padded k x k convolution (paper Section 3.1, Lemma 1, Theorem 1).

Math (conventions in ``docs/conventions.md``; derivations in ``docs/layers/cinc.md``)::

    forward   y[n,i,j,o] = sum_{a,b<k} sum_c x[n, i-(k-1)+a, j-(k-1)+b, c] K[a,b,c,o]
              (zero padding of k-1 rows on top and k-1 columns on the left)
    matrix    y_vec = M x_vec,  M block lower triangular in raster order, diagonal blocks
              A[o,c] = K[k-1,k-1,c,o]                                          (Lemma 1)
    logdet    log|det M| = H W log|det A| = H W sum_c log|d_c|   (triangular A, d = diag A)
    inverse   raster or anti-diagonal substitution, a C x C triangular solve per pixel
    backward  dx = M^T dy (the transposed, bottom-right padded convolution)
              dK[a,b] = sum_{n,i,j} x[n,i-da,j-db]^T dy[n,i,j]    (da, db = k-1-a, k-1-b)
              d logdet / d log|d_c| = H W

Corner parameterisations (``corner=``):

``"triangular"`` (default)
    ``A`` lower triangular (output channel ``o`` reads input channels ``c <= o`` of the current
    pixel: ``K[k-1,k-1,c,o] = 0`` for ``c > o``), diagonal ``d = sign * exp(log_diag)`` with a
    fixed ``sign`` buffer: ``d`` can never reach zero, so every step of training is invertible
    by construction. Parameters ``weight (k,k,C,C)``, ``log_diag (C,)``; buffer ``sign (C,)``.
``"unit"``
    The paper's Figure 1(c) variant: unit diagonal, ``logdet = 0``. Parameter ``weight``.
``"lu"``
    A full corner block ``A = P L U`` (P fixed permutation, L unit lower, U upper with
    ``sign * exp(log_s)`` diagonal): a Glow LU 1x1 convolution fused into the same layer. The
    Jacobian is block lower triangular, invertible because ``det A != 0`` (general-C theorem).
    Parameters ``weight, lower (C,C), upper (C,C), log_s (C,)``; buffers ``perm, sign``.
``"fixed"`` (only via :meth:`CInCConv.from_kernel`)
    The effective kernel is a free parameter ``kernel``; nothing guarantees invertibility.
    For verification.

In every parameterised mode, the corner entries of ``weight`` that the mask removes are
ignored (their gradient is zero); :attr:`CInCConv.kernel` is the effective kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

# Module import (attributes looked up at call time): flownp.stability imports flownp.layers,
# so ``from flownp.stability import ...`` here would be circular when stability loads first.
from flownp import stability as _stability
from flownp.errors import NonFiniteError, SingularKernelError
from flownp.kernels import conv as K_
from flownp.layers.base import Layer

CORNERS = ("triangular", "unit", "lu")
SOLVERS = ("auto", "wavefront", "raster", "reference")


def corner_mask(k: int, C: int, *, full_corner: bool) -> np.ndarray:
    """Mask of the free entries of a ``(k, k, C, C)`` weight.

    ``full_corner=False``: the corner keeps only ``c < o`` (strictly lower ``A``), the diagonal
    is parameterised separately. ``full_corner=True``: the whole corner is removed (``lu``).
    """
    mask = np.ones((k, k, C, C))
    if full_corner:
        mask[k - 1, k - 1] = 0.0
    else:
        mask[k - 1, k - 1] = np.triu(np.ones((C, C)), 1)  # [c, o] kept for c < o
    return mask


class CInCConv(Layer):
    """Invertible top-left padded k x k convolution (CInC), NHWC, C -> C channels.

    Parameters
    ----------
    channels : int
        Number of channels C (input = output).
    kernel_size : int
        k >= 1; k = 1 is a triangular 1x1 convolution.
    corner : {"triangular", "unit", "lu"}
        Parameterisation of the corner channel matrix (module docstring).
    seed : int
        Seed of the initialisation.
    dtype : float32 or float64
    init_std : float
        Standard deviation of the random initial taps (off-corner and corner off-diagonal).
    solver : {"auto", "wavefront", "raster", "reference"}
        Default inverse algorithm (see :mod:`flownp.kernels.conv`); ``"auto"`` picks the
        raster or wavefront schedule by batch size (bitwise the same result).
    guard : float or None
        Stability guard ``rho`` in (0, 1). ``"triangular"``/``"unit"``: the off-diagonal
        taps of every output channel ``o`` are rescaled so that their absolute sum stays below
        ``rho |d_o|`` for *any* parameter values, which bounds
        ``||M^{-1}||_inf <= 1 / ((1 - rho) min|d|)`` on every image size
        (:func:`flownp.stability.guard_kernel`). ``"lu"``: block dominance, the off-corner
        taps of every output channel sum to less than ``rho / ||A^{-1}||_inf``, so
        ``||M^{-1}||_inf <= ||A^{-1}||_inf / (1 - rho)`` (``docs/stability.md``).
        ``None``: no guard.
    guard_mode : {"tanh", "clip"}
        Smooth (default) or hard rescaling.

    Attributes
    ----------
    solve_dtype : numpy dtype or None
        Precision of the substitution in :meth:`inverse` (None: the layer's dtype). Set it
        with :func:`flownp.stability.solve_precision`; the solve then inverts the layer's own
        kernel (as used by ``forward``) in that precision and casts the result back.
    """

    solve_dtype: Any = None

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        corner: str = "triangular",
        seed: int = 0,
        dtype: Any = np.float64,
        init_std: float = 0.01,
        solver: str = "auto",
        guard: float | None = None,
        guard_mode: str = "tanh",
    ) -> None:
        super().__init__(dtype)
        if guard is not None:
            if corner not in ("triangular", "unit", "lu"):
                raise ValueError(
                    f"CInCConv: guard is available for the triangular, unit and lu corners, "
                    f"not corner={corner!r}"
                )
            if not 0.0 < float(guard) < 1.0:
                raise ValueError(f"CInCConv: guard (rho) must be in (0, 1), got {guard!r}")
        if guard_mode not in _stability.GUARD_MODES:
            raise ValueError(
                f"CInCConv: guard_mode must be one of {_stability.GUARD_MODES}, got {guard_mode!r}"
            )
        self.guard = None if guard is None else float(guard)
        self.guard_mode = guard_mode
        if not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"CInCConv: channels must be a positive int, got {channels!r}")
        if not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1:
            raise ValueError(f"CInCConv: kernel_size must be an int >= 1, got {kernel_size!r}")
        if corner not in CORNERS + ("fixed",):
            raise ValueError(f"CInCConv: corner must be one of {CORNERS}, got {corner!r}")
        if solver not in SOLVERS:
            raise ValueError(f"CInCConv: solver must be one of {SOLVERS}, got {solver!r}")
        self.channels = C = int(channels)
        self.kernel_size = k = int(kernel_size)
        self.corner = corner
        self.solver = solver
        self.masked = corner != "lu"  # triangular corner (True) or full block (False)
        rng = np.random.default_rng(seed)
        if corner == "fixed":
            return  # from_kernel fills in the parameters
        self._mask = corner_mask(k, C, full_corner=corner == "lu").astype(self.dtype)
        self.add_param("weight", rng.normal(0.0, init_std, (k, k, C, C)) * self._mask)
        if corner == "triangular":
            self.add_param("log_diag", np.zeros(C))
            self.add_buffer("sign", np.ones(C))
        elif corner == "lu":
            # Glow: a random rotation, factorised once; P stays fixed.
            q = np.linalg.qr(rng.normal(size=(C, C)))[0]
            P, Lf, Uf = scipy.linalg.lu(q)
            s = np.diag(Uf)
            self.add_param("lower", np.tril(Lf, -1))
            self.add_param("upper", np.triu(Uf, 1))
            self.add_param("log_s", np.log(np.abs(s)))
            self.add_buffer("sign", np.sign(s))
            self.add_buffer("perm", np.argmax(P, axis=0).astype(np.int64))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kernel(
        cls, kernel: np.ndarray, masked: bool = True, *, allow_singular: bool = False, **kw: Any
    ) -> CInCConv:
        """A layer whose effective kernel is exactly ``kernel`` (k, k, C, C).

        ``masked=True``: the corner must be triangular (``kernel[k-1,k-1,c,o] == 0`` for
        ``c > o``), else ``ValueError``. ``masked=False``: the corner block is full. The kernel
        is stored as the parameter ``kernel``; ``inverse`` raises :class:`SingularKernelError`
        when the corner is singular. The dtype is the kernel's unless ``dtype=`` is given.
        A masked corner with a zero diagonal entry (not invertible, Theorem 1) raises
        :class:`SingularKernelError` unless ``allow_singular`` (to study such a layer).
        """
        kernel = np.asarray(kernel)
        sh = kernel.shape
        if kernel.ndim != 4 or sh[0] != sh[1] or sh[2] != sh[3]:
            raise ValueError(f"CInCConv.from_kernel: kernel must be (k, k, C, C), got {sh}")
        k, C = kernel.shape[0], kernel.shape[2]
        kw.setdefault("dtype", kernel.dtype if kernel.dtype.kind == "f" else np.float64)
        layer = cls(C, k, corner="fixed", **kw)
        corner = kernel[k - 1, k - 1]
        if masked and np.any(np.tril(corner, -1) != 0):
            c, o = np.argwhere(np.tril(corner, -1) != 0)[0]
            raise ValueError(
                f"CInCConv.from_kernel: masked=True but kernel[{k - 1},{k - 1},{c},{o}] = "
                f"{corner[c, o]!r} is nonzero (input channel {c} > output channel {o})"
            )
        if not np.all(np.isfinite(kernel)):
            raise ValueError("CInCConv.from_kernel: kernel contains NaN/Inf")
        if masked and not allow_singular and np.any(np.diag(corner) == 0):
            raise SingularKernelError(
                f"CInCConv.from_kernel: the corner diagonal kernel[{k - 1},{k - 1},c,c] is zero "
                f"for channel(s) {np.flatnonzero(np.diag(corner) == 0).tolist()}: the "
                "convolution is not invertible (Theorem 1); pass allow_singular=True to build it"
            )
        layer.masked = bool(masked)
        layer._mask = np.ones(kernel.shape, dtype=layer.dtype)
        if masked:
            layer._mask[k - 1, k - 1] = np.triu(np.ones((C, C)))
        layer.add_param("kernel", kernel)
        return layer

    # ------------------------------------------------------------------ the effective kernel
    def corner_matrix(self) -> np.ndarray:
        """The diagonal block ``A`` of the Jacobian: ``A[o, c] = K[k-1, k-1, c, o]``."""
        p, C = self._params, self.channels
        if self.corner == "fixed":
            return p["kernel"][-1, -1].T.copy()
        if self.corner == "lu":
            P = np.eye(C, dtype=self.dtype)[:, self._buffers["perm"]]
            return P @ self._lu_lower() @ self._lu_upper()
        if self.guard is not None:
            return self.kernel[-1, -1].T  # the guard rescales the corner's strict lower part
        A = p["weight"][-1, -1].T * self._mask[-1, -1].T  # strictly lower
        return A + np.diag(self.diagonal())

    def diagonal(self) -> np.ndarray:
        """The corner diagonal ``d`` (masked modes) or ``diag(U)`` (lu)."""
        p = self._params
        if self.corner == "triangular":
            return self._buffers["sign"] * np.exp(p["log_diag"])
        if self.corner == "unit":
            return np.ones(self.channels, dtype=self.dtype)
        if self.corner == "lu":
            return self._buffers["sign"] * np.exp(p["log_s"])
        return np.diag(p["kernel"][-1, -1]).copy()

    def _lu_lower(self) -> np.ndarray:
        return np.tril(self._params["lower"], -1) + np.eye(self.channels, dtype=self.dtype)

    def _lu_upper(self) -> np.ndarray:
        return np.triu(self._params["upper"], 1) + np.diag(self.diagonal())

    @property
    def kernel(self) -> np.ndarray:
        """The effective ``(k, k, C, C)`` kernel used by :meth:`forward` (a new array)."""
        if self.corner == "fixed":
            return self._params["kernel"] * self._mask
        K = self._params["weight"] * self._mask
        if self.guard is not None and self.corner == "lu":  # block dominance, q <= rho
            A = self.corner_matrix()
            n, _ = _stability.corner_inverse_norm(A)
            budget = np.full(self.channels, self.guard / n)
            K = _stability.guard_taps(K, budget, self.guard_mode)
            K[-1, -1] = A.T
            return K
        if self.guard is not None:
            return _stability.guard_kernel(K, self.diagonal(), self.guard, self.guard_mode)
        K[-1, -1] = self.corner_matrix().T
        return K

    def logdet_per_pixel(self) -> float:
        """``log|det A|``, so that ``logdet = H * W * logdet_per_pixel()``."""
        if self.corner == "fixed" and not self.masked:  # same LU as the inverse: consistent
            _, _, Uf, singular = self._full_corner_lu()
            return -np.inf if singular else float(np.sum(np.log(np.abs(np.diag(Uf)))))
        if self.corner == "triangular":
            return float(np.sum(self._params["log_diag"], dtype=np.float64))
        if self.corner == "lu":
            return float(np.sum(self._params["log_s"], dtype=np.float64))
        with np.errstate(divide="ignore"):
            return float(np.sum(np.log(np.abs(self.diagonal().astype(np.float64)))))

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        N, H, W, _ = x.shape
        K = self.kernel
        y = K_.conv_forward(x, K)
        logdet = np.full(N, H * W * self.logdet_per_pixel(), dtype=self.dtype)
        self._cache = (x, K)
        return y, logdet

    def _corner_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(L, U, perm)`` with ``A = P L U``; raises SingularKernelError for a singular A."""
        C = self.channels
        A = self.corner_matrix()
        if self.corner == "lu":
            U = self._lu_upper()
            if np.any(np.diag(U) == 0):  # exp(log_s) underflowed to 0
                raise SingularKernelError(
                    "CInCConv.inverse: the LU corner has a zero on the diagonal of U "
                    f"(log_s = {self._params['log_s'].tolist()}): the convolution is not invertible"
                )
            return self._lu_lower(), U, np.asarray(self._buffers["perm"])
        if self.masked:
            d = np.diag(A)
            if np.any(d == 0):
                zero = np.flatnonzero(d == 0).tolist()
                raise SingularKernelError(
                    f"CInCConv.inverse: the corner diagonal K[{self.kernel_size - 1},"
                    f"{self.kernel_size - 1},c,c] is zero for channel(s) {zero}: "
                    "the convolution is not invertible (Theorem 1)"
                )
            return A, np.eye(C, dtype=self.dtype), np.arange(C)
        P, Lf, Uf, singular = self._full_corner_lu()
        if singular:
            raise SingularKernelError(
                "CInCConv.inverse: the corner channel block K[k-1,k-1] is singular to working "
                f"precision (LU pivots {np.diag(Uf).tolist()}): the convolution is not invertible"
            )
        return Lf.astype(self.dtype), Uf.astype(self.dtype), np.argmax(P, axis=0)

    def _full_corner_lu(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """``(P, L, U, singular)``: float64 LU with partial pivoting of the full corner
        ``A = P L U``; ``singular`` when a pivot is at most ``C eps max|U|`` (``eps`` of the
        layer dtype): the computed factors satisfy ``L U = P^T A + E`` with
        ``|E| <= gamma_C |L||U|`` and ``|L| <= 1``, so such a pivot is indistinguishable from
        zero and ``A`` is singular to working precision. A float LU of an exactly singular
        matrix rarely gives an exact zero pivot, hence the threshold (the masked corner needs
        none: its pivots are its diagonal entries, exactly). Used by both the logdet and the
        inverse, so ``logdet == -inf`` exactly when ``inverse`` raises
        :class:`SingularKernelError`."""
        A = self.corner_matrix().astype(np.float64)
        P, Lf, Uf = scipy.linalg.lu(A)
        u = np.abs(np.diag(Uf))
        eps = np.finfo(self.dtype).eps
        singular = bool(u.min() <= self.channels * eps * np.abs(Uf).max())
        return P, Lf, Uf, singular

    def inverse(self, y: np.ndarray, method: str | None = None) -> np.ndarray:
        """Solve ``forward(x)[0] == y`` for ``x`` by substitution (``method`` overrides
        :attr:`solver`: ``"auto"``, ``"wavefront"``, ``"raster"`` or ``"reference"``)."""
        y = self.check_input(y, self.channels, name="y")
        method = method or self.solver
        if method not in SOLVERS:
            raise ValueError(f"CInCConv.inverse: method must be one of {SOLVERS}, got {method!r}")
        L, U, perm = self._corner_factors()
        dt = self.dtype if self.solve_dtype is None else np.dtype(self.solve_dtype)
        K = self.kernel
        if dt != self.dtype:  # solve the layer's own (rounded) kernel in higher precision
            K = K.astype(dt)
            if self.corner == "lu" or not self.masked:  # refactorise the rounded corner
                L, U, perm = _stability._plu(K[-1, -1].T)
            y = y.astype(dt)
        fn = {
            "auto": K_.solve_auto,
            "wavefront": K_.solve_wavefront,
            "raster": K_.solve_raster,
            "reference": K_.solve_reference,
        }[method]
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, never silenced
            try:
                x = fn(y, K, L.astype(dt), U.astype(dt), perm).astype(self.dtype)
            except ValueError as exc:  # SciPy's finiteness check inside the reference solver
                if "infs or NaNs" not in str(exc):
                    raise
                x = np.full_like(y, np.nan)
        if not np.isfinite(x).all():
            # Invertible (nonzero corner) but numerically singular: the solve overflowed
            # (tiny corner diagonal against the other taps). Never hand back inf/NaN.
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise NonFiniteError(
                f"CInCConv.inverse: the solution overflowed ({bad} inf/NaN value(s)); the kernel "
                f"is invertible but numerically singular in {self.dtype} (corner diagonal "
                f"min |d| = {float(np.min(np.abs(np.diag(U) * np.diag(L)))):.3g})"
            )
        return x

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        x, K = self.pop_cache()
        N, H, W, C = x.shape
        dy = self.check_grad(dy, x.shape, "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        k = self.kernel_size
        dx = K_.conv_backward_input(dy, K)
        dK = K_.conv_backward_kernel(x, dy, k)  # gradient w.r.t. the effective kernel
        g_ld = H * W * float(np.sum(dlogdet, dtype=np.float64))  # d(sum logdet*dlogdet)/d logdet_pp
        g = self._grads
        if self.corner == "fixed":
            g["kernel"] += dK * self._mask
            corner = self._params["kernel"][-1, -1]
            if g_ld == 0.0:  # logdet unused: no term (avoids 0 * inf = NaN for a zero corner)
                pass
            elif self.masked:  # d log|d_c| / d d_c = 1 / d_c
                g["kernel"][-1, -1] += np.diag(g_ld / np.diag(corner))
            else:  # d log|det A| / dA = A^{-T};  K-layout corner is A^T, so dK_corner = A^{-1}
                g["kernel"][-1, -1] += g_ld * np.linalg.inv(corner.T)
            return dx
        d = self.diagonal()
        if self.guard is not None and self.corner == "lu":  # budget rho / ||A^-1||_inf
            n, dn_dA = _stability.corner_inverse_norm(self.corner_matrix())
            dK_off = dK.copy()
            dK_off[-1, -1] = 0.0
            W = self._params["weight"] * self._mask
            dW, dbudget = _stability.guard_taps_backward(
                dK_off, W, np.full(C, self.guard / n, dtype=self.dtype), self.guard_mode
            )
            g["weight"] += dW * self._mask
            dn = -self.guard / n**2 * float(np.sum(dbudget, dtype=np.float64))
            dK = dK.copy()
            dK[-1, -1] += (dn * dn_dA).T.astype(self.dtype)  # total gradient w.r.t. A^T
        elif self.guard is not None:  # chain rule through the guard's rescaling
            dW, dd = _stability.guard_kernel_backward(
                dK, self._params["weight"] * self._mask, d, self.guard, self.guard_mode
            )
            g["weight"] += dW * self._mask
            if self.corner == "triangular":
                g["log_diag"] += dd * d + g_ld
            return dx
        if self.guard is None:
            g["weight"] += dK * self._mask
        dA = dK[-1, -1].T  # gradient w.r.t. A[o, c]
        if self.corner == "triangular":
            g["log_diag"] += np.diag(dA) * d + g_ld
        elif self.corner == "lu":
            P = np.eye(C, dtype=self.dtype)[:, self._buffers["perm"]]
            Lf, Uf = self._lu_lower(), self._lu_upper()
            dL = P.T @ dA @ Uf.T  # A = P L U
            dU = Lf.T @ P.T @ dA
            g["lower"] += np.tril(dL, -1)
            g["upper"] += np.triu(dU, 1)
            g["log_s"] += np.diag(dU) * d + g_ld
        return dx
