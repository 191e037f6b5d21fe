"""Merging adapters into base weights: merge_and_unload, merge/unmerge in place, disable.

The invariants, each checked on layouts Hypothesis generates (einsum specs
with kernel axes in any order, shared batch axes and several contracting
axes; ``dot_general`` dimension numbers in any order; ``nnx.LinearGeneral``
with several input, output and batch axes; 1-D and 2-D convolutions), with
adapters set to random non-zero values first:

- ``merge_and_unload()(x)`` equals the adapted model's output (float32:
  relative error at most 1e-5; bfloat16: within 8 roundings, see
  ``BF16_ROUNDINGS``), and is a plain model with the base model's class and
  graph definition;
- ``merge_adapter`` gives the same outputs; ``unmerge_adapter`` restores the
  base weights and the outputs bit for bit;
- inside ``disable_adapter()`` the outputs are the base model's, bit for bit,
  and afterwards the adapted ones, also when the block raises;
- with a QLoRA base (nf4, int4, int8) the merged float model equals the
  adapted quantized model up to float rounding (1e-5), far inside the
  quantization's own error.

The relative error of ``y`` against ``ref`` is ``max|y - ref| / max|ref|``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft.toy import DecoderConfig, TinyDecoder

F32_TOLERANCE = 1e-5
#: bfloat16 keeps 8 significant bits, so one rounding moves a value by at most
#: u = 2**-8 of its magnitude. Rounding errors are bounded by the magnitudes
#: that are summed, not by the result (which may cancel), so the bound is
#: stated elementwise against ``S``: ``|x|`` through the layer with weight
#: ``|W| + scale * |A| @ |B|`` (see ``magnitudes``). The merged model rounds
#: its merged weight (u S) and its output (u S); the adapted one rounds its
#: base output, ``x @ A``, the update, its scaling and the sum (5 u S). Seven
#: roundings: the test allows ``8 u S``. Over 150 random layouts the largest
#: error measured was 2.2 u S.
BF16_ROUNDINGS = 8
BF16_UNIT_ROUNDOFF = 2.0**-8
#: The update must move the output by at least this much (relative), so that
#: a merge that dropped or misplaced the update could not pass.
MIN_EFFECT = 1e-2


# Layer kinds beyond the NNX built-ins: user modules calling jnp.einsum,
# jax.lax.dot_general or a matmul on a transformed weight.


def _weight(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype: Any) -> nnx.Param[Any]:
    return nnx.Param((jax.random.normal(rngs.params(), shape) / math.sqrt(fan_in)).astype(dtype))


class EinsumOp(nnx.Module):
    """Calls ``jnp.einsum(spec, x, w)`` on its own parameter."""

    def __init__(
        self, spec: str, shape: tuple[int, ...], fan_in: int, dtype: Any, *, rngs: nnx.Rngs
    ):
        self.spec = spec
        self.w = _weight(rngs, shape, fan_in, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.spec, x, self.w[...])


class DotGeneralOp(nnx.Module):
    """Calls ``jax.lax.dot_general(x, w, dims)`` on its own parameter."""

    def __init__(
        self, dims: Any, shape: tuple[int, ...], fan_in: int, dtype: Any, *, rngs: nnx.Rngs
    ):
        self.dims = dims
        self.w = _weight(rngs, shape, fan_in, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.dot_general(x, self.w[...], self.dims)


class TransposedWeight(nnx.Module):
    """Multiplies by the transpose of its own square weight (``flip``: its rows reversed)."""

    def __init__(self, d: int, *, flip: bool = False, rngs: nnx.Rngs):
        self.flip = flip
        self.w = _weight(rngs, (d, d), d, jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = jnp.flip(self.w[...], 0) if self.flip else self.w[...].T
        return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())))


@dataclasses.dataclass(frozen=True)
class Layout:
    """One generated layer: how to build it and the shape of its input."""

    kind: str
    input_shape: tuple[int, ...]
    spec: str = ""
    kernel_shape: tuple[int, ...] = ()
    dims: Any = None
    fan_in: int = 1
    options: tuple[tuple[str, Any], ...] = ()

    def build(self, dtype: Any = jnp.float32, seed: int = 0) -> nnx.Module:
        """The layer with random normal weights (set with NumPy: nothing to compile)."""
        module = nnx.eval_shape(lambda: self._construct(dtype))
        rng = np.random.default_rng(seed)
        for _, var in nnx.to_flat_state(nnx.state(module)):
            abstract = var.get_value()
            var.set_value(jnp.asarray(0.5 * rng.standard_normal(abstract.shape), abstract.dtype))
        return module

    def _construct(self, dtype: Any) -> nnx.Module:
        rngs = nnx.Rngs(0)
        options = dict(self.options)
        floats = {"dtype": dtype, "param_dtype": dtype}
        if self.kind == "einsum":
            return nnx.Einsum(self.spec, self.kernel_shape, **floats, rngs=rngs)
        if self.kind == "custom_einsum":
            return EinsumOp(self.spec, self.kernel_shape, self.fan_in, dtype, rngs=rngs)
        if self.kind == "dot_general":
            return DotGeneralOp(self.dims, self.kernel_shape, self.fan_in, dtype, rngs=rngs)
        if self.kind == "linear":
            return nnx.Linear(options["in"], options["out"], **floats, rngs=rngs)
        if self.kind == "general":
            return nnx.LinearGeneral(
                options["in"],
                options["out"],
                axis=options["axis"],
                batch_axis=options["batch_axis"],
                **floats,
                rngs=rngs,
            )
        if self.kind == "conv":
            return nnx.Conv(
                options["in"],
                options["out"],
                options["kernel_size"],
                strides=options["strides"],
                padding=options["padding"],
                kernel_dilation=options["dilation"],
                feature_group_count=options["groups"],
                **floats,
                rngs=rngs,
            )
        raise AssertionError(self.kind)

    def sample(self, dtype: Any = jnp.float32, seed: int = 1) -> jax.Array:
        return jnp.asarray(np.random.default_rng(seed).standard_normal(self.input_shape), dtype)


LETTERS = "abcdefghijklmnopqrstuvwxyz"  # includes 'r', the letter Qwix prefers for the rank


SIZES = st.integers(1, 3)


@st.composite
def einsum_layouts(draw: st.DrawFn, sizes: st.SearchStrategy[int] = SIZES) -> Layout:
    """Two-operand specs: 1-2 contracting axes, 0-1 batch axes shared with the input,
    1-2 free axes on each side, every operand's axes in random order; or the input's
    free axes as a leading ellipsis."""
    counts = [
        draw(st.integers(1, 2)),
        draw(st.integers(0, 1)),
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
    ]
    letters = draw(st.permutations(LETTERS))[: sum(counts)]
    contracting, rest = letters[: counts[0]], letters[counts[0] :]
    batch, rest = rest[: counts[1]], rest[counts[1] :]
    free_x, free_w = rest[: counts[2]], rest[counts[2] :]
    size = {c: draw(sizes) for c in letters}
    w = draw(st.permutations(contracting + batch + free_w))
    if draw(st.booleans()):
        x = draw(st.permutations(free_x + contracting + batch))
        out = draw(st.permutations(free_x + batch + free_w))
        spec = f"{''.join(x)},{''.join(w)}->{''.join(out)}"
    else:
        x = free_x + draw(st.permutations(contracting + batch))
        out = free_x + draw(st.permutations(batch + free_w))
        dots = len(free_x)
        spec = f"...{''.join(x[dots:])},{''.join(w)}->...{''.join(out[dots:])}"
    return Layout(
        kind=draw(st.sampled_from(["einsum", "custom_einsum"])),
        input_shape=tuple(size[c] for c in x),
        spec=spec,
        kernel_shape=tuple(size[c] for c in w),
        fan_in=math.prod(size[c] for c in contracting),
    )


@st.composite
def dot_general_layouts(draw: st.DrawFn, sizes: st.SearchStrategy[int] = SIZES) -> Layout:
    """``jax.lax.dot_general`` with 1-2 contracting and 0-1 batch axes, paired in random order,
    at random positions of both operands, the weight having 0-2 free axes."""
    n_con, n_bat = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    n_x, n_w = n_con + n_bat + draw(st.integers(0, 2)), n_con + n_bat + draw(st.integers(0, 2))
    x_axes, w_axes = draw(st.permutations(range(n_x))), draw(st.permutations(range(n_w)))
    paired = [draw(sizes) for _ in range(n_con + n_bat)]
    x_shape = [draw(sizes) for _ in range(n_x)]
    w_shape = [draw(sizes) for _ in range(n_w)]
    for i, n in enumerate(paired):
        x_shape[x_axes[i]], w_shape[w_axes[i]] = n, n
    dims = (
        (tuple(x_axes[:n_con]), tuple(w_axes[:n_con])),
        (tuple(x_axes[n_con : n_con + n_bat]), tuple(w_axes[n_con : n_con + n_bat])),
    )
    return Layout(
        kind="dot_general",
        input_shape=tuple(x_shape),
        dims=dims,
        kernel_shape=tuple(w_shape),
        fan_in=math.prod(paired[:n_con]),
    )


@st.composite
def linear_layouts(draw: st.DrawFn, sizes: st.SearchStrategy[int] = SIZES) -> Layout:
    """``nnx.Linear``, or ``nnx.LinearGeneral`` with 1-2 input, 1-2 output and 0-1 batch axes."""
    if draw(st.booleans()):
        n_in, n_out = draw(sizes), draw(sizes)
        return Layout(kind="linear", input_shape=(2, n_in), options=(("in", n_in), ("out", n_out)))
    n_in = tuple(draw(st.lists(sizes, min_size=1, max_size=2)))
    n_out = tuple(draw(st.lists(sizes, min_size=1, max_size=2)))
    batch = draw(st.lists(sizes, max_size=1))
    axis = tuple(range(-len(n_in), 0))
    return Layout(
        kind="general",
        input_shape=(*batch, 2, *n_in),
        options=(
            ("in", n_in),
            ("out", n_out),
            ("axis", axis),
            ("batch_axis", {0: batch[0]} if batch else {}),
        ),
    )


@st.composite
def conv_layouts(draw: st.DrawFn, groups: int = 1) -> Layout:
    """1-D or 2-D ``nnx.Conv``: random window, strides, dilation and padding."""
    ndim = draw(st.integers(1, 2))
    kernel_size = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    spatial = tuple(draw(st.integers(5, 6)) for _ in range(ndim))
    channels = st.integers(1, 2).map(lambda n: n * groups)
    n_in, n_out = draw(channels), draw(channels)
    return Layout(
        kind="conv",
        input_shape=(2, *spatial, n_in),
        options=(
            ("in", n_in),
            ("out", n_out),
            ("kernel_size", kernel_size),
            ("strides", draw(st.integers(1, 2))),
            ("dilation", draw(st.integers(1, 2))),
            ("padding", draw(st.sampled_from(["SAME", "VALID"]))),
            ("groups", groups),
        ),
    )


MATMUL_LAYOUTS = st.one_of(einsum_layouts(), dot_general_layouts(), linear_layouts())
ALL_LAYOUTS = st.one_of(MATMUL_LAYOUTS, conv_layouts())
#: Quantizing compiles a few dozen small programs per weight shape; drawing
#: every axis size from {2, 3} lets examples share them. Equal sizes still
#: catch a misplaced axis: the delta is not symmetric, so its values move.
QLORA_SIZES = st.sampled_from([2, 3])
QLORA_LAYOUTS = st.one_of(
    einsum_layouts(QLORA_SIZES), dot_general_layouts(QLORA_SIZES), linear_layouts(QLORA_SIZES)
)


# Helpers.


def rel_error(y: jax.Array, ref: jax.Array) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def randomize_adapters(model: nnx_peft.PeftModel, seed: int = 7, size: float = 1.0) -> None:
    """Sets every adapter factor to random values of magnitude 0.5 to 1.5 times ``size``.

    (B starts at zero, which would make every merge trivially right.)
    """
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam)):
        value = var.get_value()
        random = size * rng.choice([-1.0, 1.0], value.shape) * rng.uniform(0.5, 1.5, value.shape)
        var.set_value(jnp.asarray(random, value.dtype))


def wrap(base: nnx.Module, x: jax.Array, rank: int = 2, **config: Any) -> nnx_peft.PeftModel:
    cfg = nnx_peft.LoraConfig(rank=rank, alpha=config.pop("alpha", 3.0), target=".*", **config)
    model = nnx_peft.PeftModel(base, cfg, x, rngs=nnx.Rngs(3))
    randomize_adapters(model)
    return model


def arrays(model: nnx.Module, filter: Any = ...) -> dict[Any, np.ndarray]:
    return {
        path: np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(nnx.state(model, filter))
    }


def assert_same_arrays(a: dict[Any, np.ndarray], b: dict[Any, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def assert_plain(plain: nnx.Module, base: nnx.Module) -> None:
    """``plain`` is a model of the base model's class and structure, without adapters."""
    assert type(plain) is type(base)
    assert nnx.graphdef(plain) == nnx.graphdef(base)
    assert not nnx.state(plain, nnx.LoRAParam)


