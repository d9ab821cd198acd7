"""N-bit pixels (flownp/data/pixels.py): ``floor(u / 2^(8-N)) / 2^N - 1/2`` dequantised with
U(0, 1/2^N), back to uint8 on the 2^(8-N) grid; 8 bits is the unchanged default."""

from __future__ import annotations

import numpy as np
import pytest

from flownp.data import pixels
from flownp.errors import DataError, NonFiniteError

U = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dequantize_n_bits_stays_in_the_wider_bin(n, dtype):
    u = U.repeat(20, axis=0)
    v = u.astype(np.int64) // 2 ** (8 - n)  # floor(u / 2^(8-N))
    np.testing.assert_array_equal(pixels.reduce_bits(u, n), v)
    x = pixels.dequantize(u, np.random.default_rng(n), dtype, n)
    assert x.dtype == dtype and x.min() >= -0.5 and x.max() < 0.5
    # x = (v + U[0, 1)) / 2^N - 1/2: the noise is inside [0, 1) of the N-bit bin
    noise = (x.astype(np.float64) + 0.5) * 2**n - v
    assert noise.min() >= 0 and noise.max() < 1
    assert noise.std() > 0.2  # uniform on [0, 1): std 0.29
    centre = pixels.images_to_model(u[:1], np.float64, n)
    np.testing.assert_array_equal(centre, (v[:1] + 0.5) / 2**n - 0.5)
    # back to uint8 on the 2^(8-N) grid, from any point of the bin
    q = (v * 2 ** (8 - n)).astype(np.uint8)
    np.testing.assert_array_equal(pixels.quantize(u, n), q)
    np.testing.assert_array_equal(pixels.to_uint8(x, n), q)
    np.testing.assert_array_equal(pixels.model_to_images(centre, n), q[:1])


def test_eight_bits_is_the_default():
    rng = np.random.default_rng(0)
    a = pixels.dequantize(U, np.random.default_rng(1), np.float32)
    b = pixels.dequantize(U, np.random.default_rng(1), np.float32, 8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pixels.quantize(U, 8), U)
    x = rng.uniform(-0.6, 0.6, (3, 4))
    np.testing.assert_array_equal(pixels.to_uint8(x), pixels.to_uint8(x, 8))


def test_five_bits_by_hand():
    """openai/glow's 5-bit preprocessing: floor(x / 8) / 32 - 0.5, postprocess
    floor((x + 0.5) * 32) * 8."""
    u = np.array([0, 7, 8, 100, 255], np.uint8).reshape(1, 1, 5, 1)
    np.testing.assert_array_equal(pixels.reduce_bits(u, 5).ravel(), [0, 0, 1, 12, 31])
    x = pixels.images_to_model(u, np.float64, 5).ravel()
    np.testing.assert_allclose(x, (np.array([0, 0, 1, 12, 31]) + 0.5) / 32 - 0.5, rtol=0)
    np.testing.assert_array_equal(pixels.to_uint8(x, 5), [0, 0, 8, 96, 248])
    # out-of-range model values clip to the first and last level
    np.testing.assert_array_equal(pixels.to_uint8(np.array([-3.0, 3.0]), 5), [0, 248])


@pytest.mark.parametrize("bad", [0, 9, -1, 5.0, True, "8"])
def test_bad_n_bits(bad):
    with pytest.raises(ValueError, match="n_bits must be an int in 1..8"):
        pixels.dequantize(U, None, np.float64, bad)
    with pytest.raises(ValueError, match="n_bits must be an int in 1..8"):
        pixels.to_uint8(np.zeros(3), bad)


def test_bad_images():
    with pytest.raises(DataError, match="uint8"):
        pixels.reduce_bits(U.astype(np.int16), 5)
    with pytest.raises(NonFiniteError, match="1 NaN/Inf"):
        pixels.model_to_images(np.array([0.0, np.nan]), 5)
