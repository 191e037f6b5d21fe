"""Mixed precision: adapter dtypes, the update's compute dtype, and the output's dtype.

Invariants, on generated nets of ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` /
``Conv`` layers with any ``(dtype, param_dtype)`` and ``LoraConfig.adapter_dtype``:
a fresh wrapper computes exactly what the base does, in the base's dtype; after
training the output keeps that dtype; only adapters change, their gradients and
Adam moments in the adapters' dtype; merging gives the adapted outputs up to
the one rounding of each weight to its dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from hypothesis import given, settings

import nnx_peft
from tests import strategies
from tests.strategies import PrecisionCase


def _perturb_b(model: nnx_peft.PeftModel, seed: int = 7) -> None:
    """Gives every ``B`` factor random values, so the update is no longer zero."""
    for path, module in nnx.iter_modules(model.model):
        del path
        for name, value in list(vars(module).items()):
            if name.endswith("_lora_b") and isinstance(value, nnx_peft.AdapterParam):
                old = value.get_value()
                new = jax.random.normal(jax.random.key(seed), old.shape) * 0.5
                value.set_value(new.astype(old.dtype))
                seed += 1


def _expected_adapter_dtypes(case: PrecisionCase) -> list[str]:
    return [case.adapter_dtype or jnp.dtype(param_dtype).name for _, _, param_dtype in case.layers]


@settings(max_examples=8)
@given(strategies.precision_cases())
def test_fresh_wrapper_equals_base_in_the_base_dtype(case: PrecisionCase) -> None:
    base, x = case.build(), case.sample()
    model = nnx_peft.PeftModel(base, case.config(), x, rngs=nnx.Rngs(1))
    assert [info.dtype for info in model.adapters()] == _expected_adapter_dtypes(case)
    expected, got = base(x), model(x)
    assert got.dtype == expected.dtype
    assert bool((got == expected).all())


@settings(max_examples=6)
@given(strategies.precision_cases())
def test_trained_output_keeps_the_base_dtype_and_only_adapters_train(
    case: PrecisionCase,
) -> None:
    base, x = case.build(), case.sample()
    model = nnx_peft.PeftModel(base, case.config(), x, rngs=nnx.Rngs(1))
    frozen = jax.tree.map(jnp.copy, nnx.state(model, nnx_peft.FROZEN_PARAMS))
    optimizer = model.make_optimizer(optax.adam(1e-2))

    def loss_fn(model: nnx_peft.PeftModel) -> jax.Array:
        return jnp.mean(jnp.square(model(x).astype(jnp.float32) - 1.0))

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, model.trainable_filter))(model)
    optimizer.update(model, grads)
    dtypes = _expected_adapter_dtypes(case)
    # Per layer: A and B, their gradients and both Adam moments in the adapters' dtype.
    for leaves in (
        nnx.state(model, model.trainable_filter),
        grads,
        optimizer.opt_state[0].mu,
        optimizer.opt_state[0].nu,
    ):
        found = sorted(str(v.dtype) for v in jax.tree.leaves(leaves))
        assert found == sorted(d for d in dtypes for _ in range(2))
    assert model(x).dtype == base(x).dtype
    after = nnx.state(model, nnx_peft.FROZEN_PARAMS)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), frozen, after))


@settings(max_examples=6)
@given(strategies.precision_cases())
def test_merge_and_unload_gives_the_adapted_outputs_up_to_weight_rounding(
    case: PrecisionCase,
) -> None:
    base, x = case.build(), case.sample()
    model = nnx_peft.PeftModel(base, case.config(), x, rngs=nnx.Rngs(1))
    _perturb_b(model)
    adapted = model(x)
    merged = model.merge_and_unload()(x)
    assert merged.dtype == adapted.dtype == base(x).dtype
    low = any(
        jnp.dtype(t) == jnp.bfloat16
        for _, dtype, param_dtype in case.layers
        for t in (dtype or param_dtype, param_dtype)
    ) or (case.input_dtype == jnp.bfloat16 or case.adapter_dtype == "bfloat16")
    # All float32: exact up to float32 reassociation. Otherwise bfloat16 keeps 8 bits; a
    # few roundings per layer, through at most three layers.
    tol = 0.1 if low else 1e-4
    scale = float(jnp.max(jnp.abs(adapted.astype(jnp.float32)))) + 1.0
    error = float(jnp.max(jnp.abs(adapted.astype(jnp.float32) - merged.astype(jnp.float32))))
    assert error <= tol * scale


def test_bfloat16_compute_on_float32_weights_outputs_bfloat16_through_the_net() -> None:
    """``nnx.Linear(dtype=bfloat16, param_dtype=float32)`` outputs bf16, adapted or not."""

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32, "rngs": rngs}
            self.a, self.b = nnx.Linear(4, 4, **kw), nnx.Linear(4, 4, **kw)

        def __call__(self, x: jax.Array) -> jax.Array:
            h = self.a(x)
            assert h.dtype == jnp.bfloat16  # inside the net too, not only at its output
            return self.b(h)

    base, x = Net(nnx.Rngs(0)), jnp.ones((2, 4))
    model = nnx_peft.PeftModel(
        base, nnx_peft.LoraConfig(rank=2, alpha=4.0, target="a|b"), x, rngs=nnx.Rngs(1)
    )
    _perturb_b(model)
    assert [info.dtype for info in model.adapters()] == ["float32", "float32"]
    assert model(x).dtype == jnp.bfloat16
    assert nnx.jit(lambda m, x: m(x))(model, x).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("adapter_dtype", "expected"), [(None, "bfloat16"), ("float32", "float32")]
)
def test_bfloat16_base_adapter_dtype(adapter_dtype: str | None, expected: str) -> None:
    base = nnx.Linear(4, 3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4), jnp.bfloat16)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*", adapter_dtype=adapter_dtype)
    model = nnx_peft.PeftModel(base, config, x, rngs=nnx.Rngs(1))
    assert model.config.adapter_dtype == adapter_dtype
    assert {info.dtype for info in model.adapters()} == {expected}
    assert model(x).dtype == jnp.bfloat16


def test_update_is_computed_in_the_layers_compute_dtype() -> None:
    """float32 adapters on a bfloat16 layer: the update is the bf16 computation's."""
    base = nnx.Linear(4, 3, use_bias=False, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 4), jnp.bfloat16)
    model = nnx_peft.PeftModel(
        base, nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*"), x, rngs=nnx.Rngs(1)
    )
    _perturb_b(model)
    a = model.model.kernel_lora_a.get_value()
    b = model.model.kernel_lora_b.get_value()
    assert a.dtype == b.dtype == jnp.float32
    bf16 = jnp.bfloat16
    expected = base(x) + ((x @ a.astype(bf16)) @ b.astype(bf16)).astype(bf16)
    assert model(x).dtype == bf16
    assert bool((model(x) == expected).all())


@pytest.mark.parametrize("value", ["int8", "no-such-dtype", 3, jnp.int32])
def test_adapter_dtype_must_be_floating(value: object) -> None:
    with pytest.raises(nnx_peft.ConfigError, match="adapter_dtype must be a floating-point"):
        nnx_peft.LoraConfig(rank=1, alpha=1.0, target=".*", adapter_dtype=value)


def test_adapter_dtype_round_trips_through_to_dict() -> None:
    for value in ("float32", "bfloat16", None):
        config = nnx_peft.LoraConfig(rank=1, alpha=1.0, target=".*", adapter_dtype=value)
        assert nnx_peft.LoraConfig.from_dict(config.to_dict()) == config
    assert nnx_peft.LoraConfig(rank=1, alpha=1.0, target=".*").adapter_dtype == "float32"
    assert (
        nnx_peft.LoraConfig(
            rank=1, alpha=1.0, target=".*", adapter_dtype=jnp.bfloat16
        ).adapter_dtype
        == "bfloat16"
    )