# float32: merge_and_unload, merge_adapter, unmerge_adapter.


@given(layout=ALL_LAYOUTS, rank=st.integers(1, 2), alpha=st.sampled_from([1.0, 3.0]))
def test_float32_merges_reproduce_the_adapted_model(
    layout: Layout, rank: int, alpha: float
) -> None:
    base, x = layout.build(), layout.sample()
    model = wrap(base, x, rank=rank, alpha=alpha)
    adapted, base_out = model(x), base(x)
    assert rel_error(adapted, base_out) > MIN_EFFECT
    weights = arrays(model)

    plain = model.merge_and_unload()
    assert_plain(plain, base)
    assert rel_error(plain(x), adapted) <= F32_TOLERANCE

    model.merge_adapter()
    assert model.merged
    assert rel_error(model(x), adapted) <= F32_TOLERANCE
    # merge_and_unload folds into the original weights, whatever the state.
    assert_same_arrays(arrays(model.merge_and_unload()), arrays(plain))

    model.unmerge_adapter()
    assert not model.merged
    assert_same_arrays(arrays(model), weights)
    np.testing.assert_array_equal(model(x), adapted)


# bfloat16.


def magnitudes(model: nnx_peft.PeftModel, x: jax.Array) -> np.ndarray:
    """What each output of ``model`` sums, in absolute value: the scale of its rounding errors.

    ``|x|`` through the merged model with every weight, bias and adapter
    factor replaced by its absolute value, i.e. ``|x| @ (|W| + scale |A| @ |B|) + |b|``.
    """
    absolute = nnx.clone(model)
    for _, var in nnx.to_flat_state(nnx.state(absolute, nnx.Param)):
        var.set_value(jnp.abs(var.get_value()))
    return np.asarray(absolute.merge_and_unload()(jnp.abs(x)), np.float64)


