"""LoRA on embedding tables (``nnx_peft/_embedding.py``).

Invariants, on generated models whose tables are looked up through ``nnx.Embed``
(``jnp.take``) or by indexing an ``nnx.Param`` (``table[(ids,)]``, as tunix does):
- a fresh wrapper gives the base model's outputs bit for bit, and so does
  ``disable_adapter``;
- the update is ``scale * A[ids] @ B`` with ``A`` ``(vocab, r)`` and ``B`` ``(r, features)``;
- only the adapters train;
- merging is exact: ``merge_and_unload`` gives the adapted outputs, and unmerging
  restores the table bit for bit;
- own-format checkpoints (Orbax and safetensors) round-trip the adapters exactly;
- an output head tied to the table (``Embed.attend``) gets no update, as in HF PEFT,
  and refuses merging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_peft
from tests import strategies


def _wrap(case: strategies.EmbeddingCase, **config: object) -> nnx_peft.PeftModel:
    fields = {"rank": case.rank, "alpha": case.alpha, "target": case.target} | config
    return nnx_peft.PeftModel(
        case.build(), nnx_peft.LoraConfig(**fields), case.ids(), rngs=nnx.Rngs(1)
    )


def _table_adapter(model: nnx_peft.PeftModel) -> tuple[jax.Array, jax.Array]:
    module = model.model.embedder
    name = "embedding" if isinstance(module, nnx.Embed) else "input_embedding"
    return (
        getattr(module, name + "_lora_a").get_value(),
        getattr(module, name + "_lora_b").get_value(),
    )


@given(strategies.embedding_cases())
def test_fresh_wrapper_and_disabled_adapter_are_the_base(case: strategies.EmbeddingCase) -> None:
    base = case.build()
    model = _wrap(case)
    ids = case.ids()
    expected = np.asarray(base(ids))
    np.testing.assert_array_equal(np.asarray(model(ids)), expected)
    infos = {i.module_path: i for i in model.adapters()}
    assert infos["embedder"].a_shape == (case.vocab, case.rank)
    assert infos["embedder"].b_shape == (case.rank, case.features)
    strategies.randomized_adapters(model, scale=0.3)
    assert not np.array_equal(np.asarray(model(ids)), expected)
    with model.disable_adapter():
        np.testing.assert_array_equal(np.asarray(model(ids)), expected)


def _adapted_rows(
    case: strategies.EmbeddingCase,
    base: strategies.EmbeddingNet,
    model: nnx_peft.PeftModel,
    ids: jax.Array,
) -> jax.Array:
    """``E[ids] + scale * A[ids] @ B`` from the base table and the model's adapter."""
    a, b = _table_adapter(model)
    table = strategies.table_variable(base.embedder).get_value()
    return table[ids] + (case.alpha / case.rank) * (a[ids] @ b)


@given(strategies.embedding_cases())
def test_update_is_scaled_rows_of_a_times_b(case: strategies.EmbeddingCase) -> None:
    """The table's update alone: ``E[ids] + scale * A[ids] @ B``, independent of nnx_peft's code."""
    base = case.build()
    model = strategies.randomized_adapters(_wrap(case, target="embedder"), scale=0.3)
    ids = case.ids()
    looked_up = _adapted_rows(case, base, model, ids)
    expected = base.after_lookup(looked_up)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    jitted = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(ids)), rtol=1e-5, atol=1e-5)


