"""Shared test configuration.

Hypothesis: no deadline (the first call of a Numba kernel compiles), a bounded number of
examples so the whole suite stays within minutes on two cores. ``HYPOTHESIS_PROFILE=thorough``
runs many more examples.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def serve_dataset(monkeypatch):
    """``serve(data)``: the commands and trainers under test load ``data`` whatever dataset
    they are given (``flownp.train.data_stream.load_data`` patched); returns ``data``."""
    from flownp.train import data_stream

    def serve(data):
        monkeypatch.setattr(data_stream, "load_data", lambda spec, holdout=None: data)
        return data

    return serve


@pytest.fixture
def fake_dataset(request, serve_dataset):
    """The requesting test module's ``make_data()``, served as every dataset."""
    return serve_dataset(request.module.make_data())
