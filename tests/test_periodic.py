"""PeriodicConv (Emerging, Section 3.2): the FFT forward, log-determinant and inverse against the
dense circulant matrix built entry by entry (:func:`verification.dense.circulant_matrix`),
the singularity rule of the free parameterisation, and the guard's invertibility bound.

The layer contract (round trip, finite-difference Jacobian and gradients, bad input) is in
``tests/test_layer_contract.py``."""

import numpy as np
import pytest

from flownp.errors import SingularKernelError
from flownp.layers.periodic import PeriodicConv, frequency_blocks, frequency_weights
from flownp.testing import check_layer_gradients, randomize_params
from verification.dense import circulant_matrix

# (H, W): square, H != W, odd and even widths, an image smaller than the kernel, one pixel
SIZES = [(4, 4), (3, 5), (5, 6), (2, 1), (1, 1), (6, 3)]


def make(C, k, rng, *, guard=None, std=0.2, dtype=np.float64):
    layer = PeriodicConv(C, k, seed=int(rng.integers(1 << 31)), init_std=std, guard=guard)
    randomize_params(layer, rng, 0.2)
    if dtype != np.float64:
        layer32 = PeriodicConv(C, k, guard=guard, dtype=dtype)
        layer32.load_state_dict(layer.state_dict())
        return layer32
    return layer


def set_kernel_c1(layer: PeriodicConv, K: np.ndarray) -> None:
    """Give a one-channel layer the effective kernel ``K (k, k)`` (no guard)."""
    p = layer.centre
    layer.params["weight"][..., 0, 0] = K
    layer.params["weight"][p] = 0.0
    layer.buffers["sign"][...] = np.sign(K[p])
    layer.params["log_s"][...] = np.log(abs(K[p]))
    np.testing.assert_array_equal(layer.kernel[..., 0, 0], K)


@pytest.mark.parametrize("H, W", SIZES)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_forward_logdet_inverse_against_the_dense_circulant_matrix(H, W, k, rng):
    C = 3
    layer = make(C, k, rng)
    x = rng.standard_normal((2, H, W, C))
    y, logdet = layer.forward(x)
    layer.clear_cache()
    M = circulant_matrix(layer.kernel, H, W)  # (HWC, HWC), entry by entry
    np.testing.assert_allclose(y.reshape(2, -1), x.reshape(2, -1) @ M.T, atol=1e-12)
    sign, ld = np.linalg.slogdet(M)
    assert sign != 0
    np.testing.assert_allclose(logdet, ld, rtol=0, atol=1e-10 * max(1.0, abs(ld)))
    xr = layer.inverse(y)
    np.testing.assert_allclose(xr.reshape(2, -1), np.linalg.solve(M, y.reshape(2, -1).T).T, 1e-10)
    assert np.abs(xr - x).max() <= 1e-10 * np.abs(x).max()


def test_frequency_blocks_are_the_dft_of_the_kernel(rng):
    """B(u, v) from the explicit phases equals the 2D DFT of the kernel placed on the torus
    (tap (a, b) at pixel (-(a-p)) mod H, (-(b-p)) mod W), and the weights count every
    frequency of the full spectrum once."""
    H, W, k, C = 5, 6, 3, 2
    K = rng.standard_normal((k, k, C, C))
    torus = np.zeros((H, W, C, C))
    for a in range(k):
        for b in range(k):
            torus[(1 - a) % H, (1 - b) % W] += K[a, b]
    full = np.fft.fft2(torus, axes=(0, 1))
    np.testing.assert_allclose(frequency_blocks(K, H, W), full[:, : W // 2 + 1], atol=1e-12)
    for w in (1, 2, 5, 6):
        assert frequency_weights(w).sum() == w


@pytest.mark.parametrize("guard", [None, 0.9])
def test_backward_against_finite_differences_on_odd_and_even_sizes(guard, rng):
    for H, W in [(3, 5), (4, 2), (1, 3)]:
        layer = make(2, 3, rng, guard=guard)
        res = check_layer_gradients(layer, rng.standard_normal((2, H, W, 2)), rng)
        assert res.max_error < 1e-6, (H, W, str(res))


def test_float32_matches_float64(rng):
    layer = make(4, 3, rng)
    l32 = make(4, 3, np.random.default_rng(0), dtype=np.float32)
    l32.load_state_dict(layer.state_dict())
    x = rng.standard_normal((3, 6, 5, 4))
    y64, ld64 = layer.forward(x)
    y32, ld32 = l32.forward(x.astype(np.float32))
    assert y32.dtype == ld32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, atol=1e-5)
    np.testing.assert_allclose(ld32, ld64, rtol=1e-6)
    np.testing.assert_allclose(l32.inverse(y32), x, atol=1e-5)


def test_laplacian_kernel_is_singular_and_refused(rng):
    """A free kernel can make the circulant matrix singular with a perfectly fine centre:
    the discrete Laplacian annihilates the constant image. The layer names the frequency."""
    layer = PeriodicConv(1, 3)
    set_kernel_c1(layer, np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]))
    H = W = 4
    M = circulant_matrix(layer.kernel, H, W)
    assert np.linalg.matrix_rank(M) == H * W - 1  # exactly one null direction: the constant
    np.testing.assert_allclose(M @ np.ones(H * W), 0.0, atol=1e-14)
    x = rng.standard_normal((1, H, W, 1))
    with pytest.raises(
        SingularKernelError,
        match=r"PeriodicConv.forward: the frequency block "
        r"\(u=0, v=0\) .* singular",
    ):
        layer.forward(x)
    with pytest.raises(SingularKernelError, match=r"PeriodicConv.inverse: .*\(u=0, v=0\)"):
        layer.inverse(x)