@given(layout=ALL_LAYOUTS, rank=st.integers(1, 2))
def test_bfloat16_merge_and_unload_within_rounding(layout: Layout, rank: int) -> None:
    base, x = layout.build(jnp.bfloat16), layout.sample(jnp.bfloat16)
    model = wrap(base, x, rank=rank)
    adapted = model(x)
    assert rel_error(adapted, base(x)) > MIN_EFFECT
    plain = model.merge_and_unload()
    assert_plain(plain, base)
    merged = plain(x)
    assert merged.dtype == jnp.bfloat16
    error = np.abs(np.asarray(merged, np.float64) - np.asarray(adapted, np.float64))
    assert np.all(error <= BF16_ROUNDINGS * BF16_UNIT_ROUNDOFF * magnitudes(model, x))


# disable_adapter.


@given(layout=ALL_LAYOUTS, merge_first=st.booleans())
def test_disable_adapter_gives_the_base_model_bit_for_bit(
    layout: Layout, merge_first: bool
) -> None:
    base, x = layout.build(), layout.sample()
    model = wrap(base, x)
    base_out = base(x)
    if merge_first:
        model.merge_adapter()
    before = model(x)
    weights = arrays(model)
    assert rel_error(before, base_out) > MIN_EFFECT
    with model.disable_adapter():
        assert not model.merged
        np.testing.assert_array_equal(model(x), base_out)
    assert model.merged == merge_first
    assert_same_arrays(arrays(model), weights)
    np.testing.assert_array_equal(model(x), before)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("merge_first", [False, True])
