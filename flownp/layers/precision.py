r"""Which precision the substitutions of a model's inverse run in, from the kernels alone.

A CInC or Emerging layer inverts by substitution (a causal recursion over the pixels, see
:mod:`flownp.kernels.solve`); its ``inverse`` takes ``solve_dtype`` (None: the layer's own
dtype), solves the layer's own kernel in that precision and casts the result back.
:meth:`flownp.model.FlowModel.inverse` chooses the dtype of every such layer with
:func:`choose_solve_dtypes` and passes it in; nothing is set on the layers.

Policies (``SOLVE_PRECISIONS``)::

    "model"     every layer in its own dtype
    "float64"   every substitution in float64 (as the official code does)
    "auto"      float64 only where the kernel's amplification is not provably bounded:
                neither row nor block dominance holds (:func:`kernel_margins`)

Size-independent bounds (``docs/stability.md``, Propositions 1 and 2), with
``K : (k, k, C, C)`` the effective kernel, corner tap ``(a0, b0)``,
``A[o, c] = K[a0, b0, c, o]``, ``d_o = K[a0, b0, o, o]`` and
``r_o = sum_{(a, b, c) != (a0, b0, o)} |K[a, b, c, o]|``::

    row dominance   max_o r_o / |d_o| < 1   =>  ||M^{-1}||_inf <= 1 / min_o (|d_o| - r_o)   (Varah)
    block dominance q = ||A^{-1}||_inf * max_o sum_{(a,b) != corner} sum_c |K[a,b,c,o]| < 1
                                        =>  ||M^{-1}||_inf <= ||A^{-1}||_inf / (1 - q)

The measurements of the inverse (norms, impulse responses, round trips) are in
:mod:`flownp.stability`, which re-exports the names of this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.layers.base import Layer

SOLVE_PRECISIONS = ("model", "float64", "auto")


@dataclass(frozen=True)
class KernelMargins:
    """Dominance margins of one padded convolution kernel (independent of the image size).

    Attributes
    ----------
    diag : (C,) corner diagonal ``d_o``.
    offdiag_sum : (C,) ``r_o``, absolute sum of every other tap feeding output channel ``o``.
    ratio : (C,) ``r_o / |d_o|`` (``inf`` where ``d_o = 0``). Row dominance iff all ``< 1``.
    row_bound : Varah's bound ``1 / min_o(|d_o| - r_o)`` on ``||M^{-1}||_inf`` (``inf`` if
        not row dominant).
    block_ratio : ``q = ||A^{-1}||_inf * max_o sum_{(a,b) != corner} sum_c |K[a,b,c,o]|``.
    block_bound : ``||A^{-1}||_inf / (1 - q)`` (``inf`` if ``q >= 1`` or ``A`` is singular).
    """

    diag: np.ndarray
    offdiag_sum: np.ndarray
    ratio: np.ndarray
    row_bound: float
    block_ratio: float
    block_bound: float

    @property
    def max_ratio(self) -> float:
        """``max_o r_o / |d_o|``: the layer is row dominant iff this is ``< 1``."""
        return float(np.max(self.ratio))

    @property
    def dominant(self) -> bool:
        """True when one of the two sufficient conditions holds."""
        return bool(self.max_ratio < 1.0 or self.block_ratio < 1.0)

    @property
    def bound(self) -> float:
        """The better of the two upper bounds on ``||M^{-1}||_inf`` (``inf`` if neither holds)."""
        return float(min(self.row_bound, self.block_bound))


def kernel_margins(kernel: np.ndarray, corner: tuple[int, int] | None = None) -> KernelMargins:
    """Dominance margins of a ``(k, k, C, C)`` kernel whose diagonal tap is ``corner``.

    ``corner`` defaults to ``(k-1, k-1)`` (top-left padding, CInC). A bottom-right padded
    convolution (the first conv of an Emerging layer) passes ``(0, 0)``. The rows of ``M``
    contain the same taps whatever the padding side, so the bounds are the same.
    """
    K = np.asarray(kernel, dtype=np.float64)
    if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[2] != K.shape[3]:
        raise ValueError(f"kernel_margins: kernel must be (k, k, C, C), got {K.shape}")
    k = K.shape[0]
    a0, b0 = (k - 1, k - 1) if corner is None else corner
    absK = np.abs(K)
    d = np.diag(K[a0, b0]).copy()  # (C,)
    r = absK.sum(axis=(0, 1, 2)) - np.abs(d)  # (C,) all taps of output o but the diagonal
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d != 0, r / np.abs(d), np.inf)
    gap = np.abs(d) - r
    row_bound = float(1.0 / gap.min()) if gap.min() > 0 else np.inf
    off = absK.sum(axis=2)  # (k, k, C): sum over input channels
    off[a0, b0] = 0.0
    off_max = float(off.sum(axis=(0, 1)).max())  # ||R||_inf of the off-pixel blocks
    A = K[a0, b0].T  # A[o, c]
    try:
        ainv = float(np.abs(np.linalg.inv(A)).sum(axis=1).max())
    except np.linalg.LinAlgError:
        ainv = np.inf
    q = ainv * off_max if np.isfinite(ainv) else np.inf
    block_bound = ainv / (1.0 - q) if q < 1.0 else np.inf
    return KernelMargins(d, r, ratio, row_bound, float(q), float(block_bound))


def layer_kernels(layer: Layer) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """The ``(kernel, corner)`` pairs whose substitutions make up ``layer.inverse``.

    A CInC-like layer (attributes ``kernel`` and ``corner_matrix``) gives one pair. Other
    layers opt in with a method ``stability_kernels()`` returning the same list (an Emerging
    layer: its two kernels, in solve order). Raises ``TypeError`` otherwise.
    """
    if hasattr(layer, "stability_kernels"):
        return [(np.asarray(K), tuple(c)) for K, c in layer.stability_kernels()]
    if is_substitution_layer(layer):
        K = np.asarray(layer.kernel)
        return [(K, (K.shape[0] - 1, K.shape[0] - 1))]
    raise TypeError(
        f"{type(layer).__name__} exposes no convolution kernels "
        "(expected .kernel/.corner_matrix or .stability_kernels())"
    )


def is_substitution_layer(layer: Any) -> bool:
    """A CInC-like layer: a ``kernel`` and a ``corner_matrix`` (looked up on the class, so
    that the kernel is not computed)."""
    cls = type(layer)
    return hasattr(cls, "corner_matrix") and (hasattr(cls, "kernel") or "kernel" in vars(layer))


def iter_invertible_convs(root: Layer, prefix: str = "") -> Iterator[tuple[str, Layer]]:
    """``(path, layer)`` for every CInC-like layer (or one with ``stability_kernels``) in the
    tree under ``root`` (paths as in :attr:`Layer.params`, without the parameter name)."""
    if hasattr(root, "stability_kernels") or is_substitution_layer(root):
        yield prefix or type(root).__name__, root
    for name, sub in root._layers.items():
        yield from iter_invertible_convs(sub, f"{prefix}/{name}" if prefix else name)


def choose_solve_dtypes(root: Layer, precision: str = "float64") -> dict[str, Any]:
    """The dtype each invertible convolution under ``root`` should solve in.

    ``"model"``: its own dtype (None). ``"float64"``: float64 everywhere. ``"auto"``: float64
    only for the layers whose size-independent dominance bound does not hold
    (:func:`kernel_margins`: neither row nor block dominance), i.e. whose amplification is not
    provably bounded; a guarded layer always keeps its own dtype.
    """
    if precision not in SOLVE_PRECISIONS:
        raise ValueError(f"solve precision must be one of {SOLVE_PRECISIONS}, got {precision!r}")
    out: dict[str, Any] = {}
    for path, lay in iter_invertible_convs(root):
        if precision == "model" or lay.dtype == np.float64:
            out[path] = None
        elif precision == "float64":
            out[path] = np.dtype(np.float64)
        else:
            dominant = all(np.isfinite(kernel_margins(K, c).bound) for K, c in layer_kernels(lay))
            out[path] = None if dominant else np.dtype(np.float64)
    return out


def dtypes_under(choice: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of a :func:`choose_solve_dtypes` ``choice`` under the layer ``prefix``,
    relative to it, without the None ones (``{"step1/conv": float64}`` under ``"level0"``)."""
    head = prefix + "/"
    return {p[len(head) :]: dt for p, dt in choice.items() if p.startswith(head) and dt is not None}
