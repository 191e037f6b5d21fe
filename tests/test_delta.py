"""The low-rank update over merged axes (``nnx_peft._delta``).

Invariants: for any subscripts, the update and its derivatives (reverse and
forward mode) equal those of ``scale * einsum(x, A, B)``; the gradients of an
adapted layer, of every layout, equal the gradients through its merged weight;
and XLA compiles the adapter backward without transposed copies of wide arrays
(the reason the module exists).
"""

from __future__ import annotations

import re
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import nnx_peft
from nnx_peft import _delta
from nnx_peft._delta import UpdateSubscripts
from tests.test_merging import ALL_LAYOUTS, Layout, rel_error, wrap

F32_TOLERANCE = 1e-5


def _reference(x: jax.Array, a: jax.Array, b: jax.Array, sub: UpdateSubscripts, scale: float):
    return scale * jnp.einsum(
        f"{sub.x},{sub.a},{sub.b}->{sub.out}", x, a, b, precision=jax.lax.Precision.HIGHEST
    )


@st.composite
def update_cases(draw: st.DrawFn) -> tuple[UpdateSubscripts, dict[str, int]]:
    """Random subscripts: contracted, batch (in A or in both factors), input-only free axes
    (some summed away by the update), and output axes of B, in random orders."""
    letters = iter(draw(st.permutations(string.ascii_lowercase)))

    def take(lo: int, hi: int) -> list[str]:
        return [next(letters) for _ in range(draw(st.integers(lo, hi)))]

    contracted, free_x, free_b, rank = take(1, 2), take(0, 2), take(1, 2), next(letters)
    batch_a, batch_ab, summed = take(0, 1), take(0, 1), take(0, 1)
    x = draw(st.permutations(contracted + free_x + batch_a + batch_ab + summed))
    a = [*draw(st.permutations(contracted + batch_a + batch_ab)), rank]
    b = draw(st.permutations([*batch_ab, rank, *free_b]))
    out = draw(st.permutations(free_x + batch_a + batch_ab + free_b))
    sizes = {c: draw(st.integers(1, 3)) for c in set(x + a + b)}
    return UpdateSubscripts(*("".join(s) for s in (x, a, b, out))), sizes


