"""The compiled conditioner kernel (flownp.kernels.conditioner) against its plain NumPy
reference, on both sides of each convolution, several blocks, tiny images and float32."""

import numpy as np
import pytest

from flownp import threads
from flownp.kernels import conditioner as KC


def make(rng, N, H, W, Ci, Wd, Co, k=3, dtype=np.float64):
    x = rng.standard_normal((N, H, W, Ci))
    params = [
        0.3 * rng.standard_normal((k, k, Ci, Wd)),  # w_in
        0.1 * rng.standard_normal(Wd),  # b1
        np.exp(0.2 * rng.standard_normal(Wd)),  # s1
        0.3 * rng.standard_normal((1, 1, Wd, Wd)),  # w_mid
        0.1 * rng.standard_normal(Wd),  # b2
        np.exp(0.2 * rng.standard_normal(Wd)),  # s2
        0.3 * rng.standard_normal((k, k, Wd, Co)),  # w_out
        rng.standard_normal(Co),  # b_out
        np.exp(0.2 * rng.standard_normal(Co)),  # s_out
    ]
    dh = rng.standard_normal((N, H, W, Co))
    return x.astype(dtype), [p.astype(dtype) for p in params], dh.astype(dtype)


def run(x, params, dh):
    h, acts = KC.conditioner_forward(x, *params)
    w_in, _, s1, w_mid, _, s2, w_out, _, s_out = params
    g = KC.conditioner_backward(dh, x, h, acts, w_in, s1, w_mid, s2, w_out, s_out)
    return h, g


# (N, H, W, C_in, width, C_out, k): both sides of both convolutions, 1-pixel and 2-pixel
# images (every tap but the centre outside), batches cut into several blocks, k = 5
SHAPES = [
    (3, 5, 4, 2, 8, 4, 3),  # input side in, output side out (the MNIST case)
    (2, 4, 3, 12, 8, 24, 3),  # output side in, input side out
    (2, 1, 1, 3, 6, 4, 3),
    (3, 2, 2, 4, 5, 5, 3),
    (40, 6, 6, 2, 16, 4, 3),  # several blocks
    (2, 6, 5, 3, 7, 2, 5),
    (2, 1, 2, 2, 4, 3, 5),  # k = 5 on a 1 x 2 image: taps beyond the image entirely
]


@pytest.mark.parametrize("shape", SHAPES)
def test_conditioner_kernel_matches_its_numpy_reference_float64(shape, rng):
    N, H, W, Ci, Wd, Co, k = shape
    x, params, dh = make(rng, N, H, W, Ci, Wd, Co, k)
    h, g = run(x, params, dh)
    h_ref = KC.conditioner_forward_reference(x, *params)[0]
    g_ref = KC.conditioner_backward_reference(dh, x, *params)
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12 * np.abs(h_ref).max())
    for name, got, want in zip(g._fields, g, g_ref, strict=True):
        assert got.shape == want.shape and got.dtype == np.float64, name
        np.testing.assert_allclose(
            got, want, rtol=1e-11, atol=1e-12 * np.abs(want).max(), err_msg=name
        )


def test_conditioner_kernel_float32_is_close_to_the_float64_reference(rng):
    x, params, dh = make(rng, 24, 7, 7, 4, 32, 8)
    h, g = run(*(a.astype(np.float32) for a in (x,)), [p.astype(np.float32) for p in params],
               dh.astype(np.float32))  # fmt: skip
    h_ref = KC.conditioner_forward_reference(x, *params)[0]
    g_ref = KC.conditioner_backward_reference(dh, x, *params)
    assert h.dtype == np.float32
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=2e-5 * np.abs(h_ref).max())
    for name, got, want in zip(g._fields, g, g_ref, strict=True):
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=name)


