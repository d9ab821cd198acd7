"""The metrics tables of a run: ``{table: {column: [float, ...]}}``, saved in the checkpoint
(``metrics/<table>/<column>``) and shown as ``metrics.csv`` and ``loss_curve.png``.

====================  ============================================================  ========
table                 columns                                                        rows
====================  ============================================================  ========
``train``             :data:`TRAIN_COLUMNS`                                          a step
``eval``              :data:`EVAL_COLUMNS`                                           an evaluation
``stability``         :data:`STABILITY_COLUMNS` (:mod:`flownp.train.observers`)     a checkpoint
``digits``            :data:`DIGITS_COLUMNS` (:mod:`flownp.train.observers`)        the end
``classifier``        :data:`CLASSIFIER_COLUMNS` (models with ``weight_y > 0``)      a step
``classes``           :data:`CLASSES_COLUMNS` (class-conditional models)             an evaluation
``digits_requested``  :data:`flownp.digits.REQUESTED_COLUMNS` (class-conditional     the end
                      digit models)
====================  ============================================================  ========

The last three stay empty for the models they do not concern (and in older checkpoints).
In ``train``, ``bpd`` is the training loss: bits/dim, plus ``weight_y`` times the classifier's
cross-entropy in bits for a model with a classifier (whose parts are in ``classifier``).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Mapping
from pathlib import Path

from flownp.digits import REQUESTED_COLUMNS
from flownp.errors import WriteError

Metrics = dict[str, dict[str, list[float]]]

TRAIN_COLUMNS = ("step", "epoch", "bpd", "lr", "grad_norm", "rejected", "images_per_s", "elapsed")
EVAL_COLUMNS = ("step", "bpd", "elapsed")
STABILITY_COLUMNS = (
    "step",
    "roundtrip_f32",
    "roundtrip_f64",
    "max_layer_roundtrip_f32",
    "max_norm_inf",
    "max_growth",
    "max_block_ratio",
    "layers_not_ok",
)
# the end-of-training digit-classifier report of MNIST-shaped models (flownp.digits)
DIGITS_COLUMNS = ("step", "temperature", "samples", "share", "real_share")
# a model with a classifier: the parts of the loss of each step (bits/dim, cross-entropy in
# bits, misclassified share of the batch)
CLASSIFIER_COLUMNS = ("step", "bits_x", "bits_y", "error")
# a class-conditional model at each evaluation: the generative classifier's accuracy and the
# linear classifier's (NaN without one), on the evaluated held-out images
CLASSES_COLUMNS = ("step", "accuracy", "classifier_accuracy")
TABLES = {
    "train": TRAIN_COLUMNS,
    "eval": EVAL_COLUMNS,
    "stability": STABILITY_COLUMNS,
    "digits": DIGITS_COLUMNS,
    "classifier": CLASSIFIER_COLUMNS,
    "classes": CLASSES_COLUMNS,
    "digits_requested": REQUESTED_COLUMNS,
}


def empty_metrics() -> Metrics:
    return {table: {c: [] for c in cols} for table, cols in TABLES.items()}


def append_row(metrics: Metrics, table: str, row: Mapping[str, float]) -> None:
    """Append ``row`` (a value for every column of ``table``) to ``metrics[table]``."""
    cols = metrics[table]
    for c in cols:
        cols[c].append(float(row[c]))


def write_metrics_csv(metrics: Metrics, path: str | os.PathLike) -> Path:
    """One row per step: the train columns and ``heldout_bpd`` where evaluated (atomic)."""
    path = Path(path)
    tr, ev = metrics["train"], metrics["eval"]
    held = {int(s): b for s, b in zip(ev["step"], ev["bpd"], strict=True)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(list(TRAIN_COLUMNS) + ["heldout_bpd"])
            for i in range(len(tr["step"])):
                step = int(tr["step"][i])
                row = [step, int(tr["epoch"][i])]
                row += [repr(tr[c][i]) for c in TRAIN_COLUMNS[2:]]
                w.writerow(row + [repr(held[step]) if step in held else ""])
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
