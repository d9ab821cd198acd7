"""Held-out bits/dim of a model on uint8 images (:func:`evaluate_bpd`)."""

from __future__ import annotations

import numpy as np

from flownp.data.pixels import dequantize
from flownp.model import FlowModel, bits_per_dim
from flownp.progress import Progress


def evaluate_bpd(
    model: FlowModel,
    images: np.ndarray,
    *,
    batch_size: int = 500,
    seed: int = 1234,
    progress: bool = False,
) -> float:
    """Mean bits/dim of uint8 ``images`` under ``model`` (dequantisation noise from a fixed
    ``seed``, so the number is reproducible). Returns NaN (never hides it) if any is NaN."""
    rng = np.random.default_rng(seed)
    total, n = 0.0, len(images)
    with Progress(n, desc="evaluate", unit="image", enabled=progress, lines=10) as bar:
        for start in range(0, n, batch_size):
            x = dequantize(images[start : start + batch_size], rng, model.dtype)
            z, logdet = model.forward(x)
            model.clear_cache()
            total += float(np.sum(bits_per_dim(z, logdet)))
            bar.update(len(x))
    return total / n
