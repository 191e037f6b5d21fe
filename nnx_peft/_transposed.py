"""A weight transposed before its matmul (``x @ w.T``, PyTorch's layout), followed to the weight.

Models ported from PyTorch store a linear weight as ``(out, in)`` and compute
``x @ w.T``; others swap or move a weight's axes before an einsum. A matmul on the
transposed copy does not see the stored weight: an eager call cannot match the copy
to it (another array, another shape), and QLoRA would quantize the copy in the copy's
layout and store it in place of the weight.

The provider intercepts ``jnp.transpose`` (so also ``.T`` and ``.transpose()``),
``jnp.permute_dims``, ``jnp.matrix_transpose`` (``.mT``), ``jnp.swapaxes``
(``.swapaxes()``) and ``jnp.moveaxis``. Applied to a targeted module's own weight
(the stored array, a cast of it, or a quantized weight), the result remembers its
source and permutation (:func:`transposed`); a ``dot_general`` or einsum on it is
rewritten as the same product on the source (:func:`dot_general_on_source`,
:func:`einsum_on_source`): the contraction's axes mapped through the permutation,
the output's axes put back in their order. That is an identity, so the numbers do
not change; what changes is that the weight is recognised as stored: its adapter
has the stored layout (and merges exactly), and QLoRA quantizes and keeps the stored
weight, transposing nothing at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnx_peft import _adapter_ops, _quantized, _qwix_internals
from nnx_peft._quantized import QuantizedTranspose, QuantizedWeight

#: The auxiliary-data key under which a transposed weight keeps its source.
_SOURCE = "nnx_peft_transposed_source"


@dataclasses.dataclass(frozen=True)
class Transposed:
    """Where a transposed weight came from: ``jnp.transpose(weight, perm)``.

    Attributes:
        weight: The weight as the module holds it (or a cast of it): an array or
            a quantized weight.
        perm: Axis ``i`` of the transpose is axis ``perm[i]`` of ``weight``.
    """

    weight: Any
    perm: tuple[int, ...]


def source_of(x: Any) -> Transposed | None:
    """What ``x`` is a transpose of, if it is a transposed weight."""
    if isinstance(x, QuantizedTranspose):
        return Transposed(x.weight, x.perm)
    if isinstance(x, jax.Array):
        found: Transposed | None = _qwix_internals.aux_data_get(x, _SOURCE, None)
        return found
    return None


def own_source(x: Any) -> Transposed | None:
    """What ``x`` transposes, if it is a transpose of the running module's own weight.

    A transposed weight that reaches another module's product is multiplied as
    any array is there (a quantized one cannot be, and fails).
    """
    found = source_of(x)
    if found is None or isinstance(x, QuantizedTranspose):
        return found
    try:
        module = _qwix_internals.get_current_module()
    except ValueError:  # outside any module
        return None
    return found if is_own_weight(found.weight, _adapter_ops.base_weights(module)) else None


def transposed(weight: Any, perm: tuple[int, ...]) -> Any:
    """``jnp.transpose(weight, perm)``, remembering its source (a transpose of one composed)."""
    inner = source_of(weight)
    if inner is not None:
        weight, perm = inner.weight, tuple(inner.perm[p] for p in perm)
    if isinstance(weight, QuantizedWeight):
        return QuantizedTranspose(weight, perm)
    out = jax.lax.transpose(weight, perm)
    _qwix_internals.aux_data_set(out, _SOURCE, Transposed(weight, perm))
    return out


def cast(x: Any, dtype: Any) -> Any:
    """``x`` (a transposed weight) cast to ``dtype``, still known as a transpose of its source."""
    if isinstance(x, QuantizedTranspose):
        return x.astype(dtype)
    found = source_of(x)
    assert found is not None
    return transposed(found.weight.astype(dtype), found.perm)


# --- The permutation each intercepted function applies ----------------------------------------


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of {ndim} dimensions")
    return axis % ndim


def transpose_perm(ndim: int, axes: Any = None) -> tuple[int, ...]:
    """``jnp.transpose``'s permutation (``axes=None`` reverses)."""
    if axes is None:
        return tuple(reversed(range(ndim)))
    perm = tuple(_axis(int(a), ndim) for a in axes)
    if sorted(perm) != list(range(ndim)):
        raise ValueError(f"axes {tuple(axes)} are not a permutation of {ndim} dimensions")
    return perm


