r"""Using the exact latent of a flow: encoding, attribute directions, manipulation,
interpolation and reconstruction (paper Section 4, "Interpretability results", Figure 5).

A flow is a bijection ``z = f(x)`` (``model.forward``, data -> latent) with an exact inverse
``x = f^{-1}(z)`` (``model.inverse``), so every image has exactly one latent and decoding it
gives the image back up to floating-point error (paper Section 2, change-of-variable formula
``p(x) = N(f(x); 0, I) |det df/dx|``). Editing is done in latent space::

    encode      z = f(x)                                       (N, D),  D = H W C
    direction   v_a  from labelled latents (below)             (D,)
    edit        z(s) = z + s v_a,   x(s) = f^{-1}(z(s))        s = strength, s = 0 -> x
    interpolate z(t) = (1 - t) z_0 + t z_1,  t in [0, 1]       (or spherical, see below)

Attribute directions (``method=``), for latents ``z_n`` and a scalar attribute ``a_n``::

    "mean_difference"  v = mean(z | a > thr) - mean(z | a <= thr)        (Glow, Sec. 5)
    "regression"       v = Cov(z, a) / Var(a)                            (least-squares slope)
    "covariance"       v = Cov(z, a)                                     (paper's wording)

They are one vector up to scale for a binary attribute: with ``a`` in ``{0, 1}`` and
``p = P(a = 1)``, ``Cov(z, a) = p (1 - p) (mu_1 - mu_0)`` and ``Var(a) = p (1 - p)``, so the
regression direction *equals* the mean difference; with CelebA's ``{-1, +1}`` it is half of it
(one unit of ``a``; ``-1 -> +1`` is two units). The raw covariance is ``Var(a)`` times the
regression direction, so its length depends on how common the attribute is. For a continuous
attribute the regression direction is the slope of ``E[z | a]`` (exact when ``(z, a)`` is
jointly Gaussian): ``z + s v`` moves the latent by ``s`` units of the attribute. Details and the
derivation: ``docs/latent.md``.

Pixel convention (:mod:`flownp.data.pixels`): uint8 images ``u`` enter the model as their bin
centres ``x = (u + 1/2) / 256 - 1/2`` (no dequantisation noise here) and leave it as
``u = clip(floor((x + 1/2) 256), 0, 255)``, so a reconstruction error below ``1/512`` gives the
uint8 image back exactly. Labelled data for directions (MNIST pixel attributes, CelebA) comes
from :mod:`flownp.data.attributes`; pictures from :mod:`flownp.figures`.

Model interface: any object with ``forward(x) -> (z, logdet)`` and ``inverse(z) -> x``; if it
has ``config.image_shape`` / ``config.dtype`` (``FlowModel``) inputs are checked against them,
and ``clear_cache()`` is called after each batch to release remembered activations. A model of
N-bit data (``config.n_bits``) sees uint8 images as the centres of its wider bins
(:mod:`flownp.data.pixels`), and its reconstructions are compared with the images on its grid.

Class-conditional models (``config.num_classes``) are encoded and decoded without labels, in
their *label-free latent* (:class:`flownp.model.FlowModel`: the top prior without its label
term). It is an exact bijection of its own, so every edit, interpolation and reconstruction
works the same on such a model, and images of different classes share one latent space.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.data.pixels import images_to_model, model_to_images, quantize
from flownp.errors import DataError, NonFiniteError

METHODS = ("regression", "mean_difference", "covariance")
INTERPOLATIONS = ("linear", "spherical")

# --------------------------------------------------------------------------- encode / decode


def model_image_shape(model: Any) -> tuple[int, int, int] | None:
    """``model.config.image_shape`` as ``(H, W, C)``, or None when the model does not say."""
    shape = getattr(getattr(model, "config", None), "image_shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def model_dtype(model: Any) -> np.dtype:
    """``model.config.dtype`` (or ``model.dtype``), default float64."""
    dt = getattr(getattr(model, "config", None), "dtype", None)
    if dt is None:
        dt = getattr(model, "dtype", np.float64)
    return np.dtype(dt)


def model_n_bits(model: Any) -> int:
    """``model.config.n_bits`` (bits per pixel of the model's data), default 8."""
    return int(getattr(getattr(model, "config", None), "n_bits", 8))


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for start in range(0, n, int(batch_size)):
        yield slice(start, min(n, start + int(batch_size)))


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Iterator[Any]:
    """``iterable`` with :class:`flownp.progress.Progress` (a bar on a terminal, a few plain
    lines otherwise)."""
    from flownp.progress import Progress

    with Progress(total, desc=desc, unit="batch", enabled=enabled, lines=10) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _inference(model: Any) -> Any:
    """The model's :meth:`flownp.model.FlowModel.no_stored_activations` where it has one
    (a forward pass that keeps no activations), else a block that clears its caches after."""
    own = getattr(model, "no_stored_activations", None)
    return own() if callable(own) else _released(model)


@contextlib.contextmanager
def _released(model: Any) -> Iterator[None]:
    try:
        yield
    finally:
        _release(model)


def _release(model: Any) -> None:
    clear = getattr(model, "clear_cache", None)
    if callable(clear):
        clear()


def prepare_images(model: Any, images: np.ndarray, where: str = "encode") -> np.ndarray:
    """Validate images for ``model`` and return them in model space.

    uint8 ``(N, H, W, C)`` images are mapped by :func:`images_to_model`; float images must
    already be in model space and of the model's dtype (else ``TypeError``). The shape must
    match ``model.config.image_shape`` when the model has one (else ``ValueError``).
    """
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{where}: images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be NHWC (rank 4), got shape {images.shape}")
    shape = model_image_shape(model)
    if shape is not None and images.shape[1:] != shape:
        raise ValueError(
            f"{where}: images have shape {images.shape[1:]} (H, W, C), the model expects {shape}"
        )
    dt = model_dtype(model)
    if images.dtype == np.uint8:
        return images_to_model(images, dt, model_n_bits(model))
    if images.dtype != dt:
        raise TypeError(
            f"{where}: images have dtype {images.dtype}, the model is {dt} "
            "(pass uint8 images, or floats in model space u/256 - 0.5 of the model's dtype)"
        )
    return images


def encode(
    model: Any, images: np.ndarray, *, batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    """Exact latents ``z = f(x)`` of a batch of images, ``(N, D)`` in the model's dtype.

    Parameters
    ----------
    model : object with ``forward(x) -> (z, logdet)``
    images : (N, H, W, C) uint8, or float in model space (``u / 256 - 0.5``)
    batch_size : images per call of ``model.forward``
    progress : show progress (a bar on a terminal, plain lines otherwise)
    """
    x = prepare_images(model, images, "encode")
    out = []
    n_batches = math.ceil(len(x) / batch_size) if len(x) else 0
    for sl in _progress(_batches(len(x), batch_size), n_batches, "encode", progress):
        with _inference(model):
            z, _ = model.forward(x[sl])
        out.append(np.asarray(z).reshape(sl.stop - sl.start, -1))  # (B, D)
    if not out:
        raise ValueError("encode: no images")
    return np.concatenate(out, axis=0)


def decode(
    model: Any, z: np.ndarray, *, batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    """Images ``x = f^{-1}(z)`` in model space, ``(N, H, W, C)``, from latents ``(N, D)``.

    ``z`` is converted to the model's dtype. Non-finite latents, or a non-finite result (an
    unstable inverse, ``docs/stability.md``), raise :class:`NonFiniteError`.
    """
    z = np.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"decode: latents must be (N, D), got shape {z.shape}")
    shape = model_image_shape(model)
    if shape is not None and z.shape[1] != math.prod(shape):
        raise ValueError(
            f"decode: latents have D = {z.shape[1]}, the model's image {shape} has "
            f"D = {math.prod(shape)}"
        )
    if not np.isfinite(z).all():
        raise NonFiniteError(f"decode: latents contain {int(np.sum(~np.isfinite(z)))} NaN/Inf")
    z = np.ascontiguousarray(z, dtype=model_dtype(model))
    out = []
    n_batches = math.ceil(len(z) / batch_size) if len(z) else 0
    for sl in _progress(_batches(len(z), batch_size), n_batches, "decode", progress):
        out.append(np.asarray(model.inverse(z[sl])))
        _release(model)
    if not out:
        raise ValueError("decode: no latents")
    x = np.concatenate(out, axis=0)
    if not np.isfinite(x).all():
        raise NonFiniteError(
            f"decode: the inverse produced {int(np.sum(~np.isfinite(x)))} NaN/Inf value(s) "
            "(an unstable inverse? see docs/stability.md)"
        )
    if shape is not None:
        x = x.reshape((len(z),) + shape)
    return x


# --------------------------------------------------------------------------- directions


class AttributeStatistics:
    """Streaming statistics of latents and attributes, from which directions are computed.

    ``update(z, a)`` may be called batch by batch (the latents of a large data set never need to
    be held in memory). Kept in float64: the count ``n``, the means of ``z`` and ``a``, the
    co-moment ``C_za = sum_n (a_n - abar)(z_n - zbar)^T`` ``(K, D)`` and ``M_a = sum (a - abar)^2``
    ``(K,)``, merged across batches with Chan et al.'s pairwise update (no cancellation), and
    per attribute the sums and counts of ``z`` over ``a > threshold`` and ``a <= threshold``.

    Parameters
    ----------
    dim : D, the latent size
    names : attribute names (K of them)
    threshold : the split of :meth:`directions` ``"mean_difference"``, one value or one per
        attribute (0 suits +-1 labels, 0/1 labels and standardised continuous attributes)
    """

    def __init__(
        self, dim: int, names: Sequence[str], *, threshold: float | Sequence[float] = 0.0
    ) -> None:
        self.dim = int(dim)
        self.names = tuple(str(n) for n in names)
        K = len(self.names)
        if K < 1:
            raise ValueError("AttributeStatistics: needs at least one attribute name")
        thr = np.asarray(threshold, dtype=np.float64)
        if thr.ndim > 1 or (thr.ndim == 1 and thr.shape != (K,)):
            raise ValueError(f"AttributeStatistics: threshold must be a scalar or ({K},)")
        self.threshold = np.broadcast_to(thr, (K,)).copy()  # (K,)
        self.n = 0
        self.mean_z = np.zeros(self.dim)  # (D,)
        self.mean_a = np.zeros(K)  # (K,)
        self.comoment = np.zeros((K, self.dim))  # (K, D)  sum (a - abar)(z - zbar)
        self.m2_a = np.zeros(K)  # (K,)   sum (a - abar)^2
        self.sum_pos = np.zeros((K, self.dim))  # (K, D)  sum of z over a > threshold
        self.sum_neg = np.zeros((K, self.dim))
        self.n_pos = np.zeros(K, dtype=np.int64)
        self.n_neg = np.zeros(K, dtype=np.int64)

    def update(self, z: np.ndarray, attributes: np.ndarray) -> None:
        """Add a batch: ``z`` (B, D), ``attributes`` (B, K) (or (B,) when K = 1)."""
        z = np.asarray(z, dtype=np.float64)
        a = np.asarray(attributes, dtype=np.float64)
        if a.ndim == 1:
            a = a[:, None]
        K = len(self.names)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"AttributeStatistics: z must be (B, {self.dim}), got {z.shape}")
        if a.shape != (len(z), K):
            raise ValueError(
                f"AttributeStatistics: attributes must be ({len(z)}, {K}), got {a.shape}"
            )
        if not (np.isfinite(z).all() and np.isfinite(a).all()):
            raise NonFiniteError("AttributeStatistics: NaN/Inf in the latents or attributes")
        b = len(z)
        if b == 0:
            return
        mz, ma = z.mean(axis=0), a.mean(axis=0)  # (D,), (K,)
        zc, ac = z - mz, a - ma  # (B, D), (B, K)
        n, tot = self.n, self.n + b
        dz, da = mz - self.mean_z, ma - self.mean_a
        w = n * b / tot
        self.comoment += ac.T @ zc + w * np.outer(da, dz)  # (K, D)
        self.m2_a += np.sum(ac * ac, axis=0) + w * da * da  # (K,)
        self.mean_z += dz * (b / tot)
        self.mean_a += da * (b / tot)
        pos = (a > self.threshold).astype(np.float64)  # (B, K)
        self.sum_pos += pos.T @ z
        self.sum_neg += (1.0 - pos).T @ z
        self.n_pos += pos.sum(axis=0).astype(np.int64)
        self.n_neg += b - pos.sum(axis=0).astype(np.int64)
        self.n = tot

    def directions(self, method: str = "regression") -> np.ndarray:
        """Directions ``(K, D)`` float64, one row per attribute (module docstring)."""
        if method not in METHODS:
            raise ValueError(
                f"AttributeStatistics: method must be one of {METHODS}, got {method!r}"
            )
        if self.n < 2:
            raise ValueError(f"AttributeStatistics: needs at least 2 samples, has {self.n}")
        if method == "mean_difference":
            empty = [
                f"{name!r} ({p} above / {q} at or below {t:g})"
                for name, p, q, t in zip(
                    self.names, self.n_pos, self.n_neg, self.threshold, strict=True
                )
                if p == 0 or q == 0
            ]
            if empty:
                raise DataError(
                    "mean_difference direction: an attribute has an empty group: "
                    + ", ".join(empty)
                )
            return self.sum_pos / self.n_pos[:, None] - self.sum_neg / self.n_neg[:, None]
        if method == "covariance":
            return self.comoment / self.n
        const = [name for name, m in zip(self.names, self.m2_a, strict=True) if not m > 0]
        if const:
            raise DataError(
                f"regression direction: attribute(s) {const} are constant over the "
                f"{self.n} images (zero variance)"
            )
        return self.comoment / self.m2_a[:, None]

    def direction(self, name: str, method: str = "regression") -> np.ndarray:
        """The direction ``(D,)`` of one attribute by name."""
        if name not in self.names:
            raise KeyError(f"AttributeStatistics: no attribute {name!r}; have {list(self.names)}")
        return self.directions(method)[self.names.index(name)]


def attribute_directions(
    z: np.ndarray,
    attributes: np.ndarray,
    *,
    method: str = "regression",
    threshold: float | Sequence[float] = 0.0,
) -> np.ndarray:
    """Attribute directions from latents held in memory.

    Parameters
    ----------
    z : (N, D) latents
    attributes : (N,) or (N, K) attribute values (+-1, 0/1 or continuous)
    method : "regression" (``Cov(z, a) / Var(a)``), "mean_difference" or "covariance"
    threshold : split of the mean difference (``a > threshold`` vs the rest), scalar or (K,)

    Returns
    -------
    (D,) for a 1-D ``attributes``, else (K, D), float64.
    """
    a = np.asarray(attributes)
    z = np.asarray(z)
    if z.ndim != 2:
        raise ValueError(f"attribute_directions: z must be (N, D), got shape {z.shape}")
    K = 1 if a.ndim == 1 else a.shape[1]
    stats = AttributeStatistics(z.shape[1], [f"a{k}" for k in range(K)], threshold=threshold)
    stats.update(z, a)
    v = stats.directions(method)
    return v[0] if a.ndim == 1 else v


def encode_statistics(
    model: Any,
    images: np.ndarray,
    attributes: np.ndarray,
    names: Sequence[str],
    *,
    batch_size: int = 256,
    threshold: float | Sequence[float] = 0.0,
    progress: bool = False,
) -> AttributeStatistics:
    """Encode ``images`` batch by batch and accumulate :class:`AttributeStatistics`.

    ``attributes`` is ``(N, K)`` (or ``(N,)``), one column per name.
    """
    a = np.asarray(attributes, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if len(a) != len(images):
        raise ValueError(f"encode_statistics: {len(images)} images but {len(a)} attribute rows")
    stats: AttributeStatistics | None = None
    n_batches = math.ceil(len(images) / batch_size) if len(images) else 0
    for sl in _progress(_batches(len(images), batch_size), n_batches, "statistics", progress):
        z = encode(model, images[sl], batch_size=batch_size)  # (B, D)
        if stats is None:
            stats = AttributeStatistics(z.shape[1], names, threshold=threshold)
        stats.update(z, a[sl])
    if stats is None:
        raise ValueError("encode_statistics: no images")
    return stats


# --------------------------------------------------------------------------- editing


def strength_sweep(max_strength: float, steps_each_side: int) -> np.ndarray:
    """``2 k + 1`` strengths ``-m, ..., -m/k, 0, m/k, ..., m`` (0 exactly in the middle)."""
    k = int(steps_each_side)
    if k < 1:
        raise ValueError(f"strength_sweep: steps_each_side must be >= 1, got {steps_each_side}")
    side = float(max_strength) * np.arange(1, k + 1) / k
    return np.concatenate([-side[::-1], [0.0], side])


def shift_latents(z: np.ndarray, direction: np.ndarray, strengths: np.ndarray) -> np.ndarray:
    """``z(s) = z + s v`` for every image and strength: (N, D), (D,), (S,) -> (N, S, D).

    Computed in float64 and returned in ``z``'s dtype; ``s = 0`` gives ``z`` exactly.
    """
    z = np.asarray(z)
    v = np.asarray(direction, dtype=np.float64)
    s = np.asarray(strengths, dtype=np.float64).reshape(-1)
    if z.ndim != 2 or v.shape != (z.shape[1],):
        raise ValueError(
            f"shift_latents: z must be (N, D) and direction (D,), got {z.shape} and {v.shape}"
        )
    out = z[:, None, :].astype(np.float64) + s[None, :, None] * v[None, None, :]  # (N, S, D)
    return out.astype(z.dtype)


def manipulate(
    model: Any,
    images: np.ndarray,
    direction: np.ndarray,
    strengths: np.ndarray,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """Edit images along a latent direction (paper Figure 5).

    Returns ``(N, S, H, W, C)`` in model space: ``f^{-1}(f(x_n) + s v)`` for every image ``n``
    and strength ``s``; at ``s = 0`` this is the reconstruction of ``x_n``.
    """
    z = encode(model, images, batch_size=batch_size)  # (N, D)
    zs = shift_latents(z, direction, strengths)  # (N, S, D)
    N, S, D = zs.shape
    x = decode(model, zs.reshape(N * S, D), batch_size=batch_size)  # (N S, H, W, C)
    return x.reshape((N, S) + x.shape[1:])


def interpolate_latents(
    z0: np.ndarray, z1: np.ndarray, steps: int, method: str = "linear"
) -> np.ndarray:
    """Paths between latents: (D,) or (N, D) pairs -> (steps, D) or (N, steps, D).

    ``"linear"``: ``z(t) = (1 - t) z0 + t z1`` for ``t = linspace(0, 1, steps)``.
    ``"spherical"`` (slerp, Shoemake 1985; White 2016 for generative models):
    ``z(t) = (sin((1 - t) W) z0 + sin(t W) z1) / sin W`` with ``W`` the angle between ``z0``
    and ``z1``; it keeps the norm when ``|z0| = |z1|`` (a standard normal latent lives near the
    sphere of radius ``sqrt(D)``; the linear midpoint of two independent latents has norm about
    ``sqrt(D / 2)``, an atypically likely point). Pairs at an angle below ``1e-6`` or within
    ``1e-6`` of pi (no unique great circle) use the linear path. The endpoints are ``z0`` and
    ``z1`` exactly in both methods.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"interpolate: method must be one of {INTERPOLATIONS}, got {method!r}")
    steps = int(steps)
    if steps < 2:
        raise ValueError(f"interpolate: steps must be >= 2 (the two endpoints), got {steps}")
    a, b = np.asarray(z0), np.asarray(z1)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(
            f"interpolate: z0 and z1 must both be (D,) or (N, D), got {a.shape}, {b.shape}"
        )
    single = a.ndim == 1
    a2, b2 = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)  # (N, D)
    t = np.linspace(0.0, 1.0, steps)  # (T,)
    wa = np.broadcast_to(1.0 - t, (len(a2), steps)).copy()  # (N, T) weight of z0
    wb = np.broadcast_to(t, (len(a2), steps)).copy()  # (N, T) weight of z1
    if method == "spherical":
        na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)  # (N,)
        cos = np.clip(np.sum(a2 * b2, axis=1) / np.maximum(na * nb, 1e-300), -1.0, 1.0)
        omega = np.arccos(cos)  # (N,)
        ok = (omega > 1e-6) & (omega < np.pi - 1e-6)
        so = np.sin(omega[ok])[:, None]
        wa[ok] = np.sin((1.0 - t)[None, :] * omega[ok, None]) / so
        wb[ok] = np.sin(t[None, :] * omega[ok, None]) / so
    out = wa[:, :, None] * a2[:, None, :] + wb[:, :, None] * b2[:, None, :]  # (N, T, D)
    out[:, 0], out[:, -1] = a2, b2  # exact endpoints
    out = out.astype(np.result_type(a.dtype, b.dtype, np.float32))
    return out[0] if single else out


def interpolate(
    model: Any,
    images0: np.ndarray,
    images1: np.ndarray,
    steps: int,
    *,
    method: str = "linear",
    batch_size: int = 256,
) -> np.ndarray:
    """Decode the latent path between pairs of images: (N, steps, H, W, C) in model space.

    The first and last columns are the reconstructions of ``images0`` and ``images1``.
    """
    z0 = encode(model, images0, batch_size=batch_size)  # (N, D)
    z1 = encode(model, images1, batch_size=batch_size)
    if z0.shape != z1.shape:
        raise ValueError(f"interpolate: {len(z0)} start images but {len(z1)} end images")
    zt = interpolate_latents(z0, z1, steps, method).astype(z0.dtype)  # (N, T, D)
    N, T, D = zt.shape
    x = decode(model, zt.reshape(N * T, D), batch_size=batch_size)
    return x.reshape((N, T) + x.shape[1:])


# --------------------------------------------------------------------------- reconstruction


@dataclass(frozen=True)
class ReconstructionReport:
    """How exactly ``f^{-1}(f(x))`` returns ``x`` (model space, pixel range 1)."""

    n_images: int
    dtype: str
    max_abs_error: float
    rms_error: float
    worst_image: int
    uint8_mismatches: int  # pixels whose rounded uint8 value differs from the original

    @property
    def exact_uint8(self) -> bool:
        return self.uint8_mismatches == 0

    def __str__(self) -> str:
        return (
            f"reconstruction of {self.n_images} image(s) ({self.dtype}): "
            f"max |x - f^-1(f(x))| = {self.max_abs_error:.3e} (image {self.worst_image}), "
            f"rms {self.rms_error:.3e}, uint8 pixels differing: {self.uint8_mismatches}"
        )


def reconstruction_report(
    model: Any, images: np.ndarray, *, batch_size: int = 256
) -> tuple[ReconstructionReport, np.ndarray]:
    """Encode and decode ``images``; return the error report and the reconstructions.

    The uint8 comparison is made only for uint8 inputs, on the model's N-bit grid
    (:func:`~flownp.data.pixels.quantize`; else ``uint8_mismatches`` counts against
    :func:`model_to_images` of the float input).
    """
    x = prepare_images(model, images, "reconstruct")
    rec = decode(model, encode(model, x, batch_size=batch_size), batch_size=batch_size)
    err = np.abs(rec.astype(np.float64) - x.astype(np.float64)).reshape(len(x), -1)  # (N, D)
    bits = model_n_bits(model)
    ref = quantize(images, bits) if images.dtype == np.uint8 else model_to_images(x, bits)
    report = ReconstructionReport(
        n_images=len(x),
        dtype=str(x.dtype),
        max_abs_error=float(err.max()),
        rms_error=float(np.sqrt(np.mean(err * err))),
        worst_image=int(np.argmax(err.max(axis=1))),
        uint8_mismatches=int(np.count_nonzero(model_to_images(rec, bits) != ref)),
    )
    return report, rec
