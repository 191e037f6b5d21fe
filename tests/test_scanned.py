"""Scanned layer stacks: each layer of a stacked weight gets its own adapter, stacked alike.

Every check compares the scanned model with its unrolled equivalent
(``tests/scanned_models.py``): the same blocks as a list, with each layer's
adapter copied from the stack's slice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft import _sharding
from nnx_peft._paths import module_paths
from nnx_peft._quantized import QuantizedWeight, weight_variables
from tests.scanned_models import KINDS, FlaxStack, LaxStack, unrolled

D, F = 8, 16
X = jax.random.normal(jax.random.key(7), (2, 3, D))
CONFIG = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)")


def make(style: str, depth: int, *, kind: str = "mlp", axis: int = 0, remat: bool = False) -> Any:
    """A scanned model: ``'flax'`` (nnx.vmap + nnx.scan, axis 0) or ``'lax'`` (MaxText-style)."""
    if style == "flax":
        return FlaxStack(depth, D, F, kind=kind, remat=remat, rngs=nnx.Rngs(0))
    return LaxStack(depth, D, F, kind=kind, axis=axis, remat=remat, rngs=nnx.Rngs(0))


def stack_axis(model: Any) -> int:
    return 0 if isinstance(model, FlaxStack) else model.axis


def wrap(model: Any, config: nnx_peft.LoraConfig = CONFIG, seed: int = 1) -> nnx_peft.PeftModel:
    return nnx_peft.PeftModel(model, config, X, rngs=nnx.Rngs(seed))


def randomize_b(peft: nnx_peft.PeftModel, seed: int = 3) -> None:
    """Gives every B random values, so the update is not zero."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, module in nnx.iter_modules(peft.model):
        for name, value in vars(module).items():
            if name.endswith("_lora_b") and isinstance(value, nnx_peft.AdapterParam):
                value.set_value(0.3 * jax.random.normal(next(keys), value.get_value().shape))


def _stacked_module_path(path: str) -> tuple[str, int]:
    """``'blocks/2/wi'`` -> (``'<stack>/wi'``, 2) in the scanned model's paths."""
    match = re.fullmatch(r"blocks/(\d+)/(.*)", path)
    assert match is not None, path
    return match.group(2), int(match.group(1))


def unrolled_twin(peft: nnx_peft.PeftModel, base: Any, depth: int) -> nnx_peft.PeftModel:
    """The unrolled model wrapped alike, each layer's adapter a copy of the stack's slice."""
    twin = wrap(unrolled(base, depth), peft.config)
    stack = "blocks" if isinstance(base, FlaxStack) else "layers"
    axis = stack_axis(base)
    ours = module_paths(peft.model)
    for path, module in module_paths(twin.model).items():
        if not re.fullmatch(r"blocks/\d+/.+", path):
            continue
        rest, index = _stacked_module_path(path)
        stacked = ours[f"{stack}/{rest}"]
        for name, value in vars(module).items():
            if isinstance(value, nnx_peft.AdapterParam | nnx.Param) and (
                "_lora_" in name or name in ("kernel", "bias")
            ):
                source = getattr(stacked, name).get_value()
                value.set_value(jnp.take(source, index, axis=axis))
    return twin