def test_disable_adapter_restores_when_the_block_raises(merge_first: bool) -> None:
    base, x = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), jnp.ones((2, 4))
    model = wrap(base, x)
    if merge_first:
        model.merge_adapter()
    before, weights = model(x), arrays(model)
    with pytest.raises(_Boom), model.disable_adapter():
        np.testing.assert_array_equal(model(x), base(x))
        raise _Boom
    assert model.merged == merge_first
    assert_same_arrays(arrays(model), weights)
    np.testing.assert_array_equal(model(x), before)


def test_disable_adapter_nests() -> None:
    base, x = nnx.Linear(4, 3, rngs=nnx.Rngs(0)), jnp.ones((2, 4))
    model = wrap(base, x)
    before = model(x)
    with model.disable_adapter():
        with model.disable_adapter():
            np.testing.assert_array_equal(model(x), base(x))
        np.testing.assert_array_equal(model(x), base(x))
    np.testing.assert_array_equal(model(x), before)


# QLoRA.

#: Largest gap between neighbouring quantization levels, relative to the
#: absolute maximum of a channel: int8 and int4 use absmax scaling to 127 and
#: 7 levels; nf4's widest gap is between its two largest levels (0.7230, 1).
QUANTIZATION_STEP = {"int8": 1 / 127, "int4": 1 / 7, "nf4": 1 - 0.7229568362236023}


