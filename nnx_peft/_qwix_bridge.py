"""The one module that uses Qwix internals (``qwix._src``).

Why this exists: Qwix's public ``LoraProvider`` intercepts the model's matmuls,
quantizes QLoRA base weights and derives adapter shapes and shardings, and
nnx_peft keeps all of that. It replaces three decisions Qwix makes inside the
provider, which needs Qwix's private helpers:

- adapters are created as :class:`~nnx_peft.AdapterParam`, not plain
  ``nnx.LoRAParam``, so the trainable filter never picks up weights of the base;
- dropout on the adapter input is an ``nnx.Dropout`` submodule, so it follows
  ``model.train()`` / ``model.eval()`` (Qwix applies it in evaluation too) and
  costs nothing at rate 0;
- a QLoRA tile size that does not divide a weight's contracting axis, or a
  quantized convolution, is refused with a message naming the module, instead
  of failing deep inside Qwix's quantization.

If a Qwix release moves any name used here, ``tests/test_qwix_bridge.py``
fails first and says which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import qwix
from flax import nnx
from qwix._src.core import dot_general as _qwix_dot_general
from qwix._src.core import einsum as _qwix_einsum
from qwix._src.providers import lora as _qwix_lora
from qwix._src.providers import ptq as _qwix_ptq
from qwix._src.utils import flax_util as _flax_util

from nnx_peft._errors import QuantizationError, UnsupportedLayerError
from nnx_peft._variables import AdapterParam

#: Suffixes of the attributes Qwix and nnx_peft add next to an adapted weight.
LORA_A_SUFFIX = "_lora_a"
LORA_B_SUFFIX = "_lora_b"
DROPOUT_SUFFIX = "_lora_dropout"

#: The type of a quantized (QLoRA) base weight inside an adapted module.
QuantizedWeight = _qwix_ptq.WithAux

LAYOUT_SUFFIX = "_lora_layout"

@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """How an adapted weight enters its matmul: what merging needs to fold ``A @ B`` back.

    Stored on the adapted module as ``<weight>_lora_layout`` when the adapter is
    created. ``kind`` is ``'dot_general'``, ``'einsum'`` or ``'conv'``.

    Attributes:
        kind: The intercepted operation.
        scale: Factor of the update, ``alpha / rank`` of the rule that made it.
        contracting: Weight axes contracted with the input (``dot_general``).
        batch: Weight axes that are batch axes of the ``dot_general``.
        einsum_str: The three-operand einsum Qwix uses for the update
            (``'<input>,<A>,<B>-><output>'``), for ``einsum``.
    """

    kind: str
    scale: float = 1.0
    contracting: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    einsum_str: str = ""


def is_qwix_wrapped(model: nnx.Module) -> bool:
    """Whether ``model`` is an instance of a class Qwix created when wrapping."""
    return hasattr(type(model), "_unquantized_type")


def unwrapped_type(model: nnx.Module) -> type:
    """The model's class before Qwix wrapped it (the class itself if never wrapped)."""
    return getattr(type(model), "_unquantized_type", type(model))


def _module_path() -> str:
    return "/".join(map(str, _flax_util.get_current_module_path()))


