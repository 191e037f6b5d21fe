"""A weight transposed before its matmul (PyTorch's ``x @ w.T``) is adapted as it is stored.

Invariants, on models that store each weight ``(out, in)`` and transpose it in every way
JAX offers: the adapter has the stored layout (the shapes of a twin that multiplies the
weight as stored), a fresh wrapper is the base bit for bit, the adapted model equals the
twin, merging is exact, and QLoRA keeps the stored weight quantized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import nnx_peft
from nnx_peft import _qwix_internals, _transposed
from nnx_peft._quantized import QuantizedWeight
from tests import strategies
from tests.strategies import TransposedWeightNet

CONFIG = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")


def _randomize_b(model: nnx_peft.PeftModel, seed: int = 7) -> None:
    for _, module in nnx.iter_modules(model.model):
        for name, value in list(vars(module).items()):
            if name.endswith("_lora_b") and isinstance(value, nnx_peft.AdapterParam):
                old = value.get_value()
                value.set_value(jax.random.normal(jax.random.key(seed), old.shape, old.dtype))
                seed += 1


def _shapes(model: nnx_peft.PeftModel) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    return [(i.weight, i.a_shape, i.b_shape) for i in model.adapters()]


def _wrap(ops: tuple[str, ...], widths: tuple[int, ...], config: nnx_peft.LoraConfig, **kw: bool):
    x = jax.random.normal(jax.random.key(4), (3, widths[0]))
    base = TransposedWeightNet(ops, widths, rngs=nnx.Rngs(0), **kw)
    return base, nnx_peft.PeftModel(base, config, x, rngs=nnx.Rngs(1)), x


@settings(max_examples=8)
@given(strategies.transposed_weight_nets())
def test_transposed_weights_are_adapted_as_stored_and_merge_exactly(
    net: tuple[tuple[str, ...], tuple[int, ...]],
) -> None:
    ops, widths = net
    base, model, x = _wrap(ops, widths, CONFIG)
    _, twin, _ = _wrap(ops, widths, CONFIG, direct=True)
    assert _shapes(model) == _shapes(twin)
    assert len(_shapes(model)) == len(ops)
    assert bool((model(x) == base(x)).all())  # fresh: the base, bit for bit
    # Whatever ran before: traces of @ and of the transposes cached by calls of the base.
    warm = TransposedWeightNet(ops, widths, rngs=nnx.Rngs(0))
    warm(x)
    nnx.jit(lambda m, x: m(x))(warm, x)
    assert _shapes(nnx_peft.PeftModel(warm, CONFIG, x, rngs=nnx.Rngs(1))) == _shapes(twin)
    assert nnx_peft.inspect_targets(warm, CONFIG, x).adapted == ("",)  # the dry run too
    _randomize_b(model)
    _randomize_b(twin)
    adapted = model(x)
    assert not bool(jnp.allclose(adapted, base(x)))
    np.testing.assert_allclose(adapted, twin(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), adapted, atol=1e-6)
    merged = model.merge_and_unload()
    assert [getattr(merged, f"w{i}").shape for i in range(len(ops))] == [
        getattr(base, f"w{i}").shape for i in range(len(ops))
    ]
    np.testing.assert_allclose(merged(x), adapted, rtol=1e-5, atol=1e-5)


QLORA_OPS = [("@ .T",), (".mT", "jnp.moveaxis"), ("einsum-heads", "dot_general .T")]


@pytest.mark.parametrize("ops", QLORA_OPS, ids=lambda ops: "+".join(ops))
def test_qlora_keeps_a_transposed_weight_quantized_as_stored(ops: tuple[str, ...]) -> None:
    widths = (4, 6, 4)[: len(ops) + 1]
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*", weight_qtype="nf4")
    base, model, x = _wrap(ops, widths, config)
    _, twin, _ = _wrap(ops, widths, config, direct=True)
    assert _shapes(model) == _shapes(twin)
    for i in range(len(ops)):
        stored = getattr(model.model, f"w{i}")
        assert isinstance(stored, QuantizedWeight)  # quantized in memory, as stored
        assert tuple(stored.shape) == tuple(getattr(base, f"w{i}").shape)
    _randomize_b(model)
    _randomize_b(twin)
    eager, jitted = model(x), nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    # The same quantized weights and adapters as the twin that does not transpose.
    np.testing.assert_allclose(eager, twin(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.merge_and_unload()(x), eager, rtol=1e-5, atol=1e-5)


class CastThenTranspose(nnx.Module):
    """``(out, in)`` weights cast to the compute dtype around their transpose."""

    def __init__(self, order: str, rngs: nnx.Rngs) -> None:
        self.order = order
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (6, 4)) / 2.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.bfloat16)
        if self.order == "cast, transpose":
            return x @ self.weight[...].astype(jnp.bfloat16).T
        return x @ self.weight[...].T.astype(jnp.bfloat16)


@pytest.mark.parametrize("weight_qtype", [None, "nf4"])
@pytest.mark.parametrize("order", ["cast, transpose", "transpose, cast"])
def test_a_cast_before_or_after_the_transpose_is_followed(
    order: str, weight_qtype: str | None
) -> None:
    x = jax.random.normal(jax.random.key(2), (3, 4))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*", weight_qtype=weight_qtype)
    base = CastThenTranspose(order, nnx.Rngs(0))
    model = nnx_peft.PeftModel(base, config, x, rngs=nnx.Rngs(1))
    assert _shapes(model) == [("weight", (4, 2), (2, 6))]
    if weight_qtype is None:
        assert bool((model(x) == base(x)).all())
    else:
        assert isinstance(model.model.weight, QuantizedWeight)
    _randomize_b(model)
    adapted = model(x)
    assert adapted.dtype == base(x).dtype == jnp.bfloat16
    jitted = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(jitted.astype(jnp.float32), adapted.astype(jnp.float32), atol=5e-2)
    merged = model.merge_and_unload()(x)
    np.testing.assert_allclose(merged.astype(jnp.float32), adapted.astype(jnp.float32), atol=5e-2)


# --- The rewriting itself --------------------------------------------------------------------


@st.composite
def _dot_generals(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]:
    """``(lhs_shape, weight_shape, perm, dimension_numbers)``: ``lhs`` times ``w`` transposed."""
    ndim = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    perm = tuple(draw(st.permutations(range(ndim))))
    transposed_shape = [sizes[p] for p in perm]
    axes = list(range(ndim))
    batch = draw(st.lists(st.sampled_from(axes), unique=True, max_size=min(1, ndim - 1)))
    rest = [a for a in axes if a not in batch]
    contracting = draw(st.lists(st.sampled_from(rest), unique=True, min_size=1, max_size=len(rest)))
    free = draw(st.lists(st.integers(1, 3), max_size=2))
    lhs_shape = (
        *(transposed_shape[a] for a in batch),
        *free,
        *(transposed_shape[a] for a in contracting),
    )
    lead = len(batch) + len(free)
    lhs_batch = tuple(range(len(batch)))
    lhs_contracting = tuple(range(lead, lead + len(contracting)))
    numbers = ((lhs_contracting, tuple(contracting)), (lhs_batch, tuple(batch)))
    return lhs_shape, tuple(sizes), perm, numbers


@given(_dot_generals())
def test_a_dot_general_on_a_transpose_equals_the_rewritten_one_on_its_source(case) -> None:
    lhs_shape, weight_shape, perm, numbers = case
    lhs = jax.random.normal(jax.random.key(0), lhs_shape)
    w = jax.random.normal(jax.random.key(1), weight_shape)
    expected = jax.lax.dot_general(lhs, jnp.transpose(w, perm), numbers)
    on = _transposed.dot_general_on_source(numbers, perm, lhs.ndim)
    on_source = jax.lax.dot_general(lhs, w, on.dimension_numbers)
    got = on.restore(on_source)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(on.unrestore(got), on_source)


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), st.permutations(range(n)))))
def test_an_einsum_on_a_transpose_equals_the_rewritten_one_on_its_source(case) -> None:
    ndim, perm = case
    letters = "pqrs"[:ndim]
    sizes = (2, 3, 4, 5)[:ndim]
    w = jax.random.normal(jax.random.key(1), sizes)
    x = jax.random.normal(jax.random.key(0), (3, sizes[perm[0]]))
    transposed_letters = "".join(letters[p] for p in perm)
    spec = f"b{transposed_letters[0]},{transposed_letters}->b{transposed_letters[1:][::-1]}"
    expected = jnp.einsum(spec, x, jnp.transpose(w, perm))
    rewritten = _transposed.einsum_on_source(spec, tuple(perm))
    assert rewritten is not None and rewritten.split(",")[1].startswith(letters)
    np.testing.assert_allclose(jnp.einsum(rewritten, x, w), expected, rtol=1e-5, atol=1e-5)


def test_an_einsum_with_an_ellipsis_or_implicit_output_is_left_as_it_is() -> None:
    assert _transposed.einsum_on_source("b...,...o->bo", (1, 0)) is None
    assert _transposed.einsum_on_source("bi,io", (1, 0)) is None


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), st.data())))
def test_each_permutation_is_the_one_jax_applies(case) -> None:
    ndim, data = case
    x = jnp.arange(np.prod((2, 3, 4, 5)[:ndim])).reshape((2, 3, 4, 5)[:ndim])
    axis = st.integers(-ndim, ndim - 1)
    a, b = data.draw(axis), data.draw(axis)
    axes = tuple(data.draw(st.permutations(range(ndim))))
    cases = [
        (_transposed.transpose_perm(ndim), jnp.transpose(x)),
        (_transposed.transpose_perm(ndim, axes), jnp.transpose(x, axes)),
        (_transposed.swapaxes_perm(ndim, a, b), jnp.swapaxes(x, a, b)),
        (_transposed.moveaxis_perm(ndim, a, b), jnp.moveaxis(x, a, b)),
    ]
    if ndim >= 2:
        cases.append((_transposed.matrix_transpose_perm(ndim), jnp.matrix_transpose(x)))
    for perm, expected in cases:
        np.testing.assert_array_equal(jax.lax.transpose(x, perm), expected)


def test_quantized_weights_get_the_array_methods_from_nnx_peft_only() -> None:
    """If Qwix gives ``WithAux`` its own ``.T`` one day, nnx_peft's must be revisited."""
    for name in _qwix_internals.WITH_AUX_ARRAY_METHODS:
        method = vars(_qwix_internals.WithAux)[name]
        function = method.fget if isinstance(method, property) else method
        assert function.__module__ == "nnx_peft._transposed", (
            f"Qwix's WithAux defines {name!r} itself now; check that nnx_peft._transposed "
            "still follows transposes of QLoRA weights"
        )


