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

In every mode, the corner entries of ``weight`` that the mask removes are
ignored (their gradient is zero); :attr:`CInCConv.kernel` is the effective kernel.

Stability guard (``guard=rho``, default ``None`` here, 0.9 in :class:`flownp.model.FlowConfig`):
the effective kernel's taps are rescaled so that the substitution stays diagonally dominant
for any parameter values (:mod:`flownp.layers.guard`; with :mod:`flownp.layers._linalg` for
the LU factors, the only modules of the package this file needs besides the compiled
convolution loops of :mod:`flownp.kernels.conv` and, for at most 8 channels, the planar ones
of :mod:`flownp.kernels.conv_planar`, and the substitution loops of
:mod:`flownp.kernels.solve`)::

    triangular / unit   K = guard_kernel(weight * mask, d, rho)        budget rho |d_o|
    lu                  K = guard_taps(weight * mask, rho / ||A^{-1}||_inf),  K[k-1,k-1] = A^T

Reading order for a port: :func:`corner_mask`, then per corner one pair of functions, the
kernel and its backward (:func:`triangular_kernel` / :func:`triangular_kernel_backward`,
:func:`lu_kernel` / :func:`lu_kernel_backward`), then :class:`CInCConv`, which only selects
the pair, runs the convolution kernels and adds the log-determinant terms.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.errors import NonFiniteError, SingularKernelError
from flownp.kernels import solve as solve_kernels
from flownp.kernels.conv_planar import conv_backward_auto, conv_forward_auto
from flownp.layers import _linalg
from flownp.layers.base import Layer
from flownp.layers.guard import (
    check_guard,
    corner_inverse_norm,
    guard_kernel,
    guard_kernel_backward,
    guard_taps,
    guard_taps_backward,
)

CORNERS = ("triangular", "unit", "lu")
SOLVERS = ("auto", "wavefront", "raster", "reference")


def solver_function(method: str) -> Any:
    """``flownp.kernels.solve.solve_<method>``, looked up at call time (one of :data:`SOLVERS`)."""
    return getattr(solve_kernels, f"solve_{method}")


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


# ---------------------------------------------------------------------- triangular / unit corner
def triangular_kernel(
    weight_masked: np.ndarray, d: np.ndarray, guard: float | None, mode: str = "tanh"
) -> np.ndarray:
    """Effective kernel of the ``"triangular"`` / ``"unit"`` corner.

    ``weight_masked (k, k, C, C)`` is ``weight * mask`` (corner: ``c < o`` only), ``d (C,)``
    the corner diagonal (``sign * exp(log_diag)``, or ones). Without guard
    ``K = weight_masked``, ``K[k-1, k-1, o, o] = d_o``; with guard every tap but ``d_o`` of
    output channel ``o`` is rescaled to an absolute sum ``< rho |d_o|`` (:func:`guard_kernel`).
    """
    if guard is not None:
        return guard_kernel(weight_masked, d, guard, mode)
    K = weight_masked.copy()  # (k, k, C, C)
    idx = np.arange(K.shape[3])
    K[-1, -1, idx, idx] = d
    return K


