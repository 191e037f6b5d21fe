"""LoRA variants: rsLoRA, rank and alpha patterns, DoRA, PiSSA/OLoRA, dropout, modules_to_save.

The invariants, each on random layouts (``tests/test_merging.py``'s strategies:
einsum specs, ``dot_general`` dimension numbers, ``LinearGeneral``, convolutions)
or random models (``tests/strategies.py``):

- every adapter's recorded rank and scale, and the trainable count, follow the
  config (first matching pattern wins; ``alpha / sqrt(rank)`` with rsLoRA), and
  the forward pass uses that scale;
- DoRA computes ``(m / ||W + s A B||_c) * (x (W + s A B))`` as written out by hand
  here, with the norm a constant for gradients; a fresh DoRA adapter changes
  nothing; merged equals unmerged, unmerge is exact, disabled is the base;
- a fresh PiSSA or OLoRA adapter leaves the outputs equal to the base model's
  (the residual absorbs it); merging, disabling and checkpoints account for the
  residual;
- adapter dropout follows train/eval, also with DoRA, and the same RNG gives the
  same masks;
- ``modules_to_save`` are trained, saved, loaded, merged and disabled.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder
from tests import strategies
from tests.test_merging import (
    ALL_LAYOUTS,
    F32_TOLERANCE,
    MIN_EFFECT,
    DotGeneralOp,
    Layout,
    TransposedWeight,
    arrays,
    assert_plain,
    assert_same_arrays,
    randomize_adapters,
    rel_error,
)

TINY = DecoderConfig(
    vocab_size=11, num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=16, max_len=16
)
TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], jnp.int32)


def _wrap(base: nnx.Module, x: Any, **config: Any) -> nnx_peft.PeftModel:
    fields = {"rank": 2, "alpha": 3.0, "target": ".*"} | config
    return nnx_peft.PeftModel(base, nnx_peft.LoraConfig(**fields), x, rngs=nnx.Rngs(3))


# --- Config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"use_rslora": 1}, ["LoraConfig.use_rslora", "1", "True or False"]),
        ({"use_dora": "yes"}, ["LoraConfig.use_dora", "'yes'", "use_dora=True"]),
        ({"init": "loftq"}, ["LoraConfig.init", "'loftq'", "'pissa'"]),
        ({"init": "pissa", "weight_qtype": "nf4"}, ["init='pissa'", "'nf4'", "weight_qtype=None"]),
        ({"rank_pattern": ".*"}, ["LoraConfig.rank_pattern", "str '.*'", "{r'.*mlp.*': 16}"]),
        ({"rank_pattern": {".*": 0}}, ["LoraConfig.rank_pattern['.*']", "got 0", "positive int"]),
        ({"rank_pattern": {".*": True}}, ["LoraConfig.rank_pattern['.*']", "True"]),
        ({"rank_pattern": [(".*", 2), (".*", 4)]}, ["rank_pattern lists", "'.*' twice"]),
        ({"rank_pattern": {"(": 2}}, ["LoraConfig.rank_pattern", "invalid regex", "'('"]),
        ({"alpha_pattern": {".*": -1}}, ["LoraConfig.alpha_pattern['.*']", "-1", "positive"]),
        ({"alpha_pattern": [(".*",)]}, ["LoraConfig.alpha_pattern must map", "(regex, value)"]),
        ({"modules_to_save": 3}, ["LoraConfig.modules_to_save", "int 3", "regex"]),
        ({"modules_to_save": "[a"}, ["LoraConfig.modules_to_save", "invalid regex"]),
        ({"target": ["all-linear", "x"]}, ["mixes 'all-linear'", "exclude=[...]"]),
    ],
)
def test_invalid_variant_fields_name_field_value_and_fix(
    kwargs: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(nnx_peft.ConfigError) as info:
        nnx_peft.LoraConfig(**({"rank": 4, "alpha": 8.0, "target": ".*"} | kwargs))
    for fragment in fragments:
        assert fragment in str(info.value)


PATTERNS = st.lists(
    st.tuples(st.sampled_from([".*", ".*q_proj", "lm_head", ".*mlp/.*"]), st.integers(1, 64)),
    unique_by=lambda pair: pair[0],
    max_size=3,
)


@given(
    ranks=PATTERNS,
    alphas=PATTERNS,
    rslora=st.booleans(),
    dora=st.booleans(),
    init=st.sampled_from(nnx_peft.INIT_METHODS),
    saved=st.lists(st.sampled_from(["head", ".*norm"]), unique=True),
    as_dict=st.booleans(),
)
def test_config_round_trip_keeps_order_and_hash(
    ranks: list[tuple[str, int]],
    alphas: list[tuple[str, int]],
    rslora: bool,
    dora: bool,
    init: str,
    saved: list[str],
    as_dict: bool,
) -> None:
    config = nnx_peft.LoraConfig(
        rank=8,
        alpha=16.0,
        target="all-linear",
        use_rslora=rslora,
        use_dora=dora,
        init=init,
        rank_pattern=dict(ranks) if as_dict else ranks,
        alpha_pattern=alphas,
        modules_to_save=saved,
    )
    assert config.rank_pattern == tuple(ranks)  # order kept: the first match wins
    assert config.alpha_pattern == tuple((p, float(a)) for p, a in alphas)
    assert nnx_peft.LoraConfig.from_dict(config.to_dict()) == config
    assert hash(nnx_peft.LoraConfig.from_dict(config.to_dict())) == hash(config)
    assert config.scale == pytest.approx(16.0 / (math.sqrt(8) if rslora else 8))


# --- rsLoRA, rank and alpha patterns --------------------------------------------------------


def _first(pairs: list[tuple[str, Any]], path: str, default: Any) -> Any:
    return next((v for p, v in pairs if re.fullmatch(p, path)), default)


@given(
    case=strategies.cases(),
    ranks=st.lists(
        st.tuples(st.sampled_from([r".*0/inner", r".*1/inner", r"block\d+/.*"]), st.integers(1, 3)),
        unique_by=lambda p: p[0],
        max_size=2,
    ),
    alphas=st.lists(
        st.tuples(st.sampled_from([r".*inner", r"[a-z]+0/.*"]), st.sampled_from([1.0, 4.0, 9.0])),
        unique_by=lambda p: p[0],
        max_size=2,
    ),
    rslora=st.booleans(),
    dora=st.booleans(),
)
def test_ranks_alphas_and_scales_follow_the_patterns(
    case: strategies.Case,
    ranks: list[tuple[str, int]],
    alphas: list[tuple[str, float]],
    rslora: bool,
    dora: bool,
) -> None:
    paths = [path for path, _ in case.targeted]
    # Keep only keys that some adapted module uses (the others are refused, tested below).
    ranks = [(p, r) for i, (p, r) in enumerate(ranks) if any(_used(ranks, i, q) for q in paths)]
    alphas = [(p, a) for i, (p, a) in enumerate(alphas) if any(_used(alphas, i, q) for q in paths)]
    patterns = {"rank_pattern": ranks, "alpha_pattern": alphas}
    flags = {"use_rslora": rslora, "use_dora": dora}
    config = nnx_peft.LoraConfig(**(case.config.to_dict() | patterns | flags))
    model = nnx_peft.PeftModel(case.build(), config, case.sample(), rngs=nnx.Rngs(7))
    infos = {info.module_path: info for info in model.adapters()}
    assert set(infos) == set(paths)
    expected_count = 0
    for path, kind in case.targeted:
        rank = _first(ranks, path, config.rank)
        alpha = _first(alphas, path, config.alpha)
        info = infos[path]
        assert info.rank == rank
        assert info.scale == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank))
        assert info.variant == ("dora" if dora else "lora")
        magnitude = case.d if dora else 0  # every kind's weight keeps d output features
        expected_count += strategies.adapter_size(kind, case.d, rank) + magnitude
    summary = model.trainable_parameters()
    assert summary.trainable == expected_count == sum(i.size for i in infos.values())
    table = summary.format()
    for info in infos.values():
        assert f"{info.scale:.4g}" in table


def _used(pairs: list[tuple[str, Any]], index: int, path: str) -> bool:
    pattern = pairs[index][0]
    return bool(re.fullmatch(pattern, path)) and not any(
        re.fullmatch(p, path) for p, _ in pairs[:index]
    )


@pytest.mark.parametrize("rslora", [False, True])
def test_the_forward_pass_uses_the_pattern_scale(rslora: bool) -> None:
    class Two(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.up = nnx.Linear(4, 6, rngs=rngs)
            self.down = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.down(self.up(x))

    x = jax.random.normal(jax.random.key(0), (2, 4))
    model = _wrap(
        Two(nnx.Rngs(0)),
        x,
        rank=2,
        alpha=3.0,
        use_rslora=rslora,
        rank_pattern={"down": 3},
        alpha_pattern={"up": 5.0},
    )
    randomize_adapters(model)
    up, down = model.model.up, model.model.down
    s_up, s_down = 5.0 / (math.sqrt(2) if rslora else 2), 3.0 / (math.sqrt(3) if rslora else 3)
    h = x @ up.kernel[...] + up.bias[...] + s_up * x @ up.kernel_lora_a[...] @ up.kernel_lora_b[...]
    y = h @ down.kernel[...] + down.bias[...]
    y += s_down * h @ down.kernel_lora_a[...] @ down.kernel_lora_b[...]
    np.testing.assert_allclose(model(x), y, rtol=1e-5, atol=1e-5)
    assert model.model.down.kernel_lora_a.get_value().shape == (6, 3)
    assert rel_error(model.merge_and_unload()(x), model(x)) <= F32_TOLERANCE


def test_a_pattern_that_applies_to_no_adapter_is_refused() -> None:
    base, x = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), jnp.ones((1, 4))
    for field, value in (("rank_pattern", {"other": 4}), ("alpha_pattern", {".*": 1, "x": 2})):
        with pytest.raises(nnx_peft.TargetNotFoundError) as info:
            _wrap(base, x, **{field: value})
        assert f"LoraConfig.{field} key" in str(info.value)
        assert "first match wins" in str(info.value) and "Adapted modules: ['']" in str(info.value)


# --- DoRA ---------------------------------------------------------------------------------


def _dora_reference(kind: str) -> tuple[nnx.Module, jax.Array, Any]:
    """A layer, an input, and DoRA's output for it written out by hand.

    The reference takes the layer's weight ``W``, ``A``, ``B`` and ``m`` and computes
    ``V = W + s A B`` in ``W``'s layout, ``n = ||V||`` over the contracting axes and
    ``(m / n) * (x V)``, with ``n`` a constant for gradients.
    """
    key = jax.random.key(0)
    if kind == "linear":
        base, x = nnx.Linear(5, 4, rngs=nnx.Rngs(0)), jax.random.normal(key, (3, 5))

        def forward(w, a, b, m, s):
            v = w + s * a @ b
            n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v**2, axis=0)))
            return (x @ v) * (m / n) + base.bias[...]

    elif kind == "einsum":
        base = nnx.Einsum("btd,dnh->btnh", (6, 2, 3), rngs=nnx.Rngs(0))  # no bias
        x = jax.random.normal(key, (2, 3, 6))

        def forward(w, a, b, m, s):
            v = w + s * jnp.einsum("dr,rnh->dnh", a, b)
            n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v**2, axis=0)))
            return jnp.einsum("btd,dnh->btnh", x, v) * (m / n)

    elif kind == "conv":
        base, x = nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)), jax.random.normal(key, (2, 7, 3))

        def forward(w, a, b, m, s):
            v = w + s * a @ b
            n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v**2, axis=(0, 1))))
            y = jax.lax.conv_general_dilated(
                x, v, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
            )
            return y * (m / n) + base.bias[...]

    else:  # a dot_general with a batch axis: each batch index has its own norms
        dims = (((2,), (1,)), ((0,), (0,)))
        base = DotGeneralOp(dims, (2, 4, 5), 4, jnp.float32, rngs=nnx.Rngs(0))
        x = jax.random.normal(key, (2, 3, 4))

        def forward(w, a, b, m, s):
            v = w + s * jnp.einsum("gcr,gro->gco", a, b)
            n = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v**2, axis=1)))
            return jnp.einsum("gtc,gco->gto", x, v) * (m / n)[:, None, :]

    return base, x, forward


@pytest.mark.parametrize("kind", ["linear", "einsum", "conv", "dot_general_batch"])
def test_dora_equals_the_formula_written_by_hand(kind: str) -> None:
    base, x, forward = _dora_reference(kind)
    model = _wrap(base, x, use_dora=True)
    inner = model.model
    weight = "w" if kind.startswith("dot_general") else "kernel"
    np.testing.assert_array_equal(model(x), base(x))  # fresh: m = ||W||_c, B = 0
    randomize_adapters(model)
    a, b, m = (
        getattr(inner, weight + s).get_value() for s in ("_lora_a", "_lora_b", "_lora_magnitude")
    )
    w, s = getattr(base, weight).get_value(), 1.5
    assert rel_error(model(x), forward(w, a, b, m, s)) <= F32_TOLERANCE
    assert rel_error(model(x), base(x)) > MIN_EFFECT

    # Gradients: the norm is a constant (DoRA paper, section 4.3).
    def loss(a, b, m):
        clone = nnx.clone(model)
        for suffix, value in (("_lora_a", a), ("_lora_b", b), ("_lora_magnitude", m)):
            getattr(clone.model, weight + suffix).set_value(value)
        return jnp.sum(jnp.sin(clone(x)))

    ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(a, b, m)
    reference = jax.grad(lambda *f: jnp.sum(jnp.sin(forward(w, *f, s))), argnums=(0, 1, 2))(a, b, m)
    for g, ref in zip(ours, reference, strict=True):
        assert rel_error(g, ref) <= 1e-5


@given(layout=ALL_LAYOUTS, rank=st.integers(1, 2), rslora=st.booleans())
def test_dora_merges_exactly_and_disables_to_the_base(
    layout: Layout, rank: int, rslora: bool
) -> None:
    base, x = layout.build(), layout.sample()
    model = _wrap(base, x, rank=rank, use_dora=True, use_rslora=rslora)
    base_out = base(x)
    assert rel_error(model(x), base_out) <= F32_TOLERANCE  # a fresh adapter changes nothing
    randomize_adapters(model)
    adapted = model(x)
    assert rel_error(adapted, base_out) > MIN_EFFECT
    weights = arrays(model)
    plain = model.merge_and_unload()
    assert_plain(plain, base)
    assert rel_error(plain(x), adapted) <= F32_TOLERANCE
    model.merge_adapter()
    assert rel_error(model(x), adapted) <= F32_TOLERANCE
    model.unmerge_adapter()
    assert_same_arrays(arrays(model), weights)
    np.testing.assert_array_equal(model(x), adapted)
    with model.disable_adapter():
        np.testing.assert_array_equal(model(x), base_out)


@pytest.mark.parametrize("qtype", ["int8", "nf4"])
def test_dora_over_a_quantized_base(qtype: str) -> None:
    x = jax.random.normal(jax.random.key(1), (3, 8))
    model = _wrap(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), x, use_dora=True, weight_qtype=qtype)
    with model.disable_adapter():
        quantized_base = model(x)
    np.testing.assert_allclose(model(x), quantized_base, rtol=1e-6, atol=1e-6)
    randomize_adapters(model)
    assert rel_error(model.merge_and_unload()(x), model(x)) <= F32_TOLERANCE


def test_grouped_convolutions_refuse_dora_and_weight_inits() -> None:
    options = {"in": 4, "out": 4, "kernel_size": (3,), "strides": 1, "dilation": 1}
    options |= {"padding": "SAME", "groups": 2}
    layout = Layout(kind="conv", input_shape=(2, 5, 4), options=tuple(options.items()))
    for fields, named in (
        ({"use_dora": True}, "use_dora=True"),
        ({"init": "pissa"}, "init='pissa'"),
    ):
        with pytest.raises(nnx_peft.UnsupportedLayerError) as info:
            _wrap(layout.build(), layout.sample(), **fields)
        assert named in str(info.value) and "grouped convolution" in str(info.value)
        assert "LoraConfig.exclude" in str(info.value)


# --- PiSSA and OLoRA ------------------------------------------------------------------------


@given(layout=ALL_LAYOUTS, init=st.sampled_from(["pissa", "olora"]), dora=st.booleans())
def test_weight_inits_leave_the_outputs_of_the_base(layout: Layout, init: str, dora: bool) -> None:
    base, x = layout.build(), layout.sample()
    before = arrays(base)
    model = _wrap(base, x, rank=1, init=init, use_dora=dora)
    base_out = base(x)
    assert rel_error(model(x), base_out) <= F32_TOLERANCE  # the residual absorbs W's top part
    assert_same_arrays(arrays(base), before)  # the user's base model keeps its weights
    with model.disable_adapter():  # the initial adapter is added back to the residual
        assert rel_error(model(x), base_out) <= F32_TOLERANCE
    randomize_adapters(model)
    adapted, weights = model(x), arrays(model)
    assert rel_error(model.merge_and_unload()(x), adapted) <= F32_TOLERANCE
    model.merge_adapter()
    assert rel_error(model(x), adapted) <= F32_TOLERANCE
    model.unmerge_adapter()
    assert_same_arrays(arrays(model), weights)  # back to the residual, bit for bit


def test_pissa_factors_are_the_principal_components_and_olora_b_is_orthonormal() -> None:
    x = jnp.ones((1, 6))
    base = nnx.Linear(6, 5, use_bias=False, rngs=nnx.Rngs(0))
    w = np.asarray(base.kernel.get_value(), np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    pissa = _wrap(base, x, rank=2, alpha=4.0, init="pissa").model
    a, b = np.asarray(pissa.kernel_lora_a.get_value()), np.asarray(pissa.kernel_lora_b.get_value())
    np.testing.assert_allclose(2.0 * a @ b, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
    np.testing.assert_allclose(pissa.kernel.get_value(), (u[:, 2:] * s[2:]) @ vt[2:], atol=1e-5)
    olora = _wrap(base, x, rank=2, alpha=4.0, init="olora").model
    b = np.asarray(olora.kernel_lora_b.get_value())
    np.testing.assert_allclose(b @ b.T, np.eye(2), atol=1e-5)


def test_gaussian_init_draws_a_with_std_one_over_rank() -> None:
    base = nnx.Linear(512, 4, rngs=nnx.Rngs(0))
    model = _wrap(base, jnp.ones((1, 512)), rank=4, init="gaussian").model
    assert float(jnp.std(model.kernel_lora_a.get_value())) == pytest.approx(0.25, rel=0.05)
    assert not model.kernel_lora_b.get_value().any()


@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_flat_draws_equal_the_jax_initializers_bit_for_bit(
    shape: tuple[int, ...], dtype: Any, seed: int
) -> None:
    """The random starts are drawn flat (one compile per size, not per shape) and equal
    what ``jax.nn.initializers`` draws for the shape."""
    from nnx_peft import _initializers

    key = jax.random.key(seed)
    pairs = [
        (_initializers.he_uniform, jax.nn.initializers.he_uniform()),
        (
            functools.partial(_initializers.normal, stddev=0.3),
            jax.nn.initializers.normal(stddev=0.3),
        ),
        (_initializers.zeros, jax.nn.initializers.zeros),
    ]
    for ours, theirs in pairs:
        got, want = ours(key, shape, dtype), theirs(key, shape, dtype)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_weight_inits_refuse_what_they_cannot_factor() -> None:
    with pytest.raises(nnx_peft.UnsupportedLayerError) as info:
        _wrap(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 3)), rank=3, init="olora")
    assert "needs rank <= 2" in str(info.value) and "rank_pattern" in str(info.value)

    flipped = TransposedWeight(3, flip=True, rngs=nnx.Rngs(0))  # (a transpose is followed)
    with pytest.raises(nnx_peft.UnsupportedLayerError, match="transformed"):
        _wrap(flipped, jnp.ones((1, 3)), rank=1, init="pissa")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_init_checkpoints_reload_onto_a_fresh_base(init: str, tmp_path: Path) -> None:
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(q_proj|down_proj)", init=init)
    model = nnx_peft.PeftModel(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), config, TOKENS, rngs=nnx.Rngs(1)
    )
    randomize_adapters(model, size=0.3)
    model.save_adapter(tmp_path / "adapter")
    loaded = nnx_peft.PeftModel.from_pretrained(
        TinyDecoder(TINY, rngs=nnx.Rngs(0)), tmp_path / "adapter", TOKENS, rngs=nnx.Rngs(5)
    )
    model.eval()
    # The residual is recomputed from the same base weights: the same bits.
    assert np.asarray(loaded(TOKENS)).tobytes() == np.asarray(model(TOKENS)).tobytes()
    assert_same_arrays(arrays(loaded.model, nnx.Param), arrays(model.model, nnx.Param))


# --- Dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_follows_train_and_eval_and_the_rngs(dora: bool) -> None:
    def build(dropout: float, seed: int = 1) -> nnx_peft.PeftModel:
        config = nnx_peft.LoraConfig(
            rank=2, alpha=4.0, target=r".*(q_proj|up_proj)", dropout=dropout, use_dora=dora
        )
        model = nnx_peft.PeftModel(
            TinyDecoder(TINY, rngs=nnx.Rngs(0)), config, TOKENS, rngs=nnx.Rngs(seed)
        )
        randomize_adapters(model, size=0.3)
        return model

    model, plain, same, other = build(0.5), build(0.0), build(0.5), build(0.5, seed=2)
    model.eval()
    plain.eval()
    first = model(TOKENS)
    np.testing.assert_array_equal(model(TOKENS), first)  # deterministic in evaluation
    np.testing.assert_array_equal(plain(TOKENS), first)  # and equal to no dropout
    model.train()
    same.train()
    other.train()
    a, b = model(TOKENS), model(TOKENS)
    assert not np.array_equal(a, b)  # a new mask every step
    assert not np.array_equal(a, first)
    np.testing.assert_array_equal(same(TOKENS), a)  # the same rngs: the same masks
    np.testing.assert_array_equal(same(TOKENS), b)
    assert not np.array_equal(other(TOKENS), a)