class PeftLoraProvider(qwix.LoraProvider):
    """A ``qwix.LoraProvider`` creating :class:`AdapterParam` weights and mode-aware dropout."""

    def _current_rule(self, op_name: str) -> qwix.LoraRule | None:
        rule, _ = self._get_current_rule_and_op_id(op_name, repeated_call=True)
        return rule if isinstance(rule, qwix.LoraRule) else None

    def _check_tiling(self, op_name: str, rhs: Any, how: Callable[..., Any]) -> None:
        """Refuses a QLoRA tile size that does not divide the tiled axis of ``rhs``."""
        rule, _ = self._get_current_rule_and_op_id(op_name, only_rule=True)
        if rule is None or rule.weight_qtype is None or rule.tile_size is None:
            return
        if isinstance(rhs, QuantizedWeight) or _flax_util.find_param(rhs) is None:
            return  # already quantized, or not a weight
        tiled_axes = how(
            for_lhs=False,
            tile_size=rule.tile_size,
            qtype=rule.weight_qtype,
            calibration_method=rule.weight_calibration_method,
        ).tiled_axes
        for axis, tile in tiled_axes.items():
            if rhs.shape[axis] % tile:
                raise QuantizationError(
                    f"LoraConfig.tile_size={tile} does not divide axis {axis} (size "
                    f"{rhs.shape[axis]}) of the weight of shape {tuple(rhs.shape)} in module "
                    f"{_module_path()!r}. Choose a tile_size that divides {rhs.shape[axis]}, "
                    "set tile_size=None for per-channel quantization, or exclude the module."
                )

    def dot_general(
        self,
        lhs: jax.Array,
        rhs: Any,
        dimension_numbers: jax.lax.DotDimensionNumbers,
        precision: jax.lax.PrecisionLike = None,
        preferred_element_type: jax.typing.DTypeLike | None = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        """``jax.lax.dot_general`` plus the low-rank update of the weight operand."""
        self._check_tiling(
            "dot_general",
            rhs,
            lambda **kw: _qwix_dot_general.get_how_to_quantize(
                dimension_numbers=dimension_numbers, ndims=(lhs.ndim, rhs.ndim), **kw
            ),
        )
        res = _qwix_ptq.PtqProvider.dot_general(
            self,
            lhs,
            rhs,
            dimension_numbers,
            precision,
            preferred_element_type,
            out_sharding=out_sharding,
        )
        rule = self._current_rule("dot_general")
        weight_name = _flax_util.find_param(rhs, QuantizedWeight) if rule else None
        if rule is None or weight_name is None:
            return res
        (lhs_ca, rhs_ca), (lhs_ba, rhs_ba) = dimension_numbers
        rhs_ra = tuple(i for i in range(rhs.ndim) if i not in rhs_ca and i not in rhs_ba)
        contract_shape = tuple(rhs.shape[i] for i in rhs_ca)
        batch_shape = tuple(rhs.shape[i] for i in rhs_ba)
        remain_shape = tuple(rhs.shape[i] for i in rhs_ra)
        a_shape, a_transpose, b_shape, b_transpose = _qwix_lora._create_lora_layer_shapes(
            rhs_ca, rhs_ba, rhs_ra, contract_shape, batch_shape, remain_shape, rule.rank
        )
        lora_a, lora_b = _get_or_create_adapter(
            weight_name, rule, a_shape, b_shape, a_transpose, b_transpose,
            LoraLayout("dot_general", contracting=tuple(rhs_ca), batch=tuple(rhs_ba)),
        )
        delta = _qwix_lora._compute_lora_delta(
            _dropout(weight_name, rule, lhs),
            lora_a,
            lora_b,
            lhs_ca,
            lhs_ba,
            contract_shape,
            batch_shape,
            remain_shape,
            rule.rank,
            precision=precision,
        )
        return res + delta * _scale(rule)

    def einsum(self, einsum_str: str, *operands: Any, **kwargs: Any) -> jax.Array:
        """``jnp.einsum`` plus the low-rank update of the weight operand."""
        if len(operands) == 2:
            lhs, rhs = operands
            self._check_tiling(
                "einsum",
                rhs,
                lambda **kw: _qwix_einsum.get_how_to_quantize(
                    einsum_str=einsum_str, ndims=(lhs.ndim, rhs.ndim), **kw
                ),
            )
        res = _qwix_ptq.PtqProvider.einsum(self, einsum_str, *operands, **kwargs)
        rule = self._current_rule("einsum")
        if rule is None:
            return res
        if len(operands) != 2:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} is targeted but calls einsum {einsum_str!r} with "
                f"{len(operands)} operands; adapters support two-operand einsums only. "
                "Exclude this module with LoraConfig.exclude."
            )
        lhs, rhs = operands
        weight_name = _flax_util.find_param(rhs, QuantizedWeight)
        if weight_name is None:
            return res
        a_shape, b_shape, lora_einsum_str, a_transpose, b_transpose = (
            _qwix_lora._parse_einsum_str_for_lora(lhs.shape, rhs.shape, einsum_str, rule.rank)
        )
        lora_a, lora_b = _get_or_create_adapter(
            weight_name, rule, a_shape, b_shape, a_transpose, b_transpose,
            LoraLayout("einsum", einsum_str=lora_einsum_str),
        )
        delta = jax.numpy.einsum(
            lora_einsum_str, _dropout(weight_name, rule, lhs), lora_a, lora_b, **kwargs
        )
        return res + delta * _scale(rule)

    def conv_general_dilated(
        self,
        lhs: jax.Array,
        rhs: Any,
        window_strides: Sequence[int],
        padding: str | Sequence[tuple[int, int]],
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        batch_group_count: int = 1,
        precision: jax.lax.PrecisionLike = None,
        preferred_element_type: jax.typing.DTypeLike | None = None,
        out_sharding: Any = None,
    ) -> jax.Array:
        """``jax.lax.conv_general_dilated`` plus the low-rank update of the kernel."""
        rule, _ = self._get_current_rule_and_op_id("conv_general_dilated", only_rule=True)
        if isinstance(rule, qwix.LoraRule) and rule.weight_qtype is not None:
            raise QuantizationError(
                f"Module {_module_path()!r} is a convolution and LoraConfig.weight_qtype="
                f"{rule.weight_qtype!r}; Qwix quantizes convolution kernels only together with "
                "their activations, which QLoRA does not do. Exclude convolutions with "
                "LoraConfig.exclude, or use weight_qtype=None."
            )
        conv_kwargs = dict(
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        res = _qwix_ptq.PtqProvider.conv_general_dilated(
            self,
            lhs,
            rhs,
            window_strides,
            padding,
            dimension_numbers=dimension_numbers,
            out_sharding=out_sharding,
            **conv_kwargs,
        )
        rule = self._current_rule("conv_general_dilated")
        weight_name = _flax_util.find_param(rhs, QuantizedWeight) if rule else None
        if rule is None or weight_name is None:
            return res
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if numbers.rhs_spec[0] != rhs.ndim - 1 or numbers.out_spec[1] != lhs.ndim - 1:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} runs a convolution whose output features are not "
                f"the last axis of kernel and output ({numbers}); adapters need the NNX layout "
                "(features last). Exclude this module with LoraConfig.exclude."
            )
        lora_a, lora_b = _get_or_create_adapter(
            weight_name,
            rule,
            (*rhs.shape[:-1], rule.rank),
            (rule.rank, rhs.shape[-1]),
            (*range(rhs.ndim - 1), None),
            (None, rhs.ndim - 1),
            LoraLayout("conv"),
        )
        projected = jax.lax.conv_general_dilated(
            _dropout(weight_name, rule, lhs),
            lora_a,
            window_strides,
            padding,
            dimension_numbers=numbers,
            **conv_kwargs,
        )
        return res + (projected @ lora_b) * _scale(rule)


