"""Training and forward cost of nnx_peft LoRA, as ratios measured side by side.

Prints, for the decoder of `Sizes` (default: 4 layers, width 512, MLP 1536, 8 heads of
64, vocab 8192, sequence 256, batch 4, rank 16 on every attention and MLP projection):

- LoRA train step / full fine-tune step (adamw, same model);
- frozen-backward step / full fine-tune step: a step whose backward pass goes through
  every (frozen) layer but computes no weight gradient (only the position embedding,
  at the model's input, trains), the floor under any adapter method on this machine;
- LoRA train step / frozen-backward step: what the adapters themselves cost;
- nnx_peft LoRA step / hand-written Qwix LoRA step;
- DoRA train step / LoRA train step (same targets and rank; HF PEFT's DoRA is about 2x);
- adapted (unmerged) forward / base forward;
- optimizer state bytes / trainable bytes (adamw);
- QLoRA nf4 base-weight bytes / float32 base-weight bytes (adapted weights);
- wrap time / (compile + one run of the jitted forward).

Every timing figure is the median (min, max) over rounds in which all variants run
once each, interleaved. Run: python benchmarks/bench_training.py [--smoke] [--reps N]
"""

from __future__ import annotations

import time

import jax
import optax
import qwix
from _common import TARGET, block, interleaved, nbytes, parse_sizes, ratio
from flax import nnx

import nnx_peft
from nnx_peft.toy import next_token_loss


def train_step_fn(wrt: nnx.filterlib.Filter):
    """A jitted adamw step differentiating the model w.r.t. ``wrt`` only."""

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            return next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    return step


def main() -> None:
    sizes = parse_sizes(__doc__.splitlines()[0])
    print(f"sizes: {sizes}\ndevice: {jax.devices()[0].device_kind}")
    tokens = sizes.tokens()
    sample = tokens[:1, :-1]

    full = sizes.decoder()
    full_opt = nnx.Optimizer(full, optax.adamw(1e-4), wrt=nnx.Param)

    start = time.perf_counter()
    lora = nnx_peft.PeftModel(sizes.decoder(), sizes.lora_config(), sample, rngs=nnx.Rngs(1))
    block(nnx.state(lora))
    wrap_time = time.perf_counter() - start
    lora_opt = lora.make_optimizer(optax.adamw(1e-4))
    dora = nnx_peft.PeftModel(
        sizes.decoder(), sizes.lora_config(use_dora=True), sample, rngs=nnx.Rngs(1)
    )
    dora_opt = dora.make_optimizer(optax.adamw(1e-4))

    by_hand = qwix.apply_lora_to_model(
        sizes.decoder(),
        qwix.LoraProvider(module_path=TARGET, rank=sizes.rank, alpha=2.0 * sizes.rank),
        sample,
        rngs=nnx.Rngs(1),
    )
    by_hand_opt = nnx.Optimizer(by_hand, optax.adamw(1e-4), wrt=nnx.LoRAParam)

    frozen = sizes.decoder()
    input_only = nnx.PathContains("pos_embed")
    frozen_opt = nnx.Optimizer(frozen, optax.adamw(1e-4), wrt=input_only)

    full_step = train_step_fn(nnx.Param)
    frozen_step = train_step_fn(input_only)
    lora_step = train_step_fn(lora.trainable_filter)
    hand_step = train_step_fn(nnx.LoRAParam)
    dora_step = train_step_fn(dora.trainable_filter)
    base = sizes.decoder()
    forward = nnx.jit(lambda model, x: model(x))

    start = time.perf_counter()
    block(forward(lora, tokens[:, :-1]))
    first_forward = time.perf_counter() - start

    times = interleaved(
        {
            "full": lambda: full_step(full, full_opt, tokens),
            "lora": lambda: lora_step(lora, lora_opt, tokens),
            "frozen": lambda: frozen_step(frozen, frozen_opt, tokens),
            "qwix": lambda: hand_step(by_hand, by_hand_opt, tokens),
            "dora": lambda: dora_step(dora, dora_opt, tokens),
            "base_fwd": lambda: forward(base, tokens[:, :-1]),
            "lora_fwd": lambda: forward(lora, tokens[:, :-1]),
        },
        sizes.reps,
    )

    trainable = nnx.state(lora, lora.trainable_filter)
    opt_bytes = nbytes(nnx.state(lora_opt, nnx.OptVariable))
    qlora = nnx_peft.PeftModel(
        sizes.decoder(), sizes.lora_config(weight_qtype="nf4"), sample, rngs=nnx.Rngs(1)
    )

    def adapted_weights(model: nnx_peft.PeftModel) -> list[nnx.State]:
        """The state of every adapted base weight (float, or quantized values and scales)."""
        modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model.model)}
        return [nnx.state(modules[i.module_path])[i.weight] for i in model.adapters()]

    float_bytes = nbytes(adapted_weights(lora))
    nf4_bytes = nbytes(adapted_weights(qlora))

    print("\n| figure | measured | target |\n|---|---|---|")
    print(f"| LoRA train step / full fine-tune step | {ratio(times, 'lora', 'full')} | <= 0.72 |")
    print(f"| frozen-backward step / full fine-tune step | {ratio(times, 'frozen', 'full')} | - |")
    print(f"| LoRA train step / frozen-backward step | {ratio(times, 'lora', 'frozen')} | - |")
    print(
        f"| nnx_peft LoRA step / hand-written Qwix LoRA step | {ratio(times, 'lora', 'qwix')} "
        "| <= 1.02 |"
    )
    print(f"| DoRA train step / LoRA train step | {ratio(times, 'dora', 'lora')} | <= 1.3 |")
    print(
        f"| adapted forward (unmerged) / base forward | {ratio(times, 'lora_fwd', 'base_fwd')} "
        "| <= 1.10 |"
    )
    print(
        f"| optimizer state bytes / trainable bytes (adamw) | {opt_bytes / nbytes(trainable):.3f} "
        "| 2.0 |"
    )
    print(
        f"| QLoRA nf4 base weight bytes / float32 base weight bytes | "
        f"{nf4_bytes / float_bytes:.3f} | <= 0.15 |"
    )
    print(
        f"| wrap time / (compile + one run of the jitted forward) | "
        f"{wrap_time / first_forward:.3f} ({wrap_time:.2f} s / {first_forward:.2f} s) | report |"
    )


if __name__ == "__main__":
    main()
