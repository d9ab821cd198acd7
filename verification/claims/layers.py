r"""Every layer and the whole model against dense Jacobians: log-determinants, inverses and
gradients (section ``layers`` of the report).

Section ``layers`` (every layer and the whole model, :func:`run_layer_claims`):

=================================  ==============================================================
:func:`claim_layer_jacobians`      every registered layer (:data:`LAYER_FACTORIES`): logdet =
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from flownp.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    ChannelPermutation,
    CInCConv,
    ConditionalPrior,
    ConditionerNet,
    Conv1x1,
    EmergingConv,
    LatentClassifier,
    LearnedPrior,
    PeriodicConv,
    QuadCoupling,
    Split,
    Squeeze,
)
from flownp.layers.base import Layer, Network
from flownp.model import CONVS, COUPLINGS, FlowConfig, FlowModel
from flownp.testing import check_layer_gradients, dense_jacobian, randomize_params
from verification.claims._common import (
    _emit,
)
from verification.result import ClaimResult

# --------------------------------------------------------------------------------------------
# 6. Every layer: logdet = slogdet of the dense Jacobian, and the round trip
# --------------------------------------------------------------------------------------------

LayerFactory = Callable[[np.random.Generator], tuple[Layer, np.ndarray]]


def _cinc_factory(corner: str, k: int, **kw) -> LayerFactory:
    def make(rng: np.random.Generator) -> tuple[Layer, np.ndarray]:
        layer = CInCConv(3, k, corner=corner, init_std=0.1, seed=int(rng.integers(1 << 31)), **kw)
        for name, p in layer.params.items():
            if name != "weight":
                p += rng.normal(0.0, 0.3, p.shape)
        return layer, rng.standard_normal((2, 3, 4, 3))

    return make


def _actnorm_factory(rng: np.random.Generator) -> tuple[Layer, np.ndarray]:
    layer = ActNorm(3)
    x = rng.normal(0.5, 2.0, (2, 3, 4, 3))
    layer.forward(x)  # data-dependent initialisation
    layer.clear_cache()
    for p in layer.params.values():
        p += rng.normal(0.0, 0.3, p.shape)
    return layer, x


class SplitAsLayer(Layer):
    """:class:`~flownp.layers.split.Split` seen as one flow layer ``x -> concat(h, eps)``
    (channels ``[:C/2]`` = ``h``, ``[C/2:]`` = ``eps``), so that its Jacobian, log-det, round
    trip and gradients are checked like any other layer's. Parameters keep their paths under
    ``split/``."""

    def __init__(self, split: Split) -> None:
        super().__init__(split.dtype)
        self.split = self.add_layer("split", split)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, eps, logdet = self.split.forward(x)
        return np.concatenate([h, eps], axis=-1), logdet  # (N, H, W, C)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        C1 = self.split.half
        return self.split.inverse(
            np.ascontiguousarray(y[..., :C1]), np.ascontiguousarray(y[..., C1:])
        )

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        C1 = self.split.half
        return self.split.backward(dy[..., :C1], dy[..., C1:], dlogdet)


class ConditionerAsLayer(Layer):
    """A (non-invertible) network ``x -> h`` (the :class:`~flownp.layers.base.Network`
    contract: a :class:`~flownp.layers.conditioner.ConditionerNet`, the
    :class:`~flownp.layers.conditional.LatentClassifier`) with a zero log-det, for the
    gradient check only."""

    def __init__(self, net: Network) -> None:
        super().__init__(net.dtype)
        self.net = self.add_layer("net", net)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.net.forward(x), np.zeros(x.shape[0], dtype=self.dtype)

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        return self.net.backward(dy)


class LabelledPrior(Layer):
    """:class:`~flownp.layers.conditional.ConditionalPrior` with one label bound for every
    sample (so that the Jacobian of a single sample is the batch's), seen as one flow layer
    (parameters under ``prior/``)."""

    def __init__(self, prior: ConditionalPrior, label: int) -> None:
        super().__init__(prior.dtype)
        self.prior = self.add_layer("prior", prior)
        self.label = int(label)

    def _labels(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label)

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.prior.forward(x, self._labels(x))

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return self.prior.inverse(y, self._labels(y))

    def backward(self, dy: np.ndarray, dlogdet: np.ndarray) -> np.ndarray:
        return self.prior.backward(dy, dlogdet)


def _factory(
    build: Callable[[int], Layer], shape: tuple[int, int, int], scale: float, init: bool = True
) -> LayerFactory:
    """``make(rng)``: ``build(seed)``, a ``(2, *shape)`` standard normal batch, one forward for
    the data-dependent initialisation of any ActNorm inside (``init``), then every parameter
    (zero-initialised ones included) perturbed by ``scale * N(0, 1)``: nothing is the
    identity."""

    def make(rng: np.random.Generator) -> tuple[Layer, np.ndarray]:
        layer = build(int(rng.integers(1 << 31)))
        x = rng.standard_normal((2, *shape))
        if init:
            layer.forward(x)
            layer.clear_cache()
        randomize_params(layer, rng, scale)
        return layer, x

    return make


_S343 = (3, 4, 3)  # H W C = 36: the Jacobian has 36 columns
_S344 = (3, 4, 4)  # 4 channels for the couplings (quarters)
# Coupling noise 0.03: with 0.1 the exp scale reaches e^10 (|y| ~ 5e4), and the finite
# differences then measure round-off (u |L| / h), not the gradient.


#: name -> ``make(rng) -> (layer, x)``: a float64 layer with random non-trivial parameters and
#: a small input batch (N >= 1; the Jacobian is taken on the first sample). Every flow layer
#: of flownp is here, in each of its parameterisations.
LAYER_FACTORIES: dict[str, LayerFactory] = {
    **{
        f"CInCConv(k={k}, corner={corner})": _cinc_factory(corner, k)
        for corner in ("triangular", "unit", "lu")
        for k in (1, 2, 3)
    },
    "CInCConv(k=5, corner=triangular)": _cinc_factory("triangular", 5),
    "CInCConv(k=3, guard=0.9)": _cinc_factory("triangular", 3, guard=0.9),
    "ActNorm": _actnorm_factory,
    "Conv1x1(lu=False)": _factory(lambda s: Conv1x1(3, lu=False, seed=s), _S343, 0.1, False),
    "Conv1x1(lu=True)": _factory(lambda s: Conv1x1(3, lu=True, seed=s), _S343, 0.1, False),
    **{
        f"EmergingConv(k={k})": _factory(
            lambda s, k=k: EmergingConv(3, k, seed=s, init_std=0.1), _S343, 0.1, False
        )
        for k in (1, 3, 5)
    },
    **{
        f"PeriodicConv(k={k}{', guard=0.9' if g else ''})": _factory(
            lambda s, k=k, g=g: PeriodicConv(3, k, seed=s, init_std=0.3, guard=g), _S343, 0.2, False
        )
        for k, g in ((1, None), (3, None), (5, None), (3, 0.9))
    },
    **{
        f"ChannelPermutation({kind})": _factory(
            lambda s, kind=kind: ChannelPermutation(3, kind, seed=s), _S343, 0.0, False
        )
        for kind in ("reverse", "shuffle")
    },
    "AdditiveCoupling": _factory(lambda s: AdditiveCoupling(4, 4, seed=s), _S344, 0.03),
    "Squeeze": _factory(lambda s: Squeeze(), (4, 4, 3), 0.0, False),
    "Split": _factory(lambda s: SplitAsLayer(Split(4)), _S344, 0.2, False),
    "LearnedPrior": _factory(lambda s: LearnedPrior(_S343), _S343, 0.3, False),
    "ConditionalPrior(K=3, label 2)": _factory(
        lambda s: LabelledPrior(ConditionalPrior(_S343, 3), 2), _S343, 0.3, False
    ),
    **{
        f"{cls.__name__}(scale={scale})": _factory(
            lambda s, cls=cls, scale=scale: cls(4, 4, scale=scale, seed=s), _S344, 0.03
        )
        for cls in (AffineCoupling, QuadCoupling)
        for scale in ("sigmoid", "exp", "softclamp")
    },
}

#: Layers that are not flows (no inverse, no log-det): gradient check only.
GRADIENT_ONLY_FACTORIES: dict[str, LayerFactory] = {
    "ConditionerNet(3 -> 6, width 4)": _factory(
        lambda s: ConditionerAsLayer(ConditionerNet(3, 6, 4, seed=s)), _S343, 0.1
    ),
    "LatentClassifier(3 -> 4 classes)": _factory(
        lambda s: ConditionerAsLayer(LatentClassifier(3, 4)), _S343, 0.3, False
    ),
}


def claim_layer_jacobians(
    quick: bool = True,
    seed: int = 5,
    verbose: bool = True,
    factories: dict[str, LayerFactory] | None = None,
) -> ClaimResult:
    """For every registered layer: ``logdet`` equals ``slogdet`` of the dense Jacobian of
    ``forward`` (central differences, :func:`flownp.testing.dense_jacobian`), and
    ``inverse(forward(x)) == x``."""
    t0 = time.perf_counter()
    factories = LAYER_FACTORIES if factories is None else factories
    rng = np.random.default_rng(seed)
    # Central differences with step 1e-6 on O(1) layers: each Jacobian entry is accurate to
    # ~ u / h + h^2 ~ 1e-10 (exact for linear layers up to round-off); with n <= 48 and
    # ||J^-1|| = O(1) the log-determinant moves by at most ~ n * 1e-10 < 1e-8.
    tol_logdet, tol_rt = 1e-8, 1e-10
    rows, ok = [], True
    for name, make in factories.items():
        layer, x = make(rng)
        y, logdet = layer.forward(x)
        layer.clear_cache()

        def fwd(z: np.ndarray, layer: Layer = layer) -> np.ndarray:
            out, _ = layer.forward(z)
            layer.clear_cache()
            return out

        err, lds = 0.0, []
        for n in range(x.shape[0]):  # every sample: data-dependent layers differ per sample
            sign, ld = np.linalg.slogdet(dense_jacobian(fwd, x[n : n + 1]))
            err = max(err, float(abs(logdet[n] - ld)) if sign != 0 else float("inf"))
            lds.append(float(ld))
        rt = float(np.abs(layer.inverse(y) - x).max() / max(1.0, np.abs(x).max()))
        passed = err <= tol_logdet and rt <= tol_rt
        ok &= bool(passed)
        rows.append(
            {
                "layer": name,
                "x shape": "x".join(map(str, x.shape)),
                "logdet[0]": float(logdet[0]),
                "slogdet(J[0])": lds[0],
                "max |logdet - slogdet(J)|": err,
                "round trip (rel)": rt,
                "pass": bool(passed),
            }
        )
    return _emit(
        ClaimResult(
            name="layer_jacobians",
            statement=(
                "Every layer's log-determinant equals slogdet of its dense Jacobian, and "
                "inverse(forward(x)) = x."
            ),
            computed=(
                "for each entry of verification.claims.LAYER_FACTORIES (float64, random "
                "parameters): the full Jacobian of forward on every sample of the batch by "
                f"central differences (step 1e-6), its slogdet against the layer's logdet "
                f"(tolerance "
                f"{tol_logdet:g}); the round trip on the batch (tolerance {tol_rt:g} relative)."
            ),
            numbers=rows,
            passed=bool(ok),
            notes=f"{time.perf_counter() - t0:.2f} s",
        ),
        verbose,
    )


# --------------------------------------------------------------------------------------------
# 7. Every layer: finite-difference gradient checks
# --------------------------------------------------------------------------------------------


def claim_layer_gradients(
    quick: bool = True,
    seed: int = 6,
    verbose: bool = True,
    factories: dict[str, LayerFactory] | None = None,
) -> ClaimResult:
    """For every registered layer (and the conditioner network): ``backward`` against central
    differences of ``L = sum(y * dy) + sum(logdet * dlogdet)`` with random ``dy``, ``dlogdet``,
    for the input and every parameter (:func:`flownp.testing.check_layer_gradients`)."""
    t0 = time.perf_counter()
    if factories is None:
        factories = {**LAYER_FACTORIES, **GRADIENT_ONLY_FACTORIES}
    rng = np.random.default_rng(seed)
    entries = 10 if quick else 40
    tol = 1e-6
    rows, ok = [], True
    for name, make in factories.items():
        layer, x = make(rng)
        res = check_layer_gradients(layer, x, rng, max_entries=entries)
        worst = max(res.errors, key=res.errors.get)
        passed = res.max_error <= tol
        ok &= passed
        rows.append(
            {
                "layer": name,
                "arrays checked": len(res.errors),
                "max rel error": res.max_error,
                "worst array": worst,
                "error on x": res.errors["x"],
                "pass": passed,
            }
        )
    return _emit(
        ClaimResult(
            name="layer_gradients",
            statement=(
                "Every layer's hand-written backward is the gradient of its forward: "
                "dL/dx and dL/dtheta for L = sum(y * dy) + sum(logdet * dlogdet) (the "
                "upstream gradients of both outputs)."
            ),
            computed=(
                f"for each entry of LAYER_FACTORIES and GRADIENT_ONLY_FACTORIES (float64, "
                f"random parameters, random dy and dlogdet): up to {entries} random entries of "
                "x and of every parameter array perturbed by +-1e-6 (central differences); "
                "error = |analytic - numeric| / max(1, |numeric|), tolerance "
                f"{tol:g} (truncation ~1e-12, round-off ~1e-16 |L| / 1e-6 ~ 1e-9)."
            ),
            numbers=rows,
            passed=bool(ok),
            notes=f"{time.perf_counter() - t0:.2f} s",
        ),
        verbose,
    )


# --------------------------------------------------------------------------------------------
# 8. The whole model
# --------------------------------------------------------------------------------------------

MODEL_IMAGE = (8, 8, 1)


def tiny_model(
    conv: str,
    coupling: str,
    rng: np.random.Generator,
    *,
    image_shape: tuple[int, int, int] = MODEL_IMAGE,
    noise: float = 0.05,
    seed: int = 3,
    **kw,
) -> FlowModel:
    """A float64 two-level, depth-1, width-4 :class:`~flownp.model.FlowModel` (triangular CInC
    corner and sigmoid scale unless ``kw`` says otherwise) with
    data-initialised actnorms and every parameter (zero-initialised ones included) perturbed
    by ``noise * N(0, 1)``. (``noise`` 0.05 keeps cond(J) ~ 10; much larger noise saturates the
    sigmoid scales and makes the whole map ill-conditioned for a reason that is not a bug.)"""
    kw = {"cinc_corner": "triangular", "scale": "sigmoid", **kw}  # not the config defaults
    cfg = FlowConfig(
        image_shape=image_shape,
        levels=2,
        depth=1,
        width=4,
        conv=conv,
        coupling=coupling,
        dtype="float64",
        **kw,
    )
    model = FlowModel(cfg, seed=seed)
    model.initialize(rng.uniform(-0.5, 0.5, (16, *image_shape)))
    randomize_params(model, rng, noise)
    return model


def _model_cases(quick: bool) -> list[tuple[str, str, dict]]:
    cases = [(conv, coupling, {}) for conv in CONVS for coupling in COUPLINGS]
    cases += [
        ("cinc", "quad", {"cinc_corner": "lu", "scale": "exp"}),
        ("cinc", "affine", {"cinc_corner": "unit", "kernel_size": 2}),
        ("1x1", "quad", {"lu": True}),
    ]
    if quick:
        cases = [c for c in cases if (c[0], c[1]) in {("cinc", "quad"), ("1x1+emerging", "affine")}]
    return cases


def model_jacobian(model: FlowModel, x: np.ndarray) -> np.ndarray:
    """Dense Jacobian ``dz / dx`` (``(D, D)``, z in the model's latent order, x in the paper's
    vectorisation) of one sample by central differences."""

    def fwd(v: np.ndarray) -> np.ndarray:
        z, _ = model.forward(v)
        model.clear_cache()
        return z

    return dense_jacobian(fwd, x)


def claim_models(
    quick: bool = True, seed: int = 7, verbose: bool = True, out_dir: str | None = "report"
) -> ClaimResult:
    """The whole :class:`~flownp.model.FlowModel`, for every convolution kind x coupling:
    ``logdet`` = slogdet of the dense Jacobian of ``x -> z``, ``inverse(forward(x)) = x`` and
    the gradient check of ``backward`` for the input and every parameter array."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    tol_logdet, tol_rt, tol_grad = 1e-7, 1e-10, 1e-6
    entries = 2 if quick else 4
    rows, ok, figures = [], True, []
    for conv, coupling, kw in _model_cases(quick):
        model = tiny_model(conv, coupling, rng, **kw)
        x = rng.uniform(-0.5, 0.5, (2, *MODEL_IMAGE))
        z, logdet = model.forward(x)
        model.clear_cache()
        err, conds = 0.0, []
        for n in range(1 if quick else 2):
            J = model_jacobian(model, x[n : n + 1])
            sign, ld = np.linalg.slogdet(J)
            err = max(err, float(abs(logdet[n] - ld)) if sign != 0 else float("inf"))
            conds.append(float(np.linalg.cond(J)))
            if out_dir is not None and n == 0 and (conv, coupling, kw) == ("cinc", "quad", {}):
                from verification.figures import model_jacobian_figure

                figures.append(
                    model_jacobian_figure(
                        J,
                        model,
                        os.path.join(out_dir, "model_jacobian.png"),
                        title=f"dz/dx of one sample,\n{model!r}",
                    )
                )
        rt = float(np.abs(model.inverse(z) - x).max() / np.abs(x).max())
        res = check_layer_gradients(model, x, rng, max_entries=entries)
        passed = err <= tol_logdet and rt <= tol_rt and res.max_error <= tol_grad
        ok &= passed
        extra = ", ".join(f"{k}={v}" for k, v in kw.items())
        rows.append(
            {
                "conv": conv,
                "coupling": coupling + (f" ({extra})" if extra else ""),
                "params": model.num_params(),
                "max |logdet - slogdet(J)|": err,
                "cond(J)": max(conds),
                "round trip (rel)": rt,
                "grad arrays": len(res.errors),
                "grad max rel error": res.max_error,
                "pass": passed,
            }
        )
    return _emit(
        ClaimResult(
            name="models",
            statement=(
                "The whole multi-scale flow (squeeze, actnorm, invertible convolution, "
                "coupling, split priors, top prior) is a bijection with log p(x) = "
                "log N(z; 0, I) + logdet: its logdet equals slogdet of dz/dx, its inverse "
                "inverts it, and its backward is the gradient of sum(z dz) + sum(logdet dlogdet)."
            ),
            computed=(
                f"tiny float64 models (image {'x'.join(map(str, MODEL_IMAGE))}, levels 2, "
                "depth 1, width 4, every parameter randomised) for every convolution kind x "
                f"coupling{' (quick: two of them)' if quick else ''}: the 64x64 Jacobian of "
                "x -> z by central differences (step 1e-6) on "
                f"{'the first sample' if quick else 'both samples'}, slogdet against logdet "
                f"(tolerance {tol_logdet:g}); round trip (tolerance {tol_rt:g} relative); "
                f"{entries} random entries of x and of every parameter array against central "
                f"differences (tolerance {tol_grad:g})."
            ),
            numbers=rows,
            passed=bool(ok),
            figures=figures,
            notes=f"{time.perf_counter() - t0:.2f} s",
        ),
        verbose,
    )


# --------------------------------------------------------------------------------------------
# 11. The block-triangular Jacobian of the quad coupling (figure)
# --------------------------------------------------------------------------------------------


def claim_quad_structure(
    seed: int = 10, verbose: bool = True, out_dir: str | None = "report"
) -> ClaimResult:
    """The quad coupling's Jacobian, rows/columns ordered by channel block, is block lower
    triangular with diagonal blocks ``I, diag(s_1), diag(s_2), diag(s_3)`` (Eq. 3-6)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    C, H, W = 8, 2, 2
    layer = QuadCoupling(C, 4, seed=3)
    x = rng.standard_normal((1, H, W, C))
    layer.forward(x)
    layer.clear_cache()
    randomize_params(layer, rng, 0.1)
    y, logdet = layer.forward(x)
    layer.clear_cache()

    def fwd(v: np.ndarray) -> np.ndarray:
        out, _ = layer.forward(v)
        layer.clear_cache()
        return out

    J = dense_jacobian(fwd, x)  # (HWC, HWC), paper order (pixel, channel)
    # block order: channel block b = c // (C/4) first, then pixel, then channel in the block
    idx = np.arange(H * W * C).reshape(H * W, 4, C // 4).transpose(1, 0, 2).reshape(-1)
    Jb = J[np.ix_(idx, idx)]
    nb = H * W * C // 4
    blk = np.arange(H * W * C) // nb
    above = blk[None, :] > blk[:, None]
    diag_blocks = [Jb[b * nb : (b + 1) * nb, b * nb : (b + 1) * nb] for b in range(4)]
    off_in_diag = max(float(np.abs(Db - np.diag(np.diag(Db))).max()) for Db in diag_blocks)
    below = blk[None, :] < blk[:, None]
    ld_tri = float(np.sum(np.log(np.abs(np.diag(Jb)))))
    numbers = {
        "Jacobian": f"{J.shape[0]}x{J.shape[1]} (1 x {H} x {W} x {C} input)",
        "max |entry| above the block diagonal (block order)": float(np.abs(Jb[above]).max()),
        "max |off-diagonal entry| inside a diagonal block": off_in_diag,
        "max |block 1 diagonal block - I|": float(np.abs(diag_blocks[0] - np.eye(nb)).max()),
        "nonzeros below the block diagonal": int(np.count_nonzero(Jb[below])),
        "sum log|diag J|": ld_tri,
        "layer logdet": float(logdet[0]),
        "slogdet(J)": float(np.linalg.slogdet(J)[1]),
    }
    ok = numbers["max |entry| above the block diagonal (block order)"] == 0.0
    ok &= off_in_diag == 0.0 and numbers["max |block 1 diagonal block - I|"] <= 1e-9
    ok &= numbers["nonzeros below the block diagonal"] > 0
    ok &= abs(ld_tri - logdet[0]) <= 1e-8
    figures = []
    if out_dir is not None:
        from verification.figures import quad_jacobian_figure

        figures.append(
            quad_jacobian_figure(J, Jb, nb, os.path.join(out_dir, "quad_coupling_jacobian.png"))
        )
    return _emit(
        ClaimResult(
            name="quad_structure",
            statement=(
                "Paper Section 3.2 (Eq. 3-6, Figure 2): the quad coupling's Jacobian is block "
                "lower triangular over the four channel blocks, with diagonal blocks I, diag(s_1), "
                "diag(s_2), diag(s_3), so log|det J| = sum log s."
            ),
            computed=(
                "QuadCoupling(8 channels, width 4, random parameters) on one 2x2x8 input: the "
                "32x32 Jacobian by central differences, rows and columns permuted from the "
                "paper's (pixel, channel) order to (channel block, pixel, channel in block). "
                "Zeros are exact (an output that does not read an input is bitwise unchanged "
                "by the finite difference)."
            ),
            numbers=numbers,
            passed=bool(ok),
            figures=figures,
            notes=f"{time.perf_counter() - t0:.2f} s",
        ),
        verbose,
    )


def run(out_dir: str = "report", quick: bool = True, verbose: bool = True) -> list:
    """Section ``layers``: every layer and the whole model (log-dets, round trips, gradients)."""
    return [
        claim_layer_jacobians(quick, verbose=verbose),
        claim_layer_gradients(quick, verbose=verbose),
        claim_quad_structure(verbose=verbose, out_dir=out_dir),
        claim_models(quick, verbose=verbose, out_dir=out_dir),
    ]
