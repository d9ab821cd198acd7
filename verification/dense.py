r"""Dense matrices of padded convolutions, built from the paper's definitions by index loops.

This module is the independent side of every explicit-matrix check: it shares no code with
:mod:`flownp.kernels.conv` (no shifted slices, no ``da = k-1-a`` offsets, no Numba), it writes
each matrix entry straight from the paper's Definitions 1-3 (Section 3.1):

* Definition 2 (padding): ``Ihat[i, j, c] = I[i - t, j - l, c]`` inside the image, 0 outside,
  for a ``(t, b, l, r)`` padding.
* Definition 1 (convolution, no flip)::

      Y[i, j, o] = sum_{a, b < k} sum_c Ihat[i + a, j + b, c] K[a, b, c, o]          (Eq. 1)

  with output size ``(H + t + b - k + 1, W + l + r - k + 1)``.
* Vectorisation (the paper's basis ``I_{i,j,c} = vec(I)_{c + C j + C W i}``; the paper
  prints ``C H i``, which is the same for the square images it uses): row, column, channel,
  i.e. exactly NumPy's ``x.reshape(-1)`` of an ``(H, W, C)`` image.
* Definition 3: ``M[row(i, j, o), col(p, q, c)] = K[a, b, c, o]`` where ``(p, q) = (i + a - t,
  j + b - l)``; every (output pixel, input pixel) pair is reached by at most one tap, so each
  entry is an exact copy of one kernel weight (no arithmetic, no round-off).

Paddings by name::

    "top_left"  (t, b, l, r) = (k-1, 0, k-1, 0)          CInC (Figure 1 b, c); output H x W
    "same"      (t, b, l, r) = (p, k-1-p, p, k-1-p),  p = (k-1) // 2
                symmetric ("standard") padding (Figure 1 a); for even k the extra row/column
                goes to the bottom/right, as in TensorFlow's "SAME"

``corner="masked"`` zeroes the entries of the *current-pixel* tap that read a later channel
(``K[a0, b0, c, o] = 0`` for ``c > o``, where ``(a0, b0)`` is the tap reading pixel ``(i, j)``:
``(t, l)``, i.e. ``(k-1, k-1)`` for top-left padding), which makes the top-left matrix lower
triangular (Figure 1 c). ``corner="full"`` uses the kernel as given.

Also here: :func:`exact_det`, a fraction-free (Bareiss) determinant in Python integers, so
that "the determinant is zero" and ``det M = det(A)^(H W)`` can be checked *exactly* on
integer kernels, with no tolerance at all.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Padding = Literal["top_left", "same"] | tuple[int, int, int, int]
PADDINGS = ("top_left", "same")
CORNERS = ("full", "masked")


def padding_amounts(k: int, padding: Padding) -> tuple[int, int, int, int]:
    """``(t, b, l, r)`` of a named padding (see module docstring) or of an explicit 4-tuple."""
    if isinstance(padding, str):
        if padding == "top_left":
            return (k - 1, 0, k - 1, 0)
        if padding == "same":
            p = (k - 1) // 2
            return (p, k - 1 - p, p, k - 1 - p)
        raise ValueError(f"padding must be one of {PADDINGS} or (t, b, l, r), got {padding!r}")
    t, b, l, r = (int(v) for v in padding)
    if min(t, b, l, r) < 0:
        raise ValueError(f"padding amounts must be >= 0, got {padding!r}")
    return (t, b, l, r)


def vec_index(i: int, j: int, c: int, W: int, C: int) -> int:
    """Position of entry ``(i, j, c)`` of an ``(H, W, C)`` image in the paper's vector."""
    return c + C * j + C * W * i


def masked_kernel(K: np.ndarray, padding: Padding = "top_left") -> np.ndarray:
    """Copy of ``K`` with the current-pixel tap's entries ``c > o`` set to zero."""
    k = K.shape[0]
    t, _, l, _ = padding_amounts(k, padding)
    K = np.array(K, copy=True)
    C, Co = K.shape[2], K.shape[3]
    for c in range(C):
        for o in range(Co):
            if c > o:
                K[t, l, c, o] = 0
    return K


