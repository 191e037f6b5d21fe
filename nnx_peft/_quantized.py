"""A QLoRA base weight as stored in an adapted module: read, dequantized, requantized.

Qwix quantizes a targeted weight on the wrapper's sample call and stores it as a
``WithAux`` (the quantized array and how it was quantized) in place of the
``nnx.Param``. Merging, checkpoints and ``from_base_weights`` read and write a base
weight through :func:`weight_variables`, :func:`weight_value` and :func:`weight_values`,
whichever it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import qwix
from flax import nnx

from nnx_peft import _qwix_internals
from nnx_peft._errors import TileSizeError

#: The type of a quantized (QLoRA) base weight inside an adapted module.
QuantizedWeight = _qwix_internals.WithAux


def cast_quantized(weight: Any, dtype: Any) -> Any:
    """A QLoRA weight that dequantizes to ``dtype``: its scale cast, its values still quantized.

    Models cast their weight to the compute dtype before the matmul
    (``jnp.astype(w, dtype)``, ``w.astype(dtype)``; ``jnp.asarray(w, dtype)`` Qwix
    follows itself). Qwix's ``WithAux.astype`` fails on a quantized array and
    ``jnp.astype`` refuses it; this keeps the weight quantized in memory.
    """
    array = jax.tree.map(_qwix_internals.unbox, weight.array, is_leaf=_is_variable)
    return weight.replace(array=array.astype(dtype))


@dataclasses.dataclass(frozen=True)
class QuantizedTranspose:
    """A QLoRA weight transposed (``jnp.transpose(weight, perm)``), as an adapted call
    follows it (``_transposed``): its matmul runs on the stored quantized weight.

    Only its shape, dtype and casts are offered; anything else on it fails, and
    the wrap refuses the model.

    Attributes:
        weight: The quantized weight as stored (or cast).
        perm: Axis ``i`` of the transpose is axis ``perm[i]`` of ``weight``.
    """

    weight: Any  # a QuantizedWeight
    perm: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[p] for p in self.perm)

    @property
    def ndim(self) -> int:
        return len(self.perm)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    def astype(self, dtype: Any) -> QuantizedTranspose:
        """The transpose of the weight cast to ``dtype`` (still quantized)."""
        return QuantizedTranspose(cast_quantized(self.weight, dtype), self.perm)


def astype(x: Any, dtype: Any, *args: Any, **kwargs: Any) -> Any:
    """``jnp.astype`` that follows a QLoRA weight (``cast_quantized``)."""
    if isinstance(x, QuantizedWeight):
        return cast_quantized(x, dtype)
    return jax.numpy.astype(x, dtype, *args, **kwargs)


def dtype_and_boxed(param: Any) -> tuple[Any, Any]:
    """The adapters' dtype and the variable their sharding derives from (QLoRA: the qvalue)."""
    if isinstance(param, QuantizedWeight):
        return _qwix_internals.unbox(param.array.scale).dtype, param.array.qvalue
    return _qwix_internals.unbox(param).dtype, param


def float_weight(param: Any) -> jax.Array:
    """The floating-point array a product uses for ``param``: a QLoRA weight dequantized."""
    if isinstance(param, QuantizedWeight):
        unboxed = jax.tree.map(_qwix_internals.unbox, param, is_leaf=_is_variable)
        return qwix.dequantize(unboxed.array)
    return _qwix_internals.unbox(param)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def weight_variables(stored: Any) -> list[nnx.Variable[Any]]:
    """The variables holding a base weight: the ``nnx.Param`` itself, or a QLoRA weight's parts."""
    variables: list[nnx.Variable[Any]] = jax.tree.leaves(stored, is_leaf=_is_variable)
    return variables


def weight_value(stored: Any, values: Sequence[jax.Array]) -> jax.Array:
    """The floating-point weight that ``values`` of ``weight_variables(stored)`` hold.

    For a QLoRA weight this is ``qwix.dequantize`` of the quantized array, in
    the dtype of its scale: exactly the array Qwix multiplies with when the
    input is a floating-point array.
    """
    if not isinstance(stored, QuantizedWeight):
        (value,) = values
        return value
    unboxed = jax.tree.unflatten(jax.tree.structure(stored, is_leaf=_is_variable), values)
    return qwix.dequantize(unboxed.array)


def weight_values(stored: Any, value: jax.Array) -> list[jax.Array]:
    """Values for ``weight_variables(stored)`` that store the floating-point ``value``.

    For a QLoRA weight, ``value`` is quantized the way Qwix quantized the
    original (same type, channel axes, tiles and calibration), which rounds
    it to the quantization grid.
    """
    if not isinstance(stored, QuantizedWeight):
        return [value]
    how = stored.how
    quantized = qwix.quantize(
        value.astype(stored.array.scale.dtype),
        how.qtype,
        channelwise_axes=how.channelwise_axes,
        tiled_axes=how.tiled_axes,
        calibration_method=how.calibration_method,
    )
    expected: Any = jax.tree.structure(stored.array, is_leaf=_is_variable)
    if jax.tree.structure(quantized) != expected:
        raise AssertionError(f"Requantizing changed the structure of {stored.array!r}")
    return jax.tree.leaves(quantized)


def check_tile_size(rule: qwix.LoraRule, weight: Any, how: Callable[..., Any], where: str) -> None:
    """Refuses a QLoRA tile size that does not divide the tiled axis of ``weight``.

    ``how`` is Qwix's ``get_how_to_quantize`` for the product; ``where`` the module path.
    Qwix would otherwise fail deep inside its quantization.
    """
    if rule.weight_qtype is None or rule.tile_size is None:
        return
    tiled_axes = how(
        for_lhs=False,
        tile_size=rule.tile_size,
        qtype=rule.weight_qtype,
        calibration_method=rule.weight_calibration_method,
    ).tiled_axes
    for axis, tile in tiled_axes.items():
        if weight.shape[axis] % tile:
            raise TileSizeError(
                f"LoraConfig.tile_size={tile} does not divide axis {axis} (size "
                f"{weight.shape[axis]}) of the weight of shape {tuple(weight.shape)} in module "
                f"{where!r}. Choose a tile_size that divides {weight.shape[axis]}, set "
                "tile_size=None for per-channel quantization, or exclude the module."
            )