def mse_step() -> Any:
    """A jitted Adam step on the mean squared error to a fixed random target, adapters only."""
    target = jax.random.normal(jax.random.key(5), X.shape)

    def step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer) -> jax.Array:
        def loss(model: nnx_peft.PeftModel) -> jax.Array:
            return jnp.mean((model(X) - target) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(
            model
        )
        optimizer.update(model, grads)
        return value

    return nnx.jit(step)


def adapter_leaves(peft: nnx_peft.PeftModel) -> dict[str, jax.Array]:
    return {
        "/".join(map(str, k)): v
        for k, v in nnx.to_flat_state(nnx.state(peft.model, nnx_peft.AdapterParam))
    }


STYLES = [("flax", 0), ("lax", 0), ("lax", 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_stacked_adapter_per_layer(style: str, axis: int, kind: str) -> None:
    """A stacked weight gets one adapter per layer, stacked on the weight's layer axis."""
    depth = 3
    base = make(style, depth, kind=kind, axis=axis)
    peft = wrap(base)
    twin = wrap(unrolled(base, depth))
    per_layer = {(i.module_path, i.weight): i for i in twin.adapters()}
    stack = "blocks" if style == "flax" else "layers"
    infos = peft.adapters()
    assert {i.module_path for i in infos} == {f"{stack}/wi", f"{stack}/wo"}
    for info in infos:
        assert info.layers == depth and info.layer_axis == axis
        one = per_layer[(f"blocks/0/{info.module_path.split('/')[-1]}", info.weight)]
        assert info.rank == one.rank == 2
        for stacked, single in ((info.a_shape, one.a_shape), (info.b_shape, one.b_shape)):
            assert stacked[axis] == depth
            assert stacked[:axis] + stacked[axis + 1 :] == single
        assert info.size == depth * one.size == depth * info.layer_size
    # Each layer draws its own A.
    a = nnx.state(peft.model, nnx_peft.AdapterParam)
    for _, value in nnx.to_flat_state(a):
        if value.get_value().ndim and "_lora_a" in str(_):
            slices = [jnp.take(value.get_value(), i, axis=axis) for i in range(depth)]
            assert not any(bool(jnp.array_equal(slices[0], s)) for s in slices[1:])


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_fresh_output_equals_base_bitwise(style: str, axis: int, remat: bool) -> None:
    base = make(style, 4, axis=axis, remat=remat)
    peft = wrap(base)
    np.testing.assert_array_equal(np.asarray(peft(X)), np.asarray(base(X)))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(peft, X)), base(X))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_output_and_gradients_match_unrolled(style: str, axis: int, kind: str) -> None:
    """Each layer's adapter acts on that layer only: outputs and gradients match the unrolled."""
    depth = 3
    base = make(style, depth, kind=kind, axis=axis)
    peft = wrap(base)
    randomize_b(peft)
    twin = unrolled_twin(peft, base, depth)
    np.testing.assert_allclose(peft(X), twin(X), rtol=1e-5, atol=1e-5)

    def loss(model: nnx_peft.PeftModel) -> jax.Array:
        return jnp.sum(model(X) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx_peft.AdapterParam))
    ours, theirs = grads(peft), grads(twin)
    stack = "blocks" if style == "flax" else "layers"
    theirs_flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(theirs)}
    checked = 0
    for key, value in nnx.to_flat_state(ours):
        path = "/".join(map(str, key))
        for i in range(depth):
            twin_path = path.replace(f"model/{stack}/", f"model/blocks/{i}/")
            np.testing.assert_allclose(
                jnp.take(value.get_value(), i, axis=axis),
                theirs_flat[twin_path].get_value(),
                rtol=1e-4,
                atol=1e-5,
            )
            checked += 1
    assert checked == 4 * depth  # A and B of wi and wo, per layer


@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_training_moves_each_layer_independently(style: str, axis: int) -> None:
    depth = 3
    base = make(style, depth, axis=axis)
    peft = wrap(base)
    twin = unrolled_twin(peft, base, depth)
    jitted = mse_step()
    for model in (peft, twin):
        optimizer = model.make_optimizer(optax.adam(1e-2))
        for _ in range(3):
            jitted(model, optimizer)
    np.testing.assert_allclose(peft(X), twin(X), rtol=1e-4, atol=1e-5)
    stack = "blocks" if style == "flax" else "layers"
    theirs = adapter_leaves(twin)
    for path, value in adapter_leaves(peft).items():
        moved = []
        for i in range(depth):
            layer = jnp.take(value.get_value(), i, axis=axis)
            np.testing.assert_allclose(
                layer,
                theirs[re.sub(f"^{stack}/", f"blocks/{i}/", path)].get_value(),
                rtol=1e-4,
                atol=1e-5,
            )
            moved.append(layer)
        assert not bool(jnp.array_equal(moved[0], moved[1]))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_merging_is_exact_per_layer(style: str, axis: int, use_dora: bool) -> None:
    """merge_and_unload, merge/unmerge and disable_adapter, against the unrolled model."""
    depth = 3
    base = make(style, depth, axis=axis)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)", use_dora=use_dora)
    peft = wrap(base, config)
    randomize_b(peft)
    twin = unrolled_twin(peft, base, depth)
    adapted = peft(X)
    np.testing.assert_allclose(adapted, twin(X), rtol=1e-5, atol=1e-5)

    merged = peft.merge_and_unload()
    assert type(merged) is type(base)
    np.testing.assert_allclose(merged(X), adapted, rtol=1e-5, atol=1e-5)
    twin_merged = twin.merge_and_unload()
    stack = merged.blocks if style == "flax" else merged.layers
    for i, block in enumerate(twin_merged.blocks):
        for layer in ("wi", "wo"):
            for name in ("kernel",):
                np.testing.assert_allclose(
                    jnp.take(getattr(getattr(stack, layer), name).get_value(), i, axis=axis),
                    getattr(getattr(block, layer), name).get_value(),
                    rtol=1e-6,
                    atol=1e-6,
                )

    before = jax.tree.map(np.asarray, nnx.state(peft.model, nnx.Param))
    peft.merge_adapter()
    np.testing.assert_allclose(peft(X), adapted, rtol=1e-5, atol=1e-5)
    peft.unmerge_adapter()
    after = jax.tree.map(np.asarray, nnx.state(peft.model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, after)

    with peft.disable_adapter():
        np.testing.assert_array_equal(np.asarray(peft(X)), np.asarray(base(X)))
    np.testing.assert_array_equal(np.asarray(peft(X)), np.asarray(adapted))


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_pissa_one_decomposition_per_layer(style: str, axis: int, init: str) -> None:
    depth = 3
    base = make(style, depth, axis=axis)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)", init=init)
    peft = wrap(base, config)
    np.testing.assert_allclose(peft(X), base(X), rtol=1e-5, atol=1e-5)
    twin = wrap(unrolled(base, depth), config)
    stack = "blocks" if style == "flax" else "layers"
    ours = module_paths(peft.model)
    for path, module in module_paths(twin.model).items():
        if not re.fullmatch(r"blocks/\d+/w[io]", path):
            continue
        rest, i = _stacked_module_path(path)
        stacked = ours[f"{stack}/{rest}"]
        for name in ("kernel", "kernel_lora_a", "kernel_lora_b"):
            np.testing.assert_allclose(
                jnp.take(getattr(stacked, name).get_value(), i, axis=axis),
                getattr(module, name).get_value(),
                rtol=1e-4,
                atol=1e-5,
            )
    with peft.disable_adapter():
        np.testing.assert_allclose(peft(X), base(X), rtol=1e-5, atol=1e-5)
    merged = peft.merge_and_unload()
    np.testing.assert_allclose(merged(X), base(X), rtol=1e-5, atol=1e-5)


