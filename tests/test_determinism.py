"""Thread determinism of the Numba kernels: the same bits with 1 thread and with several.

The several-thread run happens in a fresh interpreter with ``NUMBA_NUM_THREADS=3`` (Numba's
pool size is fixed when it loads), so the comparison really uses three threads whatever the
number of CPUs of the machine: on a 1- or 2-CPU CI machine ``threads.configure()`` alone would
give at most as many threads as CPUs, and with one CPU the test could not fail. Three (not
two) threads also make the fixed-chunk reductions split unevenly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS = 3

# Run by both processes: the kernels on fixed inputs, saved to the .npz given as argv[1].
SCRIPT = """
import sys
import numba
import numpy as np
from flownp import threads
from flownp.kernels import conv as K_
from flownp.kernels import solve as KSOLVE
from flownp.kernels.conv_same import actnorm_relu_backward

n = int(sys.argv[2])
threads.configure(n)
assert numba.get_num_threads() == n, (numba.get_num_threads(), n)
rng = np.random.default_rng(12345)
x = rng.standard_normal((37, 6, 5, 12)).astype(np.float32)
dy = rng.standard_normal((37, 6, 5, 12)).astype(np.float32)
K = (0.1 * rng.standard_normal((3, 3, 12, 12))).astype(np.float32)
L = (np.tril(0.1 * rng.standard_normal((12, 12)), -1) + np.eye(12)).astype(np.float32)
U, perm = np.eye(12, dtype=np.float32), np.arange(12)
big = rng.standard_normal((3000, 7)).astype(np.float32)  # > 1 chunk of rows
logs = (0.1 * rng.standard_normal(7)).astype(np.float32)
out = [
    K_.conv_forward(x, K),
    K_.conv_backward_input(dy, K),
    K_.conv_backward_kernel(x, dy, 3),
    KSOLVE.solve_raster(dy, K, L, U, perm),
    KSOLVE.solve_wavefront(dy, K, L, U, perm),
    *actnorm_relu_backward(big[::-1].copy(), np.maximum(big, 0), logs),
]
np.savez(sys.argv[1], *out)
"""


def _run(tmp_path: Path, n: int) -> list[np.ndarray]:
    out = tmp_path / f"threads{n}.npz"
    env = {**os.environ, "NUMBA_NUM_THREADS": str(max(n, 1)), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(n)], cwd=ROOT, env=env, check=True)
    with np.load(out) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_numba_kernels_are_bitwise_identical_for_any_thread_count(tmp_path):
    """flownp.threads' promise: disjoint writes and fixed-chunk gradient sums give the same
    bits with 1 thread and with 3 (forward, both gradients, both solvers, actnorm-relu)."""
    one = _run(tmp_path, 1)
    many = _run(tmp_path, THREADS)
    assert len(one) == len(many) == 8
    for i, (a, b) in enumerate(zip(one, many, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert np.array_equal(a, b), f"kernel output {i} differs between 1 and {THREADS} threads"


# --------------------------------------------------------------------------------------------
# Compiled in this process or loaded from the on-disk cache: the same bits
# --------------------------------------------------------------------------------------------

# The conditioner network (the kernel with compiled helpers) at the default model's first
# level (64 images of 7x7, 4 channels in, 8 out, width 64: blocks of 8 images), forward and
# backward in both precisions, saved to the .npz given as argv[1].
CACHE_SCRIPT = """
import sys
import numpy as np
from flownp.kernels.conditioner import conditioner_backward, conditioner_forward

rng = np.random.default_rng(0)
out = {}
for dt in (np.float32, np.float64):
    N, H, W, Ci, Co, Wd = 64, 7, 7, 4, 8, 64
    def normal(*shape, s=1.0):
        return (s * rng.standard_normal(shape)).astype(dt)
    x = normal(N, H, W, Ci)
    w_in, w_mid, w_out = normal(3, 3, Ci, Wd, s=0.1), normal(1, 1, Wd, Wd, s=0.1), normal(3, 3, Wd, Co, s=0.1)
    b1, b2, b_out = normal(Wd, s=0.1), normal(Wd, s=0.1), normal(Co, s=0.1)
    s1, s2, s_out = (np.exp(normal(n, s=0.1)) for n in (Wd, Wd, Co))
    h, acts = conditioner_forward(x, w_in, b1, s1, w_mid, b2, s2, w_out, b_out, s_out)
    g = conditioner_backward(normal(*h.shape), x, h, acts, w_in, s1, w_mid, s2, w_out, s_out)
    out[f"{dt.__name__}/h"] = h
    out.update({f"{dt.__name__}/{k}": v for k, v in g._asdict().items()})
np.savez(sys.argv[1], **out)
"""  # noqa: E501


def _run_cached(tmp_path: Path, cache: Path, name: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{name}.npz"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(out)], cwd=ROOT, env=env, check=True)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_kernels_give_the_same_bits_compiled_and_loaded_from_the_cache(tmp_path):
    """The first process compiles every kernel (empty cache), the second loads them: a
    kernel called from compiled code runs either its own code or its caller's copy, and both
    must compute the same bits (flownp._numba)."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    cold = _run_cached(tmp_path, cache, "cold")
    assert any(cache.rglob("*.nbi")), "the first process did not fill the cache"
    warm = _run_cached(tmp_path, cache, "warm")
    assert cold.keys() == warm.keys() and len(cold) == 22
    for k in cold:
        assert np.array_equal(cold[k], warm[k]), f"{k} differs between compiled and cached"


def _dispatchers(module) -> dict[str, object]:
    import numba.core.registry

    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, numba.core.registry.CPUDispatcher)
    }


def test_kernels_called_from_compiled_code_are_inlined_or_exact():
    """The rule of flownp._numba that keeps both copies of a called kernel equal: every
    kernel that another compiled kernel calls is inlined, or compiled without fast-math."""
    import importlib
    import pkgutil

    import flownp.kernels

    checked = 0
    for info in pkgutil.iter_modules(flownp.kernels.__path__):
        module = importlib.import_module(f"flownp.kernels.{info.name}")
        kernels = _dispatchers(module)
        for caller in kernels.values():
            for name in caller.py_func.__code__.co_names:
                if name in kernels:
                    opts = kernels[name].targetoptions
                    inlined = opts.get("inline") == "always"
                    assert inlined or not opts.get("fastmath"), (
                        f"flownp.kernels.{info.name}.{name} is called from compiled code: "
                        "inline it (jit_inline) or compile it without fast-math (jit_exact)"
                    )
                    checked += 1
    assert checked >= 10