def swapaxes_perm(ndim: int, axis1: int, axis2: int) -> tuple[int, ...]:
    """``jnp.swapaxes``'s permutation."""
    perm = list(range(ndim))
    a, b = _axis(axis1, ndim), _axis(axis2, ndim)
    perm[a], perm[b] = perm[b], perm[a]
    return tuple(perm)


def moveaxis_perm(ndim: int, source: Any, destination: Any) -> tuple[int, ...]:
    """``jnp.moveaxis``'s permutation (NumPy's rule)."""
    sources = [_axis(int(a), ndim) for a in np.atleast_1d(source)]
    destinations = [_axis(int(a), ndim) for a in np.atleast_1d(destination)]
    if len(sources) != len(destinations):
        raise ValueError("moveaxis needs as many destination axes as source axes")
    order = [axis for axis in range(ndim) if axis not in sources]
    for dest, src in sorted(zip(destinations, sources, strict=True)):
        order.insert(dest, src)
    return tuple(order)


def matrix_transpose_perm(ndim: int) -> tuple[int, ...]:
    """``jnp.matrix_transpose``'s permutation (the last two axes swapped)."""
    if ndim < 2:
        raise ValueError(f"matrix_transpose needs at least two dimensions, got {ndim}")
    return (*range(ndim - 2), ndim - 1, ndim - 2)


# --- The product rewritten on the source ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OnSource:
    """A ``dot_general`` on a transposed weight, as one on its source.

    Attributes:
        dimension_numbers: The contraction's numbers with the source as right operand.
        out_perm: The permutation that puts the product's axes back in the
            order the transposed weight gives them, or ``None`` if they are.
    """

    dimension_numbers: jax.lax.DotDimensionNumbers
    out_perm: tuple[int, ...] | None

    def restore(self, out: jax.Array) -> jax.Array:
        """The product on the source, its axes as the product on the transpose has them."""
        return out if self.out_perm is None else jax.lax.transpose(out, self.out_perm)

    def unrestore(self, out: jax.Array) -> jax.Array:
        """The product on the transpose, its axes as the product on the source has them."""
        if self.out_perm is None:
            return out
        return jax.lax.transpose(out, tuple(int(i) for i in np.argsort(self.out_perm)))


