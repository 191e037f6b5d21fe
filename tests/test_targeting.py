"""Targeting: the ``inspect_targets`` dry run, ``target='all-linear'``, and ``modules_to_save``.

The invariants:

- ``inspect_targets`` reports, for random models and configs, exactly the adapters
  (paths, shapes, ranks, scales) that wrapping creates, lists every module path and
  the patterns that select nothing, and leaves the model exactly as it was;
- ``'all-linear'`` adapts every module that multiplies by its own weight except the
  output head, the module of the sample call's last matmul when that matmul is on its
  own weight and gives the model's output (none with a tied embedding);
- a module in ``modules_to_save`` is trained in full (and nothing else of the base),
  saved and loaded with the adapters (batch statistics included), kept with its
  trained values by ``merge_and_unload`` and restored by ``disable_adapter()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder
from tests import strategies
from tests.test_merging import arrays, assert_plain, assert_same_arrays, randomize_adapters

TINY = DecoderConfig(
    vocab_size=11, num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=16, max_len=16
)
TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], jnp.int32)
PROJECTIONS = [
    f"layers/0/{p}" for p in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj")
] + [f"layers/0/mlp/{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def _snapshot(model: nnx.Module) -> tuple[Any, list[bytes]]:
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    raw = [
        jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        for x in leaves
    ]
    return graphdef, [np.asarray(x).tobytes() for x in raw]


# --- inspect_targets -----------------------------------------------------------------------


@given(case=strategies.cases(), dora=st.booleans(), rank_for_first=st.integers(1, 3))
def test_inspect_targets_reports_what_wrapping_creates(
    case: strategies.Case, dora: bool, rank_for_first: int
) -> None:
    first = case.targeted[0][0]
    config = nnx_peft.LoraConfig(
        **(case.config.to_dict() | {"use_dora": dora, "rank_pattern": {first: rank_for_first}})
    )
    base = case.build()
    before = _snapshot(base)
    report = nnx_peft.inspect_targets(base, config, case.sample())
    after = _snapshot(base)
    assert after[0] == before[0] and after[1] == before[1]  # the model is left as it was

    model = nnx_peft.PeftModel(base, config, case.sample(), rngs=nnx.Rngs(7))
    wrapped = sorted(model.adapters(), key=lambda i: (i.module_path, i.weight))
    reported = sorted(
        (i for m in report.modules for i in m.adapters), key=lambda i: (i.module_path, i.weight)
    )
    assert reported == wrapped
    assert set(report.adapted) == {path for path, _ in case.targeted}
    assert [m.path for m in report.modules] == list(nnx_peft._paths.module_paths(base))
    assert report.unused == ()
    for module in report.modules:
        if module.path in report.adapted:
            assert module.target is not None and module.skipped is None
        elif module.target is not None and module.holds_weights:
            assert module.skipped is not None and module.skipped.startswith("exclude")


def test_inspect_targets_reports_patterns_that_select_nothing() -> None:
    config = nnx_peft.LoraConfig(
        rank=2,
        alpha=4.0,
        target=[r".*q_proj", r".*attn", "nothing"],
        exclude=["absent"],
        rank_pattern={r".*v_proj": 4},
        alpha_pattern={r".*q_proj": 1.0},
        modules_to_save=["missing"],
    )
    report = nnx_peft.inspect_targets(TinyDecoder(TINY, rngs=nnx.Rngs(0)), config, TOKENS)
    assert report.adapted == ("layers/0/attn/q_proj",)
    assert report.unused == (
        "modules_to_save 'missing': matches no module holding an nnx.Param",
        "target '.*attn': matches ['layers/0/attn'], which get no adapter (no matmul on a "
        "weight of their own)",
        "target 'nothing': matches no module path (after exclude)",
        "exclude 'absent': matches no module path",
        "rank_pattern '.*v_proj': applies to no adapted module",
    )
    text = report.format()
    assert "kernel: A (8, 2) B (2, 2, 4), rank 2, scale 0.5" in text
    assert "patterns that matched nothing:" in text and "'nothing'" in text


# --- all-linear ----------------------------------------------------------------------------


def test_all_linear_adapts_every_projection_but_the_head() -> None:
    base = TinyDecoder(TINY, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="all-linear")
    model = nnx_peft.PeftModel(base, config, TOKENS, rngs=nnx.Rngs(1))
    assert sorted(i.module_path for i in model.adapters()) == sorted(PROJECTIONS)
    report = nnx_peft.inspect_targets(base, config, TOKENS)
    assert report.output_head == "lm_head"
    head = next(m for m in report.modules if m.path == "lm_head")
    assert (head.target, head.skipped, head.adapters) == ("all-linear", "output head", ())
    explicit = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(proj)")
    same = nnx_peft.PeftModel(base, explicit, TOKENS, rngs=nnx.Rngs(1))
    assert_same_arrays(arrays(model, nnx_peft.AdapterParam), arrays(same, nnx_peft.AdapterParam))
    assert model.trainable_parameters().adapters[0][1] == "all-linear"

    excluding = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="all-linear", exclude=r".*mlp/.*")
    kept = nnx_peft.PeftModel(base, excluding, TOKENS, rngs=nnx.Rngs(1))
    assert sorted(i.module_path for i in kept.adapters()) == sorted(PROJECTIONS[:4])


@given(case=strategies.cases())
def test_all_linear_leaves_out_the_last_matmul(case: strategies.Case) -> None:
    adaptable = [(f"{path}/inner", k) for path, k in strategies.leaf_layers(case.spec)]
    adaptable = [path for path, kind in adaptable if kind in strategies.ADAPTABLE]
    config = nnx_peft.LoraConfig(rank=1, alpha=1.0, target="all-linear")
    if len(adaptable) == 1:
        with pytest.raises(nnx_peft.NoAdapterCreatedError, match="output head"):
            nnx_peft.PeftModel(case.build(), config, case.sample(), rngs=nnx.Rngs(0))
        return
    model = nnx_peft.PeftModel(case.build(), config, case.sample(), rngs=nnx.Rngs(0))
    assert sorted(i.module_path for i in model.adapters()) == sorted(adaptable[:-1])


def test_all_linear_with_a_tied_embedding_has_no_head() -> None:
    class Tied(nnx.Module):
        """Gemma-style: the output projection multiplies by the embedding's transpose."""

        def __init__(self, rngs: nnx.Rngs) -> None:
            self.table = nnx.Param(jax.random.normal(rngs.params(), (11, 6)))
            self.mix = nnx.Linear(6, 6, rngs=rngs)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.mix(self.table[...][tokens])
            return jax.lax.dot_general(x, self.table[...].T, (((2,), (0,)), ((), ())))

    base = Tied(nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target="all-linear")
    report = nnx_peft.inspect_targets(base, config, TOKENS)
    # The root's product on the transposed table is the (tied) output head.
    assert report.output_head == "" and report.adapted == ("mix",)
    model = nnx_peft.PeftModel(base, config, TOKENS, rngs=nnx.Rngs(1))
    assert [i.module_path for i in model.adapters()] == ["mix"]


