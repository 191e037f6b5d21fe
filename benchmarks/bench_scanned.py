"""Scanned layer stacks: the toy decoder with scan_layers=True against the unrolled one.

Prints, for 4, 8 and 16 layers of the decoder of `Sizes` (default here: width 256, MLP
768, 4 heads of 64, vocab 4096, sequence 128, batch 4, rank 16 on every attention and
MLP projection; `--layers` is ignored):

- LoRA-step compile time (first call minus a steady step: tracing and compiling),
  scanned and unrolled, and how the scanned one grows from 4 to 16 layers;
- LoRA step time, scanned / unrolled (same depth, interleaved);
- LoRA step / full fine-tune step (adamw), scanned and unrolled;
- wrap time of the 16-layer scanned model / that of the 4-layer unrolled one.

Every step-time figure is the median (min, max) over rounds in which all variants of one
depth run once each, interleaved. Run: python benchmarks/bench_scanned.py [--smoke]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import jax
import optax
from _common import Sizes, block, interleaved, parse_sizes, ratio
from bench_training import train_step_fn
from flax import nnx

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder

#: This benchmark's default sizes (smaller than the others': 16 unrolled layers compile
#: slowly on a CPU).
DEFAULT = Sizes(width=256, mlp=768, heads=4, head_dim=64, vocab=4096, seq=128, rank=16, reps=7)


def decoder(sizes: Sizes, layers: int, scan: bool) -> TinyDecoder:
    cfg = DecoderConfig(
        vocab_size=sizes.vocab,
        num_layers=layers,
        embed_dim=sizes.width,
        num_heads=sizes.heads,
        head_dim=sizes.head_dim,
        mlp_dim=sizes.mlp,
        max_len=sizes.seq,
        scan_layers=scan,
    )
    return TinyDecoder(cfg, rngs=nnx.Rngs(0))


def wrapped(sizes: Sizes, layers: int, scan: bool) -> tuple[nnx_peft.PeftModel, float]:
    """The LoRA wrapper of a fresh decoder, and the seconds wrapping took."""
    base = decoder(sizes, layers, scan)
    block(nnx.state(base))
    start = time.perf_counter()
    model = nnx_peft.PeftModel(base, sizes.lora_config(), sizes.tokens()[:1, :-1], rngs=nnx.Rngs(1))
    block(nnx.state(model))
    return model, time.perf_counter() - start


def main() -> None:
    smoke = "--smoke" in sys.argv
    sizes = parse_sizes(__doc__.splitlines()[0])
    if not smoke:
        given = {f.name: getattr(sizes, f.name) for f in dataclasses.fields(Sizes)}
        defaults = {f.name: getattr(Sizes(), f.name) for f in dataclasses.fields(Sizes)}
        changed = {k: v for k, v in given.items() if v != defaults[k]}
        sizes = dataclasses.replace(DEFAULT, **changed)
    depths = (2, 4) if smoke else (4, 8, 16)
    print(f"sizes: {sizes} (layers: {depths})\ndevice: {jax.devices()[0].device_kind}")
    tokens = sizes.tokens()

    compile_s: dict[tuple[int, bool], float] = {}
    wrap_s: dict[tuple[int, bool], float] = {}
    rows = []
    for layers in depths:
        steps = {}
        for scan in (True, False):
            lora, wrap_s[(layers, scan)] = wrapped(sizes, layers, scan)
            lora_opt = lora.make_optimizer(optax.adamw(1e-4))
            lora_step = train_step_fn(lora.trainable_filter)
            full = decoder(sizes, layers, scan)
            full_opt = nnx.Optimizer(full, optax.adamw(1e-4), wrt=nnx.Param)
            full_step = train_step_fn(nnx.Param)
            start = time.perf_counter()
            block(lora_step(lora, lora_opt, tokens))
            first = time.perf_counter() - start
            start = time.perf_counter()
            block(lora_step(lora, lora_opt, tokens))
            compile_s[(layers, scan)] = first - (time.perf_counter() - start)
            name = "scan" if scan else "unrolled"
            steps[f"{name}_lora"] = lambda s=lora_step, m=lora, o=lora_opt: s(m, o, tokens)
            steps[f"{name}_full"] = lambda s=full_step, m=full, o=full_opt: s(m, o, tokens)
        times = interleaved(steps, sizes.reps)
        medians = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            (
                layers,
                compile_s[(layers, True)],
                compile_s[(layers, False)],
                medians["scan_lora"],
                medians["unrolled_lora"],
                ratio(times, "scan_lora", "unrolled_lora"),
                ratio(times, "scan_lora", "scan_full"),
                ratio(times, "unrolled_lora", "unrolled_full"),
            )
        )

    print(
        "\n| layers | LoRA-step compile, scanned | compile, unrolled | LoRA step, scanned | "
        "LoRA step, unrolled | scanned / unrolled step | LoRA / full step, scanned | "
        "LoRA / full step, unrolled |\n|---|---|---|---|---|---|---|---|"
    )
    for layers, cs, cu, ss, su, r, rs, ru in rows:
        print(
            f"| {layers} | {cs:.2f} s | {cu:.2f} s | {1e3 * ss:.1f} ms | {1e3 * su:.1f} ms "
            f"| {r} | {rs} | {ru} |"
        )
    low, high = depths[0], depths[-1]
    growth = compile_s[(high, True)] / compile_s[(low, True)]
    print(
        f"\n| figure | measured | target |\n|---|---|---|\n"
        f"| scanned LoRA-step compile time, {high} layers / {low} layers | {growth:.2f} "
        "| <= 1.3 |\n"
        f"| unrolled LoRA-step compile time, {high} layers / {low} layers | "
        f"{compile_s[(high, False)] / compile_s[(low, False)]:.2f} | - |\n"
        f"| wrap time, {high}-layer scanned / {low}-layer unrolled | "
        f"{wrap_s[(high, True)] / wrap_s[(low, False)]:.2f} ({wrap_s[(high, True)]:.2f} s / "
        f"{wrap_s[(low, False)]:.2f} s) | <= 1.0 |"
    )


if __name__ == "__main__":
    main()
