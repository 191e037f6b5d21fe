"""Train LoRA adapters on a device mesh: FSDP x tensor parallel, checked against one device.

The base model's weights are annotated with NNX sharding metadata
(`DecoderConfig(mesh_axes=("fsdp", "tp"))`, i.e. `nnx.with_partitioning`) and created
on a (2, 4) mesh with axes `fsdp` and `tp`. Wrapping it gives adapters sharded like
their base weights: A over the mesh axes of the weight's input side, B over those of
its output side. The training step is an ordinary `nnx.jit` step; JAX partitions it
over the mesh, with the batch split over `fsdp`. The same model trained on one device,
from the same weights and data, must give the same losses.

Then the adapters are saved on the mesh and loaded into an unsharded model on one
device: same values, and the outputs match.

On a machine without accelerators this script gives JAX 8 CPU devices (it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing JAX). With
accelerators it uses those (a (2, 4) mesh needs 8 of them; fewer give a smaller mesh).

Run:  python examples/sharded_training.py           (full run, about a minute on 2 CPU cores)
      python examples/sharded_training.py --smoke   (a few steps, for CI)
Exits with status 1 if an adapter is not sharded like its base weight, a base weight
moved, the sharded losses differ from the single-device ones, or the checkpoint
loaded on one device differs.
"""

from __future__ import annotations

import os

# Before JAX starts: 8 CPU devices, unless the caller chose a count. The flag only
# concerns the CPU platform, so it changes nothing where an accelerator is used.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_peft
from nnx_peft.toy import TEXT_A, CharTokenizer, DecoderConfig, TinyDecoder, batches, next_token_loss

TARGET = r".*(q_proj|v_proj|o_proj|up_proj|down_proj)"


