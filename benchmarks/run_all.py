"""Runs every benchmark, one process each, and prints their reports in order.

Run: python benchmarks/run_all.py [--smoke] [--reps N] [--layers N] ...
(size and repetition flags go to the benchmarks that take them; ``--smoke`` to all)

Each benchmark runs in its own process so that one's compiled functions and memory do
not disturb the next one's measurements. Exits non-zero if any benchmark fails.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

BENCHMARKS = (
    "bench_training.py",
    "bench_precision.py",
    "bench_merging.py",
    "bench_memory.py",
    "bench_checkpoint.py",
    "bench_scanned.py",
    "bench_multi_adapter.py",
)
#: The benchmarks that parse ``_common.Sizes`` flags; the others take ``--smoke`` only.
SIZED = {
    "bench_training.py",
    "bench_precision.py",
    "bench_merging.py",
    "bench_memory.py",
    "bench_scanned.py",
    "bench_multi_adapter.py",
}


def main() -> int:
    here = pathlib.Path(__file__).parent
    failed = []
    for name in BENCHMARKS:
        args = sys.argv[1:] if name in SIZED else [a for a in sys.argv[1:] if a == "--smoke"]
        print(f"\n===== {name} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(here / name), *args]).returncode:
            failed.append(name)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