def _contracted_terms(layout: Layout) -> int:
    """How many products each output element of the layout sums."""
    if layout.kind in ("einsum", "custom_einsum"):
        x, w = layout.spec.split("->")[0].split(",")
        out = layout.spec.split("->")[1]
        return math.prod(
            n for c, n in zip(w, layout.kernel_shape, strict=True) if c in x and c not in out
        )
    if layout.kind == "dot_general":
        return math.prod(layout.kernel_shape[i] for i in layout.dims[0][1])
    return math.prod(layout.input_shape[-len(np.atleast_1d(dict(layout.options)["in"])) :])


@given(layout=QLORA_LAYOUTS, qtype=st.sampled_from(["nf4", "int4", "int8"]))
def test_qlora_merge_and_unload_matches_the_quantized_model(layout: Layout, qtype: str) -> None:
    base, x = layout.build(), layout.sample()
    model = wrap(base, x, weight_qtype=qtype)
    adapted = model(x)
    plain = model.merge_and_unload()
    assert_plain(plain, base)
    assert rel_error(plain(x), adapted) <= F32_TOLERANCE
    as_bf16 = arrays(model.merge_and_unload(dtype=jnp.bfloat16), nnx.Param).values()
    assert sum(v.dtype == jnp.bfloat16 for v in as_bf16) == len(model.adapters())

    # In place, the merged weight is requantized: each element moves by at most
    # one quantization step of its channel, so each output by at most
    # step * max|W'| * max|x| * (number of products it sums).
    weights = arrays(model)
    model.merge_adapter()
    merged_weight = max(np.max(np.abs(v)) for v in arrays(plain, nnx.Param).values())
    bound = (
        QUANTIZATION_STEP[qtype]
        * merged_weight
        * float(jnp.max(jnp.abs(x)))
        * _contracted_terms(layout)
    )
    assert float(jnp.max(jnp.abs(model(x) - adapted))) <= bound * (1 + 1e-5)
    assert_same_arrays(arrays(model.merge_and_unload()), arrays(plain))
    model.unmerge_adapter()
    assert_same_arrays(arrays(model), weights)
    np.testing.assert_array_equal(model(x), adapted)


def test_qlora_disable_adapter_gives_the_quantized_base() -> None:
    x = jnp.ones((2, 8))
    model = wrap(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), x, weight_qtype="nf4")
    adapted = model(x)
    with model.disable_adapter():
        disabled = model(x)
    # With B = 0 the adapted model adds exactly zero to the quantized base's output.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx_peft.AdapterParam)):
        if str(path[-1]).endswith("_lora_b"):
            var.set_value(jnp.zeros_like(var.get_value()))
    np.testing.assert_array_equal(disabled, model(x))
    assert rel_error(disabled, adapted) > MIN_EFFECT


# Layouts that cannot be merged exactly.


@given(layout=conv_layouts(groups=2))
def test_grouped_convolutions_are_refused(layout: Layout) -> None:
    base, x = layout.build(), layout.sample()
    model = wrap(base, x, rank=2)
    adapted = model(x)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(nnx_peft.UnmergeableAdapterError, match="grouped convolution") as info:
            merge()
        assert "feature_group_count=2" in str(info.value)
        assert "LoraConfig.exclude" in str(info.value)
    assert not model.merged
    np.testing.assert_array_equal(model(x), adapted)
    with model.disable_adapter():
        np.testing.assert_array_equal(model(x), base(x))


def test_a_transposed_square_weight_merges_exactly() -> None:
    """Followed through the transpose, its adapter has the stored layout (``_transposed``)."""
    x = jax.random.normal(jax.random.key(0), (2, 3))
    base = TransposedWeight(3, rngs=nnx.Rngs(0))
    model = wrap(base, x)
    adapted = model(x)
    assert rel_error(adapted, base(x)) > MIN_EFFECT
    assert rel_error(model.merge_and_unload()(x), adapted) <= F32_TOLERANCE


