"""CInCConv (paper Section 3.1): forward, log-determinant and inverse against the explicit
matrix of :mod:`verification.dense`, round trips, gradients by central finite differences,
and property tests of "invertible exactly when the corner weights are nonzero".

Tolerances are either fixed ones (round trips 1e-10 in float64 on well-conditioned kernels)
or rounding-error bounds derived from ``u = eps / 2`` of the dtype, the number of terms and
the conditioning of the dense matrix (:func:`verification.dense.solve_error_bound`).
"""

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flownp import NonFiniteError, SingularKernelError
from flownp.layers import CInCConv
from flownp.testing import check_layer_gradients
from verification.dense import (
    conv_matrix,
    corner_factor,
    gamma,
    refined_solve,
    solve_error_bound,
)
from verification.fixed_kernel import FixedKernelCInC

KS = [1, 2, 3, 5]
MODES = ["triangular", "unit", "lu", "fixed-masked", "fixed-full"]
METHODS = ["wavefront", "raster", "reference"]
# (N, H, W, C): batch 1 and 7, H != W, H = 1, W = 1, one pixel
SHAPES = [(1, 1, 1, 2), (7, 3, 5, 2), (2, 1, 6, 3), (1, 5, 1, 1), (1, 4, 4, 3)]


def make_layer(mode, k, C, rng, dtype=np.float64):
    """A CInCConv with random, non-trivial, well-conditioned parameters."""
    std = 0.3 / (k * np.sqrt(C))  # off-corner taps small against a corner of order 1
    if mode.startswith("fixed"):
        K = rng.normal(0.0, std, (k, k, C, C))
        if mode == "fixed-masked":
            K[k - 1, k - 1] = np.triu(K[k - 1, k - 1])  # K[.., c, o] = 0 for c > o
            idx = np.arange(C)
            K[k - 1, k - 1, idx, idx] = rng.uniform(0.5, 2.0, C) * rng.choice([-1, 1], C)
        else:
            q = np.linalg.qr(rng.standard_normal((C, C)))[0]
            K[k - 1, k - 1] = (q * rng.uniform(0.7, 1.5, C)).T
        return FixedKernelCInC(K.astype(dtype), masked=mode == "fixed-masked")
    layer = CInCConv(C, k, corner=mode, init_std=std, seed=int(rng.integers(1 << 31)), dtype=dtype)
    for name, p in layer.params.items():
        if name != "weight":
            p += rng.normal(0.0, 0.3, p.shape).astype(dtype)
    return layer


def dense(layer, H, W):
    """Dense matrix of the layer's effective kernel (float64) and its corner block A."""
    K = layer.kernel.astype(np.float64)
    k = K.shape[0]
    return conv_matrix(K, H, W, "top_left"), K[k - 1, k - 1].T


def vec(a):
    """(N, H, W, C) -> (H W C, N): the paper's vectorisation, one column per sample."""
    return a.reshape(a.shape[0], -1).T


# --------------------------------------------------------------------------------------------
# Construction and validation
# --------------------------------------------------------------------------------------------


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="channels"):
        CInCConv(0)
    with pytest.raises(ValueError, match="kernel_size"):
        CInCConv(2, 0)
    with pytest.raises(ValueError, match="corner"):
        CInCConv(2, corner="full")
    with pytest.raises(ValueError, match="corner"):  # a given kernel: verification.fixed_kernel
        CInCConv(2, corner="fixed")
    with pytest.raises(ValueError, match="solver"):
        CInCConv(2, solver="fast")
    with pytest.raises(TypeError, match="float32 or float64"):
        CInCConv(2, dtype=np.float16)