def test_conditioner_kernel_gradients_add_up_over_a_split_batch(rng):
    """Data parallelism: the gradients of a batch equal the sums of the gradients of its two
    halves (float64, to rounding), and every sample's output is its own."""
    x, params, dh = make(rng, 40, 6, 6, 2, 16, 4)
    h, g = run(x, params, dh)
    h1, g1 = run(x[:17], params, dh[:17])
    h2, g2 = run(x[17:], params, dh[17:])
    np.testing.assert_allclose(h, np.concatenate([h1, h2]), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(g.dx, np.concatenate([g1.dx, g2.dx]), rtol=1e-13, atol=1e-14)
    for name, a, b1, b2 in zip(g._fields[1:], g[1:], g1[1:], g2[1:], strict=True):
        np.testing.assert_allclose(a, b1 + b2, rtol=1e-12, atol=1e-13, err_msg=name)


def test_conditioner_kernel_does_not_depend_on_the_thread_count(rng):
    """The blocks depend on the shapes only: the same bits with one thread and with two
    (the pool's several-thread path runs even on a one-CPU machine)."""
    x, params, dh = make(rng, 40, 6, 6, 2, 16, 4, dtype=np.float32)
    with threads.limit(1):
        h1, g1 = run(x, params, dh)
    with threads.limit(2):
        h2, g2 = run(x, params, dh)
    assert np.array_equal(h1, h2)
    for name, a, b in zip(g1._fields, g1, g2, strict=True):
        assert np.array_equal(a, b), name


def test_conditioner_kernel_propagates_nan(rng):
    """A NaN in the input reaches the output and the gradient of the first convolution
    (never turned into a number by the ReLU), as in the reference."""
    x, params, dh = make(rng, 2, 4, 4, 2, 8, 4)
    x[1, 2, 2, 0] = np.nan
    h, g = run(x, params, dh)
    assert np.isnan(h[1]).any() and np.isfinite(h[0]).all()
    assert np.isnan(g.w_in).any()
    g_ref = KC.conditioner_backward_reference(dh, x, *params)
    for name, a, b in zip(g._fields, g, g_ref, strict=True):
        assert np.array_equal(np.isnan(a), np.isnan(b)), name


def test_conditioner_kernel_rejects_mismatched_shapes(rng):
    x, params, dh = make(rng, 2, 4, 4, 2, 8, 4)
    bad = list(params)
    bad[3] = np.zeros((1, 1, 8, 7))
    with pytest.raises(ValueError, match=r"w_mid must have shape \(1, 1, 8, 8\)"):
        KC.conditioner_forward(x, *bad)
    bad = list(params)
    bad[2] = np.ones(7)
    with pytest.raises(ValueError, match=r"s1 must have shape \(8,\)"):
        KC.conditioner_forward(x, *bad)
    h, acts = KC.conditioner_forward(x, *params)
    w_in, _, s1, w_mid, _, s2, w_out, _, s_out = params
    with pytest.raises(ValueError, match=r"dh must be float64 of shape \(2, 4, 4, 4\)"):
        KC.conditioner_backward(dh[:, :3], x, h, acts, w_in, s1, w_mid, s2, w_out, s_out)
    with pytest.raises(ValueError, match="acts do not belong"):
        KC.conditioner_backward(dh[:1], x[:1], h[:1], acts, w_in, s1, w_mid, s2, w_out, s_out)


# ---------------------------------------------------------------------- the coupling's block pass
@pytest.mark.parametrize("scale", ["sigmoid", "exp", "softclamp", None])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_coupling_block_kernels_match_the_layers_numpy_functions(scale, dtype, rng):
    """flownp.kernels.coupling against the layer's readable block_forward / block_backward,
    with raw scales far out in both tails (the stable forms of the sigmoid)."""
    from flownp.kernels.coupling import coupling_block_backward, coupling_block_forward
    from flownp.layers.coupling import block_backward, block_forward

    N, H, W, C, lo = 5, 3, 4, 8, 2
    Cb = 4
    x = rng.standard_normal((N, H, W, C)).astype(dtype)
    h = rng.standard_normal((N, H, W, Cb if scale is None else 2 * Cb)).astype(dtype)
    if scale in ("sigmoid", "softclamp"):  # the tails (softclamp: flat, log s -> -2 / 2)
        h[0, 0, 0, 1::2] = [-60.0, -20.0, 20.0, 60.0]
    y = np.full_like(x, 7.0)
    logdet = np.arange(N, dtype=np.float64)
    coupling_block_forward(x, h, lo, scale, y, logdet)
    yb, log_s = block_forward(x[..., lo : lo + Cb], h, scale)
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(y[..., lo : lo + Cb], yb, rtol=rtol, atol=0)
    assert np.all(y[..., :lo] == 7.0) and np.all(y[..., lo + Cb :] == 7.0)  # nothing else
    want = np.arange(N) + (0 if log_s is None else log_s.reshape(N, -1).sum(axis=1, dtype=float))
    np.testing.assert_allclose(logdet, want, rtol=rtol * 10)
    dy = rng.standard_normal(x.shape).astype(dtype)
    dlogdet = rng.standard_normal(N).astype(dtype)
    dx = np.ones_like(x)
    dh = coupling_block_backward(dy, y, h, dlogdet, lo, scale, dx)
    dxb, dh_ref = block_backward(dy[..., lo : lo + Cb], dlogdet, y[..., lo : lo + Cb], h, scale)
    np.testing.assert_allclose(dx[..., lo : lo + Cb], 1 + dxb, rtol=rtol, atol=rtol)
    assert np.all(dx[..., :lo] == 1) and np.all(dx[..., lo + Cb :] == 1)
    np.testing.assert_allclose(dh, dh_ref, rtol=rtol, atol=rtol * np.abs(dh_ref).max())


def test_channel_copy_and_add_match_numpy(rng):
    from flownp.kernels.coupling import add_to_channels, copy_channels

    src = rng.standard_normal((3, 4, 5, 6))
    dst = rng.standard_normal((3, 4, 5, 6))
    want = dst.copy()
    want[..., 1:4] = src[..., 1:4]
    copy_channels(src, dst, 1, 4)
    assert np.array_equal(dst, want)
    part = rng.standard_normal((3, 4, 5, 2))
    want[..., :2] += part
    add_to_channels(dst, part)
    assert np.array_equal(dst, want)
    with pytest.raises(ValueError, match="channels"):
        copy_channels(src, dst, 2, 7)
    with pytest.raises(ValueError, match="add_to_channels"):
        add_to_channels(part, dst)
