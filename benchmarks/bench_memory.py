"""Peak host memory while wrapping: does PeftModel copy the base weights?

Builds a decoder (default 12 layers, width 1024), then wraps it with LoRA rank 16 on every
attention and MLP projection, and prints

    (peak resident memory during the wrap - resident memory before the base existed)
    / (base weight bytes + adapter bytes)

1.0 means the wrap added nothing but the adapters. Peak resident memory is read from
Linux's VmHWM after resetting it (/proc/self/clear_refs), so this needs Linux. On CPU, JAX
arrays live in host memory, so this is the memory of the weights themselves.

Run: python benchmarks/bench_memory.py [--smoke] [--layers N --width N ...]
"""

from __future__ import annotations

import dataclasses
import gc
import pathlib

import jax
from _common import nbytes, parse_sizes
from flax import nnx

import nnx_peft


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def main() -> None:
    sizes = parse_sizes(__doc__.splitlines()[0])
    if not any(flag in __import__("sys").argv for flag in ("--smoke", "--layers", "--width")):
        sizes = dataclasses.replace(sizes, layers=12, width=1024, mlp=3072, heads=16)
    print(f"sizes: {sizes}")
    sample = sizes.tokens()[:1, :16]

    # Warm up: JAX's runtime and the eager operations of a wrap, on a tiny model.
    tiny = dataclasses.replace(sizes, layers=1)
    nnx_peft.PeftModel(tiny.decoder(), tiny.lora_config(), sample, rngs=nnx.Rngs(0))
    gc.collect()

    before = _status_kib("VmRSS")
    base = sizes.decoder()
    jax.block_until_ready(nnx.state(base))
    base_bytes = nbytes(nnx.state(base))
    after_base = _status_kib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    model = nnx_peft.PeftModel(base, sizes.lora_config(), sample, rngs=nnx.Rngs(1))
    jax.block_until_ready(nnx.state(model))
    peak = _status_kib("VmHWM")
    adapter_bytes = nbytes(nnx.state(model, model.trainable_filter))

    expected = base_bytes + adapter_bytes
    print(f"base weights: {base_bytes / 2**20:.1f} MiB, adapters: {adapter_bytes / 2**20:.1f} MiB")
    print(f"resident growth from building the base: {(after_base - before) / 2**10:.1f} MiB")
    print(f"peak growth while wrapping, on top of that: {(peak - after_base) / 2**10:.1f} MiB")
    print(
        f"| peak memory while wrapping / (base bytes + adapter bytes) | "
        f"{(peak - before) * 1024 / expected:.3f} | <= 1.1 |"
    )


if __name__ == "__main__":
    main()
