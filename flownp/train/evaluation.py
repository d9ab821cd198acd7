"""Held-out bits/dim of a model on uint8 images (:func:`evaluate_bpd`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flownp.data.pixels import dequantize
from flownp.errors import NonFiniteError, SingularKernelError
from flownp.model import FlowModel, bits_per_dim
from flownp.progress import Progress


def evaluate_bpd(
    model: FlowModel,
    images: np.ndarray,
    *,
    batch_size: int = 500,
    seed: int = 1234,
    progress: bool = False,
    comm: Any = None,
) -> float:
    """Mean bits/dim of uint8 ``images`` under ``model`` (dequantisation noise from a fixed
    ``seed``, so the number is reproducible). Returns NaN (never hides it) if any is NaN.

    ``comm`` (a :mod:`flownp.distributed` communicator): every process draws the noise of
    each whole batch and evaluates its share of it; one all-reduce of the sum (and of a
    failure flag) at the end gives every process the same mean. A layer error on one process
    (a NaN inside, a singular kernel) is raised on every process."""
    from flownp.distributed import collective, share

    size, rank = (1, 0) if comm is None else (comm.size, comm.rank)
    rng = np.random.default_rng(seed)
    total, n = 0.0, len(images)
    error: BaseException | None = None
    with Progress(n, desc="evaluate", unit="image", enabled=progress, lines=10) as bar:
        for start in range(0, n, batch_size):
            x = dequantize(images[start : start + batch_size], rng, model.dtype)
            mine = x[share(len(x), rank, size)] if size > 1 else x
            if len(mine) and error is None:
                try:
                    z, logdet = model.forward(mine)
                except (NonFiniteError, FloatingPointError, SingularKernelError) as exc:
                    if size == 1:
                        raise
                    model.clear_cache()
                    error = exc  # the others must still meet this process at the reduction
                else:
                    model.clear_cache()
                    total += float(np.sum(bits_per_dim(z, logdet)))
            bar.update(len(x))
    if size > 1:
        sums = comm.allreduce_sum(np.array([total, float(error is not None)]))
        if sums[1]:
            if error is not None:
                raise collective(error)
            raise collective(NonFiniteError(f"evaluation failed on {int(sums[1])} process(es)"))
        total = float(sums[0])
    return total / n
