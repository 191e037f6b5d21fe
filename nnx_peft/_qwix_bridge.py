"""The one module that uses Qwix internals (``qwix._src``).

Why this exists: Qwix's public ``LoraProvider`` intercepts the model's matmuls,
quantizes QLoRA base weights and derives adapter shapes and shardings, and
nnx_peft keeps all of that. It replaces these decisions Qwix makes inside the
provider, which needs Qwix's private helpers:

- adapters are created as :class:`~nnx_peft.AdapterParam`, not plain
  ``nnx.LoRAParam``, so the trainable filter never picks up weights of the base;
- dropout on the adapter input is an ``nnx.Dropout`` submodule, so it follows
  ``model.train()`` / ``model.eval()`` (Qwix applies it in evaluation too) and
  costs nothing at rate 0;
- a QLoRA tile size that does not divide a weight's contracting axis, or a
  quantized convolution, is refused with a message naming the module, instead
  of failing deep inside Qwix's quantization;
- the weight operand of a matmul is looked up among the base weights only
  (Qwix's lookup by shape also counts the adapters, and silently skips the
  update when an adapter factor has the weight's shape);
- each adapted weight has an :class:`AdapterState`, a static attribute the
  provider reads on every call: it adds the update only while ``ACTIVE``, so
  adapters can be disabled, or merged into the base weight, without a second
  copy of the model and without breaking ``nnx.jit`` (a state change changes
  the graph definition, so jitted functions retrace).

It also records, per adapted weight, the :class:`LoraLayout` merging needs,
and holds the helpers that read, dequantize and requantize a QLoRA base
weight and that undo what ``qwix.apply_lora_to_model`` did to the module tree.

If a Qwix release moves any name used here, ``tests/test_qwix_bridge.py``
(and, for the names merging reads, ``tests/test_merging.py``) fails first and
says which.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import qwix
from flax import nnx
from jax.custom_derivatives import SymbolicZero
from qwix._src.core import dot_general as _qwix_dot_general
from qwix._src.core import einsum as _qwix_einsum
from qwix._src.core import einsum_info as _qwix_einsum_info
from qwix._src.providers import lora as _qwix_lora
from qwix._src.providers import ptq as _qwix_ptq
from qwix._src.utils import flax_util as _flax_util

from nnx_peft._errors import AdapterStateError, QuantizationError, UnsupportedLayerError
from nnx_peft._variables import AdapterParam

#: Suffixes of the attributes Qwix and nnx_peft add next to an adapted weight.
LORA_A_SUFFIX = "_lora_a"
LORA_B_SUFFIX = "_lora_b"
DROPOUT_SUFFIX = "_lora_dropout"

#: The type of a quantized (QLoRA) base weight inside an adapted module.
QuantizedWeight = _qwix_ptq.WithAux

LAYOUT_SUFFIX = "_lora_layout"
STATE_SUFFIX = "_lora_state"

#: Qwix's own record of the update einsum (its provider sets it; ours does not).
_QWIX_EINSUM_STR_SUFFIX = "_lora_einsum_str"
#: Attributes ``qwix.apply_lora_to_model`` sets on every module of the model.
_QWIX_MODULE_ATTRIBUTES = ("qwix_path", "disable_quant_stats_update", "qwix_rngs")


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
        weight_str: Subscripts of the weight operand in its own axis order, for
            ``einsum`` (the update's einsum string does not keep that order).
        feature_group_count: ``feature_group_count`` of the convolution.
        batch_group_count: ``batch_group_count`` of the convolution.
        operand_is_weight: Whether the matmul's operand was the stored weight
            itself (possibly cast). ``False`` when the module transformed it
            first (transposed, flipped, masked): the update then applies to
            that transform, and cannot be folded into the stored weight.
    """

    kind: str
    scale: float = 1.0
    contracting: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    einsum_str: str = ""
    weight_str: str = ""
    feature_group_count: int = 1
    batch_group_count: int = 1
    operand_is_weight: bool = True


class AdapterState(enum.Enum):
    """What the provider does with one adapter on each forward pass.

    Kept per adapted weight as the static attribute ``<weight>_lora_state``
    (absent means ``ACTIVE``). Being static, it is part of the NNX graph
    definition: ``nnx.jit`` retraces when it changes instead of reusing a
    trace made in another state.
    """

    #: Add the low-rank update to the output.
    ACTIVE = "active"
    #: Skip the update: the module computes what the base model computes.
    DISABLED = "disabled"
    #: Skip the update, which is already folded into the base weight.
    #: Differentiating with respect to the adapters raises AdapterStateError.
    MERGED = "merged"