# --- modules_to_save -------------------------------------------------------------------------


class Classifier(nnx.Module):
    """Two adapted layers, then a batch norm and a head trained in full."""

    def __init__(self, classes: int = 3, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Linear(6, 8, rngs=rngs)
        self.hidden = nnx.Linear(8, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.bn(jax.nn.relu(self.hidden(jax.nn.relu(self.embed(x))))))


SAVE = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="embed|hidden", modules_to_save=["head", "bn"])
X = jax.random.normal(jax.random.key(0), (4, 6))
LABELS = jnp.array([0, 1, 2, 1])


@nnx.jit
def _step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer, x: jax.Array) -> jax.Array:
    def loss(m: nnx_peft.PeftModel) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(m(x), LABELS).mean()

    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, model.trainable_filter))(model)
    optimizer.update(model, grads)
    return value


def _trained(config: nnx_peft.LoraConfig = SAVE) -> tuple[Classifier, nnx_peft.PeftModel]:
    base = Classifier(rngs=nnx.Rngs(0))
    model = nnx_peft.PeftModel(base, config, X, rngs=nnx.Rngs(1))
    optimizer = model.make_optimizer(optax.adam(1e-1))
    for _ in range(3):
        _step(model, optimizer, X)
    return base, model


def test_saved_modules_are_trained_in_full_and_nothing_else_of_the_base() -> None:
    base = Classifier(rngs=nnx.Rngs(0))
    before = arrays(base)
    model = nnx_peft.PeftModel(base, SAVE, X, rngs=nnx.Rngs(1))
    trainable = {
        "/".join(map(str, p))
        for p, _ in nnx.to_flat_state(nnx.state(model, model.trainable_filter))
    }
    assert trainable == {
        "model/embed/kernel_lora_a", "model/embed/kernel_lora_b",
        "model/hidden/kernel_lora_a", "model/hidden/kernel_lora_b",
        "model/head/kernel", "model/head/bias", "model/bn/scale", "model/bn/bias",
    }  # fmt: skip
    assert isinstance(model.model.head.kernel, nnx_peft.SavedParam)
    summary = model.trainable_parameters()
    assert summary.saved == (("bn", "bn", 16), ("head", "head", 27))
    assert summary.trainable == 2 * (6 + 8) + 2 * (8 + 8) + 16 + 27
    assert "modules_to_save head" in summary.format()

    frozen = arrays(model, nnx_peft.FROZEN_PARAMS)
    optimizer = model.make_optimizer(optax.adam(1e-1))
    for _ in range(3):
        _step(model, optimizer, X)
    assert_same_arrays(arrays(model, nnx_peft.FROZEN_PARAMS), frozen)
    changed = arrays(model, nnx_peft.SavedParam)
    for path, value in arrays(
        nnx_peft.PeftModel(base, SAVE, X, rngs=nnx.Rngs(1)), nnx_peft.SavedParam
    ).items():
        assert not np.array_equal(changed[path], value), path
    assert not np.array_equal(model.model.bn.mean.get_value(), base.bn.mean.get_value())
    assert_same_arrays(arrays(base), before)  # the user's base model is untouched


