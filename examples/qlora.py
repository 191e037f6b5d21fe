"""QLoRA: adapt a small language model whose base weights are stored in 4-bit NF4.

The task of finetune_lm.py, whose pretraining and training helpers this example
reuses: pretrain nnx_peft.toy.TinyDecoder on one built-in text (TEXT_A), then
adapt it to another (TEXT_B). This time the adapted projections' base weights
are quantized to nf4 when the model is wrapped (LoraConfig.weight_qtype), and
only the float32 adapters train on top of them.

Prints the memory of the base weights before and after quantization, what
quantization costs in loss, and the loss on TEXT_B before and after training.

Run:  python examples/qlora.py           (full run, about a minute on 2 CPU cores)
      python examples/qlora.py --smoke   (a few steps, for CI)
Exits with status 1 if the quantized weights are not at least 4x smaller than the
float32 ones, if the loss on TEXT_B did not drop, or if a frozen weight changed.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from finetune_lm import TARGET, Settings, data_b, pretrain, train
from flax import nnx

import nnx_peft
from nnx_peft.toy import TEXT_A, TEXT_B, CharTokenizer, evaluate_loss

# nf4 with one scale per 16 weights along each weight's innermost contracting axis. It
# must divide that axis for every target: o_proj contracts over (heads, head_dim=16).
TILE_SIZE = 16


def nbytes(tree: object) -> int:
    """Bytes of the arrays in ``tree``, each element at its dtype's width (4 bits for nf4)."""
    return sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(tree))


def adapted_weight_bytes(root: nnx.Module, model: nnx_peft.PeftModel) -> int:
    """Bytes of the weights of ``root`` that ``model`` adapted (its projections)."""
    modules = {"/".join(map(str, path)): module for path, module in nnx.iter_modules(root)}
    return sum(nbytes(getattr(modules[info.module_path], info.weight)) for info in model.adapters())


def snapshot(state: nnx.State) -> object:
    """A host copy of ``state``'s arrays, to compare against later."""
    return jax.tree.map(np.asarray, state)


def unchanged(state: nnx.State, copy: object) -> bool:
    """Whether ``state`` still holds exactly the arrays of ``copy``."""
    return jax.tree.all(jax.tree.map(np.array_equal, snapshot(state), copy))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    settings = Settings(20, 10, 32) if args.smoke else Settings(400, 300, 64)

    tokenizer = CharTokenizer(TEXT_A, TEXT_B)
    ids_a, ids_b = tokenizer.encode(TEXT_A), tokenizer.encode(TEXT_B)
    print("1) Pretraining the base model on text A (all weights, float32)")
    base = pretrain(tokenizer, settings)
    float_loss_a = evaluate_loss(base, ids_a, seq_len=settings.seq_len)

    print(f"\n2) Wrapping with LoRA (rank 8) over an nf4 base (tile size {TILE_SIZE})")
    config = nnx_peft.LoraConfig(
        rank=8, alpha=16.0, target=TARGET, weight_qtype="nf4", tile_size=TILE_SIZE
    )
    sample = jnp.zeros((1, settings.seq_len), jnp.int32)
    model = nnx_peft.PeftModel(base, config, sample, rngs=nnx.Rngs(1))
    memory = {
        "adapted projections": (
            adapted_weight_bytes(base, model),
            adapted_weight_bytes(model.model, model),
        ),
        "all base weights": (
            nbytes(nnx.state(base, nnx.Param)),
            nbytes(nnx.state(model, nnx_peft.FROZEN_PARAMS)),
        ),
    }
    print(f"\n{'base weights':24}{'float32':>12}{'nf4':>12}{'ratio':>8}")
    for name, (before, after) in memory.items():
        print(f"{name:24}{before / 1024:>8.1f} KiB{after / 1024:>8.1f} KiB{before / after:>7.2f}x")
    print(
        "(the adapters add "
        f"{nbytes(nnx.state(model, model.trainable_filter)) / 1024:.1f} KiB in float32; your "
        "`base` keeps the float weights alive until you drop it)"
    )
    quantized_loss_a = evaluate_loss(model, ids_a, seq_len=settings.seq_len)
    print(f"loss on text A: float32 base {float_loss_a:.3f}, nf4 base {quantized_loss_a:.3f}")

    before = evaluate_loss(model, ids_b, seq_len=settings.seq_len)
    print(f"\n3) Training the adapters on text B (loss on B before: {before:.3f})")
    frozen = snapshot(nnx.state(model, nnx.Not(model.trainable_filter)))
    optimizer = model.make_optimizer(optax.adamw(1e-2))
    _, step_seconds = train(
        model,
        optimizer,
        model.trainable_filter,
        data_b(tokenizer, settings),
        settings.finetune_steps,
        "QLoRA on B",
    )
    after = evaluate_loss(model, ids_b, seq_len=settings.seq_len)
    print(f"\nloss on text B: before {before:.3f} -> after {after:.3f}")
    print(f"step time (median): {1000 * step_seconds:.1f} ms")

    projections_before, projections_after = memory["adapted projections"]
    checks = {
        "the quantized projections are at least 4x smaller": (
            projections_before >= 4 * projections_after
        ),
        "the loss on B dropped": after < before,
        "the frozen (quantized) weights are unchanged": unchanged(
            nnx.state(model, nnx.Not(model.trainable_filter)), frozen
        ),
    }
    failed = [claim for claim, holds in checks.items() if not holds]
    for claim in failed:
        print(f"FAILED: {claim} does not hold", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
