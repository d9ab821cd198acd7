"""The planar small-channel top-left convolution (flownp.kernels.conv_planar) against the
references of flownp.kernels.conv."""

import numpy as np
import pytest

from flownp import threads
from flownp.kernels import conv as K_
from flownp.kernels.conv_planar import conv_backward_planar, conv_forward_planar

# (N, H, W, C, Co, k): square and rectangular, images smaller than the kernel, several
# blocks (N large), k = 1, 2 and 5
SHAPES = [
    (5, 6, 7, 4, 4, 3),
    (3, 1, 2, 2, 3, 3),
    (2, 2, 1, 3, 3, 5),
    (40, 9, 9, 8, 8, 3),
    (2, 4, 4, 3, 5, 5),
    (3, 3, 3, 4, 4, 2),
    (3, 3, 4, 4, 6, 1),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_planar_convolution_matches_the_references_float64(shape, rng):
    N, H, W, C, Co, k = shape
    x = rng.standard_normal((N, H, W, C))
    K = rng.standard_normal((k, k, C, Co))
    dy = rng.standard_normal((N, H, W, Co))
    y = conv_forward_planar(x, K)
    np.testing.assert_allclose(y, K_.conv_forward_reference(x, K), rtol=1e-12, atol=1e-12)
    dx, dK = conv_backward_planar(x, dy, K)
    np.testing.assert_allclose(dx, K_.conv_backward_input_reference(dy, K), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        dK, K_.conv_backward_kernel_reference(x, dy, k), rtol=1e-12, atol=1e-11
    )


def test_planar_convolution_float32_and_the_16_lane_kernels_agree(rng):
    x = rng.standard_normal((40, 7, 7, 8)).astype(np.float32)
    K = (0.3 * rng.standard_normal((3, 3, 8, 8))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y = conv_forward_planar(x, K)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, K_.conv_forward(x, K), rtol=1e-5, atol=1e-5)
    dx, dK = conv_backward_planar(x, dy, K)
    np.testing.assert_allclose(dx, K_.conv_backward_input(dy, K), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dK, K_.conv_backward_kernel(x, dy, 3), rtol=1e-4, atol=1e-3)


def test_planar_convolution_does_not_depend_on_the_thread_count(rng):
    x = rng.standard_normal((64, 14, 14, 4)).astype(np.float32)
    K = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = []
    for n in (1, 2):
        with threads.limit(n):
            out.append((conv_forward_planar(x, K), *conv_backward_planar(x, dy, K)))
    for a, b in zip(*out, strict=True):
        assert np.array_equal(a, b)


def test_planar_convolution_rejects_mismatched_shapes():
    x = np.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"conv_forward_planar.*\(2, 4, 4, 3\).*\(3, 3, 4, 4\)"):
        conv_forward_planar(x, np.zeros((3, 3, 4, 4)))
    with pytest.raises(ValueError, match="dy has 2 channels"):
        conv_backward_planar(x, np.zeros((2, 4, 4, 2)), np.zeros((3, 3, 3, 3)))


# ---------------------------------------------------------------------- the ActNorm pass
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "shape", [(64, 14, 14, 4), (3, 5, 7, 3), (2, 2, 2, 48), (7,), (1, 1, 1, 1)]
)
def test_channel_affine_kernels_match_their_numpy_references(shape, dtype, rng):
    """flownp.kernels.channel_affine (runs of 16 C elements, a remainder) against NumPy; the
    float32 sums against float64 sums, no worse than NumPy's own float32 sums."""
    from flownp.kernels import channel_affine as CA

    C = shape[-1]
    x = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    scale = np.exp(rng.standard_normal(C)).astype(dtype)
    y = CA.channel_affine_forward(x, bias, scale)
    assert np.array_equal(y, CA.channel_affine_forward_reference(x, bias, scale))
    dy = rng.standard_normal(shape).astype(dtype)
    dx, db, dls = CA.channel_affine_backward(dy, y, scale)
    dx_r, db_r, dls_r = CA.channel_affine_backward_reference(dy, y, scale)
    assert np.array_equal(dx, dx_r) and db.dtype == dls.dtype == dtype
    d64, y64 = dy.astype(np.float64), y.astype(np.float64)
    for got, ref, exact in (
        (db, db_r, (d64 * scale.astype(np.float64)).reshape(-1, C).sum(0)),
        (dls, dls_r, (d64 * y64).reshape(-1, C).sum(0)),
    ):
        err_np = np.abs(ref - exact).max()
        assert np.abs(got - exact).max() <= max(2 * err_np, 1e-12 * np.abs(exact).max() + 1e-300)
