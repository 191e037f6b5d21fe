"""Guards on the Qwix internals nnx_peft uses (all of them in nnx_peft/_qwix_internals.py).

If a Qwix release renames, moves or changes one of these, this file fails
first, naming the piece that changed, instead of adapters silently going wrong.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import nnx_peft
from nnx_peft import _qwix_internals


@pytest.mark.parametrize(
    ("module", "name", "params"), _qwix_internals.CALLABLES, ids=lambda v: str(v)
)
def test_qwix_internal_still_exists(module: str, name: str, params: tuple[str, ...] | None) -> None:
    obj = getattr(importlib.import_module(module), name, None)
    assert obj is not None, f"{module}.{name} is gone; update nnx_peft/_qwix_internals.py"
    if params is not None:
        actual = list(inspect.signature(obj).parameters)
        assert actual[: len(params)] == list(params), (
            f"{module}.{name} now takes {actual}; nnx_peft/_qwix_internals.py passes {params}"
        )


def test_every_private_callable_is_checked() -> None:
    """Each private callable ``_qwix_internals`` binds is one the test above checks."""
    checked = {getattr(importlib.import_module(m), n) for m, n, _ in _qwix_internals.CALLABLES}
    bound = {
        value
        for value in vars(_qwix_internals).values()
        if callable(value) and getattr(value, "__module__", "").startswith(("qwix.", "jax."))
    }
    assert bound == checked, bound ^ checked


def test_the_missing_name_error_says_what_to_do() -> None:
    with pytest.raises(ImportError, match=r"nnx_peft needs qwix\._src\.model\.no_such_name"):
        _qwix_internals._private("qwix._src.model", "no_such_name")


def test_provider_hooks_still_exist() -> None:
    for hook in ("dot_general", "einsum", "conv_general_dilated", "get_intercept_map"):
        assert hook in vars(qwix.PtqProvider), f"qwix.PtqProvider.{hook} is gone"
    # The recording provider ('all-linear', inspect_targets) reads the model's output here.
    params = list(inspect.signature(qwix.PtqProvider.process_model_output).parameters)
    assert params == ["self", "method_name", "model_output"], params
    params = inspect.signature(qwix.PtqProvider._get_current_rule_and_op_id).parameters
    assert {"op_name", "only_rule", "repeated_call"} <= set(params)
    assert {"rank", "alpha", "dropout", "lora_a_initializer", "lora_b_initializer"} <= {
        f for f in qwix.LoraRule.__dataclass_fields__
    }
    # Qwix's own LoRA provider adds only its update to PtqProvider, which nnx_peft's replaces.
    assert set(vars(qwix.LoraProvider)) - set(vars(object)) <= {
        "__init__",
        "dot_general",
        "einsum",
        "conv_general_dilated",
        "__module__",
        "__doc__",
        "__qualname__",
        "__firstlineno__",
        "__static_attributes__",
        "__annotations__",
    }


def test_private_attributes_still_exist() -> None:
    """The private attributes ``_qwix_internals`` names, on a model Qwix wraps."""
    seen: dict[str, object] = {}

    class Probe(qwix.LoraProvider):
        def process_model_inputs(self, model, model_args, model_kwargs):  # type: ignore[no-untyped-def]
            seen.update(
                {a: getattr(model, a, None) for a in _qwix_internals.QWIX_MODULE_ATTRIBUTES}
            )
            return super().process_model_inputs(model, model_args, model_kwargs)

    wrapped = qwix.apply_lora_to_model(
        _Net(nnx.Rngs(0)),
        Probe(module_path="ein", rank=2, alpha=1.0),
        jnp.ones((1, 5, 6)),
        rngs=nnx.Rngs(1),
    )
    assert seen["qwix_path"] == () and seen["disable_quant_stats_update"] is True
    assert isinstance(seen["qwix_rngs"], nnx.Rngs)
    assert getattr(type(wrapped), _qwix_internals.UNQUANTIZED_TYPE) is _Net
    assert hasattr(wrapped.ein, "kernel" + _qwix_internals.QWIX_EINSUM_STR_SUFFIX)
    assert isinstance(vars(wrapped)[_qwix_internals.FLAX_PYTREE_NODES], Mapping)
    assert hasattr(nnx.Module, _qwix_internals.FLAX_PYTREE_IS_PYTREE)
    for key in (
        _qwix_internals.INTERCEPT_OPERATOR_MATMUL,
        _qwix_internals.INTERCEPT_OPERATOR_RMATMUL,
        _qwix_internals.INTERCEPT_WITH_AUX_ASTYPE,
        _qwix_internals.INTERCEPT_VARIABLE_GETITEM,
    ):
        module, _, attribute = key.rpartition(".")
        owner: object
        try:
            owner = importlib.import_module(module)
        except ImportError:  # a class's method: module.Class.method
            module, _, cls = module.rpartition(".")
            owner = getattr(importlib.import_module(module), cls)
        assert hasattr(owner, attribute), key


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


#: Private names of Qwix, Flax and JAX that only ``_qwix_internals.py`` may spell out.
_PRIVATE = (
    "qwix._src",
    "jax._src",
    "flax_util",
    "_get_current_rule_and_op_id",
    "_unquantized_type",
    "_pytree__",
    "_operator_matmul",
    "_lora_einsum_str",
    '"qwix_path"',
    '"qwix_rngs"',
    '"disable_quant_stats_update"',
    ".qwix_path",
    ".qwix_rngs",
    "Multiple candidate params",
)


def test_only_qwix_internals_names_private_pieces() -> None:
    package = pathlib.Path(nnx_peft.__file__).parent
    users = {
        (p.name, name)
        for p in package.glob("*.py")
        for name in _PRIVATE
        if name in p.read_text() and p.name != "_qwix_internals.py"
    }
    assert users == set(), f"only nnx_peft/_qwix_internals.py may use these: {sorted(users)}"


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


def test_jax_matmul_operators_are_plain_functions() -> None:
    """``@`` is intercepted by replacing these module functions: no closure may hold them."""
    for fn in (_qwix_internals.operator_matmul, _qwix_internals.operator_rmatmul):
        assert not fn.__code__.co_freevars, f"jax changed {fn.__name__}"