@pytest.mark.parametrize(
    "base",
    [
        TransposedWeight(3, flip=True, rngs=nnx.Rngs(0)),
        nnx.Conv(
            3, 3, (2,), mask=jnp.array([[[1.0]], [[0.0]]]) * jnp.ones((2, 3, 3)), rngs=nnx.Rngs(0)
        ),
    ],
    ids=["flipped", "masked"],
)
def test_transformed_weights_are_refused(base: nnx.Module) -> None:
    x = jnp.ones((2, 4, 3)) if isinstance(base, nnx.Conv) else jnp.ones((2, 3))
    model = wrap(base, x)
    with pytest.raises(
        nnx_peft.UnmergeableAdapterError, match="transformed copy of the weight"
    ) as info:
        model.merge_and_unload()
    assert isinstance(info.value, ValueError)
    assert "exclude" in str(info.value)
    with pytest.raises(nnx_peft.UnmergeableAdapterError):
        model.merge_adapter()
    assert not model.merged


@pytest.mark.parametrize(
    ("qtype", "dtype"), [("nf4", None), (None, jnp.bfloat16)], ids=["nf4", "bf16-compute"]
)
def test_update_applies_when_an_adapter_factor_has_the_weight_shape(
    qtype: str | None, dtype: Any
) -> None:
    """rank == out_features gives A the kernel's shape, which Qwix's weight lookup
    by shape found ambiguous: it skipped the update for QLoRA, and in eager mode
    for a kernel cast to the compute dtype. Merging needs the update applied."""
    x = jnp.ones((2, 3))
    model = wrap(nnx.Linear(3, 2, dtype=dtype, rngs=nnx.Rngs(0)), x, rank=2, weight_qtype=qtype)
    assert model.model.kernel_lora_a.get_value().shape == model.model.kernel.shape
    eager, jitted = model(x), nnx.jit(lambda m, x: m(x))(model, x)
    with model.disable_adapter():
        assert rel_error(eager, model(x)) > MIN_EFFECT
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    assert rel_error(model.merge_and_unload()(x), eager) <= (1e-2 if dtype else F32_TOLERANCE)


# State errors.


def _linear_model() -> tuple[nnx_peft.PeftModel, jax.Array]:
    x = jnp.ones((2, 4))
    return wrap(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), x), x


def test_merging_twice_is_an_error() -> None:
    model, x = _linear_model()
    model.merge_adapter()
    merged = model(x)
    with pytest.raises(nnx_peft.AdapterStateError, match="already merged") as info:
        model.merge_adapter()
    assert isinstance(info.value, ValueError)
    assert "unmerge_adapter() first" in str(info.value)
    np.testing.assert_array_equal(model(x), merged)


def test_unmerging_when_not_merged_is_an_error() -> None:
    model, _ = _linear_model()
    with pytest.raises(nnx_peft.AdapterStateError, match="not merged") as info:
        model.unmerge_adapter()
    assert "merge_adapter() first" in str(info.value)


@pytest.mark.parametrize("action", ["merge_adapter", "unmerge_adapter", "merge_and_unload"])
def test_merging_inside_disable_adapter_is_an_error(action: str) -> None:
    model, _ = _linear_model()
    with model.disable_adapter():
        with pytest.raises(nnx_peft.AdapterStateError, match="disable_adapter") as info:
            getattr(model, action)()
        assert f"call {action}() after the block" in str(info.value)
        assert "is disabled" in str(info.value)


def test_a_training_step_while_merged_is_an_error() -> None:
    model, x = _linear_model()
    optimizer = model.make_optimizer(optax.sgd(0.1))

    @nnx.jit
    def step(model: nnx_peft.PeftModel, optimizer: nnx.Optimizer, x: jax.Array) -> jax.Array:
        diff = nnx.DiffState(0, model.trainable_filter)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2), argnums=diff)(model)
        optimizer.update(model, grads)
        return loss

    model.merge_adapter()
    weights = arrays(model)
    with pytest.raises(
        nnx_peft.AdapterStateError, match="gradient with respect to the adapters"
    ) as info:
        step(model, optimizer, x)
    assert "unmerge_adapter() before training" in str(info.value)
    assert_same_arrays(arrays(model), weights)
    # Gradients with respect to the input are still fine while merged.
    assert jnp.all(jnp.isfinite(jax.grad(lambda x: model(x).sum())(x)))
    model.unmerge_adapter()
    assert jnp.isfinite(step(model, optimizer, x))