def test_fixed_kernel_validates_kernel(rng):
    K = rng.standard_normal((3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"kernel\[2,2,1,0\]"):  # c = 1 > o = 0 is masked
        FixedKernelCInC(K, masked=True)
    with pytest.raises(ValueError, match=r"\(k, k, C, C\)"):
        FixedKernelCInC(K[:, :2])
    K[2, 2] = np.triu(K[2, 2])
    K[0, 1, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        FixedKernelCInC(K)


def test_inverse_method_is_validated():
    """(Rank, channels, dtype, NaN: tests/test_layer_contract.py.)"""
    layer = CInCConv(3, 2)
    with pytest.raises(ValueError, match="method"):
        layer.inverse(np.zeros((1, 2, 2, 3)), method="magic")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_effective_kernel_masks_the_corner(mode, k, rng):
    C = 3
    layer = make_layer(mode, k, C, rng)
    K = layer.kernel
    A = K[k - 1, k - 1].T  # A[o, c]
    if layer.masked:  # output channel o reads input channels c <= o of the current pixel
        assert np.all(np.triu(A, 1) == 0)
        np.testing.assert_array_equal(np.diag(A), layer.diagonal())
    else:
        assert np.linalg.matrix_rank(A) == C
    np.testing.assert_array_equal(A, layer.corner_matrix())
    if mode == "unit":
        np.testing.assert_array_equal(np.diag(A), np.ones(C))


def test_fixed_kernel_is_exact(rng):
    K = rng.standard_normal((3, 3, 2, 2))
    K[2, 2] = np.triu(K[2, 2])
    np.testing.assert_array_equal(FixedKernelCInC(K).kernel, K)
    np.testing.assert_array_equal(FixedKernelCInC(K, masked=False).kernel, K)
    assert FixedKernelCInC(K.astype(np.float32)).dtype == np.float32


# --------------------------------------------------------------------------------------------
# Forward, logdet and inverse against the dense matrix (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_matches_dense_matrix(mode, k, shape, rng):
    N, H, W, C = shape
    layer = make_layer(mode, k, C, rng)
    x = rng.standard_normal((N, H, W, C))
    y, logdet = layer.forward(x)
    layer.clear_cache()
    M, A = dense(layer, H, W)
    # forward: y = M x, componentwise within gamma_{k^2 C} |M||x| on each side
    err = np.abs(vec(y) - M @ vec(x))
    assert np.all(err <= 2 * gamma(k * k * C, np.float64) * (np.abs(M) @ np.abs(vec(x))))
    # logdet = slogdet(M) = H W log|det A| (Lemma 1), the same for every sample
    sign, ld = np.linalg.slogdet(M)
    assert sign != 0
    assert logdet.shape == (N,) and np.all(logdet == logdet[0])
    np.testing.assert_allclose(logdet, ld, rtol=0, atol=1e-10)
    np.testing.assert_allclose(logdet[0], H * W * np.linalg.slogdet(A)[1], rtol=1e-12, atol=1e-12)
    # inverse: every method equals the dense solve, and the round trip holds to 1e-10
    Xd = scipy.linalg.solve_triangular(M, vec(y), lower=True) if layer.masked else None
    if Xd is None:  # block lower triangular (full corner): LAPACK's general solve
        Xd = scipy.linalg.solve(M, vec(y))
    for method in METHODS:
        xi = layer.inverse(y, method=method)
        assert xi.dtype == np.float64 and xi.shape == x.shape
        assert np.abs(vec(xi) - Xd).max() <= 1e-10, method
        assert np.abs(xi - x).max() <= 1e-10, method


@pytest.mark.parametrize("mode", ["triangular", "lu", "fixed-full"])
@pytest.mark.parametrize("k", [1, 3])
def test_float32_round_trip(mode, k, rng):
    """float32 round trip within its derived bound.

    Forward: each output is a sum of k^2 C products (plus, for the LU corner, the rounding of
    A = P L U itself to float32: C more terms), so ||y_hat - M x|| <= gamma_{(k^2+1)C}
    (||M|| + || |P||L||U| ||) ||x||. Inverse: :func:`solve_error_bound` (u = eps32 / 2, the
    number of terms, the conditioning of M and of the corner). The round-trip error is at most
    ||M^{-1}|| times the first plus the second; M is built from the float32 kernel values.
    """
    N, H, W, C = 3, 5, 4, 3
    layer = make_layer(mode, k, C, rng, dtype=np.float32)
    x = rng.standard_normal((N, H, W, C)).astype(np.float32)
    y, logdet = layer.forward(x)
    layer.clear_cache()
    assert y.dtype == np.float32 and logdet.dtype == np.float32
    M, A = dense(layer, H, W)
    L, U, perm = layer._corner_factors()
    P = np.eye(C)[:, perm]
    LU_abs = P @ np.abs(L.astype(np.float64)) @ np.abs(U.astype(np.float64))
    norm_m = np.abs(M).sum(1).max()
    norm_minv = np.abs(np.linalg.inv(M)).sum(1).max()
    x_norm = np.abs(x).reshape(N, -1).max(1)
    y_norm = np.abs(y).reshape(N, -1).max(1)
    fwd = norm_minv * gamma((k * k + 1) * C, np.float32) * (norm_m + np.abs(LU_abs).sum(1).max())
    phi = corner_factor(A, LU_abs)
    for method in METHODS:
        xi = layer.inverse(y, method=method)
        assert xi.dtype == np.float32
        xi_norm = np.abs(xi).reshape(N, -1).max(1)
        tol = fwd * x_norm + solve_error_bound(M, k, C, np.float32, y_norm, xi_norm, phi)
        err = np.abs(xi.astype(np.float64) - x).reshape(N, -1).max(1)
        assert np.all(err <= tol), (method, err / tol)


# --------------------------------------------------------------------------------------------
# Gradients (float64 central differences)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradients_finite_differences(mode, k, rng):
    """``backward`` against central differences of L = sum(y dy) + sum(logdet dlogdet) with
    random dy, dlogdet, for x and every parameter. The difference quotient with step 1e-6
    has error ~ u |L| / h + h^2 |L'''| ~ 1e-9 here (|L| ~ 10), hence 1e-6 relative."""
    layer = make_layer(mode, k, 3, rng)
    res = check_layer_gradients(layer, rng.standard_normal((2, 3, 4, 3)), rng)
    assert set(res.errors) == {"x", *layer.params}
    assert res.max_error < 1e-6, str(res)


@pytest.mark.parametrize("mode", ["triangular", "unit", "fixed-masked"])
def test_masked_entries_get_no_gradient(mode, rng):
    k, C = 3, 3
    layer = make_layer(mode, k, C, rng)
    y, _ = layer.forward(rng.standard_normal((2, 4, 4, C)))
    layer.zero_grad()
    layer.backward(rng.standard_normal(y.shape), rng.standard_normal(2))
    name = "kernel" if mode.startswith("fixed") else "weight"
    g = layer.grads[name][k - 1, k - 1]  # [c, o]
    assert np.all(np.tril(g, -1) == 0)  # c > o: masked
    if name == "weight":  # the diagonal lives in log_diag (or is fixed to 1)
        assert np.all(np.diag(g) == 0)


def test_float32_backward_dtypes(rng):
    layer = make_layer("triangular", 3, 2, rng, dtype=np.float32)
    x = rng.standard_normal((2, 3, 3, 2)).astype(np.float32)
    y, _ = layer.forward(x)
    dx = layer.backward(np.ones_like(y), np.ones(2, np.float32))
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.grads.values())


# --------------------------------------------------------------------------------------------
# Singular kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_singular_kernels_raise(k, rng):
    C = 3
    x = rng.standard_normal((1, 3, 4, C))
    K = rng.standard_normal((k, k, C, C))
    K[k - 1, k - 1] = np.triu(K[k - 1, k - 1])
    K[k - 1, k - 1, 1, 1] = 0.0  # a zero on the corner diagonal
    with pytest.raises(SingularKernelError, match=r"channel\(s\) \[1\].*allow_singular"):
        FixedKernelCInC(K)
    layer = FixedKernelCInC(K, allow_singular=True)
    y, logdet = layer.forward(x)  # the forward always works
    assert np.all(np.isfinite(y)) and np.all(logdet == -np.inf)
    for method in METHODS:
        with pytest.raises(SingularKernelError, match="channel"):
            layer.inverse(y, method=method)
    # full corner: rank deficient although no entry is zero
    K[k - 1, k - 1] = np.outer([1.0, -2.0, 3.0], [2.0, 1.0, -1.0])
    layer = FixedKernelCInC(K, masked=False)
    for method in METHODS:
        with pytest.raises(SingularKernelError, match="singular"):
            layer.inverse(y, method=method)
    # parameterised layers whose diagonal underflowed to exactly 0
    tri = CInCConv(C, k, corner="triangular")
    tri.params["log_diag"][1] = -1e4
    lu = CInCConv(C, k, corner="lu")
    lu.params["log_s"][0] = -1e4
    for layer in (tri, lu):
        with pytest.raises(SingularKernelError):
            layer.inverse(y)


def test_numerically_singular_kernel_raises_instead_of_returning_inf(rng):
    K = rng.normal(0.0, 0.5, (3, 3, 2, 2))
    K[2, 2] = np.triu(K[2, 2])
    K[2, 2, 0, 0] = 1e-300  # invertible, but the inverse overflows float64
    layer = FixedKernelCInC(K)
    y, _ = layer.forward(rng.standard_normal((1, 4, 4, 2)))
    for method in METHODS:
        with pytest.raises(NonFiniteError, match="overflowed"):
            layer.inverse(y, method=method)


def test_zero_corner_backward_without_logdet_is_finite(rng):
    """A zero corner has logdet -inf; with dlogdet = 0 the gradient must stay finite."""
    K = rng.standard_normal((2, 2, 2, 2))
    K[1, 1] = np.triu(K[1, 1])
    K[1, 1, 0, 0] = 0.0
    layer = FixedKernelCInC(K, allow_singular=True)
    y, _ = layer.forward(rng.standard_normal((1, 3, 3, 2)))
    layer.backward(np.ones_like(y), np.zeros(1))
    assert np.all(np.isfinite(layer.grads["kernel"]))


# --------------------------------------------------------------------------------------------
# Property tests (hypothesis)
# --------------------------------------------------------------------------------------------

#: corner diagonal values: exact zeros, tiny (numerically singular) and moderate magnitudes
TINY = (1e-300, -1e-300, 1e-30, -1e-30)
MODERATE = (1e-3, -1e-3, 0.5, -1.0, 2.0)
DTYPES_NAMES = ["float32", "float64"]
weights = st.one_of(
    st.just(0.0), st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False, width=64)
)


