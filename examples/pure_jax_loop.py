"""Train LoRA adapters with a pure jax.jit step and plain optax: no nnx.Optimizer, no nnx.jit.

PeftModel.split_trainable() splits the wrapped model into a graph definition and
two pytrees of arrays: `trainable` (the adapters) and `rest` (the frozen base
weights and every other variable). The training step is an ordinary function of
pytrees: it rebuilds the model with nnx_peft.merge, differentiates with respect
to `trainable` only and applies a plain optax update (gradient clipping, AdamW
and a warmup-cosine schedule). `trainable` and the optimizer state are donated,
so XLA may update them in place; `rest` is not, since its arrays are shared with
the base model.

Run:  python examples/pure_jax_loop.py           (full run, under a minute on 2 CPU cores)
      python examples/pure_jax_loop.py --smoke   (a few steps, for CI)
Exits with status 1 if the loss did not drop or a frozen base weight changed.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import nnx_peft
from nnx_peft.toy import (
    TEXT_B,
    CharTokenizer,
    DecoderConfig,
    TinyDecoder,
    batches,
    evaluate_loss,
    next_token_loss,
)


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """A jitted ``(trainable, rest, opt_state, x, y) -> (trainable, opt_state, loss)``."""

    def step(trainable, rest, opt_state, x, y):
        def loss_fn(trainable):
            return next_token_loss(nnx_peft.merge(graphdef, trainable, rest)(x), y)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    steps, seq_len = (15, 32) if args.smoke else (400, 64)

    tokenizer = CharTokenizer(TEXT_B)
    ids = tokenizer.encode(TEXT_B)
    # A randomly initialised base keeps this example about the loop; see finetune_lm.py
    # for adapting a pretrained one.
    base = TinyDecoder(DecoderConfig(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=16, alpha=32.0, target=r".*(q_proj|v_proj|up_proj|down_proj)")
    sample = jnp.zeros((1, seq_len), jnp.int32)
    model = nnx_peft.PeftModel(base, config, sample, rngs=nnx.Rngs(1))
    before = evaluate_loss(model, ids, seq_len=seq_len)

    graphdef, trainable, rest = model.split_trainable()
    del model  # its adapter arrays are donated to the first step below
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_rest = sum(x.size for x in jax.tree.leaves(rest))
    print(f"trainable: {n_trainable:,} adapter values; rest: {n_rest:,} frozen values")

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
    opt_state = tx.init(trainable)
    step = make_step(graphdef, tx)

    data = batches(ids, batch_size=16, seq_len=seq_len, seed=1)
    seconds = []
    bar = tqdm(range(steps), desc="train", file=sys.stdout, mininterval=0.5)
    for _ in bar:
        x, y = next(data)
        start = time.perf_counter()
        trainable, opt_state, loss = step(trainable, rest, opt_state, x, y)
        bar.set_postfix(loss=f"{float(loss):.3f}")  # float() waits for the step
        seconds.append(time.perf_counter() - start)

    model = nnx_peft.merge(graphdef, trainable, rest)
    after = evaluate_loss(model, ids, seq_len=seq_len)
    print(f"\nloss on text B: before {before:.3f} -> after {after:.3f}")
    print(f"step time (median, after compiling): {1000 * np.median(seconds[1:]):.1f} ms")

    base_unchanged = jax.tree.all(
        jax.tree.map(
            np.array_equal,
            jax.tree.map(np.asarray, nnx.state(model.model, nnx_peft.FROZEN_PARAMS)),
            jax.tree.map(np.asarray, nnx.state(base, nnx.Param)),
        )
    )
    if not after < before or not base_unchanged:
        print("FAILED: the loss did not drop, or a base weight changed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
