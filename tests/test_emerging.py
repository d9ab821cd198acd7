"""EmergingConv (Hoogeboom et al. 2019): two masked kk x kk convolutions, bottom/right then
top/left padded. Every check is against an independent reference (explicit loops, dense
matrices built from the kernels, slogdet, finite differences), never against the layer itself."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flownp.errors import SingularKernelError
from flownp.kernels.conv_same import conv_same_forward
from flownp.layers.emerging import SOLVERS, EmergingConv
from flownp.testing import check_layer_gradients, dense_jacobian, randomize_params


def make(C: int, k: int, rng: np.random.Generator, dtype=np.float64, seed: int = 3, scale=0.15):
    """A layer with random, non-trivial parameters: taps of size ~``scale``, diagonals
    ``exp(N(0, scale^2))``, random signs. (With much larger taps the inverse amplifies by
    ~1e4 on 6 x 5 images, which tests conditioning, not the code.)"""
    layer = EmergingConv(C, k, seed=seed, dtype=dtype, init_std=scale)
    randomize_params(layer, rng, scale=scale)
    for name in ("conv1/sign", "conv2/sign"):
        layer.buffers[name][...] = np.where(rng.random(C) < 0.5, -1.0, 1.0)
    return layer


# ---------------------------------------------------------------------- independent references
def conv_loop(x: np.ndarray, K: np.ndarray, side: str) -> np.ndarray:
    """Explicit loops. bottom_right: tap (a, b) reads (i+a, j+b); top_left: (i-(kk-1)+a, ...)."""
    N, H, W, C = x.shape
    kk = K.shape[0]
    off = 0 if side == "bottom_right" else -(kk - 1)
    y = np.zeros((N, H, W, K.shape[3]))
    for i in range(H):
        for j in range(W):
            for a in range(kk):
                for b in range(kk):
                    p, q = i + off + a, j + off + b
                    if 0 <= p < H and 0 <= q < W:
                        y[:, i, j, :] += x[:, p, q, :] @ K[a, b]
    return y


def conv_matrix(K: np.ndarray, H: int, W: int, side: str) -> np.ndarray:
    """The dense matrix of :func:`conv_loop` in the raster vectorisation (row, column, channel):
    block (p_out, q_in) = K[a, b]^T."""
    kk, C = K.shape[0], K.shape[2]
    off = 0 if side == "bottom_right" else -(kk - 1)
    M = np.zeros((H * W * C, H * W * C))
    for i in range(H):
        for j in range(W):
            for a in range(kk):
                for b in range(kk):
                    p, q = i + off + a, j + off + b
                    if 0 <= p < H and 0 <= q < W:
                        r, c = (i * W + j) * C, (p * W + q) * C
                        M[r : r + C, c : c + C] += K[a, b].T
    return M


# ---------------------------------------------------------------------- parameters, masks
def test_parameters_buffers_and_init():
    layer = EmergingConv(4, 3, seed=5)
    p, b = layer.params, layer.buffers
    assert sorted(p) == ["conv1/log_diag", "conv1/weight", "conv2/log_diag", "conv2/weight"]
    assert sorted(b) == ["conv1/sign", "conv2/sign"]
    assert sorted(layer.grads) == sorted(p)
    assert p["conv1/weight"].shape == p["conv2/weight"].shape == (2, 2, 4, 4)
    assert p["conv1/log_diag"].shape == (4,) and np.all(p["conv1/log_diag"] == 0)
    assert np.all(b["conv1/sign"] == 1) and np.all(b["conv2/sign"] == 1)
    # the masked (structurally zero) centre entries start at zero
    # ([c, o] layout: conv1 keeps c > o, conv2 keeps c < o; diagonals live in log_diag)
    w1, w2 = p["conv1/weight"][0, 0], p["conv2/weight"][1, 1]
    assert np.all(np.triu(w1) == 0) and np.all(w1[np.tril_indices(4, -1)] != 0)
    assert np.all(np.tril(w2) == 0) and np.all(w2[np.triu_indices(4, 1)] != 0)
    assert 0.005 < np.std(p["conv2/weight"][0]) < 0.02  # init_std = 0.01
    assert not np.allclose(p["conv1/weight"], EmergingConv(4, 3, seed=6).params["conv1/weight"])
    assert EmergingConv(2, 5).params["conv1/weight"].shape == (3, 3, 2, 2)
    assert EmergingConv(2, 1).params["conv2/weight"].shape == (1, 1, 2, 2)


def test_centre_matrices_are_triangular_with_the_parameterised_diagonals(rng):
    layer = make(4, 3, rng)
    p, b = layer.params, layer.buffers
    A1 = layer.kernel1[0, 0].T  # A1[o, c]
    A2 = layer.kernel2[1, 1].T
    assert np.all(np.tril(A1, -1) == 0) and np.any(np.triu(A1, 1) != 0)  # upper
    assert np.all(np.triu(A2, 1) == 0) and np.any(np.tril(A2, -1) != 0)  # lower
    np.testing.assert_array_equal(np.diag(A1), b["conv1/sign"] * np.exp(p["conv1/log_diag"]))
    np.testing.assert_array_equal(np.diag(A2), b["conv2/sign"] * np.exp(p["conv2/log_diag"]))
    # the off-centre taps are the weights themselves
    np.testing.assert_array_equal(layer.kernel1[1], p["conv1/weight"][1])
    np.testing.assert_array_equal(layer.kernel2[0], p["conv2/weight"][0])


# ---------------------------------------------------------------------- the map itself
@pytest.mark.parametrize("k", [1, 3, 5])
def test_forward_is_the_composition_of_the_two_convolutions(k, rng):
    layer = make(3, k, rng)
    x = rng.standard_normal((2, 4, 5, 3))
    y, _ = layer.forward(x)
    z_ref = conv_loop(x, layer.kernel1, "bottom_right")
    y_ref = conv_loop(z_ref, layer.kernel2, "top_left")
    assert np.max(np.abs(y - y_ref)) < 1e-12
    z, _ = layer.conv1.forward(x)  # the first half alone
    assert np.max(np.abs(z - z_ref)) < 1e-12


@pytest.mark.parametrize("k", [1, 3, 5])
def test_effective_kernel_is_the_composition(k, rng):
    layer = make(2, k, rng)
    kk = (k + 1) // 2
    K = layer.effective_kernel
    assert K.shape == (k, k, 2, 2)
    x = rng.standard_normal((2, 5, 6, 2))
    y_same = conv_same_forward(x, K)
    # exact on the whole image once conv2's zero padding sees real conv1 outputs
    xp = np.pad(x, ((0, 0), (kk - 1, 0), (kk - 1, 0), (0, 0)))
    y_pad, _ = layer.forward(xp)
    assert np.max(np.abs(y_pad[:, kk - 1 :, kk - 1 :] - y_same)) < 1e-12
    # without the extra padding: equal on rows/columns >= kk-1, different on the border
    y, _ = layer.forward(x)
    assert np.max(np.abs(y[:, kk - 1 :, kk - 1 :] - y_same[:, kk - 1 :, kk - 1 :])) < 1e-12
    if k > 1:
        assert np.max(np.abs(y - y_same)) > 1e-3


def test_dense_matrix_is_lower_times_upper_triangular(rng):
    C, H, W = 2, 3, 4
    layer = make(C, 3, rng)
    x = rng.standard_normal((1, H, W, C))
    J = dense_jacobian(lambda v: layer.forward(v)[0], x)
    J1 = dense_jacobian(lambda v: layer.conv1.forward(v)[0], x)
    z = layer.conv1.forward(x)[0]
    J2 = dense_jacobian(lambda v: layer.conv2.forward(v)[0], z)
    layer.clear_cache()
    # structure: conv1 upper triangular, conv2 lower triangular (exact zeros), not diagonal
    assert np.all(np.tril(J1, -1) == 0) and np.max(np.abs(np.triu(J1, 1))) > 0.1
    assert np.all(np.triu(J2, 1) == 0) and np.max(np.abs(np.tril(J2, -1))) > 0.1
    np.testing.assert_allclose(np.diag(J1), np.tile(np.diag(layer.kernel1[0, 0]), H * W), atol=1e-9)
    np.testing.assert_allclose(np.diag(J2), np.tile(np.diag(layer.kernel2[1, 1]), H * W), atol=1e-9)
    # the factors are the matrices of the two kernels, and the product is the layer
    M1 = conv_matrix(layer.kernel1, H, W, "bottom_right")
    M2 = conv_matrix(layer.kernel2, H, W, "top_left")
    assert np.max(np.abs(J1 - M1)) < 1e-8 and np.max(np.abs(J2 - M2)) < 1e-8
    assert np.max(np.abs(J - M2 @ M1)) < 1e-8
    assert np.max(np.abs(J - np.tril(J))) > 0.1 and np.max(np.abs(J - np.triu(J))) > 0.1


@pytest.mark.parametrize(
    "k, shape", [(3, (2, 3, 2)), (5, (3, 3, 2)), (1, (2, 2, 3)), (3, (1, 4, 2))]
)
def test_logdet_matches_dense_jacobian(k, shape, rng):
    layer = make(shape[2], k, rng)
    x = rng.standard_normal((1,) + shape)
    J = dense_jacobian(lambda v: layer.forward(v)[0], x)
    sign, ld = np.linalg.slogdet(J)
    _, logdet = layer.forward(np.repeat(x, 3, axis=0))
    assert sign != 0
    assert logdet.shape == (3,)
    np.testing.assert_allclose(logdet, ld, rtol=0, atol=1e-8)
    H, W = shape[:2]
    d = np.concatenate([np.diag(layer.kernel1[0, 0]), np.diag(layer.kernel2[-1, -1])])
    assert abs(ld - H * W * np.sum(np.log(np.abs(d)))) < 1e-8


# ---------------------------------------------------------------------- inverse
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("k", [3, 5])
def test_round_trips_float64(solver, k, rng):
    layer = make(3, k, rng)
    layer.solver = solver
    x = rng.standard_normal((3, 5, 4, 3))
    y, _ = layer.forward(x)
    assert np.max(np.abs(y - x)) > 0.1  # not trivially the identity
    assert np.max(np.abs(layer.inverse(y) - x)) < 1e-10
    z = rng.standard_normal((3, 5, 4, 3))
    assert np.max(np.abs(layer.forward(layer.inverse(z))[0] - z)) < 1e-10


@pytest.mark.parametrize("half", ["conv1", "conv2"])
def test_each_half_inverts_alone(half, rng):
    """conv1 goes through the solver with L = I, U = A1 on the flipped image."""
    layer = make(3, 3, rng)
    conv = getattr(layer, half)
    x = rng.standard_normal((2, 4, 3, 3))
    y, _ = conv.forward(x)
    conv.clear_cache()
    for method in SOLVERS:
        assert np.max(np.abs(conv.inverse(y, method) - x)) < 1e-10


def test_solvers_agree(rng):
    layer = make(4, 3, rng)
    y = rng.standard_normal((3, 6, 5, 4))
    xs = {m: layer.inverse(y, method=m) for m in SOLVERS}
    for m in SOLVERS:
        assert xs[m].flags.c_contiguous
        assert np.max(np.abs(xs[m] - xs["reference"])) < 1e-12


@pytest.mark.parametrize("method", SOLVERS)
def test_inverse_uses_the_requested_solver_for_both_substitutions(method, rng, monkeypatch):
    import flownp.kernels.solve as K_

    calls = []
    for m in SOLVERS:  # the layers look the solver up in flownp.kernels.solve at call time
        f = getattr(K_, f"solve_{m}")
        monkeypatch.setattr(K_, f"solve_{m}", lambda *a, _m=m, _f=f: calls.append(_m) or _f(*a))
    layer = make(2, 3, rng)
    y = rng.standard_normal((1, 3, 3, 2))
    layer.inverse(y, method=method)
    assert calls == [method, method]
    calls.clear()
    layer.solver = method
    layer.inverse(y)
    assert calls == [method, method]


@given(
    C=st.integers(1, 4),
    H=st.integers(1, 4),
    W=st.integers(1, 4),
    k=st.sampled_from([1, 3, 5]),
    solver=st.sampled_from(SOLVERS),
)
def test_round_trip_shapes(C, H, W, k, solver):
    rng = np.random.default_rng(1000 * C + 100 * H + 10 * W + k)
    layer = make(C, k, rng)
    x = rng.standard_normal((2, H, W, C))
    y, logdet = layer.forward(x)
    assert y.shape == x.shape and logdet.shape == (2,)
    assert np.max(np.abs(layer.inverse(y, solver) - x)) < 1e-10


def test_zero_diagonal_is_a_clear_singular_error(rng):
    layer = make(3, 3, rng)
    layer.params["conv1/log_diag"][1] = -1e4  # exp underflows to exactly 0
    y = rng.standard_normal((1, 3, 3, 3))
    with pytest.raises(SingularKernelError, match=r"EmergingConv.*bottom_right.*\[1\]"):
        layer.inverse(y)


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("k, shape", [(3, (2, 3, 4, 3)), (5, (1, 4, 3, 2)), (3, (2, 1, 5, 2))])
def test_gradients_finite_differences(k, shape, rng):
    layer = make(shape[3], k, rng)
    res = check_layer_gradients(layer, rng.standard_normal(shape), rng)
    assert set(res.errors) == {"x", *layer.params}
    assert res.max_error < 1e-7, str(res)


def test_gradients_ignore_masked_entries_and_accumulate(rng):
    layer = make(3, 3, rng)
    x = rng.standard_normal((2, 3, 3, 3))
    dy, dl = rng.standard_normal(x.shape), rng.standard_normal(2)
    layer.zero_grad()
    for _ in range(2):
        layer.forward(x)
        layer.backward(dy, dl)
    g = {k: v.copy() for k, v in layer.grads.items()}
    assert np.all(np.triu(g["conv1/weight"][0, 0]) == 0)  # diagonal and masked half
    assert np.all(np.tril(g["conv2/weight"][1, 1]) == 0)
    layer.zero_grad()
    layer.forward(x)
    layer.backward(dy, dl)
    for key, val in layer.grads.items():
        np.testing.assert_allclose(g[key], 2 * val, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- float32
def test_float32(rng):
    lay64 = make(4, 3, rng)
    lay32 = EmergingConv(4, 3, dtype=np.float32)
    lay32.load_state_dict(lay64.state_dict())
    assert all(p.dtype == np.float32 for p in lay32.params.values())
    x = rng.standard_normal((2, 5, 6, 4))
    y32, ld32 = lay32.forward(x.astype(np.float32))
    y64, ld64 = lay64.forward(x)
    assert y32.dtype == ld32.dtype == np.float32
    assert np.max(np.abs(y32 - y64)) < 1e-5 and np.max(np.abs(ld32 - ld64)) < 1e-4
    dx = lay32.backward(np.ones_like(y32), np.ones(2, np.float32))
    assert dx.dtype == np.float32
    assert all(g.dtype == np.float32 and np.any(g != 0) for g in lay32.grads.values())
    for m in SOLVERS:
        x32 = lay32.inverse(y32, m)
        assert x32.dtype == np.float32
        assert np.max(np.abs(x32 - x)) < 1e-4


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=0), "channels"),
        (dict(channels=2.0), "channels"),
        (dict(channels=2, kernel_size=2), "odd"),
        (dict(channels=2, kernel_size=0), "odd"),
        (dict(channels=2, solver="gauss"), "solver"),
        (dict(channels=2, init_std=-1.0), "init_std"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=f"EmergingConv.*{match}"):
        EmergingConv(**kwargs)
    with pytest.raises(TypeError, match="float32 or float64"):
        EmergingConv(2, dtype=np.int32)


def test_inverse_method_is_validated(rng):
    """(Rank, channels, dtype, NaN, the backward protocol: tests/test_layer_contract.py.)"""
    layer = make(3, 3, rng)
    with pytest.raises(ValueError, match="EmergingConv.inverse: method"):
        layer.inverse(rng.standard_normal((1, 3, 3, 3)), method="gauss")


# ---------------------------------------------------------------------- integration
def test_stability_sees_one_layer_with_two_kernels_in_solve_order(rng):
    from flownp import stability as S

    layer = make(2, 3, rng)
    assert [p for p, _ in S.iter_invertible_convs(layer)] == ["EmergingConv"]
    (K2, c2), (K1, c1) = S.layer_kernels(layer)
    assert c2 == (1, 1) and c1 == (0, 0)
    np.testing.assert_array_equal(K2, layer.kernel2)
    np.testing.assert_array_equal(K1, layer.kernel1)
