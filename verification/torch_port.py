r"""A PyTorch port of flownp's multi-scale model: the worked porting example, and the PyTorch
side of ``flownp bench --section torch``.

Written from ``docs/porting.md``, ``docs/conventions.md``, ``docs/layers/*.md`` and
``docs/model.md`` (not from flownp's code), and checked against flownp two ways:

* ``python -m verification.torch_port reference PORT.h5`` runs this port on the inputs of
  the reference vectors (``verification/data/reference_vectors.h5``) and writes every tensor
  of ``docs/reference-vectors.md`` in flownp's layout; ``flownp check-reference PORT.h5``
  compares them (forward of every layer with its log-det, latent, loss, gradients, inverse,
  sampling, three Adam or Adamax steps).
* :func:`compare_with_flownp` loads the parameters of any :class:`flownp.model.FlowModel`
  (every ``FlowConfig``: CInC with the ``"triangular"``, ``"unit"`` and ``"lu"`` corners and
  the stability guard, Emerging, Glow's 1x1 plain and LU, a 1x1 before CInC or Emerging, the
  periodic convolution, channel reversal and shuffle, affine, additive and quad couplings,
  ``softclamp``, ``exp`` and ``sigmoid`` scales, the class-conditional prior with the latent
  classifier, n-bit data) and returns the largest differences of the outputs, per-layer
  log-dets, loss, gradients and inverse (``tests/test_torch_port.py``).

Everything here needs ``torch`` (an optional extra: ``pip install flownp[torch]``); flownp
itself never imports it.

Layout (``docs/porting.md``, section 1): activations are NCHW, kernels OIHW
(``weight = K.permute(3, 2, 0, 1)``), the top prior ``(C, H, W)``; 1x1 matrices and vectors
keep flownp's shape (the label embedding ``(K, C)``, the classifier ``(C, K)``). Module
attribute names follow flownp's parameter paths, so
``named_parameters()`` yields ``level0.step0.conv.weight`` for flownp's
``level0/step0/conv/weight`` (:func:`load_flownp_state`, :func:`flownp_grads`).

Direction: ``forward`` maps data to latent and returns ``(y, logdet)`` with a float64 ``logdet``
of shape ``(N,)`` (the log-dets are accumulated in float64 as flownp does, also in a float32
model); ``inverse`` maps back. Gradients come from autograd on the scalar loss.

The inverse of a padded convolution (CInC, each half of Emerging) is a substitution. Here it
runs row by row (:func:`solve_top_left`): for row ``i`` the taps of the ``k - 1`` rows above
are one ``conv2d`` on the already solved rows, and the taps of the row itself (the corner
block ``A`` and the ``k - 1`` blocks to its left) form a block lower-triangular Toeplitz
``(C W, C W)`` matrix that is inverted once per call; each row is then one matrix product.
``H`` sequential steps of batched, BLAS-sized torch operations per layer.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flownp.model import FlowConfig

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# Layout conversion: flownp (NHWC, HWIO) <-> PyTorch (NCHW, OIHW)
# --------------------------------------------------------------------------------------------


#: The top prior's label embedding: (K, C), or (K, H, W, C) with ``label_prior="position"``.
LABEL_EMBEDDINGS = ("label_mean", "label_logs")


def to_torch_layout(path: str, a: np.ndarray) -> np.ndarray:
    """A flownp parameter/buffer ``a`` at ``path`` in this port's layout (porting.md, 1)."""
    if a.ndim == 4 and path.endswith(LABEL_EMBEDDINGS):  # per position (K, H, W, C) -> (K, C, H, W)
        return a.transpose(0, 3, 1, 2)
    if a.ndim == 4:  # k x k kernel (k, k, C_in, C_out) -> (C_out, C_in, k, k)
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 3:  # top prior mean/logs (H, W, C) -> (C, H, W)
        return a.transpose(2, 0, 1)
    return a


