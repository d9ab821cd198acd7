r"""Reference vectors for ports: every intermediate tensor of small fixed float64 models.

A port (PyTorch, JAX, C, ...) loads the weights and the input batch from the file, runs the
same computation and saves what it gets under the same paths; :func:`check_reference`
(``flownp check-reference PORT.h5``) then prints one line per tensor, in forward (layer)
order, with the largest absolute difference and OK/NOT OK, and names the first mismatch.
The layout of the file (every path, shape and dtype) is in ``docs/reference-vectors.md``;
the porting guide is ``docs/porting.md``.

The models (:data:`REFERENCE_MODELS`), chosen so that together they contain every layer kind::

    cinc_quad        8x8x2 image, 2 levels x 2 steps, width 4: squeeze, actnorm,
                     CInCConv(k=3, triangular corner), QuadCoupling(sigmoid scale),
                     split prior, top prior
    emerging_affine  8x8x2 image, 2 levels x 2 steps, width 4: squeeze, actnorm,
                     Conv1x1(LU) + EmergingConv(k=3), AffineCoupling(exp scale),
                     split prior, top prior
    cinc_default     the default FlowConfig on an 8x8x2 image, 2 levels x 2 steps, width 4:
                     CInCConv(k=3, LU corner, guard 0.9, tanh), AffineCoupling(softclamp
                     scale);
                     mixed-sign ``sign`` buffers
    cinc_unit        2 levels x 1 step: CInCConv(k=3, unit corner, guard 0.9); the groups
                     below use the exp scale
    glow_1x1         2 levels x 1 step: plain Conv1x1 (a free weight, no LU)
    emerging         2 levels x 1 step: EmergingConv(k=3, guard 0.9) alone; mixed-sign
                     ``sign`` buffers
    periodic_additive  8x8x1 image, 2 levels x 2 steps: PeriodicConv(k=3, guard 0.9),
                     AdditiveCoupling; optimised by Adamax
    periodic_free    8x8x1, 2 levels x 1 step: PeriodicConv(k=3, no guard: free taps),
                     AffineCoupling(sigmoid scale)
    reverse_quad     8x8x1, 2 levels x 1 step: channel reversal, QuadCoupling(exp scale)
    shuffle          8x8x1, 2 levels x 1 step: a fixed random channel shuffle
    1x1_cinc         8x8x1, 2 levels x 1 step: Conv1x1(LU) then CInCConv(LU corner, guard
                     0.9); optimised by Adamax
    cinc_ycond       8x8x1, 2 levels x 1 step, the defaults (exp scale), class-conditional
                     (3 classes: ConditionalPrior), the linear classifier with weight_y 0.5
                     (LatentClassifier), 5-bit data (the loss counts D ln 2^5)

The first two use ``guard=None`` (the paper's layers); ``cinc_default``, ``cinc_unit`` and
``emerging`` the default guard 0.9 that a checkpoint trained with the defaults contains, so a
port that ignores the guard or the sign buffers fails the check (``glow_1x1`` has no
substitution to guard).

How each model is made (only needed to *regenerate* the file; a port reads the weights)::

    rng    = np.random.default_rng(data_seed)
    model  = FlowModel(config, seed=model_seed)
    model.initialize(rng.uniform(-0.5, 0.5, (8, H, W, C)))     # actnorm data-dependent init
    randomize_params(model, rng, 0.03)                         # no layer is the identity
    mixed_signs(model, rng)            # cinc_default, emerging: sign buffers +1 and -1
    x      = rng.uniform(-0.5, 0.5, (2, H, W, C))              # input/x
    z_s    = 0.7 * rng.standard_normal((2, H W C))             # sample/z
    y      = rng.permutation(K)[:2]                  # input/y (class-conditional models only)

What is computed from the weights and ``x``, in this order (:func:`compute`)::

    forward/<node>/...   every layer's output and per-sample logdet, in forward order
    latent/z, logdet     z, logdet = model.forward(x)
    loss/...             bpd = mean_n (-(log N(z_n; 0, I) + logdet_n) + D ln 2^N) / (D ln 2)
                         (N = n_bits, 8 but for cinc_ycond), its upstream gradients dz, dlogdet
    grads/...            model.backward(dz, dlogdet): every parameter gradient and dx
    inverse/x            model.inverse(z)             (round trip)
    sample/x             model.inverse(sample/z)      (a latent that is not a round trip)

  A class-conditional model runs forward, inverse and sampling given ``input/y``, and adds::

    forward/classifier/logits   the linear classifier's logits (weight_y > 0)
    loss/bits_y, loss/bits_y_per_sample, loss/dlogits
                         its cross-entropy in bits and the gradient of the loss
                         bpd + weight_y * mean_n bits_y_n with respect to the logits
    loss/total           bpd + weight_y * mean_n bits_y_n (what the optimizer steps minimise)
    classes/log_p        log p(x | y = k) for every class k, (2, K) (the generative classifier)
    adam/...             3 steps of flownp.optim.Adam(lr=1e-3, betas=(0.9, 0.999),
                         eps=1e-8), each a fresh forward + backward on x: the loss after
                         0, 1, 2 and 3 steps, and every parameter after the third
    adamax/...           the same with flownp.optim.Adamax, for the models of
                         :data:`ADAMAX_MODELS` (instead of adam/...)

:func:`replay` does the same from the weights *in a file* (a fresh model, a different seed, the
file's parameters and buffers loaded), in float64 or float32: that is exactly what a port does,
and ``flownp export-reference OUT.h5 --replay REF.h5 --dtype float32`` writes it in the port
format.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from flownp import threads
from flownp.errors import DataError
from flownp.files import write_atomic
from flownp.layers.conditional import cross_entropy_bits
from flownp.model import (
    FlowConfig,
    FlowModel,
    FlowStep,
    bits_per_dim,
    bpd_loss,
    classifier_loss,
)
from flownp.optim import make_optimizer
from flownp.testing import randomize_params

FORMAT = "flownp-reference"
FORMAT_VERSION = 1

#: The committed reference file (regenerate with ``flownp export-reference``).
DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "reference_vectors.h5"

# guard=None: the paper's layers, whatever the FlowConfig default (docs/stability.md)
_COMMON = dict(
    image_shape=(8, 8, 2), levels=2, depth=2, width=4, kernel_size=3, dtype="float64", guard=None
)

_DEFAULTS = dict(image_shape=(8, 8, 2), levels=2, width=4, kernel_size=3, dtype="float64")
#: The groups other than ``cinc_default`` fix the coupling scale, so that their vectors do not
#: change with the default configuration.
_SMALL = {**_DEFAULTS, "scale": "exp"}
_ONE_CHANNEL = {**_SMALL, "image_shape": (8, 8, 1)}

#: name -> (config, model_seed, data_seed), in the order of the file
REFERENCE_MODELS: dict[str, tuple[FlowConfig, int, int]] = {
    "cinc_quad": (
        FlowConfig(
            conv="cinc", cinc_corner="triangular", coupling="quad", scale="sigmoid", **_COMMON
        ),
        11,
        12,
    ),
    "emerging_affine": (
        FlowConfig(
            conv="1x1+emerging",
            lu=True,
            coupling="affine",
            scale="exp",
            cinc_corner="triangular",  # unused by this model; fixed so the config never drifts
            **_COMMON,
        ),
        21,
        22,
    ),
    # the defaults of FlowConfig (LU corner, guard 0.9, affine coupling, softclamp scale)
    "cinc_default": (FlowConfig(depth=2, **_DEFAULTS), 31, 32),
    "cinc_unit": (FlowConfig(depth=1, conv="cinc", cinc_corner="unit", **_SMALL), 41, 42),
    "glow_1x1": (FlowConfig(depth=1, conv="1x1", lu=False, **_SMALL), 51, 52),
    "emerging": (FlowConfig(depth=1, conv="emerging", **_SMALL), 61, 62),
    # the other options of the official training script (8x8x1: smaller files)
    "periodic_additive": (
        FlowConfig(depth=2, conv="periodic", coupling="additive", **_ONE_CHANNEL),
        71,
        72,
    ),
    "periodic_free": (
        FlowConfig(**{**_ONE_CHANNEL, "scale": "sigmoid"}, depth=1, conv="periodic", guard=None),
        81,
        82,
    ),
    "reverse_quad": (FlowConfig(depth=1, conv="reverse", coupling="quad", **_ONE_CHANNEL), 91, 92),
    "shuffle": (FlowConfig(depth=1, conv="shuffle", **_ONE_CHANNEL), 101, 102),
    "1x1_cinc": (FlowConfig(depth=1, conv="1x1+cinc", lu=True, **_ONE_CHANNEL), 111, 112),
    # class-conditional, the classifier term and 5-bit data (the official --ycond, --weight_y,
    # --n_bits_x)
    "cinc_ycond": (
        FlowConfig(depth=1, num_classes=3, weight_y=0.5, n_bits=5, **_ONE_CHANNEL),
        121,
        122,
    ),
}

#: Models optimised by Adamax in the optimizer section (``adamax/...``); the others by Adam.
ADAMAX_MODELS = ("periodic_additive", "1x1_cinc")

#: Models whose ``sign`` buffers are set to a random +-1 pattern (half of them -1).
MIXED_SIGNS = ("cinc_default", "emerging")

BATCH = 2
INIT_BATCH = 8
NOISE = 0.03
SAMPLE_STD = 0.7
ADAM = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
ADAM_STEPS = 3


def optimizer_of(name: str) -> str:
    """``"adamax"`` for the models of :data:`ADAMAX_MODELS`, else ``"adam"``: the name of the
    optimizer section of the group (``adam/...`` or ``adamax/...``)."""
    return "adamax" if name in ADAMAX_MODELS else "adam"


#: Paths (relative to a model group) that are *inputs* of a port, not compared by the checker.
INPUT_PREFIXES = ("model/", "input/", "sample/z")  # input/x, input/y

#: Default tolerance of the checker: a tensor is OK when
#: ``max |port - ref| <= ATOL + RTOL * max |ref|`` (float64 ports; see docs/reference-vectors.md).
RTOL = 1e-8
ATOL = 1e-10


# ---------------------------------------------------------------------- building the models
def build(name: str) -> tuple[FlowModel, dict[str, np.ndarray]]:
    """The reference model ``name`` and its inputs ``{"input/x", "sample/z"}`` (module
    docstring: how they are made)."""
    config, model_seed, data_seed = REFERENCE_MODELS[name]
    H, W, C = config.image_shape
    rng = np.random.default_rng(data_seed)
    model = FlowModel(config, seed=model_seed)
    model.initialize(rng.uniform(-0.5, 0.5, (INIT_BATCH, H, W, C)))
    randomize_params(model, rng, NOISE)
    if name in MIXED_SIGNS:
        mixed_signs(model, rng)
    x = rng.uniform(-0.5, 0.5, (BATCH, H, W, C))
    z_s = SAMPLE_STD * rng.standard_normal((BATCH, H * W * C))
    inputs = {"input/x": x, "sample/z": z_s}
    if config.num_classes:
        inputs["input/y"] = rng.permutation(config.num_classes)[:BATCH].astype(np.int64)
    return model, inputs


def mixed_signs(model: FlowModel, rng: np.random.Generator) -> None:
    """Make every ``sign`` buffer of ``model`` mixed (both +1 and -1), so that a port that
    drops the buffer, or uses ``|d|`` for ``d``, computes something else.

    The sign of an LU-parameterised matrix (a ``sign`` beside a ``perm`` buffer) is the sign of
    the pivots of the random rotation it was initialised from, already mixed; it is kept (the
    rotation's conditioning is kept with it). Every other ``sign`` buffer (a triangular
    corner's diagonal, Emerging's) is set, in ``model.buffers`` order, to ``-1`` where
    ``rng.permutation(C) % 2 == 1`` and ``+1`` elsewhere (half of each).
    """
    buffers = model.buffers
    for key, buf in buffers.items():
        parent, _, leaf = key.rpartition("/")
        if leaf == "sign" and f"{parent}/perm" not in buffers:
            buf[...] = np.where(rng.permutation(buf.size) % 2 == 1, -1.0, 1.0)


# ---------------------------------------------------------------------- the computation
def forward_intermediates(
    model: FlowModel, x: np.ndarray, labels: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every node's output and log-det, keyed ``forward/<path>/...``, by running the nodes of
    :attr:`FlowModel.flow` one by one (steps layer by layer), exactly as ``model.forward``
    composes them (the top prior given ``labels`` for a class-conditional model; the
    classifier's logits for a model with one). Caches are cleared afterwards."""
    out: dict[str, np.ndarray] = {}
    h = x
    for level in model.levels:
        for path, layer in level.layers:
            if isinstance(layer, FlowStep):  # actnorm, conv (conv1x1, conv), coupling
                for name, sub in zip(layer._layers, layer.order, strict=True):
                    h, ld = sub.forward(h)
                    out[f"forward/{path}/{name}/output"] = h
                    out[f"forward/{path}/{name}/logdet"] = ld
            else:  # squeeze
                h, ld = layer.forward(h)
                out[f"forward/{path}/output"] = h
                out[f"forward/{path}/logdet"] = ld
        if level.split is not None:
            h, eps, ld = level.split.forward(h)
            out[f"forward/{level.split_path}/h"] = h
            out[f"forward/{level.split_path}/eps"] = eps
            out[f"forward/{level.split_path}/logdet"] = ld
    eps, ld = model.prior.forward(h) if labels is None else model.prior.forward(h, labels)
    out["forward/prior/output"] = eps
    out["forward/prior/logdet"] = ld
    if model.classifier is not None:
        out["forward/classifier/logits"] = model.classifier.forward(h)
    model.clear_cache()
    return {k: np.array(v) for k, v in out.items()}


