"""bfloat16 training cost of nnx_peft LoRA, as ratios measured side by side.

Prints, for the decoder of `Sizes` in bfloat16 (weights and compute; default: 4 layers,
width 512, MLP 1536, 8 heads of 64, vocab 8192, sequence 256, batch 4, rank 16 on every
attention and MLP projection):

- bf16 LoRA train step (float32 adapters, the default) / bf16 full fine-tune step;
- bf16 LoRA train step (bfloat16 adapters, ``adapter_dtype=None``) / bf16 full step;
- optimizer state bytes of the two LoRA variants (adamw), float32 / bfloat16 adapters.

Every timing figure is the median (min, max) over rounds in which all variants run
once each, interleaved. Run: python benchmarks/bench_precision.py [--smoke] [--reps N]
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from _common import interleaved, nbytes, parse_sizes, ratio
from bench_training import train_step_fn
from flax import nnx

import nnx_peft


def main() -> None:
    sizes = parse_sizes(__doc__.splitlines()[0])
    print(f"sizes: {sizes}")
    tokens = sizes.tokens()
    sample = tokens[:1, :-1]

    full = sizes.decoder(dtype=jnp.bfloat16)
    full_opt = nnx.Optimizer(full, optax.adamw(1e-4), wrt=nnx.Param)
    lora32 = nnx_peft.PeftModel(
        sizes.decoder(dtype=jnp.bfloat16), sizes.lora_config(), sample, rngs=nnx.Rngs(1)
    )
    lora16 = nnx_peft.PeftModel(
        sizes.decoder(dtype=jnp.bfloat16),
        sizes.lora_config(adapter_dtype=None),
        sample,
        rngs=nnx.Rngs(1),
    )
    opt32 = lora32.make_optimizer(optax.adamw(1e-4))
    opt16 = lora16.make_optimizer(optax.adamw(1e-4))
    full_step = train_step_fn(nnx.Param)
    lora_step = train_step_fn(nnx_peft.AdapterParam)

    times = interleaved(
        {
            "full": lambda: full_step(full, full_opt, tokens),
            "lora32": lambda: lora_step(lora32, opt32, tokens),
            "lora16": lambda: lora_step(lora16, opt16, tokens),
        },
        sizes.reps,
    )
    state32 = nbytes(nnx.state(opt32, nnx.OptVariable))
    state16 = nbytes(nnx.state(opt16, nnx.OptVariable))

    print("\n| figure | measured | target |\n|---|---|---|")
    print(
        "| bf16 LoRA step (float32 adapters) / bf16 full fine-tune step | "
        f"{ratio(times, 'lora32', 'full')} | report |"
    )
    print(
        "| bf16 LoRA step (bfloat16 adapters) / bf16 full fine-tune step | "
        f"{ratio(times, 'lora16', 'full')} | report |"
    )
    print(
        "| optimizer state bytes, float32 / bfloat16 adapters (adamw) | "
        f"{state32 / state16:.3f} | about 2 |"
    )


if __name__ == "__main__":
    main()
