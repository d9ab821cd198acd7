r"""Invertible periodic convolution (Hoogeboom, van den Berg & Welling 2019, "Emerging
Convolutions for Generative Normalizing Flows", Section 3.2), computed, inverted and
differentiated with the FFT.

A ``k x k`` convolution (k odd, centre tap ``p = (k-1)/2``) with *circular* padding: the image
wraps around at its borders, so the map is a (block) circulant matrix, which the 2D discrete
Fourier transform diagonalises into one ``C x C`` complex block per frequency. NHWC, kernel
``K (k, k, C_in, C_out)``::

    forward   y[n,i,j,o] = sum_{a,b<k} sum_c x[n, (i+a-p) mod H, (j+b-p) mod W, c] K[a,b,c,o]
    spectrum  B(u,v) = sum_{a,b} K[a,b] exp(+2 pi i (u (a-p)/H + v (b-p)/W))   (C x C, [c, o])
              X^ = rfft2(x) over (H, W):  Y^[n,u,v,:] = X^[n,u,v,:] @ B(u,v),  y = irfft2(Y^)
    logdet    log|det M| = sum_{u<H, v<W} log|det B(u,v)|
                         = sum_{u<H} sum_{v<=W/2} w_v log|det B(u,v)|
              w_v = 1 for v = 0 (and v = W/2 when W is even), else 2: B(-u,-v) = conj B(u,v)
              has the same |det|, so the half spectrum of rfft2 carries the whole sum
    inverse   X^[n,u,v,:] = Y^[n,u,v,:] @ B(u,v)^{-1},  x = irfft2(X^)
    backward  dY^ = rfft2(dy);  dx = irfft2(dY^ @ B^H)               (M^T: conjugate blocks)
              T = irfft2( sum_n X^[n]^T conj(dY^[n])  +  g H W B^{-T} ),  g = sum_n dlogdet[n]
              dK[a,b] = T[(a-p) mod H, (b-p) mod W]
              (the first term is the circular cross-correlation sum_{n,i,j} x[n,i+a-p,j+b-p]^T
              dy[n,i,j]; the second is d log|det B| = Re tr(B^{-1} dB) summed over every
              frequency, sum_{u,v} Z(u,v) e^{+2 pi i (...)} = H W irfft2(Z) for a Hermitian Z)

The frequency blocks and everything derived from them (``log|det|``, ``B^{-1}``) are computed
in complex128 from the float64 kernel, whatever the layer's dtype; the data path (FFTs and the
per-frequency products) runs in the layer's dtype (complex64 for float32). The FFTs are
``scipy.fft`` (one thread; on the shapes of the MNIST model 4-8x faster than ``numpy.fft``,
which transforms strided axes slowly).

Parameterisation: the Jacobian's "diagonal" is the centre tap ``A[o, c] = K[p, p, c, o]``, an
LU-parameterised matrix ``A = P L U`` exactly as CInC's ``"lu"`` corner
(:func:`flownp.layers.cinc.lu_kernel` with ``centre = (p, p)``; parameters ``weight
(k, k, C, C)`` with the centre tap masked out, ``lower``, ``upper``, ``log_s``; buffers
``perm``, ``sign``; initialisation: a random rotation at the centre, ``N(0, init_std)`` taps
elsewhere). The official layer has a free kernel (an orthogonal centre plus noise) and a bias;
flownp's convolutions carry no bias (the actnorm before them has one).

Invertibility. ``det M = prod_{u,v} det B(u,v)``; the off-centre taps move every block away
from ``A^T``, and with free taps some block can become singular, for any parameterisation of
the centre (C = 1, k = 3: ``K = [0, 1, 0; 1, -4, 1; 0, 1, 0]``, a Laplacian, annihilates the
constant image, ``B(0, 0) = 0``). Two mechanisms, never luck:

* ``guard=rho`` (0 < rho < 1; 0.9 in :class:`flownp.model.FlowConfig`): the off-centre taps
  of every output channel are rescaled to an absolute sum ``< rho / ||A^{-1}||_inf``
  (:func:`flownp.layers.guard.guard_taps`, as CInC's ``"lu"`` corner). Then
  ``B(u,v)^T = A + E(u,v)`` with ``||E(u,v)||_inf <= sum_{taps} ||K_tap||_inf < rho /
  ||A^{-1}||_inf`` (``|e^{i theta}| = 1``), so every block is invertible for *any* parameter
  values, with ``||B(u,v)^{-T}||_inf <= ||A^{-1}||_inf / (1 - rho)``; the same bound holds for
  the whole matrix ``M`` (block dominance in the spatial domain).
* ``guard=None`` (the official layer's freedom): a block whose 1-norm condition number
  ``kappa_1(B) = ||B||_1 ||B^{-1}||_1`` reaches ``1 / (C eps)`` (``eps`` of the layer's dtype),
  or whose determinant is exactly 0, is singular to working precision (an inverse in that
  precision would have no correct digit): ``forward`` and ``inverse`` raise
  :class:`SingularKernelError` naming the frequency. In training that rejects the step (the
  update is not applied) instead of returning a meaningless log-det; a run that keeps hitting
  it stops as diverged with its last usable checkpoint intact.

The rule is applied to every block in every ``forward`` and ``inverse``, with or without the
guard (the guard bounds ``||B^{-1}||`` but not ``||B||``). ``log|det B|`` and ``B^{-1}`` come
from LAPACK's LU factorisation (``numpy.linalg.slogdet``, ``inv``, batched over the
frequencies; an SVD per block cost 10x more on these sizes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft as sfft

from flownp.errors import SingularKernelError
from flownp.layers import _linalg
from flownp.layers.base import Layer
from flownp.layers.cinc import lu_kernel, lu_kernel_backward
from flownp.layers.guard import check_guard


# ---------------------------------------------------------------------- the frequency domain
def frequency_weights(W: int) -> np.ndarray:
    """``w_v`` for ``v = 0 .. W//2`` (module docstring): how often the column ``v`` of the half
    spectrum stands for itself and its conjugate in the full ``W``-point spectrum."""
    w = np.full(W // 2 + 1, 2.0)
    w[0] = 1.0
    if W % 2 == 0:
        w[-1] = 1.0
    return w


def frequency_blocks(K: np.ndarray, H: int, W: int) -> np.ndarray:
    """``B (H, W//2+1, C_in, C_out)`` complex128, ``B(u,v) = sum_{a,b} K[a,b] exp(+2 pi i
    (u (a-p)/H + v (b-p)/W))``: the periodic convolution is ``Y^ = X^ @ B`` per frequency."""
    k = K.shape[0]
    p = (k - 1) // 2
    taps = np.arange(k) - p  # (k,) offsets a - p
    eh = np.exp(2j * np.pi * np.outer(taps, np.arange(H)) / H)  # (k, H)
    ew = np.exp(2j * np.pi * np.outer(taps, np.arange(W // 2 + 1)) / W)  # (k, W//2+1)
    return np.einsum("au,bv,abco->uvco", eh, ew, K.astype(np.float64))


def block_factors(B: np.ndarray, dtype: Any, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logabsdet (H, W'), B^{-1}, kappa_1)`` of every frequency block (LU, batched).

    Raises :class:`SingularKernelError` naming ``who`` and the frequency when a block is not
    finite or singular to the working precision of ``dtype``: ``det B = 0`` or
    ``kappa_1(B) = ||B||_1 ||B^{-1}||_1 >= 1 / (C eps)``.
    """
    C = B.shape[-1]
    if not np.all(np.isfinite(B)):
        raise SingularKernelError(f"{who}: the kernel's frequency blocks contain NaN/Inf")
    sign, logabs = np.linalg.slogdet(B)  # (H, W')
    kappa = np.full(logabs.shape, np.inf)
    Binv = np.full_like(B, np.nan)
    ok = sign != 0
    if np.any(ok):
        Binv[ok] = np.linalg.inv(B[ok])
        norm1 = np.abs(B[ok]).sum(axis=-2).max(axis=-1)  # the largest column sum
        kappa[ok] = norm1 * np.abs(Binv[ok]).sum(axis=-2).max(axis=-1)
    eps = np.finfo(np.dtype(dtype)).eps
    bad = ~(kappa * C * eps < 1.0)
    if np.any(bad):
        u, v = (int(t) for t in np.argwhere(bad)[0])
        raise SingularKernelError(
            f"{who}: the frequency block (u={u}, v={v}) of the periodic convolution is singular "
            f"to working precision (condition number {kappa[u, v]:.3g} >= 1 / (C eps) = "
            f"{1 / (C * eps):.3g}; {int(bad.sum())} such block(s)): the layer is not "
            "invertible. A stability guard (FlowConfig guard, --guard) makes it invertible by "
            "construction"
        )
    return logabs, Binv, kappa