class _Layer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)) / 2.0)  # square
        self.v = nnx.Param(jax.random.normal(rngs.params(), (6, 4)) / 2.0)  # (out, in)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(jnp.tanh(x @ self.w.T) @ self.v[...].T)[:, :4]


class _Stack(nnx.Module):
    """Three :class:`_Layer` s stacked by ``nnx.vmap`` and run by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> _Layer:
            return _Layer(rngs)

        self.layers = make(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x: jax.Array, layer: _Layer) -> jax.Array:
            return layer(x)

        return body(x, self.layers)


@pytest.mark.parametrize("weight_qtype", [None, "nf4"])
def test_transposed_weights_of_a_scanned_stack_are_adapted_per_layer(
    weight_qtype: str | None,
) -> None:
    x = jax.random.normal(jax.random.key(0), (2, 4))
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*", weight_qtype=weight_qtype)
    base = _Stack(nnx.Rngs(0))
    model = nnx_peft.PeftModel(base, config, x, rngs=nnx.Rngs(1))
    shapes = [(i.weight, i.a_shape, i.b_shape, i.layers) for i in model.adapters()]
    assert shapes == [("w", (3, 4, 2), (3, 2, 4), 3), ("v", (3, 4, 2), (3, 2, 6), 3)]
    if weight_qtype is None:
        assert bool((model(x) == base(x)).all())
    _randomize_b(model)
    adapted = model(x)
    assert not bool(jnp.allclose(adapted, base(x), atol=1e-3))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), adapted, atol=1e-6)
    np.testing.assert_allclose(model.merge_and_unload()(x), adapted, rtol=1e-5, atol=1e-5)


class _TransposedOnTheLeft(nnx.Module):
    def __init__(self) -> None:
        self.w = nnx.Param(jnp.ones((3, 4)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (self.w.T @ x.T).T


def test_a_transposed_weight_on_the_left_is_refused_at_wrap_time() -> None:
    with pytest.raises(nnx_peft.UnsupportedLayerError, match=r"own weight from the left"):
        nnx_peft.PeftModel(_TransposedOnTheLeft(), CONFIG, jnp.ones((2, 3)), rngs=nnx.Rngs(0))


class _PassesItsTranspose(nnx.Module):
    """A module handing its transposed weight to another module's product."""

    def __init__(self) -> None:
        self.w = nnx.Param(jax.random.normal(jax.random.key(0), (6, 4)))
        self.inner = _Multiply()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.inner(x, self.w.T) + x @ self.w.T