def dot_general_on_source(
    dimension_numbers: jax.lax.DotDimensionNumbers, perm: tuple[int, ...], lhs_ndim: int
) -> OnSource:
    """``dot_general(lhs, transpose(w, perm), dims)`` as ``dot_general(lhs, w, ...)``.

    Axis ``i`` of the transpose is axis ``perm[i]`` of ``w``; the output lists
    batch axes, then the input's free axes, then the weight's free axes in the
    weight operand's order, which the source may order differently.
    """
    (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = dimension_numbers
    contracting = tuple(perm[int(i)] for i in rhs_contracting)
    batch = tuple(perm[int(i)] for i in rhs_batch)
    taken = {int(i) for i in (*rhs_contracting, *rhs_batch)}
    wanted = [perm[i] for i in range(len(perm)) if i not in taken]  # the transpose's order
    given = sorted(wanted)  # the source's order
    lead = lhs_ndim - len(lhs_contracting)  # batch axes and the input's free axes
    out_perm = (*range(lead), *(lead + given.index(axis) for axis in wanted))
    numbers = ((tuple(lhs_contracting), contracting), (tuple(lhs_batch), batch))
    return OnSource(numbers, None if out_perm == tuple(range(len(out_perm))) else out_perm)


def einsum_on_source(einsum_str: str, perm: tuple[int, ...]) -> str | None:
    """A two-operand einsum on a transposed weight as one on its source; ``None`` if its
    weight subscripts use an ellipsis or its output is implicit (left as it is)."""
    spec = einsum_str.replace(" ", "")
    if "->" not in spec or "." in spec or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    if len(rhs) != len(perm):
        return None
    letters = [""] * len(perm)
    for i, axis in enumerate(perm):
        letters[axis] = rhs[i]
    return f"{lhs},{''.join(letters)}->{out}"


# --- Which operands are a module's own weight ---------------------------------------------------


def is_own_weight(x: Any, weights: dict[str, Any]) -> bool:
    """Whether ``x`` is one of ``weights`` (a module's base weights) or a cast of one.

    Matched by identity, through unary operations under tracing (as Qwix's
    ``find_param`` does), or, for a concrete array of another dtype (a cast), by
    value: never by shape alone, which an activation may share. A quantized
    weight is always a weight (only a module's QLoRA weight is one; ``w[...]``
    copies it).
    """
    if isinstance(x, QuantizedWeight) or source_of(x) is not None:
        return True
    floats = [w for w in weights.values() if not isinstance(w, QuantizedWeight)]
    values = [_qwix_internals.unbox(w) for w in floats]
    if isinstance(x, jax.core.Tracer):
        return any(any(t is v for v in values) for t in _qwix_internals.unary_sources(x))
    if not isinstance(x, jax.Array):
        return False
    return any(x is v for v in values) or any(
        v.shape == x.shape
        and v.dtype != x.dtype
        and not isinstance(v, jax.core.Tracer)
        and bool(jax.numpy.array_equal(x, v.astype(x.dtype)))
        for v in values
    )


#: Each intercepted transposing function and how its arguments give the permutation.
PERMUTATIONS: dict[str, Callable[..., tuple[int, ...]]] = {
    "transpose": transpose_perm,
    "permute_dims": transpose_perm,
    "swapaxes": swapaxes_perm,
    "moveaxis": moveaxis_perm,
    "matrix_transpose": matrix_transpose_perm,
}


class Transposes:
    """The provider's transposing functions (a mixin of ``_qwix_bridge.PeftLoraProvider``)."""

    _targeted_here: Callable[..., Any]

    def transpose_intercepts(self) -> dict[str, Callable[..., Any]]:
        """The functions intercepted, by the name Qwix's interception replaces."""
        np_ = jax.numpy
        intercepts = {
            f"jax.numpy.{name}": self._following(name, getattr(np_, name)) for name in PERMUTATIONS
        }
        # jnp.swapaxes is a jitted function: the array method calls its own alias of it.
        lax_numpy_swapaxes = _qwix_internals.INTERCEPT_LAX_NUMPY_SWAPAXES
        intercepts[lax_numpy_swapaxes] = self._following("swapaxes", np_.swapaxes)
        return intercepts

    def _following(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        permutation = PERMUTATIONS[name]

        def follow(a: Any, *args: Any, **kwargs: Any) -> Any:
            if self._targeted_here() is not None:
                x = _qwix_internals.unbox(a) if isinstance(a, nnx.Param) else a
                module = _qwix_internals.get_current_module()
                if is_own_weight(x, _adapter_ops.base_weights(module)):
                    return transposed(x, permutation(x.ndim, *args, **kwargs))
            return original(a, *args, **kwargs)

        return follow


def astype(x: Any, dtype: Any, *args: Any, **kwargs: Any) -> Any:
    """``jnp.astype`` (and ``.astype``) that follows transposed and quantized weights."""
    if source_of(x) is not None:
        return cast(x, dtype)
    return _quantized.astype(x, dtype, *args, **kwargs)


def _array_methods() -> dict[str, Any]:
    """``.T``, ``.mT``, ``.transpose()`` and ``.swapaxes()`` for a quantized weight, as a
    ``jax.Array`` has them: each calls the ``jnp`` function, which an adapted call
    follows, and which refuses a quantized weight anywhere else (as before)."""

    def transpose(self: Any, *axes: Any) -> Any:
        if len(axes) == 1 and not isinstance(axes[0], int):
            axes = axes[0]
        return jax.numpy.transpose(self, tuple(axes) if axes else None)

    return {
        "T": property(lambda self: jax.numpy.transpose(self)),
        "mT": property(lambda self: jax.numpy.matrix_transpose(self)),
        "transpose": transpose,
        "swapaxes": lambda self, axis1, axis2: jax.numpy.swapaxes(self, axis1, axis2),
    }


_qwix_internals.add_with_aux_methods(_array_methods())
