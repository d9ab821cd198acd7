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
