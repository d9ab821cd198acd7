"""Compiled (Numba) kernels and their plain NumPy references.

Each public kernel validates its arguments in a thin Python wrapper (shapes, dtypes, memory
layout: a ``ValueError`` names the kernel and the shapes) and runs a compiled loop inside,
spread over :mod:`flownp.threads`. Each has a readable reference it is tested against
(``*_reference``).
"""

from flownp.kernels.conv import (
    conv_backward_input,
    conv_backward_input_reference,
    conv_backward_kernel,
    conv_backward_kernel_reference,
    conv_forward,
    conv_forward_reference,
)
from flownp.kernels.conv_same import (
    actnorm_relu_backward,
    actnorm_relu_backward_reference,
    actnorm_relu_forward,
    actnorm_relu_forward_reference,
    conv_same_backward,
    conv_same_backward_reference,
    conv_same_forward,
    conv_same_forward_reference,
    matmul,
)
from flownp.kernels.solve import solve_auto, solve_raster, solve_reference, solve_wavefront

__all__ = [
    "conv_forward",
    "conv_forward_reference",
    "conv_backward_input",
    "conv_backward_input_reference",
    "conv_backward_kernel",
    "conv_backward_kernel_reference",
    "solve_auto",
    "solve_raster",
    "solve_wavefront",
    "solve_reference",
    "conv_same_forward",
    "conv_same_forward_reference",
    "conv_same_backward",
    "conv_same_backward_reference",
    "actnorm_relu_forward",
    "actnorm_relu_forward_reference",
    "actnorm_relu_backward",
    "actnorm_relu_backward_reference",
    "matmul",
]