@st.composite
def padded_problems(draw, masked: bool):
    k = draw(st.integers(1, 3))
    C = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    N = draw(st.integers(1, 2))
    K = draw(hnp.arrays(np.float64, (k, k, C, C), elements=weights))
    seed = draw(st.integers(0, 2**32 - 1))
    if masked:
        K[k - 1, k - 1] = np.triu(K[k - 1, k - 1])
        diag = draw(st.lists(st.sampled_from((0.0, *TINY, *MODERATE)), min_size=C, max_size=C))
        K[k - 1, k - 1, np.arange(C), np.arange(C)] = diag
        singular = 0.0 in diag
        tiny = any(v in TINY for v in diag)
    else:
        rng = np.random.default_rng(seed)
        kind = draw(st.sampled_from(["zero row", "repeated row", "invertible"]))
        scale = draw(st.sampled_from((1e-30, 1e-3, 1.0, 1e3)))
        A = rng.standard_normal((C, C))
        if kind == "invertible":  # a rotation times a diagonal: condition number <= 3
            A = np.linalg.qr(A)[0] * rng.uniform(0.5, 1.5, C) * scale
        elif kind == "zero row" or C == 1:
            A[rng.integers(C)] = 0.0
        else:  # output channel o2 reads the current pixel like o1, times a power of 2
            o1, o2 = rng.choice(C, 2, replace=False)
            A[o2] = A[o1] * 2.0 ** int(rng.integers(-3, 4))
        K[k - 1, k - 1] = A.T
        singular = kind != "invertible"
        tiny = scale == 1e-30
    return K, H, W, N, seed, singular, tiny


