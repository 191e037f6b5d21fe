"""PeftModel: partitioning invariants on random models, fidelity, jit, split/merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given

import nnx_peft
from tests import strategies
from tests.strategies import Case


def _flat(state: nnx.State) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(state))


def _wrap(case: Case) -> tuple[strategies.RandomNet, nnx_peft.PeftModel]:
    base = case.build()
    return base, nnx_peft.PeftModel(base, case.config, case.sample(), rngs=nnx.Rngs(7))


def _weight_names(module: nnx.Module) -> list[str]:
    return [n for n, v in vars(module).items() if isinstance(v, nnx.Param)]


@given(strategies.cases())
def test_trainable_is_exactly_the_adapters_of_matched_weights(case: Case) -> None:
    base, model = _wrap(case)
    _, trainable, rest = model.split_trainable()
    trainable_paths, rest_paths = set(_flat(trainable)), set(_flat(rest))
    all_paths = set(_flat(nnx.state(model)))

    # Disjoint, and together the whole state.
    assert not trainable_paths & rest_paths
    assert trainable_paths | rest_paths == all_paths

    # Exactly the A/B pairs of the weights of the targeted (and not excluded) layers.
    base_modules = nnx_peft._injection.module_paths(base)
    expected = set()
    for path, _ in case.targeted:
        for weight in _weight_names(base_modules[path]):
            if weight == "bias":
                continue
            for suffix in ("_lora_a", "_lora_b"):
                expected.add(("model", *path.split("/"), weight + suffix))
    assert trainable_paths == expected

    # Trainable count from the weight shapes and the rank.
    expected_count = sum(
        strategies.adapter_size(kind, case.d, case.config.rank) for _, kind in case.targeted
    )
    assert sum(v.get_value().size for v in _flat(trainable).values()) == expected_count
    assert model.trainable_parameters().trainable == expected_count

    # The LoRAParam-is-a-Param trap: no base nnx.Param is ever trainable.
    assert all(isinstance(v, nnx_peft.AdapterParam) for v in _flat(trainable).values())
    for path in _flat(nnx.state(base, nnx.Param)):
        assert ("model", *path) in rest_paths


@given(strategies.cases())
def test_fresh_adapters_leave_outputs_bitwise_equal(case: Case) -> None:
    base, model = _wrap(case)
    x = case.sample(seed=3)
    for mode in ("eval", "train"):
        getattr(base, mode)()
        getattr(model, mode)()
        # Same RNG and batch-statistics state as the base: equal even in train mode.
        np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(base(x)))


@given(strategies.cases())
def test_split_merge_round_trip_and_jit(case: Case) -> None:
    _, model = _wrap(case)
    model.eval()
    # Non-zero adapters, so the adapter path really contributes. The keys come from the
    # path's position, not from hash(), which PYTHONHASHSEED changes between processes.
    for i, var in enumerate(_flat(nnx.state(model, model.trainable_filter)).values()):
        key = jax.random.key(i)
        var.set_value(jax.random.normal(key, var.get_value().shape, var.get_value().dtype))
    x = case.sample(seed=4)
    eager = model(x)

    graphdef, trainable, rest = model.split_trainable()
    same = nnx_peft.merge(graphdef, trainable, rest)
    assert isinstance(same, nnx_peft.PeftModel)
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool((a == b).all()), nnx.state(same), nnx.state(model))
    )
    np.testing.assert_array_equal(np.asarray(same(x)), np.asarray(eager))

    jitted = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
    # XLA may fuse and reorder the float32 sums under jit, so the two agree up to rounding
    # of the largest terms: an entry that is a small difference of large ones (here, the
    # outputs of three stacked layers with random adapters reach the hundreds) carries an
    # absolute error of a few ulps of the output's scale, not of the entry itself.
    scale = float(np.abs(np.asarray(eager)).max())
    np.testing.assert_allclose(jitted, np.asarray(eager), rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def test_base_model_is_left_untouched() -> None:
    base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(base))
    attributes = set(vars(base))
    model = nnx_peft.PeftModel(
        base,
        nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*"),
        jnp.ones((1, 4)),
        rngs=nnx.Rngs(1),
    )
    assert type(base) is nnx.Linear
    assert set(vars(base)) == attributes
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(base)), before)
    # The wrapper shares the (immutable) base buffers instead of copying them.
    assert model.model.kernel.get_value() is base.kernel.get_value()


def test_pre_existing_lora_params_of_the_base_stay_frozen() -> None:
    class WithLoRA(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.lora = nnx.LoRALinear(4, 4, lora_rank=2, rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.proj(self.lora(x))

    model = nnx_peft.PeftModel(
        WithLoRA(nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=2, alpha=2.0, target="proj"),
        jnp.ones((1, 4)),
        rngs=nnx.Rngs(1),
    )
    trainable = _flat(nnx.state(model, model.trainable_filter))
    assert set(trainable) == {
        ("model", "proj", "kernel_lora_a"),
        ("model", "proj", "kernel_lora_b"),
    }
    assert nnx.state(model, nnx.LoRAParam)  # the base's own LoRAParams are still there


def test_adapter_shapes_follow_qwix_layouts() -> None:
    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.lin = nnx.Linear(8, 6, rngs=rngs)
            self.general = nnx.LinearGeneral((2, 4), (3, 2), axis=(-2, -1), rngs=rngs)
            self.ein = nnx.Einsum("BTD,DNH->BTNH", (8, 2, 3), rngs=rngs)
            self.conv = nnx.Conv(8, 5, (3, 3), rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            y = self.lin(x).sum() + self.general(x.reshape(*x.shape[:-1], 2, 4)).sum()
            return y + self.ein(x.reshape(x.shape[0], -1, 8)).sum() + self.conv(x).sum()

    model = nnx_peft.PeftModel(
        Net(nnx.Rngs(0)),
        nnx_peft.LoraConfig(rank=3, alpha=3.0, target=".*"),
        jnp.ones((1, 4, 4, 8)),
        rngs=nnx.Rngs(1),
    )
    shapes = {info.module_path: (info.a_shape, info.b_shape) for info in model.adapters()}
    assert shapes == {
        "lin": ((8, 3), (3, 6)),
        "general": ((8, 3), (3, 6)),  # contracting (2, 4) flattened; outputs (3, 2) flattened
        "ein": ((8, 3), (3, 2, 3)),  # einsum keeps the kernel's own output axes
        "conv": ((3, 3, 8, 3), (3, 5)),
    }


def test_print_trainable_parameters_lists_every_adapter(capsys: pytest.CaptureFixture) -> None:
    from nnx_peft.toy import DecoderConfig, TinyDecoder

    base = TinyDecoder(DecoderConfig(vocab_size=11, num_layers=2), rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=[r".*q_proj", r".*v_proj"])
    model = nnx_peft.PeftModel(base, config, jnp.zeros((1, 4), jnp.int32), rngs=nnx.Rngs(1))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    for layer in (0, 1):
        assert f"layers/{layer}/attn/q_proj" in out
        assert f"layers/{layer}/attn/v_proj" in out
    summary = model.trainable_parameters()
    # q_proj and v_proj: A (64, 4) and B (4, 4, 16) each, in two layers.
    assert summary.trainable == 2 * 2 * (64 * 4 + 4 * 4 * 16)
    total = sum(x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    assert summary.total == total + summary.trainable
    assert f"trainable params: {summary.trainable:,}" in out
    assert f"{100 * summary.trainable / summary.total:.4f}" in out
