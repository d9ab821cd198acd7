"""ChannelPermutation: channel reversal (RealNVP) and a fixed random shuffle (Glow). The layer
contract (round trip, dense log-det, gradients, bad input) is in tests/test_layer_contract.py."""

import numpy as np
import pytest

from flownp.layers.permute import ChannelPermutation


def test_reverse_is_the_channel_reversal(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    layer = ChannelPermutation(5, "reverse")
    y, logdet = layer.forward(x)
    np.testing.assert_array_equal(y, x[..., ::-1])
    np.testing.assert_array_equal(logdet, np.zeros(2))
    np.testing.assert_array_equal(layer.perm, [4, 3, 2, 1, 0])


def test_shuffle_is_fixed_by_the_seed_and_saved(rng):
    a, b = ChannelPermutation(8, "shuffle", seed=3), ChannelPermutation(8, "shuffle", seed=3)
    np.testing.assert_array_equal(a.perm, b.perm)
    np.testing.assert_array_equal(a.perm, np.random.default_rng(3).permutation(8))
    c = ChannelPermutation(8, "shuffle", seed=4)
    assert not np.array_equal(a.perm, c.perm)
    c.load_state_dict(a.state_dict())  # a loaded model uses the saved permutation
    x = rng.standard_normal((1, 2, 2, 8))
    np.testing.assert_array_equal(c.forward(x)[0], x[..., a.perm])
    np.testing.assert_array_equal(c.inverse(c.forward(x)[0]), x)


def test_backward_is_the_inverse_permutation(rng):
    layer = ChannelPermutation(6, "shuffle", seed=1)
    x = rng.standard_normal((2, 2, 3, 6))
    layer.forward(x)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy, np.ones(2))
    # <dy, P x> = <P^T dy, x> for every x
    np.testing.assert_allclose(np.sum(dy * x[..., layer.perm]), np.sum(dx * x), rtol=1e-14)
    np.testing.assert_array_equal(dx, layer.inverse(dy))


def test_a_loaded_perm_that_is_not_a_permutation_is_refused():
    layer = ChannelPermutation(4, "shuffle")
    state = layer.state_dict()
    state["buffers/perm"] = np.array([0, 1, 1, 3])
    with pytest.raises(ValueError, match=r"not a permutation of 0..3"):
        layer.load_state_dict(state)


@pytest.mark.parametrize(
    "args, match", [((0,), "channels"), ((3, "rotate"), "kind"), ((True,), "channels")]
)
def test_constructor_validation(args, match):
    with pytest.raises(ValueError, match=match):
        ChannelPermutation(*args)
