"""Guards on the Qwix internals nnx_peft uses (all of them in nnx_peft/_qwix_bridge.py).

If a Qwix release renames, moves or changes one of these, this file fails
first, naming the piece that changed, instead of adapters silently going wrong.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import nnx_peft

# (module, attribute, parameter names the bridge passes, in order)
USED_INTERNALS = [
    (
        "qwix._src.providers.lora",
        "_create_lora_layer_shapes",
        ["rhs_ca", "rhs_ba", "rhs_ra", "contract_shape", "batch_shape", "remain_shape", "rank"],
    ),
    (
        "qwix._src.providers.lora",
        "_parse_einsum_str_for_lora",
        ["lhs_shape", "rhs_shape", "einsum_str", "lora_rank"],
    ),
    ("qwix._src.providers.ptq", "PtqProvider", None),
    ("qwix._src.providers.ptq", "WithAux", None),
    (
        "qwix._src.core.dot_general",
        "get_how_to_quantize",
        ["dimension_numbers", "ndims", "for_lhs", "tile_size"],
    ),
    (
        "qwix._src.core.einsum",
        "get_how_to_quantize",
        ["einsum_str", "ndims", "for_lhs", "tile_size"],
    ),
    ("qwix._src.utils.flax_util", "find_param", ["x", "ptq_array_type"]),
    ("qwix._src.utils.flax_util", "get_current_module", []),
    ("qwix._src.utils.flax_util", "get_current_module_path", []),
    (
        "qwix._src.utils.flax_util",
        "get_or_create_param",
        ["name", "init_fn", "nnx_param_type", "need_rng"],
    ),
    ("qwix._src.utils.flax_util", "unbox", ["maybe_boxed"]),
    # One adapted class per base class: its methods intercept with the instance's provider.
    ("qwix._src.model", "_apply_interceptors", ["method", "provider", "output_transform"]),
    ("qwix._src.model", "_output_transform_nnx", ["provider", "method_name", "output"]),
]


@pytest.mark.parametrize(("module", "name", "params"), USED_INTERNALS, ids=lambda v: str(v))
def test_qwix_internal_still_exists(module: str, name: str, params: list[str] | None) -> None:
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"Qwix no longer has {module}.{name}; update nnx_peft/_qwix_bridge.py"
    if params is not None:
        actual = list(inspect.signature(obj).parameters)
        assert actual[: len(params)] == params, (
            f"{module}.{name} now takes {actual}; nnx_peft/_qwix_bridge.py passes {params}"
        )


def test_provider_hooks_still_exist() -> None:
    for hook in ("dot_general", "einsum", "conv_general_dilated", "_get_current_rule_and_op_id"):
        assert hasattr(qwix.LoraProvider, hook), f"qwix.LoraProvider.{hook} is gone"
    # The recording provider ('all-linear', inspect_targets) reads the model's output here.
    params = list(inspect.signature(qwix.LoraProvider.process_model_output).parameters)
    assert params == ["self", "method_name", "model_output"], params
    params = inspect.signature(qwix.LoraProvider._get_current_rule_and_op_id).parameters
    assert {"op_name", "only_rule", "repeated_call"} <= set(params)
    assert {"rank", "alpha", "dropout", "lora_a_initializer", "lora_b_initializer"} <= {
        f for f in qwix.LoraRule.__dataclass_fields__
    }


def test_module_attributes_are_set_before_the_first_call() -> None:
    """Scanned stacks rely on these: when ``process_model_inputs`` runs for the sample call,
    Qwix has set ``qwix_path``, ``qwix_rngs`` and ``disable_quant_stats_update`` on every
    module (the bridge then takes the RNGs off, and finds layer copies by path)."""
    params = list(inspect.signature(qwix.LoraProvider.process_model_inputs).parameters)
    assert params == ["self", "model", "model_args", "model_kwargs"], params
    seen = []

    class Probe(qwix.LoraProvider):
        def process_model_inputs(self, model, model_args, model_kwargs):  # type: ignore[no-untyped-def]
            seen.extend(
                (m.qwix_path, type(m.qwix_rngs), m.disable_quant_stats_update)
                for _, m in nnx.iter_modules(model)
            )
            return super().process_model_inputs(model, model_args, model_kwargs)

    qwix.apply_lora_to_model(
        _Net(nnx.Rngs(0)),
        Probe(module_path="lin", rank=2, alpha=1.0),
        jnp.ones((1, 5, 6)),
        rngs=nnx.Rngs(1),
    )
    assert ((), nnx.Rngs, True) in seen and (("lin",), nnx.Rngs, True) in seen


def test_only_the_bridge_imports_qwix_internals() -> None:
    package = pathlib.Path(nnx_peft.__file__).parent
    users = sorted(p.name for p in package.glob("*.py") if "qwix._src" in p.read_text())
    assert users == ["_qwix_bridge.py"]


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(6, 5, rngs=rngs)
        self.general = nnx.LinearGeneral((2, 3), (5,), axis=(-2, -1), rngs=rngs)
        self.ein = nnx.Einsum("BTD,DNH->BTNH", (6, 2, 3), rngs=rngs)
        self.conv = nnx.Conv(6, 4, (3,), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.lin(x).sum(-1) + self.general(x.reshape(*x.shape[:-1], 2, 3)).sum(-1)
        return a + self.ein(x).sum((-1, -2)) + self.conv(x).sum(-1)


@pytest.mark.parametrize("qtype", [None, "int8"])
def test_same_adapters_and_outputs_as_qwix_own_provider(qtype: str | None) -> None:
    """nnx_peft's provider computes exactly what qwix.LoraProvider computes."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    target = "lin|general|ein" if qtype else ".*"
    ours = nnx_peft.PeftModel(
        _Net(nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=3.0, target=target, weight_qtype=qtype),
        x,
        rngs=nnx.Rngs(5),
    ).model
    theirs = qwix.apply_lora_to_model(
        _Net(nnx.Rngs(0)),
        qwix.LoraProvider(module_path=target, rank=2, alpha=3.0, weight_qtype=qtype),
        x,
        rngs=nnx.Rngs(5),
    )
    ours_state = dict(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    theirs_state = dict(nnx.to_flat_state(nnx.state(theirs, nnx.Param)))
    assert set(ours_state) == set(theirs_state)
    for path, var in theirs_state.items():
        np.testing.assert_array_equal(
            np.asarray(ours_state[path].get_value()), np.asarray(var.get_value())
        )
        if path[-1].endswith("_lora_b"):  # make the update non-zero, identically in both
            value = jax.random.normal(jax.random.key(len(path)), var.get_value().shape)
            var.set_value(value)
            ours_state[path].set_value(value)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-6, atol=1e-6)


def test_jax_matmul_operators_still_exist() -> None:
    """``@`` is intercepted as these two functions (nnx_peft/_qwix_bridge.py)."""
    from jax._src.numpy import array_methods

    for name in ("_operator_matmul", "_operator_rmatmul"):
        fn = getattr(array_methods, name, None)
        assert fn is not None and not fn.__code__.co_freevars, f"jax changed {name}"
        assert list(inspect.signature(fn).parameters) == ["self", "other"], name
