r"""The multi-scale flow (RealNVP / Glow architecture, as used by the paper, Section 4).

Direction: ``forward`` maps an image ``x`` (data) to the latent ``z``; ``inverse`` maps back.

Architecture for ``FlowConfig(image_shape=(H, W, C), levels=L, depth=D, ...)``::

    for level l = 0 .. L-1:
        squeeze                               (H_l, W_l, C_l) = (H/2^(l+1), W/2^(l+1), 4 C 2^l)
        D steps:  actnorm -> invertible conv -> coupling       (shape unchanged)
        if l < L-1:  split: keep C_l/2 channels, factor out and standardise the other C_l/2
    top prior: standardise the last level's output with a learned mean/log-scale

(the first squeeze is the "initial squeeze"; every later level starts with one too, so the
kept half of level l, ``(H_l, W_l, C_l/2)``, becomes ``(H_l/2, W_l/2, 2 C_l)``).

Every factored-out piece is *standardised* (``eps = (z - mean) * exp(-logs)``, log-det
``-sum logs``, :mod:`flownp.layers.split`), so the whole latent is standard normal::

    log p(x) = sum_i log N(z_i; 0, 1) + logdet(x)                 (change of variables, Eq. 1)
             = -0.5 * sum_i z_i^2 - 0.5 * D_x * log(2 pi) + logdet

Latent layout (documented for porters): ``z`` has shape ``(N, H*W*C)`` and is the
concatenation, in this order, of ``eps_0.reshape(N, -1), eps_1.reshape(N, -1), ...,
eps_{L-2}.reshape(N, -1)`` (the split-off latents, level 0 first, each in its own NHWC
(row, column, channel) order, shape ``(H_l, W_l, C_l/2)``) and finally the top latent
``eps_top.reshape(N, -1)`` of shape ``(H_{L-1}, W_{L-1}, C_{L-1})``. :meth:`FlowModel.latent_shapes`
lists the pieces.

Parameter paths (keys of ``params``/``grads``/``buffers``, also the HDF5 paths)::

    level{l}/step{d}/actnorm/{bias,logs}
    level{l}/step{d}/conv/...            (conv1x1/... first for "1x1+emerging", "1x1+cinc")
    level{l}/step{d}/coupling/...
    level{l}/split/prior/{weight,bias}   (l < L-1)
    prior/{mean,logs}                    (top prior)

Plumbing: the model is a list of :class:`Level` s, :attr:`FlowModel.levels`, run in order by
:meth:`FlowModel.forward` and in reverse by :meth:`FlowModel.backward` / :meth:`FlowModel.inverse`.
A level is a list of flow layers with the :class:`~flownp.layers.base.Layer` contract
(``x -> (x, logdet)``: the squeeze, then the :class:`FlowStep` s) followed by an optional
split with the :class:`~flownp.layers.base.FactorOut` contract (``x -> (h, eps, logdet)``);
each pass handles the split in one place. :attr:`FlowModel.flow` lists every node flat, for
inspection.

Memory-saving backpropagation (``FlowModel(config, recompute=True)``): invertibility lets the
backward pass rebuild every node's input from its output instead of storing it. The forward
keeps only the latent pieces ``eps_l`` (part of ``z`` anyway) and the top output; the backward
walks the nodes in reverse and, per node, recomputes ``x_in = node.inverse(x_out)`` (a split
also uses its ``eps``), re-runs ``node.forward(x_in)`` to rebuild that node's cache, then
back-propagates through it. Activation memory is one node's instead of all of them; the
price is one inverse and one extra forward per node. The gradients equal the stored path's
up to the round-off of the inverses (float64: ~1e-12 relative; ``tests/test_model_recompute.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from flownp.errors import FlownpError, NonFiniteError, SingularKernelError
from flownp.layers.actnorm import ActNorm
from flownp.layers.base import Layer, Module, check_dtype
from flownp.layers.cinc import CInCConv
from flownp.layers.conditional import (
    ConditionalPrior,
    LatentClassifier,
    check_labels,
    cross_entropy_bits,
)
from flownp.layers.conv1x1 import Conv1x1
from flownp.layers.coupling import AdditiveCoupling, AffineCoupling, QuadCoupling
from flownp.layers.emerging import EmergingConv
from flownp.layers.periodic import PeriodicConv
from flownp.layers.permute import ChannelPermutation
from flownp.layers.precision import choose_solve_dtypes, dtypes_under
from flownp.layers.split import LearnedPrior, Split
from flownp.layers.squeeze import Squeeze

CONVS = ("cinc", "emerging", "1x1", "1x1+emerging", "1x1+cinc", "periodic", "reverse", "shuffle")
COUPLINGS = ("quad", "affine", "additive")
#: Convolutions whose inverse is no substitution and that have no taps to guard.
UNGUARDED_CONVS = ("1x1", "reverse", "shuffle")
SCALES = ("sigmoid", "exp", "softclamp")
CINC_CORNERS = ("triangular", "unit", "lu")
#: How the label enters a class-conditional top prior: one offset per channel (broadcast over
#: the positions, as in Glow) or one per position and channel.
LABEL_PRIORS = ("channel", "position")
#: Latent temperature of the samples that the commands draw by default (``flownp train``
#: ``samples.png``, ``flownp sample``, ``flownp experiment``), chosen by the share of samples
#: the digit classifier finds legible (docs/experiments.md, "Choosing the sampling temperature").
SAMPLE_TEMPERATURE = 0.8

LOG_2PI = float(np.log(2.0 * np.pi))
#: Most classes a class-conditional model may have (its label embedding is (K, C) per prior).
MAX_CLASSES = 100_000
LN2 = float(np.log(2.0))
LN256 = float(np.log(256.0))


@dataclass(frozen=True)
class FlowConfig:
    """Configuration of a :class:`FlowModel` (validated on construction).

    Parameters
    ----------
    image_shape : (H, W, C)
        Image size; H and W must be divisible by ``2**levels``.
    levels : int
        Number of levels L (squeeze + D steps each; a split between levels).
    depth : int
        Steps per level D.
    width : int
        Hidden channels of the coupling conditioner networks.
    conv : {"cinc", "emerging", "1x1", "1x1+emerging", "1x1+cinc", "periodic", "reverse", "shuffle"}
        Invertible convolution of each step: the paper's CInC, Emerging, Glow's 1x1, the
        paper's Emerging baseline preceded by a 1x1 convolution, a 1x1 convolution then CInC
        (the official script's option 6), Emerging's periodic convolution (FFT), or a fixed
        channel reversal / random channel shuffle (log-det 0).
    coupling : {"quad", "affine", "additive"}
        Quad coupling (paper Eq. 3-6), Glow's affine coupling, or the additive coupling
        (log-det 0; ``scale`` is not used).
    kernel_size : int
        k of the CInC / Emerging / periodic convolution.
    scale : {"softclamp", "exp", "sigmoid"}
        Coupling scale function: ``exp(2 tanh(h / 2))`` (``exp`` with a bounded log, the
        default), ``exp(h)`` (the paper's equations) or ``sigmoid(h + 2)`` (the official code).
    dtype : {"float32", "float64"}
    cinc_corner : {"triangular", "unit", "lu"}
        Corner parameterisation of :class:`~flownp.layers.cinc.CInCConv`.
    lu : bool
        LU-parameterised 1x1 convolutions (``conv`` = "1x1", "1x1+emerging", "1x1+cinc").
    guard : float or None
        Stability guard ``rho`` in (0, 1) of every CInC / Emerging / periodic convolution
        (``docs/stability.md``): their substitutions stay inside a diagonal-dominance region,
        so the inverse amplifies round-off by a bounded factor on every image size, and every
        frequency block of the periodic convolution is invertible by construction. None: no
        guard. Not used (stored as None) with ``conv`` = "1x1", "reverse" or "shuffle", which
        have no taps to guard. Default 0.9
        (measured on MNIST: ``docs/stability.md``, section 7); a checkpoint written before the
        field existed loads with None.
    num_classes : int
        0: an unconditional model. K >= 2: a class-conditional model, whose top prior's mean
        and log-scale get a learned linear function of the one-hot label
        (:class:`~flownp.layers.conditional.ConditionalPrior`); it models ``p(x | y)`` and its
        forward, inverse and sampling take labels ``0 .. K-1``.
    weight_y : float
        >= 0. When > 0 (class-conditional models only), the model has a linear classifier on
        the spatial mean of its top latent (:class:`~flownp.layers.conditional.
        LatentClassifier`, path ``classifier``) and training minimises
        ``bits/dim + weight_y * cross-entropy in bits``.
    label_prior : str
        How the label enters a class-conditional top prior: ``"channel"`` (default; one
        offset of the mean and log-scale per channel, broadcast over the positions, as in
        Glow) or ``"position"`` (one per position and channel,
        :class:`~flownp.layers.conditional.ConditionalPrior` with ``per_position``). Unused by
        an unconditional model; a checkpoint written before the field existed loads with
        ``"channel"``.
    n_bits : int
        Bits per pixel of the data the model sees, 1..8 (:mod:`flownp.data.pixels`: N-bit
        data, dequantised with U(0, 1/2^N); bits/dim counts ``D ln 2^N``). Default 8.
    """

    image_shape: tuple[int, int, int] = (28, 28, 1)
    levels: int = 2
    depth: int = 8
    width: int = 64
    conv: str = "cinc"
    coupling: str = "affine"
    kernel_size: int = 3
    scale: str = "softclamp"
    dtype: str = "float32"
    cinc_corner: str = "lu"
    lu: bool = False
    guard: float | None = 0.9
    num_classes: int = 0
    weight_y: float = 0.0
    n_bits: int = 8
    label_prior: str = "channel"

    def __post_init__(self) -> None:
        shape = tuple(self.image_shape)
        object.__setattr__(self, "image_shape", shape)
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape):
            raise ValueError(f"FlowConfig: image_shape must be (H, W, C) ints >= 1, got {shape!r}")
        object.__setattr__(self, "image_shape", tuple(int(s) for s in shape))
        for name in ("levels", "depth", "width", "kernel_size"):
            val = getattr(self, name)
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
                raise ValueError(f"FlowConfig: {name} must be an int >= 1, got {val!r}")
            object.__setattr__(self, name, int(val))
        H, W, C = self.image_shape
        f = 2**self.levels
        if H % f or W % f:
            raise ValueError(
                f"FlowConfig: image size {H}x{W} is not divisible by 2**levels = {f} "
                f"(levels={self.levels}); use fewer levels or pad the images"
            )
        for name, choices in (
            ("conv", CONVS),
            ("coupling", COUPLINGS),
            ("scale", SCALES),
            ("cinc_corner", CINC_CORNERS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"FlowConfig: {name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        try:
            dt = check_dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"FlowConfig: {exc}") from None
        object.__setattr__(self, "dtype", dt.name)
        object.__setattr__(self, "lu", bool(self.lu))
        if self.guard is not None:
            g = self.guard
            if isinstance(g, bool) or not isinstance(g, (int, float, np.number)) or not 0 < g < 1:
                raise ValueError(f"FlowConfig: guard (rho) must be in (0, 1) or None, got {g!r}")
            # a 1x1 convolution or a permutation has no taps to guard
            unguarded = self.conv in UNGUARDED_CONVS
            object.__setattr__(self, "guard", None if unguarded else float(g))
        if "emerging" in self.conv and self.kernel_size % 2 == 0:
            raise ValueError(
                f"FlowConfig: the emerging convolution needs an odd kernel_size (two "
                f"(k+1)/2 convolutions), got {self.kernel_size}"
            )
        if self.conv == "periodic" and self.kernel_size % 2 == 0:
            raise ValueError(
                f"FlowConfig: the periodic convolution needs an odd kernel_size (a centred "
                f"kernel), got {self.kernel_size}"
            )
        k = self.num_classes
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or k < 0
            or k == 1
            or k > MAX_CLASSES
        ):
            raise ValueError(
                f"FlowConfig: num_classes must be 0 (unconditional) or an int in 2..{MAX_CLASSES}"
                f", got {k!r}"
            )
        object.__setattr__(self, "num_classes", int(k))
        w = self.weight_y
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float, np.number))
            or not (math.isfinite(w) and w >= 0)
        ):
            raise ValueError(f"FlowConfig: weight_y must be a finite number >= 0, got {w!r}")
        object.__setattr__(self, "weight_y", float(w))
        if self.weight_y > 0 and not self.num_classes:
            raise ValueError(
                "FlowConfig: weight_y > 0 needs a class-conditional model (num_classes >= 2)"
            )
        if self.label_prior not in LABEL_PRIORS:
            raise ValueError(
                f"FlowConfig: label_prior must be one of {LABEL_PRIORS}, got {self.label_prior!r}"
            )
        b = self.n_bits
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 8:
            raise ValueError(f"FlowConfig: n_bits must be an int in 1..8, got {b!r}")
        object.__setattr__(self, "n_bits", int(b))
        need = 4 if self.coupling == "quad" else 2
        for l, (_, _, c) in enumerate(self.level_shapes()):
            if c % need:
                raise ValueError(
                    f"FlowConfig: {self.coupling} coupling needs a multiple of {need} channels, "
                    f"level {l} has {c}"
                )

    # ------------------------------------------------------------------ derived shapes
    def level_shapes(self) -> list[tuple[int, int, int]]:
        """``(H_l, W_l, C_l)`` of the steps of each level (after its squeeze)."""
        H, W, C = self.image_shape
        out = []
        for _ in range(self.levels):
            H, W, C = H // 2, W // 2, 4 * C
            out.append((H, W, C))
            C //= 2  # the split keeps half
        return out

    @property
    def class_conditional(self) -> bool:
        """True when the model is class-conditional (``num_classes >= 2``)."""
        return self.num_classes > 0

    @property
    def num_dims(self) -> int:
        """D_x = H * W * C, the number of dimensions of an image (and of z)."""
        H, W, C = self.image_shape
        return H * W * C

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"FlowConfig: unknown field(s) {unknown}")
        d = dict(d)
        d.setdefault("guard", None)  # written before the guard existed: no guard
        if "image_shape" in d:
            d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> FlowConfig:
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------- generic chain
class FlowStep(Layer):
    """A chain of flow layers run in order (one step: actnorm -> conv -> coupling).

    ``forward`` composes the layers and sums their log-dets (in float64); ``backward`` runs them
    in reverse with the same ``dlogdet`` (the log-det of a composition is the sum);
    ``inverse`` inverts them in reverse order.
    """

    def __init__(self, layers: list[tuple[str, Layer]], *, dtype: Any = np.float64) -> None:
        super().__init__(dtype)
        self.order: list[Layer] = [self.add_layer(name, layer) for name, layer in layers]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logdet = np.zeros(x.shape[0], dtype=np.float64)
        for name, layer in self._layers.items():
            with layer_errors(name, layer):
                x, ld = layer.forward(x)
            logdet += ld
        return x, logdet  # float64: summed without rounding to float32 in between

    def inverse(self, y: np.ndarray, solve_dtypes: dict[str, Any] | None = None) -> np.ndarray:
        """Invert the layers in reverse order; ``solve_dtypes`` maps a layer's name to the
        precision of its substitution (:mod:`flownp.layers.precision`; absent: its dtype)."""
        for name, layer in reversed(self._layers.items()):
            dt = None if solve_dtypes is None else solve_dtypes.get(name)
            with layer_errors(name, layer):
                y = layer.inverse(y) if dt is None else layer.inverse(y, solve_dtype=dt)
        return y

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        for name, layer in reversed(self._layers.items()):
            with layer_errors(name, layer):
                dy = layer.backward(dy, dlogdet)
        return dy


@contextlib.contextmanager
def layer_errors(name: str, layer: Module) -> Iterator[None]:
    """Name the layer (its parameter path, e.g. ``level0/step1/conv``) in every flownp error
    raised inside it, and turn NumPy's ``LinAlgError`` into :class:`SingularKernelError`. When
    the layer's own weights hold NaN/Inf, the error is a :class:`NonFiniteError` naming them
    (a broken model, not a singular one)."""
    try:
        yield
    except (FlownpError, np.linalg.LinAlgError) as exc:
        path = f"{name}/{exc.layer_path}" if hasattr(exc, "layer_path") else name
        message = getattr(exc, "layer_message", str(exc))
        if isinstance(exc, np.linalg.LinAlgError):
            message = (
                f"{type(layer).__name__}: a matrix of this layer is singular (NumPy: {exc}), "
                "so the layer is not invertible"
            )
        cls = SingularKernelError if isinstance(exc, np.linalg.LinAlgError) else type(exc)
        bad = [k for k, p in layer.params.items() if not np.isfinite(p).all()]
        if bad and not hasattr(exc, "layer_path"):
            cls = NonFiniteError
            message = (
                f"its parameter(s) {', '.join(bad[:5])} hold NaN/Inf values (the model is broken, "
                f"not merely singular): {message}"
            )
        try:
            named = cls(f"layer {path}: {message}")
        except TypeError:  # an error class with another signature: leave it as it is
            raise exc from None
        named.layer_path = path  # type: ignore[attr-defined]
        named.layer_message = message  # type: ignore[attr-defined]
        raise named from exc


def _seed(seed: int, index: int) -> int:
    """An independent 31-bit seed for layer number ``index`` of a model seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] >> 1)


