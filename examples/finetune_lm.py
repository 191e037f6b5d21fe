"""Fine-tune a small language model on a new text: LoRA and full fine-tuning side by side.

1. Pretrain nnx_peft.toy.TinyDecoder on one built-in text (TEXT_A, all weights).
2. Adapt it to a second built-in text (TEXT_B) twice, on the same batches for the
   same number of steps: with LoRA (nnx_peft, adapters only) and with full
   fine-tuning (plain NNX, every weight).
3. Compare the two: loss curves (saved as a PNG), trainable parameters, step
   time, checkpoint size on disk, and the loss on both texts afterwards.

Run:  python examples/finetune_lm.py            (full run, about a minute on 2 CPU cores)
      python examples/finetune_lm.py --smoke    (a few steps, for CI)
      python examples/finetune_lm.py --out DIR  (where the plot goes; default out/)
Exits with status 1 if either run did not lower the loss on TEXT_B, if LoRA did not
train fewer parameters and save a smaller checkpoint, or if the base model did not
stay intact (unchanged weights, its loss back with the adapters disabled).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from matplotlib.figure import Figure
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
Batches = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run of this example."""

    pretrain_steps: int
    finetune_steps: int
    seq_len: int
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class Result:
    """What one fine-tuning method achieved."""

    name: str
    losses: list[float]
    step_seconds: float
    trainable: int
    checkpoint_bytes: int
    loss_a: float
    loss_b: float
    loss_a_disabled: float | None  # loss on TEXT_A with the fine-tuning switched off, if possible


def train(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    wrt: nnx.filterlib.Filter,
    data: Batches,
    steps: int,
    desc: str,
) -> tuple[list[float], float]:
    """Runs jitted steps that differentiate w.r.t. ``wrt`` only.

    Returns:
        The loss of every step, and the median time of a step (the first one,
        which compiles, excluded).
    """

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return next_token_loss(model(x), y)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    losses, seconds = [], []
    bar = tqdm(range(steps), desc=desc, file=sys.stdout, mininterval=0.5)
    for _ in bar:
        x, y = next(data)
        start = time.perf_counter()
        losses.append(float(step(model, optimizer, x, y)))  # float() waits for the step
        seconds.append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, statistics.median(seconds[1:] or seconds)