def _check_inverse(layer, y, singular, tiny, k, C):
    """The outcome of inverse on a padded problem (shared by both property tests).

    * singular corner -> SingularKernelError, for every method;
    * tiny corner (numerically singular) -> a finite result or NonFiniteError, nothing else;
    * moderate corner -> a finite result (growth <= (1 + k^2 C / 1e-3)^(H W C) < 1e200).
    A finite result has a residual within the backward-error bound of the solvers.
    """
    N, H, W, _ = y.shape
    M, A = dense(layer, H, W)
    for method in METHODS:
        if singular:
            with pytest.raises(SingularKernelError):
                layer.inverse(y, method=method)
            continue
        try:
            x = layer.inverse(y, method=method)
        except NonFiniteError:
            assert tiny, f"{method}: overflow with a moderate corner"
            continue
        assert np.all(np.isfinite(x))
        # normwise backward error (extended precision residual, which cannot overflow here)
        X = vec(x).astype(np.longdouble)
        res = np.abs(vec(y) - M.astype(np.longdouble) @ X).max(axis=0).astype(np.float64)
        norm_m = np.abs(M).sum(1).max()
        n = (k * k + 1) * C + 4
        with np.errstate(over="ignore"):
            try:  # kappa(A) overflows for the tiniest corners: the bound is then vacuous
                phi = corner_factor(A)
            except np.linalg.LinAlgError:
                phi = np.inf
            bound = (
                gamma(n, np.float64)
                * phi
                * (np.abs(vec(y)).max(0) + norm_m * np.abs(X).max(0).astype(np.float64))
            )
        assert np.all(res <= bound), (method, res, bound)


