"""Scanned stacks on an 8-device CPU mesh: run as a script, report the results as JSON.

``tests/test_scanned.py`` runs ``python tests/multidevice_scanned.py OUT.json`` in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The toy decoder
with ``scan_layers=True`` and ``mesh_axes=('fsdp', 'tp')`` is built and wrapped on a
(2, 4) mesh. Reported: every adapter's actual spec and metadata spec; the losses of two
sharded training steps and of the same steps without a mesh; a ``shard_adapters``
override; a checkpoint saved on that mesh and restored on a (4, 2) mesh; and, for QLoRA
(nf4) on the same stacks, the quantized weights' specs and two steps' losses with and
without the mesh.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_peft
from nnx_peft._quantized import QuantizedWeight, weight_variables
from nnx_peft.toy import DecoderConfig, TinyDecoder, next_token_loss

CONFIG = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(q_proj|o_proj|up_proj|down_proj)")
QLORA = dataclasses.replace(CONFIG, weight_qtype="nf4")
TOKENS = np.arange(32, dtype=np.int32).reshape(4, 8) % 16


def cfg(mesh_axes: Any) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=16,
        num_layers=3,
        embed_dim=16,
        num_heads=4,
        head_dim=4,
        mlp_dim=32,
        max_len=8,
        mesh_axes=mesh_axes,
        scan_layers=True,
    )


def mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def wrapped(
    m: jax.sharding.Mesh | None, seed: int = 1, config: nnx_peft.LoraConfig = CONFIG
) -> nnx_peft.PeftModel:
    if m is None:
        base = TinyDecoder(cfg(None), rngs=nnx.Rngs(0))
        return nnx_peft.PeftModel(base, config, TOKENS[:1], rngs=nnx.Rngs(seed))
    with jax.set_mesh(m):
        base = TinyDecoder(cfg(("fsdp", "tp")), rngs=nnx.Rngs(0))
        return nnx_peft.PeftModel(base, config, TOKENS[:1], rngs=nnx.Rngs(seed))


def quantized(model: nnx_peft.PeftModel) -> dict[str, Any]:
    """The spec of the quantized values of every QLoRA weight, by module path."""
    return {
        "/".join(map(str, path)): spec(weight_variables(module.kernel)[0].get_value())
        for path, module in nnx.iter_modules(model.model)
        if isinstance(getattr(module, "kernel", None), QuantizedWeight)
    }


def spec(x: Any) -> list[Any]:
    sharding = getattr(x, "sharding", None)
    entries = list(getattr(sharding, "spec", ()))
    entries += [None] * (x.ndim - len(entries))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def adapters(model: nnx_peft.PeftModel) -> dict[str, Any]:
    report = {}
    for path, variable in nnx.to_flat_state(nnx.state(model.model, nnx_peft.AdapterParam)):
        names = variable.get_metadata().get("out_sharding")
        report["/".join(map(str, path))] = {
            "spec": spec(variable.get_value()),
            "metadata": None if names is None else list(names),
            "shape": list(variable.get_value().shape),
        }
    return report


def train(model: nnx_peft.PeftModel) -> list[float]:
    optimizer = model.make_optimizer(optax.adam(1e-2))

    @nnx.jit
    def step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer[Any], x: Any) -> Any:
        def loss(model: nnx_peft.PeftModel) -> Any:
            return next_token_loss(model(x[:, :-1]), x[:, 1:])

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(
            model
        )
        optimizer.update(model, grads)
        return value

    return [float(step(model, optimizer, jnp.asarray(TOKENS))) for _ in range(2)]


def main() -> None:
    out: dict[str, Any] = {}
    source = mesh((2, 4))
    model = wrapped(source)
    out["adapters"] = adapters(model)
    with jax.set_mesh(source):
        out["losses"] = train(model)
    out["reference_losses"] = train(wrapped(None))
    with jax.set_mesh(source):
        logits = np.asarray(model(TOKENS))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(Path(tmp) / "ckpt")
        target = mesh((4, 2))
        restored = wrapped(target, seed=7)
        restored.load_adapter(Path(tmp) / "ckpt")
        with jax.set_mesh(target):
            out["restored_max_diff"] = float(np.max(np.abs(np.asarray(restored(TOKENS)) - logits)))
        out["restored_adapters"] = adapters(restored)
    qlora = wrapped(source, config=QLORA)
    out["qlora_weights"] = quantized(qlora)
    with jax.set_mesh(source):
        out["qlora_losses"] = train(qlora)
    out["qlora_reference_losses"] = train(wrapped(None, config=QLORA))
    model.shard_adapters({r"layers/attn/q_proj": (P(None, None, None), P(None, None, None, "tp"))})
    out["override"] = {k: v for k, v in adapters(model).items() if "q_proj" in k}
    Path(sys.argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