def make_mesh() -> jax.sharding.Mesh:
    """A (2, 4) mesh of 8 devices, or (n / 2, 2) / (1, 1) with fewer."""
    n = min(jax.device_count(), 8)
    tp = 4 if n == 8 else 2 if n % 2 == 0 else 1
    devices = np.array(jax.devices()[: (n // tp) * tp])
    return jax.make_mesh(
        (n // tp, tp), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


@nnx.jit
def train_step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(model: nnx_peft.PeftModel) -> jax.Array:
        return next_token_loss(model(x), y)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable_filter))
    loss, grads = grad_fn(model)
    optimizer.update(model, grads)
    # jit chooses the shardings of its outputs; keep the adapters and the optimizer
    # state where their sharding metadata says (a no-op without a mesh).
    if not jax.sharding.get_abstract_mesh().empty:
        for node, kind in ((model, model.trainable_filter), (optimizer, nnx.optimizer.OptState)):
            state = nnx.state(node, kind)
            nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return loss


def spec(x: jax.Array) -> tuple:
    """The partition spec of ``x``, padded to its rank."""
    entries = tuple(getattr(x.sharding, "spec", ()))
    return entries + (None,) * (x.ndim - len(entries))


def mesh_axes(specs: tuple) -> set[str]:
    """The mesh axes named anywhere in ``specs``."""
    return {n for e in specs for n in ((e,) if isinstance(e, str) else e or ())}


def paths(node: nnx.Module, kind: object) -> dict[str, jax.Array]:
    return {
        "/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(node, kind))
    }


def train(model, data, mesh) -> list[float]:
    """Trains ``model`` on ``data``; on ``mesh`` (batch split over 'fsdp') if given."""
    losses = []
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        optimizer = model.make_optimizer(optax.adam(3e-3))
        for x, y in data:
            if mesh is not None:
                x, y = (jax.device_put(a, NamedSharding(mesh, P("fsdp"))) for a in (x, y))
            losses.append(float(train_step(model, optimizer, x, y)))
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps only (CI)")
    args = parser.parse_args()
    steps = 4 if args.smoke else 150

    mesh = make_mesh()
    print(f"{jax.device_count()} {jax.default_backend()} devices; mesh {dict(mesh.shape)}")
    tokenizer = CharTokenizer(TEXT_A)
    vocab = -(-tokenizer.vocab_size // 8) * 8  # divisible by the mesh axes that shard it
    size = dict(num_layers=1, embed_dim=32, mlp_dim=64) if args.smoke else dict(num_layers=2)
    cfg = DecoderConfig(vocab_size=vocab, max_len=64, **size)
    stream = batches(tokenizer.encode(TEXT_A), batch_size=16, seq_len=32, seed=0)
    data = [next(stream) for _ in range(steps)]
    config = nnx_peft.LoraConfig(rank=8, alpha=16.0, target=TARGET)
    sample = jnp.zeros((1, 32), jnp.int32)

    # 1) The base model on the mesh: each weight created on its shards inside nnx.jit.
    sharded_cfg = dataclasses.replace(cfg, mesh_axes=("fsdp", "tp"))
    with jax.set_mesh(mesh):
        base = nnx.jit(lambda: TinyDecoder(sharded_cfg, rngs=nnx.Rngs(0)))()
        model = nnx_peft.PeftModel(base, config, sample, rngs=nnx.Rngs(1))
    base_specs = {p: spec(x) for p, x in paths(base, nnx.Param).items()}

    print("\nAdapter shardings (weight spec -> A spec, B spec):")
    adapters = paths(model.model, nnx_peft.AdapterParam)
    ok = True
    for info in model.adapters():
        if not info.module_path.startswith("layers/0/"):
            continue
        prefix = f"{info.module_path}/{info.weight}"
        weight, a, b = (
            base_specs[prefix],
            adapters[prefix + "_lora_a"],
            adapters[prefix + "_lora_b"],
        )
        print(f"  {info.module_path:22s} {weight!s:24s} -> A {spec(a)!s:22s} B {spec(b)}")
    for info in model.adapters():
        prefix = f"{info.module_path}/{info.weight}"
        weight = base_specs[prefix]
        a, b = spec(adapters[prefix + "_lora_a"]), spec(adapters[prefix + "_lora_b"])
        # Between them, A and B are sharded over every mesh axis of the weight (A over
        # the input side's, B over the output side's); the rank axes over none.
        if a[-1] is not None or b[0] is not None or mesh_axes(a + b) != mesh_axes(weight):
            print(f"FAIL: adapters of {prefix} are {a}, {b}; its weight is {weight}")
            ok = False

    # 2) Train on the mesh and on one device, from the same weights and data.
    started = time.perf_counter()
    sharded_losses = train(model, data, mesh)
    sharded_time = time.perf_counter() - started
    single = nnx_peft.PeftModel(
        TinyDecoder(cfg, rngs=nnx.Rngs(0)), config, sample, rngs=nnx.Rngs(1)
    )
    started = time.perf_counter()
    single_losses = train(single, data, None)
    single_time = time.perf_counter() - started
    worst = float(
        np.max(np.abs(np.array(sharded_losses) - single_losses) / np.array(single_losses))
    )
    print(
        f"\nLosses over {steps} steps (mesh {sharded_time:.1f} s, one device {single_time:.1f} s):"
    )
    for i in sorted({0, steps // 2, steps - 1}):
        print(f"  step {i:3d}: mesh {sharded_losses[i]:.6f}   one device {single_losses[i]:.6f}")
    print(f"  largest relative difference: {worst:.2e}")
    if worst > 1e-4:
        print("FAIL: the sharded losses differ from the single-device ones")
        ok = False
    frozen = paths(model.model, nnx_peft.FROZEN_PARAMS)
    moved = [p for p, x in frozen.items() if spec(x) != base_specs[p]]
    if moved or len(frozen) != len(base_specs):
        print(f"FAIL: base weights changed sharding: {moved}")
        ok = False

    # 3) Save on the mesh, load on one device.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(f"{tmp}/adapter")
        loaded = nnx_peft.PeftModel.from_pretrained(
            TinyDecoder(cfg, rngs=nnx.Rngs(0)), f"{tmp}/adapter", sample, rngs=nnx.Rngs(2)
        )
    trained = paths(model.model, nnx_peft.AdapterParam)
    same = all(
        np.array_equal(np.asarray(x), np.asarray(trained[p]))
        for p, x in paths(loaded.model, nnx_peft.AdapterParam).items()
    )
    model.eval()
    x = jnp.asarray(data[0][0])
    with jax.set_mesh(mesh):
        out_mesh = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    out_single = np.asarray(loaded(x))
    diff = float(np.max(np.abs(out_mesh - out_single)))
    print(
        f"\nCheckpoint saved on the mesh, loaded on one device: adapters identical: {same}, "
        f"largest output difference {diff:.1e}"
    )
    if not same or diff > 1e-4:
        print("FAIL: the checkpoint loaded on one device differs")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
