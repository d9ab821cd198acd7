r"""A CInC layer with a given kernel, to verify the padded convolution on chosen kernels.

:class:`FixedKernelCInC` is a :class:`~flownp.layers.cinc.CInCConv` whose effective kernel is
the array it was built from, stored as the one parameter ``kernel (k, k, C, C)``. Nothing
guarantees invertibility: the report and the tests use it for the paper's counterexamples,
singular kernels and the stability measurements on prescribed kernels. Forward, inverse and
the log-determinant are the layer's own (the same convolution and substitution kernels);
only what the parameter is differs::

    masked=True    A = kernel[k-1, k-1].T lower triangular (kernel[k-1,k-1,c,o] = 0 for c > o)
                   logdet per pixel = sum_c log|d_c|,   d = diag A
                   d logdet / d kernel[k-1,k-1,c,c] = 1 / d_c
    masked=False   A = kernel[k-1, k-1].T a full block, factorised A = P L U (float64,
                   partial pivoting, the singularity rule of flownp.layers._linalg.plu)
                   logdet per pixel = log|det A| from that factorisation
                   d logdet / d kernel[k-1, k-1] = A^{-1}   (the corner of K is A^T)

    grads["kernel"] += dK * mask    (the masked corner entries get zero)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.errors import SingularKernelError
from flownp.kernels.conv_planar import conv_backward_auto
from flownp.layers import _linalg
from flownp.layers.base import Layer
from flownp.layers.cinc import SOLVERS, CInCConv


class FixedKernelCInC(CInCConv):
    """A CInC layer whose effective kernel is exactly ``kernel`` (k, k, C, C).

    ``masked=True``: the corner must be triangular (``kernel[k-1,k-1,c,o] == 0`` for
    ``c > o``), else ``ValueError``. ``masked=False``: the corner block is full; ``inverse``
    raises :class:`~flownp.errors.SingularKernelError` when it is singular. A masked corner
    with a zero diagonal entry (not invertible, Theorem 1) raises ``SingularKernelError``
    unless ``allow_singular`` (to study such a layer). The dtype is the kernel's unless
    ``dtype=`` is given. No guard: the kernel is used as given.
    """

    def __init__(
        self,
        kernel: np.ndarray,
        masked: bool = True,
        *,
        allow_singular: bool = False,
        dtype: Any = None,
        solver: str = "auto",
    ) -> None:
        kernel = np.asarray(kernel)
        sh = kernel.shape
        if kernel.ndim != 4 or sh[0] != sh[1] or sh[2] != sh[3]:
            raise ValueError(f"FixedKernelCInC: kernel must be (k, k, C, C), got {sh}")
        if dtype is None:
            dtype = kernel.dtype if kernel.dtype.kind == "f" else np.float64
        if solver not in SOLVERS:
            raise ValueError(f"FixedKernelCInC: solver must be one of {SOLVERS}, got {solver!r}")
        Layer.__init__(self, dtype)  # CInCConv.__init__ would create parameterised taps
        k, C = sh[0], sh[2]
        corner = kernel[k - 1, k - 1]
        if masked and np.any(np.tril(corner, -1) != 0):
            c, o = np.argwhere(np.tril(corner, -1) != 0)[0]
            raise ValueError(
                f"FixedKernelCInC: masked=True but kernel[{k - 1},{k - 1},{c},{o}] = "
                f"{corner[c, o]!r} is nonzero (input channel {c} > output channel {o})"
            )
        if not np.all(np.isfinite(kernel)):
            raise ValueError("FixedKernelCInC: kernel contains NaN/Inf")
        if masked and not allow_singular and np.any(np.diag(corner) == 0):
            raise SingularKernelError(
                f"FixedKernelCInC: the corner diagonal kernel[{k - 1},{k - 1},c,c] is zero "
                f"for channel(s) {np.flatnonzero(np.diag(corner) == 0).tolist()}: the "
                "convolution is not invertible (Theorem 1); pass allow_singular=True to build it"
            )
        self.guard = None
        self.guard_mode = "tanh"
        self.channels = int(C)
        self.kernel_size = int(k)
        self.corner = "fixed"
        self.solver = solver
        self.masked = bool(masked)
        self._mask = np.ones(sh, dtype=self.dtype)
        if masked:
            self._mask[k - 1, k - 1] = np.triu(np.ones((C, C)))
        self.add_param("kernel", kernel)

    @property
    def kernel(self) -> np.ndarray:
        """The effective ``(k, k, C, C)`` kernel: the parameter, masked (a new array)."""
        return self._params["kernel"] * self._mask

    def diagonal(self) -> np.ndarray:
        """The corner diagonal ``kernel[k-1, k-1, c, c]``."""
        return np.diag(self._params["kernel"][-1, -1]).copy()

    def logdet_per_pixel(self) -> float:
        """``log|det A|`` (module docstring); ``-inf`` for a singular corner."""
        if not self.masked:  # the same PLU and singularity rule as the inverse
            return _linalg.plu_logabsdet(self.corner_matrix(), dtype=self.dtype)
        with np.errstate(divide="ignore"):
            return float(np.sum(np.log(np.abs(self.diagonal().astype(np.float64)))))

    def _corner_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(L, U, perm)``, ``A = P L U``: the layer's own for a masked corner, else the PLU
        of :func:`flownp.layers._linalg.plu` (``SingularKernelError`` when singular)."""
        if self.masked:
            return super()._corner_factors()
        A = self.corner_matrix()
        perm, L, U = _linalg.plu(A, dtype=self.dtype, who="CInCConv.inverse: the corner block")
        return L.astype(self.dtype), U.astype(self.dtype), perm

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        """``dx = M^T dy``; ``grads["kernel"]`` (module docstring)."""
        x, K = self.pop_cache()
        N, H, W, C = x.shape
        dy = self.check_grad(dy, x.shape, "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dx, dK = conv_backward_auto(x, dy, K)  # (N, H, W, C), (k, k, C, C)
        g_ld = H * W * float(np.sum(dlogdet, dtype=np.float64))
        g = self._grads
        g["kernel"] += dK * self._mask
        if g_ld == 0.0:  # logdet unused: no term (avoids 0 * inf = NaN for a zero corner)
            return dx
        corner = self._params["kernel"][-1, -1]  # A^T
        if self.masked:  # d log|d_c| / d d_c = 1 / d_c
            g["kernel"][-1, -1] += np.diag(g_ld / np.diag(corner))
        else:  # K-layout corner is A^T, so d/d corner = (A^{-T})^T = A^{-1}
            g["kernel"][-1, -1] += g_ld * np.linalg.inv(corner.T)
        return dx
