"""Every error PeftModel raises on bad input: its type and what its message says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import qwix
from flax import linen as nn
from flax import nnx

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder

TOKENS = jnp.zeros((1, 4), jnp.int32)


def _decoder(head_dim: int = 16) -> TinyDecoder:
    return TinyDecoder(
        DecoderConfig(vocab_size=11, num_layers=1, head_dim=head_dim), rngs=nnx.Rngs(0)
    )


def _config(**kwargs: object) -> nnx_peft.LoraConfig:
    return nnx_peft.LoraConfig(**({"rank": 2, "alpha": 4.0, "target": r".*q_proj"} | kwargs))


def test_all_errors_share_a_base_class() -> None:
    for name in nnx_peft.__all__:
        obj = getattr(nnx_peft, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not nnx_peft.PeftError:
            assert issubclass(obj, nnx_peft.PeftError)
            assert issubclass(obj, ValueError | TypeError | ImportError)


@pytest.mark.parametrize("not_a_module", [lambda x: x, nn.Dense(3), {"kernel": jnp.ones(2)}])
def test_not_a_module(not_a_module: object) -> None:
    with pytest.raises(nnx_peft.NotAModuleError, match="wraps Flax NNX modules") as info:
        nnx_peft.PeftModel(not_a_module, _config(), TOKENS, rngs=nnx.Rngs(0))  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert type(not_a_module).__qualname__ in str(info.value)


def test_already_wrapped() -> None:
    model = nnx_peft.PeftModel(_decoder(), _config(), TOKENS, rngs=nnx.Rngs(0))
    for wrapped in (model, model.model):
        with pytest.raises(nnx_peft.AlreadyWrappedError, match="already has LoRA adapters"):
            nnx_peft.PeftModel(wrapped, _config(), TOKENS, rngs=nnx.Rngs(0))
    by_qwix = qwix.apply_lora_to_model(
        _decoder(),
        qwix.LoraProvider(module_path=".*q_proj", rank=2, alpha=2.0),
        TOKENS,
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(nnx_peft.AlreadyWrappedError, match="Wrap the original base model"):
        nnx_peft.PeftModel(by_qwix, _config(), TOKENS, rngs=nnx.Rngs(0))


def test_config_must_be_a_lora_config() -> None:
    with pytest.raises(
        nnx_peft.ConfigError, match=r"config must be an nnx_peft\.LoraConfig; got dict"
    ):
        nnx_peft.PeftModel(_decoder(), {"rank": 2}, TOKENS, rngs=nnx.Rngs(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("rngs", [None, 0, jax.random.key(0)])
def test_rngs_must_be_nnx_rngs(rngs: object) -> None:
    with pytest.raises(
        nnx_peft.RngsError, match=r"rngs must be an nnx.Rngs; got .*nnx.Rngs\(seed\)"
    ):
        nnx_peft.PeftModel(_decoder(), _config(), TOKENS, rngs=rngs)  # type: ignore[arg-type]


def test_rngs_is_required() -> None:
    with pytest.raises(TypeError, match="rngs"):
        nnx_peft.PeftModel(_decoder(), _config(), TOKENS)  # type: ignore[call-arg]


def test_sample_inputs_are_required() -> None:
    with pytest.raises(nnx_peft.SampleInputsError, match="needs sample inputs"):
        nnx_peft.PeftModel(_decoder(), _config(), rngs=nnx.Rngs(0))


def test_target_matching_nothing_lists_the_paths() -> None:
    with pytest.raises(nnx_peft.TargetNotFoundError) as info:
        nnx_peft.PeftModel(_decoder(), _config(target="q_proj"), TOKENS, rngs=nnx.Rngs(0))
    message = str(info.value)
    assert "'q_proj' matches no module path" in message
    assert "Module paths that hold weights: " in message
    holders = message.split("Module paths that hold weights: ")[1].split("\n")[0]
    assert "'layers/0/attn/q_proj'" in holders and "'lm_head'" in holders
    assert "'layers/0/attn'" not in holders  # a container holds no weight of its own
    assert "All module paths:" in message and "'layers/0/attn'" in message


def test_target_fully_excluded() -> None:
    config = _config(target=r".*q_proj", exclude=r"layers/0/.*")
    with pytest.raises(nnx_peft.TargetNotFoundError, match=r"exclude=\['layers/0/\.\*'\] removes"):
        nnx_peft.PeftModel(_decoder(), config, TOKENS, rngs=nnx.Rngs(0))


def test_target_matching_modules_without_matmul() -> None:
    config = _config(target=[r".*q_proj", "embed", r".*_norm"])
    with pytest.raises(nnx_peft.NoAdapterCreatedError) as info:
        nnx_peft.PeftModel(_decoder(), config, TOKENS, rngs=nnx.Rngs(0))
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "pattern '.*_norm' matches modules ['final_norm', " in message
    assert "but none of them got an adapter" in message
    # The embedding lookup does get one (see tests/test_embedding.py).
    assert "['embed', 'layers/0/attn/q_proj']" in message


class _Scale(nnx.Module):
    """Owns a weight but declares no layout (not an NNX layer)."""

    def __init__(self) -> None:
        self.w = nnx.Param(jnp.ones((4, 4)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.w


def test_targeted_module_the_sample_call_never_runs() -> None:
    class Holder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.proj = _Scale()

        def __call__(self, x: jax.Array) -> jax.Array:
            return x * 2.0  # never calls self.proj

    # Named at wrap time: its adapter's shapes cannot be known without a call.
    with pytest.raises(nnx_peft.UnreachedTargetError, match=r"\['proj'\] own weights.*_Scale"):
        nnx_peft.PeftModel(
            Holder(nnx.Rngs(0)), _config(target="proj"), jnp.ones((1, 4)), rngs=nnx.Rngs(0)
        )


def test_an_nnx_layer_the_sample_never_calls_still_gets_its_adapter() -> None:
    """Its layout is declared, so it is called alone at wrap time (a head used by decode())."""

    class Holder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.proj = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return x * 2.0

        def decode(self, x: jax.Array) -> jax.Array:
            return self.proj(x)

    model = nnx_peft.PeftModel(
        Holder(nnx.Rngs(0)), _config(target="proj"), jnp.ones((1, 4)), rngs=nnx.Rngs(0)
    )
    assert [(i.module_path, i.a_shape, i.b_shape) for i in model.adapters()] == [
        ("proj", (4, _config(target="proj").rank), (_config(target="proj").rank, 3))
    ]
    model.model.proj.kernel_lora_b.set_value(jnp.ones_like(model.model.proj.kernel_lora_b[...]))
    x = jnp.ones((2, 4))
    assert not bool(jnp.allclose(model.decode(x), Holder(nnx.Rngs(0)).decode(x)))


class _OwnTrace(nnx.Module):
    """Multiplies by its weight inside a function JAX traces on its own."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.w = nnx.Param(jnp.ones((4, 3)))

    def __call__(self, x: jax.Array) -> jax.Array:
        # (``@`` and jnp.matmul also trace on their own, but are intercepted before:
        # tests/test_models.py checks that they are adapted.)
        return jax.jit(jnp.dot)(x, self.w[...])