def test_saved_modules_are_saved_loaded_merged_and_disabled(tmp_path: Path) -> None:
    base, model = _trained()
    model.eval()
    out = model(X)
    model.save_adapter(tmp_path / "adapter")
    loaded = nnx_peft.PeftModel.from_pretrained(
        Classifier(rngs=nnx.Rngs(0)), tmp_path / "adapter", X, rngs=nnx.Rngs(9)
    )
    assert np.asarray(loaded(X)).tobytes() == np.asarray(out).tobytes()  # batch stats too
    assert _snapshot(loaded.model)[1] == _snapshot(model.model)[1]  # (Qwix makes a class per wrap)

    model.save_safetensors(tmp_path / "adapter.safetensors")
    other = nnx_peft.PeftModel(Classifier(rngs=nnx.Rngs(0)), SAVE, X, rngs=nnx.Rngs(9))
    other.load_safetensors(tmp_path / "adapter.safetensors")
    assert np.asarray(other(X)).tobytes() == np.asarray(out).tobytes()

    with pytest.raises(nnx_peft.CheckpointMismatchError) as info:  # keys and shapes are checked
        nnx_peft.PeftModel.from_pretrained(
            Classifier(classes=4, rngs=nnx.Rngs(0)), tmp_path / "adapter", X, rngs=nnx.Rngs(9)
        )
    assert "head/kernel" in str(info.value) and "head/bias" in str(info.value)

    plain = model.merge_and_unload()
    base.eval()  # (the batch norm's mode is part of the graph definition)
    assert_plain(plain, base)
    np.testing.assert_allclose(plain(X), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        plain.head.kernel.get_value(), model.model.head.kernel.get_value()
    )
    np.testing.assert_array_equal(plain.bn.mean.get_value(), model.model.bn.mean.get_value())

    with model.disable_adapter():  # the saved modules' values from before training
        np.testing.assert_array_equal(model(X), base(X))
    np.testing.assert_array_equal(model(X), out)


