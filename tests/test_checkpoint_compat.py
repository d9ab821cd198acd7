"""A checkpoint written before class-conditional models, n-bit data and the latent classifier
existed (tests/data/checkpoint_before_classes.h5: a 3-step run of a tiny model on the
rectangles test data, with the outputs that code computed in the .npz beside it) still loads,
computes the same numbers and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from flownp import train as T
from flownp.checkpoint import load_model, read_checkpoint
from flownp.testing import rectangles_dataset

DATA = Path(__file__).resolve().parent / "data"
OLD = DATA / "checkpoint_before_classes.h5"


def test_old_checkpoint_loads_as_an_unconditional_8_bit_model():
    ckpt = read_checkpoint(OLD)
    assert not {"num_classes", "weight_y", "n_bits"} & set(ckpt.model_config)  # really old
    model = load_model(OLD)
    cfg = model.config
    assert (cfg.num_classes, cfg.weight_y, cfg.n_bits) == (0, 0.0, 8)
    assert model.classifier is None and "prior/label_mean" not in model.params
    ref = np.load(DATA / "checkpoint_before_classes.npz")
    z, logdet = model.forward(ref["x"])
    model.clear_cache()
    np.testing.assert_allclose(z, ref["z"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(logdet, ref["logdet"], rtol=1e-13)
    np.testing.assert_allclose(model.sample(2, 0.7, seed=1), ref["sample"], rtol=0, atol=1e-12)
    data = rectangles_dataset(96, 32, 0, (8, 8, 1))
    bpd = T.evaluate_bpd(model, data.test)
    assert abs(bpd - float(ref["heldout_bpd"])) < 1e-12


def test_old_checkpoint_resumes(tmp_path):
    path = tmp_path / "checkpoint.h5"
    shutil.copy(OLD, path)
    data = rectangles_dataset(96, 32, 0, (8, 8, 1))
    tr = T.Trainer.from_checkpoint(path, data, steps=4, log=lambda m: None)
    assert tr.step == 3
    result = tr.run()
    assert result.steps == 4 and np.isfinite(result.heldout_bpd)
    assert read_checkpoint(path).model_config["num_classes"] == 0  # re-saved with the fields
