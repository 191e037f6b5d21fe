"""One process of a ``jax.distributed`` job on CPU: wrap, train, save, restore; report JSON.

``tests/test_multiprocess.py`` starts it as ``python tests/multiprocess_worker.py
PROCESS_ID NUM_PROCESSES PORT DEVICES WORKDIR`` (``DEVICES`` CPU devices per process,
gloo collectives over localhost), twice with two processes and once with one, and
compares the reports. Every process runs the same steps in the same order; the mesh
``(2, 2)`` ``('fsdp', 'tp')`` spans all devices of all processes. With ``--restore``
a single process loads what the two-process run saved instead.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

process_id, num_processes, port, devices = (int(a) for a in sys.argv[1:5])
workdir = Path(sys.argv[5])
restore_only = "--restore" in sys.argv
# A hang shows where it is: every thread's stack goes to stderr before the test's timeout
# (which kills this process), and the test prints that stderr.
faulthandler.dump_traceback_later(int(os.environ.get("NNX_PEFT_WORKER_DUMP_AFTER", "420")))
started = time.perf_counter()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
    )

import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nnx_peft  # noqa: E402
from nnx_peft.toy import DecoderConfig, TinyDecoder, next_token_loss  # noqa: E402

TINY = DecoderConfig(
    vocab_size=16,
    num_layers=1,
    embed_dim=16,
    num_heads=4,
    head_dim=4,
    mlp_dim=32,
    max_len=8,
    mesh_axes=("fsdp", "tp"),
)
CONFIG = nnx_peft.LoraConfig(
    rank=2, alpha=4.0, target=r".*(q_proj|v_proj|up_proj|down_proj)", dropout=0.1
)
STEPS = 3
report: dict[str, Any] = {"process": process_id}


def log(message: str) -> None:
    seconds = time.perf_counter() - started
    print(f"[{process_id}] {seconds:6.1f} s {message}", file=sys.stderr, flush=True)


mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def global_array(local: np.ndarray, spec: P) -> jax.Array:
    """``local`` (the same on every process) as an array sharded over the whole mesh."""
    return jax.make_array_from_callback(
        local.shape, NamedSharding(mesh, spec), lambda index: local[index]
    )


def gathered(tree: Any) -> Any:
    """Every array of ``tree`` as a host numpy array, gathered from all processes."""
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


def adapters(model: nnx_peft.PeftModel) -> dict[str, list[float]]:
    flat = nnx.to_flat_state(nnx.state(model.model, nnx_peft.AdapterParam))
    values = gathered({"/".join(map(str, p)): v.get_value() for p, v in flat})
    return {k: np.asarray(v, np.float64).ravel().tolist() for k, v in sorted(values.items())}


def build() -> tuple[TinyDecoder, nnx_peft.PeftModel]:
    with jax.set_mesh(mesh):
        base = nnx.jit(lambda: TinyDecoder(TINY, rngs=nnx.Rngs(0)))()
        sample = global_array(np.zeros((2, 8), np.int32), P("fsdp"))
        return base, nnx_peft.PeftModel(base, CONFIG, sample, rngs=nnx.Rngs(1))


@nnx.jit
def train_step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer[Any], x: Any, y: Any) -> Any:
    def loss_fn(model: nnx_peft.PeftModel) -> jax.Array:
        return next_token_loss(model(x), y)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, model.trainable_filter))
    loss, grads = grad_fn(model)
    optimizer.update(model, grads)
    return loss


rng = np.random.default_rng(0)
tokens = rng.integers(0, TINY.vocab_size, size=(STEPS, 4, 9)).astype(np.int32)
batches = [(global_array(t[:, :-1], P("fsdp")), global_array(t[:, 1:], P("fsdp"))) for t in tokens]
x_eval = batches[0][0]

if restore_only:
    # A single process loads the checkpoint the two-process job saved.
    base, _ = build()
    with jax.set_mesh(mesh):
        loaded = nnx_peft.PeftModel.from_pretrained(
            base, workdir / "adapter", x_eval, rngs=nnx.Rngs(7)
        )
        report["adapters"] = adapters(loaded)
        resumed = nnx_peft.PeftModel(base, CONFIG, x_eval, rngs=nnx.Rngs(8))
        optimizer = resumed.make_optimizer(optax.adam(1e-2))
        with ocp.CheckpointManager(workdir / "run") as manager:
            report["restored_step"] = resumed.restore_training_checkpoint(manager, optimizer)
        report["restored_adapters"] = adapters(resumed)
        report["optimizer_step"] = int(np.asarray(gathered(optimizer.step.get_value())))
    print(json.dumps(report))
    sys.exit(0)

log("jax initialized")
base, model = build()
log("wrapped")
with jax.set_mesh(mesh):
    optimizer = model.make_optimizer(optax.adam(1e-2))
    losses = [float(np.asarray(gathered(train_step(model, optimizer, x, y)))) for x, y in batches]
    report["losses"] = losses
    report["adapters"] = adapters(model)
    log("trained")

    model.save_adapter(workdir / "adapter", overwrite=True)
    log("saved adapter")
    with ocp.CheckpointManager(workdir / "run") as manager:
        assert model.save_training_checkpoint(manager, STEPS, optimizer)
        manager.wait_until_finished()
    log("saved training checkpoint")

    loaded = nnx_peft.PeftModel.from_pretrained(base, workdir / "adapter", x_eval, rngs=nnx.Rngs(7))
    report["loaded_equal"] = adapters(loaded) == report["adapters"]
    resumed = nnx_peft.PeftModel(base, CONFIG, x_eval, rngs=nnx.Rngs(8))
    resumed_optimizer = resumed.make_optimizer(optax.adam(1e-2))
    with ocp.CheckpointManager(workdir / "run") as manager:
        report["restored_step"] = resumed.restore_training_checkpoint(manager, resumed_optimizer)
    report["restored_equal"] = adapters(resumed) == report["adapters"]
    log("restored")

    model.eval()  # no dropout: the merged model has none
    outputs = np.asarray(gathered(model(x_eval)))
    merged = model.merge_and_unload()
    report["merged_error"] = float(np.abs(np.asarray(gathered(merged(x_eval))) - outputs).max())
    model.merge_adapter()
    in_place = np.asarray(gathered(model(x_eval)))
    report["merged_in_place_error"] = float(np.abs(in_place - outputs).max())
    model.unmerge_adapter()
    log("merged")

    model.save_safetensors(workdir / "adapter.safetensors")  # spread over both processes
    other = nnx_peft.PeftModel(base, CONFIG, x_eval, rngs=nnx.Rngs(9))
    other.load_safetensors(workdir / "adapter.safetensors")
    report["safetensors_equal"] = adapters(other) == report["adapters"]
    log("safetensors")

    model.shard_adapters({".*": (P(), P())})
    report["sharded_equal"] = adapters(model) == report["adapters"]
    log("resharded")
print(json.dumps(report))
