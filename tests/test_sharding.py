"""Adapters on a device mesh: derived shardings, overrides, training and checkpoints.

Invariants checked here:
- each adapter factor is sharded over the mesh axes of the weight axes it stands for
  (A: the weight's input side, B: its output side, the rank axis never), and its NNX
  metadata says so, so that ``nnx.get_partition_spec`` agrees with the arrays;
- optimizer state is sharded like the adapter it belongs to;
- wrapping, training, QLoRA quantization and merging leave every base weight where it
  was (never gathered or replicated);
- a training step on an 8-device mesh (data parallel, FSDP x TP, DP x FSDP x TP)
  gives the single-device losses;
- checkpoints saved on one mesh restore on another with identical values and the
  target's shardings;
- ``shard_adapters`` moves exactly what its rules select, or nothing and says why.

The pytest process has one device (fixed when JAX started), so the multi-device
checks run once, in a subprocess with ``--xla_force_host_platform_device_count=8``
(``tests/multidevice_checks.py``, about a minute on 2 CPU cores), whose JSON report the
``report`` tests assert on. They fail, never skip, when that subprocess fails or gets
another device count. It starts with this module and runs while the in-process tests,
which come first, do; those use one-device meshes, where a mesh axis of size 1 still
names the spec.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_peft
from nnx_peft import _sharding
from nnx_peft.toy import DecoderConfig, TinyDecoder

ROOT = Path(__file__).resolve().parent.parent
HELPER = ROOT / "tests" / "multidevice_checks.py"
#: Optimisation level 0 compiles much faster on CPU and is plenty for a correctness run.
CHILD_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
LAYOUTS = {  # name in the report: DecoderConfig.mesh_axes
    "data_parallel": (None, None),
    "fsdp_tp": ("fsdp", "tp"),
    "dp_fsdp_tp": ("fsdp", "tp"),
}
INIT = nnx.initializers.lecun_normal()


def mesh_1x1() -> jax.sharding.Mesh:
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def expected_adapters(fsdp: str | None, tp: str | None) -> dict[str, list[Any]]:
    """The adapter specs of ``multidevice_checks.CONFIG`` on a TinyDecoder laid out (fsdp, tp).

    q/v kernels (D, N, H) are (fsdp, tp, None): A (D, r), B (r, N, H). The o kernel
    (N, H, D) is (tp, None, fsdp): A (N, H, r), B (r, D). up (D, F) is (fsdp, tp), down
    (F, D) is (tp, fsdp): A (in, r), B (r, out).
    """
    attn = "layers/0/attn"
    mlp = "layers/0/mlp"
    return {
        f"{attn}/q_proj/kernel_lora_a": [fsdp, None],
        f"{attn}/q_proj/kernel_lora_b": [None, tp, None],
        f"{attn}/v_proj/kernel_lora_a": [fsdp, None],
        f"{attn}/v_proj/kernel_lora_b": [None, tp, None],
        f"{attn}/o_proj/kernel_lora_a": [tp, None, None],
        f"{attn}/o_proj/kernel_lora_b": [None, fsdp],
        f"{mlp}/up_proj/kernel_lora_a": [fsdp, None],
        f"{mlp}/up_proj/kernel_lora_b": [None, tp],
        f"{mlp}/down_proj/kernel_lora_a": [tp, None],
        f"{mlp}/down_proj/kernel_lora_b": [None, fsdp],
    }


def expected_base(fsdp: str | None, tp: str | None) -> dict[str, list[Any]]:
    """The TinyDecoder weight specs ``DecoderConfig.mesh_axes`` documents."""
    return {
        "embed/embedding": [tp, fsdp],
        "pos_embed": [None, fsdp],
        "layers/0/attn_norm/scale": [None],
        "layers/0/mlp_norm/scale": [None],
        "final_norm/scale": [None],
        **{f"layers/0/attn/{p}_proj/kernel": [fsdp, tp, None] for p in "qkv"},
        "layers/0/attn/o_proj/kernel": [tp, None, fsdp],
        "layers/0/mlp/gate_proj/kernel": [fsdp, tp],
        "layers/0/mlp/up_proj/kernel": [fsdp, tp],
        "layers/0/mlp/down_proj/kernel": [tp, fsdp],
        "lm_head/kernel": [fsdp, tp],
    }


def specs(adapters: dict[str, Any], key: str = "spec") -> dict[str, Any]:
    return {path: entry[key] for path, entry in adapters.items()}


def optimizer_by_adapter(optimizer: dict[str, Any]) -> dict[str, set[Any]]:
    """The specs of the optimizer arrays of each adapter (``.../mu/model/<path>``)."""
    found: dict[str, set[Any]] = {}
    for path, spec in optimizer.items():
        adapter = path.split("/model/", 1)[1]
        found.setdefault(adapter, set()).add(json.dumps(spec))
    return found


def assert_optimizer_follows(optimizer: dict[str, Any], adapters: dict[str, Any]) -> None:
    assert len(optimizer) == 2 * len(adapters)  # adam: mu and nu for each adapter
    expected = {path: {json.dumps(entry["spec"])} for path, entry in adapters.items()}
    assert optimizer_by_adapter(optimizer) == expected


# --- In this process: the rule, metadata, overrides and errors ---------------------------------


@pytest.mark.parametrize(
    ("spec", "groups", "shape", "expected"),
    [
        # nnx.Linear (D, F) as (fsdp, tp): A (D, r), B (r, F).
        (("fsdp", "tp"), [0, None], (16, 2), ("fsdp", None)),
        (("fsdp", "tp"), [None, 1], (2, 32), (None, "tp")),
        # A flattened group takes the mesh axes of all its axes, in order.
        (("fsdp", None, "tp"), [None, (1, 2)], (2, 32), (None, "tp")),
        (("x", "tp", "fsdp"), [None, (1, 2)], (2, 32), (None, ("tp", "fsdp"))),
        ((("a", "b"), "c"), [(0, 1), None], (8, 2), (("a", "b", "c"), None)),
        # Batch axes keep theirs; an axis of size 1 is never sharded.
        (("data", "fsdp", "tp"), [0, None, 2], (4, 2, 8), ("data", None, "tp")),
        (("fsdp", "tp"), [0, None], (1, 2), (None, None)),
    ],
)
def test_derive_spec(spec: Any, groups: Any, shape: Any, expected: Any) -> None:
    assert _sharding.derive_spec(spec, groups, shape) == expected


class _Heads(nnx.Module):
    """A LinearGeneral (D, N, H) whose head_dim axis is sharded, and an Einsum."""

    def __init__(self, names: Any, rngs: nnx.Rngs, **metadata: Any) -> None:
        init = nnx.with_partitioning(INIT, names, **metadata)
        self.proj = nnx.LinearGeneral(8, (2, 4), kernel_init=init, use_bias=False, rngs=rngs)
        self.einsum = nnx.Einsum("bd,dnh->bnh", (8, 2, 4), kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x) + self.einsum(x)


def _adapter_specs(model: nnx_peft.PeftModel) -> dict[str, tuple[Any, Any, Any]]:
    """(actual spec, out_sharding metadata, nnx.get_partition_spec) of every adapter."""
    state = nnx.state(model.model, nnx_peft.AdapterParam)
    pspecs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    return {
        "/".join(map(str, path)): (
            getattr(v.get_value().sharding, "spec", None),
            v.get_metadata().get("out_sharding"),
            pspecs[path].get_value(),
        )
        for path, v in nnx.to_flat_state(state)
    }


def test_wrapping_outside_the_mesh_block_uses_the_weights_mesh() -> None:
    with jax.set_mesh(mesh_1x1()):
        base = _Heads(("fsdp", None, "tp"), nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
    model = nnx_peft.PeftModel(base, config, jnp.ones((1, 8)), rngs=nnx.Rngs(1))
    assert _adapter_specs(model) == {
        "proj/kernel_lora_a": (P("fsdp", None), ("fsdp", None), P("fsdp", None)),
        "proj/kernel_lora_b": (P(None, "tp"), (None, "tp"), P(None, "tp")),
        "einsum/kernel_lora_a": (P("fsdp", None), ("fsdp", None), P("fsdp", None)),
        "einsum/kernel_lora_b": (P(None, None, "tp"), (None, None, "tp"), P(None, None, "tp")),
    }
    optimizer = model.make_optimizer(optax.adam(1e-3))  # outside the block too
    mu = optimizer.opt_state[0].mu["model"]["proj"]["kernel_lora_b"]
    assert mu.get_value().sharding.spec == P(None, "tp")


def test_added_and_combined_adapters_are_sharded_as_the_first() -> None:
    """Adapters sharing a weight share its layout: each name's factors get the same specs."""
    with jax.set_mesh(mesh_1x1()):
        base = _Heads(("fsdp", None, "tp"), nnx.Rngs(0))
        config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        model = nnx_peft.PeftModel(base, config, jnp.ones((1, 8)), rngs=nnx.Rngs(1))
        model.add_adapter("other", dataclasses.replace(config, rank=3), rngs=nnx.Rngs(2))
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", "cat")
    specs = _adapter_specs(model)
    first = {k: v for k, v in specs.items() if "__" not in k}
    for name in ("other", "both"):
        assert {
            k.removesuffix(f"__{name}"): v for k, v in specs.items() if k.endswith(name)
        } == first