def adapter_state(module: nnx.Module, weight: str) -> AdapterState:
    """The state of the adapter of ``module.<weight>``."""
    state: AdapterState = getattr(module, weight + STATE_SUFFIX, AdapterState.ACTIVE)
    return state


def set_adapter_state(module: nnx.Module, weight: str, state: AdapterState) -> None:
    """Sets the state of the adapter of ``module.<weight>``.

    ``ACTIVE`` removes the attribute, so a model returns to the very graph
    definition it had before (and ``nnx.jit`` finds its earlier trace).
    """
    name = weight + STATE_SUFFIX
    if state is AdapterState.ACTIVE:
        if name in vars(module):
            delattr(module, name)
    else:
        setattr(module, name, state)


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
        weight_name = _find_weight(rhs) if rule else None
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
            weight_name,
            rule,
            a_shape,
            b_shape,
            a_transpose,
            b_transpose,
            LoraLayout("dot_general", contracting=tuple(rhs_ca), batch=tuple(rhs_ba)),
            rhs,
        )

        def update() -> jax.Array:
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
            return delta * _scale(rule)

        return _add_update(res, weight_name, lora_a, lora_b, update)

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
        weight_name = _find_weight(rhs)
        if weight_name is None:
            return res
        a_shape, b_shape, lora_einsum_str, a_transpose, b_transpose = (
            _qwix_lora._parse_einsum_str_for_lora(lhs.shape, rhs.shape, einsum_str, rule.rank)
        )
        weight_str = _qwix_einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim)).rhs
        lora_a, lora_b = _get_or_create_adapter(
            weight_name,
            rule,
            a_shape,
            b_shape,
            a_transpose,
            b_transpose,
            LoraLayout("einsum", einsum_str=lora_einsum_str, weight_str=weight_str),
            rhs,
        )

        def update() -> jax.Array:
            delta = jax.numpy.einsum(
                lora_einsum_str, _dropout(weight_name, rule, lhs), lora_a, lora_b, **kwargs
            )
            return delta * _scale(rule)

        return _add_update(res, weight_name, lora_a, lora_b, update)

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
        conv_kwargs: dict[str, Any] = dict(
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
        weight_name = _find_weight(rhs) if rule else None
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
            LoraLayout(
                "conv",
                feature_group_count=feature_group_count,
                batch_group_count=batch_group_count,
            ),
            rhs,
        )

        def update() -> jax.Array:
            projected = jax.lax.conv_general_dilated(
                _dropout(weight_name, rule, lhs),
                lora_a,
                window_strides,
                padding,
                dimension_numbers=numbers,
                **conv_kwargs,
            )
            return (projected @ lora_b) * _scale(rule)

        return _add_update(res, weight_name, lora_a, lora_b, update)


def _find_weight(operand: Any) -> str | None:
    """The name of the current module's base weight that ``operand`` is, or ``None``.

    Qwix's ``find_param`` matches by identity, then (under tracing) through
    unary operations, and otherwise by shape among all of the module's
    parameters, adapters included. When an adapter factor has the weight's
    shape (``rank == out_features`` in a Linear) that last match is ambiguous:
    Qwix returns ``None``, silently skipping the update (always for QLoRA,
    whose weight reaches the matmul as a copy; in eager mode for a weight cast
    to the compute dtype), or raises. An adapter is never the weight, so the
    shape match is redone among the base weights only.
    """
    try:
        name = _flax_util.find_param(operand, QuantizedWeight)
    except ValueError as err:
        if "Multiple candidate params" not in str(err):
            raise
        name = None
    module = _flax_util.get_current_module()
    if name is not None and not isinstance(getattr(module, name), AdapterParam):
        return name
    same_shape = [
        candidate
        for candidate, value in vars(module).items()
        if isinstance(value, QuantizedWeight | nnx.Param)
        and not isinstance(value, AdapterParam)
        and tuple(value.shape) == tuple(operand.shape)
    ]
    return same_shape[0] if len(same_shape) == 1 else None


def _scale(rule: qwix.LoraRule) -> float:
    """The factor of the low-rank update."""
    return rule.alpha / rule.rank