def make_convs(config: FlowConfig, channels: int, seed: int) -> list[tuple[str, Layer]]:
    """The invertible convolution(s) of one step: ``[("conv", layer)]``, or
    ``[("conv1x1", Conv1x1), ("conv", layer)]`` for ``"1x1+emerging"`` / ``"1x1+cinc"`` (the
    1x1 convolution seeded with ``seed``, the second layer with ``seed + 1``)."""
    dt, k, guard, kind = config.dtype, config.kernel_size, config.guard, config.conv
    out: list[tuple[str, Layer]] = []
    if kind.startswith("1x1+"):
        out.append(("conv1x1", Conv1x1(channels, lu=config.lu, seed=seed, dtype=dt)))
        kind, seed = kind[len("1x1+") :], seed + 1
    conv: Layer
    if kind == "cinc":
        conv = CInCConv(channels, k, corner=config.cinc_corner, seed=seed, dtype=dt, guard=guard)
    elif kind == "emerging":
        conv = EmergingConv(channels, k, seed=seed, dtype=dt, guard=guard)
    elif kind == "periodic":
        conv = PeriodicConv(channels, k, seed=seed, dtype=dt, guard=guard)
    elif kind == "1x1":
        conv = Conv1x1(channels, lu=config.lu, seed=seed, dtype=dt)
    else:  # "reverse" / "shuffle"
        conv = ChannelPermutation(channels, kind, seed=seed, dtype=dt)
    return out + [("conv", conv)]


