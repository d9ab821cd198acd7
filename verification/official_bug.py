"""A reproduction of the public CInC code's quad-coupling reverse, which is NOT an inverse.

The public code (``Naagar/Normalizing_Flow_3x3_inv``, ``model.py``, ``revnet2d_step``,
``flow_coupling == 2``, reverse branch) starts its reverse pass with
``x1 = z[..., 3*block_size:]``: the *fourth* output block where the first belongs. It then
reconstructs ``x_2, x_3, x_4`` from ``y_2, y_3, y_4`` as the exact inverse does, conditioning
on that wrong ``x_1``::

    x_1 := y_4                                     (the exact inverse: x_1 = y_1)
    x_k  = y_k / s(raw_k) - shift_k,   [shift_k, raw_k] = NN_{k-1}(x_1, ..., x_{k-1})

The claim ``quad_official_reverse_bug`` of the report measures it against
:meth:`flownp.layers.QuadCoupling.inverse`; never use it for sampling.
"""

from __future__ import annotations

import numpy as np

from flownp.errors import NonFiniteError
from flownp.layers import QuadCoupling
from flownp.layers.coupling import block_inverse


def official_bug_inverse(layer: QuadCoupling, y: np.ndarray) -> np.ndarray:
    """The public code's reverse of ``layer`` applied to ``y`` (module docstring).

    ``official_bug_inverse(layer, layer.forward(x)[0]) != x`` in general (an error of order 1
    on random inputs). Raises :class:`~flownp.errors.NonFiniteError` when a reconstructed
    block is not finite (the wrong ``x_1`` can drive a scale to zero).
    """
    if not isinstance(layer, QuadCoupling):
        raise TypeError(f"official_bug_inverse: expected a QuadCoupling, got {type(layer)!r}")
    y = layer.check_input(y, layer.channels, name="y")
    e = layer.edges
    layer.clear_cache()
    x = np.empty_like(y)  # (N, H, W, C)
    x[..., : e[1]] = y[..., e[3] :]  # the bug: x_1 := y_4
    for k, net in enumerate(layer.nets, start=1):
        lo, hi = e[k], e[k + 1]
        h = net.forward(x[..., :lo])  # conditioned on the wrong x_1
        net.clear_cache()
        x[..., lo:hi] = block_inverse(y[..., lo:hi], h, layer.scale)
        if not np.isfinite(x[..., lo:hi]).all():
            raise NonFiniteError(
                f"official_bug_inverse: output block {k + 1} is not finite "
                "(the wrong first block drove a scale to zero)"
            )
    return x