def test_rslora_and_rank_pattern_apply_to_the_stacked_module() -> None:
    base = make("lax", 3, axis=1)
    config = nnx_peft.LoraConfig(
        rank=2, alpha=4.0, target=r".*(wi|wo)", use_rslora=True, rank_pattern={r".*wo": 4}
    )
    peft = wrap(base, config)
    by_path = {i.module_path: i for i in peft.adapters()}
    assert by_path["layers/wi"].rank == 2 and by_path["layers/wo"].rank == 4
    assert by_path["layers/wo"].a_shape == (F, 3, 4)
    assert by_path["layers/wo"].scale == pytest.approx(4.0 / 2.0)
    randomize_b(peft)
    twin = unrolled_twin(peft, base, 3)
    np.testing.assert_allclose(peft(X), twin(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "key", "picked"),
    [
        ("rank_pattern", r"layers/1/wo", r"\[1\]"),
        ("alpha_pattern", r"layers/[02]/wi", r"\[0, 2\]"),
        ("rank_pattern", r".*/\d+/wo", r"\[0, 1, 2\]"),
    ],
)
def test_pattern_naming_a_layer_of_a_stack_is_refused(field: str, key: str, picked: str) -> None:
    """A key that picks layers of a stack would give one module two ranks: its own error."""
    base = make("lax", 3, axis=1)
    value: int | float = 4 if field == "rank_pattern" else 8.0
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)", **{field: {key: value}})
    with pytest.raises(
        nnx_peft.StackedPatternError,
        match=rf"{field} key .* names layer\(s\) {picked} of the stacked module 'layers/w[io]'"
        r".*as a whole",
    ):
        wrap(base, config)


def test_pattern_matching_nothing_on_a_stack_is_still_target_not_found() -> None:
    base = make("lax", 3, axis=1)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)", rank_pattern={"nope": 4})
    with pytest.raises(nnx_peft.TargetNotFoundError, match="'nope' applies to no adapted module"):
        wrap(base, config)


def test_sharding_names_layer_axis_kept_and_no_foreign_names() -> None:
    """MaxText-style names: the layer axis keeps 'layers', the rank axis gets no name."""
    base = make("lax", 3, axis=1)
    peft = wrap(base)
    module = module_paths(peft.model)["layers/wi"]
    a = module.kernel_lora_a.get_metadata()["out_sharding"]
    b = module.kernel_lora_b.get_metadata()["out_sharding"]
    # kernel (D, layers, F) named ('kernel0', 'layers', 'kernel1').
    assert tuple(a) == ("kernel0", "layers", None)
    assert tuple(b) == (None, "layers", "kernel1")
    for variable in (module.kernel_lora_a, module.kernel_lora_b):
        assert "sharding_names" not in variable.get_metadata()


def test_adapter_value_drops_the_sharding_names_alias() -> None:
    """A base weight whose metadata holds Flax's ``sharding_names`` alias (MaxText's scan
    writes it) gives adapters their own names, not the weight's."""
    base = nnx.Param(jnp.ones((4, 6)), eager_sharding=False)
    base._var_metadata["sharding_names"] = ("embed", "mlp")  # as stored by an older writer
    placed = _sharding.adapter_value(jnp.ones((4, 2)), base, None, (0, None))
    factor = nnx_peft.AdapterParam(placed)
    assert tuple(factor.get_metadata()["out_sharding"]) == ("embed", None)
    assert "sharding_names" not in factor.get_metadata()
    placed = _sharding.adapter_value(jnp.ones((2, 6)), base, None, (None, 1))
    assert tuple(nnx_peft.AdapterParam(placed).get_metadata()["out_sharding"]) == (None, "mlp")


