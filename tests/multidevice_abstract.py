"""Abstract and sharded wrapping on an 8-device CPU mesh: run as a script, report JSON.

``tests/test_abstract.py`` runs ``python tests/multidevice_abstract.py OUT.json`` in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and asserts on the
report; this script only measures. For a TinyDecoder laid out ``(fsdp, tp)`` on a 2 x 4
mesh, with LoRA and nf4 QLoRA, and abstract sample inputs, per way of building the
wrapper (``eager``: on concrete sample inputs; ``abstract_inputs``: on
``ShapeDtypeStruct`` ones; ``eval_shape``: ``nnx.eval_shape`` of the creation; ``jit``: the NNX
sharded-init pattern under ``nnx.jit``; ``orbax`` / ``safetensors``:
``PeftModel.from_base_weights`` from the base saved both ways):

- ``specs``: every variable's path to its array's partition spec (padded, as lists), and
  ``metadata``: the spec ``nnx.get_partition_spec`` gives;
- ``abstract``: whether every leaf is a ``ShapeDtypeStruct`` (``eval_shape`` only);
- ``equal``: whether every array equals the eager wrapper's bitwise, and ``max_diff`` of
  the outputs on a batch.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AxisType

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder

CFG = DecoderConfig(vocab_size=16, mesh_axes=("fsdp", "tp"))
SAMPLE = jax.ShapeDtypeStruct((2, 8), jnp.int32)
TOKENS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 16


def spec(x: Any) -> list[Any]:
    entries = list(getattr(getattr(x, "sharding", None), "spec", ()))
    entries += [None] * (len(x.shape) - len(entries))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def specs(model: nnx.Module) -> dict[str, Any]:
    return {
        "/".join(map(str, p)): spec(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))
    }


def metadata(model: nnx.Module) -> dict[str, Any]:
    out = {}
    for path, value in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model))):
        raw = value.get_value() if isinstance(value, nnx.Variable) else value
        out["/".join(map(str, path))] = (
            [list(e) if isinstance(e, tuple) else e for e in raw]
            if isinstance(raw, jax.sharding.PartitionSpec)
            else None
        )
    return out


def equal(a: nnx.Module, b: nnx.Module) -> bool:
    pairs = zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)), strict=True)
    return all(
        pa == pb and bool(np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())))
        for (pa, x), (pb, y) in pairs
    )


def main() -> None:
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    out: dict[str, Any] = {"device_count": jax.device_count()}
    with tempfile.TemporaryDirectory() as tmp, jax.set_mesh(mesh):
        base = TinyDecoder(CFG, rngs=nnx.Rngs(0))
        with ocp.StandardCheckpointer() as saver:
            saver.save(Path(tmp) / "orbax", nnx.state(base))
        from safetensors.numpy import save_file

        save_file(
            {
                "/".join(map(str, p)): np.asarray(v.get_value())
                for p, v in nnx.to_flat_state(nnx.state(base))
            },
            str(Path(tmp) / "base.safetensors"),
        )
        for qtype in (None, "nf4"):
            config = nnx_peft.LoraConfig(
                rank=2, alpha=4.0, target=r".*(proj|lm_head)", weight_qtype=qtype
            )

            def create(config: nnx_peft.LoraConfig = config) -> nnx_peft.PeftModel:
                model = nnx_peft.PeftModel(
                    TinyDecoder(CFG, rngs=nnx.Rngs(0)), config, SAMPLE, rngs=nnx.Rngs(1)
                )
                state = nnx.state(model)
                sharded = jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state))
                nnx.update(model, sharded)
                return model

            zeros = jnp.zeros(SAMPLE.shape, SAMPLE.dtype)
            eager = nnx_peft.PeftModel(base, config, zeros, rngs=nnx.Rngs(1))
            reference = np.asarray(eager(TOKENS))
            abstract = nnx.eval_shape(create)
            built = {
                "eager": eager,
                "abstract_inputs": nnx_peft.PeftModel(base, config, SAMPLE, rngs=nnx.Rngs(1)),
                "jit": nnx.jit(create)(),
                "orbax": nnx_peft.PeftModel.from_base_weights(
                    lambda: TinyDecoder(CFG, rngs=nnx.Rngs(3)),
                    Path(tmp) / "orbax",
                    config,
                    SAMPLE,
                    rngs=nnx.Rngs(1),
                ),
                "safetensors": nnx_peft.PeftModel.from_base_weights(
                    lambda: TinyDecoder(CFG, rngs=nnx.Rngs(3)),
                    Path(tmp) / "base.safetensors",
                    config,
                    SAMPLE,
                    rngs=nnx.Rngs(1),
                ),
            }
            report: dict[str, Any] = {
                "eval_shape": {
                    "specs": specs(abstract),
                    "metadata": metadata(abstract),
                    "abstract": all(
                        isinstance(x, jax.ShapeDtypeStruct)
                        and isinstance(x.sharding, jax.sharding.NamedSharding)
                        for x in jax.tree.leaves(nnx.state(abstract))
                    ),
                }
            }
            for name, model in built.items():
                report[name] = {
                    "specs": specs(model),
                    "metadata": metadata(model),
                    "equal": equal(eager, model),
                    "max_diff": float(np.max(np.abs(np.asarray(model(TOKENS)) - reference))),
                }
            out[str(qtype)] = report
    Path(sys.argv[1]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