def test_training_checkpoints_with_saved_modules_and_pissa_resume_exactly(tmp_path: Path) -> None:
    config = nnx_peft.LoraConfig(**(SAVE.to_dict() | {"init": "pissa", "dropout": 0.2}))
    _, model = _trained(config)
    optimizer = model.make_optimizer(optax.adam(1e-1))
    _step(model, optimizer, X)
    with ocp.CheckpointManager(tmp_path.absolute()) as manager:
        model.save_training_checkpoint(manager, 1, optimizer)
        manager.wait_until_finished()
    stored = json.loads((tmp_path / "1" / "description" / "metadata").read_text())["arrays"]
    assert "bn/mean" in stored["adapter"] and "head/kernel" in stored["adapter"]
    assert not any("initial" in p or "original" in p for item in stored.values() for p in item)
    assert not any(p.startswith(("bn/", "head/")) for p in stored["model_state"])

    resumed = nnx_peft.PeftModel(Classifier(rngs=nnx.Rngs(0)), config, X, rngs=nnx.Rngs(4))
    resumed_optimizer = resumed.make_optimizer(optax.adam(1e-1))
    with ocp.CheckpointManager(tmp_path.absolute()) as manager:
        assert resumed.restore_training_checkpoint(manager, resumed_optimizer) == 1
    for m, o in ((model, optimizer), (resumed, resumed_optimizer)):
        _step(m, o, X)
    assert _snapshot(resumed)[1] == _snapshot(model)[1]


def test_saved_parameters_keep_their_sharding_metadata() -> None:
    mesh = jax.make_mesh((1,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "tp"))
        base = Classifier(rngs=nnx.Rngs(0))
        base.head = nnx.Linear(8, 3, kernel_init=init, rngs=nnx.Rngs(2))
        model = nnx_peft.PeftModel(base, SAVE, X, rngs=nnx.Rngs(1))
    kernel = model.model.head.kernel
    assert isinstance(kernel, nnx_peft.SavedParam)
    assert kernel.get_metadata()["out_sharding"] == (None, "tp")
    assert kernel.get_value().sharding == base.head.kernel.get_value().sharding
    plain = model.merge_and_unload()
    assert type(plain.head.kernel) is nnx.Param
    assert plain.head.kernel.get_metadata() == base.head.kernel.get_metadata()


def test_saved_modules_must_exist_and_not_hold_adapters() -> None:
    base = Classifier(rngs=nnx.Rngs(0))
    with pytest.raises(nnx_peft.TargetNotFoundError) as info:
        nnx_peft.PeftModel(
            base,
            nnx_peft.LoraConfig(**(SAVE.to_dict() | {"modules_to_save": ["classifier"]})),
            X,
            rngs=nnx.Rngs(1),
        )
    assert "modules_to_save pattern 'classifier'" in str(info.value) and "'head'" in str(info.value)
    with pytest.raises(nnx_peft.ConfigError) as info:
        nnx_peft.PeftModel(
            base,
            nnx_peft.LoraConfig(**(SAVE.to_dict() | {"modules_to_save": ["hidden"]})),
            X,
            rngs=nnx.Rngs(1),
        )
    assert "selects 'hidden', which holds adapted modules ['hidden']" in str(info.value)
    # With 'all-linear', saved modules are simply not adapted.
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target="all-linear", modules_to_save="hidden")
    model = nnx_peft.PeftModel(base, config, X, rngs=nnx.Rngs(1))
    assert [i.module_path for i in model.adapters()] == ["embed"]
    randomize_adapters(model)
    assert isinstance(model.model.hidden.kernel, nnx_peft.SavedParam)