class _Parent(nnx.Module):
    def __init__(self, how: str) -> None:
        self.inner = _OwnTrace(how)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x)


@pytest.mark.parametrize("how", ["jax.jit"])
@pytest.mark.parametrize("target", ["inner", "all-linear"])
def test_a_product_inside_its_own_trace_is_unsupported(how: str, target: str) -> None:
    with pytest.raises(
        nnx_peft.UnsupportedLayerError,
        match=r"Module 'inner' multiplies by its weight 'w' inside a function that JAX traces "
        r"on its own .*Multiply outside that jax\.jit.*LoraConfig\.exclude",
    ):
        nnx_peft.PeftModel(_Parent(how), _config(target=target), jnp.ones((1, 4)), rngs=nnx.Rngs(0))


def test_three_operand_einsum_is_unsupported() -> None:
    class Triple(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.w = nnx.Param(jnp.ones((4, 4)))
            self.v = nnx.Param(jnp.ones((4, 4)))

        def __call__(self, x: jax.Array) -> jax.Array:
            return jnp.einsum("bi,ij,jk->bk", x, self.w[...], self.v[...])

    with pytest.raises(nnx_peft.UnsupportedLayerError, match=r"3 operands.*LoraConfig\.exclude"):
        nnx_peft.PeftModel(
            Triple(nnx.Rngs(0)), _config(target=".*"), jnp.ones((1, 4)), rngs=nnx.Rngs(0)
        )


def test_tile_size_that_does_not_divide_the_contracting_axis() -> None:
    # The o_proj kernel (heads, head_dim, d) contracts heads and head_dim; tiles apply to
    # head_dim = 16, which 12 does not divide.
    config = _config(target=r".*o_proj", weight_qtype="nf4", tile_size=12)
    with pytest.raises(nnx_peft.QuantizationError) as info:
        nnx_peft.PeftModel(_decoder(), config, TOKENS, rngs=nnx.Rngs(0))
    message = str(info.value)
    assert "tile_size=12 does not divide axis 1 (size 16)" in message
    assert "'layers/0/attn/o_proj'" in message and "tile_size=None" in message


def test_quantized_convolutions_are_refused() -> None:
    conv = nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0))
    config = _config(target=".*", weight_qtype="int8")
    with pytest.raises(nnx_peft.QuantizationError, match=r"is a convolution.*weight_qtype=None"):
        nnx_peft.PeftModel(conv, config, jnp.ones((1, 5, 3)), rngs=nnx.Rngs(0))


def test_make_optimizer_with_nothing_trainable() -> None:
    import optax

    model = nnx_peft.PeftModel(_decoder(), _config(), TOKENS, rngs=nnx.Rngs(0))
    nnx.pop(model, nnx_peft.AdapterParam)
    with pytest.raises(nnx_peft.NothingTrainableError, match="no trainable variable"):
        model.make_optimizer(optax.adam(1e-3))
