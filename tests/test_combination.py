"""Combining adapters into a new one: ``PeftModel.add_weighted_adapter``.

With ``c_i = w_i * scale_i``, ``'cat'`` is exactly ``sum_i c_i A_i @ B_i``, ``'svd'`` its
best approximation of a rank (exact at a rank as large as the sum's), and ``'linear'``
HF PEFT's ``(sum_i sqrt(c_i) A_i) @ (sum_i sqrt(c_i) B_i)``. An update is linear in
``A @ B``, so each adapted layer's output change is the weighted sum of the adapters' own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft._adapter import adapters
from nnx_peft.toy import DecoderConfig, TinyDecoder
from tests.test_named import TwoCase, _randomize, _two, two_cases

_WEIGHTS = st.floats(-2.0, 2.0, allow_nan=False).filter(lambda w: abs(w) > 1e-3)


def _layer_outputs(
    model: nnx_peft.PeftModel, x: jax.Array, layers: set[str]
) -> dict[str, jax.Array]:
    found = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model.model)}
    return {path: found[path](x) for path in sorted(layers)}


@given(two=two_cases(), weights=st.tuples(_WEIGHTS, _WEIGHTS))
def test_cat_and_full_rank_svd_add_the_weighted_updates_layer_by_layer(
    two: TwoCase, weights: tuple[float, float]
) -> None:
    model = _two(two)
    x = two.case.sample(seed=3)
    layers = {a.path for a in adapters(model.model)}
    outputs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outputs[name] = _layer_outputs(model, x, layers)
    with model.disable_adapter():
        base = _layer_outputs(model, x, layers)
    rank = two.case.config.rank + two.other.rank
    for combination_type in ("cat", "svd"):
        errors = model.add_weighted_adapter(
            ["default", "other"],
            list(weights),
            combination_type,
            combination_type=combination_type,
            **({"svd_rank": rank} if combination_type == "svd" else {}),
        )
        made = adapters(model.model, {combination_type})
        assert set(errors) == {f"{a.path}/{a.weight}".lstrip("/") for a in made}
        assert all(error < 1e-5 for error in errors.values()), errors
        assert model.active_adapters == ("other",)  # the new adapter starts inactive
        model.set_adapter(combination_type)
        combined = _layer_outputs(model, x, layers)
        model.set_adapter("other")
        for path in layers:
            expected = base[path]
            for w, name in zip(weights, ("default", "other"), strict=True):
                expected = expected + w * (outputs[name][path] - base[path])
            scale = float(jnp.abs(expected).max()) + 1.0
            np.testing.assert_allclose(
                combined[path], expected, atol=1e-5 * scale, rtol=0, err_msg=path
            )


def _linear_model(second_rank: int = 3) -> nnx_peft.PeftModel:
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=3, alpha=6.0, target=".*")
    model = nnx_peft.PeftModel(base, config, jnp.ones((1, 6)), rngs=nnx.Rngs(1))
    other = nnx_peft.LoraConfig(rank=second_rank, alpha=2.0, target=".*", use_rslora=True)
    model.add_adapter("other", other, rngs=nnx.Rngs(2))
    _randomize(model, "default", 10)
    _randomize(model, "other", 20)
    return model


def _delta(model: nnx_peft.PeftModel, name: str) -> np.ndarray:
    """``scale * A @ B`` of the adapter ``name`` of the ``nnx.Linear``, from merging."""
    merged = model.merge_and_unload(adapter_names=[name]).kernel.get_value()
    base = model.model.kernel.get_value()  # unmerged: the stored weight is the base
    return np.asarray(merged, np.float64) - np.asarray(base, np.float64)


def _factors(model: nnx_peft.PeftModel, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    (adapter,) = adapters(model.model, {name})
    a, b = (np.asarray(f.get_value(), np.float64) for f in (adapter.a, adapter.b))
    return a, b, adapter.layout.scale


def test_linear_is_hf_peft_s_sum_of_scaled_factors() -> None:
    model = _linear_model()
    weights = [0.6, 1.7]
    errors = model.add_weighted_adapter(
        ["default", "other"], weights, "mix", combination_type="linear"
    )
    (a1, b1, s1), (a2, b2, s2) = _factors(model, "default"), _factors(model, "other")
    r1, r2 = np.sqrt(weights[0] * s1), np.sqrt(weights[1] * s2)
    expected = (r1 * a1 + r2 * a2) @ (r1 * b1 + r2 * b2)
    np.testing.assert_allclose(_delta(model, "mix"), expected, atol=1e-6)
    assert model.peft_config["mix"].rank == 3
    weighted = weights[0] * s1 * a1 @ b1 + weights[1] * s2 * a2 @ b2
    measured = np.linalg.norm(expected - weighted) / np.linalg.norm(weighted)
    assert errors["kernel"] == pytest.approx(measured, rel=1e-4)
    assert errors["kernel"] > 1e-2  # the cross terms


def test_linear_of_one_adapter_scales_its_update() -> None:
    model = _linear_model()
    errors = model.add_weighted_adapter(["other"], [0.25], "quarter", combination_type="linear")
    np.testing.assert_allclose(_delta(model, "quarter"), 0.25 * _delta(model, "other"), atol=1e-6)
    assert errors["kernel"] < 1e-6


@pytest.mark.parametrize("rank", [1, 2, 4, 5, 9])
def test_svd_is_the_best_approximation_of_its_rank_and_reports_its_error(rank: int) -> None:
    model = _linear_model(second_rank=2)
    weights = [1.5, -0.8]
    errors = model.add_weighted_adapter(
        ["default", "other"], weights, "svd", combination_type="svd", svd_rank=rank
    )
    target = weights[0] * _delta(model, "default") + weights[1] * _delta(model, "other")
    singular = np.linalg.svd(target, compute_uv=False)
    optimum = np.sqrt(np.sum(singular[rank:] ** 2)) / np.linalg.norm(target)  # Eckart-Young
    made = _delta(model, "svd")
    measured = np.linalg.norm(made - target) / np.linalg.norm(target)
    assert np.linalg.matrix_rank(made, tol=1e-5) <= rank
    assert measured == pytest.approx(optimum, abs=1e-5)
    assert errors["kernel"] == pytest.approx(measured, abs=1e-5)
    assert model.peft_config["svd"].rank == rank


def test_svd_ranks_default_to_the_largest_one_combined() -> None:
    model = _linear_model(second_rank=2)
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "svd")  # HF's default type
    assert model.peft_config["svd"].rank == 3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cat_of_a_decoder_merges_to_the_weighted_sum(scan_layers: bool, tmp_path: Path) -> None:
    cfg = DecoderConfig(
        vocab_size=32, embed_dim=16, num_heads=2, head_dim=8, scan_layers=scan_layers
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target=r".*(q_proj|v_proj)")
    model = nnx_peft.PeftModel(TinyDecoder(cfg, rngs=nnx.Rngs(0)), config, tokens, rngs=nnx.Rngs(1))
    other = nnx_peft.LoraConfig(rank=2, alpha=3.0, target=r".*(q_proj|up_proj)")
    model.add_adapter("other", other, rngs=nnx.Rngs(2))
    _randomize(model, "default", 10)
    _randomize(model, "other", 20)
    weights = (0.5, -1.5)
    errors = model.add_weighted_adapter(
        ["default", "other"], list(weights), "both", combination_type="cat"
    )
    assert all(error < 1e-5 for error in errors.values()), errors
    base_weights = nnx.All(nnx.Param, nnx.Not(nnx_peft.AdapterParam))
    merged = {
        name: nnx.to_flat_state(nnx.state(model.merge_and_unload(adapter_names=[name]), nnx.Param))
        for name in ("default", "other", "both")
    }
    merged["base"] = nnx.to_flat_state(nnx.state(model.model, base_weights))
    changed = 0
    rest_of = (merged[n] for n in ("base", "default", "other"))
    for (_, value), *rest in zip(merged["both"], *rest_of, strict=True):
        base, first, second = (np.asarray(v.get_value(), np.float64) for _, v in rest)
        expected = base + weights[0] * (first - base) + weights[1] * (second - base)
        np.testing.assert_allclose(np.asarray(value.get_value()), expected, atol=2e-6)
        changed += not np.array_equal(expected, base)
    assert changed == (3 if scan_layers else 6)  # q, v and up of each of 2 layers (or 1 stack)
    # The combined adapter is an adapter like any: saved and loaded by name, exactly.
    model.save_adapter(tmp_path / "both", adapter_name="both")
    again = nnx_peft.PeftModel(TinyDecoder(cfg, rngs=nnx.Rngs(0)), config, tokens, rngs=nnx.Rngs(1))
    again.load_adapter(tmp_path / "both", adapter_name="both")
    again.set_adapter("both")
    model.set_adapter("both")
    np.testing.assert_array_equal(again(tokens), model(tokens))


@pytest.mark.parametrize(
    ("names", "weights", "kwargs", "error", "pattern"),
    [
        (["default", "nope"], [1, 1], {}, nnx_peft.AdapterNameError, "unknown"),
        (["default", "default"], [1, 1], {}, nnx_peft.AdapterNameError, "twice"),
        (["default"], [1, 1], {}, nnx_peft.WeightedAdapterError, "one finite real weight"),
        (["default"], [float("nan")], {}, nnx_peft.WeightedAdapterError, "one finite real"),
        (["default"], [1], {"combination_type": "ties"}, nnx_peft.WeightedAdapterError, "one of"),
        (
            ["default", "other"],
            [1, 1],
            {"combination_type": "linear"},
            nnx_peft.WeightedAdapterError,
            "ranks",
        ),
        (
            ["default"],
            [-1],
            {"combination_type": "linear"},
            nnx_peft.WeightedAdapterError,
            ">= 0",
        ),
        (
            ["default"],
            [1],
            {"combination_type": "cat", "svd_rank": 2},
            nnx_peft.WeightedAdapterError,
            "svd_rank sets",
        ),
        (["default"], [1], {"svd_rank": 0}, nnx_peft.WeightedAdapterError, "positive integer"),
    ],
)
def test_combinations_that_cannot_be_made_are_refused(
    names: list[str], weights: list[float], kwargs: dict, error: type, pattern: str
) -> None:
    model = _linear_model(second_rank=2)
    before = model.adapter_names
    with pytest.raises(error, match=pattern):
        model.add_weighted_adapter(names, weights, "new", **kwargs)
    assert model.adapter_names == before


def test_linear_refuses_adapters_of_different_targets() -> None:
    base = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target=r"layers/\d+")
    model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(2))
    model.add_adapter("first", dataclasses.replace(config, target="layers/0"), rngs=nnx.Rngs(3))
    with pytest.raises(nnx_peft.WeightedAdapterError, match="has no adapter \\['first'\\]"):
        model.add_weighted_adapter(["default", "first"], [1, 1], "new", combination_type="linear")
    model.add_weighted_adapter(["default", "first"], [1, 1], "new", combination_type="cat")
    assert model.peft_config["new"].rank == 2  # layers/1 has the default adapter alone
    assert dict(model.peft_config["new"].rank_pattern) == {"layers/0": 4}


def test_dora_adapters_the_taken_name_and_a_merged_model_are_refused() -> None:
    model = _linear_model()
    model.add_adapter(
        "dora", nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*", use_dora=True), rngs=nnx.Rngs(3)
    )
    with pytest.raises(nnx_peft.WeightedAdapterError, match="dora adapter"):
        model.add_weighted_adapter(["default", "dora"], [1, 1], "new", combination_type="cat")
    with pytest.raises(nnx_peft.AdapterNameError, match="already"):
        model.add_weighted_adapter(["default"], [1], "other")
    model.merge_adapter()
    with pytest.raises(nnx_peft.AdapterStateError, match="unmerge"):
        model.add_weighted_adapter(["default"], [1], "new")
    assert model.adapter_names == ("default", "other", "dora")


def test_a_grouped_convolution_is_refused() -> None:
    base = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0))
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*")
    model = nnx_peft.PeftModel(base, config, jnp.ones((1, 5, 4)), rngs=nnx.Rngs(1))
    with pytest.raises(nnx_peft.WeightedAdapterError, match="grouped convolution"):
        model.add_weighted_adapter(["default"], [1.0], "new", combination_type="cat")
    assert model.adapter_names == ("default",)


class _Branching(nnx.Module):
    """Multiplies by ``w2`` only for batches of more than one example."""

    def __init__(self) -> None:
        self.w1 = nnx.Param(jnp.eye(4))
        self.w2 = nnx.Param(jnp.eye(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.w1
        return y @ self.w2 if x.shape[0] > 1 else y


def test_weights_of_one_module_reached_by_different_adapters() -> None:
    """A module's weights adapted by different sets of adapters: ``'cat'`` would need two
    ranks in one module, and a sample call reaching fewer weights would leave one out."""
    config = nnx_peft.LoraConfig(rank=2, alpha=2.0, target=".*")
    model = nnx_peft.PeftModel(_Branching(), config, jnp.ones((1, 4)), rngs=nnx.Rngs(0))
    model.add_adapter("both", config, jnp.ones((2, 4)), rngs=nnx.Rngs(1))  # w1 and w2
    with pytest.raises(nnx_peft.WeightedAdapterError, match=r"combined ranks differ \(4 and 2\)"):
        model.add_weighted_adapter(["default", "both"], [1, 1], "new", combination_type="cat")
    with pytest.raises(nnx_peft.WeightedAdapterError, match=r"sample_args=\(x,\)"):
        model.add_weighted_adapter(["default", "both"], [1, 1], "new", combination_type="svd")
    assert model.adapter_names == ("default", "both")
    errors = model.add_weighted_adapter(
        ["default", "both"], [1, 1], "new", "svd", sample_args=(jnp.ones((2, 4)),)
    )
    assert sorted(errors) == ["w1", "w2"]
