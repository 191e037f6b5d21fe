"""Sharded training on an 8-device CPU mesh: run as a script, report the results as JSON.

``tests/test_sharding.py`` runs ``python tests/multidevice_checks.py OUT.json`` in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the pytest
process has one device, fixed when JAX started) and asserts on the report. This script
only measures; the test module states what the results must be. Each layout compiles
its training step once; models are tiny.

Reported, per layout (data parallel, FSDP, FSDP x TP, DP x FSDP x TP), with partition
specs padded to full rank and written as lists:

- ``adapters``: every adapter's actual spec and the spec of its NNX metadata;
- ``base_before`` / ``base_after``: every base weight's spec before wrapping and after
  training (in the wrapper and in the original base model);
- ``optimizer``: the spec of every optimizer-state array of each adapter;
- ``losses``: the training losses; ``reference_losses`` has the single-device run.

and separately: a module with multi-axis ``nnx.LinearGeneral`` / ``nnx.Einsum``
kernels, QLoRA on a sharded base, sharding overrides, merging, and checkpoints saved on
one mesh and restored on others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder, next_token_loss

DEVICES = 8
TINY = DecoderConfig(
    vocab_size=16, num_layers=1, embed_dim=16, num_heads=4, head_dim=4, mlp_dim=32, max_len=8
)
CONFIG = nnx_peft.LoraConfig(
    rank=2, alpha=4.0, target=r".*(q_proj|v_proj|o_proj|up_proj|down_proj)"
)
STEPS = 3
SAMPLE = np.zeros((1, 8), np.int32)

#: name: (mesh shape, mesh axis names, DecoderConfig.mesh_axes, mesh axes of the batch)
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[Any, Any], Any]] = {
    "data_parallel": ((8,), ("data",), (None, None), "data"),
    "fsdp_tp": ((2, 4), ("fsdp", "tp"), ("fsdp", "tp"), "fsdp"),
    "dp_fsdp_tp": ((2, 2, 2), ("data", "fsdp", "tp"), ("fsdp", "tp"), ("data", "fsdp")),
}


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def spec_of(x: Any) -> Any:
    """The partition spec of ``x`` padded to its rank, as JSON; a string if not on a mesh."""
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        return type(sharding).__name__
    return padded(sharding.spec, x.ndim)


def padded(spec: Any, ndim: int) -> list[Any]:
    entries = [list(e) if isinstance(e, tuple) else e for e in tuple(spec)]
    return entries + [None] * (ndim - len(entries))


def path_of(path: tuple[Any, ...]) -> str:
    return "/".join(map(str, path))


def variables(node: Any, kind: Any) -> dict[str, nnx.Variable[Any]]:
    return {
        path_of(path): v
        for path, v in nnx.iter_graph(node)
        if isinstance(v, nnx.Variable) and isinstance(v, kind)
    }


def adapter_report(model: nnx_peft.PeftModel) -> dict[str, Any]:
    """Actual and metadata specs of every adapter, by path relative to ``model.model``."""
    specs = nnx.get_partition_spec(nnx.state(model.model, nnx_peft.AdapterParam))
    metadata = {path_of(p): v.get_value() for p, v in nnx.to_flat_state(specs)}
    return {
        path: {
            "shape": list(v.get_value().shape),
            "spec": spec_of(v.get_value()),
            "metadata": padded(metadata[path], v.get_value().ndim),
        }
        for path, v in variables(model.model, nnx_peft.AdapterParam).items()
    }


def base_specs(node: Any) -> dict[str, Any]:
    return {
        path.removeprefix("model/"): spec_of(v.get_value())
        for path, v in variables(node, nnx.Param).items()
        if not isinstance(v, nnx_peft.AdapterParam) and isinstance(v.get_value(), jax.Array)
    }


def optimizer_specs(optimizer: nnx.Optimizer[Any]) -> dict[str, Any]:
    """Specs of the optimizer's arrays of rank > 0 (moments), by path."""
    return {
        path: spec_of(v.get_value())
        for path, v in variables(optimizer, nnx.optimizer.OptState).items()
        if v.get_value().ndim > 0
    }


def data() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TINY.vocab_size, size=(STEPS, 8, 9)).astype(np.int32)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


@nnx.jit
def train_step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer[Any], x: Any, y: Any) -> Any:
    def loss_fn(model: nnx_peft.PeftModel) -> jax.Array:
        return next_token_loss(model(x), y)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable_filter))
    loss, grads = grad_fn(model)
    optimizer.update(model, grads)
    # jit picks its outputs' shardings; pin the updated arrays to their metadata's.
    on_mesh = not jax.sharding.get_abstract_mesh().empty
    for node, kind in ((model, model.trainable_filter), (optimizer, nnx.optimizer.OptState)):
        if not on_mesh:
            break
        state = nnx.state(node, kind)
        nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return loss


