"""Compiled (Numba) kernels and their plain NumPy references.

Each public kernel here has a readable reference it is tested against (``*_reference``).
The layer objects in :mod:`flownp.layers` validate their inputs and call these; the kernels
themselves assume validated, C-contiguous arrays of one floating dtype.
"""

from flownp.kernels.conv import (
    conv_backward_input,
    conv_backward_input_reference,
    conv_backward_kernel,
    conv_forward,
    conv_forward_reference,
    solve_auto,
    solve_raster,
    solve_reference,
    solve_wavefront,
)

__all__ = [
    "conv_forward",
    "conv_forward_reference",
    "conv_backward_input",
    "conv_backward_input_reference",
    "conv_backward_kernel",
    "solve_auto",
    "solve_raster",
    "solve_wavefront",
    "solve_reference",
]
