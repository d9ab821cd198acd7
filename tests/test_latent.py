"""Tests of flownp.latent and the manipulate / interpolate / reconstruct commands.

The model is a small stand-in flow built from existing layers (ActNorm -> CInCConv -> a fixed
random orthogonal map of the flattened vector), wrapped to the FlowModel interface
(forward(x) -> (z (N, D), logdet), inverse(z), config.image_shape / config.dtype), so these
tests do not depend on flownp.model.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest

from flownp import checkpoint, figures, latent
from flownp.data import attributes, pixels
from flownp.errors import DataError, NonFiniteError
from flownp.layers import ActNorm, CInCConv
from flownp.testing import randomize_params


class StandInFlow:
    """ActNorm -> CInCConv (3x3, randomized) -> z = Q y_vec, Q random orthogonal."""

    def __init__(self, shape=(4, 4, 2), dtype=np.float64, seed=0):
        H, W, C = shape
        rng = np.random.default_rng(seed)
        self.config = SimpleNamespace(image_shape=tuple(shape), dtype=np.dtype(dtype))
        self.actnorm = ActNorm(C, dtype=dtype)
        self.actnorm.initialize(rng.uniform(-0.5, 0.5, (16, H, W, C)).astype(dtype))
        self.conv = CInCConv(C, 3, dtype=dtype, seed=seed)
        randomize_params(self.conv, rng, 0.05)
        D = H * W * C
        self.Q = np.linalg.qr(rng.standard_normal((D, D)))[0].astype(dtype)  # (D, D)
        self.cleared = 0

    def forward(self, x):
        y, l1 = self.actnorm.forward(x)
        y, l2 = self.conv.forward(y)
        z = y.reshape(len(x), -1) @ self.Q.T  # (N, D)
        return z, l1 + l2

    def inverse(self, z):
        y = (z @ self.Q).reshape((len(z),) + self.config.image_shape)
        return self.actnorm.inverse(self.conv.inverse(y))

    def clear_cache(self):
        self.cleared += 1
        self.actnorm.clear_cache()
        self.conv.clear_cache()


class OffsetInverse(StandInFlow):
    """A deliberately inexact inverse (adds 0.01): the report must see it."""

    def inverse(self, z):
        return super().inverse(z) + self.config.dtype.type(0.01)


@pytest.fixture(scope="module")
def flow():
    return StandInFlow()


def uint8_images(rng, n, shape=(4, 4, 2)):
    return rng.integers(0, 256, size=(n,) + tuple(shape), dtype=np.uint8)


# --------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_encode_decode_exact(rng, dtype, tol):
    model = StandInFlow(dtype=dtype, seed=1)
    u = uint8_images(rng, 10)
    z = latent.encode(model, u, batch_size=4)
    assert z.shape == (10, 32) and z.dtype == dtype
    x = latent.decode(model, z, batch_size=3)
    assert x.shape == (10, 4, 4, 2) and x.dtype == dtype
    assert np.max(np.abs(x - ((u + 0.5) / 256.0 - 0.5))) < tol  # bin centres
    np.testing.assert_array_equal(pixels.model_to_images(x), u)
    assert model.cleared >= 3 + 4  # activations released after every batch


def test_encode_is_model_forward_on_the_bin_centres(flow, rng):
    u = uint8_images(rng, 7)
    x = (u.astype(np.float64) + 0.5) / 256 - 0.5
    z_ref, _ = flow.forward(x)
    flow.clear_cache()
    np.testing.assert_allclose(latent.encode(flow, u, batch_size=2), z_ref, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(pixels.images_to_model(u, np.float32), x.astype(np.float32))


def test_pixel_conversion_round_trip_and_clipping():
    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    for dt in (np.float32, np.float64):
        x = pixels.images_to_model(u, dt)
        assert x.dtype == dt and x.min() == 0.5 / 256 - 0.5 and x.max() == 255.5 / 256 - 0.5
        np.testing.assert_array_equal(pixels.model_to_images(x + 0.0019), u)  # < 1/512
        np.testing.assert_array_equal(pixels.model_to_images(x - 0.0019), u)
    assert pixels.model_to_images(np.array([-3.0, 3.0])).tolist() == [0, 255]
    with pytest.raises(NonFiniteError):
        pixels.model_to_images(np.array([0.0, np.nan]))
    # one rounding rule: every point of a bin maps to its pixel (a dequantised sample too)
    edges = (np.arange(256) / 256 - 0.5).reshape(u.shape)
    np.testing.assert_array_equal(pixels.model_to_images(edges), u)
    np.testing.assert_array_equal(pixels.model_to_images(edges + (1 - 1e-9) / 256), u)
    np.testing.assert_array_equal(pixels.to_uint8(edges), u)


def test_encode_decode_validation(flow, rng):
    with pytest.raises(ValueError, match="model expects"):
        latent.encode(flow, uint8_images(rng, 2, (4, 4, 1)))
    with pytest.raises(TypeError, match="float32"):
        latent.encode(flow, np.zeros((2, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        latent.encode(flow, np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="D = 31"):
        latent.decode(flow, np.zeros((2, 31)))
    z = np.zeros((2, 32))
    z[1, 3] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        latent.decode(flow, z)


def test_decode_reports_nonfinite_inverse(rng):
    model = StandInFlow(seed=2)
    model.inverse = lambda z: np.full((len(z), 4, 4, 2), np.inf)
    with pytest.raises(NonFiniteError, match="unstable inverse"):
        latent.decode(model, rng.standard_normal((2, 32)))


# --------------------------------------------------------------------------- directions


def reference_regression(z, a):
    zc, ac = z - z.mean(0), a - a.mean()
    return (ac @ zc) / (ac @ ac)


def test_directions_recover_known_direction(rng):
    N, D = 4000, 16
    v = rng.standard_normal(D)
    v *= 3 / np.linalg.norm(v)
    noise = rng.standard_normal((N, D))
    # continuous attribute: z = a v + noise -> regression slope v
    a = rng.standard_normal(N)
    v_hat = latent.attribute_directions(a[:, None] * v + noise, a)
    assert np.linalg.norm(v_hat - v) < 0.15  # sampling error ~ sqrt(D / N) = 0.06
    # +-1 labels: regression = v per unit of a, mean difference = 2 v (from -1 to +1)
    s = rng.choice([-1.0, 1.0], N)
    z = s[:, None] * v + noise
    assert np.linalg.norm(latent.attribute_directions(z, s) - v) < 0.15
    md = latent.attribute_directions(z, s, method="mean_difference")
    assert np.linalg.norm(md - 2 * v) < 0.3
    # a direction of the opposite attribute points the other way
    assert np.dot(latent.attribute_directions(z, -s), v) < -8


def test_binary_regression_equals_mean_difference_and_covariance_scale(rng):
    N, D = 300, 5
    b = (rng.random(N) < 0.2).astype(float)  # 0/1, p = 0.2
    z = rng.standard_normal((N, D)) + 2.0 * b[:, None]
    reg = latent.attribute_directions(z, b, method="regression")
    md = latent.attribute_directions(z, b, method="mean_difference")
    np.testing.assert_allclose(reg, md, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reg, z[b > 0].mean(0) - z[b == 0].mean(0), rtol=0, atol=1e-12)
    cov = latent.attribute_directions(z, b, method="covariance")
    np.testing.assert_allclose(cov, b.var() * reg, rtol=0, atol=1e-12)
    # +-1 coding of the same labels: regression is exactly half the mean difference
    pm = 2 * b - 1
    np.testing.assert_allclose(latent.attribute_directions(z, pm), md / 2, rtol=0, atol=1e-12)


def test_streaming_statistics_match_one_pass_reference(rng):
    N, D = 257, 6
    z = 1e4 + rng.standard_normal((N, D))  # large offsets: cancellation would show
    A = np.stack([1e3 + rng.standard_normal(N), rng.choice([-1.0, 1.0], N)], axis=1)
    stats = latent.AttributeStatistics(D, ["c", "pm"], threshold=[1e3, 0.0])
    for sl in (slice(0, 1), slice(1, 8), slice(8, 8), slice(8, 100), slice(100, N)):
        stats.update(z[sl], A[sl])
    assert stats.n == N
    reg = stats.directions("regression")
    for k in range(2):
        np.testing.assert_allclose(reg[k], reference_regression(z, A[:, k]), rtol=1e-9, atol=0)
    md = stats.directions("mean_difference")
    pos = A[:, 1] > 0
    np.testing.assert_allclose(md[1], z[pos].mean(0) - z[~pos].mean(0), rtol=0, atol=1e-9)
    assert stats.n_pos[1] == pos.sum() and stats.n_neg[1] == (~pos).sum()
    hi = A[:, 0] > 1e3
    np.testing.assert_allclose(md[0], z[hi].mean(0) - z[~hi].mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.direction("pm"), reg[1], rtol=0, atol=0)


def test_direction_errors(rng):
    z = rng.standard_normal((10, 3))
    with pytest.raises(DataError, match="empty group"):
        latent.attribute_directions(z, np.ones(10), method="mean_difference")
    with pytest.raises(DataError, match="constant"):
        latent.attribute_directions(z, np.ones(10))
    with pytest.raises(ValueError, match="method"):
        latent.attribute_directions(z, rng.standard_normal(10), method="pca")
    a = rng.standard_normal(10)
    a[2] = np.nan
    with pytest.raises(NonFiniteError):
        latent.attribute_directions(z, a)
    stats = latent.AttributeStatistics(3, ["x"])
    with pytest.raises(KeyError, match="'y'"):
        stats.direction("y")


def test_end_to_end_direction_through_the_model(rng):
    """Images built so that their latents are z = a v + noise: the direction found from the
    images is v, and editing by s v moves the latent by exactly s v."""
    model = StandInFlow(seed=3)
    N, D = 600, 32
    v = rng.standard_normal(D)
    v *= 2 / np.linalg.norm(v)
    a = rng.choice([-1.0, 1.0], N)
    z = a[:, None] * v + 0.5 * rng.standard_normal((N, D))
    x = latent.decode(model, z)  # float64 images in model space
    stats = latent.encode_statistics(model, x, a, ["a"], batch_size=128)
    v_hat = stats.direction("a")
    cos = v_hat @ v / (np.linalg.norm(v_hat) * np.linalg.norm(v))
    assert cos > 0.99 and abs(np.linalg.norm(v_hat) / 2 - 1) < 0.05
    strengths = latent.strength_sweep(1.5, 2)
    edited = latent.manipulate(model, x[:3], v_hat, strengths)  # (3, 5, H, W, C)
    assert edited.shape == (3, 5, 4, 4, 2)
    np.testing.assert_allclose(edited[:, 2], x[:3], rtol=0, atol=1e-12)  # s = 0: the images
    z_back = latent.encode(model, edited.reshape((15, 4, 4, 2))).reshape(3, 5, D)
    expect = z[:3, None, :] + strengths[None, :, None] * v_hat
    np.testing.assert_allclose(z_back, expect, rtol=0, atol=1e-10)


def test_strength_sweep_and_shift():
    s = latent.strength_sweep(2.0, 3)
    assert s.shape == (7,) and s[3] == 0.0 and s[0] == -2.0 and s[-1] == 2.0
    np.testing.assert_allclose(s, -s[::-1], rtol=0, atol=0)
    z = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = latent.shift_latents(z, np.array([1.0, 0.0, -1.0]), s)
    assert out.shape == (2, 7, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 3], z)
    np.testing.assert_allclose(out[1, 6], [5.0, 4.0, 3.0])
    with pytest.raises(ValueError):
        latent.strength_sweep(1.0, 0)
    with pytest.raises(ValueError, match="direction"):
        latent.shift_latents(z, np.ones(4), s)


# --------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("method", latent.INTERPOLATIONS)
def test_interpolation_endpoints_exact(rng, method):
    z0, z1 = rng.standard_normal((5, 50)), rng.standard_normal((5, 50))
    z1[4] = -2 * z0[4]  # antiparallel pair: the spherical path falls back to linear
    path = latent.interpolate_latents(z0, z1, 6, method)
    assert path.shape == (5, 6, 50)
    np.testing.assert_array_equal(path[:, 0], z0)
    np.testing.assert_array_equal(path[:, -1], z1)
    assert np.isfinite(path).all()
    single = latent.interpolate_latents(z0[0], z1[0], 3, method)
    assert single.shape == (3, 50)
    np.testing.assert_array_equal(single[[0, -1]], np.stack([z0[0], z1[0]]))


def test_interpolation_paths(rng):
    z0, z1 = rng.standard_normal(40), rng.standard_normal(40)
    lin = latent.interpolate_latents(z0, z1, 5, "linear")
    np.testing.assert_allclose(lin[2], (z0 + z1) / 2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lin[1], 0.75 * z0 + 0.25 * z1, rtol=0, atol=1e-15)
    z1 *= np.linalg.norm(z0) / np.linalg.norm(z1)  # equal norms: slerp stays on the sphere
    sph = latent.interpolate_latents(z0, z1, 9, "spherical")
    np.testing.assert_allclose(np.linalg.norm(sph, axis=1), np.linalg.norm(z0), rtol=1e-12)
    mid = sph[4] / np.linalg.norm(sph[4])
    bis = (z0 + z1) / np.linalg.norm(z0 + z1)
    np.testing.assert_allclose(mid, bis, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        latent.interpolate_latents(z0, z1, 1)
    with pytest.raises(ValueError, match="method"):
        latent.interpolate_latents(z0, z1, 3, "cubic")


def test_interpolate_images_endpoints_are_the_images(flow, rng):
    u0, u1 = uint8_images(rng, 3), uint8_images(rng, 3)
    for method in latent.INTERPOLATIONS:
        out = latent.interpolate(flow, u0, u1, 4, method=method)
        assert out.shape == (3, 4, 4, 4, 2)
        np.testing.assert_array_equal(pixels.model_to_images(out[:, 0]), u0)
        np.testing.assert_array_equal(pixels.model_to_images(out[:, -1]), u1)


# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_report(rng):
    u = uint8_images(rng, 6)
    report, rec = latent.reconstruction_report(StandInFlow(seed=4), u, batch_size=4)
    assert report.n_images == 6 and report.dtype == "float64"
    assert report.max_abs_error < 1e-12 and report.exact_uint8
    assert rec.shape == u.shape
    bad, _ = latent.reconstruction_report(OffsetInverse(seed=4), u)
    assert abs(bad.max_abs_error - 0.01) < 1e-9 and abs(bad.rms_error - 0.01) < 1e-9
    assert bad.uint8_mismatches > 0 and not bad.exact_uint8
    assert "1.000e-02" in str(bad)


# --------------------------------------------------------------------------- figures


def red_pixels(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)[..., :3]
    return int(np.sum((img[..., 0] > 0.8) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)))


def test_save_image_grid(tmp_path, rng):
    grid = rng.uniform(-0.5, 0.5, (2, 5, 6, 6, 1))
    p1 = figures.save_image_grid(
        grid,
        tmp_path / "sub" / "a.png",
        column_labels=["-2", "-1", "original", "+1", "+2"],
        row_labels=["x", "y"],
        highlight_column=2,
        title="t",
    )
    p2 = figures.save_image_grid(grid, tmp_path / "b.png")
    assert p1.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert red_pixels(p1) > 0 and red_pixels(p2) == 0  # only the highlighted version
    rgb = rng.integers(0, 256, (1, 3, 5, 5, 3), dtype=np.uint8)
    figures.save_image_grid(rgb, tmp_path / "c.png")
    with pytest.raises(ValueError, match="column labels"):
        figures.save_image_grid(grid, tmp_path / "d.png", column_labels=["a"])
    with pytest.raises(ValueError, match="rows, columns"):
        figures.save_image_grid(grid[0], tmp_path / "e.png")


# --------------------------------------------------------------------------- MNIST attributes


def bar(width, length, size=28):
    im = np.zeros((size, size), np.uint8)
    r0, c0 = (size - length) // 2, (size - width) // 2
    im[r0 : r0 + length, c0 : c0 + width] = 255
    return im[..., None]


def sheared_bar(s, width=3, size=28):
    """An anti-aliased bar whose centre moves s pixels right per pixel upwards."""
    im = np.zeros((size, size))
    cols = np.arange(size)
    for i in range(4, size - 4):
        c = size / 2 + s * ((size - 1) / 2 - i)
        im[i] = np.clip(width / 2 + 0.5 - np.abs(cols - c), 0, 1)
    return (im * 255).astype(np.uint8)[..., None]


def test_stroke_thickness_measures_width_not_length():
    ims = np.stack([bar(2, 20), bar(3, 20), bar(5, 20), bar(3, 10), bar(5, 10)])
    t = attributes.stroke_thickness(ims)
    assert t[0] < t[1] < t[2]
    np.testing.assert_allclose(t[:3], [2, 3, 5], rtol=0.1)
    np.testing.assert_allclose(t[3:], [3, 5], rtol=0.2)  # half the length, same width
    ink = attributes.ink_mass(ims)
    assert ink[3] < ink[1] / 1.9  # total ink, by contrast, halves with the length
    yy, xx = np.mgrid[:28, :28]
    r = np.hypot(yy - 13.5, xx - 13.5)
    rings = np.stack([((np.abs(r - 9) < w / 2) * 255).astype(np.uint8)[..., None] for w in (2, 4)])
    tr = attributes.stroke_thickness(rings)
    assert tr[0] < tr[1]
    np.testing.assert_allclose(tr, [2, 4], rtol=0.15)
    blank = np.zeros((1, 28, 28, 1), np.uint8)
    assert attributes.stroke_thickness(blank)[0] == 0 and attributes.slant(blank)[0] == 0


def test_slant_sign_and_value():
    shears = [-0.4, -0.2, 0.0, 0.2, 0.4]
    sl = attributes.slant(np.stack([sheared_bar(s) for s in shears]))
    np.testing.assert_allclose(sl, shears, atol=0.02)
    assert sl[3] > 0 > sl[1]  # "/" leans right: positive
    assert abs(attributes.slant(bar(3, 20)[None])[0]) < 1e-12


def test_one_hot_and_mnist_labelled(rng):
    np.testing.assert_array_equal(attributes.one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(DataError, match="label 10 at index 1"):
        attributes.one_hot(np.array([1, 10]))
    ims = np.stack([bar(w, 10 + 2 * i, 16) for i, w in enumerate([1, 2, 3, 4, 5, 6])])
    ims[2:4] = np.stack([sheared_bar(s, 3, 16) for s in (0.3, -0.3)])
    data = attributes.mnist_labelled(ims, np.array([0, 1, 2, 3, 4, 9]))
    assert data.attribute_names[:10] == tuple(f"digit_{d}" for d in range(10))
    assert data.attribute_names[10:] == ("thickness", "slant", "ink")
    assert data.attributes.shape == (6, 13)
    np.testing.assert_allclose(data.attributes[:, 10:].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(data.attributes[:, 10:].std(0), 1, atol=1e-12)
    assert data.attribute("slant")[2] > 0 > data.attribute("slant")[3]
    assert data.attribute("digit_9")[5] == 1 and data.attribute("digit_9")[:5].sum() == 0
    with pytest.raises(KeyError, match="available"):
        data.attribute("colour")
    with pytest.raises(DataError, match="labels"):
        attributes.mnist_labelled(ims, np.array([1, 2]))


# --------------------------------------------------------------------------- CelebA format

GOOD = "3\nSmiling Male Eyeglasses \n000001.jpg  1 -1 -1\n000002.jpg -1  1  1\n000003.jpg 1 1 -1\n"


def write(tmp_path, text, name="list_attr_celeba.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_read_celeba_attributes(tmp_path):
    t = attributes.read_celeba_attributes(write(tmp_path, GOOD.replace("\n", "\r\n") + "\n\n"))
    assert t.names == ("Smiling", "Male", "Eyeglasses")
    assert t.filenames == ("000001.jpg", "000002.jpg", "000003.jpg")
    assert t.values.dtype == np.int8
    np.testing.assert_array_equal(t.values, [[1, -1, -1], [-1, 1, 1], [1, 1, -1]])
    plus = attributes.read_celeba_attributes(write(tmp_path, GOOD.replace(" 1 1 -1", " +1 +1 -1")))
    np.testing.assert_array_equal(plus.values, t.values)


BAD_FILES = {
    "empty": ("", "too short"),
    "count": ("three\nA B\nx.jpg 1 1\n", "line 1: expected the number of images"),
    "no-names": ("1\n\nx.jpg 1 1\n", "line 2: expected the attribute names"),
    "dup-names": ("1\nA A\nx.jpg 1 1\n", "line 2: repeated attribute name"),
    "short-row": (
        "2\nA B\nx.jpg 1 1\ny.jpg 1\n",
        "line 4: expected a file name and 2 values, got 1",
    ),
    "long-row": ("1\nA B\nx.jpg 1 1 1\n", "line 3: expected a file name and 2 values, got 3"),
    "bad-value": ("2\nA B\nx.jpg 1 1\ny.jpg 1 0\n", "line 4: attribute 'B' has value '0'"),
    "text-value": ("1\nA B\nx.jpg yes 1\n", "line 3: attribute 'A' has value 'yes'"),
    "fewer-rows": ("3\nA B\nx.jpg 1 1\ny.jpg -1 1\n", "declares 3 images but the file lists 2"),
    "dup-file": (
        "2\nA B\nx.jpg 1 1\nx.jpg -1 1\n",
        "line 4: file name 'x.jpg' already listed on line 3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_attribute_files(tmp_path, case):
    text, message = BAD_FILES[case]
    p = write(tmp_path, text)
    with pytest.raises(DataError) as err:
        attributes.read_celeba_attributes(p)
    assert str(p) in str(err.value) and message in str(err.value)


def test_attribute_file_missing_or_binary(tmp_path):
    with pytest.raises(DataError, match="not found"):
        attributes.read_celeba_attributes(tmp_path / "nope.txt")
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="UTF-8"):
        attributes.read_celeba_attributes(p)


def write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_load_image_folder_crops_the_centre(tmp_path):
    img = np.zeros((8, 12, 3), np.uint8)
    img[:, :, 0] = 255  # red borders
    img[:, 2:10] = [0, 0, 255]  # blue centred 8 x 8 square
    write_png(tmp_path / "a.png", img)
    write_png(tmp_path / "g.png", np.full((10, 10), 77, np.uint8))
    out = attributes.load_image_folder(tmp_path, ["a.png"], size=(4, 4))
    assert out.shape == (1, 4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0].reshape(-1, 3), np.tile([0, 0, 255], (16, 1)))
    wide = attributes.load_image_folder(tmp_path, ["a.png"], size=(8, 12), crop=(8, 12))
    np.testing.assert_array_equal(wide[0], img)  # no crop, no resize: identical
    grey = attributes.load_image_folder(tmp_path, ["g.png", "g.png"], size=(5, 5), channels=1)
    assert grey.shape == (2, 5, 5, 1) and np.all(grey == 77)
    with pytest.raises(DataError, match="missing.png: image not found"):
        attributes.load_image_folder(tmp_path, ["a.png", "missing.png"], size=(4, 4))
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(DataError, match="junk.jpg: not a readable image"):
        attributes.load_image_folder(tmp_path, ["junk.jpg"], size=(4, 4))
    with pytest.raises(DataError, match="crop"):
        attributes.load_image_folder(tmp_path, ["a.png"], size=(4, 4), crop=20)


def make_celeba(tmp_path, rng, n=24, size=(7, 5)):
    """A CelebA-style folder: attribute 'Bright' = +1 for bright images."""
    folder = tmp_path / "img"
    folder.mkdir()
    lines = [str(n), "Bright Random"]
    for i in range(n):
        bright = i % 2 == 0
        base = 170 if bright else 60
        arr = np.clip(base + rng.integers(-40, 40, size + (3,)), 0, 255).astype(np.uint8)
        write_png(folder / f"{i:06d}.png", arr)
        lines.append(f"{i:06d}.png {1 if bright else -1} {rng.choice([-1, 1])}")
    attrs = write(tmp_path, "\n".join(lines) + "\n")
    return attrs, folder


def test_load_celeba(tmp_path, rng):
    attrs, folder = make_celeba(tmp_path, rng)
    data = attributes.load_celeba(attrs, folder, image_shape=(4, 4, 3), start=20)
    assert data.images.shape == (4, 4, 4, 3) and data.attribute_names == ("Bright", "Random")
    np.testing.assert_array_equal(data.attribute("Bright"), [1, -1, 1, -1])
    with pytest.raises(DataError, match="no rows"):
        attributes.load_celeba(attrs, folder, image_shape=(4, 4, 3), start=30)


# --------------------------------------------------------------------------- commands


def run_command(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.fixture
def celeba_cli(tmp_path, rng, monkeypatch):
    attrs, folder = make_celeba(tmp_path, rng)
    model = StandInFlow(shape=(4, 4, 3), seed=5)
    monkeypatch.setattr(checkpoint, "load_model", lambda path: model)
    ckpt = tmp_path / "run" / "checkpoint.h5"
    data = ["--celeba-attrs", str(attrs), "--celeba-images", str(folder), "--batch-size", "8"]
    return SimpleNamespace(ckpt=str(ckpt), data=data, model=model, tmp=tmp_path)


def test_manipulate_command(celeba_cli, capsys):
    from flownp.commands import manipulate

    c = celeba_cli
    npz = c.tmp / "dirs.npz"
    argv = [c.ckpt, *c.data, "--attribute", "Bright", "--num-images", "2", "--steps", "2"]
    assert run_command(manipulate, argv + ["--save-directions", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "Bright: 12 images with a > 0, 12 without" in out
    assert "figure:" in out and (c.tmp / "run" / "manipulate_Bright.png").is_file()
    saved = np.load(npz)
    assert saved["directions"].shape == (1, 48) and saved["names"].tolist() == ["Bright"]
    # the direction makes images brighter: decoding z + v raises the mean pixel value
    v = saved["directions"][0]
    imgs = attributes.load_celeba(c.data[1], c.data[3], image_shape=(4, 4, 3)).images
    edited = latent.manipulate(c.model, imgs[:4], v, np.array([-1.0, 0.0, 1.0]))
    means = edited.mean(axis=(2, 3, 4))  # (4, 3)
    assert np.all(means[:, 2] > means[:, 1]) and np.all(means[:, 1] > means[:, 0])
    assert run_command(manipulate, [c.ckpt, *c.data, "--list-attributes"]) == 0
    assert capsys.readouterr().out.split() == ["Bright", "Random"]
    with pytest.raises(DataError, match="available: Bright, Random"):
        run_command(manipulate, [c.ckpt, *c.data, "--attribute", "Age"])
    with pytest.raises(DataError, match="together"):
        run_command(manipulate, [c.ckpt, *c.data[:2], "--attribute", "Bright"])


def test_interpolate_and_reconstruct_commands(celeba_cli, capsys, monkeypatch):
    from flownp.commands import interpolate, reconstruct

    c = celeba_cli
    argv = [c.ckpt, *c.data, "--pairs", "0:1,2:3", "--steps", "4", "--method", "spherical"]
    assert run_command(interpolate, argv) == 0
    out = capsys.readouterr().out
    err = float(out.split("endpoint reconstruction max |error| = ")[1].split()[0])
    assert err < 1e-12 and (c.tmp / "run" / "interpolate_spherical.png").is_file()
    with pytest.raises(DataError, match="I:J"):
        run_command(interpolate, [c.ckpt, *c.data, "--pairs", "0-1"])

    assert run_command(reconstruct, [c.ckpt, *c.data, "--num-images", "5", "--figure"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction of 5 image(s) (float64)" in out and "uint8 pixels differing: 0" in out
    assert (c.tmp / "run" / "reconstruct.png").is_file()
    bad = OffsetInverse(shape=(4, 4, 3), seed=5)
    monkeypatch.setattr(checkpoint, "load_model", lambda path: bad)
    assert run_command(reconstruct, [c.ckpt, *c.data, "--num-images", "3"]) == 1
    assert "FAILED: max |error| 1.000e-02" in capsys.readouterr().out


def test_commands_on_bundled_mnist_with_a_real_checkpoint(tmp_path, capsys):
    """Integration: a tiny FlowModel saved with flownp.checkpoint, loaded by
    checkpoint.load_model, on the bundled MNIST (directions from the training split)."""
    from flownp.checkpoint import save_checkpoint
    from flownp.commands import manipulate, reconstruct
    from flownp.data import load_dataset
    from flownp.model import FlowConfig, FlowModel

    cfg = FlowConfig(image_shape=(28, 28, 1), levels=2, depth=1, width=4, dtype="float32")
    model = FlowModel(cfg, seed=0)
    ds = load_dataset("mnist")
    model.initialize(pixels.images_to_model(ds.train[:32], np.float32))
    ckpt = save_checkpoint(tmp_path / "checkpoint.h5", model)
    loaded = checkpoint.load_model(ckpt)
    z = latent.encode(model, ds.test[:4])
    np.testing.assert_array_equal(latent.encode(loaded, ds.test[:4]), z)
    np.testing.assert_array_equal(pixels.model_to_images(latent.decode(loaded, z)), ds.test[:4])

    data = attributes.load_labelled("mnist", "train")
    assert len(data.images) == 9000 and data.attribute_names[-3:] == attributes.MNIST_ATTRIBUTES
    np.testing.assert_array_equal(data.attributes[:5, :10].argmax(1), ds.train_labels[:5])

    argv = [str(ckpt), "--max-images", "64", "--num-images", "2", "--steps", "1"]
    assert run_command(manipulate, argv + ["--attribute", "digit_1"]) == 0
    out = capsys.readouterr().out
    assert (
        "from 64 images of mnist[train]" in out and (tmp_path / "manipulate_digit_1.png").is_file()
    )
    assert run_command(reconstruct, [str(ckpt), "--num-images", "16"]) == 0
    assert "uint8 pixels differing: 0" in capsys.readouterr().out