def conv_matrix(
    K: np.ndarray,
    H: int,
    W: int,
    padding: Padding = "top_left",
    corner: Literal["full", "masked"] = "full",
) -> np.ndarray:
    """Dense matrix ``M`` with ``vec(Y) = M vec(X)`` for one ``(H, W, C)`` image (Definition 3).

    Parameters
    ----------
    K : (k, k, C, Co) array
        Kernel in the paper's layout ``K[a, b, c_in, c_out]`` (Definition 1).
    H, W : int
        Input image size.
    padding : "top_left", "same" or (t, b, l, r)
    corner : "full" or "masked"
        ``"masked"`` applies :func:`masked_kernel` first.

    Returns
    -------
    M : (Ho * Wo * Co, H * W * C) array of K's dtype
        Rows and columns in the paper's vectorisation (row, column, channel).
    """
    K = np.asarray(K)
    if K.ndim != 4 or K.shape[0] != K.shape[1]:
        raise ValueError(f"conv_matrix: kernel must be (k, k, C_in, C_out), got {K.shape}")
    if corner not in CORNERS:
        raise ValueError(f"conv_matrix: corner must be one of {CORNERS}, got {corner!r}")
    k, _, C, Co = K.shape
    t, bottom, l, right = padding_amounts(k, padding)
    if corner == "masked":
        K = masked_kernel(K, (t, bottom, l, right))
    Ho, Wo = H + t + bottom - k + 1, W + l + right - k + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv_matrix: empty output for H, W = {H}, {W}, k = {k}")
    dtype = K.dtype if K.dtype.kind == "f" else np.float64
    M = np.zeros((Ho * Wo * Co, H * W * C), dtype=dtype)
    for i in range(Ho):
        for j in range(Wo):
            for o in range(Co):
                row = vec_index(i, j, o, Wo, Co)
                for a in range(k):
                    for b in range(k):
                        p, q = i + a - t, j + b - l  # Ihat[i + a, j + b] = I[p, q]
                        if not (0 <= p < H and 0 <= q < W):
                            continue  # a zero of the padding
                        for c in range(C):
                            M[row, vec_index(p, q, c, W, C)] = K[a, b, c, o]
    return M


def circulant_matrix(K: np.ndarray, H: int, W: int) -> np.ndarray:
    """Dense matrix of the *periodic* (circular) convolution with a centred ``(k, k, C, Co)``
    kernel, ``p = (k - 1) // 2``: the padding wraps around the image, so tap ``(a, b)`` of
    output pixel ``(i, j)`` reads input pixel ``((i + a - p) mod H, (j + b - p) mod W)``::

        Y[i, j, o] = sum_{a,b<k} sum_c I[(i + a - p) mod H, (j + b - p) mod W, c] K[a, b, c, o]

    Rows and columns in the paper's vectorisation. When ``k > H`` or ``k > W`` two taps can
    reach the same input pixel; their weights add up (the only arithmetic here).
    """
    K = np.asarray(K)
    if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[0] % 2 == 0:
        raise ValueError(f"circulant_matrix: kernel must be (k, k, C_in, C_out), k odd: {K.shape}")
    k, _, C, Co = K.shape
    p = (k - 1) // 2
    dtype = K.dtype if K.dtype.kind == "f" else np.float64
    M = np.zeros((H * W * Co, H * W * C), dtype=dtype)
    for i in range(H):
        for j in range(W):
            for o in range(Co):
                row = vec_index(i, j, o, W, Co)
                for a in range(k):
                    for b in range(k):
                        q, r = (i + a - p) % H, (j + b - p) % W
                        for c in range(C):
                            M[row, vec_index(q, r, c, W, C)] += K[a, b, c, o]
    return M


def tap_map(k: int, H: int, W: int, padding: Padding = "top_left") -> np.ndarray:
    """``(H W, H W)`` integer array: the tap index ``a * k + b`` that links output pixel
    ``(i, j)`` (row) to input pixel ``(p, q)`` (column), ``-1`` where no tap does. Used to
    colour Figure 1 (same colour = same spatial tap, whatever the channels)."""
    t, bottom, l, right = padding_amounts(k, padding)
    T = np.full((H * W, H * W), -1, dtype=np.int64)
    for i in range(H + t + bottom - k + 1):
        for j in range(W + l + right - k + 1):
            for a in range(k):
                for b in range(k):
                    p, q = i + a - t, j + b - l
                    if 0 <= p < H and 0 <= q < W:
                        T[i * W + j, p * W + q] = a * k + b
    return T


def diagonal_blocks(M: np.ndarray, C: int) -> np.ndarray:
    """The ``(n, C, C)`` diagonal blocks of a square matrix with ``n`` pixels of ``C`` channels."""
    n = M.shape[0] // C
    return np.stack([M[p * C : (p + 1) * C, p * C : (p + 1) * C] for p in range(n)])


def above_block_diagonal(M: np.ndarray, C: int) -> np.ndarray:
    """Boolean mask of the entries strictly above the ``C x C`` block diagonal (pixel of the
    column later than the pixel of the row)."""
    pix = np.arange(M.shape[0]) // C
    return pix[None, :] > pix[:, None]


