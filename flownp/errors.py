"""Exceptions raised by flownp. Every error names the layer (or file) and the problem."""

from __future__ import annotations


class FlownpError(Exception):
    """Base class of every flownp-specific error."""


class SingularKernelError(FlownpError, ValueError):
    """An invertible layer was asked to invert a kernel whose Jacobian is singular.

    For a padded (CInC) convolution this means a zero on the diagonal of the corner channel
    matrix ``K[k-1, k-1]`` (masked case) or a singular corner block (full case).
    """


class NonFiniteError(FlownpError, FloatingPointError):
    """NaN or Inf found in an input, a loss or a gradient. flownp never silences these."""


class CheckpointError(FlownpError, OSError):
    """A checkpoint or weight file is missing, truncated, foreign or of an unknown version."""


class DataError(FlownpError, ValueError):
    """A dataset file is missing, corrupt or not in the expected format."""