def pretrain(tokenizer: CharTokenizer, settings: Settings) -> TinyDecoder:
    """A TinyDecoder trained on TEXT_A, all weights (plain NNX)."""
    model = TinyDecoder(DecoderConfig(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    data = batches(
        tokenizer.encode(TEXT_A), batch_size=settings.batch_size, seq_len=settings.seq_len, seed=0
    )
    train(model, optimizer, nnx.Param, data, settings.pretrain_steps, "pretrain on A")
    return model


def count(state: nnx.State) -> int:
    """Number of array elements in ``state``."""
    return sum(leaf.size for leaf in jax.tree.leaves(state))


def directory_bytes(path: pathlib.Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def finetune_lora(
    base: TinyDecoder, tokenizer: CharTokenizer, settings: Settings, checkpoint: pathlib.Path
) -> Result:
    """LoRA (rank 8) on every attention and MLP projection; saves the adapters only."""
    config = nnx_peft.LoraConfig(rank=8, alpha=16.0, target=TARGET)
    sample = jnp.zeros((1, settings.seq_len), jnp.int32)
    model = nnx_peft.PeftModel(base, config, sample, rngs=nnx.Rngs(1))
    optimizer = model.make_optimizer(optax.adamw(1e-2))
    data = data_b(tokenizer, settings)
    losses, seconds = train(
        model, optimizer, model.trainable_filter, data, settings.finetune_steps, "LoRA on B"
    )
    model.save_adapter(checkpoint)
    with model.disable_adapter():  # the base model, exactly, without a second copy
        loss_a_disabled = evaluate_loss(model, tokenizer.encode(TEXT_A), seq_len=settings.seq_len)
    return Result(
        name="LoRA",
        losses=losses,
        step_seconds=seconds,
        trainable=count(nnx.state(model, model.trainable_filter)),
        checkpoint_bytes=directory_bytes(checkpoint),
        loss_a=evaluate_loss(model, tokenizer.encode(TEXT_A), seq_len=settings.seq_len),
        loss_b=evaluate_loss(model, tokenizer.encode(TEXT_B), seq_len=settings.seq_len),
        loss_a_disabled=loss_a_disabled,
    )


def finetune_full(
    base: TinyDecoder, tokenizer: CharTokenizer, settings: Settings, checkpoint: pathlib.Path
) -> Result:
    """Full fine-tuning of a copy of ``base``; saves every weight the usual NNX way (Orbax)."""
    model = nnx.clone(base)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    data = data_b(tokenizer, settings)
    losses, seconds = train(model, optimizer, nnx.Param, data, settings.finetune_steps, "full on B")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(checkpoint, nnx.state(model, nnx.Param))
    return Result(
        name="full fine-tuning",
        losses=losses,
        step_seconds=seconds,
        trainable=count(nnx.state(model, nnx.Param)),
        checkpoint_bytes=directory_bytes(checkpoint),
        loss_a=evaluate_loss(model, tokenizer.encode(TEXT_A), seq_len=settings.seq_len),
        loss_b=evaluate_loss(model, tokenizer.encode(TEXT_B), seq_len=settings.seq_len),
        loss_a_disabled=None,  # the pretrained weights were overwritten
    )


def data_b(tokenizer: CharTokenizer, settings: Settings) -> Batches:
    """The TEXT_B batches both methods train on (same seed, so the same batches)."""
    ids = tokenizer.encode(TEXT_B)
    return batches(ids, batch_size=settings.batch_size, seq_len=settings.seq_len, seed=1)


def plot(results: list[Result], before: float, path: pathlib.Path) -> None:
    """Saves the training-loss curves of ``results`` to ``path``."""
    fig = Figure(figsize=(7, 4))  # no pyplot: nothing opens a window
    ax = fig.subplots()
    for result in results:
        ax.plot(result.losses, label=f"{result.name} ({result.trainable:,} trainable)")
    ax.axhline(before, color="gray", linestyle=":", label="pretrained model on B")
    ax.set(xlabel="step", ylabel="training loss on TEXT_B", title="Adapting to a new text")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results: list[Result], before: dict[str, float]) -> None:
    """Prints the comparison table."""
    print(f"\n{'':24}" + "".join(f"{r.name:>20}" for r in results))
    rows = [
        ("trainable params", lambda r: f"{r.trainable:,}"),
        ("step time (median)", lambda r: f"{1000 * r.step_seconds:.1f} ms"),
        ("checkpoint on disk", lambda r: f"{r.checkpoint_bytes / 1024:,.1f} KiB"),
        (f"loss on B (was {before['B']:.3f})", lambda r: f"{r.loss_b:.3f}"),
        (f"loss on A (was {before['A']:.3f})", lambda r: f"{r.loss_a:.3f}"),
        (
            "  ... adapters disabled",
            lambda r: "-" if r.loss_a_disabled is None else f"{r.loss_a_disabled:.3f}",
        ),
    ]
    for label, cell in rows:
        print(f"{label:24}" + "".join(f"{cell(r):>20}" for r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"), help="output dir")
    args = parser.parse_args()
    settings = Settings(20, 10, 32) if args.smoke else Settings(400, 300, 64)
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = CharTokenizer(TEXT_A, TEXT_B)
    print("1) Pretraining the base model on text A (all weights)")
    base = pretrain(tokenizer, settings)
    frozen = jax.tree.map(np.asarray, nnx.state(base, nnx.Param))
    before = {
        "A": evaluate_loss(base, tokenizer.encode(TEXT_A), seq_len=settings.seq_len),
        "B": evaluate_loss(base, tokenizer.encode(TEXT_B), seq_len=settings.seq_len),
    }

    print("\n2) Adapting to text B: LoRA, then full fine-tuning, on the same batches")
    with tempfile.TemporaryDirectory() as checkpoints:
        root = pathlib.Path(checkpoints)
        results = [
            finetune_lora(base, tokenizer, settings, root / "lora"),
            finetune_full(base, tokenizer, settings, root / "full"),
        ]
    lora, full = results
    report(results, before)
    plot_path = args.out / "finetune_lm_loss.png"
    plot(results, before["B"], plot_path)
    print(f"\nloss curves: {plot_path}")

    base_unchanged = jax.tree.all(
        jax.tree.map(np.array_equal, jax.tree.map(np.asarray, nnx.state(base, nnx.Param)), frozen)
    )
    checks = {
        "LoRA lowered the loss on B": lora.loss_b < before["B"],
        "full fine-tuning lowered the loss on B": full.loss_b < before["B"],
        "LoRA trains fewer parameters": lora.trainable < full.trainable,
        "LoRA's checkpoint is smaller": lora.checkpoint_bytes < full.checkpoint_bytes,
        "disabling the adapters gives the base model's loss back": bool(
            np.isclose(lora.loss_a_disabled, before["A"], rtol=1e-5)
        ),
        "the base model is unchanged": base_unchanged,
    }
    failed = [claim for claim, holds in checks.items() if not holds]
    for claim in failed:
        print(f"FAILED: {claim} does not hold", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
