"""Many adapters in one batch: a mixed-adapter forward against single-adapter ones.

Prints, for the decoder of `Sizes` (default here: 4 layers, width 512, MLP 1536, 8 heads
of 64, vocab 8192, sequence 256, batch 8) holding 4 adapters of one config (rank 8 on
the attention projections, each with random B factors of its own), jitted forwards of
one batch:

- mixed: ``model(tokens, adapter_ids=[0, 1, 2, 3, 0, 1, 2, 3])``, example i using
  adapter ``i % 4``;
- single: the same batch, one adapter active, no ``adapter_ids``;
- 4 separate: each adapter alone on its own examples (a quarter of the batch), four
  calls one after the other, each compiled for its adapter beforehand;
- and, as a control, the base model without adapters on the whole batch and in four
  calls of a quarter each: what batching gains or loses on this device, adapters aside;

as mixed / single, mixed / (4 separate), base / (4 separate base), and the medians.
Before timing, it checks that each example's mixed output equals that of its adapter
alone (within 1e-5).

Every timing figure is the median (min, max) over rounds in which all variants run once
each, interleaved. Run: python benchmarks/bench_multi_adapter.py [--smoke] [--reps N]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from _common import SMOKE, Sizes, interleaved, parse_sizes, ratio
from flax import nnx

import nnx_peft

ADAPTERS = 4
#: LoRA targets here: the attention projections (as a serving setup commonly adapts).
ATTENTION = r".*(q_proj|k_proj|v_proj|o_proj)"
#: This benchmark's default sizes: bench_training's model, a batch of 2 examples per
#: adapter, rank 8.
DEFAULT = dataclasses.replace(Sizes(), batch=2 * ADAPTERS, rank=8)
TOLERANCE = 1e-5


def randomize_b(model: nnx_peft.PeftModel, seed: int) -> None:
    """Gives every B factor, of every adapter, random values of its own (B starts at zero)."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam)):
        # A named adapter's parts end in "__<name>" ("kernel_lora_b__a1").
        if str(path[-1]).partition("__")[0].endswith("_lora_b"):
            value = var.get_value()
            var.set_value(jnp.asarray(0.02 * rng.standard_normal(value.shape), value.dtype))


def forward(model: nnx.Module, *, per_example: bool) -> Callable[..., jax.Array]:
    """The model's forward as one compiled function of its state, split now.

    Splitting once fixes the active set in the graph definition (``set_adapter`` changes
    it), so a later ``set_adapter`` does not reach this function, and each call measures
    the compiled forward pass, not NNX's graph traversal.
    """
    graphdef, state = nnx.split(model)
    if per_example:
        mixed = jax.jit(lambda state, x, ids: nnx.merge(graphdef, state)(x, adapter_ids=ids))
        return lambda x, ids: mixed(state, x, ids)
    alone = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return lambda x: alone(state, x)


def sizes_here() -> Sizes:
    """The command line's sizes over this benchmark's defaults (``--smoke``: tiny ones)."""
    smoke = "--smoke" in sys.argv
    sizes = parse_sizes(__doc__.splitlines()[0])
    given = SMOKE if smoke else Sizes()
    default = dataclasses.replace(given, batch=2 * ADAPTERS) if smoke else DEFAULT
    changed = {
        f.name: getattr(sizes, f.name)
        for f in dataclasses.fields(Sizes)
        if getattr(sizes, f.name) != getattr(given, f.name)
    }
    sizes = dataclasses.replace(default, **changed)
    if sizes.batch % ADAPTERS:
        raise SystemExit(f"--batch must be a multiple of {ADAPTERS} (one share per adapter)")
    return sizes


def main() -> None:
    sizes = sizes_here()
    print(f"sizes: {sizes} (adapters: {ADAPTERS})\ndevice: {jax.devices()[0].device_kind}")
    tokens = sizes.tokens()
    config = nnx_peft.LoraConfig(rank=sizes.rank, alpha=2.0 * sizes.rank, target=ATTENTION)
    names = [f"a{k}" for k in range(ADAPTERS)]
    base = sizes.decoder()
    model = nnx_peft.PeftModel(base, config, tokens[:1], rngs=nnx.Rngs(1), adapter_name=names[0])
    for k, name in enumerate(names[1:], start=2):
        model.add_adapter(name, config, rngs=nnx.Rngs(k))
    randomize_b(model, seed=0)
    model.eval()

    ids = jnp.arange(sizes.batch) % ADAPTERS
    rows = [np.flatnonzero(np.asarray(ids) == k) for k in range(ADAPTERS)]
    shares = [tokens[r] for r in rows]
    model.set_adapter(names[0])
    mixed = forward(model, per_example=True)
    single = forward(model, per_example=False)
    separate = []
    for name in names:
        model.set_adapter(name)
        separate.append(forward(model, per_example=False))
    plain = forward(base, per_example=False)  # the wrap leaves the base model as it was

    # Outside the timing (and compiling every function): each example's mixed output is
    # its adapter's alone, and every other adapter's output differs from the first one's.
    together, first = mixed(tokens, ids), single(tokens)
    alone = [fn(share) for fn, share in zip(separate, shares, strict=True)]
    gaps = [float(jnp.max(jnp.abs(together[r] - y))) for r, y in zip(rows, alone, strict=True)]
    spreads = [float(jnp.max(jnp.abs(first[r] - y))) for r, y in zip(rows, alone, strict=True)]
    error, spread = max(gaps), min(spreads[1:])
    if not error <= TOLERANCE < spread:
        raise SystemExit(
            f"FAILED: max |mixed - alone| = {error:.2e} (at most {TOLERANCE} expected), "
            f"smallest difference between adapters {spread:.2e} (more expected)"
        )

    times = interleaved(
        {
            "mixed": lambda: mixed(tokens, ids),
            "single": lambda: single(tokens),
            "separate": lambda: [fn(s) for fn, s in zip(separate, shares, strict=True)],
            "base": lambda: plain(tokens),
            "base_separate": lambda: [plain(s) for s in shares],
        },
        sizes.reps,
    )
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    print("\n| figure | measured | target |\n|---|---|---|")
    print(
        f"| mixed forward / single-adapter forward | {ratio(times, 'mixed', 'single')} | <= 1.3 |"
    )
    print(
        f"| mixed forward / {ADAPTERS} separate single-adapter forwards | "
        f"{ratio(times, 'mixed', 'separate')} | < 1.0 |"
    )
    print(
        f"| control: base model (no adapters) on the batch / on its {ADAPTERS} shares in "
        f"separate calls | {ratio(times, 'base', 'base_separate')} | - |"
    )
    print(f"| mixed forward, median | {medians['mixed']:.1f} ms | - |")
    print(f"| single-adapter forward, median | {medians['single']:.1f} ms | - |")
    print(
        f"| {ADAPTERS} separate forwards ({sizes.batch // ADAPTERS} examples each), median | "
        f"{medians['separate']:.1f} ms | - |"
    )
    print(f"| base model forward, median | {medians['base']:.1f} ms | - |")
    print(f"| {ADAPTERS} separate base forwards, median | {medians['base_separate']:.1f} ms | - |")
    print(
        f"| max abs difference, mixed / adapter alone (logits) | {error:.1e} "
        f"(adapters differ by >= {spread:.1e}) | <= {TOLERANCE:.0e} |"
    )


if __name__ == "__main__":
    main()