def _scale(rule: qwix.LoraRule) -> float:
    """The factor of the low-rank update."""
    return rule.alpha / rule.rank


def _dropout(weight_name: str, rule: qwix.LoraRule, lhs: jax.Array) -> jax.Array:
    """Applies the adapter's dropout submodule, creating it on the first (init) pass."""
    if rule.dropout == 0:
        return lhs
    module = _flax_util.get_current_module()
    name = weight_name + DROPOUT_SUFFIX
    layer = getattr(module, name, None)
    if layer is None:
        layer = nnx.Dropout(rule.dropout, rngs=module.qwix_rngs)
        setattr(module, name, layer)
    return layer(lhs)


def _canonical_sharding(boxed: Any) -> jax.sharding.NamedSharding | None:
    """The base weight's ``NamedSharding`` with its spec padded to full rank, if any."""
    value = _flax_util.unbox(boxed)
    sharding = getattr(value, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    return sharding.update(spec=sharding.spec + (None,) * (value.ndim - len(sharding.spec)))


def _get_or_create_adapter(
    name: str,
    rule: qwix.LoraRule,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_transpose: Sequence[int | None],
    b_transpose: Sequence[int | None],
    layout: LoraLayout,
) -> tuple[jax.Array, jax.Array]:
    """Qwix's ``_get_or_create_lora_params`` for NNX, creating :class:`AdapterParam`.

    Also records ``layout`` as ``<name>_lora_layout`` on the module.
    """
    module = _flax_util.get_current_module()
    lora_a = getattr(module, name + LORA_A_SUFFIX, None)
    lora_b = getattr(module, name + LORA_B_SUFFIX, None)
    if lora_a is not None and lora_b is not None:
        return _flax_util.unbox(lora_a), _flax_util.unbox(lora_b)

    setattr(module, name + LAYOUT_SUFFIX, dataclasses.replace(layout, scale=_scale(rule)))
    param = getattr(module, name)
    if isinstance(param, QuantizedWeight):
        dtype, boxed = _flax_util.unbox(param.array.scale).dtype, param.array.qvalue
    else:
        dtype, boxed = _flax_util.unbox(param).dtype, param
    sharding = _canonical_sharding(boxed)

    def init(initializer: Callable[..., jax.Array], shape: tuple[int, ...], transpose: Any):
        def create(rng: jax.Array) -> Any:
            value = initializer(rng, shape, dtype)
            if sharding is not None:
                spec = _flax_util.update_sharding(sharding.spec, transpose=transpose)
                value = jax.device_put(value, sharding.update(spec=spec))
            value = _flax_util.update_boxed(boxed, value=value, transpose=transpose)
            if isinstance(value, nnx.Variable):
                return nnx.VariableMetadata(value.get_value(), metadata=value.get_metadata())
            return value

        return create

    lora_a = _flax_util.get_or_create_param(
        name + LORA_A_SUFFIX,
        init(rule.lora_a_initializer, a_shape, a_transpose),
        nnx_param_type=AdapterParam,
        need_rng=True,
    )
    lora_b = _flax_util.get_or_create_param(
        name + LORA_B_SUFFIX,
        init(rule.lora_b_initializer, b_shape, b_transpose),
        nnx_param_type=AdapterParam,
        need_rng=True,
    )
    return lora_a, lora_b