@given(padded_problems(masked=True))
def test_property_masked_invertible_iff_corner_diagonal_nonzero(problem):
    K, H, W, N, seed, singular, tiny = problem
    k, C = K.shape[0], K.shape[2]
    rng = np.random.default_rng(seed)
    layer = FixedKernelCInC(K, masked=True, allow_singular=True)
    M, _ = dense(layer, H, W)
    d = np.diag(K[k - 1, k - 1])
    # the matrix side of the claim (Lemma 1 / Theorem 1): det M = prod(d)^(HW), triangular
    assert np.all(np.triu(M, 1) == 0)
    np.testing.assert_array_equal(np.diag(M), np.tile(d, H * W))
    x = rng.standard_normal((N, H, W, C))
    y, logdet = layer.forward(x)
    layer.clear_cache()
    assert np.all(np.isfinite(y))
    with np.errstate(divide="ignore"):
        expected = H * W * np.sum(np.log(np.abs(d)))
    if singular:
        assert np.all(logdet == -np.inf)
    else:
        np.testing.assert_allclose(logdet, expected, rtol=1e-12)
    _check_inverse(layer, y, singular, tiny, k, C)


@given(padded_problems(masked=False))
def test_property_full_corner_invertible_iff_det_nonzero(problem):
    K, H, W, N, seed, singular, tiny = problem
    k, C = K.shape[0], K.shape[2]
    rng = np.random.default_rng(seed)
    layer = FixedKernelCInC(K, masked=False)
    y, logdet = layer.forward(rng.standard_normal((N, H, W, C)))
    layer.clear_cache()
    assert np.all(np.isfinite(y))
    if singular:
        assert np.all(logdet == -np.inf)
    else:
        ld = np.linalg.slogdet(K[k - 1, k - 1])[1]
        np.testing.assert_allclose(logdet, H * W * ld, rtol=1e-12)
    _check_inverse(layer, y, singular, tiny, k, C)


@st.composite
def dominant_problems(draw):
    """Kernels whose corner diagonal dominates: sum_{other taps} |K[., ., ., o]| <= |d_o| / 2,
    so ||M^{-1}||_inf <= 1 / min_o(|d_o| - r_o) <= 2 / min|d| <= 4 (Varah's bound)."""
    k = draw(st.integers(1, 3))
    C = draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    N = draw(st.sampled_from([1, 7]))
    K = draw(hnp.arrays(np.float64, (k, k, C, C), elements=weights))
    K[k - 1, k - 1] = np.triu(K[k - 1, k - 1])
    idx = np.arange(C)
    d = np.array(draw(st.lists(st.floats(0.5, 2.0), min_size=C, max_size=C)))
    d *= np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=C, max_size=C)))
    K[k - 1, k - 1, idx, idx] = 0.0
    r = np.abs(K).sum(axis=(0, 1, 2))  # (C,) off-diagonal row sums per output channel
    K *= np.where(r > 0, 0.5 * np.abs(d) / np.maximum(r, 1e-300), 1.0)
    K[k - 1, k - 1, idx, idx] = d
    return K, H, W, N, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(DTYPES_NAMES))


@given(dominant_problems())
def test_property_round_trip(problem):
    """Round trips on diagonally dominant kernels: 1e-10 in float64, and the derived bound
    (u = eps / 2 of the dtype, the term count, ||M^{-1}|| <= 4) in both dtypes; every method
    agrees with the exact solution of the dense system."""
    K, H, W, N, seed, dtype = problem
    k, C = K.shape[0], K.shape[2]
    rng = np.random.default_rng(seed)
    layer = FixedKernelCInC(K.astype(dtype))
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    y, _ = layer.forward(x)
    layer.clear_cache()
    M, A = dense(layer, H, W)
    norm_minv = np.abs(np.linalg.inv(M)).sum(1).max()
    assert norm_minv <= 4 * (1 + 1e-6)  # Varah's bound: the construction is as intended
    norm_m = np.abs(M).sum(1).max()
    exact = refined_solve(M, vec(y).astype(np.float64))  # M^{-1} y_hat
    x_norm = np.abs(vec(x)).max(0).astype(np.float64)
    y_norm = np.abs(vec(y)).max(0).astype(np.float64)
    # forward rounding: ||y_hat - M x|| <= gamma_{k^2 C} ||M|| ||x||
    fwd = norm_minv * gamma(k * k * C, dtype) * norm_m * x_norm
    for method in METHODS:
        xi = layer.inverse(y, method=method)
        xi_norm = np.abs(vec(xi)).max(0).astype(np.float64)
        solve = solve_error_bound(M, k, C, dtype, y_norm, xi_norm, corner_factor(A))
        assert np.all(np.abs(vec(xi) - exact).max(0) <= solve), method
        err = np.abs(vec(xi).astype(np.float64) - vec(x)).max(0)
        assert np.all(err <= fwd + solve), method
        if dtype == "float64":
            assert err.max() <= 1e-10, method
