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
    """A checkpoint or weight file is missing, truncated, corrupt (a checksum differs), foreign,
    of an unknown version, or could not be written."""


class DataError(FlownpError, ValueError):
    """A dataset file is missing, corrupt or not in the expected format."""


class UsageError(FlownpError, ValueError):
    """A bad option or argument value, or a request that would destroy data (e.g. training
    into a folder that already holds a checkpoint). The message names the fix."""


class WriteError(FlownpError, OSError):
    """An output file (metrics, figure) could not be written; names the path and the cause."""
