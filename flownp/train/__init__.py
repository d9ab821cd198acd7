r"""Training: a multi-scale flow trained by Adam (or Adamax) on dequantised images, with
checkpoints.

The recipe (openai/glow lineage, ``docs/training.md``)::

    x      = u / 256 - 0.5 + U(0, 1/256)            u in {0..255}: uniform dequantisation
    log p  = sum_i log N(z_i; 0, 1) + logdet(x)     (z, logdet) = model.forward(x)
    bpd    = (-log p(x) + D ln 256) / (D ln 2)      bits per dimension, D = H * W * C
    loss   = mean over the batch of bpd             (flownp.model.bpd_loss)

The package, one job per module (imports point down this list)::

    config.py       TrainConfig (the hyper-parameters), TrainResult
    data_stream.py  load_data; the data order and dequantisation noise (DataStream, Batch)
    evaluation.py   evaluate_bpd: held-out bits/dim
    step.py         one step: (a) batch_gradients, (b) StepRule (update, reject, blow-up rule)
    metrics.py      the metrics tables and metrics.csv
    run_folder.py   the run folder (RunFolder), its save policy, signals, TrainingDiverged /
                    TrainingInterrupted
    observers.py    checkpoint-time measurements: inverse stability, digit share
    loop.py         Trainer: the loop that calls them in order

A step whose loss or gradient is NaN/Inf, or whose loss is far above its recent level (a
*blow-up*), is *rejected* (the update is not applied); after ``max_bad_steps`` bad steps in a row
training stops with :class:`TrainingDiverged` and the run folder keeps its last usable
checkpoint. SIGINT / SIGTERM finish the step, save and raise :class:`TrainingInterrupted`.

Exact resume: the checkpoint holds the dequantisation RNG state and the data position, so a
resumed run computes the same losses as an uninterrupted one (same machine and thread count).
"""

from flownp.model import LN2, LN256, bits_per_dim, bpd_loss
from flownp.train.config import TrainConfig, TrainResult
from flownp.train.data_stream import Batch, DataStream, load_data
from flownp.train.evaluation import evaluate_bpd
from flownp.train.loop import Trainer
from flownp.train.metrics import DIGITS_COLUMNS, EVAL_COLUMNS, STABILITY_COLUMNS, TRAIN_COLUMNS
from flownp.train.run_folder import (
    CHECK_IMAGES,
    RunFolder,
    TrainingDiverged,
    TrainingInterrupted,
    check_run_folder,
)
from flownp.train.step import (
    BLOWUP_MARGIN,
    BLOWUP_MIN_HISTORY,
    BLOWUP_WINDOW,
    BatchGradients,
    LossMonitor,
    StepRecord,
    StepRule,
    batch_gradients,
)

__all__ = [
    "BLOWUP_MARGIN",
    "BLOWUP_MIN_HISTORY",
    "BLOWUP_WINDOW",
    "CHECK_IMAGES",
    "DIGITS_COLUMNS",
    "EVAL_COLUMNS",
    "LN2",
    "LN256",
    "STABILITY_COLUMNS",
    "TRAIN_COLUMNS",
    "Batch",
    "BatchGradients",
    "DataStream",
    "LossMonitor",
    "RunFolder",
    "StepRecord",
    "StepRule",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "batch_gradients",
    "bits_per_dim",
    "bpd_loss",
    "check_run_folder",
    "evaluate_bpd",
    "load_data",
]
