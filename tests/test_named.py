"""Several named adapters on one model: add, switch, train one, merge, save and load by name.

The invariants run on random nets (``tests.strategies.cases``) with a second adapter of
another rank and alpha on the same or other layers.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft._adapter import adapters
from tests.strategies import ADAPTABLE, Case, cases, leaf_layers


@dataclasses.dataclass(frozen=True)
class TwoCase:
    """A random net, its first config, and a second config for an added adapter."""

    case: Case
    other: nnx_peft.LoraConfig


@st.composite
def two_cases(draw: st.DrawFn) -> TwoCase:
    case = draw(cases())
    present = sorted({k for _, k in leaf_layers(case.spec) if k in ADAPTABLE})
    kinds = draw(st.lists(st.sampled_from(present), min_size=1, unique=True))
    other = nnx_peft.LoraConfig(
        rank=draw(st.integers(1, 5)),
        alpha=draw(st.sampled_from([1.0, 3.0, 16.0])),
        target=[rf"(.*/)?{kind}\d+/inner" for kind in kinds],
        use_rslora=draw(st.booleans()),
    )
    return TwoCase(case, other)


def _randomize(model: nnx_peft.PeftModel, name: str, seed: int) -> None:
    """Gives the adapter ``name`` nonzero B factors (a fresh one has B = 0)."""
    for i, adapter in enumerate(adapters(model.model, {name})):
        b = adapter.b.get_value()
        adapter.b.set_value(0.3 * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype))


def _two(two: TwoCase) -> nnx_peft.PeftModel:
    case = two.case
    model = nnx_peft.PeftModel(case.build(), case.config, case.sample(), rngs=nnx.Rngs(0))
    _randomize(model, "default", 10)
    model.add_adapter("other", two.other, rngs=nnx.Rngs(1))
    _randomize(model, "other", 20)
    model.eval()  # the nets may hold dropout layers
    return model


def _values(model: nnx_peft.PeftModel, name: str) -> list[np.ndarray]:
    return [
        np.asarray(v.get_value())
        for a in adapters(model.model, {name})
        for v in a.trained().values()
    ]


@given(two=two_cases())
def test_adding_then_deleting_restores_outputs_and_graph(two: TwoCase) -> None:
    case = two.case
    model = nnx_peft.PeftModel(case.build(), case.config, case.sample(), rngs=nnx.Rngs(0))
    _randomize(model, "default", 10)
    model.eval()  # the nets may hold dropout layers
    x = case.sample(seed=3)
    before, graph = model(x), nnx.graphdef(model)
    model.add_adapter("other", two.other, rngs=nnx.Rngs(1))
    _randomize(model, "other", 20)
    assert model.adapter_names == ("default", "other")
    assert model.active_adapters == ("default",)
    np.testing.assert_array_equal(model(x), before)  # added outside the active set
    model.delete_adapter("other")
    np.testing.assert_array_equal(model(x), before)
    assert nnx.graphdef(model) == graph
    assert model.adapter_names == ("default",)


@given(two=two_cases())
def test_each_layer_adds_the_updates_of_the_active_adapters(two: TwoCase) -> None:
    model = _two(two)
    x = two.case.sample(seed=3)
    layers = {path for path, _ in two.case.targeted}
    layers |= {a.path for a in adapters(model.model, {"other"})}
    modules = dict(nnx.iter_modules(model.model))

    def outputs() -> dict[str, jax.Array]:
        found = {"/".join(map(str, p)): m for p, m in modules.items()}
        return {path: found[path](x) for path in sorted(layers)}

    model.set_adapter("default")
    first = outputs()
    model.set_adapter("other")
    second = outputs()
    model.set_adapter(["default", "other"])
    both = outputs()
    with model.disable_adapter():
        base = outputs()
    assert model.active_adapters == ("default", "other")
    for path in layers:
        expected = base[path] + (first[path] - base[path]) + (second[path] - base[path])
        scale = float(jnp.abs(expected).max()) + 1.0
        np.testing.assert_allclose(both[path], expected, atol=2e-6 * scale, err_msg=path)


@given(two=two_cases(), which=st.sampled_from(["default", "other"]))
def test_training_one_adapter_leaves_the_others_bit_identical(two: TwoCase, which: str) -> None:
    model = _two(two)
    model.set_adapter(which)
    frozen = "other" if which == "default" else "default"
    kept = _values(model, frozen)
    weights = nnx.All(nnx.Param, nnx.Not(nnx_peft.AdapterParam))
    base = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, weights))]
    optimizer = model.make_optimizer(optax.adam(1e-2))
    x = two.case.sample(seed=4)

    @nnx.jit
    def step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer) -> jax.Array:
        def loss(model: nnx_peft.PeftModel) -> jax.Array:
            return jnp.mean(model(x) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(
            model
        )
        optimizer.update(model, grads)
        return value

    trained = _values(model, which)
    for _ in range(2):
        step(model, optimizer)
    for old, new in zip(kept, _values(model, frozen), strict=True):
        np.testing.assert_array_equal(old, new)
    assert any(
        not np.array_equal(o, n) for o, n in zip(trained, _values(model, which), strict=True)
    )
    rest = jax.tree.leaves(nnx.state(model, weights))
    for old, new in zip(base, rest, strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))


@given(two=two_cases())
def test_merging_the_active_set_computes_what_it_computes(two: TwoCase) -> None:
    model = _two(two)
    model.set_adapter(["default", "other"])
    x = two.case.sample(seed=5)
    expected = model(x)
    scale = float(jnp.abs(expected).max()) + 1.0
    weights = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    model.merge_adapter()
    assert model.merged
    np.testing.assert_allclose(model(x), expected, atol=1e-5 * scale)
    model.unmerge_adapter()
    for old, new in zip(weights, jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))
    plain = model.merge_and_unload()
    np.testing.assert_allclose(plain(x), expected, atol=1e-5 * scale)
    model.set_adapter("other")
    only = model(x)
    plain = model.merge_and_unload(adapter_names=["other"])
    np.testing.assert_allclose(plain(x), only, atol=1e-5 * (float(jnp.abs(only).max()) + 1.0))


@given(two=two_cases())
def test_saving_then_loading_by_name_reproduces_each_adapter(
    two: TwoCase, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = _two(two)
    root = tmp_path_factory.mktemp("named")
    for name in model.adapter_names:
        model.save_adapter(root / name, adapter_name=name)
    x = two.case.sample(seed=6)
    fresh = nnx_peft.PeftModel(
        two.case.build(), two.case.config, two.case.sample(), rngs=nnx.Rngs(7)
    )
    fresh.load_adapter(root / "other", adapter_name="other")
    fresh.load_adapter(root / "default", adapter_name="default")
    for name in model.adapter_names:
        for old, new in zip(_values(model, name), _values(fresh, name), strict=True):
            np.testing.assert_array_equal(old, new)
        model.set_adapter(name)
        fresh.set_adapter(name)
        np.testing.assert_array_equal(fresh(x), model(x))
    loaded = nnx_peft.PeftModel.from_pretrained(
        two.case.build(), root / "other", two.case.sample(), rngs=nnx.Rngs(8), adapter_name="x"
    )
    assert loaded.adapter_names == ("x",)
    np.testing.assert_array_equal(loaded(x), model(x))


# --- Examples and bad input -------------------------------------------------------------------


class _Mlp(nnx.Module):
    def __init__(self) -> None:
        rngs = nnx.Rngs(0)
        self.up = nnx.Linear(4, 8, rngs=rngs)
        self.down = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.relu(self.up(x)))


_X = jnp.ones((2, 4))
_CONFIG = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")


def _model() -> nnx_peft.PeftModel:
    return nnx_peft.PeftModel(_Mlp(), _CONFIG, _X, rngs=nnx.Rngs(1))


def test_the_trainable_filter_selects_the_active_adapters_only() -> None:
    model = _model()
    assert model.trainable_filter is nnx_peft.AdapterParam
    model.add_adapter("other", dataclasses.replace(_CONFIG, target="down"), rngs=nnx.Rngs(2))
    paths = lambda: sorted(  # noqa: E731
        "/".join(map(str, p))
        for p, _ in nnx.to_flat_state(nnx.state(model, model.trainable_filter))
    )
    assert paths() == [
        "model/down/kernel_lora_a",
        "model/down/kernel_lora_b",
        "model/up/kernel_lora_a",
        "model/up/kernel_lora_b",
    ]
    model.set_adapter("other")
    assert paths() == ["model/down/kernel_lora_a__other", "model/down/kernel_lora_b__other"]
    optimizer = model.make_optimizer(optax.adam(1e-3))
    moments = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(optimizer, nnx.OptVariable))}
    assert moments == {"kernel_lora_a__other", "kernel_lora_b__other"}


def test_a_named_first_adapter_and_its_summary() -> None:
    model = nnx_peft.PeftModel(_Mlp(), _CONFIG, _X, rngs=nnx.Rngs(1), adapter_name="task_a")
    assert model.adapter_names == model.active_adapters == ("task_a",)
    assert {info.adapter_name for info in model.adapters()} == {"task_a"}
    assert model.peft_config == {"task_a": _CONFIG}
    model.add_adapter("task_b", _CONFIG, _X, rngs=nnx.Rngs(2))
    assert [(i.module_path, i.adapter_name) for i in model.adapters()] == [
        ("down", "task_a"),
        ("down", "task_b"),
        ("up", "task_a"),
        ("up", "task_b"),
    ]


@pytest.mark.parametrize("name", ["", "a b", "a__b", "_a", 3, "a-b"])
def test_an_invalid_name_is_refused(name: object) -> None:
    with pytest.raises(nnx_peft.AdapterNameError, match="letters, digits and single underscores"):
        _model().add_adapter(name, _CONFIG, rngs=nnx.Rngs(2))  # type: ignore[arg-type]


def test_unknown_and_duplicate_names_are_refused() -> None:
    model = _model()
    with pytest.raises(nnx_peft.AdapterNameError, match="has an adapter named 'default'"):
        model.add_adapter("default", _CONFIG, rngs=nnx.Rngs(2))
    for call in (
        lambda: model.set_adapter("nope"),
        lambda: model.delete_adapter("nope"),
        lambda: model.save_adapter("/tmp/unused", adapter_name="nope"),
        lambda: model.merge_and_unload(adapter_names=["nope"]),
    ):
        with pytest.raises(
            nnx_peft.AdapterNameError, match=r"unknown adapter name\(s\) \['nope'\]"
        ):
            call()
    with pytest.raises(nnx_peft.AdapterNameError, match="a name twice"):
        model.set_adapter(["default", "default"])


def test_deleting_the_last_or_a_merged_adapter_is_refused() -> None:
    model = _model()
    with pytest.raises(nnx_peft.AdapterStateError, match="last adapter"):
        model.delete_adapter("default")
    model.add_adapter("other", _CONFIG, rngs=nnx.Rngs(2))
    model.set_adapter(["default", "other"])
    model.merge_adapter()
    with pytest.raises(nnx_peft.AdapterStateError, match="merged into the base weights"):
        model.delete_adapter("other")
    with pytest.raises(nnx_peft.AdapterStateError, match="unmerged and enabled"):
        model.set_adapter("default")
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert model.adapter_names == ("default",)


def test_dora_is_active_alone() -> None:
    model = _model()
    model.add_adapter("dora", dataclasses.replace(_CONFIG, use_dora=True), rngs=nnx.Rngs(2))
    model.set_adapter("dora")
    with pytest.raises(nnx_peft.AdapterStateError, match="DoRA"):
        model.set_adapter(["default", "dora"])


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"init": "pissa"}, r"init='default'"),
        ({"modules_to_save": "up"}, r"modules_to_save=\(\)"),
        ({"weight_qtype": "int8"}, r"weight_qtype=None was expected"),
    ],
)
def test_configs_that_cannot_share_the_model_are_refused(change: dict, pattern: str) -> None:
    model = _model()
    with pytest.raises(nnx_peft.AddedAdapterError, match=pattern):
        model.add_adapter("other", dataclasses.replace(_CONFIG, **change), rngs=nnx.Rngs(2))
    assert model.adapter_names == ("default",)


def test_a_copy_has_no_sample_inputs_to_reuse() -> None:
    copy = nnx.clone(_model())
    with pytest.raises(nnx_peft.SampleInputsError, match="kept none"):
        copy.add_adapter("other", _CONFIG, rngs=nnx.Rngs(2))
    copy.add_adapter("other", _CONFIG, _X, rngs=nnx.Rngs(2))
    assert copy.adapter_names == ("default", "other")


def test_one_adapter_operations_need_a_name_when_there_are_several(tmp_path: Path) -> None:
    model = _model()
    model.add_adapter("other", _CONFIG, rngs=nnx.Rngs(2))
    with pytest.raises(nnx_peft.AdapterNameError, match="has several"):
        model.save_adapter(tmp_path / "a")
    with pytest.raises(nnx_peft.AdapterNameError, match="has several"):
        model.save_safetensors(tmp_path / "a.safetensors")
    with pytest.raises(nnx_peft.AdapterNameError, match="training run of one adapter"):
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(tmp_path / "run") as manager:
            model.save_training_checkpoint(manager, 0, model.make_optimizer(optax.adam(1e-3)))
    assert not (tmp_path / "a").exists()


def test_loading_a_new_name_that_fails_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    model = _model()
    other = nnx_peft.PeftModel(_Mlp(), dataclasses.replace(_CONFIG, rank=3), _X, rngs=nnx.Rngs(3))
    other.save_adapter(tmp_path / "r3")
    (tmp_path / "bad").mkdir()
    graph = nnx.graphdef(model)
    with pytest.raises(nnx_peft.NotACheckpointError):
        model.load_adapter(tmp_path / "bad", adapter_name="new")
    assert model.adapter_names == ("default",) and nnx.graphdef(model) == graph
    model.load_adapter(tmp_path / "r3", adapter_name="r3")
    assert model.adapter_names == ("default", "r3")
    assert model.peft_config["r3"].rank == 3


def test_qlora_adapters_share_the_quantized_base() -> None:
    config = dataclasses.replace(_CONFIG, weight_qtype="int8")
    model = nnx_peft.PeftModel(_Mlp(), config, _X, rngs=nnx.Rngs(1))
    _randomize(model, "default", 1)
    model.add_adapter("other", dataclasses.replace(config, rank=3), rngs=nnx.Rngs(2))
    _randomize(model, "other", 2)
    model.set_adapter(["default", "other"])
    both = model(_X)
    model.set_adapter("default")
    assert not np.array_equal(both, model(_X))
    narrow = nnx_peft.PeftModel(
        _Mlp(), dataclasses.replace(config, target="up"), _X, rngs=nnx.Rngs(1)
    )
    with pytest.raises(nnx_peft.AddedAdapterError, match=re.escape("holds in float")):
        narrow.add_adapter("other", config, rngs=nnx.Rngs(2))
    assert narrow.adapter_names == ("default",)


# --- One adapter per example ------------------------------------------------------------------


@given(two=two_cases(), data=st.data())
def test_each_example_runs_with_its_own_adapter(two: TwoCase, data: st.DataObject) -> None:
    model = _two(two)
    model.add_adapter("third", dataclasses.replace(two.other, rank=6), rngs=nnx.Rngs(3))
    _randomize(model, "third", 30)
    batch = data.draw(st.integers(1, 4))
    ids = jnp.array(data.draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch)))
    x = two.case.sample(batch=batch, seed=8)
    mixed = model(x, adapter_ids=ids)
    jitted = nnx.jit(lambda model, x, ids: model(x, adapter_ids=ids))(model, x, ids)
    for row, index in enumerate(np.asarray(ids)):
        model.set_adapter(model.adapter_names[index])
        alone = model(x[row : row + 1])[0]
        scale = float(jnp.abs(alone).max()) + 1.0
        np.testing.assert_allclose(mixed[row], alone, atol=1e-6 * scale, rtol=0)
        np.testing.assert_allclose(jitted[row], alone, atol=1e-6 * scale, rtol=0)
    with model.disable_adapter():
        np.testing.assert_array_equal(model(x, adapter_ids=ids), model(x))


def test_adapter_ids_inside_disable_adapter_run_the_base_model_everywhere() -> None:
    """Found by the exploring CI profile: a module without the active (disabled) adapter,
    holding only inactive ones, still added their per-example updates."""
    base = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target="layers/1")
    x = jax.random.normal(jax.random.key(0), (2, 4))
    model = nnx_peft.PeftModel(base, config, x, rngs=nnx.Rngs(2))
    model.add_adapter("both", dataclasses.replace(config, target=r"layers/\d"), rngs=nnx.Rngs(3))
    _randomize(model, "default", 10)
    _randomize(model, "both", 20)
    ids = jnp.array([1, 0])
    with model.disable_adapter():
        np.testing.assert_array_equal(model(x, adapter_ids=ids), base(x))
        with pytest.raises(nnx_peft.AdapterIdsError, match="out of range"):
            model(x, adapter_ids=jnp.array([0, 2]))
    assert not np.array_equal(model(x, adapter_ids=ids), base(x))


def test_adapter_ids_that_cannot_be_served_are_refused() -> None:
    model = _model()
    model.add_adapter("other", _CONFIG, rngs=nnx.Rngs(2))
    x = jnp.ones((2, 4))
    with pytest.raises(nnx_peft.AdapterIdsError, match="one integer per example"):
        model(x, adapter_ids=jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(nnx_peft.AdapterIdsError, match="one integer per example"):
        model(x, adapter_ids=jnp.zeros((2,)))
    with pytest.raises(nnx_peft.AdapterIdsError, match=r"holds \[2\], out of range"):
        model(x, adapter_ids=jnp.array([0, 2]))
    with pytest.raises(nnx_peft.AdapterIdsError, match=r"of 3 entries reached .* shape \(2, 4\)"):
        model(x, adapter_ids=jnp.array([0, 1, 1]))
    jitted = nnx.jit(lambda model, x, ids: model(x, adapter_ids=ids))
    out = np.asarray(jitted(model, x, jnp.array([0, 7])))
    assert not np.isnan(out[0]).any() and np.isnan(out[1]).all()  # never a wrong adapter
    model.add_adapter("dora", dataclasses.replace(_CONFIG, use_dora=True), rngs=nnx.Rngs(3))
    with pytest.raises(nnx_peft.AdapterIdsError, match="'dora' is a 'dora' adapter"):
        model(x, adapter_ids=jnp.array([0, 2]))
    model.merge_adapter()
    with pytest.raises(nnx_peft.AdapterIdsError, match="is merged"):
        model(x, adapter_ids=jnp.array([0, 1]))