class _Multiply(nnx.Module):
    def __init__(self) -> None:
        self.v = nnx.Param(jax.random.normal(jax.random.key(2), (6, 4)))  # the shape of w

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return x @ w + x @ self.v.T


def test_a_transpose_reaching_another_module_is_not_taken_for_its_weight() -> None:
    """There it is a plain operand: not followed to a weight of the other module's shape."""
    x = jax.random.normal(jax.random.key(3), (2, 4))
    base = _PassesItsTranspose()
    model = nnx_peft.PeftModel(base, CONFIG, x, rngs=nnx.Rngs(1))
    adapted = sorted((i.module_path, i.weight, i.a_shape) for i in model.adapters())
    assert adapted == [("", "w", (4, 2)), ("inner", "v", (4, 2))]
    assert bool((model(x) == base(x)).all())
    _randomize_b(model)

    def update(module: nnx.Module, name: str) -> jax.Array:
        a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
        return CONFIG.alpha / CONFIG.rank * (x @ a @ b)

    # Inner's product on w.T gets no update: had it been taken for v's product (v has
    # w's shape), v's update would be added twice.
    expected = base(x) + update(model.model, "w") + update(model.model.inner, "v")
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


class _TiedHead(nnx.Module):
    """Logits from the embedding table transposed, as Gemma's ``embedder.decode``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.table = nnx.Param(jax.random.normal(rngs.params(), (10, 4)))
        self.proj = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.proj(self.table[(ids,)]) @ self.table.T


def test_qlora_leaves_a_table_multiplied_transposed_unquantized() -> None:
    """The tied head's product on ``table.T`` runs as written: QLoRA quantizes matmul
    weights only, and quantizing the table would break its lookups."""
    ids = jnp.array([[1, 2, 3]])
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*", weight_qtype="nf4")
    model = nnx_peft.PeftModel(_TiedHead(nnx.Rngs(0)), config, ids, rngs=nnx.Rngs(1))
    assert sorted((i.module_path, i.weight) for i in model.adapters()) == [
        ("", "table"),
        ("proj", "kernel"),
    ]
    assert isinstance(model.model.proj.kernel, QuantizedWeight)
    assert not isinstance(model.model.table, QuantizedWeight)
    _randomize_b(model)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, ids), model(ids), atol=1e-5)
    with pytest.raises(nnx_peft.UnmergeableAdapterError, match="tied"):
        model.merge_and_unload()


@pytest.mark.parametrize(
    "variant", [{"use_dora": True}, {"init": "pissa"}, {"init": "olora"}], ids=str
)
def test_variants_factor_and_merge_a_transposed_weight(variant: dict[str, object]) -> None:
    """DoRA's norms, PiSSA's and OLoRA's factorisations are of the weight as stored."""
    ops, widths = ("@ .T", "einsum-heads", "jnp.moveaxis"), (4, 6, 4, 2)
    config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*", **variant)
    base, model, x = _wrap(ops, widths, config)
    np.testing.assert_allclose(model(x), base(x), rtol=1e-5, atol=1e-6)  # fresh: the base
    _randomize_b(model)
    adapted = model(x)
    assert not bool(jnp.allclose(adapted, base(x), atol=1e-3))
    np.testing.assert_allclose(model.merge_and_unload()(x), adapted, rtol=1e-5, atol=1e-5)
