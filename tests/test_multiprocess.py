"""A ``jax.distributed`` job of two processes (two CPU devices each) over localhost.

Checked here, against one process with four devices on the same ``(2, 2)`` mesh:
- wrapping, ``make_optimizer`` and training give the same losses and adapters;
- ``save_adapter``, ``save_training_checkpoint``, their restores, ``from_pretrained``,
  ``merge_and_unload``, ``merge_adapter``, the safetensors export and ``shard_adapters``
  all complete on both processes (a hang fails the test at its timeout, not CI) and
  give the right values;
- one process restores the two-process checkpoint bit for bit.

The workers are ``tests/multiprocess_worker.py``; each reports JSON on its last line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "multiprocess_worker.py"
TIMEOUT = 480  # seconds for every process of one run; a hang fails the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(num_processes: int, devices: int, workdir: Path, *flags: str) -> list[dict[str, Any]]:
    port = _free_port()
    # A worker still running a minute before the timeout dumps every thread's stack.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NNX_PEFT_WORKER_DUMP_AFTER": str(TIMEOUT - 60)}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(i),
                str(num_processes),
                str(port),
                str(devices),
                str(workdir),
                *flags,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err[-4000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        # Each worker's progress log, and the stacks it dumped before the timeout.
        logs = "\n".join(
            f"-- worker {i}:\n{p.communicate()[1][-3000:]}" for i, p in enumerate(procs)
        )
        pytest.fail(f"a worker of the {num_processes}-process job hung for {TIMEOUT} s\n{logs}")
    finally:
        for proc in procs:
            proc.kill()
    return reports


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    two = tmp_path_factory.mktemp("two_processes")
    one = tmp_path_factory.mktemp("one_process")
    return {
        "two": _run(2, 2, two),
        "one": _run(1, 4, one)[0],
        "restored": _run(1, 4, two, "--restore")[0],
    }


def test_two_processes_train_like_one_process_with_four_devices(runs: dict[str, Any]) -> None:
    first, second = runs["two"]
    assert first["losses"] == second["losses"]  # identical on both processes
    np.testing.assert_allclose(first["losses"], runs["one"]["losses"], rtol=1e-5)
    for path, values in runs["one"]["adapters"].items():
        np.testing.assert_allclose(first["adapters"][path], values, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("process", [0, 1])
def test_every_call_completes_multi_process_with_the_right_values(
    runs: dict[str, Any], process: int
) -> None:
    report = runs["two"][process]
    assert report["loaded_equal"] and report["restored_equal"]
    assert report["restored_step"] == 3
    assert report["merged_error"] < 1e-5 and report["merged_in_place_error"] < 1e-5
    assert report["safetensors_equal"] and report["sharded_equal"]


def test_one_process_restores_the_two_process_checkpoint(runs: dict[str, Any]) -> None:
    saved, restored = runs["two"][0], runs["restored"]
    assert restored["adapters"] == saved["adapters"]  # bit for bit (from_pretrained)
    assert restored["restored_adapters"] == saved["adapters"]
    assert restored["restored_step"] == 3 and restored["optimizer_step"] == 3