def exact_det(M: np.ndarray) -> int:
    """Exact determinant of an integer-valued matrix (fraction-free Bareiss elimination in
    Python integers). Raises ``ValueError`` if an entry is not an integer."""
    A = np.asarray(M)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"exact_det: square matrix expected, got shape {A.shape}")
    if not np.all(np.mod(A, 1) == 0):
        raise ValueError("exact_det: the matrix has non-integer entries")
    a = [[int(v) for v in row] for row in A]
    n = len(a)
    sign, prev = 1, 1
    for p in range(n - 1):
        if a[p][p] == 0:  # pivot: swap in a row with a nonzero entry in column p
            swap = next((r for r in range(p + 1, n) if a[r][p] != 0), None)
            if swap is None:
                return 0
            a[p], a[swap] = a[swap], a[p]
            sign = -sign
        piv = a[p][p]
        for r in range(p + 1, n):
            arp = a[r][p]
            row_r, row_p = a[r], a[p]
            for c in range(p + 1, n):
                row_r[c] = (row_r[c] * piv - arp * row_p[c]) // prev  # exact division
            row_r[p] = 0
        prev = piv
    return sign * a[n - 1][n - 1] if n else 1


# --------------------------------------------------------------------------------------------
# Rounding-error constants (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1)
# --------------------------------------------------------------------------------------------


def unit_roundoff(dtype) -> float:
    """``u = eps / 2``: the relative error of one correctly rounded operation in ``dtype``."""
    return float(np.finfo(dtype).eps) / 2


def gamma(n: int, dtype) -> float:
    """``gamma_n = n u / (1 - n u)``: a sum of ``n`` rounded operations has relative error at
    most ``gamma_n`` (in any summation order, so it also covers Numba's reassociation)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma: n u = {nu} >= 1, no bound")
    return nu / (1 - nu)


def refined_solve(M: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``M^{-1} Y`` (columns) to nearly full float64 accuracy: LAPACK solve plus one step of
    iterative refinement with the residual in extended precision (``np.longdouble``), so it
    can serve as the exact solution when checking float64 solvers."""
    M64 = np.asarray(M, dtype=np.float64)
    X = np.linalg.solve(M64, np.asarray(Y, dtype=np.float64))
    R = np.asarray(Y, dtype=np.longdouble) - np.asarray(M, dtype=np.longdouble) @ X
    return X + np.linalg.solve(M64, R.astype(np.float64))


def solve_error_bound(
    M: np.ndarray,
    k: int,
    C: int,
    dtype,
    y_norm: float | np.ndarray,
    x_norm: float | np.ndarray,
    corner_factor: float = 1.0,
) -> float | np.ndarray:
    """Normwise bound on ``||x_hat - M^{-1} y||_inf`` for the inverse of a top-left padded
    convolution computed pixel by pixel in ``dtype`` (any order, any summation order).

    Per pixel a solver forms the residual ``r = y - sum_{non-corner taps} K^T x`` from
    ``(k^2 - 1) C`` products (error ``gamma_{(k^2-1)C+1} (|y| + |M_off| |x|)``) and then
    solves ``A x = r`` by substitution with the factors ``P L U`` or by multiplying with a
    precomputed ``A^{-1}`` (backward error ``gamma_{2C+3} * corner_factor * ||A|| ||x||`` with
    ``corner_factor = max(|| |P||L||U| || / ||A||, kappa_inf(A))``, covering both; the +3
    covers a division done as a multiplication by the reciprocal and the rounding of the
    precomputed inverse to ``dtype``). With ``gamma_a + gamma_b <= gamma_{a+b}`` the normwise
    residual is at most ``eta = gamma_n * corner_factor * (||y|| + ||M|| ||x_hat||)``,
    ``n = (k^2 + 1) C + 4``, and ``||x_hat - x|| <= ||M^{-1}|| eta`` (first order in ``u``).
    ``y_norm`` and ``x_norm`` (``||y||_inf``, ``||x_hat||_inf`` of one image) may be arrays of
    per-sample norms; the bound is then per sample.
    """
    M64 = np.asarray(M, dtype=np.float64)
    n = (k * k + 1) * C + 4
    norm_m = float(np.abs(M64).sum(axis=1).max())
    norm_minv = float(np.abs(np.linalg.inv(M64)).sum(axis=1).max())
    return norm_minv * gamma(n, dtype) * corner_factor * (np.asarray(y_norm) + norm_m * x_norm)


def corner_factor(A: np.ndarray, LU_abs: np.ndarray | None = None) -> float:
    """``max(|| |P||L||U| ||_inf / ||A||_inf, kappa_inf(A))`` for :func:`solve_error_bound`."""
    A = np.asarray(A, dtype=np.float64)
    norm_a = float(np.abs(A).sum(axis=1).max())
    kappa = norm_a * float(np.abs(np.linalg.inv(A)).sum(axis=1).max())
    growth = 1.0 if LU_abs is None else float(np.abs(LU_abs).sum(axis=1).max()) / norm_a
    return max(growth, kappa)
