"""Merged forward cost and merge accuracy of nnx_peft, measured side by side.

Prints, for the decoder of `Sizes` (default: 4 layers, width 512, MLP 1536, 8 heads of
64, vocab 8192, sequence 256, batch 4, rank 16 on every attention and MLP projection):

- whether the merged forwards compile to exactly the base model's operations;
- jitted forward time ratios, each the median (min, max) over rounds in which all
  variants run once, interleaved: merge_and_unload() model / base, merge_adapter()
  (in place) / base, unmerged (adapters active) / base;
- merge accuracy, as max|y - y_adapted| / max|y_adapted| over the logits: float32 and
  bfloat16 merge_and_unload(); QLoRA nf4, int4 and int8 merge_and_unload() (a float
  model) and merge_adapter() (requantized in place), next to the quantization's own
  error (the quantized adapted model against the same adapters on the float base).

Run: python benchmarks/bench_merging.py [--smoke] [--reps N] [--layers N] [--width N] ...
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from _common import Sizes, interleaved, parse_sizes, ratio
from flax import nnx

import nnx_peft


def jitted(model: nnx.Module, tokens: jax.Array) -> Callable[[], jax.Array]:
    """A zero-argument call of ``model(tokens)`` through one compiled function.

    The state is split once, so each call measures the compiled forward pass,
    not NNX's graph traversal.
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return lambda: forward(state, tokens)


def compiled_ops(model: nnx.Module, tokens: jax.Array) -> collections.Counter[str]:
    """XLA's compiled operations of ``model(tokens)`` by kind, inputs left out."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    ops = collections.Counter(
        re.findall(r"= \S+ ([\w-]+)\(", forward.lower(state, tokens).compile().as_text())
    )
    del ops["parameter"]
    return ops


def randomize_b(model: nnx_peft.PeftModel, seed: int = 0) -> None:
    """Gives every B factor (zero after wrapping) small random values."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam)):
        if str(path[-1]).endswith("_lora_b"):
            value = var.get_value()
            random = 0.005 * rng.standard_normal(value.shape)
            var.set_value(jnp.asarray(random, value.dtype))


def rel_error(y: jax.Array, ref: jax.Array) -> float:
    y64, ref64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(y64 - ref64)) / np.max(np.abs(ref64)))


def wrap(sizes: Sizes, tokens: jax.Array, dtype: jnp.dtype = jnp.float32, **config: object):
    base = sizes.decoder(dtype=dtype)
    model = nnx_peft.PeftModel(base, sizes.lora_config(**config), tokens[:1], rngs=nnx.Rngs(1))
    randomize_b(model)
    return base, model


def timings(sizes: Sizes, tokens: jax.Array) -> None:
    base, model = wrap(sizes, tokens)
    in_place = nnx.clone(model)
    in_place.merge_adapter()
    plain = model.merge_and_unload()
    base_ops = compiled_ops(base, tokens)
    print(
        "compiled operations equal to the base model's (unused inputs aside): "
        f"merge_and_unload() {compiled_ops(plain, tokens) == base_ops}, "
        f"merge_adapter() {compiled_ops(in_place, tokens) == base_ops}"
    )
    fns = {
        "base": jitted(base, tokens),
        "merged": jitted(plain, tokens),
        "in_place": jitted(in_place, tokens),
        "unmerged": jitted(model, tokens),
    }
    times = interleaved(fns, sizes.reps)
    print(f"\nforward time, jitted, median (min, max) over {sizes.reps} interleaved rounds")
    print(f"  base forward:                    {1e3 * float(np.median(times['base'])):.1f} ms")
    print(f"  merge_and_unload() / base:       {ratio(times, 'merged', 'base')}")
    print(f"  merge_adapter() in place / base: {ratio(times, 'in_place', 'base')}")
    print(f"  unmerged / base:                 {ratio(times, 'unmerged', 'base')}")


def accuracy(sizes: Sizes, tokens: jax.Array) -> None:
    print("\nmerge accuracy: max|y - y_adapted| / max|y_adapted| over the logits")
    for dtype in (jnp.float32, jnp.bfloat16):
        base, model = wrap(sizes, tokens, dtype)
        adapted = jitted(model, tokens)()
        effect = rel_error(jitted(base, tokens)(), adapted)
        merged = rel_error(jitted(model.merge_and_unload(), tokens)(), adapted)
        name = jnp.dtype(dtype).name
        print(f"  {name:8s} merge_and_unload: {merged:.2e}   (update effect {effect:.2e})")
    _, float_model = wrap(sizes, tokens)
    for qtype in ("nf4", "int4", "int8"):
        _, model = wrap(sizes, tokens, weight_qtype=qtype)
        adapted = jitted(model, tokens)()
        nnx.update(float_model, nnx.state(model, nnx_peft.AdapterParam))
        own = rel_error(adapted, jitted(float_model, tokens)())
        merged = rel_error(jitted(model.merge_and_unload(), tokens)(), adapted)
        model.merge_adapter()
        requantized = rel_error(jitted(model, tokens)(), adapted)
        print(
            f"  {qtype:8s} merge_and_unload: {merged:.2e}   merge_adapter (requantized): "
            f"{requantized:.2e}   quantization's own error: {own:.2e}"
        )


def main() -> None:
    sizes = parse_sizes(__doc__.splitlines()[0])
    print(f"sizes: {sizes}\ndevice: {jax.devices()[0].device_kind}")
    tokens = sizes.tokens()
    timings(sizes, tokens)
    accuracy(sizes, tokens)


if __name__ == "__main__":
    main()