@nnx.jit
def eval_loss(model: nnx_peft.PeftModel, x: Any, y: Any) -> Any:
    return next_token_loss(model(x), y)


def build(
    mesh: jax.sharding.Mesh | None,
    mesh_axes: tuple[Any, Any] | None,
    config: nnx_peft.LoraConfig = CONFIG,
) -> tuple[TinyDecoder, nnx_peft.PeftModel]:
    """The base model (weights from seed 0) on ``mesh`` and its wrapper, made there.

    The sharded base is built inside ``nnx.jit``, so each weight is created on its
    shards; wrapping runs eagerly, as it does by default.
    """
    base = build_base(mesh, mesh_axes)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return base, nnx_peft.PeftModel(base, config, SAMPLE, rngs=nnx.Rngs(1))


def build_base(mesh: jax.sharding.Mesh | None, mesh_axes: tuple[Any, Any] | None) -> TinyDecoder:
    cfg = dataclasses.replace(TINY, mesh_axes=mesh_axes)
    if mesh is None:
        return TinyDecoder(cfg, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        return nnx.jit(lambda: TinyDecoder(cfg, rngs=nnx.Rngs(0)))()


def train(
    model: nnx_peft.PeftModel,
    mesh: jax.sharding.Mesh | None,
    batch_axes: Any,
    steps: list[tuple[np.ndarray, np.ndarray]],
    optimizer: nnx.Optimizer[Any] | None = None,
) -> tuple[list[float], nnx.Optimizer[Any]]:
    def put(a: np.ndarray) -> jax.Array:
        if mesh is None:
            return jnp.asarray(a)
        return jax.device_put(a, NamedSharding(mesh, P(batch_axes)))

    if mesh is None:
        optimizer = optimizer or model.make_optimizer(optax.adam(1e-2))
        return [float(train_step(model, optimizer, put(x), put(y))) for x, y in steps], optimizer
    with jax.set_mesh(mesh):
        optimizer = optimizer or model.make_optimizer(optax.adam(1e-2))
        losses = [float(train_step(model, optimizer, put(x), put(y))) for x, y in steps]
    return losses, optimizer


def values(node: Any, kind: Any) -> dict[str, np.ndarray]:
    return {p: np.asarray(v.get_value()) for p, v in variables(node, kind).items()}


def same_values(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- Checks ----------------------------------------------------------------------------------


def check_layouts(report: dict[str, Any]) -> dict[str, Any]:
    """Trains each layout; keeps the FSDP x TP model for the checkpoint checks."""
    steps = data()
    _, reference = build(None, None)
    report["reference_losses"], _ = train(reference, None, None, steps)
    kept: dict[str, Any] = {}
    report["layouts"] = {}
    for name, (shape, axes, mesh_axes, batch_axes) in LAYOUTS.items():
        mesh = make_mesh(shape, axes)
        base, model = build(mesh, mesh_axes)
        base_before = base_specs(base)
        adapters = adapter_report(model)
        losses, optimizer = train(model, mesh, batch_axes, steps)
        report["layouts"][name] = {
            "mesh": list(shape),
            "axes": list(axes),
            "mesh_axes": list(mesh_axes),
            "base_before": base_before,
            "base_after": base_specs(model),
            "base_model_after": base_specs(base),
            "adapters": adapters,
            "adapters_after": adapter_report(model),
            "optimizer": optimizer_specs(optimizer),
            "losses": losses,
        }
        if name == "fsdp_tp":
            kept = {"mesh": mesh, "model": model, "optimizer": optimizer}
    return kept


class MultiAxis(nnx.Module):
    """Multi-axis kernels: dot_generals that flatten several axes, and einsums that do not."""

    def __init__(self, mesh_axes: bool, *, rngs: nnx.Rngs) -> None:
        def init(*names: Any) -> Any:
            base = nnx.initializers.lecun_normal()
            return nnx.with_partitioning(base, names) if mesh_axes else base

        kw: dict[str, Any] = dict(use_bias=False, rngs=rngs)
        self.linear = nnx.Linear(16, 32, kernel_init=init("fsdp", "tp"), **kw)
        # (D, N, H): out axes N, H; heads sharded (Qwix's rule works), or head_dim (it does not).
        self.heads = nnx.LinearGeneral(16, (4, 8), kernel_init=init("fsdp", "tp", None), **kw)
        self.head_dim = nnx.LinearGeneral(16, (4, 8), kernel_init=init("fsdp", None, "tp"), **kw)
        # (N, H, D): contracting N, H; head_dim sharded.
        self.merge = nnx.LinearGeneral(
            (4, 8), 16, axis=(-2, -1), kernel_init=init(None, "tp", "fsdp"), **kw
        )
        self.einsum = nnx.Einsum(
            "btd,dnh->btnh", (16, 4, 8), kernel_init=init("fsdp", "tp", None), rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.merge(self.head_dim(x)) + self.merge(self.heads(x))
        return a + self.linear(x)[..., :16] + self.merge(self.einsum(x))


def check_multi_axis(report: dict[str, Any]) -> None:
    """Adapter specs of multi-axis kernels; loss and gradients equal the unsharded model's.

    The sharded base is wrapped outside its ``jax.set_mesh`` block: the adapters go to
    the mesh the weights are on. Adapters get random values first (B is zero at init).
    """
    mesh = make_mesh((2, 4), ("fsdp", "tp"))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    plain = nnx_peft.PeftModel(MultiAxis(False, rngs=nnx.Rngs(0)), config, x, rngs=nnx.Rngs(1))
    with jax.set_mesh(mesh):
        base = MultiAxis(True, rngs=nnx.Rngs(0))
    sharded = nnx_peft.PeftModel(base, config, x, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    for path, v in variables(plain.model, nnx_peft.AdapterParam).items():
        value = 0.1 * rng.standard_normal(v.get_value().shape).astype(np.float32)
        v.set_value(jnp.asarray(value))
        target = variables(sharded.model, nnx_peft.AdapterParam)[path]
        target.set_value(jax.device_put(value, target.get_value().sharding))

    @jax.jit
    def loss_and_grads(model: nnx_peft.PeftModel, x: jax.Array) -> Any:
        loss_fn = lambda m: jnp.mean(m(x) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx_peft.AdapterParam))(
            model
        )
        return loss, nnx.state(grads)

    with jax.set_mesh(mesh):
        loss, grads = loss_and_grads(sharded, x)
    plain_loss, plain_grads = loss_and_grads(plain, x)
    report["multi_axis"] = {
        "adapters": adapter_report(sharded),
        "loss": float(loss),
        "plain_loss": float(plain_loss),
        "grad_rel_diff": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True)
        ),
    }


def check_qlora(report: dict[str, Any]) -> None:
    config = dataclasses.replace(CONFIG, weight_qtype="nf4", tile_size=4)
    steps = data()
    _, reference = build(None, None, config)
    reference_losses, _ = train(reference, None, None, steps)
    mesh = make_mesh((2, 4), ("fsdp", "tp"))
    base, model = build(mesh, ("fsdp", "tp"), config)
    losses, optimizer = train(model, mesh, "fsdp", steps)
    quantized = {
        path.removeprefix("model/"): spec_of(v.get_value())
        for path, v in variables(model, nnx.Param).items()
        if "/array/" in path
    }
    report["qlora"] = {
        "adapters": adapter_report(model),
        "quantized": quantized,
        "base_model_after": base_specs(base),
        "optimizer": optimizer_specs(optimizer),
        "losses": losses,
        "reference_losses": reference_losses,
    }


def check_override(report: dict[str, Any], source: dict[str, Any]) -> None:
    """Overrides the FSDP x TP model's adapter shardings; the model computes the same."""
    mesh, model = source["mesh"], source["model"]
    x, y = (jax.device_put(a, NamedSharding(mesh, P("fsdp"))) for a in data()[0])
    with jax.set_mesh(mesh):
        loss_before = float(eval_loss(model, x, y))
    before = values(model.model, nnx_peft.AdapterParam)
    untouched = adapter_report(model)
    errors = {}
    for case, rules in {
        "axis_twice": {r".*up_proj": (P(), P(None, ("fsdp", "tp", "fsdp")))},
        "indivisible": {r".*o_proj": (P(None, None, "tp"), P())},  # o_proj's A is (4, 4, 2)
        "unknown_axis": {r".*o_proj": (P("model"), P())},
        "no_match": {r".*k_proj": (P(), P())},
    }.items():
        try:
            model.shard_adapters(rules)
        except nnx_peft.ShardingError as err:
            errors[case] = str(err)
    after_errors = adapter_report(model)
    model.shard_adapters(
        {
            r".*q_proj": (P(None, None), P(None, None, "tp")),
            r".*up_proj": (P(), P(None, ("fsdp", "tp"))),
        }
    )
    unchanged = same_values(values(model.model, nnx_peft.AdapterParam), before)
    moved = adapter_report(model)
    losses, optimizer = train(model, mesh, "fsdp", data()[:1])
    report["override"] = {
        "errors": errors,
        "untouched": untouched,
        "after_errors": after_errors,
        "values_unchanged": unchanged,
        "adapters": moved,
        "adapters_after": adapter_report(model),
        "optimizer": optimizer_specs(optimizer),
        "loss_before": loss_before,
        "losses": losses,
    }


def check_merge(report: dict[str, Any], source: dict[str, Any]) -> None:
    """Merges the trained FSDP x TP adapters in place and out: base layouts are kept."""
    model = source["model"]
    before = base_specs(model)
    kernels = values(model, nnx.Param)
    model.merge_adapter()
    merged = base_specs(model)
    merged_values = values(model, nnx.Param)
    model.unmerge_adapter()
    report["merge"] = {
        "before": before,
        "merged": merged,
        "merged_changed": not same_values(merged_values, kernels),
        "unmerged": base_specs(model),
        "unmerged_bitwise": same_values(values(model, nnx.Param), kernels),
        "merge_and_unload": base_specs(model.merge_and_unload()),
    }


def check_checkpoints(report: dict[str, Any], source: dict[str, Any], root: Path) -> None:
    """Saves on the (2, 4) mesh; restores on an (8,) FSDP mesh and on one device.

    Per target, one wrapper built by ``from_pretrained`` on that target receives, in
    turn, the adapter checkpoint, the safetensors file and the training checkpoint
    (its adapters zeroed before each load, so that every load has something to do),
    and then trains one more step, whose loss must equal the source's next loss.
    """
    model, optimizer = source["model"], source["optimizer"]
    model.save_adapter(root / "adapter")
    model.save_safetensors(root / "adapter.safetensors")
    with ocp.CheckpointManager(root / "run") as manager:
        model.save_training_checkpoint(manager, STEPS, optimizer)
        manager.wait_until_finished()
    saved_adapters = values(model.model, nnx_peft.AdapterParam)
    saved_optimizer = values(optimizer, nnx.optimizer.OptState)
    next_step = data()[:1]
    continued, _ = train(model, source["mesh"], "fsdp", next_step, optimizer)
    report["checkpoints"] = {"continued_loss": continued[0]}

    def zero_adapters(target: nnx_peft.PeftModel) -> None:
        for v in variables(target.model, nnx_peft.AdapterParam).values():
            v.set_value(jnp.zeros_like(v.get_value()))

    targets = {
        "mesh_8": (make_mesh((8,), ("fsdp",)), ("fsdp", None), "fsdp"),
        "single_device": (None, None, None),
    }
    for name, (mesh, mesh_axes, batch_axes) in targets.items():
        base = build_base(mesh, mesh_axes)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            loaded = nnx_peft.PeftModel.from_pretrained(
                base, root / "adapter", SAMPLE, rngs=nnx.Rngs(5), trainable=True
            )
            resumed_optimizer = loaded.make_optimizer(optax.adam(1e-2))
        result: dict[str, Any] = {
            "from_pretrained": {
                "adapters": adapter_report(loaded),
                "identical": same_values(
                    values(loaded.model, nnx_peft.AdapterParam), saved_adapters
                ),
            }
        }
        zero_adapters(loaded)
        loaded.load_safetensors(root / "adapter.safetensors", trainable=True)
        result["safetensors"] = {
            "adapters": adapter_report(loaded),
            "identical": same_values(values(loaded.model, nnx_peft.AdapterParam), saved_adapters),
        }
        zero_adapters(loaded)
        with ocp.CheckpointManager(root / "run") as manager:
            step = loaded.restore_training_checkpoint(manager, resumed_optimizer)
        result["training"] = {
            "step": step,
            "adapters": adapter_report(loaded),
            "optimizer": optimizer_specs(resumed_optimizer),
            "identical": same_values(values(loaded.model, nnx_peft.AdapterParam), saved_adapters)
            and same_values(values(resumed_optimizer, nnx.optimizer.OptState), saved_optimizer),
            "next_loss": train(loaded, mesh, batch_axes, next_step, resumed_optimizer)[0][0],
        }
        report["checkpoints"][name] = result


def main() -> None:
    out = Path(sys.argv[1])
    report: dict[str, Any] = {"device_count": jax.device_count(), "timings": {}}
    if jax.device_count() != DEVICES:
        out.write_text(json.dumps(report))
        sys.exit(f"expected {DEVICES} devices, got {jax.device_count()}; set XLA_FLAGS")
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        source = check_layouts(report)
        report["timings"]["layouts"] = time.perf_counter() - started
        for name, check in (
            ("checkpoints", lambda r: check_checkpoints(r, source, Path(root))),
            ("merge", lambda r: check_merge(r, source)),
            ("override", lambda r: check_override(r, source)),
            ("multi_axis", check_multi_axis),
            ("qlora", check_qlora),
        ):
            started = time.perf_counter()
            check(report)
            report["timings"][name] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    main()