@given(strategies.embedding_cases(tied=False))
def test_merge_is_exact_and_unmerge_restores_bits(case: strategies.EmbeddingCase) -> None:
    model = strategies.randomized_adapters(_wrap(case), scale=0.3)
    ids = case.ids()
    adapted = np.asarray(model(ids))
    table = strategies.table_variable(model.model.embedder)
    before = np.asarray(table.get_value())
    model.merge_adapter()
    np.testing.assert_allclose(np.asarray(model(ids)), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    np.testing.assert_array_equal(np.asarray(table.get_value()), before)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(np.asarray(merged(ids)), adapted, rtol=1e-5, atol=1e-5)
    a, b = _table_adapter(model)
    expected = before + (case.alpha / case.rank) * np.asarray(a @ b)
    np.testing.assert_allclose(
        np.asarray(strategies.table_variable(merged.embedder).get_value()),
        expected,
        rtol=1e-6,
        atol=1e-6,
    )


@given(strategies.embedding_cases(tied=True))
def test_tied_head_gets_no_update_and_refuses_merging(case: strategies.EmbeddingCase) -> None:
    base = case.build()
    model = strategies.randomized_adapters(_wrap(case, target="embedder"), scale=0.3)
    ids = case.ids()
    looked_up = _adapted_rows(case, base, model, ids)
    # The head multiplies by the base table, not the adapted one.
    expected = base.after_lookup(looked_up)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    jitted = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(nnx_peft.UnmergeableAdapterError, match="tied output head"):
        model.merge_adapter()
    with pytest.raises(nnx_peft.UnmergeableAdapterError, match="tied output head"):
        model.merge_and_unload()


@pytest.mark.parametrize("lookup", ["embed", "index"])
def test_a_head_tied_outside_the_embedding_refuses_merging(lookup: str) -> None:
    """Logits computed as ``h @ table.T`` by the model's own code, not by the embedder:
    merging would change that head too (it did, silently, by up to 1.06 before)."""
    case = strategies.EmbeddingCase(
        vocab=7, features=4, rank=2, alpha=4.0, lookup=lookup, tied=True, tied_outside=True
    )
    base = case.build()
    model = strategies.randomized_adapters(_wrap(case, target="embedder"), scale=0.3)
    ids = case.ids()
    expected = base.after_lookup(_adapted_rows(case, base, model, ids))
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(nnx_peft.UnmergeableAdapterError, match=r"x @ table\.T in another module"):
        model.merge_and_unload()


def test_an_untied_head_shaped_like_the_transposed_table_still_merges() -> None:
    """The separate head's kernel has the transposed table's shape, not its values."""
    case = strategies.EmbeddingCase(
        vocab=7, features=4, rank=2, alpha=4.0, lookup="embed", tied=False
    )
    model = strategies.randomized_adapters(_wrap(case, target="embedder|head"), scale=0.3)
    ids = case.ids()
    np.testing.assert_allclose(
        np.asarray(model.merge_and_unload()(ids)), np.asarray(model(ids)), rtol=1e-5, atol=1e-5
    )


def _arrays(model: nnx.Module, kind: object) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.array(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, kind))
    }