def test_convolution_adapters_follow_the_kernel() -> None:
    init = nnx.with_partitioning(INIT, (None, None, "fsdp", "tp"))
    with jax.set_mesh(mesh_1x1()):
        base = nnx.Conv(2, 4, (3, 3), kernel_init=init, use_bias=False, rngs=nnx.Rngs(0))
        config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        model = nnx_peft.PeftModel(base, config, jnp.ones((1, 5, 5, 2)), rngs=nnx.Rngs(1))
    a_spec = P(None, None, "fsdp", None)
    assert _adapter_specs(model) == {
        "kernel_lora_a": (a_spec, (None, None, "fsdp", None), a_spec),
        "kernel_lora_b": (P(None, "tp"), (None, "tp"), P(None, "tp")),
    }


def test_logical_axis_names_are_kept_in_the_metadata() -> None:
    """Metadata in logical names stays logical, so the same rules resolve it."""
    rules = (("embed", "fsdp"), ("heads", "tp"), ("kv", None))
    with jax.set_mesh(mesh_1x1()):
        base = _Heads(("embed", "heads", "kv"), nnx.Rngs(0), sharding_rules=rules)
        config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        model = nnx_peft.PeftModel(base, config, jnp.ones((1, 8)), rngs=nnx.Rngs(1))
    assert _adapter_specs(model) == {
        "proj/kernel_lora_a": (P("fsdp", None), ("embed", None), P("fsdp", None)),
        "proj/kernel_lora_b": (P(None, "tp"), (None, "heads"), P(None, "tp")),
        "einsum/kernel_lora_a": (P("fsdp", None), ("embed", None), P("fsdp", None)),
        "einsum/kernel_lora_b": (P(None, "tp", None), (None, "heads", "kv"), P(None, "tp", None)),
    }