def make_step(config: FlowConfig, channels: int, seed: int) -> FlowStep:
    """``actnorm -> conv -> coupling`` for ``channels`` channels, following ``config``."""
    dt = config.dtype
    layers: list[tuple[str, Layer]] = [("actnorm", ActNorm(channels, dtype=dt))]
    layers += make_convs(config, channels, seed)
    coupling: Layer
    if config.coupling == "additive":
        coupling = AdditiveCoupling(channels, config.width, seed=seed + 2, dtype=dt)
    else:
        cls = QuadCoupling if config.coupling == "quad" else AffineCoupling
        coupling = cls(channels, config.width, scale=config.scale, seed=seed + 2, dtype=dt)
    layers.append(("coupling", coupling))
    return FlowStep(layers, dtype=dt)


# ---------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Level:
    """One scale of a :class:`FlowModel`: ``layers`` (path, layer) in forward order (the
    squeeze, then the steps), then ``split`` (None on the last level)."""

    layers: list[tuple[str, Layer]]
    split: Split | None
    split_path: str = ""


class FlowModel(Layer):
    """Multi-scale normalizing flow (module docstring): ``x (N, H, W, C) -> z (N, H*W*C)``.

    Parameters
    ----------
    config : FlowConfig
    seed : int
        Seed of every layer's random initialisation.
    recompute : bool
        Memory-saving backward (module docstring): store no activations in :meth:`forward`,
        recompute each node's input by its inverse in :meth:`backward`. Same results (up to
        the inverses' round-off), about one extra forward + inverse of time. May be changed
        between steps (attribute ``recompute``).

    Attributes
    ----------
    levels : list of Level
        Per level, its layers (squeeze, steps) and its split (module docstring).
    prior : LearnedPrior or ConditionalPrior
        The top prior (path ``prior``); a :class:`~flownp.layers.conditional.ConditionalPrior`
        for a class-conditional configuration (``num_classes >= 2``).
    classifier : LatentClassifier or None
        The linear classifier on the top latent (path ``classifier``) when
        ``config.weight_y > 0``.
    logits : np.ndarray or None
        The classifier's logits ``(N, K)`` of the last :meth:`forward` (None without one).

    Labels (class-conditional models): :meth:`forward`, :meth:`inverse`, :meth:`log_prob` and
    :meth:`sample` take int labels ``(N,)`` in ``0 .. K-1``. ``labels=None`` in
    :meth:`forward` / :meth:`inverse` gives the *label-free latent* (the prior without its
    label term, an exact bijection of its own, used for latent editing); :meth:`log_prob`
    and :meth:`sample` need the labels. An unconditional model refuses labels.
    """

    def __init__(self, config: FlowConfig, seed: int = 0, *, recompute: bool = False) -> None:
        if not isinstance(config, FlowConfig):
            raise TypeError(f"FlowModel: config must be a FlowConfig, got {type(config).__name__}")
        super().__init__(config.dtype)
        self.config = config
        self.seed = int(seed)
        self.recompute = bool(recompute)
        self.levels: list[Level] = []
        shapes = config.level_shapes()
        dt = config.dtype
        for l, (_, _, c) in enumerate(shapes):
            level = self.add_layer(f"level{l}", Module(dt))
            layers: list[tuple[str, Layer]] = [
                (f"level{l}/squeeze", level.add_layer("squeeze", Squeeze(dtype=dt)))
            ]
            for d in range(config.depth):
                step = make_step(config, c, _seed(seed, 1000 * l + d))
                layers.append((f"level{l}/step{d}", level.add_layer(f"step{d}", step)))
            split = None
            if l < config.levels - 1:
                split = level.add_layer("split", Split(c, dtype=dt))
            self.levels.append(Level(layers, split, f"level{l}/split"))
        top = shapes[-1]
        self.prior: LearnedPrior
        if config.num_classes:
            self.prior = self.add_layer(
                "prior",
                ConditionalPrior(
                    top,
                    config.num_classes,
                    per_position=config.label_prior == "position",
                    dtype=dt,
                ),
            )
        else:
            self.prior = self.add_layer("prior", LearnedPrior(top, dtype=dt))
        self.classifier: LatentClassifier | None = None
        if config.weight_y > 0:
            self.classifier = self.add_layer(
                "classifier", LatentClassifier(top[2], config.num_classes, dtype=dt)
            )
        self.logits: np.ndarray | None = None

    @property
    def flow(self) -> list[tuple[str, Module]]:
        """Every node ``(path, node)`` in forward order (squeeze, steps, split per level)."""
        out: list[tuple[str, Module]] = []
        for level in self.levels:
            out.extend(level.layers)
            if level.split is not None:
                out.append((level.split_path, level.split))
        return out

    # ------------------------------------------------------------------ shapes
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes of the pieces of ``z`` in concatenation order (module docstring)."""
        shapes = self.config.level_shapes()
        out = [(h, w, c // 2) for (h, w, c) in shapes[:-1]]
        return out + [shapes[-1]]

    def split_latent(self, z: np.ndarray) -> list[np.ndarray]:
        """``z (N, D_x)`` -> the per-level pieces, reshaped to ``(N, H_l, W_l, C_l)`` (views)."""
        N = z.shape[0]
        out, start = [], 0
        for h, w, c in self.latent_shapes():
            size = h * w * c
            out.append(z[:, start : start + size].reshape(N, h, w, c))
            start += size
        return out

    def _check_image(self, x: Any) -> np.ndarray:
        x = self.check_input(x, self.config.image_shape[2])
        if x.shape[1:] != self.config.image_shape:
            raise ValueError(
                f"FlowModel: x must have shape (N, {', '.join(map(str, self.config.image_shape))})"
                f", got {x.shape}"
            )
        return x

    def _check_latent(self, z: Any) -> np.ndarray:
        D = self.config.num_dims
        if not isinstance(z, np.ndarray) or z.ndim != 2 or z.shape[1] != D:
            shape = getattr(z, "shape", type(z).__name__)
            raise ValueError(f"FlowModel: z must have shape (N, {D}), got {shape}")
        if z.dtype != self.dtype:
            raise TypeError(f"FlowModel: z has dtype {z.dtype}, the model is {self.dtype}")
        return z

    def _check_labels(self, labels: Any, n: int) -> np.ndarray | None:
        """``labels`` as int64 ``(n,)`` for a class-conditional model (None stays None); an
        unconditional model refuses labels."""
        if labels is None:
            return None
        if not self.config.num_classes:
            raise ValueError(
                "FlowModel: labels were given, but this model is not class-conditional "
                "(num_classes = 0)"
            )
        return check_labels(labels, n, self.config.num_classes, "FlowModel")

    def _need_labels(self, labels: Any, where: str) -> None:
        if labels is None and self.config.num_classes:
            raise ValueError(
                f"FlowModel.{where}: this model is class-conditional (num_classes = "
                f"{self.config.num_classes}): give labels"
            )

    def _prior_forward(
        self, h: np.ndarray, labels: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        with layer_errors("prior", self.prior):
            if labels is None:
                return self.prior.forward(h)
            return self.prior.forward(h, labels)  # type: ignore[call-arg]

    # ------------------------------------------------------------------ flow
    def forward_top(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Every node below the top prior: ``x -> (h, pieces, logdet)`` with ``h`` the top
        latent before the prior ``(N, H_top, W_top, C_top)``, ``pieces`` the split latents
        ``eps_l`` flattened to ``(N, -)`` and ``logdet`` (float64) of those nodes. The label
        enters only after this (the top prior), so one call serves every class."""
        x = self._check_image(x)
        N = x.shape[0]
        logdet = np.zeros(N, dtype=np.float64)
        pieces, split_eps = [], []
        self._cache = None
        for level in self.levels:
            for name, layer in level.layers:
                with layer_errors(name, layer):
                    x, ld = layer.forward(x)
                if self.recompute:
                    layer.clear_cache()  # rebuilt from the output by backward()
                logdet += ld
            if level.split is not None:  # factor out half: x -> (h, eps)
                with layer_errors(level.split_path, level.split):
                    x, eps, ld = level.split.forward(x)
                if self.recompute:
                    level.split.clear_cache()
                logdet += ld
                pieces.append(eps.reshape(N, -1))
                split_eps.append(eps)
        if self.recompute:
            self._cache = (x, split_eps)  # the top output and the split latents
        return x, pieces, logdet

    def forward(self, x: np.ndarray, labels: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``x (N, H, W, C) -> (z (N, H*W*C), logdet (N,))``; ``logdet`` is float64.

        ``log p(x) = log N(z; 0, I) + logdet`` (see :meth:`log_prob`). ``labels``: int
        ``(N,)`` of a class-conditional model (None: the label-free latent, class docstring).
        A model with a classifier also sets :attr:`logits`.
        """
        labels = self._check_labels(labels, np.shape(x)[0] if np.ndim(x) else 0)
        h, pieces, logdet = self.forward_top(x)
        N = h.shape[0]
        eps, ld = self._prior_forward(h, labels)
        logdet += ld
        pieces.append(eps.reshape(N, -1))
        self.logits = None
        if self.classifier is not None:
            with layer_errors("classifier", self.classifier):
                self.logits = self.classifier.forward(h)
        return np.concatenate(pieces, axis=1), logdet

    def backward(
        self, dz: np.ndarray, dlogdet: np.ndarray, dlogits: np.ndarray | None = None
    ) -> np.ndarray:
        """Gradient of ``sum(z * dz) + sum(logdet * dlogdet) (+ sum(logits * dlogits))``
        w.r.t. the last forward's input; parameter gradients are added into :attr:`grads`.
        ``dlogits`` (N, K): the gradient of the classifier's logits (models with a classifier;
        None: zero)."""
        N = dz.shape[0]
        dz = self.check_grad(dz, (N, self.config.num_dims), "dz")
        dlogdet = self.check_grad(dlogdet, (N,), "dlogdet")
        deps = self.split_latent(dz)  # level l's split latent is deps[l], the top one deps[-1]
        with layer_errors("prior", self.prior):
            dh = self.prior.backward(deps[-1], dlogdet)
        if self.classifier is not None:
            with layer_errors("classifier", self.classifier):
                if dlogits is None:
                    self.classifier.clear_cache()
                else:
                    dh = dh + self.classifier.backward(dlogits)
        elif dlogits is not None:
            raise ValueError("FlowModel.backward: dlogits given, but the model has no classifier")
        recomputed = self._cache is not None  # forward ran with recompute=True
        out, split_eps = self.pop_cache() if recomputed else (None, [])
        for l in reversed(range(len(self.levels))):
            level = self.levels[l]
            if level.split is not None:
                with layer_errors(level.split_path, level.split):
                    if recomputed:  # rebuild the split's input and cache from its outputs
                        out = level.split.inverse(out, split_eps[l])
                        level.split.forward(out)
                    dh = level.split.backward(dh, deps[l], dlogdet)
            for name, layer in reversed(level.layers):
                with layer_errors(name, layer):
                    if recomputed:  # rebuild this layer's input and cache from its output
                        out = layer.inverse(out)
                        layer.forward(out)
                    dh = layer.backward(dh, dlogdet)
        return dh

    def inverse(
        self, z: np.ndarray, labels: Any = None, *, solve_precision: str = "model"
    ) -> np.ndarray:
        """``z (N, H*W*C) -> x (N, H, W, C)``, the exact inverse of :meth:`forward` (with the
        same ``labels``).

        ``solve_precision``: ``"model"`` (the model's dtype), ``"float64"`` (every CInC /
        Emerging substitution solved in float64, as the official code does) or ``"auto"``
        (float64 only for the layers not provably stable); each step is given the precision
        of its substitutions (:func:`flownp.layers.precision.choose_solve_dtypes`,
        ``docs/stability.md``).
        """
        choice = {} if solve_precision == "model" else choose_solve_dtypes(self, solve_precision)
        z = self._check_latent(z)
        labels = self._check_labels(labels, z.shape[0])
        eps = [np.ascontiguousarray(e) for e in self.split_latent(z)]
        with layer_errors("prior", self.prior):
            if labels is None:
                h = self.prior.inverse(eps[-1])
            else:
                h = self.prior.inverse(eps[-1], labels)  # type: ignore[call-arg]
        for l in reversed(range(len(self.levels))):
            level = self.levels[l]
            if level.split is not None:
                with layer_errors(level.split_path, level.split):
                    h = level.split.inverse(h, eps[l])
            for name, layer in reversed(level.layers):
                dtypes = dtypes_under(choice, name)
                with layer_errors(name, layer):
                    h = layer.inverse(h, dtypes) if dtypes else layer.inverse(h)
        return h

    # ------------------------------------------------------------------ density, sampling
    def log_prob(self, x: np.ndarray, labels: Any = None) -> np.ndarray:
        """``log p(x)`` (``log p(x | y)`` for a class-conditional model, which needs
        ``labels``) per sample (float64, nats), for ``x`` in model space (no dequantisation
        offset; see :func:`bits_per_dim`)."""
        self._need_labels(labels, "log_prob")
        with self.no_stored_activations():
            z, logdet = self.forward(x, labels)
        return log_normal(z) + logdet

    def class_log_probs(self, x: np.ndarray) -> np.ndarray:
        """``log p(x | y = k)`` for every class k of a class-conditional model, float64
        ``(N, K)`` (nats, model space). The flow runs once (:meth:`forward_top`); each class
        only changes the top prior (:meth:`ConditionalPrior.class_log_likelihoods`), so
        ``argmax_k`` is the model's generative classifier."""
        if not self.config.num_classes:
            raise ValueError("FlowModel.class_log_probs: the model is not class-conditional")
        with self.no_stored_activations():
            h, pieces, logdet = self.forward_top(x)
        return self.class_log_probs_from_top(h, pieces, logdet)

    def class_log_probs_from_top(
        self, h: np.ndarray, pieces: list[np.ndarray], logdet: np.ndarray
    ) -> np.ndarray:
        """:meth:`class_log_probs` from the outputs of :meth:`forward_top`."""
        prior = self.prior
        if not isinstance(prior, ConditionalPrior):
            raise ValueError("FlowModel.class_log_probs: the model is not class-conditional")
        base = np.asarray(logdet, dtype=np.float64).copy()
        for p in pieces:
            base += log_normal(p)
        with layer_errors("prior", prior):
            return base[:, None] + prior.class_log_likelihoods(h)

    def predict_labels(self, x: np.ndarray) -> np.ndarray:
        """The linear classifier's predicted labels ``(N,)`` (models with a classifier)."""
        if self.classifier is None:
            raise ValueError("FlowModel.predict_labels: the model has no classifier (weight_y 0)")
        with self.no_stored_activations():
            self.forward(x)
        assert self.logits is not None
        return np.argmax(self.logits, axis=1).astype(np.int64)

    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        seed: int | np.random.Generator = 0,
        *,
        labels: Any = None,
        solve_precision: str = "model",
        part: slice | None = None,
    ) -> np.ndarray:
        """``n`` images ``f^{-1}(T * eps)``, ``eps ~ N(0, I)`` (model space, about [-0.5, 0.5]);
        ``solve_precision`` as in :meth:`inverse`. A class-conditional model needs ``labels``:
        one int (every sample of that class) or ``(n,)`` ints. ``part``: only the samples
        ``part`` of the ``n`` (the latent of all ``n`` is drawn, so the images are those of
        the whole call and ``seed``, a generator, advances the same): several processes
        share one call this way."""
        if n < 1:
            raise ValueError(f"FlowModel.sample: n must be >= 1, got {n}")
        if not temperature >= 0:
            raise ValueError(f"FlowModel.sample: temperature must be >= 0, got {temperature}")
        self._need_labels(labels, "sample")
        if labels is not None and np.ndim(labels) == 0:
            labels = np.full(n, labels)
        labels = self._check_labels(labels, n)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        z = (temperature * rng.standard_normal((n, self.config.num_dims))).astype(self.dtype)
        if part is not None:
            z = z[part]
            labels = None if labels is None else labels[part]
            if len(z) == 0:  # an empty share (more processes than samples)
                return np.empty((0, *self.config.image_shape), dtype=self.dtype)
        return self.inverse(z, labels, solve_precision=solve_precision)

    # ------------------------------------------------------------------ initialisation
    @property
    def initialized(self) -> bool:
        """True when every actnorm (including the couplings') has been data-initialised."""
        flags = [v for k, v in self.buffers.items() if k.endswith("initialized")]
        return all(bool(f) for f in flags)

    def initialize(self, x: np.ndarray) -> None:
        """Data-dependent initialisation: one forward pass on a batch ``x`` (every ActNorm that
        is not yet initialised sets its bias/log-scale from the statistics it sees), storing
        no activations (:meth:`no_stored_activations`)."""
        with self.no_stored_activations():
            self.forward(x)

    @contextlib.contextmanager
    def no_stored_activations(self) -> Iterator[None]:
        """Within the block, :meth:`forward` keeps no layer's activations: each layer's cache
        is cleared right after the layer, as with ``recompute=True``, so a pass over ``N``
        images needs the memory of one layer's activations, not the whole flow's. For passes
        without a backward (:meth:`initialize`, :meth:`log_prob`, :meth:`class_log_probs`,
        :meth:`predict_labels`, evaluation, encoding); the numbers are the same bit for bit.
        Afterwards the model's own ``recompute`` setting is back and its caches are empty."""
        recompute = self.recompute
        self.recompute = True
        try:
            yield
        finally:
            self.recompute = recompute
            self.clear_cache()

    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"FlowModel({c.image_shape}, L={c.levels}, D={c.depth}, width={c.width}, "
            f"conv={c.conv}, coupling={c.coupling}, params={self.num_params()}, dtype={c.dtype})"
        )


