"""Facts about Qwix, Flax NNX and optax that nnx_peft relies on, on the installed versions.

Each test states one fact in its name and checks it against the library itself, so a
failure after an upgrade names the behaviour that changed.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest
import qwix
from flax import nnx

import nnx_peft


def _linear_model() -> nnx_peft.PeftModel:
    return nnx_peft.PeftModel(
        nnx.Linear(4, 4, rngs=nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*"),
        jnp.ones((1, 4)),
        rngs=nnx.Rngs(0),
    )


def test_lora_param_is_a_param_so_param_filters_select_adapters_too() -> None:
    assert issubclass(nnx.LoRAParam, nnx.Param)
    assert issubclass(nnx_peft.AdapterParam, nnx.LoRAParam)
    model = _linear_model()
    param_paths = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {"kernel_lora_a", "kernel_lora_b", "kernel", "bias"} == param_paths
    frozen = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx_peft.FROZEN_PARAMS))}
    assert frozen == {"kernel", "bias"}


def test_split_gives_each_variable_to_the_first_matching_filter() -> None:
    _, first, rest = nnx.split(_linear_model(), nnx.Param, nnx_peft.AdapterParam)
    assert len(dict(nnx.to_flat_state(rest))) == 0
    assert len(dict(nnx.to_flat_state(first))) == 4


def test_optimizer_requires_wrt() -> None:
    with pytest.raises(TypeError):
        nnx.Optimizer(_linear_model(), optax.sgd(0.1))  # type: ignore[call-arg]


def test_qwix_alone_intercepts_only_call_but_nnx_peft_every_method() -> None:
    class TwoMethods(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.proj = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.proj(x)

        def other(self, x):
            return self.proj(x)

    x = jnp.ones((1, 4))
    by_qwix = qwix.apply_lora_to_model(
        TwoMethods(nnx.Rngs(0)),
        qwix.LoraProvider(module_path="proj", rank=2, alpha=2.0),
        x,
        rngs=nnx.Rngs(0),
    )
    by_qwix.proj.kernel_lora_b.set_value(jnp.ones((2, 4)))
    plain = x @ by_qwix.proj.kernel[...] + by_qwix.proj.bias[...]
    assert not jnp.allclose(by_qwix(x), by_qwix.other(x))  # Qwix: other() runs without adapters
    assert jnp.allclose(by_qwix.other(x), plain)

    model = nnx_peft.PeftModel(
        TwoMethods(nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=2.0, target="proj"),
        x,
        rngs=nnx.Rngs(0),
    )
    model.model.proj.kernel_lora_b.set_value(jnp.ones((2, 4)))
    assert jnp.allclose(model(x), model.model.other(x))  # nnx_peft: every method adapted
    assert jnp.allclose(model.other(x), model(x))  # and forwarded by the wrapper
    assert not jnp.allclose(model.model.other(x), plain)


def test_qwix_alone_applies_dropout_in_eval_mode_but_nnx_peft_does_not() -> None:
    x = jnp.ones((2, 16))
    qwix_model = qwix.apply_lora_to_model(
        nnx.Linear(16, 16, rngs=nnx.Rngs(0)),
        qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0, dropout=0.5),
        x,
        rngs=nnx.Rngs(0),
    )
    qwix_model.kernel_lora_b.set_value(jnp.ones((2, 16)))
    qwix_model.set_attributes(qwix_rngs=nnx.Rngs(dropout=1))
    qwix_model.eval()
    assert not jnp.array_equal(qwix_model(x), qwix_model(x))

    ours = nnx_peft.PeftModel(
        nnx.Linear(16, 16, rngs=nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*", dropout=0.5),
        x,
        rngs=nnx.Rngs(0),
    )
    ours.model.kernel_lora_b.set_value(jnp.ones((2, 16)))
    ours.eval()
    assert jnp.array_equal(ours(x), ours(x))
