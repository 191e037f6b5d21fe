"""Shared pieces of the benchmarks: the model under test, timing, and reporting."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder

#: LoRA targets: every attention and MLP projection of TinyDecoder.
TARGET = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Model and batch sizes of a benchmark run."""

    layers: int = 4
    width: int = 512
    mlp: int = 1536
    heads: int = 8
    head_dim: int = 64
    vocab: int = 8192
    seq: int = 256
    batch: int = 4
    rank: int = 16
    reps: int = 21

    def decoder(self, *, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> TinyDecoder:
        cfg = DecoderConfig(
            vocab_size=self.vocab,
            num_layers=self.layers,
            embed_dim=self.width,
            num_heads=self.heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp,
            max_len=self.seq,
            dtype=dtype,
        )
        return TinyDecoder(cfg, rngs=nnx.Rngs(seed))

    def tokens(self, seed: int = 0) -> jax.Array:
        return jax.random.randint(jax.random.key(seed), (self.batch, self.seq), 0, self.vocab)

    def lora_config(self, **kwargs: object) -> nnx_peft.LoraConfig:
        return nnx_peft.LoraConfig(rank=self.rank, alpha=2.0 * self.rank, target=TARGET, **kwargs)


SMOKE = Sizes(
    layers=1, width=32, mlp=64, heads=2, head_dim=16, vocab=64, seq=16, batch=2, rank=4, reps=2
)


def parse_sizes(description: str) -> Sizes:
    """Command-line sizes: ``--smoke`` for tiny ones, or individual overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    for field in dataclasses.fields(Sizes):
        parser.add_argument(f"--{field.name}", type=int, default=None)
    args = parser.parse_args()
    base = SMOKE if args.smoke else Sizes()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def block(tree: object) -> None:
    """Waits for every array in ``tree``."""
    jax.tree.map(lambda x: x.block_until_ready() if isinstance(x, jax.Array) else x, tree)


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Times each function once per round, rounds interleaved (after one warm-up round)."""
    for fn in fns.values():
        block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    """Median (min, max) of the per-round ratio ``num / den``."""
    values = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return f"{statistics.median(values):.3f} ({min(values):.3f}, {max(values):.3f})"


def nbytes(tree: object, *, logical: bool = True) -> int:
    """Bytes of the arrays in ``tree``; ``logical`` counts sub-byte dtypes at their bit width."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        bits = jax.dtypes.itemsize_bits(leaf.dtype) if logical else 8 * leaf.dtype.itemsize
        total += leaf.size * bits // 8
    return total
