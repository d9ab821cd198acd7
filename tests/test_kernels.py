"""Every kernel of :mod:`flownp.kernels.conv` and :mod:`flownp.kernels.solve` against its
readable reference, and every reference against the dense matrix of :mod:`verification.dense`
(built independently from the paper's definitions).

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
from flownp.kernels import solve as KSOLVE
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
    "reference": KSOLVE.solve_reference,
    "raster": KSOLVE.solve_raster,
    "wavefront": KSOLVE.solve_wavefront,
    "auto": KSOLVE.solve_auto,
    "pixelwise-raster": lambda *a: KSOLVE.solve_pixelwise(*a, order="raster"),
    "pixelwise-wavefront": lambda *a: KSOLVE.solve_pixelwise(*a, order="wavefront"),
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


def test_solve_auto_is_raster_and_all_schedules_agree_bitwise(rng):
    """``solve_auto`` uses the raster schedule for every batch (never a per-diagonal barrier);
    the wavefront does the same arithmetic per pixel in the same order: the same bits."""
    assert {KSOLVE.solve_schedule(n, t) for n in (1, 8, 24, 100) for t in (1, 2, 3)} == {"raster"}
    C = 5
    K = _kernel(rng, 3, C, C, np.float32)
    L, U, perm = _factors(rng, C, "plu", np.float32)
    for N in (3, 24, 40):
        y = rng.standard_normal((N, 6, 7, C)).astype(np.float32)
        x = KSOLVE.solve_auto(y, K, L, U, perm)
        np.testing.assert_array_equal(x, KSOLVE.solve_raster(y, K, L, U, perm))
        np.testing.assert_array_equal(x, KSOLVE.solve_wavefront(y, K, L, U, perm))


def test_kernels_without_jit_match_compiled(tmp_path):
    """``NUMBA_DISABLE_JIT=1`` runs the undecorated Python kernels (the readable fallback):
    same results as the compiled ones (run in a subprocess, the flag is read at import)."""
    script = tmp_path / "nojit.py"
    script.write_text(
        "import numpy as np\n"
        "from flownp.kernels import conv as K_\n"
        "from flownp.kernels import solve as KSOLVE\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((5, 3, 4, 2)); K = rng.normal(0, .2, (3, 3, 2, 2))\n"
        "L = np.tril(rng.normal(0, .3, (2, 2)), -1) + np.diag([1.5, -.8]); U = np.eye(2)\n"
        "p = np.arange(2)\n"
        "out = dict(f=K_.conv_forward(x, K), b=K_.conv_backward_input(x, K),\n"
        "           g=K_.conv_backward_kernel(x, x, 3), r=KSOLVE.solve_raster(x, K, L, U, p),\n"
        "           w=KSOLVE.solve_wavefront(x, K, L, U, p),\n"
        "           q=KSOLVE.solve_pixelwise(x, K, L, U, p, order='wavefront'))\n"
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
        r=KSOLVE.solve_raster(x, K, L, U, p),
        w=KSOLVE.solve_wavefront(x, K, L, U, p),
        q=KSOLVE.solve_pixelwise(x, K, L, U, p, order="wavefront"),
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


def test_conv_same_kernels_match_their_numpy_references(rng):
    """conv_same_forward / backward and the fused ActNorm + ReLU against the readable
    references shipped beside them (float64: different summation orders only)."""
    from flownp.kernels import conv_same as S

    for k, C, Co in ((1, 3, 5), (3, 2, 7), (3, 9, 2), (5, 4, 4)):
        x = rng.standard_normal((3, 5, 4, C))
        K = rng.standard_normal((k, k, C, Co))
        b = rng.standard_normal(Co)
        dy = rng.standard_normal((3, 5, 4, Co))
        np.testing.assert_allclose(
            S.conv_same_forward(x, K, b), S.conv_same_forward_reference(x, K, b), atol=1e-12
        )
        for got, want in zip(
            S.conv_same_backward(x, K, dy), S.conv_same_backward_reference(x, K, dy), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=1e-11)
    a = rng.standard_normal((4, 3, 6))
    bias, logs, dr = (
        rng.standard_normal(6),
        0.2 * rng.standard_normal(6),
        rng.standard_normal(a.shape),
    )
    for relu in (True, False):
        r, _ = S.actnorm_relu_forward(a, bias, logs, relu)
        np.testing.assert_allclose(
            r, S.actnorm_relu_forward_reference(a, bias, logs, relu), atol=1e-14
        )
        for got, want in zip(
            S.actnorm_relu_backward(dr, r, logs, relu),
            S.actnorm_relu_backward_reference(dr, r, logs, relu),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Input validation of the public kernels
# --------------------------------------------------------------------------------------------


def test_conv_forward_rejects_a_channel_mismatch_naming_both_shapes():
    x = np.zeros((2, 4, 4, 5))
    K = np.zeros((3, 3, 3, 3))
    with pytest.raises(ValueError, match=r"conv_forward.*\(2, 4, 4, 5\).*\(3, 3, 3, 3\)"):
        K_.conv_forward(x, K)


def test_public_kernels_validate_shapes_dtypes_and_factors():
    from flownp.kernels import conv_same as S

    x = np.zeros((2, 4, 4, 3))
    K = np.zeros((3, 3, 3, 3))
    L, U, perm = np.eye(3), np.eye(3), np.arange(3)
    bad = [
        (lambda: K_.conv_forward(x[0], K), "4-D"),
        (lambda: K_.conv_forward(x.astype(np.int64), K), "float32 or float64"),
        (lambda: K_.conv_forward(x, K[:, :2]), r"\(k, k, C_in, C_out\)"),
        (lambda: K_.conv_backward_input(np.zeros((2, 4, 4, 4)), K), "output channels"),
        (lambda: K_.conv_backward_kernel(x, np.zeros((1, 4, 4, 3)), 3), "same N, H, W"),
        (lambda: K_.conv_backward_kernel(x, x.astype(np.float32), 3), "float64 but dy"),
        (lambda: K_.conv_backward_kernel(x, x, 0), "positive int"),
        (lambda: KSOLVE.solve_raster(x, K, L, U, np.array([0, 0, 1])), "permutation"),
        (lambda: KSOLVE.solve_auto(x, K, L[:2], U, perm), r"L must have shape \(3, 3\)"),
        (lambda: KSOLVE.solve_wavefront(x, np.zeros((3, 3, 3, 4)), L, U, perm), "C channels to C"),
        (lambda: KSOLVE.solve_pixelwise(x, K, L, U, perm.astype(float)), "integer"),
        (lambda: S.conv_same_forward(x, np.zeros((2, 2, 3, 3))), "odd"),
        (lambda: S.conv_same_forward(x, np.zeros((3, 3, 4, 3))), r"\(2, 4, 4, 3\).*\(3, 3, 4, 3\)"),
        (lambda: S.conv_same_forward(x, K, np.zeros(4)), r"bias must have shape \(3,\)"),
        (lambda: S.conv_same_backward(x, K, np.zeros((2, 4, 4, 2))), "dy must be"),
        (lambda: S.actnorm_relu_forward(x, np.zeros(2), np.zeros(3)), "bias must have shape"),
        (lambda: S.actnorm_relu_backward(x[:1], x, np.zeros(3)), "same shape"),
        (lambda: S.matmul(np.zeros((3, 4)), np.zeros((3, 4))), r"\(3, 4\) @ \(3, 4\)"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()


def test_kernels_accept_non_contiguous_inputs(rng):
    """A strided view is copied to C order by the wrapper: same result as the copy."""
    x = rng.standard_normal((3, 8, 10, 4))[:, ::2, ::2, :]  # (3, 4, 5, 4), not contiguous
    K = _kernel(rng, 3, 4, 4, np.float64)
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(K_.conv_forward(x, K), K_.conv_forward(x.copy(), K))
    np.testing.assert_array_equal(
        K_.conv_backward_kernel(x, x, 3), K_.conv_backward_kernel(x.copy(), x.copy(), 3)
    )


# --------------------------------------------------------------------------------------------
# The thread pool: chunks really run on several threads, and the results do not depend on it
# --------------------------------------------------------------------------------------------


def test_parallel_for_runs_chunks_on_a_second_thread():
    """With 2 threads the caller takes chunk 0 and blocks in it until another chunk has run on
    a different thread: this only finishes if the pool's second thread takes part (with one
    thread it would wait for the timeout and fail)."""
    import threading

    from flownp import threads

    ran: dict[int, int] = {}
    other_ran = threading.Event()
    caller = threading.get_ident()

    def fn(i):
        ran[i] = threading.get_ident()
        if ran[i] == caller:
            assert other_ran.wait(timeout=60), "no second thread took a chunk"
        else:
            other_ran.set()

    with threads.limit(2):
        threads.parallel_for(fn, 4)
    assert sorted(ran) == [0, 1, 2, 3]
    assert len(set(ran.values())) == 2


def test_parallel_for_reraises_errors_and_runs_nested_calls_serially():
    from flownp import threads

    def boom(i):
        if i == 3:
            raise KeyError("chunk 3")

    with threads.limit(2), pytest.raises(KeyError, match="chunk 3"):
        threads.parallel_for(boom, 6)
    out = np.zeros((4, 4))

    def outer(i):
        threads.parallel_for(lambda j: out.__setitem__((i, j), i * 4 + j), 4)

    with threads.limit(2):
        threads.parallel_for(outer, 4)
    np.testing.assert_array_equal(out.ravel(), np.arange(16))
    with pytest.raises(ValueError, match="positive int"):
        with threads.limit(0):
            pass


def test_chunking_depends_on_work_not_on_thread_count():
    from flownp import threads

    small = threads.chunk_bounds(1000, 1.0)  # 1 us of work in all: one chunk, no thread woken
    assert small == [0, 1000]
    big = threads.chunk_bounds(1000, 1e4)  # 10 ms: many chunks, at most MAX_CHUNKS
    assert big[0] == 0 and big[-1] == 1000 and len(big) - 1 == threads.MAX_CHUNKS
    with threads.limit(1):
        assert threads.chunk_bounds(1000, 1e4) == big
    with threads.limit(3):
        assert threads.chunk_bounds(1000, 1e4) == big


def _all_kernels(rng):
    from flownp.kernels import conv_same as S

    x = rng.standard_normal((37, 6, 5, 12)).astype(np.float32)
    dy = rng.standard_normal((37, 6, 5, 12)).astype(np.float32)
    K = (0.1 * rng.standard_normal((3, 3, 12, 12))).astype(np.float32)
    Kw = (0.1 * rng.standard_normal((3, 3, 12, 20))).astype(np.float32)
    L = (np.tril(0.1 * rng.standard_normal((12, 12)), -1) + np.eye(12)).astype(np.float32)
    U, perm = np.eye(12, dtype=np.float32), np.arange(12)
    big = rng.standard_normal((3000, 7)).astype(np.float32)  # > 1 chunk of rows
    logs = (0.1 * rng.standard_normal(7)).astype(np.float32)
    dyw = rng.standard_normal((37, 6, 5, 20)).astype(np.float32)

    def run():
        return [
            K_.conv_forward(x, K),
            K_.conv_backward_input(dy, K),
            K_.conv_backward_kernel(x, dy, 3),
            KSOLVE.solve_raster(dy, K, L, U, perm),
            KSOLVE.solve_auto(dy, K, L, U, perm),
            S.conv_same_forward(x, Kw),
            *S.conv_same_backward(x, Kw, dyw),
            S.conv_same_forward(dyw, Kw.transpose(0, 1, 3, 2)),  # output side
            *S.conv_same_backward(dyw, Kw.transpose(0, 1, 3, 2), x)[:2],
            S.matmul(big.T, big),
            *S.actnorm_relu_forward(big, logs, logs),
            *S.actnorm_relu_backward(big[::-1].copy(), np.maximum(big, 0), logs),
        ]

    return run


def test_kernels_are_bitwise_identical_for_1_2_and_3_threads(rng, monkeypatch):
    """flownp.threads' promise: chunks fixed by the work, disjoint writes, sums over chunks in
    chunk order, BLAS products split only along their outputs: the same bits whichever thread
    runs which chunk. The chunk threshold is lowered so that every kernel is split into many
    chunks, and 2 and 3 threads are used whatever the machine's CPU count."""
    from flownp import threads

    monkeypatch.setattr(threads, "MIN_CHUNK_NS", 1)
    run = _all_kernels(rng)
    with threads.limit(1):
        one = run()
    for n in (2, 3):
        with threads.limit(n):
            many = run()
        for a, b in zip(many, one, strict=True):
            assert np.array_equal(a, b)


def test_kernels_do_not_depend_on_which_thread_runs_which_chunk(rng, monkeypatch):
    """An adversarial schedule, deterministic: every region's chunks run in reverse order,
    the odd ones on another thread at the same time. Same bits as one thread in order."""
    import threading

    from flownp import threads

    monkeypatch.setattr(threads, "MIN_CHUNK_NS", 1)
    run = _all_kernels(rng)
    with threads.limit(1):
        want = run()
    regions = []

    def scrambled(fn, n):
        regions.append(n)
        order = list(range(n))[::-1]
        t = threading.Thread(target=lambda: [fn(i) for i in order[1::2]])
        t.start()
        for i in order[0::2]:
            fn(i)
        t.join()

    monkeypatch.setattr(threads, "parallel_for", scrambled)
    got = run()
    assert len(regions) >= 10 and max(regions) > 2  # the kernels did go through the pool
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
