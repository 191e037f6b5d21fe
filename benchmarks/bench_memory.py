"""Peak host memory while wrapping: does PeftModel copy the base weights?

Builds a decoder (default 12 layers, width 1024), then wraps it with LoRA rank 16 on every
attention and MLP projection, and prints

    (peak resident memory during the wrap - resident memory before the base existed)
    / (base weight bytes + adapter bytes)

1.0 means the wrap added nothing but the adapters. Peak resident memory is read from
Linux's VmHWM after resetting it (/proc/self/clear_refs), so this needs Linux. On CPU, JAX
arrays live in host memory, so this is the memory of the weights themselves.

Then QLoRA (nf4) of the same decoder saved to disk as float32 (an Orbax checkpoint of
``nnx.state(base)``), two ways, each in a fresh process so that peaks do not mix:

- ``from_base_weights``: ``PeftModel.from_base_weights``, which never builds the float base
  and quantizes each weight as it is read;
- ``eager``: restore the float base from the checkpoint, then ``PeftModel(base, ...)``.

and prints, for each, peak resident memory (above the process's resident memory once JAX
is warm) / (wrapped base bytes + adapter bytes + the largest float weight), where the
wrapped base bytes are the quantized weights plus the weights left in float (embeddings,
norms, head), as their arrays occupy memory (``on_device_size_in_bytes``), and its wall
time (from before the checkpoint is opened until the wrapper's arrays are ready).

Run: python benchmarks/bench_memory.py [--smoke] [--layers N --width N ...]
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from _common import nbytes, parse_sizes
from flax import nnx

import nnx_peft
from nnx_peft._base_weights import _release_freed_heap


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _settle() -> None:
    """Frees what the warm-up left and returns the freed heap to the OS (glibc), so the
    resident memory measured next starts from what is in use: otherwise a path that
    returns heap to the OS (``from_base_weights`` does) would read below its baseline."""
    gc.collect()
    _release_freed_heap()


def _device_bytes(tree: object) -> int:
    return sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(tree))


def qlora_child(mode: str, folder: str, sizes_json: str) -> None:
    """One QLoRA wrap of the saved base, ``mode`` 'from_base_weights' or 'eager'; prints JSON."""
    from _common import Sizes

    sizes = Sizes(**json.loads(sizes_json))
    config = sizes.lora_config(weight_qtype="nf4")
    sample = jax.ShapeDtypeStruct((1, 16), jax.numpy.int32)
    # Warm up JAX's runtime and both paths' operations on a one-layer model.
    tiny = dataclasses.replace(sizes, layers=1)
    nnx_peft.PeftModel(tiny.decoder(), config, sample, rngs=nnx.Rngs(0))
    _settle()
    before = _status_kib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if mode == "from_base_weights":
        model = nnx_peft.PeftModel.from_base_weights(
            sizes.decoder, f"{folder}/base", config, sample, rngs=nnx.Rngs(1)
        )
    else:
        abstract = nnx.eval_shape(sizes.decoder)
        with ocp.StandardCheckpointer() as reader:
            state = reader.restore(f"{folder}/base", nnx.state(abstract))
        base = nnx.merge(nnx.graphdef(abstract), state)
        model = nnx_peft.PeftModel(base, config, sample, rngs=nnx.Rngs(1))
        del base, state
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    adapters = nnx.state(model, model.trainable_filter)
    frozen = nnx.state(model, nnx.Not(model.trainable_filter))
    largest = max(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract_base(sizes)))
    )
    print(
        json.dumps(
            {
                "peak": (peak - before) * 1024,
                "base": _device_bytes(frozen),
                "adapters": _device_bytes(adapters),
                "largest": largest,
                "seconds": seconds,
            }
        )
    )


def abstract_base(sizes: object) -> nnx.Module:
    return nnx.eval_shape(sizes.decoder)  # type: ignore[attr-defined]


def qlora(sizes: object) -> None:
    """Saves the float32 base (in a child process), then measures both QLoRA paths."""
    here = pathlib.Path(__file__)
    sizes_json = json.dumps(dataclasses.asdict(sizes))  # type: ignore[call-overload]
    with tempfile.TemporaryDirectory() as folder:
        save = (
            "import sys, json; sys.path.insert(0, sys.argv[1]); import orbax.checkpoint as ocp; "
            "from flax import nnx; from _common import Sizes; "
            "s = Sizes(**json.loads(sys.argv[3])); "
            "w = ocp.StandardCheckpointer(); "
            "w.save(sys.argv[2] + '/base', nnx.state(s.decoder())); w.wait_until_finished()"
        )
        subprocess.run(
            [sys.executable, "-c", save, str(here.parent), folder, sizes_json], check=True
        )
        results = {}
        for mode in ("from_base_weights", "eager"):
            out = subprocess.run(
                [sys.executable, str(here), "--qlora-child", mode, folder, sizes_json],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
    first = results["from_base_weights"]
    print(
        f"QLoRA nf4: wrapped base {first['base'] / 2**20:.1f} MiB, adapters "
        f"{first['adapters'] / 2**20:.1f} MiB, largest float weight "
        f"{first['largest'] / 2**20:.1f} MiB"
    )
    for mode, target in (("from_base_weights", "<= 1.3"), ("eager", "report (about 1 + 8x nf4)")):
        r = results[mode]
        ratio = r["peak"] / (r["base"] + r["adapters"] + r["largest"])
        print(
            f"| QLoRA nf4 via {mode}: peak memory / (wrapped base + adapters + largest float "
            f"weight) | {ratio:.3f} ({r['peak'] / 2**20:.0f} MiB) | {target} |"
        )
        print(f"| QLoRA nf4 via {mode}: wall time | {r['seconds']:.2f} s | report |")


def main() -> None:
    if sys.argv[1:2] == ["--qlora-child"]:
        qlora_child(*sys.argv[2:5])
        return
    sizes = parse_sizes(__doc__.splitlines()[0])
    if not any(flag in sys.argv for flag in ("--smoke", "--layers", "--width")):
        sizes = dataclasses.replace(sizes, layers=12, width=1024, mlp=3072, heads=16)
    print(f"sizes: {sizes}")
    sample = sizes.tokens()[:1, :16]

    # Warm up: JAX's runtime and the eager operations of a wrap, on a tiny model.
    tiny = dataclasses.replace(sizes, layers=1)
    nnx_peft.PeftModel(tiny.decoder(), tiny.lora_config(), sample, rngs=nnx.Rngs(0))
    _settle()

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
    del model, base
    gc.collect()
    qlora(sizes)


if __name__ == "__main__":
    main()
