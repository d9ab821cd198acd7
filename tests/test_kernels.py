"""Every kernel of :mod:`flownp.kernels.conv` against its readable reference, and every
reference against the dense matrix of :mod:`verification.dense` (built independently from the
paper's definitions).

Tolerances are rounding-error bounds, not fitted numbers: ``gamma_n = n u / (1 - n u)`` with
``u = eps / 2`` of the working dtype, times the magnitudes the bound involves (Higham,
"Accuracy and Stability of Numerical Algorithms", Sections 3.1 and 8.1). A sum of ``m``
products computed in any order (Numba reassociates) is within ``gamma_m * sum |terms|``.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from flownp.kernels import conv as K_
from flownp.kernels.conv_same import conv_same_backward, conv_same_forward
from verification.dense import (
    conv_matrix,
    corner_factor,
    gamma,
    refined_solve,
    solve_error_bound,
)

# (N, H, W): batch 1 and 7, H != W, H = 1, W = 1, a single pixel
SHAPES = [(1, 1, 1), (7, 3, 5), (1, 6, 1), (7, 1, 4), (1, 4, 4)]
KS = [1, 2, 3, 5]
DTYPES = [np.float32, np.float64]


def _kernel(rng, k, C, Co, dtype):
    """Off-corner taps small against a corner of order 1 (well-conditioned M)."""
    return (rng.normal(0.0, 0.3 / (k * np.sqrt(C)), (k, k, C, Co))).astype(dtype)


def _batch_dense(K, x, padding="top_left"):
    """Apply the dense matrix of K to every sample of x (float64)."""
    N, H, W, _ = x.shape
    M = conv_matrix(np.asarray(K, dtype=np.float64), H, W, padding)
    return (x.reshape(N, -1).astype(np.float64) @ M.T).reshape(N, H, W, -1), M


# --------------------------------------------------------------------------------------------
# The references against the dense matrix (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
def test_references_match_dense_matrix(k, shape, rng):
    N, H, W = shape
    C, Co = 3, 2
    x = rng.standard_normal((N, H, W, C))
    K = rng.standard_normal((k, k, C, Co))
    dy = rng.standard_normal((N, H, W, Co))
    y_dense, M = _batch_dense(K, x)
    m = k * k * C
    # both sides are sums of at most m products of the same numbers: gamma_m each
    bound = 2 * gamma(m + 1, np.float64) * _batch_dense(np.abs(K), np.abs(x))[0]
    assert np.all(np.abs(K_.conv_forward_reference(x, K) - y_dense) <= bound)
    dx_dense = (dy.reshape(N, -1) @ M).reshape(N, H, W, C)  # M^T dy
    bound_t = 2 * gamma(k * k * Co + 1, np.float64) * (np.abs(dy).reshape(N, -1) @ np.abs(M))
    err = np.abs(K_.conv_backward_input_reference(dy, K) - dx_dense).reshape(N, -1)
    assert np.all(err <= bound_t)


# --------------------------------------------------------------------------------------------
# Numba kernels against the references, float32 and float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_forward_matches_reference(dtype, k, shape, rng):
    N, H, W = shape
    C, Co = 3, 4  # C_in != C_out is supported by the kernel
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    K = rng.standard_normal((k, k, C, Co)).astype(dtype)
    y = K_.conv_forward(x, K)
    assert y.dtype == dtype and y.shape == (N, H, W, Co)
    ref = K_.conv_forward_reference(x.astype(np.float64), K.astype(np.float64))
    # y: m = k*k*C products summed in dtype; ref: the same in float64
    m = k * k * C
    bound = (gamma(m, dtype) + gamma(m, np.float64)) * K_.conv_forward_reference(
        np.abs(x).astype(np.float64), np.abs(K).astype(np.float64)
    )
    assert np.all(np.abs(y - ref) <= bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_backward_input_matches_reference(dtype, k, shape, rng):
    N, H, W = shape
    C, Co = 2, 3
    dy = rng.standard_normal((N, H, W, Co)).astype(dtype)
    K = rng.standard_normal((k, k, C, Co)).astype(dtype)
    dx = K_.conv_backward_input(dy, K)
    assert dx.dtype == dtype and dx.shape == (N, H, W, C)
    ref = K_.conv_backward_input_reference(dy.astype(np.float64), K.astype(np.float64))
    m = k * k * Co
    bound = (gamma(m, dtype) + gamma(m, np.float64)) * K_.conv_backward_input_reference(
        np.abs(dy).astype(np.float64), np.abs(K).astype(np.float64)
    )
    assert np.all(np.abs(dx - ref) <= bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_conv_backward_kernel_is_the_kernel_gradient(dtype, k, shape, rng):
    """dK[a,b,c,o] = d/dK[a,b,c,o] sum(conv(x, K) * dy) = sum(conv(x, E_abco) * dy): the forward
    reference applied to every unit kernel (the map is linear in K, so this is exact)."""
    N, H, W = shape
    C, Co = 2, 3
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    dy = rng.standard_normal((N, H, W, Co)).astype(dtype)
    taps = rng.random((k, k)) < 0.6  # the optional tap mask (masked kernels)
    dK = K_.conv_backward_kernel(x, dy, k)
    dK_masked = K_.conv_backward_kernel(x, dy, k, taps=taps)
    dK_ref = K_.conv_backward_kernel_reference(x, dy, k)
    assert dK.dtype == dtype and dK.shape == (k, k, C, Co)
    assert np.all(dK_masked[~taps] == 0)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    ref = np.empty((k, k, C, Co))
    mag = np.empty((k, k, C, Co))
    for idx in np.ndindex(k, k, C, Co):
        E = np.zeros((k, k, C, Co))
        E[idx] = 1.0
        ref[idx] = np.sum(K_.conv_forward_reference(x64, E) * dy64)
        mag[idx] = np.sum(K_.conv_forward_reference(np.abs(x64), E) * np.abs(dy64))
    # each entry is a sum of at most N*H*W products (BLAS in dtype; reference in float64)
    n = N * H * W
    bound = (gamma(n + 1, dtype) + gamma(n + 1, np.float64)) * mag
    assert np.all(np.abs(dK - ref) <= bound)
    assert np.all(np.abs(dK_ref - ref) <= bound)
    assert np.all(np.abs(dK_masked - ref)[taps] <= bound[taps])


# --------------------------------------------------------------------------------------------
# The inverse: raster and wavefront against the reference and the dense system
# --------------------------------------------------------------------------------------------


def _factors(rng, C, kind, dtype):
    """(L, U, perm) of a corner A = P L U: ``masked`` gives L = A lower triangular, U = I,
    P = I (what the masked layer passes); ``plu`` a general factorisation with a permutation."""
    d = rng.uniform(0.5, 2.0, C) * rng.choice([-1, 1], C)
    if kind == "masked":
        L = np.tril(rng.normal(0, 0.3, (C, C)), -1) + np.diag(d)
        return L.astype(dtype), np.eye(C, dtype=dtype), np.arange(C)
    L = np.tril(rng.normal(0, 0.3, (C, C)), -1) + np.eye(C)
    U = np.triu(rng.normal(0, 0.3, (C, C)), 1) + np.diag(d)
    return L.astype(dtype), U.astype(dtype), rng.permutation(C)


def _system(K, L, U, perm, H, W):
    """Dense M of the system the solvers solve (corner replaced by A = P L U), A, |P||L||U|."""
    k, C = K.shape[0], K.shape[2]
    P = np.eye(C)[:, perm]  # (P^T r)[m] = r[perm[m]]
    L64, U64 = L.astype(np.float64), U.astype(np.float64)
    A = P @ L64 @ U64
    K64 = K.astype(np.float64)
    K64[k - 1, k - 1] = A.T
    return conv_matrix(K64, H, W), A, P @ np.abs(L64) @ np.abs(U64)


SOLVERS = {
    "reference": K_.solve_reference,
    "raster": K_.solve_raster,
    "wavefront": K_.solve_wavefront,
    "auto": K_.solve_auto,
    "pixelwise-raster": lambda *a: K_.solve_pixelwise(*a, order="raster"),
    "pixelwise-wavefront": lambda *a: K_.solve_pixelwise(*a, order="wavefront"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["masked", "plu"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_solvers_match_dense_solution(dtype, kind, k, shape, rng):
    """Every solver (sequential, wavefront, blocked, unblocked) returns M^{-1} y within the
    round-off bound of :func:`verification.dense.solve_error_bound` (derived from u of the
    dtype, the number of taps and channels, and the conditioning of M and of the corner)."""
    N, H, W = shape
    C = 3
    K = _kernel(rng, k, C, C, dtype)
    L, U, perm = _factors(rng, C, kind, dtype)
    y = rng.standard_normal((N, H, W, C)).astype(dtype)
    M, A, LU_abs = _system(K, L, U, perm, H, W)
    exact = refined_solve(M, y.reshape(N, -1).T.astype(np.float64)).T.reshape(y.shape)
    phi = corner_factor(A, LU_abs)
    y_norm = np.abs(y).reshape(N, -1).max(axis=1)
    for name, fn in SOLVERS.items():
        x = fn(y, K, L, U, perm)
        assert x.dtype == dtype and x.shape == y.shape, name
        # the bound is per sample (one vectorised image)
        err = np.abs(x - exact).reshape(N, -1).max(axis=1)
        x_norm = np.abs(x).reshape(N, -1).max(axis=1)
        tol = solve_error_bound(M, k, C, dtype, y_norm, x_norm, phi)
        assert np.all(err <= tol), f"{name}: max error / bound {np.max(err / tol):.3g}"


def test_solvers_ignore_the_corner_tap_of_K(rng):
    """The corner of K is replaced by P L U: garbage in it must not change the solution."""
    K = _kernel(rng, 3, 2, 2, np.float64)
    L, U, perm = _factors(rng, 2, "masked", np.float64)
    y = rng.standard_normal((1, 3, 3, 2))
    x1 = {name: fn(y, K, L, U, perm) for name, fn in SOLVERS.items()}
    K[2, 2] = 1e6
    for name, fn in SOLVERS.items():
        np.testing.assert_array_equal(fn(y, K, L, U, perm), x1[name], err_msg=name)


def test_solve_auto_schedule_and_bitwise_equality(rng):
    """``solve_auto`` picks raster when the batch's blocks of 8 samples share out evenly (or
    give >= 2 per thread), else the wavefront; both schedules give the same bits."""
    assert K_.solve_schedule(100, 2) == "raster"  # 13 blocks, >= 2 per thread
    assert K_.solve_schedule(16, 2) == "raster"  # 2 blocks, one each
    assert K_.solve_schedule(24, 2) == "wavefront"  # 3 blocks: 2 + 1
    assert K_.solve_schedule(8, 2) == "wavefront"  # 1 block, one idle thread
    assert K_.solve_schedule(8, 1) == "raster"
    C = 5
    K = _kernel(rng, 3, C, C, np.float32)
    L, U, perm = _factors(rng, C, "plu", np.float32)
    for N in (3, 24, 40):
        y = rng.standard_normal((N, 6, 7, C)).astype(np.float32)
        x = K_.solve_auto(y, K, L, U, perm)
        np.testing.assert_array_equal(x, K_.solve_raster(y, K, L, U, perm))
        np.testing.assert_array_equal(x, K_.solve_wavefront(y, K, L, U, perm))


def test_kernels_without_jit_match_compiled(tmp_path):
    """``NUMBA_DISABLE_JIT=1`` runs the undecorated Python kernels (the readable fallback):
    same results as the compiled ones (run in a subprocess, the flag is read at import)."""
    script = tmp_path / "nojit.py"
    script.write_text(
        "import numpy as np\n"
        "from flownp.kernels import conv as K_\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((5, 3, 4, 2)); K = rng.normal(0, .2, (3, 3, 2, 2))\n"
        "L = np.tril(rng.normal(0, .3, (2, 2)), -1) + np.diag([1.5, -.8]); U = np.eye(2)\n"
        "p = np.arange(2)\n"
        "out = dict(f=K_.conv_forward(x, K), b=K_.conv_backward_input(x, K),\n"
        "           g=K_.conv_backward_kernel(x, x, 3), r=K_.solve_raster(x, K, L, U, p),\n"
        "           w=K_.solve_wavefront(x, K, L, U, p),\n"
        "           q=K_.solve_pixelwise(x, K, L, U, p, order='wavefront'))\n"
        f"np.savez(r'{tmp_path / 'out.npz'}', **out)\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=120)
    got = np.load(tmp_path / "out.npz")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4, 2))
    K = rng.normal(0, 0.2, (3, 3, 2, 2))
    L = np.tril(rng.normal(0, 0.3, (2, 2)), -1) + np.diag([1.5, -0.8])
    U, p = np.eye(2), np.arange(2)
    want = dict(
        f=K_.conv_forward(x, K),
        b=K_.conv_backward_input(x, K),
        g=K_.conv_backward_kernel(x, x, 3),
        r=K_.solve_raster(x, K, L, U, p),
        w=K_.solve_wavefront(x, K, L, U, p),
        q=K_.solve_pixelwise(x, K, L, U, p, order="wavefront"),
    )
    for key, val in want.items():
        # the same operations up to fastmath reassociation: O(1) values, at most 4 k^2 C = 72
        # terms per output and kappa(M) < 10 here, so differences <= 72 * 1.1e-16 * 10 < 1e-13
        np.testing.assert_allclose(got[key], val, rtol=0, atol=1e-13, err_msg=key)


# --------------------------------------------------------------------------------------------
# The same-padded convolution of the conditioner networks (im2col + BLAS)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (1, 6, 1)])
def test_conv_same_matches_dense_symmetric_padding(dtype, k, shape, rng):
    N, H, W = shape
    C, Co = 2, 3
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    K = rng.standard_normal((k, k, C, Co)).astype(dtype)
    b = rng.standard_normal(Co).astype(dtype)
    dy = rng.standard_normal((N, H, W, Co)).astype(dtype)
    y_dense, M = _batch_dense(K, x, "same")
    y = conv_same_forward(x, K, b)
    m = k * k * C + 1
    mag = _batch_dense(np.abs(K), np.abs(x), "same")[0] + np.abs(b)

    # both sides: m products and a bias, summed in dtype (tested) and in float64 (dense)
    def tol(n):
        return gamma(n, dtype) + gamma(n, np.float64)

    assert np.all(np.abs(y - (y_dense + b)) <= tol(m) * mag)
    dx, dK, db = conv_same_backward(x, K, dy)
    dx_dense = (dy.reshape(N, -1).astype(np.float64) @ M).reshape(N, H, W, C)
    mag_x = (np.abs(dy).reshape(N, -1).astype(np.float64) @ np.abs(M)).reshape(N, H, W, C)
    assert np.all(np.abs(dx - dx_dense) <= tol(k * k * Co + 1) * mag_x)
    dy64 = dy.astype(np.float64)
    assert np.all(np.abs(db - dy64.sum((0, 1, 2))) <= tol(N * H * W) * np.abs(dy64).sum((0, 1, 2)))
    # dK[a, b, c, o] = <dy[..., o], x shifted by tap (a, b)>: the transpose of the dense matrix
    # applied to unit kernels, as for the padded kernel above
    for idx in [(0, 0, 0, 0), (k - 1, k // 2, 1, 2), (k // 2, 0, 0, 1)]:
        E = np.zeros((k, k, C, Co))
        E[idx] = 1.0
        ye = _batch_dense(E, x.astype(np.float64), "same")[0]
        ref = np.sum(ye * dy64)
        mag_k = np.sum(np.abs(ye * dy64))
        assert abs(dK[idx] - ref) <= tol(N * H * W + 1) * mag_k
