r"""Emerging convolution (Hoogeboom, van den Berg & Welling 2019, "Emerging Convolutions for
Generative Normalizing Flows", Section 3.1): two masked ``kk x kk`` convolutions,
``kk = (k + 1) // 2``, whose composition has a ``k x k`` receptive field (2x2 + 2x2 -> 3x3).

Math (NHWC, kernels ``(kk, kk, C_in, C_out)``, ``x.reshape(N, -1)`` the raster vectorisation
(row, column, channel) of the CInC paper; ``forward`` is data -> latent)::

    conv1     z[n,i,j,o] = sum_{a,b<kk} sum_c x[n, i+a, j+b, c] K1[a,b,c,o]
              (zero padding of kk-1 rows at the bottom and kk-1 columns on the right: tap
              (a, b) reads the pixel a rows below / b columns right of the output pixel)
    conv2     y[n,i,j,o] = sum_{a,b<kk} sum_c z[n, i-(kk-1)+a, j-(kk-1)+b, c] K2[a,b,c,o]
              (top/left padding: exactly a CInC convolution, paper Definition 2, size kk)
    forward   y = conv2(conv1(x));  in matrices  y_vec = M2 M1 x_vec
    M1        block UPPER triangular in raster order (pixel p reads pixels q >= p) with
              diagonal blocks A1[o,c] = K1[0,0,c,o], A1 upper triangular  -> M1 upper triangular
    M2        block LOWER triangular (CInC Lemma 1), diagonal blocks A2[o,c] = K2[kk-1,kk-1,c,o],
              A2 lower triangular                                           -> M2 lower triangular
    diagonals diag(A_m) = d_m = sign_m * exp(log_diag_m)   (cannot reach zero; sign fixed)
    logdet    log|det M2 M1| = H W (sum_c log|d1_c| + sum_c log|d2_c|)
                             = H W (sum log_diag1 + sum log_diag2)
    inverse   z = M2^{-1} y  (forward substitution, raster order: pixels top-left first)
              x = M1^{-1} z  (back substitution, reverse raster order: bottom-right first)
    backward  dz = M2^T dy,  dx = M1^T dz
              dK1[a,b] = sum_{n,i,j} x[n,i+a,j+b]^T dz[n,i,j]
              dK2[a,b] = sum_{n,i,j} z[n,i-(kk-1)+a,j-(kk-1)+b]^T dy[n,i,j]
              d/dlog_diag_m[c] = dA_m[c,c] d_m[c] + H W sum_n dlogdet[n]

Reuse of the CInC kernels. ``F`` = the spatial flip ``x[:, ::-1, ::-1, :]`` (a symmetric
permutation, ``F F = I``). A bottom/right padded convolution is a top/left padded one on the
flipped image with the spatially flipped kernel::

    conv1(x) = F conv_tl(F x, K1[::-1, ::-1])       M1 = F M1' F,  M1^T = F M1'^T F

The corner tap of ``K1[::-1, ::-1]`` is ``K1[0, 0]``, so ``M1'`` is a CInC matrix with the
upper-triangular corner ``A1``; :mod:`flownp.kernels.solve` solves ``A = P L U`` per pixel and is
passed ``L = I, U = A1, P = I`` (conv2 passes ``L = A2, U = I``). Reverse raster order on ``x``
is raster order on ``F x``; the wavefront solver therefore takes ``H + W - 1`` steps per
convolution, ``2 (H + W - 1)`` for the layer.

Fairness. Every kernel (the convolution and its gradients, planar or 16-lane as for CInC:
``flownp.kernels.conv_planar.conv_*_auto``; ``solve_*``) loops over the ``kk x kk`` taps of
its kernel only, i.e. over the nonzero taps of the emerging layer (4 + 4
for k = 3), not over the 9 taps of each 3x3 convolution as the public Cython inverse does.
Comparisons with :class:`flownp.layers.CInCConv` (9 taps, one solve) are fair.

Effective kernel. ``K[u+v] += K1[u] @ K2[v]`` over ``u, v in [0, kk)^2`` (a full 2D
convolution of the two kernels, channel matrices multiplied in (c_in, c_out) layout) is the
``k x k`` kernel of the composition: ``y`` equals the symmetric ("same") padded convolution of
``x`` with ``K`` on every pixel with ``i >= kk-1`` and ``j >= kk-1``. In the first ``kk-1`` rows
and columns they differ, because conv2 pads ``z`` (not ``x``) with zeros: exactly,
``forward(pad_top_left(x, kk-1))[:, kk-1:, kk-1:] == conv_same(x, K)``.

Cost of the flips (measured on 2 shared cores, 1 Numba thread, CPU time; N x 16 x 16 x 12
and 16 x 8 x 8 x 48, float32 and float64). The first version of the Numba conv kernels accepted
negative-stride views but ran 3-5x slower on them than on contiguous copies, while one flip
copy cost 2-5 % of a convolution; the current kernels make their inputs contiguous themselves.
conv1 therefore works on contiguous flipped copies: two per forward (the flipped input is kept
for backward), two per backward, two per inverse (the solver's input and the output). Against
two ``CInCConv(C, 2)`` layers (the same kernels, no flips) that costs about +10-45 % in the
forward, at most +15 % in forward + backward and nothing measurable in the inverse.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.errors import SingularKernelError
from flownp.kernels.conv_planar import conv_backward_auto, conv_forward_auto
from flownp.layers.base import Layer
from flownp.layers.cinc import (
    SOLVERS,
    solver_function,
    triangular_kernel,
    triangular_kernel_backward,
)
from flownp.layers.guard import check_guard

SIDES = ("bottom_right", "top_left")


def _flip(a: np.ndarray) -> np.ndarray:
    """``F a``: the spatial flip of an NHWC array, as a contiguous copy."""
    return np.ascontiguousarray(a[:, ::-1, ::-1, :])


class _MaskedConv(Layer):
    r"""One of the two masked convolutions of :class:`EmergingConv` (not a standalone layer).

    ``side="top_left"``: the CInC convolution of size ``kk`` with a lower-triangular centre
    matrix (centre tap ``(kk-1, kk-1)``). ``side="bottom_right"``: padded bottom/right, centre
    tap ``(0, 0)``, upper-triangular centre matrix. Parameters ``weight (kk, kk, C, C)``,
    ``log_diag (C,)``; buffer ``sign (C,)``. The masked centre entries of ``weight`` are ignored
    (zero gradient).

    Inputs are validated by the owning :class:`EmergingConv`; these methods do not re-check
    them. All work happens in the "top/left frame": the input itself (``top_left``) or its
    flip ``F x`` (``bottom_right``) with the kernel :attr:`kernel_tl`.
    """

    def __init__(
        self,
        channels: int,
        kk: int,
        side: str,
        rng: np.random.Generator,
        dtype: Any,
        init_std: float,
        guard: float | None = None,
        guard_mode: str = "tanh",
    ) -> None:
        super().__init__(dtype)
        self.guard, self.guard_mode = guard, guard_mode
        if side not in SIDES:
            raise ValueError(f"EmergingConv: side must be one of {SIDES}, got {side!r}")
        self.channels = C = channels
        self.kk = kk
        self.side = side
        self.centre = (0, 0) if side == "bottom_right" else (kk - 1, kk - 1)
        mask = np.ones((kk, kk, C, C))
        # [c, o] layout: keep c > o (A[o, c] strictly upper) or c < o (strictly lower)
        keep = np.tril if side == "bottom_right" else np.triu
        mask[self.centre] = keep(np.ones((C, C)), -1 if side == "bottom_right" else 1)
        self._mask = mask.astype(self.dtype)
        self.add_param("weight", rng.normal(0.0, init_std, (kk, kk, C, C)) * mask)
        self.add_param("log_diag", np.zeros(C))
        self.add_buffer("sign", np.ones(C))

    # ------------------------------------------------------------------ the kernel
    def diagonal(self) -> np.ndarray:
        """``d = sign * exp(log_diag)``, the diagonal of the centre matrix, shape ``(C,)``."""
        return (self._buffers["sign"] * np.exp(self._params["log_diag"])).astype(self.dtype)

    @property
    def kernel(self) -> np.ndarray:
        """Effective ``(kk, kk, C, C)`` kernel in this side's own layout (a new array).

        Built in the top/left frame exactly as a CInC triangular corner
        (:func:`flownp.layers.cinc.triangular_kernel`, with the optional guard), then mapped back.
        """
        Wt = self._frame_taps(self._params["weight"] * self._mask)  # top/left frame
        Kt = triangular_kernel(Wt, self.diagonal(), self.guard, self.guard_mode)
        return self._frame_taps(Kt)

    def _frame_taps(self, K: np.ndarray) -> np.ndarray:
        """Taps to/from the top/left frame: ``K`` or ``K[::-1, ::-1]`` (contiguous)."""
        return K if self.side == "top_left" else np.ascontiguousarray(K[::-1, ::-1])

    def kernel_tl(self) -> np.ndarray:
        """The kernel in the top/left frame: ``K`` or ``K[::-1, ::-1]`` (contiguous)."""
        K = self.kernel
        return K if self.side == "top_left" else np.ascontiguousarray(K[::-1, ::-1])

    def centre_matrix(self) -> np.ndarray:
        """The Jacobian's diagonal block ``A[o, c] = K[centre][c, o]`` (triangular)."""
        return self.kernel[self.centre].T.copy()

    def logdet_per_pixel(self) -> float:
        """``sum_c log|d_c| = sum(log_diag)`` (float64)."""
        return float(np.sum(self._params["log_diag"], dtype=np.float64))

    def _frame(self, a: np.ndarray) -> np.ndarray:
        """Map an image to/from the top/left frame (identity or ``F``, contiguous)."""
        return a if self.side == "top_left" else _flip(a)

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        N, H, W, _ = x.shape
        Kt = self.kernel_tl()  # (kk, kk, C, C)
        xt = self._frame(x)  # (N, H, W, C), the top/left frame
        y = self._frame(conv_forward_auto(xt, Kt))  # (N, H, W, C)
        logdet = np.full(N, H * W * self.logdet_per_pixel(), dtype=self.dtype)
        self._cache = (xt, Kt)
        return y, logdet

    def inverse(self, y: np.ndarray, method: str = "auto", dtype: Any = None) -> np.ndarray:
        """Solve for the input in ``dtype`` (default the layer's; the kernel is cast to it)."""
        d = self.diagonal()
        if not np.all(np.isfinite(d)) or np.any(d == 0):
            bad = np.flatnonzero(~np.isfinite(d) | (d == 0)).tolist()
            raise SingularKernelError(
                f"EmergingConv.inverse: the diagonal sign * exp(log_diag) of the {self.side} "
                f"convolution is zero or non-finite for channel(s) {bad} "
                f"(log_diag = {self._params['log_diag'][bad].tolist()})"
            )
        dt = self.dtype if dtype is None else np.dtype(dtype)
        A = self.centre_matrix().astype(dt)  # (C, C)
        eye = np.eye(self.channels, dtype=dt)
        L, U = (A, eye) if self.side == "top_left" else (eye, A)  # A = P L U, P = I
        perm = np.arange(self.channels)
        Kt = self.kernel_tl().astype(dt, copy=False)
        y = y.astype(dt, copy=False)
        if self.side == "top_left":
            return solver_function(method)(y, Kt, L, U, perm)
        # the solvers make their input contiguous: pass the flipped view (no extra copy)
        xt = solver_function(method)(y[:, ::-1, ::-1, :], Kt, L, U, perm)
        return _flip(xt)

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        xt, Kt = self.pop_cache()
        N, H, W, C = xt.shape
        dyt = self._frame(dy)  # (N, H, W, C), top/left frame
        # M^T dy = F M'^T F dy, and dKt (kk, kk, C, C) in the top/left frame
        dxt, dKt = conv_backward_auto(xt, dyt, Kt)
        dx = self._frame(dxt)
        g = self._grads
        g_ld = H * W * float(np.sum(dlogdet, dtype=np.float64))
        d = self.diagonal()
        Wt = self._frame_taps(self._params["weight"] * self._mask)
        dWt, dd = triangular_kernel_backward(dKt, Wt, d, self.guard, self.guard_mode)
        g["weight"] += self._frame_taps(dWt) * self._mask
        g["log_diag"] += dd * d + g_ld  # log|d| = log_diag
        return dx