def _add_update(
    res: jax.Array,
    weight_name: str,
    lora_a: jax.Array,
    lora_b: jax.Array,
    update: Callable[[], jax.Array],
) -> jax.Array:
    """``res`` plus the scaled update, as the adapter's :class:`AdapterState` asks."""
    state = adapter_state(_flax_util.get_current_module(), weight_name)
    if state is AdapterState.ACTIVE:
        return res + update()
    if state is AdapterState.MERGED:
        return _refuse_adapter_gradients(_module_path(), res, lora_a, lora_b)
    return res


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _refuse_adapter_gradients(
    module_path: str, res: jax.Array, lora_a: jax.Array, lora_b: jax.Array
) -> jax.Array:
    """Returns ``res``; differentiating it with respect to the adapters raises.

    A merged adapter is not used by the forward pass, so its gradient would be
    silently zero: a training step would change nothing, or only apply weight
    decay to adapters already folded into the weights. Tracing the derivative
    fails loudly instead. Gradients with respect to anything else (inputs,
    base weights) pass through, and compiled forward passes contain no trace of
    this function.
    """
    del module_path, lora_a, lora_b
    return res


def _refuse_adapter_gradients_jvp(
    module_path: str, primals: tuple[jax.Array, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, Any]:
    _, lora_a_dot, lora_b_dot = tangents
    if not (isinstance(lora_a_dot, SymbolicZero) and isinstance(lora_b_dot, SymbolicZero)):
        raise AdapterStateError(
            f"A gradient with respect to the adapters of module {module_path!r} was "
            "requested while they are merged into the base weights (merge_adapter()); a "
            "merged adapter is not used by the forward pass, so its gradient would be zero. "
            "Call model.unmerge_adapter() before training, and merge_adapter() again after."
        )
    res_dot = tangents[0]
    if isinstance(res_dot, SymbolicZero):
        res_dot = jax.numpy.zeros_like(primals[0])
    return primals[0], res_dot


_refuse_adapter_gradients.defjvp(_refuse_adapter_gradients_jvp, symbolic_zeros=True)


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
    operand: Any,
) -> tuple[jax.Array, jax.Array]:
    """Qwix's ``_get_or_create_lora_params`` for NNX, creating :class:`AdapterParam`.

    Also records ``layout`` as ``<name>_lora_layout`` on the module, completed
    with the rule's scale and whether ``operand`` (the matmul's weight
    operand) is the stored weight.
    """
    module = _flax_util.get_current_module()
    lora_a = getattr(module, name + LORA_A_SUFFIX, None)
    lora_b = getattr(module, name + LORA_B_SUFFIX, None)
    if lora_a is not None and lora_b is not None:
        return _flax_util.unbox(lora_a), _flax_util.unbox(lora_b)

    param = getattr(module, name)
    layout = dataclasses.replace(
        layout, scale=_scale(rule), operand_is_weight=_is_stored_weight(operand, param)
    )
    setattr(module, name + LAYOUT_SUFFIX, layout)
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


def _is_stored_weight(operand: Any, param: Any) -> bool:
    """Whether a matmul's weight operand is ``param`` itself, possibly cast to another dtype.

    Qwix matches an operand to a weight by identity, through unary operations
    or, failing both, by shape alone; so a transposed square kernel, a flipped
    one (``nnx.ConvTranspose``) or a masked one (``nnx.Conv(mask=...)``) gets an
    adapter too, whose update then applies to the transform. The sample call
    runs eagerly, so the values can be compared; under tracing (a model that
    jits or scans inside ``__call__``) they cannot, and Qwix's match is trusted.
    """
    if isinstance(param, QuantizedWeight):
        return True  # Qwix hands the quantized weight itself to the matmul
    value = _flax_util.unbox(param)
    if isinstance(operand, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return True
    return operand.shape == value.shape and bool(
        np.array_equal(np.asarray(operand), np.asarray(value.astype(operand.dtype)))
    )


#: Attributes next to an adapted weight that belong to its adapter.
ADAPTER_SUFFIXES = (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LAYOUT_SUFFIX,
    STATE_SUFFIX,
    DROPOUT_SUFFIX,
    _QWIX_EINSUM_STR_SUFFIX,
)


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


def unwrap(model: nnx.Module) -> None:
    """Undoes, in place, what ``qwix.apply_lora_to_model`` did to the module tree.

    Removes the attributes Qwix set on every module and gives the root module
    its original class back, so calls are no longer intercepted. Adapters are
    left alone; remove them first.
    """
    for _, module in nnx.iter_modules(model):
        for name in _QWIX_MODULE_ATTRIBUTES:
            if name in vars(module):
                delattr(module, name)
    object.__setattr__(model, "__class__", unwrapped_type(model))
    # Qwix assigned its class through nnx's __setattr__, which also recorded
    # `__class__` as a static attribute; drop it so that the graph definition
    # is the base model's again.
    nodes = vars(model)["_pytree__nodes"]
    if "__class__" in nodes:
        kept = {name: is_node for name, is_node in nodes.items() if name != "__class__"}
        object.__setattr__(model, "_pytree__nodes", type(nodes)(kept))
