"""The PyTorch port (verification/torch_port.py) computes flownp's function.

Extra coverage: skipped where torch is not installed (CI does not install it).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flownp.model import FlowConfig, FlowModel  # noqa: E402
from flownp.testing import randomize_params  # noqa: E402
from verification import reference, torch_port  # noqa: E402

CONFIGS = {
    "cinc-triangular-guard-quad-sigmoid": dict(
        conv="cinc", cinc_corner="triangular", coupling="quad", scale="sigmoid", guard=0.9
    ),
    "cinc-unit-guard-affine": dict(conv="cinc", cinc_corner="unit", guard=0.5),
    "cinc-lu-guard-affine-exp": dict(conv="cinc", cinc_corner="lu", guard=0.9, scale="exp"),
    "cinc-lu-guard-quad-softclamp": dict(
        conv="cinc", cinc_corner="lu", guard=0.9, coupling="quad", scale="softclamp"
    ),
    "cinc-lu-k2-quad": dict(
        conv="cinc", cinc_corner="lu", kernel_size=2, coupling="quad", scale="sigmoid", guard=None
    ),
    "emerging-guard-sigmoid": dict(conv="emerging", scale="sigmoid", guard=0.9),
    "emerging-k5": dict(conv="emerging", kernel_size=5, guard=None),
    "glow-plain": dict(conv="1x1", lu=False),
    "glow-lu-quad": dict(conv="1x1", lu=True, coupling="quad", scale="sigmoid"),
    "1x1+emerging-lu-guard": dict(conv="1x1+emerging", lu=True, guard=0.9),
    "1x1+cinc-guard": dict(conv="1x1+cinc", lu=True, guard=0.9),
    "periodic-guard-additive": dict(conv="periodic", coupling="additive", guard=0.9),
    "periodic-free-quad": dict(conv="periodic", coupling="quad", scale="sigmoid", guard=None),
    "periodic-k5-guard": dict(conv="periodic", kernel_size=5, guard=0.9),
    "reverse-additive": dict(conv="reverse", coupling="additive"),
    "shuffle-quad-sigmoid": dict(conv="shuffle", coupling="quad", scale="sigmoid"),
    "ycond-classifier-5bit": dict(num_classes=3, weight_y=0.7, n_bits=5),
    "ycond-position": dict(num_classes=3, label_prior="position"),
}


def _model(kw: dict, seed: int = 3) -> tuple[FlowModel, np.ndarray]:
    cfg = FlowConfig(image_shape=(8, 8, 2), levels=2, depth=2, width=4, dtype="float64", **kw)
    rng = np.random.default_rng(seed)
    model = FlowModel(cfg, seed=seed)
    model.initialize(rng.uniform(-0.5, 0.5, (16, 8, 8, 2)))
    randomize_params(model, rng, 0.05)  # masked entries too, and kernels outside the guard
    return model, rng.uniform(-0.5, 0.5, (3, 8, 8, 2))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_port_matches_flownp(name: str) -> None:
    torch.set_num_threads(1)
    model, x = _model(CONFIGS[name])
    d = torch_port.compare_with_flownp(model, x)
    # relative differences (max |port - flownp| / max |flownp|), float64
    assert d["forward"] < 1e-12, d  # every node's output and log-det
    assert d["latent"] < 1e-12 and d["logdet"] < 1e-12 and d["loss"] < 1e-12, d
    assert d["grads"] < 1e-10, d  # input and every parameter
    assert d["inverse"] < 1e-9 and d["sample"] < 1e-9, d  # same latents, two substitutions
    if model.config.num_classes:  # every class scored on the same latent
        assert d["classes"] < 1e-12, d


def test_guard_is_active_in_the_compared_models() -> None:
    """The guarded configurations above really rescale their taps (else the guard would be
    untested): the guarded and unguarded flownp kernels differ."""
    model, _ = _model(CONFIGS["cinc-lu-guard-affine-exp"])
    conv = model._layers["level0"]._layers["step0"]._layers["conv"]
    guarded = conv.kernel
    conv.guard = None
    assert np.max(np.abs(guarded - conv.kernel)) > 1e-2


def test_port_detects_a_wrong_mask() -> None:
    """The comparison can fail: an upper instead of lower triangular corner is caught."""
    model, x = _model(CONFIGS["cinc-triangular-guard-quad-sigmoid"])
    tm = torch_port.from_flownp(model, "float64")
    conv = tm.level0.step0.conv
    C = conv.mask.shape[0]
    conv.mask[:, :, -1, -1] = torch.triu(torch.ones(C, C, dtype=torch.float64), 1)
    z_ref, _ = model.forward(x)
    model.clear_cache()
    z, _ = tm(torch_port.nchw(x))
    assert np.max(np.abs(z.detach().numpy() - z_ref)) > 1e-3


def test_row_solver_round_trip_float32() -> None:
    torch.manual_seed(0)
    for k in (1, 2, 3, 5):
        w = 0.05 * torch.randn(6, 6, k, k)
        w[:, :, -1, -1] = torch.eye(6) + 0.05 * torch.randn(6, 6)  # a full corner block
        x = torch.randn(4, 6, 7, 9)
        y = torch_port.conv_top_left(x, w)
        assert torch.max(torch.abs(torch_port.solve_top_left(y, w) - x)) < 1e-5


def test_reference_vectors_pass_check_reference(tmp_path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "port.h5"
    torch_port.write_port_file(str(out), torch_port.port_reference())
    lines: list[str] = []
    assert reference.check_reference(out, print_fn=lines.append) == 0, "\n".join(lines)
    # every model of the committed file, the default configuration (guard, LU corner, mixed
    # sign buffers) included
    assert set(torch_port.port_reference()) == set(reference.REFERENCE_MODELS)
    stored = reference.read(reference.DEFAULT_PATH).values()
    total = sum(not reference.is_input(k) for group in stored for k in group)
    assert lines[-1].startswith(f"{total}/{total} tensors OK")


def test_bad_shapes_are_named() -> None:
    model, _ = _model(CONFIGS["glow-plain"])
    tm = torch_port.from_flownp(model, "float64")
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, 8, 8\)"):
        tm(torch.zeros(1, 8, 8, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z must have shape \(N, 128\)"):
        tm.inverse(torch.zeros(1, 127, dtype=torch.float64))
    with pytest.raises(ValueError, match="names differ"):
        torch_port.load_flownp_state(tm, {"level0/step0/actnorm/bias": np.zeros(8)}, {})