@settings(max_examples=4)
@given(strategies.embedding_cases())
def test_only_adapters_train(case: strategies.EmbeddingCase) -> None:
    model = strategies.randomized_adapters(_wrap(case), scale=0.3)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx_peft.AdapterParam))
    base_before, adapters_before = _arrays(model, frozen), _arrays(model, nnx_peft.AdapterParam)
    optimizer = model.make_optimizer(optax.sgd(0.1))
    ids = case.ids()

    def loss(m: nnx_peft.PeftModel) -> jax.Array:
        return jnp.mean(m(ids) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(model)
    optimizer.update(model, grads)
    base_after, adapters_after = _arrays(model, frozen), _arrays(model, nnx_peft.AdapterParam)
    assert base_after.keys() == base_before.keys()
    for key, value in base_before.items():
        np.testing.assert_array_equal(base_after[key], value, err_msg=key)
    table = "embedder/" + ("embedding" if case.lookup == "embed" else "input_embedding")
    for suffix in ("_lora_a", "_lora_b"):
        key = next(k for k in adapters_before if k.endswith(table + suffix))
        assert not np.array_equal(adapters_after[key], adapters_before[key]), key


@settings(max_examples=2)
@given(case=strategies.embedding_cases())
def test_checkpoints_round_trip(
    case: strategies.EmbeddingCase, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("embedding")
    model = strategies.randomized_adapters(_wrap(case), scale=0.3)
    ids = case.ids()
    model.save_adapter(folder / "orbax")
    loaded = nnx_peft.PeftModel.from_pretrained(
        case.build(), folder / "orbax", ids, rngs=nnx.Rngs(5)
    )
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    model.save_safetensors(folder / "adapter.safetensors")
    other = _wrap(case)
    other.load_safetensors(folder / "adapter.safetensors")
    np.testing.assert_array_equal(np.asarray(other(ids)), np.asarray(model(ids)))


@given(strategies.embedding_cases())
def test_inspect_targets_and_summary_count_the_table_adapter(
    case: strategies.EmbeddingCase,
) -> None:
    config = nnx_peft.LoraConfig(rank=case.rank, alpha=case.alpha, target=case.target)
    report = nnx_peft.inspect_targets(case.build(), config, case.ids())
    (info,) = next(m for m in report.modules if m.path == "embedder").adapters
    assert (info.a_shape, info.b_shape) == ((case.vocab, case.rank), (case.rank, case.features))
    model = _wrap(case)
    assert [i for i in model.adapters() if i.module_path == "embedder"] == [info]
    summary = model.trainable_parameters()
    assert summary.trainable == sum(i.size for i in model.adapters())


def test_all_linear_leaves_embeddings_alone() -> None:
    """HF PEFT's 'all-linear' adapts Linear layers only; so does nnx_peft's."""
    case = strategies.EmbeddingCase(
        vocab=9, features=4, rank=2, alpha=4.0, lookup="embed", tied=False
    )
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="all-linear")
    model = nnx_peft.PeftModel(case.build(), config, case.ids(), rngs=nnx.Rngs(0))
    assert "embedder" not in {i.module_path for i in model.adapters()}


def test_dora_on_an_embedding_is_refused() -> None:
    case = strategies.EmbeddingCase(
        vocab=9, features=4, rank=2, alpha=4.0, lookup="embed", tied=False
    )
    with pytest.raises(nnx_peft.UnsupportedLayerError, match=r"looks up rows.*'dora'"):
        _wrap(case, use_dora=True)


def test_shardings_follow_the_table() -> None:
    """A table sharded (tp, fsdp): A ``(vocab, r)`` over tp, B ``(r, features)`` over fsdp."""
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
    init = nnx.with_partitioning(nnx.initializers.normal(), ("tp", "fsdp"))
    with jax.set_mesh(mesh):
        base = nnx.Embed(9, 4, embedding_init=init, rngs=nnx.Rngs(0))
        config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        model = nnx_peft.PeftModel(base, config, jnp.array([[1, 2]]), rngs=nnx.Rngs(1))
    a = model.model.embedding_lora_a
    b = model.model.embedding_lora_b
    assert a.get_value().sharding.spec == P("tp", None)
    assert b.get_value().sharding.spec == P(None, "fsdp")
    model.shard_adapters({".*": (P(None, "tp"), P("fsdp", None))})
    assert a.get_value().sharding.spec == P(None, "tp")
    assert b.get_value().sharding.spec == P("fsdp", None)
    assert a.get_metadata().get("out_sharding") == (None, "tp")


def test_unreached_embedding_gets_its_adapter_alone() -> None:
    """A targeted ``nnx.Embed`` the sample call skips is called alone on one id."""

    class Skips(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.used = nnx.Embed(5, 3, rngs=rngs)
            self.spare = nnx.Embed(5, 3, rngs=rngs)

        def __call__(self, ids: jax.Array) -> jax.Array:
            return self.used(ids)

    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target="used|spare")
    model = nnx_peft.PeftModel(Skips(nnx.Rngs(0)), config, jnp.array([1]), rngs=nnx.Rngs(1))
    assert {i.module_path for i in model.adapters()} == {"used", "spare"}


def test_table_multiplied_before_its_lookup_is_refused() -> None:
    """One adapter cannot be a matmul's and a lookup's: the order that makes both is refused."""

    class HeadFirst(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.table = nnx.Param(jax.random.normal(rngs.params(), (5, 4)))

        def __call__(self, ids: jax.Array) -> jax.Array:
            scores = jnp.ones((1, 5)) @ self.table[...]
            return self.table[(ids,)] + scores

    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*")
    with pytest.raises(nnx_peft.UnsupportedLayerError, match="multiplies by its weight 'table'"):
        nnx_peft.PeftModel(HeadFirst(nnx.Rngs(0)), config, jnp.array([1, 2]), rngs=nnx.Rngs(1))