def test_stack_replaced_during_the_sample_call_gets_its_adapters() -> None:
    """MaxText puts a new stacked module in place of the one its scan sliced while Qwix
    wraps: the adapters go on the module the model holds after the call."""
    base = LaxStack(3, D, F, axis=1, reassign=True, rngs=nnx.Rngs(0))
    peft = wrap(base)
    assert {i.module_path for i in peft.adapters()} == {"layers/wi", "layers/wo"}
    assert bool(jnp.array_equal(peft(X), base(X)))
    randomize_b(peft)
    twin = unrolled_twin(peft, base, 3)
    np.testing.assert_allclose(peft(X), twin(X), rtol=1e-5, atol=1e-5)


def test_scanned_next_to_unscanned_layers() -> None:
    base = make("flax", 3)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(proj|wi|wo)")
    peft = wrap(base, config)
    infos = {i.module_path: i for i in peft.adapters()}
    assert infos["proj"].layers is None and infos["proj"].a_shape == (D, 2)
    assert infos["blocks/wi"].layers == 3
    randomize_b(peft)
    twin = unrolled_twin(peft, base, 3)
    twin.model.proj.kernel_lora_b.set_value(peft.model.proj.kernel_lora_b.get_value())
    twin.model.proj.kernel_lora_a.set_value(peft.model.proj.kernel_lora_a.get_value())
    np.testing.assert_allclose(peft(X), twin(X), rtol=1e-5, atol=1e-5)


def test_counts_per_layer_and_total(capsys: pytest.CaptureFixture[str]) -> None:
    base = make("flax", 4)
    peft = wrap(base)
    summary = peft.trainable_parameters()
    per_layer = (D * 2 + 2 * F) + (F * 2 + 2 * D)
    assert summary.trainable == 4 * per_layer
    assert sum(info.size for info, _ in summary.adapters) == 4 * per_layer
    peft.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"{D * 2 + 2 * F} x 4 = {4 * (D * 2 + 2 * F)}" in out
    report = nnx_peft.inspect_targets(base, CONFIG, X)
    assert report.adapted == ("blocks/wi", "blocks/wo")
    assert "4 layers on axis 0" in report.format()
    (wi,) = [m for m in report.modules if m.path == "blocks/wi"]
    assert wi.adapters[0].layers == 4 and wi.adapters[0].size == 4 * (D * 2 + 2 * F)


def test_all_linear_finds_stacked_modules() -> None:
    """'all-linear' sees the stacked modules; the last matmul's module (a stacked one, so
    every layer of it) is the output head, left out."""
    base = make("flax", 3)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="all-linear")
    peft = wrap(base, config)
    assert {i.module_path: i.layers for i in peft.adapters()} == {"proj": None, "blocks/wi": 3}
    assert nnx_peft.inspect_targets(base, config, X).output_head == "blocks/wo"


@pytest.mark.parametrize(("style", "axis"), STYLES)
def test_checkpoints_round_trip(style: str, axis: int, tmp_path: Any) -> None:
    base = make(style, 3, axis=axis)
    peft = wrap(base)
    randomize_b(peft)
    expected = peft(X)
    peft.save_adapter(tmp_path / "ckpt")
    peft.save_safetensors(tmp_path / "a.safetensors")
    for load in ("ckpt", "safetensors"):
        fresh = wrap(make(style, 3, axis=axis), seed=9)
        assert not np.allclose(fresh(X), expected)
        if load == "ckpt":
            fresh.load_adapter(tmp_path / "ckpt")
        else:
            fresh.load_safetensors(tmp_path / "a.safetensors")
        np.testing.assert_array_equal(np.asarray(fresh(X)), np.asarray(expected))
        for (k, v), (k2, v2) in zip(
            adapter_leaves(fresh).items(), adapter_leaves(peft).items(), strict=True
        ):
            assert k == k2
            np.testing.assert_array_equal(v.get_value(), v2.get_value())


def test_scanned_checkpoint_into_unrolled_model_is_refused(tmp_path: Any) -> None:
    base = make("flax", 3)
    peft = wrap(base)
    peft.save_adapter(tmp_path / "ckpt")
    peft.save_safetensors(tmp_path / "a.safetensors")
    twin = wrap(unrolled(base, 3))
    before = adapter_leaves(twin)
    with pytest.raises(nnx_peft.ScannedCheckpointError, match=r"blocks/wi.*3 layers"):
        twin.load_adapter(tmp_path / "ckpt")
    with pytest.raises(nnx_peft.ScannedCheckpointError, match="not stacked"):
        twin.load_safetensors(tmp_path / "a.safetensors")
    for k, v in adapter_leaves(twin).items():
        np.testing.assert_array_equal(v.get_value(), before[k].get_value())
    with pytest.raises(nnx_peft.ScannedCheckpointError, match=r"blocks/wi.*3 layers"):
        nnx_peft.PeftModel.from_pretrained(
            unrolled(base, 3), tmp_path / "ckpt", X, rngs=nnx.Rngs(1)
        )
    # And the other way round.
    twin.save_adapter(tmp_path / "unrolled")
    with pytest.raises(nnx_peft.ScannedCheckpointError, match="stacked"):
        peft.load_adapter(tmp_path / "unrolled")


