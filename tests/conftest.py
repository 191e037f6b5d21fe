"""Shared pytest setup: Hypothesis profiles, and a fresh, printed seed in CI.

Profiles (``HYPOTHESIS_PROFILE=<name>``; no deadlines anywhere, since JAX compiles
on first use and CI machines are shared):

- ``fast`` (the default): 12 derandomized examples per property, the same every run,
  for quick local runs;
- ``ci`` (``.ci/run`` sets it): 16 examples per property from a fresh seed each run,
  so CI keeps meeting new cases. The seed is printed in the report header and the
  summary; ``--hypothesis-seed=<seed>`` reruns exactly those cases;
- ``thorough``: 200 exploring examples, for a long local run.
"""

from __future__ import annotations

import os
import secrets

import pytest
from hypothesis import HealthCheck, settings

_SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "fast", max_examples=12, deadline=None, derandomize=True, suppress_health_check=_SUPPRESSED
)
settings.register_profile(
    "ci", max_examples=16, deadline=None, derandomize=False, suppress_health_check=_SUPPRESSED
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=_SUPPRESSED
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fast")

# A script run by tests/test_multiprocess.py as a jax.distributed process, not a test module
# (importing it for --doctest-modules would start a job).
collect_ignore = ["multiprocess_worker.py"]
settings.load_profile(PROFILE)


@pytest.hookimpl(tryfirst=True)  # before Hypothesis' own plugin reads --hypothesis-seed
def pytest_configure(config: pytest.Config) -> None:
    if settings.default.derandomize:
        return
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(secrets.randbelow(2**32))


def _seed_line(config: pytest.Config) -> str | None:
    seed = config.getoption("hypothesis_seed", None)
    if settings.default.derandomize or seed is None:
        return None
    return (
        f"hypothesis profile {PROFILE!r}, seed {seed}: rerun these cases with "
        f"HYPOTHESIS_PROFILE={PROFILE} python -m pytest --hypothesis-seed={seed}"
    )


def pytest_report_header(config: pytest.Config) -> str | None:
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    line = _seed_line(terminalreporter.config)
    if line:
        terminalreporter.write_line(line)
