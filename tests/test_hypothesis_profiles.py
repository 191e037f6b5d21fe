"""The CI Hypothesis profile explores: a fresh seed each run, printed, and reproducible.

Each check runs pytest in a subprocess on a one-property file that records what
Hypothesis drew, with this suite's ``conftest.py`` loaded as a plugin.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROPERTY = """
import os
from hypothesis import given, strategies as st

@given(st.integers(0, 2**62))
def test_draws(n):
    with open(os.environ["DRAWN"], "a") as f:
        f.write(f"{n}\\n")
"""


def _run(tmp_path: Path, name: str, profile: str, *args: str) -> tuple[str, list[str]]:
    test = tmp_path / "test_property.py"
    test.write_text(_PROPERTY)
    drawn = tmp_path / f"{name}.txt"
    env = {**os.environ, "HYPOTHESIS_PROFILE": profile, "DRAWN": str(drawn)}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            f"--rootdir={tmp_path}",
            str(test),
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, drawn.read_text().split()


def test_ci_profile_draws_new_cases_each_run_and_reruns_a_printed_seed(tmp_path: Path) -> None:
    first, drawn_first = _run(tmp_path, "first", "ci")
    second, drawn_second = _run(tmp_path, "second", "ci")
    seeds = [re.findall(r"--hypothesis-seed=(\d+)", out) for out in (first, second)]
    assert all(seeds), (first, second)  # printed
    assert seeds[0][0] != seeds[1][0]
    assert len(drawn_first) >= 16  # more than the fast profile, from new seeds each run
    assert set(drawn_first) != set(drawn_second)  # new cases
    _, rerun = _run(tmp_path, "rerun", "ci", f"--hypothesis-seed={seeds[0][0]}")
    assert rerun == drawn_first  # the same cases, in the same order


def test_fast_profile_is_derandomized(tmp_path: Path) -> None:
    out, drawn_first = _run(tmp_path, "first", "fast")
    _, drawn_second = _run(tmp_path, "second", "fast")
    assert drawn_first == drawn_second
    assert "--hypothesis-seed" not in out