def _random(shape: tuple[int, ...], seed: int, dtype: Any = jnp.float32) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@given(case=update_cases(), scale=st.sampled_from([0.5, 2.0]))
def test_update_and_its_derivatives_match_the_einsum(
    case: tuple[UpdateSubscripts, dict[str, int]], scale: float
) -> None:
    sub, sizes = case
    primals = tuple(
        _random(tuple(sizes[c] for c in s), i) for i, s in enumerate((sub.x, sub.a, sub.b))
    )
    tangents = tuple(_random(v.shape, 10 + i) for i, v in enumerate(primals))

    def reference(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return _reference(x, a, b, sub, scale)

    def update(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return _delta.low_rank_update(x, a, b, sub, scale=scale)

    out, vjp = jax.vjp(update, *primals)
    want, want_vjp = jax.vjp(reference, *primals)
    assert out.shape == want.shape
    assert rel_error(out, want) < F32_TOLERANCE
    cotangent = _random(out.shape, 3)
    for name, got, expected in zip("xab", vjp(cotangent), want_vjp(cotangent), strict=True):
        assert rel_error(got, expected) < F32_TOLERANCE, name
    got_tangent = jax.jvp(update, primals, tangents)[1]
    assert rel_error(got_tangent, jax.jvp(reference, primals, tangents)[1]) < F32_TOLERANCE


def test_bfloat16_gradients_keep_each_operand_dtype() -> None:
    sub = UpdateSubscripts(x="btd", a="dr", b="ro", out="bto")
    x = _random((2, 3, 4), 0, jnp.bfloat16)
    a, b = _random((4, 2), 1), _random((2, 5), 2, jnp.bfloat16)
    grads = jax.grad(
        lambda x, a, b: jnp.sum(_delta.low_rank_update(x, a, b, sub, scale=2.0)), argnums=(0, 1, 2)
    )(x, a, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.bfloat16]
    expected = jax.grad(lambda x, a, b: jnp.sum(_reference(x, a, b, sub, 2.0)), argnums=(0, 1, 2))(
        *(v.astype(jnp.float32) for v in (x, a, b))
    )
    for got, want in zip(grads, expected, strict=True):
        assert rel_error(got, want) < 2**-6


def test_repeated_letters_are_left_unmerged() -> None:
    sub = UpdateSubscripts(x="tdd", a="dr", b="ro", out="to")  # the input's diagonal
    x, a, b = _random((2, 3, 3), 0), _random((3, 2), 1), _random((2, 4), 2)
    got = _delta.low_rank_update(x, a, b, sub, scale=1.5)
    assert rel_error(got, _reference(x, a, b, sub, 1.5)) < F32_TOLERANCE


@pytest.mark.parametrize(
    ("sub", "merged"),
    [
        (UpdateSubscripts("btd", "dr", "rnh", "btnh"), UpdateSubscripts("bd", "dr", "rn", "bn")),
        (UpdateSubscripts("btnh", "nhr", "rd", "btd"), UpdateSubscripts("bn", "nr", "rd", "bd")),
        # Heads and head size in different orders in input and output: kept apart.
        (UpdateSubscripts("btd", "dr", "rnh", "bthn"), UpdateSubscripts("bd", "dr", "rnh", "bhn")),
    ],
)
def test_axes_held_together_everywhere_are_merged(
    sub: UpdateSubscripts, merged: UpdateSubscripts
) -> None:
    runs = _delta._runs(sub)
    assert UpdateSubscripts(*(_delta._merged(s, runs) for s in sub.arrays)) == merged


def _reshapes(fn: Any, *args: jax.Array) -> int:
    return sum(e.primitive.name == "reshape" for e in jax.make_jaxpr(fn)(*args).eqns)


def test_axes_stay_unmerged_under_a_mesh_of_several_devices() -> None:
    """Merging (batch, sequence) would reshard a sequence-parallel input."""
    sub = UpdateSubscripts("btd", "dr", "ro", "bto")
    args = (_random((2, 3, 4), 0), _random((4, 2), 1), _random((2, 5), 2))

    def update(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return _delta.low_rank_update(x, a, b, sub, scale=2.0)

    assert _reshapes(update, *args) > 0
    # Auto axes: newer JAX versions refuse to run a computation whose only mesh is abstract
    # with Explicit axes (their default), and this process has one device.
    two = jax.sharding.AbstractMesh((2,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.sharding.use_abstract_mesh(two):
        assert _reshapes(update, *args) == 0
        assert rel_error(update(*args), _reference(*args, sub, 2.0)) < F32_TOLERANCE
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("seq",))):
        assert _reshapes(update, *args) > 0


def test_dot_general_subscripts_match_dot_general() -> None:
    from nnx_peft import _factors

    dims = (((3, 0), (2, 0)), ((1,), (1,)))
    x, w = _random((2, 3, 5, 4), 0), _random((2, 3, 4, 6), 1)
    weight_sub = _factors.dot_general_subscripts(4, contracting=(2, 0), batch=(1,))
    sub = _delta.dot_general_update_subscripts(weight_sub, x.ndim, dims)
    direct = jax.lax.dot_general(x, w, dims, precision=jax.lax.Precision.HIGHEST)
    assert rel_error(jnp.einsum(f"{sub.x},{weight_sub.weight}->{sub.out}", x, w), direct) < 1e-6


# The adapted model.


@given(layout=ALL_LAYOUTS)
def test_adapted_gradients_equal_those_through_the_merged_weight(layout: Layout) -> None:
    """The gradient of the adapted layer, with respect to the adapters and to its input,
    is the gradient of the same layer whose weight is ``W + scale * A @ B`` (merged).

    (Not for DoRA, whose weight norm is a constant to the gradient, as in HF PEFT.)
    """
    base, x = layout.build(), layout.sample()
    model = wrap(base, x)
    graphdef, adapters, rest = nnx.split(model, model.trainable_filter, ...)
    cotangent = _random(model(x).shape, 5)

    def adapted(adapters: nnx.State, x: jax.Array) -> jax.Array:
        return jnp.sum(cotangent * nnx.merge(graphdef, adapters, rest)(x))

    def merged(adapters: nnx.State, x: jax.Array) -> jax.Array:
        plain = nnx.merge(graphdef, adapters, rest).merge_and_unload()
        return jnp.sum(cotangent * plain(x))

    got = jax.grad(adapted, argnums=(0, 1))(adapters, x)
    want = jax.grad(merged, argnums=(0, 1))(adapters, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_error(g, w) < F32_TOLERANCE


def test_forward_mode_and_second_order_derivatives_match_the_merged_layer() -> None:
    base, x = nnx.Linear(3, 2, rngs=nnx.Rngs(0)), _random((2, 3), 0)
    model = wrap(base, x)
    graphdef, adapters, rest = nnx.split(model, model.trainable_filter, ...)

    def loss(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(nnx.merge(graphdef, adapters, rest)(x)))

    def merged_loss(x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(nnx.merge(graphdef, adapters, rest).merge_and_unload()(x)))

    assert rel_error(jax.hessian(loss)(x), jax.hessian(merged_loss)(x)) < F32_TOLERANCE
    tangent = _random(x.shape, 1)
    got, want = jax.jvp(loss, (x,), (tangent,)), jax.jvp(merged_loss, (x,), (tangent,))
    assert rel_error(got[1], want[1]) < F32_TOLERANCE


# What XLA makes of it.


def _wide_copies(hlo: str, size: int) -> int:
    """Copies and transposes in ``hlo`` producing an f32 array of at least ``size`` elements."""
    count = 0
    for shape in re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} (?:copy|transpose)\(", hlo):
        count += int(np.prod([int(n) for n in shape.split(",")])) >= size
    return count


@pytest.mark.parametrize("kind", ["linear", "einsum"])
def test_adapter_backward_adds_no_wide_transposed_copies(kind: str) -> None:
    """Gradients of ``B`` and ``A`` contract the wide output cotangent and input in place.

    Over unmerged (batch, sequence) axes, XLA on CPU copies the output cotangent
    transposed for the gradient of ``B``, a copy the size of the layer's output
    per adapter per step; this counts the wide copies in the compiled backward
    of a frozen layer and of the same layer with an adapter.
    """
    d, o, t = 512, 1536, 256
    if kind == "linear":
        base = nnx.Linear(d, o, rngs=nnx.Rngs(0))
    else:
        base = nnx.Einsum("btd,dnh->btnh", (d, 4, o // 4), rngs=nnx.Rngs(0))
    x = _random((2, t, d), 0)
    model = nnx_peft.PeftModel(
        base, nnx_peft.LoraConfig(rank=4, alpha=8.0, target=".*"), x, rngs=nnx.Rngs(1)
    )
    graphdef, adapters, rest = nnx.split(model, model.trainable_filter, ...)
    merged = model.merge_and_unload()

    def adapted(adapters: nnx.State, x: jax.Array) -> jax.Array:
        return jnp.sum(jax.nn.silu(nnx.merge(graphdef, adapters, rest)(x)))

    def frozen(x: jax.Array) -> jax.Array:
        return jnp.sum(jax.nn.silu(merged(x)))

    def compiled(fn: Any, *args: Any) -> str:
        return jax.jit(fn).lower(*args).compile().as_text()

    wide = 2 * t * min(d, o)
    lora_hlo = compiled(jax.grad(adapted, argnums=(0, 1)), adapters, x)
    frozen_hlo = compiled(jax.grad(frozen), x)
    assert _wide_copies(lora_hlo, wide) <= _wide_copies(frozen_hlo, wide)