def log_normal(z: np.ndarray) -> np.ndarray:
    """``sum_i log N(z_i; 0, 1)`` per row of ``z (N, D)``, in float64."""
    z64 = z.astype(np.float64, copy=False)
    return -0.5 * np.einsum("nd,nd->n", z64, z64) - 0.5 * z.shape[1] * LOG_2PI


# ---------------------------------------------------------------------- bits/dim, the loss
def bits_per_dim(z: np.ndarray, logdet: np.ndarray, n_bits: int = 8) -> np.ndarray:
    """Per-sample bits/dim ``(-log p(x) + D ln 2^N) / (D ln 2)`` from :meth:`FlowModel.forward`'s
    outputs (``z`` of shape ``(N, D)``), in float64, for data of ``n_bits = N`` bits per pixel
    (:mod:`flownp.data.pixels`; 8: ``D ln 256``). The ``D ln 2^N`` term accounts for the
    pixel bins of width 1/2^N (uniform dequantisation): a uniform model scores N bits/dim."""
    D = z.shape[1]
    log_p = log_normal(z) + logdet.astype(np.float64)
    return (-log_p + D * n_bits * LN2) / (D * LN2)


def bpd_loss(
    z: np.ndarray, logdet: np.ndarray, *, num_images: int | None = None, n_bits: int = 8
) -> tuple[float, np.ndarray, np.ndarray]:
    """The training loss and its gradients ``(loss, dz, dlogdet)``::

        loss              = sum_n bits_per_dim(z, logdet, n_bits)_n / num_images
        d loss / d z      = z / (num_images D ln 2)
        d loss / d logdet = -1 / (num_images D ln 2)

    ``num_images`` defaults to the batch's own size ``N``: the loss is the batch mean. A step
    whose batch is split over several processes gives each the global image count, so that
    the processes' losses and gradients add up to those of the whole batch. ``n_bits`` only
    shifts the loss by a constant (the gradients do not depend on it)."""
    N, D = z.shape
    n = N if num_images is None else int(num_images)
    loss = float(np.sum(bits_per_dim(z, logdet, n_bits))) / n  # == np.mean for n = N
    c = 1.0 / (n * D * LN2)
    dz = z * z.dtype.type(c)  # (N, D)
    dlogdet = np.full(N, -c)  # (N,)
    return loss, dz, dlogdet