def to_flownp_layout(path: str, a: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_torch_layout`."""
    if a.ndim == 4 and path.endswith(LABEL_EMBEDDINGS):
        return a.transpose(0, 2, 3, 1)
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 3:
        return a.transpose(1, 2, 0)
    return a


def nchw(x: np.ndarray) -> torch.Tensor:
    """flownp image ``(N, H, W, C)`` -> torch ``(N, C, H, W)`` (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    """torch ``(N, C, H, W)`` -> flownp ``(N, H, W, C)``."""
    return t.detach().permute(0, 2, 3, 1).cpu().numpy()


def _param(dtype: torch.dtype, *shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=dtype))


def _const_logdet(value: torch.Tensor, n: int) -> torch.Tensor:
    """A per-sample log-det that is the same for every sample: ``(n,)`` float64."""
    return value.to(torch.float64).expand(n)


# --------------------------------------------------------------------------------------------
# ActNorm (docs/porting.md section 4; flownp.layers.actnorm)
# --------------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """``y = (x + bias) * exp(logs)`` per channel, log-det ``H W sum(logs)``; data-dependent
    initialisation (``bias = -mean``, ``logs = -log(std + 1e-6)`` over N, H, W) on the first
    forward of an uninitialised layer only."""

    def __init__(self, channels: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.bias = _param(dtype, channels)
        self.logs = _param(dtype, channels)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(dim=(0, 2, 3))
        std = x64.std(dim=(0, 2, 3), unbiased=False)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._initialize(x)
        return (x + self.bias[:, None, None]) * torch.exp(self.logs)[:, None, None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.apply_(x)
        H, W = x.shape[2:]
        return y, _const_logdet(H * W * self.logs.sum(), x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs)[:, None, None] - self.bias[:, None, None]


# --------------------------------------------------------------------------------------------
# The stability guard (docs/stability.md section 4)
# --------------------------------------------------------------------------------------------


def guard_h(u: torch.Tensor, mode: str) -> torch.Tensor:
    """``h(u) = tanh(u) / u`` (series near 0) or ``1 / max(1, u)``, elementwise, ``u >= 0``."""
    if mode == "tanh":
        small = u < 1e-2
        us = torch.where(small, torch.ones_like(u), u)  # no 0/0 in the unused branch
        return torch.where(small, 1 - u**2 / 3 + 2 * u**4 / 15, torch.tanh(us) / us)
    if mode == "clip":
        over = u > 1.0
        return torch.where(over, 1.0 / torch.where(over, u, torch.ones_like(u)), 1.0)
    raise ValueError(f"guard: mode must be 'tanh' or 'clip', got {mode!r}")


def guard_taps(w: torch.Tensor, budget: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale output channel ``o`` of the OIHW taps ``w`` so its absolute sum stays below
    ``budget[o]``: ``w[o] * h(sum|w[o]| / budget[o])``."""
    s = w.abs().sum(dim=(1, 2, 3))  # (C_out,)
    return w * guard_h(s / budget, mode)[:, None, None, None]


# --------------------------------------------------------------------------------------------
# Padded convolutions and their row-by-row inverse
# --------------------------------------------------------------------------------------------


def conv_top_left(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """CInC convolution: ``k - 1`` zero rows on top and columns on the left (porting.md, 2)."""
    k = w.shape[-1]
    return F.conv2d(F.pad(x, (k - 1, 0, k - 1, 0)), w)


def row_operator(w: torch.Tensor, width: int) -> torch.Tensor:
    """The ``(C W, C W)`` matrix of the taps of one row on itself, index ``c * W + j``:
    ``R[(o, j), (c, j - (k-1-b))] = w[o, c, k-1, b]``, block lower triangular with the corner
    block ``A = w[:, :, k-1, k-1]`` on its diagonal."""
    k = w.shape[-1]
    R = torch.zeros(w.shape[0] * width, w.shape[1] * width, dtype=w.dtype)
    for b in range(k):
        d = k - 1 - b
        if d >= width:
            continue
        shift = torch.diag(torch.ones(width - d, dtype=w.dtype), -d)  # S[j, j - d] = 1
        R = R + torch.kron(w[:, :, k - 1, b], shift)
    return R


def solve_top_left(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` with ``conv_top_left(x, w) == y``: row-by-row substitution (module docstring).

    The row operator is inverted in float64 (a ``(C W)^3`` cost once per call), then every
    row is ``x_i = R^{-1} (y_i - conv(rows i-k+1 .. i-1))``.
    """
    N, C, H, W = y.shape
    k = w.shape[-1]
    with torch.no_grad():
        Rinv_t = torch.linalg.inv(row_operator(w.detach().double(), W)).to(y.dtype).T
        xp = y.new_zeros(N, C, H + k - 1, W + k - 1)  # x with its top-left zero padding
        w_up = w.detach()[:, :, : k - 1, :]  # taps of the rows above
        for i in range(H):
            r = y[:, :, i, :]
            if k > 1:
                r = r - F.conv2d(xp[:, :, i : i + k - 1, :], w_up)[:, :, 0, :]
            xp[:, :, i + k - 1, k - 1 :] = (r.reshape(N, C * W) @ Rinv_t).view(N, C, W)
        return xp[:, :, k - 1 :, k - 1 :].contiguous()


# --------------------------------------------------------------------------------------------
# Invertible convolutions: CInC, Emerging, Glow's 1x1
# --------------------------------------------------------------------------------------------


def _plu(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, diag: torch.Tensor):
    """``P L U`` with ``P[perm[j], j] = 1``, ``L`` unit lower, ``U`` upper with ``diag``."""
    C = diag.shape[0]
    eye = torch.eye(C, dtype=lower.dtype)
    P = eye[:, perm]
    L = torch.tril(lower, -1) + eye
    U = torch.triu(upper, 1) + torch.diag(diag)
    return P @ L @ U


class CInCConv(nn.Module):
    """Top-left padded ``k x k`` convolution with a triangular, unit or LU corner block,
    optionally guarded (docs/layers/cinc.md, docs/porting.md section 3)."""

    def __init__(
        self, C: int, k: int, corner: str, guard: float | None, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.k, self.corner, self.guard, self.guard_mode = k, corner, guard, "tanh"
        self.weight = _param(dtype, C, C, k, k)
        mask = torch.ones(C, C, k, k, dtype=dtype)
        if corner == "lu":
            mask[:, :, k - 1, k - 1] = 0
            self.lower = _param(dtype, C, C)
            self.upper = _param(dtype, C, C)
            self.log_s = _param(dtype, C)
            self.register_buffer("perm", torch.arange(C))
            self.register_buffer("sign", torch.ones(C, dtype=torch.float64))
        else:  # A[o, c] = weight[o, c, k-1, k-1] for c < o (strictly lower) + diag
            mask[:, :, k - 1, k - 1] = torch.tril(torch.ones(C, C, dtype=dtype), -1)
            if corner == "triangular":
                self.log_diag = _param(dtype, C)
                self.register_buffer("sign", torch.ones(C, dtype=torch.float64))
        self.register_buffer("mask", mask, persistent=False)

    def diagonal(self) -> torch.Tensor:
        if self.corner == "lu":
            return self.sign.to(self.log_s.dtype) * torch.exp(self.log_s)
        if self.corner == "triangular":
            return self.sign.to(self.log_diag.dtype) * torch.exp(self.log_diag)
        return torch.ones(self.weight.shape[0], dtype=self.weight.dtype)

    def kernel(self) -> torch.Tensor:
        """Effective OIHW kernel (masked taps, corner block, guard)."""
        k = self.k
        taps = self.weight * self.mask
        if self.corner == "lu":
            A = _plu(self.perm, self.lower, self.upper, self.diagonal())  # A[o, c]
            if self.guard is not None:  # budget rho / ||A^-1||_inf, the norm in float64
                n = torch.linalg.inv(A.double()).abs().sum(dim=1).max().to(A.dtype)
                taps = guard_taps(taps, (self.guard / n).expand(A.shape[0]), self.guard_mode)
            return taps + F.pad(A[:, :, None, None], (k - 1, 0, k - 1, 0))
        d = self.diagonal()
        if self.guard is not None:
            taps = guard_taps(taps, self.guard * d.abs(), self.guard_mode)
        return taps + F.pad(torch.diag(d)[:, :, None, None], (k - 1, 0, k - 1, 0))

    def logdet_per_pixel(self) -> torch.Tensor:
        if self.corner == "lu":
            return self.log_s.sum()
        if self.corner == "triangular":
            return self.log_diag.sum()
        return self.weight.new_zeros(())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = x.shape[2:]
        return conv_top_left(x, self.kernel()), _const_logdet(
            H * W * self.logdet_per_pixel(), x.shape[0]
        )

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return solve_top_left(y, self.kernel())


class PeriodicConv(nn.Module):
    """Circular ``k x k`` convolution with a centred kernel whose centre tap is ``A = P L U``
    (as CInC's LU corner), optionally guarded (docs/layers/periodic.md). Log-det and inverse
    from the per-frequency ``C x C`` blocks of the kernel's 2D DFT."""

    def __init__(self, C: int, k: int, guard: float | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.k, self.p, self.guard = k, (k - 1) // 2, guard
        self.weight = _param(dtype, C, C, k, k)
        self.lower = _param(dtype, C, C)
        self.upper = _param(dtype, C, C)
        self.log_s = _param(dtype, C)
        self.register_buffer("perm", torch.arange(C))
        self.register_buffer("sign", torch.ones(C, dtype=torch.float64))
        mask = torch.ones(C, C, k, k, dtype=dtype)
        mask[:, :, self.p, self.p] = 0
        self.register_buffer("mask", mask, persistent=False)

    def kernel(self) -> torch.Tensor:
        """Effective OIHW kernel: masked taps (guarded), ``A`` at the centre tap."""
        taps = self.weight * self.mask
        d = self.sign.to(self.log_s.dtype) * torch.exp(self.log_s)
        A = _plu(self.perm, self.lower, self.upper, d)  # A[o, c]
        if self.guard is not None:
            n = torch.linalg.inv(A.double()).abs().sum(dim=1).max().to(A.dtype)
            taps = guard_taps(taps, (self.guard / n).expand(A.shape[0]), "tanh")
        p = self.p
        return taps + F.pad(A[:, :, None, None], (p, p, p, p))

    def blocks(self, K: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """``(H, W, C_out, C_in)`` complex: the DFT of the kernel placed on the torus, tap
        ``(a, b)`` at pixel ``((p - a) mod H, (p - b) mod W)``."""
        k, p = self.k, self.p
        torus = K.new_zeros(H, W, K.shape[0], K.shape[1])
        for a in range(k):
            for b in range(k):
                torus[(p - a) % H, (p - b) % W] += K[:, :, a, b]
        return torch.fft.fft2(torus.double(), dim=(0, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = x.shape[2:]
        K = self.kernel()
        y = x.new_zeros(x.shape)
        for a in range(self.k):  # y[i, j] += K[a, b] x[(i + a - p) mod H, (j + b - p) mod W]
            for b in range(self.k):
                shifted = torch.roll(x, shifts=(self.p - a, self.p - b), dims=(2, 3))
                y = y + torch.einsum("oc,nchw->nohw", K[:, :, a, b], shifted)
        ld = torch.linalg.slogdet(self.blocks(K, H, W))[1].sum()
        return y, _const_logdet(ld, x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        H, W = y.shape[2:]
        with torch.no_grad():
            Binv = torch.linalg.inv(self.blocks(self.kernel(), H, W)[:, : W // 2 + 1])
            Y = torch.fft.rfft2(y.double(), dim=(2, 3))  # (N, C, H, W//2+1)
            X = torch.einsum("uvco,nouv->ncuv", Binv, Y)
            return torch.fft.irfft2(X, s=(H, W), dim=(2, 3)).to(y.dtype)


class ChannelPermutation(nn.Module):
    """``y = x[:, perm]`` (buffer ``perm``), log-det 0 (docs/layers/permute.md)."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.register_buffer("perm", torch.arange(C))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0], dtype=torch.float64)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, torch.argsort(self.perm)]


class _MaskedHalf(nn.Module):
    """One of Emerging's two ``kk x kk`` convolutions (parameters ``weight``, ``log_diag``,
    buffer ``sign``): ``"bottom_right"`` (conv1, centre tap (0, 0), ``A1`` upper triangular)
    or ``"top_left"`` (conv2, centre tap (kk-1, kk-1), ``A2`` lower triangular)."""

    def __init__(self, C: int, kk: int, side: str, guard: float | None, dtype: torch.dtype):
        super().__init__()
        self.kk, self.side, self.guard = kk, side, guard
        self.weight = _param(dtype, C, C, kk, kk)
        self.log_diag = _param(dtype, C)
        self.register_buffer("sign", torch.ones(C, dtype=torch.float64))
        mask = torch.ones(C, C, kk, kk, dtype=dtype)
        t = 0 if side == "bottom_right" else kk - 1
        ones = torch.ones(C, C, dtype=dtype)
        # [o, c] layout: conv1 keeps c > o (strictly upper), conv2 keeps c < o (strictly lower)
        mask[:, :, t, t] = torch.triu(ones, 1) if side == "bottom_right" else torch.tril(ones, -1)
        self.register_buffer("mask", mask, persistent=False)

    def kernel(self) -> torch.Tensor:
        d = self.sign.to(self.log_diag.dtype) * torch.exp(self.log_diag)
        taps = self.weight * self.mask
        if self.guard is not None:
            taps = guard_taps(taps, self.guard * d.abs(), "tanh")
        t = 0 if self.side == "bottom_right" else self.kk - 1
        pad = (t, self.kk - 1 - t, t, self.kk - 1 - t)
        return taps + F.pad(torch.diag(d)[:, :, None, None], pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.kk - 1
        if self.side == "bottom_right":
            return F.conv2d(F.pad(x, (0, p, 0, p)), self.kernel())
        return F.conv2d(F.pad(x, (p, 0, p, 0)), self.kernel())

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.side == "top_left":
            return solve_top_left(y, self.kernel())
        # conv1(x) = flip(conv_top_left(flip(x), flip(K1))): reverse raster order
        f = (2, 3)
        return torch.flip(solve_top_left(torch.flip(y, f), torch.flip(self.kernel(), f)), f)


class EmergingConv(nn.Module):
    """``y = conv2(conv1(x))`` (docs/layers/emerging.md), log-det ``H W (sum log_diag1 +
    sum log_diag2)``."""

    def __init__(self, C: int, k: int, guard: float | None, dtype: torch.dtype) -> None:
        super().__init__()
        kk = (k + 1) // 2
        self.conv1 = _MaskedHalf(C, kk, "bottom_right", guard, dtype)
        self.conv2 = _MaskedHalf(C, kk, "top_left", guard, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = x.shape[2:]
        ld = self.conv1.log_diag.sum() + self.conv2.log_diag.sum()
        return self.conv2(self.conv1(x)), _const_logdet(H * W * ld, x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.conv1.inverse(self.conv2.inverse(y))


class Conv1x1(nn.Module):
    """Glow's 1x1 convolution ``y = x @ W`` per pixel, ``W[c_in, c_out]`` (flownp's shape);
    ``lu=True``: ``W = P L U`` (docs/layers/conv1x1.md)."""

    def __init__(self, C: int, lu: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.lu = lu
        if lu:
            self.lower = _param(dtype, C, C)
            self.upper = _param(dtype, C, C)
            self.log_s = _param(dtype, C)
            self.register_buffer("perm", torch.arange(C))
            self.register_buffer("sign", torch.ones(C, dtype=torch.float64))
        else:
            self.weight = _param(dtype, C, C)

    def matrix(self) -> torch.Tensor:
        if self.lu:
            d = self.sign.to(self.log_s.dtype) * torch.exp(self.log_s)
            return _plu(self.perm, self.lower, self.upper, d)
        return self.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = x.shape[2:]
        Wm = self.matrix()
        if self.lu:
            ld = self.log_s.sum()
        else:
            ld = torch.linalg.slogdet(Wm.double())[1]
        return F.conv2d(x, Wm.T[:, :, None, None]), _const_logdet(H * W * ld, x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        Winv = torch.linalg.inv(self.matrix().detach().double()).to(y.dtype)
        return F.conv2d(y, Winv.T[:, :, None, None])


# --------------------------------------------------------------------------------------------
# Couplings (docs/layers/coupling.md)
# --------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    """A named group of parameters (``conv_in``, ``conv_out``, ``prior``, ...)."""

    def __init__(self, dtype: torch.dtype, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            setattr(self, name, _param(dtype, *shape))


class ConditionerNet(nn.Module):
    """Glow's ``f``: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> conv3x3 +
    bias, times ``exp(3 logs)``."""

    def __init__(self, c_in: int, c_out: int, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv_in = _Holder(dtype, weight=(width, c_in, 3, 3))
        self.norm_in = ActNorm(width, dtype)
        self.conv_mid = _Holder(dtype, weight=(width, width, 1, 1))
        self.norm_mid = ActNorm(width, dtype)
        self.conv_out = _Holder(dtype, weight=(c_out, width, 3, 3), bias=(c_out,), logs=(c_out,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(self.norm_in.apply_(F.conv2d(x, self.conv_in.weight, padding=1)))
        r = F.relu(self.norm_mid.apply_(F.conv2d(r, self.conv_mid.weight)))
        o = F.conv2d(r, self.conv_out.weight, self.conv_out.bias, padding=1)
        return o * torch.exp(3 * self.conv_out.logs)[:, None, None]


class BlockCoupling(nn.Module):
    """Affine (2 blocks, network ``net``) or quad (4 blocks, ``nn1..nn3``) coupling:
    ``y_k = (x_k + shift_k) * s(raw_k)``, ``shift = h[:, 0::2]``, ``raw = h[:, 1::2]``,
    ``h = NN_{k-1}(x_1..x_{k-1})``; ``s = sigmoid(raw + 2)``, ``exp(raw)`` or
    ``exp(2 tanh(raw / 2))``. ``scale=None``:
    additive, ``h`` is the shift alone and ``s = 1``."""

    def __init__(self, C: int, width: int, blocks: int, scale: str | None, dtype: torch.dtype):
        super().__init__()
        self.blocks, self.scale, self.e = blocks, scale, C // blocks
        if blocks == 2:
            self.net = ConditionerNet(C // 2, C if scale else C // 2, width, dtype)
            self.nets = [self.net]
        else:
            e = self.e
            self.nn1 = ConditionerNet(e, 2 * e, width, dtype)
            self.nn2 = ConditionerNet(2 * e, 2 * e, width, dtype)
            self.nn3 = ConditionerNet(3 * e, 2 * e, width, dtype)
            self.nets = [self.nn1, self.nn2, self.nn3]

    def _shift_scale(self, k: int, x_cond: torch.Tensor):
        h = self.nets[k - 1](x_cond)
        if self.scale is None:
            return h, torch.ones_like(h), torch.zeros_like(h)
        shift, raw = h[:, 0::2], h[:, 1::2]
        if self.scale == "sigmoid":
            return shift, torch.sigmoid(raw + 2.0), F.logsigmoid(raw + 2.0)
        if self.scale == "softclamp":
            log_s = 2.0 * torch.tanh(raw / 2.0)
            return shift, torch.exp(log_s), log_s
        return shift, torch.exp(raw), raw

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.e
        ys = [x[:, :e]]
        logdet = x.new_zeros(x.shape[0], dtype=torch.float64)
        for k in range(1, self.blocks):
            shift, s, log_s = self._shift_scale(k, x[:, : k * e])
            ys.append((x[:, k * e : (k + 1) * e] + shift) * s)
            logdet = logdet + log_s.sum(dim=(1, 2, 3), dtype=torch.float64)
        return torch.cat(ys, dim=1), logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        e = self.e
        xs = [y[:, :e]]
        for k in range(1, self.blocks):
            shift, s, _ = self._shift_scale(k, torch.cat(xs, dim=1) if k > 1 else xs[0])
            xs.append(y[:, k * e : (k + 1) * e] / s - shift)
        return torch.cat(xs, dim=1)


# --------------------------------------------------------------------------------------------
# Multi-scale model (docs/model.md, docs/layers/squeeze_split.md)
# --------------------------------------------------------------------------------------------


class Split(nn.Module):
    """Keep ``x[:, :C/2]``, standardise ``z2 = x[:, C/2:]`` with the 3x3 prior of the kept half
    (``mean = out[:, 0::2]``, ``logs = out[:, 1::2]``); log-det ``-sum(logs)``."""

    def __init__(self, C: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.prior = _Holder(dtype, weight=(C, C // 2, 3, 3), bias=(C,))

    def _mean_logs(self, h: torch.Tensor):
        out = F.conv2d(h, self.prior.weight, self.prior.bias, padding=1)
        return out[:, 0::2], out[:, 1::2]

    def forward(self, x: torch.Tensor):
        c = x.shape[1] // 2
        h, z2 = x[:, :c], x[:, c:]
        mean, logs = self._mean_logs(h)
        eps = (z2 - mean) * torch.exp(-logs)
        return h, eps, -logs.sum(dim=(1, 2, 3), dtype=torch.float64)

    def inverse(self, h: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mean, logs = self._mean_logs(h)
        return torch.cat([h, eps * torch.exp(logs) + mean], dim=1)


class Step(nn.Module):
    """actnorm -> invertible conv (``conv1x1`` then ``conv`` for "1x1+emerging" and
    "1x1+cinc") -> coupling."""

    def __init__(self, cfg: FlowConfig, C: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.actnorm = ActNorm(C, dtype)
        k, kind = cfg.kernel_size, cfg.conv
        names = ["actnorm"]
        if kind.startswith("1x1+"):
            self.conv1x1 = Conv1x1(C, cfg.lu, dtype)
            names.append("conv1x1")
            kind = kind[len("1x1+") :]
        if kind == "cinc":
            self.conv = CInCConv(C, k, cfg.cinc_corner, cfg.guard, dtype)
        elif kind == "emerging":
            self.conv = EmergingConv(C, k, cfg.guard, dtype)
        elif kind == "periodic":
            self.conv = PeriodicConv(C, k, cfg.guard, dtype)
        elif kind == "1x1":
            self.conv = Conv1x1(C, cfg.lu, dtype)
        else:  # reverse / shuffle: the permutation is a buffer
            self.conv = ChannelPermutation(C)
        blocks = 4 if cfg.coupling == "quad" else 2
        scale = None if cfg.coupling == "additive" else cfg.scale
        self.coupling = BlockCoupling(C, cfg.width, blocks, scale, dtype)
        self.names = names + ["conv", "coupling"]

    def forward(self, x: torch.Tensor, record: dict | None = None, path: str = ""):
        logdet = x.new_zeros(x.shape[0], dtype=torch.float64)
        for name in self.names:
            x, ld = getattr(self, name)(x)
            logdet = logdet + ld
            if record is not None:
                record[f"forward/{path}/{name}/output"] = x
                record[f"forward/{path}/{name}/logdet"] = ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for name in reversed(self.names):
            y = getattr(self, name).inverse(y)
        return y


class Level(nn.Module):
    """The ``depth`` steps of one level (``step0`` ...) and, below the top, its ``split``."""

    def __init__(self, cfg: FlowConfig, C: int, split: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.depth = cfg.depth
        for d in range(cfg.depth):
            setattr(self, f"step{d}", Step(cfg, C, dtype))
        if split:
            self.split = Split(C, dtype)


class TorchFlow(nn.Module):
    """flownp's :class:`~flownp.model.FlowModel` in PyTorch: ``x (N, C, H, W) -> (z (N, D),
    logdet (N,) float64)``; ``z`` is the concatenation of the standardised latents, each
    flattened in NHWC order (docs/model.md)."""

    def __init__(self, config: FlowConfig, dtype: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.dtype = _TORCH_DTYPES[dtype or config.dtype]
        shapes = config.level_shapes()
        for l, (_, _, c) in enumerate(shapes):
            setattr(self, f"level{l}", Level(config, c, l < config.levels - 1, self.dtype))
        H, W, C = shapes[-1]
        K = config.num_classes
        emb = (K, C, H, W) if config.label_prior == "position" else (K, C)
        label = {} if not K else {"label_mean": emb, "label_logs": emb}
        self.prior = _Holder(self.dtype, mean=(C, H, W), logs=(C, H, W), **label)
        if config.weight_y > 0:  # the linear classifier on the mean of the top latent
            self.classifier = _Holder(self.dtype, weight=(C, K), bias=(K,))
        self.logits: torch.Tensor | None = None

    def prior_mean_logs(self, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top prior's ``(mean, logs)``: ``(C, H, W)``, or ``(N, C, H, W)`` given labels
        ``y`` of a class-conditional model (the label rows broadcast over the positions;
        docs/layers/conditional.md)."""
        mean, logs = self.prior.mean, self.prior.logs
        if y is None:
            return mean, logs
        if self.config.label_prior == "position":  # one (C, H, W) offset per class
            return mean + self.prior.label_mean[y], logs + self.prior.label_logs[y]
        return (
            mean + self.prior.label_mean[y][:, :, None, None],
            logs + self.prior.label_logs[y][:, :, None, None],
        )

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        shapes = self.config.level_shapes()
        return [(h, w, c // 2) for (h, w, c) in shapes[:-1]] + [shapes[-1]]

    def forward(self, x: torch.Tensor, record: dict | None = None, y: Any = None):
        """``x (N, C, H, W) -> (z (N, H W C), logdet (N,) float64)``. ``record``: a dict that
        receives every node's output and log-det under the reference-vector names
        (``forward/level0/step0/conv/output``, ...; tensors in this port's layout). ``y``:
        the labels (int64 ``(N,)``) of a class-conditional model; a model with a classifier
        also sets :attr:`logits`."""
        h, pieces, logdet = self.forward_top(x, record)
        N = h.shape[0]
        mean, logs = self.prior_mean_logs(y)
        eps = (h - mean) * torch.exp(-logs)
        ld = -logs.to(torch.float64).sum(dim=(-3, -2, -1)).expand(N)
        logdet = logdet + ld
        pieces.append(eps.permute(0, 2, 3, 1).reshape(N, -1))
        if record is not None:
            record["forward/prior/output"] = eps
            record["forward/prior/logdet"] = ld
        self.logits = None
        if hasattr(self, "classifier"):
            self.logits = h.mean(dim=(2, 3)) @ self.classifier.weight + self.classifier.bias
            if record is not None:
                record["forward/classifier/logits"] = self.logits
        return torch.cat(pieces, dim=1), logdet

    def class_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x | y = k)`` for every class, ``(N, K)`` float64: the flow once, the top
        latent scored under each class's prior."""
        h, pieces, logdet = self.forward_top(x)
        base = logdet
        for p in pieces:
            base = base - 0.5 * (p.to(torch.float64) ** 2).sum(dim=1) - 0.5 * p.shape[1] * LOG_2PI
        N, D_top = h.shape[0], h[0].numel()
        out = []
        for k in range(self.config.num_classes):
            mean, logs = self.prior_mean_logs(torch.full((N,), k, dtype=torch.int64))
            e = ((h - mean) * torch.exp(-logs)).reshape(N, -1).to(torch.float64)
            ld = -logs.to(torch.float64).sum(dim=(-3, -2, -1))
            out.append(base - 0.5 * (e**2).sum(dim=1) - 0.5 * D_top * LOG_2PI + ld)
        return torch.stack(out, dim=1)

    def forward_top(self, x: torch.Tensor, record: dict | None = None):
        """Every node below the top prior: ``(h (N, C, H, W), split pieces, logdet)``."""
        H, W, C = self.config.image_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise ValueError(
                f"TorchFlow: x must have shape (N, {C}, {H}, {W}), got {tuple(x.shape)}"
            )
        N = x.shape[0]
        logdet = x.new_zeros(N, dtype=torch.float64)
        pieces = []
        for l in range(self.config.levels):
            level = getattr(self, f"level{l}")
            x = F.pixel_unshuffle(x, 2)  # y[4c + 2a + b] = x[c, 2i + a, 2j + b]
            if record is not None:
                record[f"forward/level{l}/squeeze/output"] = x
                record[f"forward/level{l}/squeeze/logdet"] = x.new_zeros(N, dtype=torch.float64)
            for d in range(level.depth):
                x, ld = getattr(level, f"step{d}")(x, record, f"level{l}/step{d}")
                logdet = logdet + ld
            if hasattr(level, "split"):
                x, eps, ld = level.split(x)
                logdet = logdet + ld
                pieces.append(eps.permute(0, 2, 3, 1).reshape(N, -1))
                if record is not None:
                    record.update(
                        {
                            f"forward/level{l}/split/h": x,
                            f"forward/level{l}/split/eps": eps,
                            f"forward/level{l}/split/logdet": ld,
                        }
                    )
        return x, pieces, logdet

    @torch.no_grad()
    def inverse(self, z: torch.Tensor, y: Any = None) -> torch.Tensor:
        """``z (N, D) -> x (N, C, H, W)``, the exact inverse of :meth:`forward` (with the
        same labels ``y``)."""
        if z.ndim != 2 or z.shape[1] != self.config.num_dims:
            raise ValueError(
                f"TorchFlow: z must have shape (N, {self.config.num_dims}), got {tuple(z.shape)}"
            )
        N = z.shape[0]
        eps, start = [], 0
        for h, w, c in self.latent_shapes():
            size = h * w * c
            eps.append(z[:, start : start + size].reshape(N, h, w, c).permute(0, 3, 1, 2))
            start += size
        mean, logs = self.prior_mean_logs(y)
        x = eps[-1] * torch.exp(logs) + mean
        for l in reversed(range(self.config.levels)):
            level = getattr(self, f"level{l}")
            if hasattr(level, "split"):
                x = level.split.inverse(x, eps[l])
            for d in reversed(range(level.depth)):
                x = getattr(level, f"step{d}").inverse(x)
            x = F.pixel_shuffle(x, 2)
        return x

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` images ``inverse(T * eps)``, ``eps ~ N(0, I)``, NCHW."""
        z = temperature * torch.randn(n, self.config.num_dims, generator=generator)
        return self.inverse(z.to(self.dtype))


def bpd_loss(
    z: torch.Tensor, logdet: torch.Tensor, n_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean bits/dim and its per-sample values (porting.md section 5), in float64, for data
    of ``n_bits`` bits per pixel (``D ln 2^N``)."""
    D = z.shape[1]
    log_p = -0.5 * (z.to(torch.float64) ** 2).sum(dim=1) - 0.5 * D * LOG_2PI + logdet
    per = (-log_p + D * n_bits * math.log(2.0)) / (D * math.log(2.0))
    return per.mean(), per


def classifier_bits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The classifier's cross-entropy in bits per sample, float64
    (docs/layers/conditional.md)."""
    return F.cross_entropy(logits.to(torch.float64), y, reduction="none") / math.log(2.0)


# --------------------------------------------------------------------------------------------
# Loading flownp's parameters, exporting gradients
# --------------------------------------------------------------------------------------------


def load_flownp_state(
    model: TorchFlow, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray]
) -> None:
    """Copy flownp's ``params`` / ``buffers`` (keys = HDF5 paths) into ``model``; every
    parameter of ``model`` must be given, and every given key must exist in ``model``."""
    own_p = dict(model.named_parameters())
    own_b = {k: v for k, v in model.named_buffers() if not k.endswith(".mask")}
    for kind, given, own in (("parameter", params, own_p), ("buffer", buffers, own_b)):
        keys = {p.replace("/", "."): p for p in given}
        missing = sorted(set(own) - set(keys))
        extra = sorted(set(keys) - set(own))
        if missing or extra:
            raise ValueError(
                f"load_flownp_state: {kind} names differ: missing {missing[:5]}, "
                f"unknown {extra[:5]}"
            )
        with torch.no_grad():
            for name, t in own.items():
                path = keys[name]
                a = to_torch_layout(path, np.asarray(given[path]))
                src = torch.from_numpy(np.array(a))  # a copy, contiguous, 0-d kept
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(
                        f"load_flownp_state: {path} has shape {tuple(a.shape)} in torch layout, "
                        f"the port expects {tuple(t.shape)}"
                    )
                t.copy_(src.to(t.dtype))


def from_flownp(flownp_model: Any, dtype: str | None = None) -> TorchFlow:
    """A :class:`TorchFlow` with the configuration and the weights of a flownp model."""
    model = TorchFlow(flownp_model.config, dtype)
    load_flownp_state(model, flownp_model.params, flownp_model.buffers)
    return model


def flownp_grads(model: TorchFlow) -> dict[str, np.ndarray]:
    """Every parameter's ``.grad`` keyed by flownp path, in flownp's layout."""
    return {
        name.replace(".", "/"): np.array(to_flownp_layout(name, p.grad.detach().numpy()))
        for name, p in model.named_parameters()
    }


def flownp_params(model: TorchFlow) -> dict[str, np.ndarray]:
    """Every parameter keyed by flownp path, in flownp's layout (copies)."""
    return {
        name.replace(".", "/"): np.array(to_flownp_layout(name, p.detach().numpy()))
        for name, p in model.named_parameters()
    }


# --------------------------------------------------------------------------------------------
# The reference vectors (docs/reference-vectors.md) computed by this port
# --------------------------------------------------------------------------------------------


class Adamax:
    """Adamax as flownp's (docs/porting.md): ``m = b1 m + (1 - b1) g``, ``u = max(b2 u, |g|)``,
    ``p -= lr / (1 - b1^t) * m / (u + eps)``. ``torch.optim.Adamax`` adds ``eps`` inside the
    maximum (``max(b2 u, |g| + eps)``), which differs by ``O(eps / |g|)``, so it is written
    out here."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps, self.t = lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.u = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, u in zip(self.params, self.m, self.u, strict=True):
            m.mul_(b1).add_((1.0 - b1) * p.grad)
            torch.maximum(b2 * u, p.grad.abs(), out=u)
            p.sub_(self.lr / (1.0 - b1**self.t) * m / (u + self.eps))


def compute_reference(
    model: TorchFlow,
    x_nhwc: np.ndarray,
    z_sample: np.ndarray,
    adam: dict[str, Any],
    optimizer: str = "adam",
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every computed tensor of a reference group, in flownp's layout (NHWC, HWIO);
    ``optimizer`` (the group's ``optimizer`` attribute) names the optimizer section;
    ``labels``: the group's ``input/y`` (class-conditional models)."""
    cfg = model.config
    out: dict[str, np.ndarray] = {}
    x = nchw(x_nhwc).to(model.dtype).requires_grad_(True)
    y = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
    record: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model(x.detach(), record, y)
    for k, v in record.items():
        out[k] = nhwc(v) if v.ndim == 4 else v.detach().numpy()
    hp = dict(lr=adam["lr"], betas=tuple(adam["betas"]), eps=adam["eps"])
    opt = Adamax(model.parameters(), **hp) if optimizer == "adamax" else None
    opt = opt or torch.optim.Adam(model.parameters(), **hp)
    losses = []
    for step in range(adam["steps"] + 1):
        opt.zero_grad(set_to_none=False)
        xs = x if step == 0 else x.detach()
        z, logdet = model(xs, None, y)
        logits = model.logits
        if step == 0:
            z.retain_grad()
            logdet.retain_grad()
            if logits is not None:
                logits.retain_grad()
        bpd, per = bpd_loss(z, logdet, cfg.n_bits)
        loss = bpd
        if logits is not None:
            bits_y = classifier_bits(logits, y)
            loss = bpd + cfg.weight_y * bits_y.mean()
        losses.append(float(loss.detach()))
        if step == adam["steps"]:
            break
        loss.backward()
        if step == 0:
            out["latent/z"] = z.detach().numpy()
            out["latent/logdet"] = logdet.detach().numpy()
            out["loss/bpd"] = np.asarray(float(bpd.detach()))
            out["loss/bpd_per_sample"] = per.detach().numpy()
            out["loss/dz"] = z.grad.numpy()
            out["loss/dlogdet"] = logdet.grad.numpy()
            if logits is not None:
                out["loss/bits_y"] = np.asarray(float(bits_y.mean().detach()))
                out["loss/bits_y_per_sample"] = bits_y.detach().numpy()
                out["loss/dlogits"] = logits.grad.numpy()
                out["loss/total"] = np.asarray(float(loss.detach()))
            out["grads/x"] = nhwc(x.grad)
            out.update({f"grads/params/{k}": v for k, v in flownp_grads(model).items()})
            out["inverse/x"] = nhwc(model.inverse(z.detach(), y))
            z_s = torch.from_numpy(z_sample).to(model.dtype)
            out["sample/x"] = nhwc(model.inverse(z_s, y))
            if cfg.num_classes:
                with torch.no_grad():
                    out["classes/log_p"] = model.class_log_probs(x.detach()).numpy()
        opt.step()
    out[f"{optimizer}/loss"] = np.asarray(losses)
    out.update({f"{optimizer}/params/{k}": v for k, v in flownp_params(model).items()})
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def port_reference(
    ref_path: str | None = None, dtype: str = "float64"
) -> dict[str, dict[str, np.ndarray]]:
    """Run this port on every model of the reference file: a fresh :class:`TorchFlow` of the
    file's configuration, weights loaded from ``model/``, then :func:`compute_reference`."""
    import json

    import h5py

    from verification import reference

    ref_path = ref_path or reference.DEFAULT_PATH
    res = {}
    with h5py.File(ref_path, "r") as f:
        adam = json.loads(f.attrs["adam"])
        for name in json.loads(f.attrs["models"]):
            g = f[name]
            cfg = FlowConfig.from_dict(json.loads(g.attrs["config"]))
            model = TorchFlow(cfg, dtype)
            params = {p: a for p, a in reference._datasets(g["model/params"]).items()}
            buffers = {p: a for p, a in reference._datasets(g["model/buffers"]).items()}
            load_flownp_state(model, params, buffers)
            optimizer = g.attrs.get("optimizer", "adam")
            x, z = g["input/x"][()], g["sample/z"][()]
            y = g["input/y"][()] if "input/y" in g else None
            res[name] = compute_reference(model, x, z, adam, optimizer, y)
    return res


def write_port_file(path: str, vectors: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``{model: {path: array}}`` as a port file for ``flownp check-reference``."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, tensors in vectors.items():
            g = f.create_group(name)
            for k, v in tensors.items():
                g[k] = v


# --------------------------------------------------------------------------------------------
# Direct comparison with a flownp model (any configuration)
# --------------------------------------------------------------------------------------------


def compare_with_flownp(flownp_model: Any, x_nhwc: np.ndarray) -> dict[str, float]:
    """Largest relative differences ``max|port - flownp| / max|flownp|`` (per tensor; the
    maximum over the tensors of each group) between flownp and this port, same weights,
    float64: every node's output and log-det (``forward``), the latent, the log-det, the loss,
    the input and parameter gradients (``grads``), the inverse of flownp's latent
    (``inverse``) and of a fresh latent (``sample``). A class-conditional model runs given the
    labels ``n mod K`` (its loss with the classifier term when it has one) and adds the
    scores of every class (``classes``)."""
    from flownp.model import bpd_loss as np_bpd_loss
    from flownp.model import classifier_loss as np_classifier_loss
    from verification.reference import forward_intermediates

    fm = flownp_model
    cfg = fm.config
    tm = from_flownp(fm, "float64")
    N = len(x_nhwc)
    y = np.arange(N) % cfg.num_classes if cfg.num_classes else None
    ty = None if y is None else torch.from_numpy(y.astype(np.int64))
    ref_fwd = forward_intermediates(fm, x_nhwc, y)
    fm.zero_grad()
    z, logdet = fm.forward(x_nhwc, y)
    loss, dz, dlogdet = np_bpd_loss(z, logdet, n_bits=cfg.n_bits)
    dlogits = None
    if fm.classifier is not None:
        loss_y, _, _, dlogits = np_classifier_loss(fm.logits, y, cfg.weight_y)
        loss += loss_y
    dx = fm.backward(dz, dlogdet, dlogits)
    z_s = np.random.default_rng(1).standard_normal(z.shape) * 0.5
    x_s = fm.inverse(z_s, y)

    x = nchw(x_nhwc).requires_grad_(True)
    record: dict[str, torch.Tensor] = {}
    tz, tld = tm(x, record, ty)
    tloss, _ = bpd_loss(tz, tld, cfg.n_bits)
    if tm.logits is not None:
        tloss = tloss + cfg.weight_y * classifier_bits(tm.logits, ty).mean()
    tloss.backward()

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        scale = float(np.max(np.abs(a)))
        return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)

    def diff(a: np.ndarray, t: torch.Tensor) -> float:
        return rel(np.asarray(a), nhwc(t) if t.ndim == 4 else t.detach().numpy())

    tg = flownp_grads(tm)
    out = {
        "forward": max(diff(v, record[k]) for k, v in ref_fwd.items()),
        "latent": diff(z, tz),
        "logdet": diff(logdet, tld),
        "loss": rel(np.asarray(loss), tloss.detach().numpy()),
        "grads": max([diff(dx, x.grad)] + [rel(g, tg[k]) for k, g in fm.grads.items()]),
        "inverse": diff(fm.inverse(z, y), tm.inverse(torch.from_numpy(z), ty)),
        "sample": diff(x_s, tm.inverse(torch.from_numpy(z_s), ty)),
    }
    if cfg.num_classes:
        with torch.no_grad():
            out["classes"] = diff(fm.class_log_probs(x_nhwc), tm.class_log_probs(x.detach()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verification.torch_port",
        description="Run the PyTorch port on the reference vectors and write a port file "
        "for `flownp check-reference`.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reference", help="write the port's reference tensors to OUT")
    p.add_argument("out")
    p.add_argument("--ref", default=None, help="reference file (default: the shipped one)")
    p.add_argument("--dtype", default="float64", choices=sorted(_TORCH_DTYPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    write_port_file(args.out, port_reference(args.ref, args.dtype))
    print(f"wrote {args.out}; check it with: flownp check-reference {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