class _HalfStacked(nnx.Module):
    """A scan whose kernel is sliced per layer but whose bias is shared by all layers."""

    def __init__(self, depth: int) -> None:
        keys = jax.random.split(jax.random.key(0), depth)
        self.lin = nnx.Linear(D, D, rngs=nnx.Rngs(0))
        self.lin.kernel = nnx.Param(jax.vmap(lambda k: jax.random.normal(k, (D, D)))(keys))
        self.depth = depth

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = nnx.StateAxes({nnx.PathContains("bias"): None, ...: 0})

        @nnx.scan(in_axes=(nnx.Carry, axes), out_axes=nnx.Carry)
        def body(x: jax.Array, lin: nnx.Linear) -> jax.Array:
            return lin(x)

        return body(x, self.lin)


def test_stack_of_unequal_layers_is_refused() -> None:
    base = _HalfStacked(3)
    base(X)  # the model itself runs
    with pytest.raises(nnx_peft.LayerStackError, match=r"'lin'.*kernel \(3, 8, 8\) -> \(8, 8\)"):
        nnx_peft.PeftModel(
            base, nnx_peft.LoraConfig(rank=2, alpha=4.0, target="lin"), X, rngs=nnx.Rngs(1)
        )


def test_ambiguous_layer_axis_is_refused() -> None:
    base = LaxStack(D, D, D, axis=1, rngs=nnx.Rngs(0))  # depth == every size
    with pytest.raises(nnx_peft.LayerStackError, match="cannot be told"):
        wrap(base)


def test_layer_axis_told_by_the_other_modules_of_the_stack() -> None:
    """An output kernel (layers, heads, head_dim, width) with as many heads as layers fits
    two axes; the stack's other modules tell which."""
    from nnx_peft.toy import DecoderConfig, TinyDecoder

    cfg = DecoderConfig(vocab_size=11, num_layers=4, num_heads=4, scan_layers=True)
    base = TinyDecoder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 5), jnp.int32)
    peft = nnx_peft.PeftModel(
        base,
        nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(q|o)_proj"),
        tokens,
        rngs=nnx.Rngs(1),
    )
    assert {(i.module_path, i.layer_axis) for i in peft.adapters()} == {
        ("layers/attn/q_proj", 0),
        ("layers/attn/o_proj", 0),
    }
    with pytest.raises(nnx_peft.LayerStackError, match=r"'layers/attn/o_proj'.*axes \[0, 1\]"):
        nnx_peft.PeftModel(
            base,
            nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*o_proj"),
            tokens,
            rngs=nnx.Rngs(1),
        )


def _quantized_arrays(module: nnx.Module, name: str) -> list[np.ndarray]:
    """The arrays of a QLoRA weight (quantized values, scales), on the host."""
    stored = getattr(module, name)
    assert isinstance(stored, QuantizedWeight), type(stored)
    return [np.asarray(v.get_value()) for v in weight_variables(stored)]


def _rounded_alike(actual: np.ndarray, desired: np.ndarray) -> None:
    np.testing.assert_allclose(actual, desired, rtol=1e-6, atol=1e-6)


QLORA = [("int8", None), ("nf4", None), ("nf4", 4), ("int4", 8)]


@given(
    depth=st.integers(2, 4),
    style_axis=st.sampled_from(STYLES),
    kind=st.sampled_from(KINDS),
    remat=st.booleans(),
    quantization=st.sampled_from(QLORA),
    use_dora=st.booleans(),
)
def test_qlora_on_stacks_quantizes_each_layer_as_unrolled(
    depth: int,
    style_axis: tuple[str, int],
    kind: str,
    remat: bool,
    quantization: tuple[str, int | None],
    use_dora: bool,
) -> None:
    """QLoRA on a stack: each layer quantized exactly as Qwix quantizes it unrolled (tiles
    never cross the layer axis); the adapted stack computes what the unrolled QLoRA model
    does, bit for bit; merging requantizes per layer; unmerging and disabling are exact."""
    style, axis = style_axis
    qtype, tile = quantization
    base = make(style, depth, kind=kind, axis=axis, remat=remat)
    config = nnx_peft.LoraConfig(
        rank=2,
        alpha=4.0,
        target=r".*(wi|wo)",
        weight_qtype=qtype,
        tile_size=tile,
        use_dora=use_dora,
    )
    peft = wrap(base, config)
    twin = unrolled_twin(peft, base, depth)
    stack = "blocks" if style == "flax" else "layers"
    ours, theirs = module_paths(peft.model), module_paths(twin.model)
    for layer in ("wi", "wo"):
        stacked = _quantized_arrays(ours[f"{stack}/{layer}"], "kernel")
        for i in range(depth):
            single = _quantized_arrays(theirs[f"blocks/{i}/{layer}"], "kernel")
            for whole, part in zip(stacked, single, strict=True):
                np.testing.assert_array_equal(np.take(whole, i, axis=axis), part)
    # DoRA divides by each layer's norm, which a scan body and an unrolled layer round
    # differently (XLA fuses them apart): equal to float32 rounding then, bitwise otherwise.
    same = _rounded_alike if use_dora else np.testing.assert_array_equal
    with peft.disable_adapter(), twin.disable_adapter():
        quantized_base = np.asarray(peft(X))
        np.testing.assert_array_equal(quantized_base, np.asarray(twin(X)))
    same(np.asarray(peft(X)), quantized_base)  # a fresh adapter adds nothing

    randomize_b(peft, seed=depth)
    twin = unrolled_twin(peft, base, depth)
    adapted = peft(X)
    same(np.asarray(adapted), np.asarray(twin(X)))
    np.testing.assert_allclose(peft.merge_and_unload()(X), adapted, rtol=1e-4, atol=1e-4)

    before = jax.tree.map(np.asarray, nnx.state(peft.model))
    peft.merge_adapter()
    twin.merge_adapter()
    np.testing.assert_allclose(peft(X), twin(X), rtol=1e-5, atol=1e-5)
    peft.unmerge_adapter()
    jax.tree.map(
        np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(peft.model))
    )
    with peft.disable_adapter():
        np.testing.assert_array_equal(np.asarray(peft(X)), quantized_base)
    np.testing.assert_array_equal(np.asarray(peft(X)), np.asarray(adapted))


