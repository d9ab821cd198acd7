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
