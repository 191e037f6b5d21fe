"""Shared pytest setup: Hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (the default) keeps property tests bounded and
without deadlines, since JAX compiles on first use and CI machines are shared;
``HYPOTHESIS_PROFILE=thorough`` explores more examples locally.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