def _per_frequency(Z: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``Z[n,u,v,:] @ B[u,v]`` for every sample and frequency: one ``(N, C) @ (C, C)`` product
    per frequency (``Z (N, H, W', C)``, ``B (H, W', C, C)``)."""
    return np.matmul(Z.transpose(1, 2, 0, 3), B).transpose(2, 0, 1, 3)


# ---------------------------------------------------------------------- the layer
class PeriodicConv(Layer):
    """Invertible periodic (circular) ``k x k`` convolution, NHWC, C -> C channels, computed
    in the frequency domain (Emerging, Section 3.2; module docstring).

    Parameters
    ----------
    channels : int
        Number of channels C (input = output).
    kernel_size : int
        Odd k >= 1 (centred kernel; k = 1 is an LU 1x1 convolution).
    seed : int
        Seed of the initialisation (the off-centre taps first, then the centre rotation).
    dtype : float32 or float64
    init_std : float
        Standard deviation of the random initial off-centre taps.
    guard : float or None
        ``rho`` in (0, 1): every frequency block is invertible by construction, with
        ``||B^{-T}||_inf <= ||A^{-1}||_inf / (1 - rho)`` (module docstring). ``None``: free
        taps; a block singular to working precision raises :class:`SingularKernelError`.
    guard_mode : {"tanh", "clip"}
        Smooth (default) or hard rescaling of the guard.

    Parameters (``params`` keys): ``weight (k, k, C, C)`` (centre tap unused), ``lower``,
    ``upper (C, C)``, ``log_s (C,)``; buffers ``perm (C,)`` int64, ``sign (C,)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        seed: int = 0,
        dtype: Any = np.float64,
        init_std: float = 0.01,
        guard: float | None = None,
        guard_mode: str = "tanh",
    ) -> None:
        super().__init__(dtype)
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool):
            raise ValueError(f"PeriodicConv: channels must be a positive int, got {channels!r}")
        if channels < 1:
            raise ValueError(f"PeriodicConv: channels must be a positive int, got {channels!r}")
        k = kernel_size
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 or k % 2 == 0:
            raise ValueError(
                f"PeriodicConv: kernel_size must be an odd int >= 1 (a centred kernel), "
                f"got {kernel_size!r}"
            )
        if not np.isfinite(init_std) or init_std < 0:
            raise ValueError(f"PeriodicConv: init_std must be finite and >= 0, got {init_std!r}")
        self.guard = check_guard(guard, guard_mode, "PeriodicConv")
        self.guard_mode = guard_mode
        self.channels = C = int(channels)
        self.kernel_size = k = int(k)
        self.centre = ((k - 1) // 2, (k - 1) // 2)
        mask = np.ones((k, k, C, C))
        mask[self.centre] = 0.0
        self._mask = mask.astype(self.dtype)
        rng = np.random.default_rng(seed)
        self.add_param("weight", rng.normal(0.0, init_std, (k, k, C, C)) * mask)
        _linalg.add_lu_parameters(self, _linalg.random_rotation(C, rng))  # the centre A

    # ------------------------------------------------------------------ the kernel
    def _lu_factors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(L, U, d)`` of the centre matrix ``A = P L U`` (:func:`_linalg.lu_factors`)."""
        p = self._params
        return _linalg.lu_factors(p["lower"], p["upper"], p["log_s"], self._buffers["sign"])

    def centre_matrix(self) -> np.ndarray:
        """``A[o, c] = K[p, p, c, o]``, the centre tap's channel matrix (``A = P L U``)."""
        L, U, _ = self._lu_factors()
        return _linalg.permutation_matrix(self._buffers["perm"], self.dtype) @ L @ U

    @property
    def kernel(self) -> np.ndarray:
        """The effective ``(k, k, C, C)`` kernel (a new array)."""
        W = self._params["weight"] * self._mask
        return lu_kernel(W, self.centre_matrix(), self.guard, self.guard_mode, self.centre)

    def factors(self, H: int, W: int, who: str = "PeriodicConv") -> tuple:
        """``(B, logdet, B^{-1})`` for ``H x W`` images: the frequency blocks
        (:func:`frequency_blocks`), the layer's log-det per sample (float64) and the inverse
        blocks; raises :class:`SingularKernelError` for a block singular to working precision."""
        B = frequency_blocks(self.kernel, H, W)
        logabs, Binv, _ = block_factors(B, self.dtype, who)
        return B, float(np.sum(logabs * frequency_weights(W))), Binv

    # ------------------------------------------------------------------ forward / inverse
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_input(x, self.channels)
        N, H, W, _ = x.shape
        B, ld, Binv = self.factors(H, W, "PeriodicConv.forward")
        cdt = np.result_type(x.dtype, np.complex64)  # complex64 or complex128
        X = sfft.rfft2(x, axes=(1, 2))  # (N, H, W//2+1, C)
        y = sfft.irfft2(_per_frequency(X, B.astype(cdt)), s=(H, W), axes=(1, 2))
        self._cache = (X, B, Binv, W)
        return y.astype(self.dtype, copy=False), np.full(N, ld, dtype=self.dtype)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """``x = irfft2(rfft2(y) @ B^{-1})`` per frequency; :class:`SingularKernelError` for a
        block singular to working precision."""
        y = self.check_input(y, self.channels, name="y")
        _, H, W, _ = y.shape
        _, _, Binv = self.factors(H, W, "PeriodicConv.inverse")
        cdt = np.result_type(y.dtype, np.complex64)
        Y = sfft.rfft2(y, axes=(1, 2))
        x = sfft.irfft2(_per_frequency(Y, Binv.astype(cdt)), s=(H, W), axes=(1, 2))
        return x.astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        X, B, Binv, W = self.pop_cache()
        N, H, _, C = X.shape
        dy = self.check_grad(dy, (N, H, W, C), "dy")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        dY = sfft.rfft2(dy, axes=(1, 2))  # (N, H, W', C)
        BH = B.conj().swapaxes(-1, -2).astype(dY.dtype)  # B^H per frequency
        dx = sfft.irfft2(_per_frequency(dY, BH), s=(H, W), axes=(1, 2)).astype(self.dtype)
        # sum_n X^[n]^T conj(dY^[n]) per frequency: (C, N) @ (N, C)
        G = np.matmul(X.transpose(1, 2, 3, 0), dY.conj().transpose(1, 2, 0, 3))
        g = float(np.sum(dlogdet, dtype=np.float64))
        T = sfft.irfft2(G + (g * H * W) * Binv.swapaxes(-1, -2), s=(H, W), axes=(0, 1))
        k, (p, _) = self.kernel_size, self.centre
        rows = (np.arange(k) - p) % H
        cols = (np.arange(k) - p) % W
        dK = T[np.ix_(rows, cols)].astype(self.dtype)  # (k, k, C, C)
        Wm = self._params["weight"] * self._mask
        L, U, d = self._lu_factors()
        dW, dA = lu_kernel_backward(
            dK, Wm, self.centre_matrix(), self.guard, self.guard_mode, self.centre
        )
        grads = self._grads
        grads["weight"] += dW * self._mask
        dlower, dupper, dlog_s = _linalg.lu_backward(dA, self._buffers["perm"], L, U, d)
        grads["lower"] += dlower
        grads["upper"] += dupper
        grads["log_s"] += dlog_s
        return dx