@pytest.mark.parametrize("dtype", [jnp.int8, "not a dtype", bool])
def test_merge_dtype_must_be_floating(dtype: Any) -> None:
    model, _ = _linear_model()
    with pytest.raises(nnx_peft.DtypeError, match="floating-point dtype") as info:
        model.merge_and_unload(dtype=dtype)
    assert isinstance(info.value, TypeError)
    assert repr(dtype) in str(info.value)


# A whole model: jit, the base model left alone, no adapter work while merged.


def _decoder_model(qtype: str | None = None) -> tuple[TinyDecoder, nnx_peft.PeftModel, jax.Array]:
    cfg = DecoderConfig(
        vocab_size=13, num_layers=1, embed_dim=8, num_heads=2, head_dim=4, mlp_dim=12
    )
    base = TinyDecoder(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(12).reshape(2, 6) % 13
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=r".*(proj|lm_head)", weight_qtype=qtype)
    model = nnx_peft.PeftModel(base, config, tokens, rngs=nnx.Rngs(1))
    # Small enough that attention does not saturate: a saturated softmax turns
    # float32 rounding differences into large output differences.
    randomize_adapters(model, size=0.2)
    return base, model, tokens


def test_decoder_under_jit_in_every_state() -> None:
    base, model, tokens = _decoder_model()
    snapshot, base_graph = arrays(base), nnx.graphdef(base)
    forward = nnx.jit(lambda m, t: m(t))
    adapted, base_out = forward(model, tokens), base(tokens)
    assert rel_error(adapted, base_out) > MIN_EFFECT
    model.merge_adapter()
    assert rel_error(forward(model, tokens), adapted) <= F32_TOLERANCE
    with model.disable_adapter():
        np.testing.assert_array_equal(forward(model, tokens), forward(base, tokens))
    model.unmerge_adapter()
    np.testing.assert_array_equal(forward(model, tokens), adapted)
    plain = model.merge_and_unload()
    assert_plain(plain, base)
    assert rel_error(forward(plain, tokens), adapted) <= F32_TOLERANCE
    # The user's base model never changes.
    assert_same_arrays(arrays(base), snapshot)
    assert nnx.graphdef(base) == base_graph


def compiled_ops(model: nnx.Module, tokens: jax.Array) -> collections.Counter[str]:
    """The operations of ``model(tokens)`` compiled by XLA, by kind, inputs left out.

    (A merged wrapper still passes its unused adapters to the compiled function.)
    """
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    text = forward.lower(state, tokens).compile().as_text()
    ops = collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", text))
    del ops["parameter"]
    return ops


def test_merged_and_disabled_forwards_compile_to_the_base_computation() -> None:
    base, model, tokens = _decoder_model()
    base_ops = compiled_ops(base, tokens)
    assert compiled_ops(model, tokens)["dot"] > base_ops["dot"]
    assert compiled_ops(model.merge_and_unload(), tokens) == base_ops
    model.merge_adapter()
    assert compiled_ops(model, tokens) == base_ops
    model.unmerge_adapter()
    with model.disable_adapter():
        assert compiled_ops(model, tokens) == base_ops


def test_qlora_decoder_merge_and_unload_is_a_float_model() -> None:
    base, model, tokens = _decoder_model("nf4")
    plain = model.merge_and_unload()
    assert_plain(plain, base)
    assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in arrays(plain).values())
    assert rel_error(plain(tokens), model(tokens)) <= F32_TOLERANCE


def test_qwix_internals_used_for_merging_exist() -> None:
    """Merging reads einsum subscripts and QLoRA quantization settings through Qwix."""
    from qwix._src.core import einsum_info

    assert einsum_info.EinsumInfo.parse("...d,dk->...k", ndims=(3, 2)).rhs == "dk"
    x = jnp.ones((2, 8))
    model = wrap(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), x, weight_qtype="int8")
    how = model.model.kernel.how
    fields = {field.name for field in dataclasses.fields(how)}
    assert {"qtype", "channelwise_axes", "tiled_axes", "calibration_method"} <= fields
    assert isinstance(model.model.kernel.array, qwix.QArray)
