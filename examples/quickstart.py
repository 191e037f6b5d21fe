"""Quickstart: LoRA-adapt a small language model to a new text, on CPU, in about a minute.

1. Pretrain nnx_peft.toy.TinyDecoder (RMSNorm, einsum attention, gated MLP) on
   one built-in text (full fine-tuning, plain NNX).
2. Wrap it with nnx_peft.PeftModel: LoRA on the attention and MLP projections.
3. Train only the adapters on a second built-in text, and compare the loss on it
   before and after.

Run:  python examples/quickstart.py           (full run)
      python examples/quickstart.py --smoke   (a few steps, for CI)
Exits with status 1 if the adapted model's loss did not drop.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

import nnx_peft
from nnx_peft.toy import (
    TEXT_A,
    TEXT_B,
    CharTokenizer,
    DecoderConfig,
    TinyDecoder,
    batches,
    evaluate_loss,
    next_token_loss,
)


def train(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    wrt: nnx.filterlib.Filter,
    data,
    steps: int,
    desc: str,
) -> float:
    """Runs `steps` jitted training steps, differentiating w.r.t. `wrt` only."""

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return next_token_loss(model(x), y)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    bar = tqdm(range(steps), desc=desc, file=sys.stdout, mininterval=0.5)
    loss = float("nan")
    for _ in bar:
        loss = float(step(model, optimizer, *next(data)))
        bar.set_postfix(loss=f"{loss:.3f}")
    return loss


@nnx.jit(static_argnums=2)
def greedy_next(model: nnx.Module, tokens: jax.Array, position: int) -> jax.Array:
    """The most likely token after ``tokens[:, :position]`` (later entries are ignored)."""
    return jnp.argmax(model(tokens)[:, position - 1], axis=-1)


def generate(model: nnx.Module, prompt_ids, steps: int, seq_len: int) -> jax.Array:
    """Greedy decoding in a fixed-size buffer (one compilation per position)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32).at[0, : len(prompt_ids)].set(prompt_ids)
    end = min(len(prompt_ids) + steps, seq_len)
    for position in range(len(prompt_ids), end):
        tokens = tokens.at[:, position].set(greedy_next(model, tokens, position))
    return tokens[0, :end]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    pretrain_steps, lora_steps, seq_len = (20, 20, 32) if args.smoke else (400, 300, 64)

    tokenizer = CharTokenizer(TEXT_A, TEXT_B)
    ids_a, ids_b = tokenizer.encode(TEXT_A), tokenizer.encode(TEXT_B)
    base = TinyDecoder(DecoderConfig(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))

    print("1) Pretraining the base model on text A (all weights)")
    optimizer = nnx.Optimizer(base, optax.adamw(3e-3), wrt=nnx.Param)
    train(
        base,
        optimizer,
        nnx.Param,
        batches(ids_a, batch_size=16, seq_len=seq_len, seed=0),
        pretrain_steps,
        "pretrain",
    )

    print("\n2) Wrapping with LoRA (rank 8) on attention and MLP projections")
    config = nnx_peft.LoraConfig(
        rank=8, alpha=16.0, target=r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )
    model = nnx_peft.PeftModel(base, config, jnp.zeros((1, seq_len), jnp.int32), rngs=nnx.Rngs(1))
    summary = model.trainable_parameters()
    print(
        f"trainable params: {summary.trainable:,} of {summary.total:,} "
        f"({100 * summary.fraction:.2f}%) in {len(summary.adapters)} adapted weights"
    )

    before = evaluate_loss(model, ids_b, seq_len=seq_len)
    print(f"\n3) Training the adapters on text B (loss on B before: {before:.3f})")
    optimizer = model.make_optimizer(optax.adamw(1e-2))
    train(
        model,
        optimizer,
        model.trainable_filter,
        batches(ids_b, batch_size=16, seq_len=seq_len, seed=1),
        lora_steps,
        "lora",
    )
    after = evaluate_loss(model, ids_b, seq_len=seq_len)

    print(f"\nloss on text B: before {before:.3f} -> after {after:.3f}")
    sample = generate(model, tokenizer.encode("To bake bread, "), 30, seq_len)
    print(f"sample: {tokenizer.decode(sample)!r}")
    base_unchanged = jax.tree.all(
        jax.tree.map(
            lambda a, b: bool((a == b).all()),
            nnx.state(model.model, nnx_peft.FROZEN_PARAMS),
            nnx.state(base, nnx.Param),
        )
    )
    if not after < before or not base_unchanged:
        print("FAILED: the loss did not drop, or base weights changed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
