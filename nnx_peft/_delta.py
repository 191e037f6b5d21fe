"""The low-rank update ``scale * x A B`` of an adapted matmul, shaped for XLA.

Why this exists: Qwix computes the update as one three-operand einsum, or as
two ``dot_general`` calls over the input's original axes (batch, sequence,
heads, ...). Differentiating that, XLA on CPU contracts the output's cotangent
over two or more axes at once for the gradient of ``B``, and lays the dot out
by copying the cotangent transposed: a copy the size of the layer's output,
per adapter, per step. On the benchmark decoder (``benchmarks/``) those copies
took 155 ms of a 1.07 s LoRA step (``docs/benchmarks.md``).

Here every run of axes that all four arrays hold together, adjacent and in the
same order (batch and sequence; an einsum layer's heads and head size), is
merged into one axis by a free reshape first, so each einsum is a plain matrix
product, which XLA contracts in place. The scale multiplies the thin ``x A``
instead of the wide output. It is all ordinary JAX, so every transformation
(``grad``, ``jvp``, ``vmap``, Hessians) applies. Under a mesh of several devices
the axes stay as they are, so that their shardings apply unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nnx_peft import _factors
from nnx_peft._factors import Subscripts


@dataclasses.dataclass(frozen=True)
class UpdateSubscripts:
    """Einsum subscripts of ``x A B``: the input, both factors and the output.

    Example:
        >>> sub = UpdateSubscripts(x="btd", a="dr", b="ro", out="bto")
        >>> sub.projected
        'btr'
    """

    x: str
    a: str
    b: str
    out: str

    @property
    def projected(self) -> str:
        """The subscripts of ``x A``: the letters of ``x`` and ``A`` kept by ``B`` or the output."""
        keep = set(self.b + self.out)
        return "".join(c for c in dict.fromkeys(self.x + self.a) if c in keep)

    @property
    def arrays(self) -> tuple[str, str, str, str]:
        """The subscripts of ``x``, ``A``, ``B`` and the output, in that order."""
        return self.x, self.a, self.b, self.out


def dot_general_update_subscripts(
    sub: Subscripts,
    lhs_ndim: int,
    dimension_numbers: jax.lax.DotDimensionNumbers,
) -> UpdateSubscripts:
    """The update subscripts of ``dot_general(lhs, weight, dimension_numbers)``.

    ``sub`` letters the weight (:func:`nnx_peft._factors.dot_general_subscripts`);
    the input's contracting and batch axes take the weight's letters, its other
    axes fresh ones. The output is ``dot_general``'s: batch axes, then the
    input's free axes, then the weight's remaining axes.

    Example:
        >>> sub = _factors.dot_general_subscripts(2, contracting=(0,), batch=())
        >>> dot_general_update_subscripts(sub, 3, (((2,), (0,)), ((), ())))
        UpdateSubscripts(x='cda', a='ar', b='rb', out='cdb')
    """
    (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
    taken = set(sub.weight + sub.a + sub.b)
    fresh = iter(c for c in string.ascii_letters if c not in taken)
    x = []
    for axis in range(lhs_ndim):
        if axis in lhs_ca:
            x.append(sub.weight[rhs_ca[list(lhs_ca).index(axis)]])
        elif axis in lhs_ba:
            x.append(sub.weight[rhs_ba[list(lhs_ba).index(axis)]])
        else:
            x.append(next(fresh))
    # The output's layout is the one merging and the variants use: fill its input axes in.
    free = iter(c for axis, c in enumerate(x) if axis not in lhs_ca and axis not in lhs_ba)
    out_ndim = lhs_ndim - len(lhs_ca) + len(sub.weight) - len(rhs_ca) - len(rhs_ba)
    template = _factors.dot_general_output(sub, out_ndim)
    out = "".join(next(free) if c == "." else c for c in template)
    return UpdateSubscripts(x="".join(x), a=sub.a, b=sub.b, out=out)


def low_rank_update(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    sub: UpdateSubscripts,
    *,
    scale: float,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``scale * einsum(x, A, B)``, contracted as ``(x A) B`` over merged axes.

    Args:
        x: The matmul's input.
        a: ``A``, one axis per letter of ``sub.a``.
        b: ``B``, one axis per letter of ``sub.b``.
        sub: The einsum subscripts of the four arrays.
        scale: The adapter's scale.
        precision: Passed to both einsums.
        preferred_element_type: Passed to both einsums.
        out_sharding: The output's sharding, as for ``jnp.einsum``. With it, or
            under a mesh of several devices (``jax.set_mesh``), axes are not
            merged, so that shardings apply to them as they are.

    Returns:
        The update, laid out as ``sub.out``.

    Example:
        >>> sub = UpdateSubscripts(x="td", a="dr", b="ro", out="to")
        >>> low_rank_update(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((4, 5)), sub,
        ...                 scale=0.5).tolist()[0]
        [6.0, 6.0, 6.0, 6.0, 6.0]
    """
    operands = tuple(zip(sub.arrays[:3], (x, a, b), strict=True))
    sizes = {c: n for s, v in operands for c, n in zip(s, v.shape, strict=True)}
    repeated = any(len(set(s)) != len(s) for s in sub.arrays)  # a diagonal: nothing to merge
    mesh = jax.sharding.get_abstract_mesh()
    # Merging an axis sharded on its own (sequence parallelism shards the sequence, the
    # minor side of (batch, sequence)) would make XLA reshard the arrays; under a mesh
    # of several devices, or with an explicit output sharding, axes stay as they are.
    sharded = out_sharding is not None or (not mesh.empty and mesh.size > 1)
    runs = {c: c for c in sizes} if sharded or repeated else _runs(sub)
    x, a, b = (v.reshape(_merged_shape(s, runs, sizes)) for s, v in operands)
    merged = UpdateSubscripts(*(_merged(s, runs) for s in sub.arrays))
    projected = jnp.einsum(
        f"{merged.x},{merged.a}->{merged.projected}",
        x,
        a,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    out = jnp.einsum(
        f"{merged.projected},{merged.b}->{merged.out}",
        projected * scale,
        b,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
    return out.reshape(tuple(sizes[c] for c in sub.out))


def _runs(sub: UpdateSubscripts) -> dict[str, str]:
    """Runs of letters that every array holds together, adjacent and in the same order.

    Maps the first letter of each run to the run (a single letter is a run of one).
    """

    def follows(first: str, second: str) -> bool:
        return all(
            (first in s) == (second in s)
            and (first not in s or s.find(second) == s.index(first) + 1)
            for s in sub.arrays
        )

    runs: dict[str, str] = {}
    for s in sub.arrays:
        for c in s:
            if any(c in run for run in runs.values()):
                continue
            run = c
            while (after := s.index(run[-1]) + 1) < len(s) and follows(run[-1], s[after]):
                run += s[after]
            runs[c] = run
    return runs


def _merged(s: str, runs: dict[str, str]) -> str:
    """``s`` with each run written as its first letter."""
    return "".join(c for c in s if c in runs)


def _merged_shape(s: str, runs: dict[str, str], sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape of an array lettered ``s`` once each run is one axis."""
    return tuple(math.prod(sizes[d] for d in runs[c]) for c in s if c in runs)


#: An adapter's update as the provider adds it: ``(x, A, B) -> scale * x A B``.
Update = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def dot_general_update(
    sub: Subscripts,
    lhs_ndim: int,
    dimension_numbers: jax.lax.DotDimensionNumbers,
    weight_shape: tuple[int, ...],
    scale: float,
    precision: jax.lax.PrecisionLike = None,
) -> Update:
    """The update of ``dot_general(x, weight, dimension_numbers)``, shaped like its output."""
    update_sub = dot_general_update_subscripts(sub, lhs_ndim, dimension_numbers)

    def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
        a, b = sub.views(lora_a, lora_b, weight_shape)
        return low_rank_update(x, a, b, update_sub, scale=scale, precision=precision)

    return update


def einsum_update(lora_einsum_str: str, scale: float, **einsum_kwargs: Any) -> Update:
    """The update ``einsum(lora_einsum_str, x, A, B)`` of a weight's einsum, with its
    ``precision``, ``preferred_element_type`` and ``out_sharding`` (other keywords unused)."""
    operands, out = lora_einsum_str.split("->")
    x_str, a_str, b_str = operands.split(",")
    update_sub = UpdateSubscripts(x_str, a_str, b_str, out)
    kwargs = {
        name: einsum_kwargs.get(name)
        for name in ("precision", "preferred_element_type", "out_sharding")
    }

    def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
        return low_rank_update(x, lora_a, lora_b, update_sub, scale=scale, **kwargs)

    return update