class EmergingConv(Layer):
    """Emerging convolution (Hoogeboom et al. 2019, Sec. 3.1), NHWC, C -> C channels.

    ``y = conv2(conv1(x))`` with two masked ``kk x kk`` convolutions, ``kk = (k+1)//2``: conv1
    padded bottom/right with an upper-triangular centre matrix, conv2 padded top/left (a CInC
    convolution) with a lower-triangular one (module docstring for the math).

    Parameters
    ----------
    channels : int
        Number of channels C (input = output).
    kernel_size : int
        Effective (odd) kernel size k >= 1; each convolution is ``(k+1)//2`` wide
        (k = 3: two 2x2 convolutions; k = 1: an upper then a lower triangular 1x1 convolution).
    seed : int
        Seed of the initialisation (conv1's weight is drawn first, then conv2's).
    dtype : float32 or float64
    init_std : float
        Standard deviation of the random initial taps (the unmasked ones); diagonals start at 1.
    solver : {"auto", "wavefront", "raster", "reference"}
        Default inverse algorithm (see :mod:`flownp.kernels.solve`; ``"auto"``: raster).
    guard : float or None
        Stability guard ``rho`` in (0, 1), applied to both masked convolutions as in
        :class:`~flownp.layers.cinc.CInCConv` (:func:`flownp.layers.guard.guard_kernel`): each has
        dominance ratio ``< rho``, so ``||M^{-1}||_inf <= prod_k 1 / ((1 - rho) min|d_k|)`` on
        every image size (``docs/stability.md``). ``None``: no guard.
    guard_mode : {"tanh", "clip"}
        Smooth (default) or hard rescaling.

    Parameters (``params`` keys): ``conv1/weight``, ``conv2/weight`` ``(kk, kk, C, C)``,
    ``conv1/log_diag``, ``conv2/log_diag`` ``(C,)``; buffers ``conv1/sign``, ``conv2/sign``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        seed: int = 0,
        dtype: Any = np.float64,
        init_std: float = 0.01,
        solver: str = "auto",
        guard: float | None = None,
        guard_mode: str = "tanh",
    ) -> None:
        super().__init__(dtype)
        self.guard = check_guard(guard, guard_mode, "EmergingConv")
        self.guard_mode = guard_mode
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool):
            raise ValueError(f"EmergingConv: channels must be a positive int, got {channels!r}")
        if channels < 1:
            raise ValueError(f"EmergingConv: channels must be a positive int, got {channels!r}")
        k = kernel_size
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 or k % 2 == 0:
            raise ValueError(
                f"EmergingConv: kernel_size must be an odd int >= 1 (the effective size of two "
                f"(k+1)/2 convolutions), got {kernel_size!r}"
            )
        if solver not in SOLVERS:
            raise ValueError(f"EmergingConv: solver must be one of {SOLVERS}, got {solver!r}")
        if not np.isfinite(init_std) or init_std < 0:
            raise ValueError(f"EmergingConv: init_std must be finite and >= 0, got {init_std!r}")
        self.channels = C = int(channels)
        self.kernel_size = int(k)
        self.kk = kk = (int(k) + 1) // 2
        self.solver = solver
        rng = np.random.default_rng(seed)
        g = (self.guard, guard_mode)
        self.conv1 = self.add_layer(
            "conv1", _MaskedConv(C, kk, "bottom_right", rng, self.dtype, init_std, *g)
        )
        self.conv2 = self.add_layer(
            "conv2", _MaskedConv(C, kk, "top_left", rng, self.dtype, init_std, *g)
        )

    # ------------------------------------------------------------------ kernels
    @property
    def kernel1(self) -> np.ndarray:
        """conv1's effective ``(kk, kk, C, C)`` kernel: tap ``(a, b)`` reads pixel
        ``(i+a, j+b)``; ``kernel1[0, 0, c, o] = A1[o, c]`` (upper triangular)."""
        return self.conv1.kernel

    @property
    def kernel2(self) -> np.ndarray:
        """conv2's effective ``(kk, kk, C, C)`` kernel (CInC layout): tap ``(a, b)`` reads pixel
        ``(i-(kk-1)+a, j-(kk-1)+b)``; ``kernel2[kk-1, kk-1, c, o] = A2[o, c]`` (lower)."""
        return self.conv2.kernel

    @property
    def effective_kernel(self) -> np.ndarray:
        """The composition as one ``(k, k, C, C)`` "same"-layout kernel (for verification):
        ``K[u+v] = sum K1[u] @ K2[v]``. Exact on pixels ``i, j >= kk-1`` (module docstring)."""
        K1, K2 = self.kernel1, self.kernel2
        kk, C = self.kk, self.channels
        K = np.zeros((self.kernel_size, self.kernel_size, C, C), dtype=self.dtype)
        for u1 in range(kk):
            for u2 in range(kk):
                for v1 in range(kk):
                    for v2 in range(kk):
                        K[u1 + v1, u2 + v2] += K1[u1, u2] @ K2[v1, v2]  # (C_in, C_out)
        return K

    def stability_kernels(self) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """``[(kernel, diagonal tap), ...]`` in solve order (conv2 first), for
        :func:`flownp.layers.precision.layer_kernels`."""
        kk = self.kk
        return [(self.kernel2, (kk - 1, kk - 1)), (self.kernel1, (0, 0))]

    def logdet_per_pixel(self) -> float:
        """``sum log|d1| + sum log|d2|``, so that ``logdet = H * W * logdet_per_pixel()``."""
        return self.conv1.logdet_per_pixel() + self.conv2.logdet_per_pixel()

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        z, ld1 = self.conv1.forward(x)  # (N, H, W, C)
        y, ld2 = self.conv2.forward(z)  # (N, H, W, C)
        self._cache = x.shape
        return y, ld1 + ld2

    def inverse(
        self, y: np.ndarray, method: str | None = None, *, solve_dtype: Any = None
    ) -> np.ndarray:
        """Solve ``forward(x)[0] == y``: conv2 by substitution in raster order, then conv1 in
        reverse raster order (``method`` overrides :attr:`solver`; ``solve_dtype``, None for
        the layer's dtype, is the precision of both substitutions, see
        :mod:`flownp.layers.precision`)."""
        y = self.check_input(y, self.channels, name="y")
        method = method or self.solver
        if method not in SOLVERS:
            raise ValueError(
                f"EmergingConv.inverse: method must be one of {SOLVERS}, got {method!r}"
            )
        dt = solve_dtype
        z = self.conv2.inverse(y, method, dt)  # (N, H, W, C)
        return self.conv1.inverse(z, method, dt).astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        shape = self.pop_cache()
        dy = self.check_grad(dy, shape, "dy")
        dlogdet = self.check_grad(dlogdet, (shape[0],), "dlogdet")
        dz = self.conv2.backward(dy, dlogdet)  # M2^T dy
        return self.conv1.backward(dz, dlogdet)  # M1^T dz
