"""Adapter checkpoint bytes versus full-model checkpoint bytes.

For the quickstart-sized ``TinyDecoder`` (``DecoderConfig`` defaults, the
character vocabulary of the built-in texts) and for a 12-layer, 1024-wide
decoder, with LoRA rank 8 on every attention and MLP projection, prints the
bytes on disk of ``PeftModel.save_adapter`` and of an Orbax checkpoint of the
whole base model (every ``nnx.Param``, the same storage format), and their ratio.
The adapters get random values first, as trained ones have: freshly initialised
B factors are zeros, which Orbax's compression would make look free.

Usage::

    python benchmarks/bench_checkpoint.py          # both models (the large one: ~1.1 GB f32)
    python benchmarks/bench_checkpoint.py --smoke  # a 2-layer, 128-wide stand-in instead

Both checkpoints are written for real to a temporary directory and measured
there; nothing is estimated.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

import nnx_peft
from nnx_peft.toy import TEXT_A, TEXT_B, CharTokenizer, DecoderConfig, TinyDecoder

PROJECTIONS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CONFIG = nnx_peft.LoraConfig(rank=8, alpha=16.0, target=PROJECTIONS)


@dataclasses.dataclass(frozen=True)
class Result:
    """Sizes of one model's checkpoints."""

    name: str
    params: int
    adapter_params: int
    adapter_bytes: int
    full_bytes: int


def directory_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, cfg: DecoderConfig, workdir: Path) -> Result:
    """Builds the model, wraps it, writes both checkpoints and measures them."""
    base = TinyDecoder(cfg, rngs=nnx.Rngs(0))
    model = nnx_peft.PeftModel(base, CONFIG, jnp.zeros((1, 8), jnp.int32), rngs=nnx.Rngs(1))
    # Trained adapters are dense: fresh B factors are zeros and would compress to nothing.
    keys = iter(jax.random.split(jax.random.key(2), 10_000))
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx_peft.AdapterParam):
            value = variable.get_value()
            variable.set_value(0.02 * jax.random.normal(next(keys), value.shape, value.dtype))
    model.save_adapter(workdir / f"{name}-adapter")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(workdir / f"{name}-full", nnx.state(base, nnx.Param))
        checkpointer.wait_until_finished()
    summary = model.trainable_parameters()
    return Result(
        name=name,
        params=sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param))),
        adapter_params=summary.trainable,
        adapter_bytes=directory_bytes(workdir / f"{name}-adapter"),
        full_bytes=directory_bytes(workdir / f"{name}-full"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small stand-in for the large model")
    args = parser.parse_args()

    quickstart = DecoderConfig(vocab_size=CharTokenizer(TEXT_A, TEXT_B).vocab_size)
    if args.smoke:
        large_name = "decoder-2x128 (smoke)"
        large = DecoderConfig(
            vocab_size=1000, num_layers=2, embed_dim=128, num_heads=4, head_dim=32, mlp_dim=512
        )
    else:
        large_name = "decoder-12x1024"
        large = DecoderConfig(
            vocab_size=32000,
            num_layers=12,
            embed_dim=1024,
            num_heads=16,
            head_dim=64,
            mlp_dim=4096,
            max_len=2048,
        )

    header = (
        f"{'model':<24}{'params':>14}{'adapter params':>16}{'adapter bytes':>16}"
        f"{'full bytes':>16}{'adapter / full':>16}"
    )
    print(f"LoRA rank {CONFIG.rank} on {PROJECTIONS}, float32, Orbax on local disk")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in (("quickstart TinyDecoder", quickstart), (large_name, large)):
            start = time.perf_counter()
            r = measure(name.split()[0], cfg, Path(tmp))
            print(
                f"{name:<24}{r.params:>14,}{r.adapter_params:>16,}{r.adapter_bytes:>16,}"
                f"{r.full_bytes:>16,}{r.adapter_bytes / r.full_bytes:>16.5f}"
                f"   ({time.perf_counter() - start:.1f} s)"
            )


if __name__ == "__main__":
    main()
