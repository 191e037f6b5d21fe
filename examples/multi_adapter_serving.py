"""Serve two adapters in one batch: each row of a batch generates with its own adapter.

1. Wrap nnx_peft.toy.TinyDecoder with nnx_peft.PeftModel (adapter "a"), and add a
   second adapter, "b" (LoRA rank 8 on the attention and MLP projections, both).
2. Train adapter "a" on one built-in text (TEXT_A, a mill by a river) and adapter "b"
   on the other (TEXT_B, a bread recipe): set_adapter picks the one trained, and
   make_optimizer and trainable_filter then cover that one only.
3. Answer one mixed batch: prompts whose rows use different adapters
   (``model(tokens, adapter_ids=ids)``), decoded greedily, a few tokens at a time, in
   one compiled step for every row; print each row's adapter and continuation.

Run:  python examples/multi_adapter_serving.py           (full run)
      python examples/multi_adapter_serving.py --smoke   (a few steps, for CI)
Exits with status 1 if an adapter's training did not lower its loss on its own text,
if training one adapter changed the other, or if a row's logits in the mixed batch
differ (by more than 1e-5) from those of its adapter alone.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
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

TARGET = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: (adapter, prompt) of each row of the served batch: each adapter on a prompt of its
#: own text, then both on the same prompt, where only the adapter tells the rows apart.
REQUESTS = [("a", "The river "), ("b", "To bake bread"), ("a", "and the "), ("b", "and the ")]


def train_adapter(
    model: nnx_peft.PeftModel, name: str, ids: np.ndarray, steps: int, seq_len: int
) -> float:
    """Trains the adapter ``name`` alone on windows of ``ids``; returns the last loss."""
    model.set_adapter(name)  # the active set: what trainable_filter and make_optimizer cover
    wrt = model.trainable_filter
    optimizer = model.make_optimizer(optax.adamw(1e-2))

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return next_token_loss(model(x), y)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    data = batches(ids, batch_size=16, seq_len=seq_len, seed=len(name))
    bar = tqdm(range(steps), desc=f"adapter {name!r}", file=sys.stdout, mininterval=0.5)
    loss = float("nan")
    for _ in bar:
        loss = float(step(model, optimizer, *next(data)))
        bar.set_postfix(loss=f"{loss:.3f}")
    return loss


@nnx.jit
def serve_step(
    model: nnx_peft.PeftModel, tokens: jax.Array, lengths: jax.Array, adapter_ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Appends each row's most likely next token; returns the tokens and the logits it took.

    Row ``i`` holds ``lengths[i]`` tokens (later entries are ignored: attention is
    causal) and runs with adapter ``model.adapter_names[adapter_ids[i]]``. The lengths
    are arrays, so one compilation serves every step and every mix of rows.
    """
    logits = model(tokens, adapter_ids=adapter_ids)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rows = jnp.arange(tokens.shape[0])
    return tokens.at[rows, lengths].set(jnp.argmax(last, axis=-1)), last


@nnx.jit
def last_logits(model: nnx_peft.PeftModel, tokens: jax.Array, length: jax.Array) -> jax.Array:
    """The logits after the first ``length`` tokens of each row, with the active adapters."""
    return jnp.take_along_axis(model(tokens), (length - 1)[:, None, None], axis=1)[:, 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    steps, seq_len, new_tokens = (10, 32, 8) if args.smoke else (300, 64, 24)

    tokenizer = CharTokenizer(TEXT_A, TEXT_B)
    texts = {"a": tokenizer.encode(TEXT_A), "b": tokenizer.encode(TEXT_B)}
    base = TinyDecoder(DecoderConfig(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))

    print('1) Wrapping with adapter "a", adding adapter "b" (rank 8, same targets)')
    config = nnx_peft.LoraConfig(rank=8, alpha=16.0, target=TARGET)
    sample = jnp.zeros((1, seq_len), jnp.int32)
    model = nnx_peft.PeftModel(base, config, sample, rngs=nnx.Rngs(1), adapter_name="a")
    model.add_adapter("b", config, rngs=nnx.Rngs(2))
    print(f"adapters: {model.adapter_names}, active: {model.active_adapters}")

    before = {}
    for name in model.adapter_names:
        model.set_adapter(name)
        before[name] = evaluate_loss(model, texts[name], seq_len=seq_len)
    print("\n2) Training each adapter on its own text, the other one frozen")
    after, untouched = {}, True
    for name in model.adapter_names:
        others = nnx_peft.OfAdapters(tuple(n for n in model.adapter_names if n != name))
        frozen = jax.tree.map(np.asarray, nnx.state(model, others))
        train_adapter(model, name, texts[name], steps, seq_len)
        after[name] = evaluate_loss(model, texts[name], seq_len=seq_len)
        changed = jax.tree.map(np.asarray, nnx.state(model, others))
        untouched &= jax.tree.all(jax.tree.map(np.array_equal, frozen, changed))
        print(f"loss of {name!r} on its text: before {before[name]:.3f} -> {after[name]:.3f}")

    print("\n3) One batch, one adapter per row, greedy decoding")
    model.eval()
    names = list(model.adapter_names)
    adapter_ids = jnp.array([names.index(name) for name, _ in REQUESTS])
    prompts = [tokenizer.encode(prompt) for _, prompt in REQUESTS]
    lengths = jnp.array([len(p) for p in prompts])
    width = max(len(p) for p in prompts) + new_tokens
    tokens = jnp.zeros((len(REQUESTS), width), jnp.int32)
    for row, ids in enumerate(prompts):
        tokens = tokens.at[row, : len(ids)].set(ids)

    tokens, first = serve_step(model, tokens, lengths, adapter_ids)
    for step in range(1, new_tokens):
        tokens, _ = serve_step(model, tokens, lengths + step, adapter_ids)
    for row, (name, prompt) in enumerate(REQUESTS):
        start = len(prompts[row])
        continuation = tokenizer.decode(tokens[row, start : start + new_tokens])
        print(f"  [{name}] {prompt!r} -> {continuation!r}")

    # Each row's first step, against the same prompt run with its adapter alone.
    error = 0.0
    for row, (name, _) in enumerate(REQUESTS):
        model.set_adapter(name)
        alone = last_logits(model, tokens[row : row + 1], lengths[row : row + 1])[0]
        error = max(error, float(jnp.max(jnp.abs(first[row] - alone))))
    print(f"\nmax |mixed - adapter alone| over the first step's logits: {error:.1e}")

    checks = {
        "each adapter lowered the loss on its own text": all(
            after[n] < before[n] for n in model.adapter_names
        ),
        "training one adapter left the other unchanged": untouched,
        "each row's logits equal those of its adapter alone (within 1e-5)": error <= 1e-5,
    }
    failed = [claim for claim, holds in checks.items() if not holds]
    for claim in failed:
        print(f"FAILED: {claim} does not hold", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