def classifier_loss(
    logits: np.ndarray, labels: np.ndarray, weight: float, *, num_images: int | None = None
) -> tuple[float, float, float, np.ndarray]:
    """The classifier's term of the training loss (``weight_y``, openai/glow) and its gradient::

        bits_y_n = cross-entropy in bits of logits_n against labels_n
                   (:func:`flownp.layers.conditional.cross_entropy_bits`)
        loss_y   = weight * sum_n bits_y_n / num_images
        d loss_y / d logits_n = weight * (softmax(logits_n) - e_{y_n}) / (num_images ln 2)

    Returns ``(loss_y, bits_y, error, dlogits)``: ``bits_y`` and ``error`` are the sums over
    the batch of the cross-entropy (bits) and of the misclassified images, divided by
    ``num_images`` (default: the batch's own size, i.e. means), so that shares of a batch on
    several processes add up as :func:`bpd_loss` does. ``dlogits`` is in the dtype of
    ``logits``."""
    N = logits.shape[0]
    n = N if num_images is None else int(num_images)
    bits, dbits, error = cross_entropy_bits(logits, labels)
    bits_y = float(np.sum(bits)) / n
    dlogits = (dbits * (weight / n)).astype(logits.dtype)
    return weight * bits_y, bits_y, float(np.sum(error)) / n, dlogits
