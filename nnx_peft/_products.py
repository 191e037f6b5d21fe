"""The products nnx_peft adapts, each as a ``dot_general`` or an einsum, with its factors' shapes.

Raw products on a weight (``x @ w``, ``jnp.matmul``, ``jnp.tensordot``, ``jnp.inner``,
``jax.lax.dot``) are adapted as the ``dot_general`` they compute; these functions give
its dimension numbers, or ``None`` for a product that broadcasts batch axes (which no
adapter layout describes). Then, for a ``dot_general`` or a two-operand einsum on a
weight, the shapes of ``A`` and ``B`` and the weight axes each of their axes stands for
(which the adapters' shardings follow), laid out as Qwix lays out its own adapters.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import numpy as np

from nnx_peft import _qwix_internals
from nnx_peft._quantized import QuantizedTranspose, QuantizedWeight

Dims = jax.lax.DotDimensionNumbers


def as_operand(x: Any) -> Any:
    """``x`` as an operand of ``@`` (an ``nnx.Variable`` unwrapped), or ``None`` if it is none."""
    convert = getattr(x, "__jax_array__", None)
    if convert is not None:
        x = convert()
    if isinstance(
        x, jax.Array | QuantizedWeight | QuantizedTranspose | np.ndarray | int | float | complex
    ):
        return x
    return None


def matmul_dims(
    a_ndim: int, b_ndim: int, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> Dims | None:
    """``jnp.matmul``'s contraction as dimension numbers, or ``None`` if it broadcasts."""
    if a_ndim == 0 or b_ndim == 0:
        return None
    if b_ndim <= 2:
        return (((a_ndim - 1,), (0,)), ((), ()))
    if a_ndim == b_ndim and a_shape[:-2] == b_shape[:-2]:
        batch = tuple(range(a_ndim - 2))
        return (((a_ndim - 1,), (b_ndim - 2,)), (batch, batch))
    return None


def tensordot_dims(a_ndim: int, b_ndim: int, axes: Any) -> Dims:
    """``jnp.tensordot(a, b, axes)`` as dimension numbers (its output order is the same)."""
    if isinstance(axes, int):
        contract = (tuple(range(a_ndim - axes, a_ndim)), tuple(range(axes)))
    else:
        a_axes, b_axes = axes
        a_axes = (a_axes,) if isinstance(a_axes, int) else tuple(a_axes)
        b_axes = (b_axes,) if isinstance(b_axes, int) else tuple(b_axes)
        contract = (tuple(i % a_ndim for i in a_axes), tuple(i % b_ndim for i in b_axes))
    return (contract, ((), ()))


def last_axes_dims(a_ndim: int, b_ndim: int, b_axis: int) -> Dims | None:
    """The contraction of ``a``'s last axis with axis ``b_axis`` of ``b`` (``jnp.inner``:
    ``-1``; ``jax.lax.dot``: ``0``), or ``None`` for a scalar operand."""
    if 0 in (a_ndim, b_ndim):
        return None
    return (((a_ndim - 1,), (b_axis % b_ndim,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class FactorShapes:
    """The shapes of an adapter's factors and the weight axes each of their axes stands for.

    Attributes:
        a: Shape of ``A``.
        b: Shape of ``B``.
        a_groups: Per axis of ``A``, the weight axes it stands for (``None``: the rank).
        b_groups: The same for ``B``.
    """

    a: tuple[int, ...]
    b: tuple[int, ...]
    a_groups: tuple[Any, ...]
    b_groups: tuple[Any, ...]


def dot_general_factors(weight_shape: tuple[int, ...], dims: Dims, rank: int) -> FactorShapes:
    """``A`` is ``(*batch, prod(contracting), rank)`` and ``B`` ``(*batch, rank, prod(kept))``.

    Each flattened axis stands for all the weight axes it flattens (Qwix's own
    adapters keep only the first for their sharding; see ``_sharding``).
    """
    (_, contracting), (_, batch) = dims
    kept = tuple(i for i in range(len(weight_shape)) if i not in contracting and i not in batch)
    batch_shape = tuple(weight_shape[i] for i in batch)
    return FactorShapes(
        a=(*batch_shape, math.prod(weight_shape[i] for i in contracting), rank),
        b=(*batch_shape, rank, math.prod(weight_shape[i] for i in kept)),
        a_groups=(*batch, tuple(contracting), None),
        b_groups=(*batch, None, kept),
    )


def einsum_factors(
    lhs_ndim: int, weight_shape: tuple[int, ...], einsum_str: str, rank: int
) -> tuple[FactorShapes, str, Any]:
    """The factors of the weight of ``einsum_str``, the update's three-operand einsum, and
    Qwix's parse of ``einsum_str``.

    ``A`` has the weight's contracting and batch axes (those the input shares) and
    the rank last; ``B`` the rank first and the weight's other axes; the update is
    ``einsum('<x>,<A>,<B>-><out>', x, A, B)``, with ``r`` as the rank's letter
    unless the einsum uses it (as Qwix writes it).
    """
    info = _qwix_internals.EinsumInfo.parse(einsum_str, ndims=(lhs_ndim, len(weight_shape)))
    used = set(info.lhs) | set(info.rhs)
    letter = "r" if "r" not in used else sorted(set(string.ascii_letters) - used)[0]
    shared = set(info.lhs) & set(info.rhs)
    a_axes = [i for i, c in enumerate(info.rhs) if c in shared]
    b_axes = [i for i, c in enumerate(info.rhs) if c not in shared]
    a_str = "".join(info.rhs[i] for i in a_axes) + letter
    b_str = letter + "".join(info.rhs[i] for i in b_axes)
    shapes = FactorShapes(
        a=(*(weight_shape[i] for i in a_axes), rank),
        b=(rank, *(weight_shape[i] for i in b_axes)),
        a_groups=(*a_axes, None),
        b_groups=(None, *b_axes),
    )
    return shapes, f"{info.lhs},{a_str},{b_str}->{info.out}", info


def conv_factors(kernel_shape: tuple[int, ...], rank: int) -> FactorShapes:
    """A convolution's ``A`` has the kernel's window and input features and the rank last,
    ``B`` is ``(rank, out_features)``: the kernel in the NNX layout, features last."""
    ndim = len(kernel_shape)
    return FactorShapes(
        a=(*kernel_shape[:-1], rank),
        b=(rank, kernel_shape[-1]),
        a_groups=(*range(ndim - 1), None),
        b_groups=(None, ndim - 1),
    )