def test_near_singular_block_is_refused_in_float32_but_not_float64(rng):
    """The rule kappa_1(B) >= 1 / (C eps) uses the working precision of the layer."""
    K = np.array([[0.0, 1.0, 0.0], [1.0, -4.0 - 1e-9, 1.0], [0.0, 1.0, 0.0]])
    l64 = PeriodicConv(1, 3)
    set_kernel_c1(l64, K)
    x = rng.standard_normal((1, 4, 4, 1))
    y, logdet = l64.forward(x)  # cond ~ 8e9 < 1 / eps64: refused only in float32
    sign, ld = np.linalg.slogdet(circulant_matrix(K[..., None, None], 4, 4))
    assert sign != 0 and abs(logdet[0] - ld) < 1e-6 * abs(ld)
    l32 = PeriodicConv(1, 3, dtype=np.float32)
    l32.load_state_dict(l64.state_dict())
    with pytest.raises(SingularKernelError, match="singular to working precision"):
        l32.forward(x.astype(np.float32))


@pytest.mark.parametrize("mode", ["tanh", "clip"])
def test_guard_makes_any_parameters_invertible_with_the_bound(mode, rng):
    """With the guard, even huge taps around the Laplacian-like kernel stay invertible:
    ||M^{-1}||_inf <= ||A^{-1}||_inf / (1 - rho), measured on the dense circulant matrix."""
    rho = 0.8
    for trial in range(4):
        layer = PeriodicConv(3, 3, seed=trial, init_std=10.0, guard=rho, guard_mode=mode)
        layer.params["log_s"][...] = rng.normal(0.0, 0.5, 3)
        A = layer.centre_matrix()
        bound = np.abs(np.linalg.inv(A)).sum(axis=1).max() / (1 - rho)
        for H, W in [(4, 4), (3, 5), (1, 2)]:
            M = circulant_matrix(layer.kernel, H, W)
            minv = np.abs(np.linalg.inv(M)).sum(axis=1).max()
            assert minv <= bound * (1 + 1e-9), (trial, H, W, minv, bound)
            x = rng.standard_normal((1, H, W, 3))
            y, logdet = layer.forward(x)
            layer.clear_cache()
            assert abs(logdet[0] - np.linalg.slogdet(M)[1]) < 1e-9
            np.testing.assert_allclose(layer.inverse(y), x, atol=1e-10)


def test_guard_rescales_only_outside_the_region(rng):
    """Small taps: clip is the identity and the guarded kernel equals the free one."""
    a = PeriodicConv(4, 3, seed=5, init_std=1e-3)
    b = PeriodicConv(4, 3, seed=5, init_std=1e-3, guard=0.9, guard_mode="clip")
    np.testing.assert_array_equal(a.kernel, b.kernel)
    c = PeriodicConv(4, 3, seed=5, init_std=1.0, guard=0.9)
    assert np.abs(c.kernel - PeriodicConv(4, 3, seed=5, init_std=1.0).kernel).max() > 0.1


def test_initial_layer_and_parameters():
    layer = PeriodicConv(4, 3, seed=1)
    assert set(layer.params) == {"weight", "lower", "upper", "log_s"}
    assert set(layer.buffers) == {"sign", "perm"}
    K = layer.kernel
    A = layer.centre_matrix()
    np.testing.assert_allclose(K[1, 1], A.T)
    np.testing.assert_allclose(A @ A.T, np.eye(4), atol=1e-12)  # a rotation at the centre
    assert np.abs(K).max() < 1.01 and np.count_nonzero(layer.params["weight"][1, 1]) == 0


def test_centre_tap_weight_gets_no_gradient(rng):
    layer = make(3, 3, rng)
    layer.params["weight"][1, 1] = 5.0  # masked: must not change anything
    x = rng.standard_normal((2, 4, 4, 3))
    y, _ = layer.forward(x)
    layer.zero_grad()
    layer.backward(rng.standard_normal(y.shape), np.ones(2))
    assert np.all(layer.grads["weight"][1, 1] == 0)
    np.testing.assert_array_equal(layer.kernel[1, 1], layer.centre_matrix().T)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"kernel_size": 2}, "odd"),
        ({"kernel_size": 0}, "odd"),
        ({"channels": 0}, "channels"),
        ({"guard": 1.0}, "guard"),
        ({"init_std": -1.0}, "init_std"),
    ],
)
def test_constructor_validation(kw, match):
    args = {"channels": 3, "kernel_size": 3, **kw}
    with pytest.raises(ValueError, match=match):
        PeriodicConv(args.pop("channels"), args.pop("kernel_size"), **args)
