"""Input checks of the public kernels: shapes, dtypes and memory layout, with errors that name
the kernel, the argument and the shapes involved. The compiled loops behind the kernels
assume what these checks establish (C-contiguous arrays of one float dtype)."""

from __future__ import annotations

from typing import Any

import numpy as np

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(fn: str, name: str, a: Any, ndim: int) -> np.ndarray:
    """``a`` as a C-contiguous float32/float64 array of ``ndim`` dimensions (a copy only if
    it is not contiguous); ValueError otherwise."""
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be a {ndim}-D array, got shape {a.shape}")
    if a.dtype not in FLOATS:
        raise ValueError(f"{fn}: {name} must be float32 or float64, got {a.dtype}")
    return np.ascontiguousarray(a)


def kernel_for(fn: str, K: Any, x: np.ndarray, *, c_axis: int = 2, xname: str = "x") -> np.ndarray:
    """A ``(k, k, C_in, C_out)`` kernel whose axis ``c_axis`` matches the channels of ``x``,
    cast to ``x.dtype``."""
    K = np.asarray(K)
    if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[0] < 1:
        raise ValueError(f"{fn}: K must have shape (k, k, C_in, C_out), got {K.shape}")
    if K.dtype not in FLOATS:
        raise ValueError(f"{fn}: K must be float32 or float64, got {K.dtype}")
    if K.shape[c_axis] != x.shape[3]:
        role = "input" if c_axis == 2 else "output"
        raise ValueError(
            f"{fn}: {xname} has {x.shape[3]} channels but K has {K.shape[c_axis]} {role} "
            f"channels ({xname} {x.shape}, K {K.shape})"
        )
    return np.ascontiguousarray(K, dtype=x.dtype)


def same_pixels(fn: str, a: np.ndarray, b: np.ndarray, an: str, bn: str) -> None:
    """``a`` and ``b`` are (N, H, W, .) arrays with the same N, H, W and dtype."""
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"{fn}: {an} {a.shape} and {bn} {b.shape} must have the same N, H, W")
    if a.dtype != b.dtype:
        raise ValueError(f"{fn}: {an} is {a.dtype} but {bn} is {b.dtype}")


def vector(fn: str, name: str, v: Any, n: int, dtype: np.dtype) -> np.ndarray:
    """A length-``n`` vector, cast to ``dtype``."""
    v = np.asarray(v)
    if v.shape != (n,):
        raise ValueError(f"{fn}: {name} must have shape ({n},), got {v.shape}")
    return np.ascontiguousarray(v, dtype=dtype)


def corner_factors(
    fn: str, L: Any, U: Any, perm: Any, C: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``A = P L U`` factors of a C x C corner: L, U (C, C) float, ``perm`` a permutation."""
    L, U = np.asarray(L), np.asarray(U)
    for name, m in (("L", L), ("U", U)):
        if m.shape != (C, C):
            raise ValueError(f"{fn}: {name} must have shape ({C}, {C}), got {m.shape}")
        if m.dtype not in FLOATS:
            raise ValueError(f"{fn}: {name} must be float32 or float64, got {m.dtype}")
    p = np.asarray(perm)
    if p.shape != (C,) or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(
            f"{fn}: perm must be an integer array of shape ({C},), got {p.dtype} {p.shape}"
        )
    if not np.array_equal(np.sort(p), np.arange(C)):
        raise ValueError(f"{fn}: perm must be a permutation of 0..{C - 1}")
    return L, U, p.astype(np.int64)