def compute(
    model: FlowModel, inputs: dict[str, np.ndarray], optimizer: str = "adam"
) -> dict[str, np.ndarray]:
    """Everything a port is compared on, from a ready model (weights set) and its inputs.

    Returns ``{path: array}`` with the paths of ``docs/reference-vectors.md`` (the weights and
    inputs included, as they were *before* the optimizer steps). ``model``'s parameters are
    left as they are after the steps of ``optimizer`` (``"adam"`` or ``"adamax"``, with the
    hyper-parameters :data:`ADAM`; the section is named after it).
    """
    dt = model.dtype
    cfg = model.config
    x = np.ascontiguousarray(inputs["input/x"], dtype=dt)
    z_s = np.ascontiguousarray(inputs["sample/z"], dtype=dt)
    y = None if "input/y" not in inputs else np.asarray(inputs["input/y"], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    out.update({f"model/{k}": v for k, v in model.state_dict().items()})
    out["input/x"] = x.copy()
    if y is not None:
        out["input/y"] = y.copy()
    out["sample/z"] = z_s.copy()
    with threads.limit(1):  # one BLAS/Numba thread: bitwise reproducible on a given machine
        out.update(forward_intermediates(model, x, y))
        losses = []
        for step in range(ADAM_STEPS + 1):
            model.zero_grad()
            z, logdet = model.forward(x, y)
            bpd, dz, dlogdet = bpd_loss(z, logdet, n_bits=cfg.n_bits)
            loss, dlogits = bpd, None
            if model.classifier is not None:
                assert model.logits is not None and y is not None
                loss_y, bits_y, _, dlogits = classifier_loss(model.logits, y, cfg.weight_y)
                loss = bpd + loss_y
            losses.append(loss)
            if step == ADAM_STEPS:
                model.clear_cache()
                break
            dx = model.backward(dz, dlogdet, dlogits)
            if step == 0:
                out["latent/z"] = z.copy()
                out["latent/logdet"] = np.asarray(logdet).copy()
                out["loss/bpd"] = np.asarray(bpd, dtype=np.float64)
                out["loss/bpd_per_sample"] = bits_per_dim(z, logdet, cfg.n_bits)
                out["loss/dz"] = np.asarray(dz).copy()
                out["loss/dlogdet"] = np.asarray(dlogdet).copy()
                if dlogits is not None:
                    assert model.logits is not None and y is not None
                    out["loss/bits_y"] = np.asarray(bits_y, dtype=np.float64)
                    out["loss/bits_y_per_sample"] = cross_entropy_bits(model.logits, y)[0]
                    out["loss/dlogits"] = np.asarray(dlogits).copy()
                    out["loss/total"] = np.asarray(loss, dtype=np.float64)
                out["grads/x"] = dx.copy()
                out.update({f"grads/params/{k}": g.copy() for k, g in model.grads.items()})
                out["inverse/x"] = model.inverse(z, y)
                out["sample/x"] = model.inverse(z_s, y)
                if cfg.num_classes:
                    out["classes/log_p"] = model.class_log_probs(x)
                opt = make_optimizer(optimizer, model.params, **ADAM)
            opt.step(model.grads)
        out[f"{optimizer}/loss"] = np.asarray(losses, dtype=np.float64)  # after 0, 1, 2, 3 steps
        out.update({f"{optimizer}/params/{k}": p.copy() for k, p in model.params.items()})
    return out


def generate(names: Iterable[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The reference vectors of the models ``names`` (default: all), computed from scratch."""
    res = {}
    with threads.limit(1):
        for name in names or REFERENCE_MODELS:
            model, inputs = build(name)
            res[name] = compute(model, inputs, optimizer_of(name))
    return res


def replay(
    ref_path: str | os.PathLike = DEFAULT_PATH, dtype: str = "float64"
) -> dict[str, dict[str, np.ndarray]]:
    """What a port does: for every model in the file, a fresh :class:`FlowModel` of the file's
    configuration (in ``dtype``, another seed), its parameters and buffers loaded from
    ``model/``, then :func:`compute` on the file's inputs."""
    res = {}
    with _open_h5(ref_path) as f:
        _check_format(f, ref_path)
        for name in json.loads(f.attrs["models"]):
            g = f[name]
            cfg = FlowConfig.from_dict({**json.loads(g.attrs["config"]), "dtype": dtype})
            model = FlowModel(cfg, seed=987654)  # the seed must not matter
            state = {
                f"{kind}/{p}": a
                for kind in ("params", "buffers")
                for p, a in _datasets(g["model"][kind]).items()
            }
            model.load_state_dict(state)
            inputs = {k: g[k][()] for k in ("input/x", "input/y", "sample/z") if k in g}
            res[name] = compute(model, inputs, g.attrs.get("optimizer", "adam"))
    return res


# ---------------------------------------------------------------------- the file
def write(
    path: str | os.PathLike,
    vectors: dict[str, dict[str, np.ndarray]],
    configs: dict[str, FlowConfig] | None = None,
) -> Path:
    """Write ``{model: {path: array}}`` to ``path`` (layout: docs/reference-vectors.md).

    Each group's ``config`` attribute is ``configs[name]`` (a replayed file's own
    configuration, :func:`read_configs`) or else the registered one of
    :data:`REFERENCE_MODELS`; the dtype is the one of ``input/x``."""
    from flownp import __version__

    path = Path(path)
    buf = io.BytesIO()  # built in memory, then written atomically: nothing half-written
    # libver="latest": compact object headers (the file has ~800 small datasets)
    with h5py.File(buf, "w", libver="latest") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["flownp_version"] = __version__
        f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        f.attrs["models"] = json.dumps(list(vectors))
        f.attrs["adam"] = json.dumps({**ADAM, "steps": ADAM_STEPS})  # Adamax: the same
        f.attrs["loss"] = (
            "bits/dim: mean_n (-(log N(z_n; 0, I) + logdet_n) + D ln 2^N) / (D ln 2), N = the "
            "group's n_bits (8 unless its config says); + weight_y * mean_n bits_y_n (the "
            "classifier's cross-entropy in bits) when weight_y > 0"
        )
        for name, arrays in vectors.items():
            g = f.create_group(name)
            config = (configs or {}).get(name)
            if name in REFERENCE_MODELS:
                registered, model_seed, data_seed = REFERENCE_MODELS[name]
                config = config or registered
                g.attrs["model_seed"] = model_seed
                g.attrs["data_seed"] = data_seed
            g.attrs["optimizer"] = "adamax" if "adamax/loss" in arrays else "adam"
            if config is not None:
                g.attrs["config"] = json.dumps(
                    {**config.to_dict(), "dtype": str(arrays["input/x"].dtype)}, sort_keys=True
                )
            for key in sorted(arrays):
                a = np.asarray(arrays[key])
                # small arrays live in the object header (no separate chunk)
                kw = {}
                if 0 < a.nbytes < 32_000:
                    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                    dcpl.set_layout(h5py.h5d.COMPACT)
                    kw["dcpl"] = dcpl
                g.create_dataset(key, data=a, **kw)
    return write_atomic(path, buf.getvalue())


def _check_format(f: h5py.File, path: Any) -> None:
    if f.attrs.get("format") != FORMAT:
        raise DataError(
            f"{path}: not a flownp reference-vector file (no attribute format={FORMAT!r}); "
            "give the file written by flownp export-reference"
        )
    if int(f.attrs.get("format_version", -1)) > FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {f.attrs['format_version']} is newer than {FORMAT_VERSION}"
        )


def _datasets(group: h5py.Group) -> dict[str, np.ndarray]:
    """Every dataset below ``group``, keyed by its path relative to the group."""
    out: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[()]

    group.visititems(visit)
    return out


def read(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``{model: {path: array}}`` from a reference (or port) file written in this layout.
    Port files need no attributes; every dataset under a top-level group is read."""
    res: dict[str, dict[str, np.ndarray]] = {}
    with _open_h5(path) as f:
        for name, g in f.items():
            if not isinstance(g, h5py.Group):
                continue
            arrays = _datasets(g)
            res[name] = arrays
    return res


def _open_h5(path: str | os.PathLike) -> h5py.File:
    """``path`` opened read-only; a missing or non-HDF5 file is a one-line DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None


# ---------------------------------------------------------------------- the checker
def is_input(path: str) -> bool:
    """True for the paths a port reads (weights, inputs) rather than computes."""
    return path.startswith(INPUT_PREFIXES)


@dataclass
class CheckRow:
    """One compared tensor: ``status`` is ``OK``, ``NOT OK``, ``MISSING`` or ``SKIPPED``."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    status: str

    def __str__(self) -> str:
        d = "-" if np.isnan(self.max_abs_diff) else f"{self.max_abs_diff:.3e}"
        return f"{self.name:<60s} {d:>10s}  (tol {self.tolerance:.1e})  {self.status}"


#: Sections of a model group in the order they are computed (:func:`compute`).
SECTIONS = (
    "forward/",
    "latent/",
    "loss/",
    "grads/x",
    "grads/params/",
    "inverse/",
    "sample/",
    "classes/",
    "adam/loss",
    "adam/params/",
    "adamax/loss",
    "adamax/params/",
)
_LEAVES = {"output": 0, "h": 1, "eps": 2, "logdet": 3}


def forward_order(config: FlowConfig) -> Callable[[str], tuple]:
    """A sort key putting the paths of a model group in computation order: the sections of
    :data:`SECTIONS`; inside ``forward/`` the layers in forward order (``level0/squeeze``,
    ``level0/step0/actnorm``, ``.../conv``, ``.../coupling``, ..., ``level0/split``, ...,
    ``prior``); parameters in :attr:`FlowModel.params` order (forward order too)."""
    model = FlowModel(config)
    nodes = []
    for path, node in model.flow:
        if isinstance(node, FlowStep):
            nodes += [f"{path}/{name}" for name in node._layers]
        else:
            nodes.append(path)
    node_rank = {n: i for i, n in enumerate(nodes + ["prior", "classifier"])}
    param_rank = {p: i for i, p in enumerate(model.params)}
    last = len(SECTIONS)

    def key(path: str) -> tuple:
        sec = next((i for i, s in enumerate(SECTIONS) if path.startswith(s)), last)
        rest = path[len(SECTIONS[sec]) :] if sec < last else path
        if sec == 0:
            node, _, leaf = rest.rpartition("/")
            return (sec, node_rank.get(node, last), _LEAVES.get(leaf, last), path)
        if sec < last and SECTIONS[sec].endswith("params/"):
            return (sec, param_rank.get(rest, len(param_rank)), 0, path)
        return (sec, 0, 0, path)

    return key


def read_configs(path: str | os.PathLike) -> dict[str, FlowConfig]:
    """``{model: FlowConfig}`` of a reference file, in the order of its ``models`` attribute."""
    with _open_h5(path) as f:
        _check_format(f, path)
        return {
            name: FlowConfig.from_json(f[name].attrs["config"])
            for name in json.loads(f.attrs["models"])
        }


def compare(
    port: dict[str, dict[str, np.ndarray]],
    ref: dict[str, dict[str, np.ndarray]],
    rtol: float = RTOL,
    atol: float = ATOL,
    allow_missing: bool = False,
    configs: dict[str, FlowConfig] | None = None,
) -> list[CheckRow]:
    """Compare every computed tensor of ``ref`` (not the inputs) with ``port``.

    A tensor is OK when its shape matches and ``max |port - ref| <= atol + rtol * max |ref|``
    (NaN/Inf in the port are NOT OK). A tensor absent from the port is ``MISSING`` (counts as
    a failure) or, with ``allow_missing``, ``SKIPPED``. Rows come model by model (in the order
    of ``configs``, else of ``ref``), each in computation order (:func:`forward_order`; in
    alphabetical order for a model without a config).
    """
    rows = []
    configs = configs or {}
    names = [n for n in configs if n in ref] + [n for n in ref if n not in configs]
    for model in names:
        arrays = ref[model]
        key = forward_order(configs[model]) if model in configs else None
        for path in sorted(arrays, key=key):
            if is_input(path):
                continue
            r = np.asarray(arrays[path], dtype=np.float64)
            name = f"{model}/{path}"
            tol = atol + rtol * (float(np.abs(r).max()) if r.size else 0.0)
            p = port.get(model, {}).get(path)
            if p is None:
                status = "SKIPPED" if allow_missing else "MISSING"
                rows.append(CheckRow(name, r.shape, float("nan"), tol, status))
                continue
            p = np.asarray(p, dtype=np.float64)
            if p.shape != r.shape:
                rows.append(CheckRow(name, r.shape, float("inf"), tol, f"NOT OK (shape {p.shape})"))
                continue
            d = float(np.abs(p - r).max()) if r.size else 0.0
            ok = bool(np.isfinite(p).all()) and d <= tol
            rows.append(CheckRow(name, r.shape, d, tol, "OK" if ok else "NOT OK"))
    return rows


def failed(rows: list[CheckRow]) -> list[CheckRow]:
    """Rows that make the check fail (``NOT OK`` or ``MISSING``)."""
    return [r for r in rows if r.status not in ("OK", "SKIPPED")]


def check_reference(
    port_path: str | os.PathLike,
    ref_path: str | os.PathLike = DEFAULT_PATH,
    rtol: float = RTOL,
    atol: float = ATOL,
    allow_missing: bool = False,
    print_fn=print,
) -> int:
    """Print one line per tensor (name, max abs difference, tolerance, OK/NOT OK) in
    computation order (model by model, the layers in forward order), the first mismatch and
    a summary; return 0 if every tensor is OK (or skipped), else 1."""
    configs = read_configs(ref_path)
    port = read(port_path)
    rows = compare(port, read(ref_path), rtol, atol, allow_missing, configs)
    if rows and all(r.status in ("MISSING", "SKIPPED") for r in rows):
        groups = ", ".join(sorted(port)) or "none"
        raise DataError(
            f"{port_path}: holds none of the {len(rows)} tensors of the reference (its groups: "
            f"{groups}; expected {', '.join(configs)} with the reference's paths, "
            "docs/reference-vectors.md)"
        )
    for r in rows:
        print_fn(str(r))
    bad = failed(rows)
    if bad:
        print_fn(f"first mismatch in computation order: {bad[0].name} ({bad[0].status})")
    n_ok = sum(r.status == "OK" for r in rows)
    n_skip = sum(r.status == "SKIPPED" for r in rows)
    print_fn(
        f"{n_ok}/{len(rows)} tensors OK, {len(bad)} NOT OK or missing, {n_skip} skipped "
        f"(tolerance: max|diff| <= {atol:g} + {rtol:g} max|ref|; reference {ref_path})"
    )
    return 1 if bad else 0
