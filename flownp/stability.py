r"""Numerical stability of the CInC inverse: measure it and bound it.

The inverse of a top-left padded convolution (paper Section 3.1, Lemma 1) is a 2-D causal
recursion (an IIR filter). Theorem 1 makes ``M`` nonsingular whenever the corner diagonal is
nonzero, but says nothing about how much the recursion amplifies round-off: with off-corner
taps of 0.1 against a unit diagonal and 16 channels, ``||M^{-1}||`` reaches 1e24 on a
14 x 14 image and a float64 round trip returns garbage. Proofs and evidence:
``docs/stability.md``; the verification section: :mod:`verification.stability`.

Notation (as in :mod:`flownp.kernels.conv`)::

    K : (k, k, C, C)   effective kernel, corner tap (k-1, k-1), A[o, c] = K[k-1, k-1, c, o]
    d_o  = K[k-1, k-1, o, o]                               corner diagonal
    r_o  = sum_{(a, b, c) != (k-1, k-1, o)} |K[a, b, c, o]|   off-diagonal row sum of M
    rho_o = r_o / |d_o|                                     dominance ratio of output channel o

Size-independent bounds (``docs/stability.md``, Propositions 1 and 2)::

    row dominance   max_o rho_o < 1      =>  ||M^{-1}||_inf <= 1 / min_o (|d_o| - r_o)   (Varah)
    block dominance q = ||A^{-1}||_inf * max_o sum_{(a,b) != corner} sum_c |K[a,b,c,o]| < 1
                                        =>  ||M^{-1}||_inf <= ||A^{-1}||_inf / (1 - q)

(:func:`kernel_margins`; with the choice of the solve precision that uses them, it lives
beside the layers in :mod:`flownp.layers.precision` and is re-exported here.)

Measurements (exact for any H x W, float64)::

    ||M^{-1}||_1   = max_c  || M^{-1} e_(0,0,c) ||_1      impulse responses (C solves)
    ||M^{-1}||_inf = max_o  || M^{-T} e_(H-1,W-1,o) ||_1  impulse responses of the transpose
    ||M^{-1}||_2   >= power iteration on M^{-T} M^{-1}     (a lower bound, converges from below)

Both impulse identities hold because ``M^{-1}`` is the truncation to the H x W window of a
quarter-plane causal filter: every column (row) of ``M^{-1}`` is a shifted truncation of the
column of pixel (0, 0) (the row of pixel (H-1, W-1)). The same impulse response restricted to
``[0, n) x [0, n)`` gives the amplification on an n x n image, for every n at once.

``M^T`` (the transpose used by the backward pass) is the *bottom-right* padded convolution
with the channel-transposed kernel ``Kt[a, b, c, o] = K[a, b, o, c]``; with ``F`` the spatial
flip (i, j) -> (H-1-i, W-1-j), ``M^T = F M' F`` where ``M'`` is the top-left padded
convolution of ``Kt`` (corner block ``A^T``). Hence ``M^{-T} = F M'^{-1} F`` is one more
substitution with the existing solvers (:func:`solve_transpose`).

Guard: the parameterisation that keeps a layer inside the dominance region for any parameter
values is :mod:`flownp.layers.guard` (re-exported here: ``guard_kernel``, ``guard_taps``, ...).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flownp.errors import NonFiniteError
from flownp.kernels import solve as solve_kernels
from flownp.layers import _linalg
from flownp.layers.base import Layer, check_dtype

# The guard is a parameterisation of the layers and lives beside them; re-exported here, where
# it is measured, under its historical names.
from flownp.layers.guard import (  # noqa: F401  (public re-exports)
    GUARD_MODES,
    corner_inverse_norm,
    guard_kernel,
    guard_kernel_backward,
    guard_taps,
    guard_taps_backward,
)

# The dominance margins and the choice of the solve precision are used by the model's inverse
# and live beside the layers (flownp.layers.precision); re-exported here, where they measure.
from flownp.layers.precision import (  # noqa: F401  (public re-exports)
    SOLVE_PRECISIONS,
    KernelMargins,
    choose_solve_dtypes,
    is_substitution_layer,
    iter_invertible_convs,
    kernel_margins,
    layer_kernels,
)


class InverseInstabilityWarning(UserWarning):
    """An invertible layer's inverse amplifies round-off beyond the configured threshold."""


