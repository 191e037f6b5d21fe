"""LoRA on convolutions and dense layers: teach a small CNN five new digits, then merge.

1. Train a small CNN (two nnx.Conv, two nnx.Linear, ten outputs) on scikit-learn's
   bundled 8x8 digits, classes 0 to 4 only (all weights, plain NNX).
2. Wrap it with nnx_peft.PeftModel, LoRA on both convolutions and both dense
   layers, and train only the adapters on classes 5 to 9.
3. Fold the adapters into the weights with model.merge_and_unload(): a plain CNN,
   no adapters, whose accuracy equals the adapted model's.

Run:  python examples/image_classifier.py           (full run, under a minute on 2 CPU cores)
      python examples/image_classifier.py --smoke   (a few steps, for CI)
Exits with status 1 if the adapters did not raise the accuracy on digits 5 to 9 (to at
least 90% in a full run), or if the merged model is not a plain CNN with the same accuracy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import nnx_peft

Split = tuple[np.ndarray, np.ndarray]


class CNN(nnx.Module):
    """8x8 grey images ``(batch, 8, 8, 1)`` to logits over the ten digits."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 32, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(x)


def digits(classes: range) -> tuple[Split, Split]:
    """Train and test splits (70/30, stratified) of the bundled digits in ``classes``."""
    images, labels = load_digits(return_X_y=True)
    keep = np.isin(labels, classes)
    x = (images[keep] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    y = labels[keep].astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def shuffled_batches(split: Split, batch_size: int, seed: int) -> Iterator[Split]:
    """Endless random batches of ``split``."""
    rng = np.random.default_rng(seed)
    x, y = split
    while True:
        index = rng.choice(len(x), size=batch_size, replace=False)
        yield x[index], y[index]


def train(
    model: nnx.Module, optimizer: nnx.Optimizer, wrt: nnx.filterlib.Filter, split: Split, steps: int
) -> None:
    """Runs ``steps`` jitted steps of cross-entropy training, differentiating w.r.t. ``wrt``."""

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    data = shuffled_batches(split, batch_size=64, seed=0)
    bar = tqdm(range(steps), desc="train", file=sys.stdout, mininterval=0.5)
    for _ in bar:
        bar.set_postfix(loss=f"{float(step(model, optimizer, *next(data))):.3f}")


@nnx.jit
def predict(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


def accuracy(model: nnx.Module, split: Split) -> float:
    x, y = split
    return float(np.mean(np.asarray(predict(model, x)) == y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    steps, min_accuracy = (60, 0.0) if args.smoke else (400, 0.9)

    old_train, old_test = digits(range(0, 5))
    new_train, new_test = digits(range(5, 10))
    print(f"digits 0-4: {len(old_train[0])} train, {len(old_test[0])} test images")
    print(f"digits 5-9: {len(new_train[0])} train, {len(new_test[0])} test images")

    print("\n1) Training the CNN on digits 0-4 (all weights)")
    base = CNN(rngs=nnx.Rngs(0))
    train(base, nnx.Optimizer(base, optax.adam(3e-3), wrt=nnx.Param), nnx.Param, old_train, steps)

    print("\n2) LoRA (rank 4) on conv1, conv2, fc and head; training the adapters on digits 5-9")
    config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=r"conv1|conv2|fc|head")
    model = nnx_peft.PeftModel(base, config, jnp.zeros((1, 8, 8, 1)), rngs=nnx.Rngs(1))
    model.print_trainable_parameters()
    train(model, model.make_optimizer(optax.adam(1e-2)), model.trainable_filter, new_train, steps)

    print("\n3) Merging the adapters into the weights")
    merged = model.merge_and_unload()
    print(f"merged: {type(merged).__name__}, {len(model.adapters())} adapters folded in")

    models = {"base model": base, "LoRA-adapted": model, "merged": merged}
    scores = {name: (accuracy(m, old_test), accuracy(m, new_test)) for name, m in models.items()}
    with model.disable_adapter():  # the base model again, without a second copy
        scores["adapters disabled"] = (accuracy(model, old_test), accuracy(model, new_test))
    print(f"\n{'test accuracy':20}{'digits 0-4':>12}{'digits 5-9':>12}")
    for name, (old, new) in scores.items():
        print(f"{name:20}{old:>12.1%}{new:>12.1%}")

    before, after = scores["base model"][1], scores["LoRA-adapted"][1]
    checks = {
        "the adapters raised the accuracy on digits 5-9": after > before,
        f"the accuracy on digits 5-9 is at least {min_accuracy:.0%}": after >= min_accuracy,
        "the merged model is a plain CNN": type(merged) is CNN,
        "the merged model's accuracy equals the adapted one's": (
            scores["merged"] == scores["LoRA-adapted"]
        ),
    }
    failed = [claim for claim, holds in checks.items() if not holds]
    for claim in failed:
        print(f"FAILED: {claim} does not hold", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