def triangular_kernel_backward(
    dK: np.ndarray, weight_masked: np.ndarray, d: np.ndarray, guard: float | None, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Backward of :func:`triangular_kernel`: ``(dweight, dd)`` from ``dK = dLoss/dK``.

    Without guard ``dweight = dK`` and ``dd_o = dK[k-1, k-1, o, o]``; with guard the exact
    chain rule :func:`guard_kernel_backward`. The caller multiplies ``dweight`` by the mask
    and, for ``"triangular"``, maps ``dd`` to ``d log_diag = dd * d`` (``d = sign exp(log_diag)``).
    """
    if guard is not None:
        return guard_kernel_backward(dK, weight_masked, d, guard, mode)
    return dK, np.diagonal(dK[-1, -1]).copy()


# ---------------------------------------------------------------------- LU corner
def lu_kernel(
    weight_masked: np.ndarray,
    A: np.ndarray,
    guard: float | None,
    mode: str = "tanh",
    centre: tuple[int, int] = (-1, -1),
) -> np.ndarray:
    """Effective kernel of the ``"lu"`` corner: the taps ``weight_masked`` (corner zero) with
    the corner block ``K[k-1, k-1] = A^T`` (``A = P L U``, :func:`_linalg.lu_factors`).

    With guard the off-corner taps of every output channel are rescaled to an absolute sum
    ``< rho / n``, ``n = ||A^{-1}||_inf`` (:func:`guard_taps`; block ratio ``q <= rho``).
    ``centre`` is the tap that holds ``A^T`` (the corner ``(k-1, k-1)``; the periodic
    convolution passes its centre tap).
    """
    K = weight_masked
    if guard is not None:
        n, _ = corner_inverse_norm(A)
        K = guard_taps(weight_masked, np.full(A.shape[0], guard / n), mode)
    K = K.copy()  # (k, k, C, C)
    K[centre] = A.T
    return K


def lu_kernel_backward(
    dK: np.ndarray,
    weight_masked: np.ndarray,
    A: np.ndarray,
    guard: float | None,
    mode: str,
    centre: tuple[int, int] = (-1, -1),
) -> tuple[np.ndarray, np.ndarray]:
    """Backward of :func:`lu_kernel`: ``(dweight, dA)`` from ``dK = dLoss/dK``.

    Without guard ``dweight = dK`` (masked by the caller) and ``dA = dK[k-1, k-1]^T``. With
    guard the budget ``t = rho / n`` depends on ``A``::

        dweight, dt = guard_taps_backward(dK with its corner zeroed, weight_masked, t)
        dA = dK[k-1, k-1]^T + (-rho / n^2) sum_o dt_o * dn/dA

    ``dA`` then goes through ``A = P L U`` (:func:`flownp.layers._linalg.lu_backward`).
    """
    dA = dK[centre].T  # (C, C), gradient w.r.t. A[o, c]
    if guard is None:
        return dK, dA
    C = A.shape[0]
    n, dn_dA = corner_inverse_norm(A)
    dK_off = dK.copy()
    dK_off[centre] = 0.0
    dweight, dbudget = guard_taps_backward(
        dK_off, weight_masked, np.full(C, guard / n, dtype=weight_masked.dtype), mode
    )
    dn = -guard / n**2 * float(np.sum(dbudget, dtype=np.float64))
    return dweight, dA + (dn * dn_dA).astype(dK.dtype)


# ---------------------------------------------------------------------- the layer
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
        Default inverse algorithm (see :mod:`flownp.kernels.solve`); ``"auto"`` is the raster
        schedule (the wavefront gives bitwise the same result, with one barrier per
        anti-diagonal).
    guard : float or None
        Stability guard ``rho`` in (0, 1). ``"triangular"``/``"unit"``: the off-diagonal
        taps of every output channel ``o`` are rescaled so that their absolute sum stays below
        ``rho |d_o|`` for *any* parameter values, which bounds
        ``||M^{-1}||_inf <= 1 / ((1 - rho) min|d|)`` on every image size
        (:func:`flownp.layers.guard.guard_kernel`). ``"lu"``: block dominance, the off-corner
        taps of every output channel sum to less than ``rho / ||A^{-1}||_inf``, so
        ``||M^{-1}||_inf <= ||A^{-1}||_inf / (1 - rho)`` (``docs/stability.md``).
        ``None``: no guard.
    guard_mode : {"tanh", "clip"}
        Smooth (default) or hard rescaling.
    """

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
        if not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"CInCConv: channels must be a positive int, got {channels!r}")
        if not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1:
            raise ValueError(f"CInCConv: kernel_size must be an int >= 1, got {kernel_size!r}")
        if corner not in CORNERS:
            raise ValueError(f"CInCConv: corner must be one of {CORNERS}, got {corner!r}")
        if solver not in SOLVERS:
            raise ValueError(f"CInCConv: solver must be one of {SOLVERS}, got {solver!r}")
        self.guard = check_guard(guard, guard_mode, "CInCConv")
        self.guard_mode = guard_mode
        self.channels = C = int(channels)
        self.kernel_size = k = int(kernel_size)
        self.corner = corner
        self.solver = solver
        self.masked = corner != "lu"  # triangular corner (True) or full block (False)
        rng = np.random.default_rng(seed)
        self._mask = corner_mask(k, C, full_corner=corner == "lu").astype(self.dtype)
        self.add_param("weight", rng.normal(0.0, init_std, (k, k, C, C)) * self._mask)
        if corner == "triangular":
            self.add_param("log_diag", np.zeros(C))
            self.add_buffer("sign", np.ones(C))
        elif corner == "lu":  # Glow: a random rotation, factorised once; P stays fixed
            _linalg.add_lu_parameters(self, _linalg.random_rotation(C, rng))

    # ------------------------------------------------------------------ the effective kernel
    def _lu_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(L, U, d)`` of the ``"lu"`` corner, ``A = P L U`` (:func:`_linalg.lu_factors`)."""
        p = self._params
        return _linalg.lu_factors(p["lower"], p["upper"], p["log_s"], self._buffers["sign"])

    def corner_matrix(self) -> np.ndarray:
        """The diagonal block ``A`` of the Jacobian: ``A[o, c] = K[k-1, k-1, c, o]``."""
        if self.corner == "lu":
            L, U, _ = self._lu_factors()
            return _linalg.permutation_matrix(self._buffers["perm"], self.dtype) @ L @ U
        return self.kernel[-1, -1].T.copy()

    def diagonal(self) -> np.ndarray:
        """The corner diagonal ``d`` (triangular, unit) or ``diag(U)`` (lu)."""
        if self.corner == "triangular":
            return self._buffers["sign"] * np.exp(self._params["log_diag"])
        if self.corner == "lu":
            return self._lu_factors()[2]
        return np.ones(self.channels, dtype=self.dtype)  # unit

    @property
    def kernel(self) -> np.ndarray:
        """The effective ``(k, k, C, C)`` kernel used by :meth:`forward` (a new array)."""
        W = self._params["weight"] * self._mask  # (k, k, C, C), masked taps
        if self.corner == "lu":
            return lu_kernel(W, self.corner_matrix(), self.guard, self.guard_mode)
        return triangular_kernel(W, self.diagonal(), self.guard, self.guard_mode)

    def logdet_per_pixel(self) -> float:
        """``log|det A|``, so that ``logdet = H * W * logdet_per_pixel()``."""
        if self.corner == "triangular":
            return float(np.sum(self._params["log_diag"], dtype=np.float64))
        if self.corner == "lu":
            return float(np.sum(self._params["log_s"], dtype=np.float64))
        return 0.0  # unit: d = 1

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        N, H, W, _ = x.shape
        K = self.kernel  # (k, k, C, C)
        y = conv_forward_auto(x, K)  # (N, H, W, C)
        logdet = np.full(N, H * W * self.logdet_per_pixel(), dtype=self.dtype)
        self._cache = (x, K)
        return y, logdet

    def _corner_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(L, U, perm)`` with ``A = P L U``; raises SingularKernelError for a singular A."""
        C = self.channels
        if self.corner == "lu":
            L, U, d = self._lu_factors()
            if np.any(d == 0):  # exp(log_s) underflowed to 0
                raise SingularKernelError(
                    "CInCConv.inverse: the LU corner has a zero on the diagonal of U "
                    f"(log_s = {self._params['log_s'].tolist()}): the convolution is not invertible"
                )
            return L, U, np.asarray(self._buffers["perm"])
        A = self.corner_matrix()  # lower triangular: L = A, U = I, P = I (pivots = diagonal)
        d = np.diag(A)
        if np.any(d == 0):
            zero = np.flatnonzero(d == 0).tolist()
            raise SingularKernelError(
                f"CInCConv.inverse: the corner diagonal K[{self.kernel_size - 1},"
                f"{self.kernel_size - 1},c,c] is zero for channel(s) {zero}: "
                "the convolution is not invertible (Theorem 1)"
            )
        return A, np.eye(C, dtype=self.dtype), np.arange(C)

    def inverse(
        self, y: np.ndarray, method: str | None = None, *, solve_dtype: Any = None
    ) -> np.ndarray:
        """Solve ``forward(x)[0] == y`` for ``x`` by substitution (``method`` overrides
        :attr:`solver`: ``"auto"``, ``"wavefront"``, ``"raster"`` or ``"reference"``).

        ``solve_dtype`` (None: the layer's dtype) is the precision of the substitution: the
        layer's own kernel (as used by ``forward``) is solved in it and the result cast back
        (:mod:`flownp.layers.precision` chooses it for a model)."""
        y = self.check_input(y, self.channels, name="y")
        method = method or self.solver
        if method not in SOLVERS:
            raise ValueError(f"CInCConv.inverse: method must be one of {SOLVERS}, got {method!r}")
        L, U, perm = self._corner_factors()
        dt = self.dtype if solve_dtype is None else np.dtype(solve_dtype)
        K = self.kernel
        if dt != self.dtype:  # solve the layer's own (rounded) kernel in higher precision
            K = K.astype(dt)
            if not self.masked:  # refactorise the rounded full corner
                perm, L, U = _linalg.plu(K[-1, -1].T, who="CInCConv.inverse: the corner block")
            y = y.astype(dt)
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, never silenced
            try:
                x = solver_function(method)(y, K, L.astype(dt), U.astype(dt), perm)
                x = x.astype(self.dtype)
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
        """``dx = M^T dy``; parameter gradients through the corner's kernel construction.

        ``g_ld = H W sum_n dlogdet[n]`` is the gradient w.r.t. ``log|det A|`` (per pixel).
        """
        x, K = self.pop_cache()
        N, H, W, C = x.shape
        dy = self.check_grad(dy, x.shape, "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        # dx = M^T dy (N, H, W, C) and dK w.r.t. the effective kernel, in one pass
        dx, dK = conv_backward_auto(x, dy, K)
        g_ld = H * W * float(np.sum(dlogdet, dtype=np.float64))
        if self.corner == "lu":
            self._lu_backward(dK, g_ld)
        else:
            self._triangular_backward(dK, g_ld)
        return dx

    def _triangular_backward(self, dK: np.ndarray, g_ld: float) -> None:
        """``"triangular"`` / ``"unit"``: ``d log_diag = dd * d + g_ld`` (``log|d| = log_diag``)."""
        g, d = self._grads, self.diagonal()
        W = self._params["weight"] * self._mask
        dW, dd = triangular_kernel_backward(dK, W, d, self.guard, self.guard_mode)
        g["weight"] += dW * self._mask
        if self.corner == "triangular":
            g["log_diag"] += dd * d + g_ld

    def _lu_backward(self, dK: np.ndarray, g_ld: float) -> None:
        """``"lu"``: ``dA`` through ``A = P L U``; ``d log_s += g_ld`` (logdet = sum log_s)."""
        g = self._grads
        L, U, d = self._lu_factors()
        W = self._params["weight"] * self._mask
        dW, dA = lu_kernel_backward(dK, W, self.corner_matrix(), self.guard, self.guard_mode)
        g["weight"] += dW * self._mask
        dlower, dupper, dlog_s = _linalg.lu_backward(dA, self._buffers["perm"], L, U, d)
        g["lower"] += dlower
        g["upper"] += dupper
        g["log_s"] += dlog_s + g_ld