# --------------------------------------------------------------------------------------------
# Size-independent margins, from the kernel alone
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Exact amplification: transposed solve, impulse responses, power iteration, dense matrices
# --------------------------------------------------------------------------------------------


def solve_padded(y: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Solve the top-left padded convolution ``conv(pad(x), K) = y`` for ``x`` (float64).

    The corner block is taken from ``K`` itself and factorised by
    :func:`flownp.layers._linalg.plu` with ``check=False`` (a measurement: only an exact zero
    pivot is refused).
    """
    K = np.ascontiguousarray(K, dtype=np.float64)
    perm, L, U = _linalg.plu(K[-1, -1].T, who="stability.solve_padded", check=False)
    return solve_kernels.solve_raster(np.ascontiguousarray(y, dtype=np.float64), K, L, U, perm)


def solve_transpose(z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Solve ``M^T w = z`` for ``w``, ``M`` the top-left padded convolution of ``K``.

    ``M^T = F M' F`` (``F`` the spatial flip, ``M'`` the top-left padded convolution of the
    channel-transposed kernel), so ``w = F solve(M', F z)``. ``M^T`` itself is
    :func:`flownp.kernels.conv.conv_backward_input`.
    """
    Kt = np.ascontiguousarray(np.swapaxes(np.asarray(K, dtype=np.float64), 2, 3))
    zf = np.ascontiguousarray(np.asarray(z, dtype=np.float64)[:, ::-1, ::-1, :])
    return np.ascontiguousarray(solve_padded(zf, Kt)[:, ::-1, ::-1, :])


def impulse_responses(K: np.ndarray, H: int, W: int, transpose: bool = False) -> np.ndarray:
    """``h[c] = M^{-1} e_(0,0,c)`` for every channel ``c``: shape ``(C, H, W, C)``, float64.

    ``transpose=True``: the impulse responses of ``M^{-T}`` at the last pixel, flipped back to
    the origin (``h[o] = F M^{-T} e_(H-1,W-1,o)``), whose absolute sums are the row sums of
    the last pixel's rows of ``M^{-1}``.
    """
    K = np.asarray(K, dtype=np.float64)
    C = K.shape[2]
    E = np.zeros((C, H, W, C))
    E[np.arange(C), 0, 0, np.arange(C)] = 1.0
    if transpose:
        return solve_padded(E, np.swapaxes(K, 2, 3))
    return solve_padded(E, K)


def amplification_by_size(h: np.ndarray) -> np.ndarray:
    """``a[n-1] = max_c sum_{i, j < n} sum_ch |h[c, i, j, ch]|`` for ``n = 1 .. min(H, W)``.

    With ``h`` from :func:`impulse_responses` this is ``||M^{-1}||_1`` (``transpose=True``:
    ``||M^{-1}||_inf``) of the same kernel on an n x n image, exactly, for every n.
    """
    s = np.abs(h).sum(axis=3)  # (C, H, W)
    cs = s.cumsum(axis=1).cumsum(axis=2)  # (C, H, W) sums over [0, i] x [0, j]
    n = min(h.shape[1], h.shape[2])
    idx = np.arange(n)
    return cs[:, idx, idx].max(axis=0)  # (n,)


def growth_rate(a: np.ndarray) -> float:
    """Per-row/column growth factor of an amplification curve ``a(n)`` (last half of it).

    ``(a[-1] / a[m]) ** (1 / (len(a) - 1 - m))`` with ``m = len(a) // 2``: about 1 when the
    recursion is stable (``a`` saturates), > 1 when the amplification grows exponentially
    with the image size.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.size < 3:
        return float("nan")
    m = a.size // 2
    if not (np.isfinite(a[-1]) and a[m] > 0):
        return float("inf")
    return float((a[-1] / a[m]) ** (1.0 / (a.size - 1 - m)))


def power_norm(
    apply: Callable[[np.ndarray], np.ndarray],
    apply_t: Callable[[np.ndarray], np.ndarray],
    shape: tuple[int, ...],
    iters: int = 60,
    tol: float = 1e-8,
    seed: int = 0,
) -> float:
    """Estimate ``||B||_2`` by power iteration on ``B^T B`` (a lower bound, from below).

    ``apply(v) = B v`` and ``apply_t(w) = B^T w`` act on arrays of ``shape``. Stops after
    ``iters`` steps or when the estimate changes by less than ``tol`` (relative).
    """
    v = np.random.default_rng(seed).standard_normal(shape)
    v /= np.linalg.norm(v)
    est = 0.0
    for _ in range(iters):
        w = apply(v)
        new = float(np.linalg.norm(w))
        if not np.isfinite(new) or new == 0.0:
            return new
        v = apply_t(w / new)
        nv = float(np.linalg.norm(v))
        if not np.isfinite(nv) or nv == 0.0:
            return new
        v /= nv
        if abs(new - est) <= tol * new:
            return new
        est = new
    return est


def dense_matrix(fn: Callable[[np.ndarray], np.ndarray], H: int, W: int, C: int) -> np.ndarray:
    """The ``(HWC, HWC)`` matrix of a linear map of NHWC float64 images (one batched call).

    Column ``n`` is ``fn(e_n)`` in the paper's vectorisation ``x.reshape(-1)``.
    """
    D = H * W * C
    E = np.eye(D).reshape(D, H, W, C)
    return np.asarray(fn(E), dtype=np.float64).reshape(D, D).T


def cast_layer(layer: Layer, dtype: Any) -> Layer:
    """A deep copy of ``layer`` (and its sub-layers) with parameters in ``dtype``.

    Float arrays held by the layers (parameters, gradients, masks) are converted; buffers keep
    their own dtype. The original layer is not touched.
    """
    dt = check_dtype(dtype)
    new = copy.deepcopy(layer)
    stack = [new]
    while stack:
        lay = stack.pop()
        stack.extend(lay._layers.values())
        lay.dtype = dt
        lay._cache = None
        for store in (lay._params, lay._grads):
            for key in store:
                store[key] = np.ascontiguousarray(store[key], dtype=dt)
        buffers = {id(b) for b in lay._buffers.values()}
        for name, val in vars(lay).items():
            if isinstance(val, np.ndarray) and val.dtype.kind == "f" and id(val) not in buffers:
                setattr(lay, name, np.ascontiguousarray(val, dtype=dt))
    return new


def roundtrip_error(layer: Layer, x: np.ndarray, dtype: Any = None, **inverse_kw: Any) -> float:
    """Relative round-trip error ``max|inverse(forward(x)) - x| / max|x|`` in ``dtype``.

    ``dtype`` defaults to the layer's; the layer is cast (a copy) when it differs;
    ``inverse_kw`` go to ``inverse`` (a model's ``solve_precision``). Returns ``inf`` when the
    reconstruction is not finite (never a silenced NaN).
    """
    dt = layer.dtype if dtype is None else check_dtype(dtype)
    lay = layer if dt == layer.dtype else cast_layer(layer, dt)
    xd = np.ascontiguousarray(x, dtype=dt)
    y, _ = lay.forward(xd)
    lay.clear_cache()
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            xr = lay.inverse(y, **inverse_kw)
        except NonFiniteError:  # a layer's solve overflowed: reported as an infinite error
            lay.clear_cache()
            return float("inf")
        if not np.all(np.isfinite(xr)):
            return float("inf")
        return float(np.max(np.abs(xr.astype(np.float64) - xd)) / np.max(np.abs(xd)))


# --------------------------------------------------------------------------------------------
# Per-layer report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StabilityThresholds:
    """When a layer is reported.

    ``max_roundtrip_f32``: relative float32 round-trip error above which the layer is
    ``"unstable"`` (the target for a model: 1e-4). ``max_condition``: above this value of
    ``kappa = ||M||_inf ||M^{-1}||_inf`` a layer whose round trip still passes is ``"at-risk"``
    (larger images, other inputs or float32 sampling may fail).
    """

    max_roundtrip_f32: float = 1e-4
    max_condition: float = 1e4


@dataclass
class LayerStability:
    """The stability numbers of one invertible layer at one image size (see module docstring).

    ``max_ratio`` is the row dominance ratio ``max_o r_o / |d_o|``, ``block_ratio`` the block
    ratio ``q`` (worst kernel of the layer; either ``< 1`` makes ``bound`` finite).
    ``norm_inf``/``norm_1`` are exact (``None`` when not computed), ``norm_2`` is a
    power-iteration lower bound, ``bound`` the size-independent dominance bound on
    ``norm_inf`` (``inf`` if no sufficient condition holds), ``growth`` the per-pixel growth
    factor of the amplification with the image side (about 1 = stable).
    """

    name: str
    kind: str
    shape: tuple[int, int, int]
    max_ratio: float
    block_ratio: float
    bound: float
    norm_inf: float | None
    norm_1: float | None
    norm_2: float | None
    condition: float | None
    growth: float | None
    roundtrip_f32: float
    roundtrip_f64: float
    status: str = "ok"
    notes: list[str] = field(default_factory=list)

    @property
    def dominant(self) -> bool:
        return bool(np.isfinite(self.bound))

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "notes"}
        out["shape"] = list(self.shape)
        out["notes"] = "; ".join(self.notes)
        return out


def measure_layer(
    layer: Layer,
    H: int,
    W: int,
    *,
    name: str = "",
    x: np.ndarray | None = None,
    batch: int = 4,
    seed: int = 0,
    power_iters: int = 60,
    max_dense: int = 4096,
    thresholds: StabilityThresholds | None = None,
) -> LayerStability:
    """Measure the stability of ``layer.inverse`` on ``H x W`` images.

    Parameters
    ----------
    layer : a CInC-like layer (exact impulse-response norms for any size), or any invertible
        linear layer with ``channels``: its norms then come from the dense inverse
        (``H W C <= max_dense``, else they are ``None`` and a note says so).
    x : (N, H, W, C) inputs for the round trips (held-out data); default ``batch`` standard
        normal images drawn with ``seed``.
    power_iters : steps of the 2-norm power iteration (0 to skip).

    The measurement is deterministic for fixed arguments (fixed seeds, no atomics).
    """
    thr = thresholds or StabilityThresholds()
    C = int(layer.channels)
    notes: list[str] = []
    # every norm and margin is a property of the parameters: computed from a float64 copy
    lay64 = layer if layer.dtype == np.float64 else cast_layer(layer, np.float64)
    margins = [kernel_margins(K, c) for K, c in layer_kernels(lay64)]
    max_ratio = max(m.max_ratio for m in margins)
    block_ratio = max(m.block_ratio for m in margins)
    bound = float(np.prod([m.bound for m in margins]))  # ||M1^{-1} M2^{-1}|| <= product
    if x is None:
        x = np.random.default_rng(seed).standard_normal((batch, H, W, C))
    elif x.shape[1:] != (H, W, C):
        raise ValueError(f"measure_layer: x has shape {x.shape}, expected (N, {H}, {W}, {C})")
    rt32 = roundtrip_error(layer, x, np.float32)
    rt64 = roundtrip_error(lay64, x, np.float64)

    norm_1 = norm_inf = norm_2 = m_inf = growth = None
    with np.errstate(over="ignore", invalid="ignore"):
        if is_substitution_layer(layer) and not hasattr(layer, "stability_kernels"):
            K = np.asarray(lay64.kernel, dtype=np.float64)
            E = np.zeros((C, H, W, C))
            E[np.arange(C), 0, 0, np.arange(C)] = 1.0
            h = lay64.inverse(E)  # the layer's own solver: columns of M^{-1} at pixel (0, 0)
            ht = impulse_responses(K, H, W, transpose=True)
            norm_1 = _abs_max_sum(h)
            a_inf = amplification_by_size(ht)
            norm_inf = _abs_max_sum(ht)
            growth = growth_rate(a_inf)
            m_inf = float(np.abs(K).sum(axis=(0, 1, 2)).max())  # ||M||_inf (interior rows)
            if power_iters:
                norm_2 = power_norm(
                    lambda v: solve_padded(v, K),
                    lambda w: solve_transpose(w, K),
                    (1, H, W, C),
                    iters=power_iters,
                    seed=seed,
                )
        elif H * W * C <= max_dense:
            Minv = dense_matrix(lay64.inverse, H, W, C)
            M = dense_matrix(lambda e: _forward_only(lay64, e), H, W, C)
            norm_1 = float(np.abs(Minv).sum(axis=0).max())
            norm_inf = float(np.abs(Minv).sum(axis=1).max())
            m_inf = float(np.abs(M).sum(axis=1).max())
            if power_iters:
                norm_2 = power_norm(
                    lambda v: (Minv @ v.reshape(-1)).reshape(v.shape),
                    lambda w: (Minv.T @ w.reshape(-1)).reshape(w.shape),
                    (1, H, W, C),
                    iters=power_iters,
                    seed=seed,
                )
        else:
            notes.append(
                f"norms not computed: {type(layer).__name__} has no impulse path "
                f"and H*W*C = {H * W * C} > max_dense = {max_dense}"
            )
    condition = None if norm_inf is None else norm_inf * m_inf
    if not np.isfinite(norm_inf if norm_inf is not None else 0.0):
        notes.append("||M^-1|| overflows float64")
    status = "ok"
    if condition is not None and not condition <= thr.max_condition:
        status = "at-risk"
        notes.append(f"condition ||M|| ||M^-1|| = {condition:.3g} > {thr.max_condition:.3g}")
    if not rt32 <= thr.max_roundtrip_f32:
        status = "unstable"
        notes.append(f"float32 round trip {rt32:.3g} > {thr.max_roundtrip_f32:.3g}")
    if not np.isfinite(bound) and status != "ok":
        notes.append(
            f"not diagonally dominant: max r_o/|d_o| = {max_ratio:.3g}, "
            f"block ratio q = {block_ratio:.3g}"
        )
    return LayerStability(
        name or type(layer).__name__,
        type(layer).__name__,
        (H, W, C),
        max_ratio,
        block_ratio,
        bound,
        norm_inf,
        norm_1,
        norm_2,
        condition,
        growth,
        rt32,
        rt64,
        status,
        notes,
    )


def _abs_max_sum(h: np.ndarray) -> float:
    return float(np.abs(h).reshape(h.shape[0], -1).sum(axis=1).max())


def _forward_only(layer: Layer, x: np.ndarray) -> np.ndarray:
    y, _ = layer.forward(x)
    layer.clear_cache()
    return y


def format_report(rows: list[LayerStability]) -> str:
    """A fixed-width text table of :class:`LayerStability` rows: row ratio ``r/|d|``, block
    ratio ``q`` (either ``< 1`` gives the finite ``bound`` on ``||M^-1||_inf``), the exact
    ``||M^-1||_inf``, its growth per image row/column and the layer's relative round-trip
    errors in float32 and float64."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    head = (
        f"{'layer':<28} {'HxWxC':>10} {'r/|d|':>7} {'q':>7} {'bound':>8} {'|M^-1|inf':>10} "
        f"{'growth':>7} {'rt f32':>9} {'rt f64':>9}  status"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        hwc = "x".join(str(s) for s in r.shape)
        lines.append(
            f"{r.name[:28]:<28} {hwc:>10} {r.max_ratio:>7.3g} {r.block_ratio:>7.3g} "
            f"{f(r.bound):>8} "
            f"{f(r.norm_inf):>10} {f(r.growth):>7} {r.roundtrip_f32:>9.2e} "
            f"{r.roundtrip_f64:>9.2e}  {r.status}"
        )
    return "\n".join(lines)


def warn_unstable(rows: list[LayerStability]) -> list[LayerStability]:
    """Emit one :class:`InverseInstabilityWarning` naming every layer not ``"ok"``; return them."""
    bad = [r for r in rows if r.status != "ok"]
    if bad:
        msg = "; ".join(f"{r.name} [{r.status}]: {', '.join(r.notes)}" for r in bad)
        warnings.warn(
            f"the inverse of {len(bad)} layer(s) amplifies round-off: {msg}",
            InverseInstabilityWarning,
            stacklevel=2,
        )
    return bad


# --------------------------------------------------------------------------------------------
# Whole models: find the invertible convolutions and the image size each one sees
# --------------------------------------------------------------------------------------------


def _spy_inputs(root: Layer, run: Callable[[], Any], keep: Callable[[np.ndarray], Any]) -> dict:
    """Call ``run()`` and store ``keep(x)`` for the input ``x`` of every invertible convolution
    under ``root`` (the last call wins). Caches are cleared afterwards."""
    seen: dict[str, Any] = {}
    layers = dict(iter_invertible_convs(root))

    def spy(path: str, lay: Layer) -> Callable:
        cls_forward = type(lay).forward

        def forward(x, *args, **kw):
            seen[path] = keep(x)
            return cls_forward(lay, x, *args, **kw)

        return forward

    try:
        for path, lay in layers.items():
            lay.forward = spy(path, lay)  # instance attribute shadows the method
        run()
    finally:
        for lay in layers.values():
            lay.__dict__.pop("forward", None)
        root.clear_cache()
    return seen


def record_input_shapes(root: Layer, run: Callable[[], Any]) -> dict[str, tuple[int, int]]:
    """Call ``run()`` (e.g. ``lambda: model.forward(x)``) and record the ``(H, W)`` each
    invertible convolution under ``root`` receives. Caches are cleared afterwards."""
    return _spy_inputs(root, run, lambda x: (int(x.shape[1]), int(x.shape[2])))


def record_layer_inputs(root: Layer, run: Callable[[], Any]) -> dict[str, np.ndarray]:
    """Like :func:`record_input_shapes`, but keep a copy of the input ``(N, H, W, C)`` of every
    invertible convolution (its activations on the data given to ``run``)."""
    return _spy_inputs(root, run, lambda x: np.array(x, copy=True))


def measure_model(
    root: Layer,
    shapes: dict[str, tuple[int, int]] | dict[str, np.ndarray],
    **kw: Any,
) -> list[LayerStability]:
    """:func:`measure_layer` for every invertible convolution of ``root`` listed in ``shapes``,
    in tree order. ``shapes`` maps paths to ``(H, W)`` (:func:`record_input_shapes`; the round
    trips then use random normal inputs) or to the layer's actual inputs
    (:func:`record_layer_inputs`; round trips on those activations)."""
    rows = []
    for path, lay in iter_invertible_convs(root):
        if path not in shapes:
            continue
        v = shapes[path]
        if isinstance(v, np.ndarray):
            rows.append(measure_layer(lay, v.shape[1], v.shape[2], name=path, x=v, **kw))
        else:
            rows.append(measure_layer(lay, *v, name=path, **kw))
    return rows


@dataclass
class ModelStability:
    """Stability report of a whole flow on some images (:func:`measure_model_stability`).

    Attributes
    ----------
    roundtrip_f32, roundtrip_f64 : relative reconstruction errors
        ``max|f^{-1}(f(x)) - x| / max|x|`` of the model in float32 and float64 (``inf`` when
        the reconstruction is not finite).
    solve_f64_roundtrip_f32 : float32 model whose substitutions are solved in float64
        (``inverse(z, solve_precision="float64")``), or None when not measured.
    layers : per invertible convolution, on its own input activations.
    threshold : the float32 round-trip error above which the model is ``"unstable"``.
    num_images : images used.
    """

    roundtrip_f32: float
    roundtrip_f64: float
    solve_f64_roundtrip_f32: float | None
    layers: list[LayerStability]
    threshold: float
    num_images: int

    @property
    def status(self) -> str:
        """``"unstable"`` (the model or a layer over its threshold), ``"at-risk"`` (a layer's
        condition number is large) or ``"ok"``."""
        if not self.roundtrip_f32 <= self.threshold or any(
            r.status == "unstable" for r in self.layers
        ):
            return "unstable"
        return "at-risk" if any(r.status == "at-risk" for r in self.layers) else "ok"

    def summary(self) -> dict[str, float]:
        """Scalars for a metrics table (worst layer values; ``nan`` for missing norms)."""

        def worst(vals: list[float | None]) -> float:
            v = [np.inf if x is None or not np.isfinite(x) else x for x in vals if x is not None]
            return float(max(v)) if v else float("nan")

        return {
            "roundtrip_f32": self.roundtrip_f32,
            "roundtrip_f64": self.roundtrip_f64,
            "max_layer_roundtrip_f32": worst([r.roundtrip_f32 for r in self.layers]),
            "max_norm_inf": worst([r.norm_inf for r in self.layers]),
            "max_growth": worst([r.growth for r in self.layers]),
            "max_block_ratio": worst([r.block_ratio for r in self.layers]),
            "layers_not_ok": float(sum(r.status != "ok" for r in self.layers)),
        }

    def format(self) -> str:
        """The per-layer table and the model round trips, as text."""
        lines = [format_report(self.layers), ""]
        lines.append(
            f"model round trip x -> z -> x on {self.num_images} image(s), relative max error: "
            f"float32 {self.roundtrip_f32:.3g}, float64 {self.roundtrip_f64:.3g}"
            + (
                ""
                if self.solve_f64_roundtrip_f32 is None
                else f", float32 with float64 substitution {self.solve_f64_roundtrip_f32:.3g}"
            )
        )
        lines.append(f"status: {self.status} (threshold {self.threshold:.3g} on float32)")
        return "\n".join(lines)

    def warning(self) -> str | None:
        """A one-paragraph warning naming what is over its threshold, or None when ``"ok"``."""
        if self.status == "ok":
            return None
        parts = []
        if not self.roundtrip_f32 <= self.threshold:
            parts.append(
                f"float32 reconstruction error {self.roundtrip_f32:.3g} > {self.threshold:.3g}"
            )
        for r in self.layers:
            if r.status != "ok":
                parts.append(f"{r.name} [{r.status}]: {', '.join(r.notes)}")
        return (
            f"INVERSE {self.status.upper()}: " + "; ".join(parts) + " (samples and "
            "reconstructions may be inaccurate; train with --guard RHO, or sample with "
            "--solve-precision float64; docs/stability.md)"
        )


def measure_model_stability(
    model: Layer,
    x: np.ndarray,
    *,
    threshold: float = 1e-4,
    thresholds: StabilityThresholds | None = None,
    power_iters: int = 0,
    solve_f64: bool = True,
    **kw: Any,
) -> ModelStability:
    """Measure a flow on images ``x`` (model space, the model's dtype): reconstruction error
    ``x -> z -> x`` in float32 and float64 and, per invertible convolution, the
    :func:`measure_layer` numbers on its own input activations.

    ``threshold`` is the float32 model round-trip error above which the status is
    ``"unstable"``; ``thresholds`` the per-layer ones. Deterministic for fixed arguments.
    """
    thr = thresholds or StabilityThresholds(max_roundtrip_f32=threshold)
    x = np.asarray(x)
    inputs = record_layer_inputs(model, lambda: model.forward(x))
    rows = measure_model(model, inputs, thresholds=thr, power_iters=power_iters, **kw)
    rt32 = roundtrip_error(model, x, np.float32)
    rt64 = roundtrip_error(model, x, np.float64)
    rt32_64 = None
    if solve_f64:
        lay32 = model if model.dtype == np.float32 else cast_layer(model, np.float32)
        rt32_64 = roundtrip_error(lay32, x, np.float32, solve_precision="float64")
    return ModelStability(rt32, rt64, rt32_64, rows, float(threshold), int(x.shape[0]))