def test_an_unsharded_model_gets_unsharded_adapters() -> None:
    cfg = DecoderConfig(
        vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=16, max_len=8
    )
    base = TinyDecoder(cfg, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*q_proj")
    model = nnx_peft.PeftModel(base, config, jnp.zeros((1, 4), jnp.int32), rngs=nnx.Rngs(1))
    for actual, metadata, pspec in _adapter_specs(model).values():
        assert actual is None and metadata is None and pspec == P()  # SingleDeviceSharding


def test_toy_decoder_mesh_axes_annotate_without_changing_values() -> None:
    cfg = DecoderConfig(
        vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=16, max_len=8
    )
    plain = TinyDecoder(cfg, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh_1x1()):
        annotated = TinyDecoder(
            DecoderConfig(**{**vars(cfg), "mesh_axes": ("fsdp", "tp")}), rngs=nnx.Rngs(0)
        )
    for a, b in zip(
        jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(annotated)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    metadata = {
        "/".join(map(str, path)): v.get_metadata().get("out_sharding")
        for path, v in nnx.to_flat_state(nnx.state(annotated, nnx.Param))
    }
    expected = {path: tuple(spec) for path, spec in expected_base("fsdp", "tp").items()}
    assert metadata == expected
    assert plain.layers[0].attn.q_proj.kernel.get_metadata().get("out_sharding") is None


def _sharded_linear() -> nnx_peft.PeftModel:
    with jax.set_mesh(mesh_1x1()):
        base = nnx.Linear(
            8, 4, kernel_init=nnx.with_partitioning(INIT, ("fsdp", "tp")), rngs=nnx.Rngs(0)
        )
        config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        return nnx_peft.PeftModel(base, config, jnp.ones((1, 8)), rngs=nnx.Rngs(1))


def test_shard_adapters_moves_arrays_and_metadata() -> None:
    model = _sharded_linear()
    before = {
        k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam))
    }
    model.shard_adapters({".*": (["tp", None], P(None, ("fsdp", "tp")))})  # lists work too
    assert _adapter_specs(model) == {
        "kernel_lora_a": (P("tp", None), ("tp", None), P("tp", None)),
        "kernel_lora_b": (P(None, ("fsdp", "tp")), (None, ("fsdp", "tp")), P(None, ("fsdp", "tp"))),
    }
    after = dict(nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam)))
    for key, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[key]), value)
    model.shard_adapters({".*": (P(), P())})  # missing trailing entries are None
    assert _adapter_specs(model)["kernel_lora_a"] == (P(None, None), (None, None), P(None, None))


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([(".*", (P(), P()))], "non-empty mapping of module-path regexes"),
        ({}, "non-empty mapping of module-path regexes"),
        ({"(": (P(), P())}, "is not a valid regex"),
        ({"": (P(), P())}, "rule keys are non-empty regex strings"),
        ({".*": P()}, "must map to a pair (A spec, B spec)"),
        ({".*": (P(), P(), P())}, "gives a magnitude spec, but the adapter of '' is not a DoRA"),
        ({".*": (P(), P(), P(), P())}, "must map to a pair (A spec, B spec)"),
        ({".*": {"kernel": P()}}, "which is for modules_to_save modules"),
        ({".*": ("fsdp", P())}, "the A spec must be a PartitionSpec or a list"),
        ({".*": (P(), [None, 3])}, "has the entry 3"),
        ({".*": (P(None, None, None), P())}, "more entries than its 2 axes"),
        ({".*": (P("model"), P())}, "over ['model'], which the mesh of its base weights lacks"),
        ({".*": (P(("fsdp", "tp")), P(None, "tp"))}, None),  # fine: the control case
        ({".*": (P("fsdp", "fsdp"), P())}, "uses a mesh axis twice"),
        ({"layers/.*": (P(), P())}, "rules ['layers/.*'] select no adapted module"),
    ],
)
def test_shard_adapters_refuses_bad_rules(rules: Any, message: str | None) -> None:
    model = _sharded_linear()
    before = _adapter_specs(model)
    if message is None:
        model.shard_adapters(rules)
        return
    with pytest.raises(nnx_peft.ShardingError) as info:
        model.shard_adapters(rules)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert _adapter_specs(model) == before  # nothing moved