def test_qlora_on_stacks_trains_and_round_trips(tmp_path: Path) -> None:
    """A QLoRA stack trains its adapters only, and its checkpoint loads into a fresh wrap."""
    base = make("lax", 3, axis=1)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)", weight_qtype="nf4")
    peft = wrap(base, config)
    frozen = jax.tree.map(np.asarray, nnx.state(peft.model, nnx.Not(nnx_peft.AdapterParam)))
    step, optimizer = mse_step(), peft.make_optimizer(optax.adam(1e-2))
    losses = [float(step(peft, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.asarray, nnx.state(peft.model, nnx.Not(nnx_peft.AdapterParam)))
    jax.tree.map(np.testing.assert_array_equal, frozen, after)
    peft.save_adapter(tmp_path / "adapter")
    loaded = nnx_peft.PeftModel.from_pretrained(
        make("lax", 3, axis=1), tmp_path / "adapter", X, rngs=nnx.Rngs(2)
    )
    np.testing.assert_array_equal(np.asarray(loaded(X)), np.asarray(peft(X)))


DROPOUT = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(wi|wo)", dropout=0.5)


def _dropout_streams(model: nnx.Module) -> dict[str, nnx.Variable[Any]]:
    """The adapters' dropout RNG keys and counts, by path."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.RngState))
    return {"/".join(map(str, k)): v for k, v in flat if "_lora_dropout" in "/".join(map(str, k))}


@pytest.mark.parametrize("remat", [False, True])
def test_dropout_per_layer_matches_unrolled(remat: bool) -> None:
    """Each layer of a stack draws its own masks, from its own stream: with the unrolled
    twin's dropout streams set to the stack's slices, both compute the same, call after
    call; eval mode is no dropout."""
    depth = 3
    base = make("flax", depth, remat=remat)
    peft = wrap(base, DROPOUT)
    randomize_b(peft)
    streams = _dropout_streams(peft.model)
    keys = jax.random.key_data(streams["blocks/wi/kernel_lora_dropout/rngs/key"].get_value())
    assert keys.shape[0] == depth and len({tuple(np.asarray(k)) for k in keys}) == depth
    twin = unrolled_twin(peft, base, depth)
    for path, variable in _dropout_streams(twin.model).items():
        rest, index = _stacked_module_path(path)
        variable.set_value(streams[f"blocks/{rest}"].get_value()[index])
    no_dropout = unrolled_twin(peft, base, depth)  # same adapters, dropout=0 via eval
    no_dropout.eval()
    first, second = peft(X), peft(X)
    np.testing.assert_allclose(first, twin(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, twin(X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, second)  # new masks each call
    assert not np.allclose(first, no_dropout(X))
    assert (
        np.asarray(streams["blocks/wi/kernel_lora_dropout/rngs/count"].get_value()).tolist()
        == [2] * depth
    )
    peft.eval()
    np.testing.assert_allclose(peft(X), no_dropout(X), rtol=1e-5, atol=1e-5)


def test_dropout_on_stacks_is_reproducible_and_trains() -> None:
    """The same seeds give the same masks; a jitted training step draws new ones each step."""
    base = make("flax", 3)
    outputs = []
    for _ in range(2):
        peft = wrap(base, DROPOUT)
        randomize_b(peft)
        outputs.append(peft(X))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    optimizer = nnx.Optimizer(peft, optax.adam(1e-2), wrt=peft.trainable_filter)
    step = mse_step()
    count = _dropout_streams(peft.model)["blocks/wo/kernel_lora_dropout/rngs/count"]
    start = np.asarray(count.get_value())
    losses = [float(step(peft, optimizer)) for _ in range(3)]
    assert np.all(np.asarray(count.get_value()) == start + 3) and np.isfinite(losses).all()


def test_dropout_on_a_scan_that_cannot_carry_it_is_refused() -> None:
    config = DROPOUT
    with pytest.raises(nnx_peft.UnsupportedLayerError, match=r"layers/wi.*scan fails"):
        wrap(make("lax", 3, axis=0), config)  # RNG state broadcast, not sliced
    sliced = LaxStack(3, D, F, axis=0, slice_rngs=True, rngs=nnx.Rngs(0))
    with pytest.raises(nnx_peft.UnsupportedLayerError, match=r"layers/wi.*did not advance"):
        wrap(sliced, config)  # sliced, but the body returns no state
    with pytest.raises(nnx_peft.LayerStackError, match=r"dropout.*'layers/wi'.*stacked on axis 1"):
        wrap(make("lax", 3, axis=1), config)


@given(
    depth=st.integers(2, 5),
    style_axis=st.sampled_from(STYLES),
    kind=st.sampled_from(KINDS),
    remat=st.booleans(),
)
def test_stack_invariants(depth: int, style_axis: tuple[str, int], kind: str, remat: bool) -> None:
    """Generated stacks: fresh output is the base's; with random B, the stack computes what
    the unrolled model with the same per-layer adapters does; merging folds it exactly."""
    style, axis = style_axis
    base = make(style, depth, kind=kind, axis=axis, remat=remat)
    peft = wrap(base)
    np.testing.assert_array_equal(np.asarray(peft(X)), np.asarray(base(X)))
    for info in peft.adapters():
        assert info.layers == depth and info.layer_axis == axis
    randomize_b(peft, seed=depth)
    twin = unrolled_twin(peft, base, depth)
    adapted = peft(X)
    np.testing.assert_allclose(adapted, twin(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(peft.merge_and_unload()(X), adapted, rtol=1e-5, atol=1e-5)


def test_scanned_toy_decoder_trains_and_merges() -> None:
    """The toy decoder with ``scan_layers=True``: stacked adapters on every projection,
    training lowers the loss, the merged model computes what the adapted one does."""
    from nnx_peft.toy import (
        TEXT_A,
        CharTokenizer,
        DecoderConfig,
        TinyDecoder,
        batches,
        next_token_loss,
    )

    tokenizer = CharTokenizer(TEXT_A)
    cfg = DecoderConfig(
        vocab_size=tokenizer.vocab_size, num_layers=3, embed_dim=32, mlp_dim=64, scan_layers=True
    )
    base = TinyDecoder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=r".*(q_proj|v_proj|up_proj|down_proj)")
    peft = nnx_peft.PeftModel(base, config, tokens, rngs=nnx.Rngs(1))
    assert {i.module_path for i in peft.adapters()} == {
        "layers/attn/q_proj",
        "layers/attn/v_proj",
        "layers/mlp/up_proj",
        "layers/mlp/down_proj",
    }
    assert all(i.layers == 3 and i.layer_axis == 0 for i in peft.adapters())
    optimizer = peft.make_optimizer(optax.adam(3e-3))

    @nnx.jit
    def step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer, x: Any, y: Any) -> jax.Array:
        def loss(model: nnx_peft.PeftModel) -> jax.Array:
            return next_token_loss(model(x), y)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(
            model
        )
        optimizer.update(model, grads)
        return value

    data = batches(tokenizer.encode(TEXT_A), batch_size=8, seq_len=16, seed=0)
    x, y = next(data)
    first = float(step(peft, optimizer, x, y))
    for _ in range(15):
        last = float(step(peft, optimizer, x, y))
    assert last < first
    np.testing.assert_allclose(peft.merge_and_unload()(x), peft(x), rtol=1e-4, atol=1e-4)


def test_qlora_stacks_from_base_weights_and_eval_shape(tmp_path: Path) -> None:
    """QLoRA of the scanned toy decoder read from disk one weight at a time equals the
    eager wrap bit for bit, and ``nnx.eval_shape`` gives its quantized stacks abstractly."""
    import orbax.checkpoint as ocp

    from nnx_peft.toy import DecoderConfig, TinyDecoder

    cfg = DecoderConfig(vocab_size=16, num_layers=3, embed_dim=16, mlp_dim=32, scan_layers=True)
    tokens = jnp.zeros((1, 8), jnp.int32)
    config = nnx_peft.LoraConfig(
        rank=2, alpha=4.0, target=r".*(q_proj|down_proj)", weight_qtype="nf4", tile_size=8
    )

    def make() -> TinyDecoder:
        return TinyDecoder(cfg, rngs=nnx.Rngs(0))

    with ocp.StandardCheckpointer() as saver:
        saver.save(tmp_path / "base", nnx.state(make()))
    eager = nnx_peft.PeftModel(make(), config, tokens, rngs=nnx.Rngs(1))
    read = nnx_peft.PeftModel.from_base_weights(
        make, tmp_path / "base", config, tokens, rngs=nnx.Rngs(1)
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.map(np.asarray, nnx.state(eager.model)),
        jax.tree.map(np.asarray, nnx.state(read.model)),
    )
    abstract = nnx.eval_shape(lambda: nnx_peft.PeftModel(make(), config, tokens, rngs=nnx.Rngs(1)))
    for module in (abstract.model.layers.attn.q_proj, abstract.model.layers.mlp.down_proj):
        assert isinstance(module.kernel, QuantizedWeight)
        assert weight_variables(module.kernel)[0].get_value().shape[0] == 3


def test_stacks_on_a_device_mesh(tmp_path: Any) -> None:
    """On an 8-device mesh (a subprocess, ``tests/multidevice_scanned.py``): stacked adapters
    are sharded like their weights with the layer axis as the weight has it, train as
    without a mesh, take ``shard_adapters`` overrides, and restore on another mesh; QLoRA
    stacks keep the float weights' layout in their quantized values and train as without
    a mesh."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "report.json"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    subprocess.run(
        [sys.executable, str(root / "tests" / "multidevice_scanned.py"), str(out)],
        check=True,
        env=env,
        timeout=1200,
    )
    report = json.loads(out.read_text())
    expected = {
        "layers/attn/q_proj/kernel_lora_a": [None, "fsdp", None],
        "layers/attn/q_proj/kernel_lora_b": [None, None, "tp", None],
        "layers/attn/o_proj/kernel_lora_a": [None, "tp", None, None],
        "layers/attn/o_proj/kernel_lora_b": [None, None, "fsdp"],
        "layers/mlp/up_proj/kernel_lora_a": [None, "fsdp", None],
        "layers/mlp/up_proj/kernel_lora_b": [None, None, "tp"],
        "layers/mlp/down_proj/kernel_lora_a": [None, "tp", None],
        "layers/mlp/down_proj/kernel_lora_b": [None, None, "fsdp"],
    }
    for key in ("adapters", "restored_adapters"):
        assert {p: v["spec"] for p, v in report[key].items()} == expected
        assert {p: v["metadata"] for p, v in report[key].items()} == expected
        assert all(v["shape"][0] == 3 for v in report[key].values())
    np.testing.assert_allclose(report["losses"], report["reference_losses"], rtol=1e-5)
    assert report["losses"][1] < report["losses"][0]
    assert report["restored_max_diff"] < 1e-5
    assert {p: v["spec"] for p, v in report["override"].items()} == {
        "layers/attn/q_proj/kernel_lora_a": [None, None, None],
        "layers/attn/q_proj/kernel_lora_b": [None, None, None, "tp"],
    }
    assert report["qlora_weights"] == {
        "layers/attn/q_proj": [None, "fsdp", "tp", None],
        "layers/attn/o_proj": [None, "tp", None, "fsdp"],
        "layers/mlp/up_proj": [None, "fsdp", "tp"],
        "layers/mlp/down_proj": [None, "tp", "fsdp"],
    }
    np.testing.assert_allclose(report["qlora_losses"], report["qlora_reference_losses"], rtol=1e-5)
    assert report["qlora_losses"][1] < report["qlora_losses"][0]


@pytest.mark.parametrize("dropout", [False, True])
def test_training_checkpoint_round_trip(tmp_path: Any, dropout: bool) -> None:
    """Adapters and optimizer state of a stack (and with dropout, its per-layer RNG
    streams) restore into a fresh wrapper, which then trains on exactly as the original."""
    import orbax.checkpoint as ocp

    style, axis, config = ("flax", 0, DROPOUT) if dropout else ("lax", 1, CONFIG)
    jitted = mse_step()
    peft = wrap(make(style, 3, axis=axis), config)
    optimizer = peft.make_optimizer(optax.adam(1e-2))
    jitted(peft, optimizer)
    with ocp.CheckpointManager(tmp_path / "train") as manager:
        peft.save_training_checkpoint(manager, 1, optimizer)
        manager.wait_until_finished()
    fresh = wrap(make(style, 3, axis=axis), config, seed=9)
    fresh_optimizer = fresh.make_optimizer(optax.adam(1e-2))
    with ocp.CheckpointManager(tmp_path / "train") as manager:
        assert fresh.restore_training_checkpoint(manager, fresh_optimizer) == 1
    np.testing.assert_array_equal(
        np.asarray(jitted(fresh, fresh_optimizer)), np.asarray(jitted(peft, optimizer))
    )
    for (k, v), (k2, v2) in zip(
        adapter_leaves(fresh).items(), adapter_leaves(peft).items(), strict=True
    ):
        assert k == k2
        np.testing.assert_array_equal(v.get_value(), v2.get_value())