def test_shard_adapters_needs_a_mesh() -> None:
    model = nnx_peft.PeftModel(
        nnx.Linear(8, 4, rngs=nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*"),
        jnp.ones((1, 8)),
        rngs=nnx.Rngs(1),
    )
    with pytest.raises(nnx_peft.ShardingError, match="kernel_lora_a is not on a device mesh"):
        model.shard_adapters({".*": (P(), P())})


def test_safetensors_export_refuses_arrays_spread_over_hosts() -> None:
    class Spread:
        is_fully_addressable = False

    local = jnp.ones(2)
    _sharding.require_addressable({"a": local}, "save_safetensors")  # fine on one host
    with pytest.raises(nnx_peft.ShardingError, match="spread over several hosts"):
        _sharding.require_addressable({"a": local, "b": Spread()}, "save_safetensors")  # type: ignore[dict-item]


def test_place_quantized_keeps_what_divides() -> None:
    """A scale's axis of tiles keeps the weight's mesh axis only where it divides."""
    mesh = jax.make_mesh((1,), ("tp",), axis_types=(AxisType.Auto,))
    weight = jax.device_put(jnp.ones((4, 6)), NamedSharding(mesh, P("tp", None)))
    qvalue = nnx.Param(jnp.ones((4, 6)), out_sharding=("tp", None), eager_sharding=False)
    scale = nnx.Param(jnp.ones((1, 6)), out_sharding=(None, None), eager_sharding=False)
    _sharding.place_quantized(weight, [qvalue, scale])
    assert qvalue.get_value().sharding.spec == P("tp", None)
    assert scale.get_value().sharding.spec == P(None, None)
    assert qvalue.get_metadata()["out_sharding"] == ("tp", None)


# --- The multi-device report ------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def multidevice_child(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen[str], Path] | None]:
    """Starts ``tests/multidevice_checks.py`` on 8 CPU devices, if a selected test needs it.

    It starts with the module, so it runs while the in-process tests (first in this
    file) do; ``report`` waits for it.
    """
    needed = any(
        "report" in item.fixturenames for item in request.session.items if item.path == request.path
    )
    if not needed:
        yield None
        return
    out = tmp_path_factory.mktemp("multidevice") / "report.json"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {CHILD_XLA_FLAGS}".strip(),
    }
    child = subprocess.Popen(
        [sys.executable, str(HELPER), str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield child, out
    if child.poll() is None:
        child.kill()
        child.communicate()


@pytest.fixture(scope="module")
def report(multidevice_child: tuple[subprocess.Popen[str], Path] | None) -> dict[str, Any]:
    """The JSON report of ``tests/multidevice_checks.py``, once it has finished."""
    assert multidevice_child is not None
    child, out = multidevice_child
    try:
        _, stderr = child.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        child.kill()
        _, stderr = child.communicate()
    assert child.returncode == 0, (
        f"tests/multidevice_checks.py failed (exit {child.returncode}):\n{stderr[-6000:]}"
    )
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_multidevice_checks_ran_on_eight_devices(report: dict[str, Any]) -> None:
    assert report["device_count"] == 8
    expected = {"layouts", "checkpoints", "merge", "override", "multi_axis", "qlora"}
    assert set(report["timings"]) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapters_are_sharded_like_their_base_weight(report: dict[str, Any], layout: str) -> None:
    result = report["layouts"][layout]
    fsdp, tp = LAYOUTS[layout]
    assert specs(result["adapters"]) == expected_adapters(fsdp, tp)
    # The NNX metadata says the same, so nnx.get_partition_spec (and shardings derived
    # from it, for jax.jit or checkpoint restore targets) match the arrays.
    assert specs(result["adapters"], "metadata") == expected_adapters(fsdp, tp)
    # A training step keeps them there.
    assert specs(result["adapters_after"]) == expected_adapters(fsdp, tp)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_optimizer_state_is_sharded_like_the_adapters(report: dict[str, Any], layout: str) -> None:
    result = report["layouts"][layout]
    assert_optimizer_follows(result["optimizer"], result["adapters"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_base_weights_keep_their_sharding(report: dict[str, Any], layout: str) -> None:
    result = report["layouts"][layout]
    expected = expected_base(*LAYOUTS[layout])
    assert result["base_before"] == expected
    assert result["base_after"] == expected  # in the wrapper, after training
    assert result["base_model_after"] == expected  # the original base model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_losses_equal_the_single_device_run(report: dict[str, Any], layout: str) -> None:
    result = report["layouts"][layout]
    assert len(result["losses"]) == 3
    np.testing.assert_allclose(result["losses"], report["reference_losses"], rtol=1e-5)


def test_multi_axis_kernels(report: dict[str, Any]) -> None:
    """Flattened dot_general axes are sharded over the mesh axes of all their weight axes.

    Qwix alone keeps the first axis's only: ``head_dim`` (kernel (D, N, H) sharded
    (fsdp, None, tp)) would get B (r, N*H) replicated, ``merge`` (kernel (N, H, D)
    sharded (None, tp, fsdp), contracting N and H) A (N*H, r) replicated.
    """
    result = report["multi_axis"]
    assert specs(result["adapters"]) == {
        "linear/kernel_lora_a": ["fsdp", None],  # nnx.Linear (D, F): (fsdp, tp)
        "linear/kernel_lora_b": [None, "tp"],
        "heads/kernel_lora_a": ["fsdp", None],  # LinearGeneral (D, N, H): (fsdp, tp, None)
        "heads/kernel_lora_b": [None, "tp"],
        "head_dim/kernel_lora_a": ["fsdp", None],  # LinearGeneral (D, N, H): (fsdp, None, tp)
        "head_dim/kernel_lora_b": [None, "tp"],
        "merge/kernel_lora_a": ["tp", None],  # LinearGeneral (N, H, D): (None, tp, fsdp)
        "merge/kernel_lora_b": [None, "fsdp"],
        "einsum/kernel_lora_a": ["fsdp", None],  # 'btd,dnh->btnh' (D, N, H): (fsdp, tp, None)
        "einsum/kernel_lora_b": [None, "tp", None],
    }
    assert specs(result["adapters"], "metadata") == specs(result["adapters"])
    np.testing.assert_allclose(result["loss"], result["plain_loss"], rtol=1e-5)
    assert result["grad_rel_diff"] < 1e-5


def test_qlora_on_a_sharded_base(report: dict[str, Any]) -> None:
    result = report["qlora"]
    assert specs(result["adapters"]) == expected_adapters("fsdp", "tp")
    assert specs(result["adapters"], "metadata") == expected_adapters("fsdp", "tp")
    base = expected_base("fsdp", "tp")
    # The 4-bit values keep the float weight's layout (Qwix's eager quantization alone
    # leaves e.g. q_proj's values replicated over 'tp'); the base model is untouched.
    kernels = {path.rsplit("/", 1)[0] + "/kernel" for path in expected_adapters(None, None)}
    qvalues = {
        path.removesuffix("/array/qvalue"): spec
        for path, spec in result["quantized"].items()
        if path.endswith("/qvalue")
    }
    assert qvalues == {kernel: base[kernel] for kernel in kernels}
    # Scales keep the weight's mesh axis where it divides their (tiled or reduced) axis.
    for path, spec in result["quantized"].items():
        weight = base[path.split("/array/")[0]]
        assert all(s in (None, w) for s, w in zip(spec, weight, strict=True)), path
    assert result["base_model_after"] == base
    assert_optimizer_follows(result["optimizer"], result["adapters"])
    np.testing.assert_allclose(result["losses"], result["reference_losses"], rtol=1e-5)


def test_merging_keeps_base_weight_shardings(report: dict[str, Any]) -> None:
    result = report["merge"]
    base = expected_base("fsdp", "tp")
    assert result["merged_changed"]  # trained adapters: merging changes the weights
    assert result["before"] == result["merged"] == result["unmerged"] == base
    assert result["unmerged_bitwise"]
    assert result["merge_and_unload"] == base


def test_override_moves_the_selected_adapters(report: dict[str, Any]) -> None:
    result = report["override"]
    expected = expected_adapters("fsdp", "tp") | {
        "layers/0/attn/q_proj/kernel_lora_a": [None, None],
        "layers/0/attn/q_proj/kernel_lora_b": [None, None, "tp"],
        "layers/0/mlp/up_proj/kernel_lora_a": [None, None],
        "layers/0/mlp/up_proj/kernel_lora_b": [None, ["fsdp", "tp"]],
    }
    assert specs(result["adapters"]) == expected
    assert specs(result["adapters"], "metadata") == expected
    assert specs(result["adapters_after"]) == expected
    assert result["values_unchanged"]
    assert_optimizer_follows(result["optimizer"], result["adapters"])
    # The first loss of the step is computed before the update: the function is unchanged.
    np.testing.assert_allclose(result["losses"][0], result["loss_before"], rtol=1e-6)


def test_override_errors_on_a_real_mesh_move_nothing(report: dict[str, Any]) -> None:
    result = report["override"]
    errors = result["errors"]
    assert "uses a mesh axis twice" in errors["axis_twice"]
    assert "4 devices, which do not divide it" in errors["indivisible"]
    assert "kernel_lora_a (size 2)" in errors["indivisible"]
    assert "['model'], which the mesh of its base weights lacks" in errors["unknown_axis"]
    assert "select no adapted module" in errors["no_match"]
    assert "'layers/0/attn/q_proj'" in errors["no_match"]  # lists the adapted paths
    assert result["after_errors"] == result["untouched"]


@pytest.mark.parametrize("target", ["mesh_8", "single_device"])
def test_checkpoints_restore_across_meshes(report: dict[str, Any], target: str) -> None:
    """Saved on the (2, 4) FSDP x TP mesh; loaded on an (8,) FSDP mesh and on one device."""
    checkpoints = report["checkpoints"]
    result = checkpoints[target]
    if target == "mesh_8":
        expected = expected_adapters("fsdp", None)
        metadata = expected
    else:
        expected = {p: "SingleDeviceSharding" for p in expected_adapters(None, None)}
        metadata = expected_adapters(None, None)
    for how in ("from_pretrained", "safetensors", "training"):
        assert result[how]["identical"], how  # bit for bit (and the optimizer state)
        assert specs(result[how]["adapters"]) == expected, how
        assert specs(result[how]["adapters"], "metadata") == metadata, how
    assert result["training"]["step"] == 3
    assert_optimizer_follows(result["training"]["optimizer"], result["training"]["adapters"])
    # Training resumed on the target continues exactly as on the source mesh.
    np.testing.assert_allclose(
        result["training"]["next_loss"], checkpoints["continued_loss"], rtol=1e-5
    )


def test_sharding_of_never_asks_a_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Asking a tracer for `.sharding` raises an AttributeError whose message JAX builds by
    # walking the trace so far: asked once per weight, a traced wrap grew with depth squared.
    def asked(self: object) -> None:
        pytest.fail("sharding_of asked a tracer for its sharding")

    monkeypatch.setattr(jax.core.Tracer, "sharding", property(asked))
    seen: list[object] = []

    def traced(x: jax.Array) -> jax.Array:
        seen.append(_sharding.sharding_of(x))
        return x

    jax.jit(traced)(jnp.ones(3))
    assert seen == [None]
    concrete = jnp.ones(3)
    assert _sharding.sharding_of(concrete) == concrete.sharding
    assert _sharding.sharding_of(np.ones(3)) is None
