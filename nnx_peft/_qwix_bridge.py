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
  the graph definition, so jitted functions retrace);
- each module's rank, scale, update variant (LoRA or DoRA) and initializer
  come from an ``AdapterPlan`` (``_variants``), resolved per module path; the
  variant decides how the update enters the output, and its maths lives there
  and in ``_factors``, not here. Only creating the extra arrays (DoRA's
  magnitude) and replacing a weight by its PiSSA/OLoRA residual happen here;
- the update itself is computed by ``_delta.low_rank_update`` as two matrix
  products over merged axes, which XLA differentiates without the transposed
  copies Qwix's formulation costs; a call that creates an adapter skips its
  (zero) update;
- a recording provider lists the sample call's matmuls and output sizes,
  and a dry run (under ``jax.eval_shape``) looks weights up as an eager call
  does, for ``target='all-linear'`` and ``inspect_targets``.

It also records, per adapted weight, the :class:`LoraLayout` merging needs,
and holds the helpers that read, dequantize and requantize a QLoRA base
weight and that undo what ``qwix.apply_lora_to_model`` did to the module tree.

If a Qwix release moves any name used here, ``tests/test_qwix_bridge.py``
(and, for the names merging reads, ``tests/test_merging.py``) fails first and
says which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.errors
import jax
import qwix
from flax import nnx
from qwix._src.core import dot_general as _qwix_dot_general
from qwix._src.core import einsum as _qwix_einsum
from qwix._src.core import einsum_info as _qwix_einsum_info
from qwix._src.providers import lora as _qwix_lora
from qwix._src.providers import ptq as _qwix_ptq
from qwix._src.utils import flax_util as _flax_util

from nnx_peft import _delta, _factors, _sharding
from nnx_peft._adapter_state import (
    STATE_SUFFIX,
    AdapterState,
    adapter_state,
    refuse_adapter_gradients,
)
from nnx_peft._errors import QuantizationError, UnsupportedLayerError
from nnx_peft._factors import Subscripts
from nnx_peft._layout import CallRecord, LoraLayout
from nnx_peft._variables import AdapterParam, InitialFactor
from nnx_peft._variants import MAGNITUDE_SUFFIX, AdapterPlan, AdapterSpec, check_supported

#: Suffixes of the attributes Qwix and nnx_peft add next to an adapted weight.
LORA_A_SUFFIX = "_lora_a"
LORA_B_SUFFIX = "_lora_b"
DROPOUT_SUFFIX = "_lora_dropout"

#: The type of a quantized (QLoRA) base weight inside an adapted module.
QuantizedWeight = _qwix_ptq.WithAux

LAYOUT_SUFFIX = "_lora_layout"
INITIAL_A_SUFFIX = "_lora_initial_a"
INITIAL_B_SUFFIX = "_lora_initial_b"

#: Qwix's own record of the update einsum (its provider sets it; ours does not).
_QWIX_EINSUM_STR_SUFFIX = "_lora_einsum_str"
#: Attributes ``qwix.apply_lora_to_model`` sets on every module of the model.
_QWIX_MODULE_ATTRIBUTES = ("qwix_path", "disable_quant_stats_update", "qwix_rngs")


def is_qwix_wrapped(model: nnx.Module) -> bool:
    """Whether ``model`` is an instance of a class Qwix created when wrapping."""
    return hasattr(type(model), "_unquantized_type")


def unwrapped_type(model: nnx.Module) -> type:
    """The model's class before Qwix wrapped it (the class itself if never wrapped)."""
    return getattr(type(model), "_unquantized_type", type(model))


def _module_path() -> str:
    return "/".join(map(str, _flax_util.get_current_module_path()))


class PeftLoraProvider(qwix.LoraProvider):
    """A ``qwix.LoraProvider`` creating :class:`AdapterParam` weights and mode-aware dropout.

    Args:
        rules: The Qwix rules (which modules; QLoRA settings).
        plan: Each module path's rank, scale, variant and initializer.
        record: If given, filled with the intercepted matmuls, in call order,
            and the sizes of the model's outputs (the ``'all-linear'`` target
            finds the output head this way).
        dry_run: The sample call is traced (``jax.eval_shape``) to find what an
            eager call would create: weights are then looked up as in an eager
            call, by identity and then by shape, not through traced unary
            operations (which would also find, say, a transposed weight).
    """

    def __init__(
        self,
        rules: Sequence[qwix.QuantizationRule],
        plan: AdapterPlan,
        *,
        record: CallRecord | None = None,
        dry_run: bool = False,
    ) -> None:
        super().__init__(rules)
        self._plan = plan
        self._record = record
        self._dry_run = dry_run

    def _note(self, weight_name: str | None, res: jax.Array) -> None:
        if self._record is not None:
            self._record.ops.append((_module_path(), weight_name, res.size))

    def process_model_output(self, method_name: str, model_output: Any) -> Any:
        """Records the output sizes, then lets Qwix end its first call."""
        if self._record is not None:
            leaves = jax.tree.leaves(model_output)
            self._record.output_sizes = [x.size for x in leaves if hasattr(x, "size")]
        return super().process_model_output(method_name, model_output)

    def _spec(self) -> AdapterSpec:
        return self._plan.spec(_module_path())

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
        weight_name = _find_weight(rhs, self._dry_run) if rule else None
        if rule is not None:
            self._note(weight_name, res)
        if rule is None or weight_name is None:
            return res
        spec = self._spec()
        (_, rhs_ca), (_, rhs_ba) = dimension_numbers
        rhs_ra = tuple(i for i in range(rhs.ndim) if i not in rhs_ca and i not in rhs_ba)
        contract_shape = tuple(rhs.shape[i] for i in rhs_ca)
        batch_shape = tuple(rhs.shape[i] for i in rhs_ba)
        remain_shape = tuple(rhs.shape[i] for i in rhs_ra)
        a_shape, _, b_shape, _ = _qwix_lora._create_lora_layer_shapes(
            rhs_ca, rhs_ba, rhs_ra, contract_shape, batch_shape, remain_shape, spec.rank
        )
        sub = _factors.dot_general_subscripts(rhs.ndim, tuple(rhs_ca), tuple(rhs_ba))
        # The weight axes each adapter axis stands for. Qwix's own transposes keep
        # only the first of several flattened axes (see nnx_peft/_sharding.py).
        a_transpose = (*rhs_ba, tuple(rhs_ca), None)
        b_transpose = (*rhs_ba, None, tuple(rhs_ra))
        adapter = _adapter(
            weight_name,
            rule,
            spec,
            a_shape,
            b_shape,
            a_transpose,
            b_transpose,
            LoraLayout("dot_general", contracting=tuple(rhs_ca), batch=tuple(rhs_ba)),
            sub,
            rhs,
        )

        update_sub = _delta.dot_general_update_subscripts(sub, lhs.ndim, dimension_numbers)
        weight_shape = tuple(rhs.shape)

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            a, b = sub.views(lora_a, lora_b, weight_shape)
            return _delta.low_rank_update(
                x, a, b, update_sub, scale=spec.scale, precision=precision
            )

        template = _factors.dot_general_output(sub, res.ndim)
        return _add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)

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
        weight_name = _find_weight(rhs, self._dry_run)
        self._note(weight_name, res)
        if weight_name is None:
            return res
        spec = self._spec()
        a_shape, b_shape, lora_einsum_str, a_transpose, b_transpose = (
            _qwix_lora._parse_einsum_str_for_lora(lhs.shape, rhs.shape, einsum_str, spec.rank)
        )
        info = _qwix_einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs.ndim, rhs.ndim))
        sub = _factors.einsum_subscripts(lora_einsum_str, info.rhs, info.out)
        adapter = _adapter(
            weight_name,
            rule,
            spec,
            a_shape,
            b_shape,
            a_transpose,
            b_transpose,
            LoraLayout("einsum", einsum_str=lora_einsum_str, weight_str=info.rhs),
            sub,
            rhs,
        )

        operand_strs, out_str = lora_einsum_str.split("->")
        x_str, a_str, b_str = operand_strs.split(",")
        update_sub = _delta.UpdateSubscripts(x_str, a_str, b_str, out_str)

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            return _delta.low_rank_update(
                x,
                lora_a,
                lora_b,
                update_sub,
                scale=spec.scale,
                precision=kwargs.get("precision"),
                preferred_element_type=kwargs.get("preferred_element_type"),
                out_sharding=kwargs.get("out_sharding"),
            )

        template = _factors.einsum_output(sub, info.out)
        return _add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)

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
        weight_name = _find_weight(rhs, self._dry_run) if rule else None
        if rule is not None:
            self._note(weight_name, res)
        if rule is None or weight_name is None:
            return res
        spec = self._spec()
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        if numbers.rhs_spec[0] != rhs.ndim - 1 or numbers.out_spec[1] != lhs.ndim - 1:
            raise UnsupportedLayerError(
                f"Module {_module_path()!r} runs a convolution whose output features are not "
                f"the last axis of kernel and output ({numbers}); adapters need the NNX layout "
                "(features last). Exclude this module with LoraConfig.exclude."
            )
        sub = _factors.conv_subscripts(rhs.ndim)
        adapter = _adapter(
            weight_name,
            rule,
            spec,
            (*rhs.shape[:-1], spec.rank),
            (spec.rank, rhs.shape[-1]),
            (*range(rhs.ndim - 1), None),
            (None, rhs.ndim - 1),
            LoraLayout(
                "conv",
                feature_group_count=feature_group_count,
                batch_group_count=batch_group_count,
            ),
            sub,
            rhs,
        )

        def update(x: jax.Array, lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
            projected = jax.lax.conv_general_dilated(
                x, lora_a, window_strides, padding, dimension_numbers=numbers, **conv_kwargs
            )
            return (projected @ lora_b) * spec.scale

        template = _factors.conv_output(sub, res.ndim)
        return _add_update(res, weight_name, rule, lhs, rhs, adapter, update, template)


def _find_weight(operand: Any, as_if_eager: bool) -> str | None:
    """The name of the current module's base weight that ``operand`` is, or ``None``.

    Qwix's ``find_param`` matches by identity, then (under tracing) through
    unary operations, and otherwise by shape among all of the module's
    parameters, adapters included. When an adapter factor has the weight's
    shape (``rank == out_features`` in a Linear) that last match is ambiguous:
    Qwix returns ``None``, silently skipping the update (always for QLoRA,
    whose weight reaches the matmul as a copy; in eager mode for a weight cast
    to the compute dtype), or raises. An adapter is never the weight, so the
    shape match is redone among the base weights only. ``as_if_eager`` (a
    traced dry run) skips the match through unary operations, as eager calls do.
    """
    module = _flax_util.get_current_module()
    weights = {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, QuantizedWeight | nnx.Param) and not isinstance(value, AdapterParam)
    }
    if as_if_eager:
        name = next((n for n, v in weights.items() if _flax_util.unbox(v) is operand), None)
    else:
        try:
            name = _flax_util.find_param(operand, QuantizedWeight)
        except ValueError as err:
            if "Multiple candidate params" not in str(err):
                raise
            name = None
    if name in weights:
        return name
    same_shape = [n for n, v in weights.items() if tuple(v.shape) == tuple(operand.shape)]
    return same_shape[0] if len(same_shape) == 1 else None


def _add_update(
    res: jax.Array,
    weight_name: str,
    rule: qwix.LoraRule,
    lhs: jax.Array,
    operand: Any,
    adapter: tuple[jax.Array, jax.Array] | None,
    update: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    template: str,
) -> jax.Array:
    """The adapted output, as the adapter's :class:`AdapterState` and variant ask.

    Args:
        res: The base matmul's output.
        weight_name: The adapted weight.
        rule: The Qwix rule (for the dropout rate).
        lhs: The matmul's input.
        operand: The matmul's weight operand.
        adapter: ``(A, B)``, or ``None`` when this call created them (see ``_adapter``).
        update: ``(x, A, B) -> scale * x A B``, shaped like ``res``.
        template: The output's axes (``_factors.dot_general_output`` and the like).
    """
    if adapter is None:
        _dropout_layer(weight_name, rule)  # created with the adapter, not inside a later jit
        return res
    module = _flax_util.get_current_module()
    layout: LoraLayout = getattr(module, weight_name + LAYOUT_SUFFIX)
    extras = {
        suffix: _flax_util.unbox(getattr(module, weight_name + suffix))
        for suffix in layout.update.extra_suffixes
    }
    state = adapter_state(module, weight_name)
    if state is AdapterState.ACTIVE:
        assert layout.subscripts is not None
        return layout.update.apply(
            res,
            update(_dropout(weight_name, rule, lhs), *adapter),
            sub=layout.subscripts,
            weight=lambda: _float_operand(module, weight_name, operand),
            a=adapter[0],
            b=adapter[1],
            scale=layout.scale,
            extras=extras,
            template=template,
        )
    if state is AdapterState.MERGED:
        return refuse_adapter_gradients(_module_path(), res, (*adapter, *extras.values()))
    initial = [getattr(module, weight_name + s, None) for s in (INITIAL_A_SUFFIX, INITIAL_B_SUFFIX)]
    if initial[0] is None or initial[1] is None:
        return res
    # The weight holds the residual W - scale * A0 B0: add the initial adapter back.
    return res + update(lhs, initial[0].get_value(), initial[1].get_value())


def _float_operand(module: nnx.Module, weight_name: str, operand: Any) -> jax.Array:
    """The matmul's weight operand as a float array (a QLoRA weight dequantized)."""
    if isinstance(operand, QuantizedWeight):
        return qwix.dequantize(operand.array)
    stored = getattr(module, weight_name)
    if isinstance(stored, QuantizedWeight):  # the first call quantizes its float operand
        return qwix.dequantize(stored.array)
    return jax.numpy.asarray(operand)


def _dropout_layer(weight_name: str, rule: qwix.LoraRule) -> nnx.Dropout | None:
    """The adapter's dropout submodule (``None`` at rate 0), created on the first call."""
    if rule.dropout == 0:
        return None
    module = _flax_util.get_current_module()
    name = weight_name + DROPOUT_SUFFIX
    layer = getattr(module, name, None)
    if layer is None:
        layer = nnx.Dropout(rule.dropout, rngs=module.qwix_rngs)
        setattr(module, name, layer)
    return layer


def _dropout(weight_name: str, rule: qwix.LoraRule, lhs: jax.Array) -> jax.Array:
    """Applies the adapter's dropout submodule (nothing at rate 0)."""
    layer = _dropout_layer(weight_name, rule)
    return lhs if layer is None else layer(lhs)


def _canonical_sharding(boxed: Any) -> jax.sharding.NamedSharding | None:
    """The base weight's ``NamedSharding`` with its spec padded to full rank, if any."""
    value = _flax_util.unbox(boxed)
    sharding = getattr(value, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    return sharding.update(spec=sharding.spec + (None,) * (value.ndim - len(sharding.spec)))


def _adapter(
    name: str,
    rule: qwix.LoraRule,
    spec: AdapterSpec,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_transpose: _sharding.Groups,
    b_transpose: _sharding.Groups,
    layout: LoraLayout,
    sub: Subscripts,
    operand: Any,
) -> tuple[jax.Array, jax.Array] | None:
    """``(A, B)`` of the weight ``name`` of the current module, or ``None`` if this call
    created them, as ``spec`` says.

    A new adapter's update is zero: ``B`` starts at zero, or the weight becomes
    the residual ``W - scale * A @ B`` while this call's base output was computed
    from ``W``. The creating call (the wrapper's sample pass, or a dry run) so
    adds nothing, and skips compiling the update's operations one by one.

    On creation, the layout records the spec's scale, update variant and
    ``sub``; the spec's initializer starts ``A`` and ``B`` (one that starts
    from the weight also replaces the stored weight by its residual, keeping
    ``A0`` and ``B0`` as :class:`InitialFactor`); and the variant's extra
    trained arrays (DoRA's magnitude) are made from the weight the matmul
    will use from then on.
    """
    module = _flax_util.get_current_module()
    if getattr(module, name + LORA_A_SUFFIX, None) is not None:
        return _get_or_create_adapter(
            name, rule, a_shape, b_shape, a_transpose, b_transpose, layout, operand
        )
    param = getattr(module, name)
    layout = dataclasses.replace(layout, scale=spec.scale, update=spec.update, subscripts=sub)
    where = f"the weight {name!r} of module {_module_path()!r}"
    check_supported(
        spec,
        groups=(layout.feature_group_count, layout.batch_group_count),
        transformed=lambda: not _is_stored_weight(operand, param),
        where=where,
    )
    start = spec.init.start(
        sub=sub,
        weight=lambda: _flax_util.unbox(param),
        rank=spec.rank,
        scale=spec.scale,
        a_shape=a_shape,
        b_shape=b_shape,
        where=where,
    )
    rule = dataclasses.replace(
        rule,
        rank=spec.rank,
        alpha=spec.alpha,
        lora_a_initializer=start.a,
        lora_b_initializer=start.b,
    )
    try:
        lora_a, lora_b = _get_or_create_adapter(
            name, rule, a_shape, b_shape, a_transpose, b_transpose, layout, operand
        )
    except flax.errors.TraceContextError as error:
        raise UnsupportedLayerError(
            f"Module {_module_path()!r} multiplies by its weight {name!r} inside a function that "
            "JAX traces on its own (the @ operator and jnp.matmul are such functions, and so "
            "is a jax.jit inside the model's call), where no adapter can be added to the "
            "module. Write the product with jnp.dot, jnp.einsum or "
            "jax.lax.dot_general (nnx.Linear and nnx.Einsum do), or exclude the module with "
            "LoraConfig.exclude."
        ) from error
    weight = _float_operand(module, name, operand)
    if start.residual is not None:
        stored = _flax_util.unbox(param)
        residual = start.residual
        if not isinstance(stored, jax.core.Tracer):
            residual = jax.device_put(residual, stored.sharding)
        param.set_value(residual)  # in the wrapper's clone only
        setattr(module, name + INITIAL_A_SUFFIX, InitialFactor(lora_a))
        setattr(module, name + INITIAL_B_SUFFIX, InitialFactor(lora_b))
        weight = residual.astype(weight.dtype)
    extras = spec.update.extra_params(sub, weight, lora_a, lora_b, spec.scale)
    if extras:
        dtype, boxed = _dtype_and_boxed(param)
        sharding = _canonical_sharding(boxed)
        with _sharding.mesh_of(sharding):
            for suffix, (value, axes) in extras.items():
                placed = _sharding.adapter_value(value.astype(dtype), boxed, sharding, axes)
                _flax_util.get_or_create_param(
                    name + suffix, lambda placed=placed: placed, nnx_param_type=AdapterParam
                )
    return None


def _dtype_and_boxed(param: Any) -> tuple[Any, Any]:
    """The adapters' dtype and the variable their sharding derives from (QLoRA: the qvalue)."""
    if isinstance(param, QuantizedWeight):
        return _flax_util.unbox(param.array.scale).dtype, param.array.qvalue
    return _flax_util.unbox(param).dtype, param


def _get_or_create_adapter(
    name: str,
    rule: qwix.LoraRule,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_transpose: _sharding.Groups,
    b_transpose: _sharding.Groups,
    layout: LoraLayout,
    operand: Any,
) -> tuple[jax.Array, jax.Array]:
    """Qwix's ``_get_or_create_lora_params`` for NNX, creating :class:`AdapterParam`.

    Also records ``layout`` as ``<name>_lora_layout`` on the module, completed
    with whether ``operand`` (the matmul's weight operand) is the stored
    weight. ``a_transpose`` and ``b_transpose`` list, per adapter axis, the
    weight axes it stands for; the adapters are placed
    and annotated from them by ``_sharding.adapter_value``, on the base
    weight's mesh.
    """
    module = _flax_util.get_current_module()
    lora_a = getattr(module, name + LORA_A_SUFFIX, None)
    lora_b = getattr(module, name + LORA_B_SUFFIX, None)
    if lora_a is not None and lora_b is not None:
        return _flax_util.unbox(lora_a), _flax_util.unbox(lora_b)

    param = getattr(module, name)
    if isinstance(param, QuantizedWeight):  # quantized from ``operand`` in this very call
        _sharding.place_quantized(operand, weight_variables(param))
    layout = dataclasses.replace(layout, operand_is_weight=_is_stored_weight(operand, param))
    setattr(module, name + LAYOUT_SUFFIX, layout)
    if isinstance(param, QuantizedWeight):
        dtype, boxed = _flax_util.unbox(param.array.scale).dtype, param.array.qvalue
    else:
        dtype, boxed = _flax_util.unbox(param).dtype, param
    sharding = _canonical_sharding(boxed)

    def init(initializer: Callable[..., jax.Array], shape: tuple[int, ...], transpose: Any):
        def create(rng: jax.Array) -> Any:
            return _sharding.adapter_value(
                initializer(rng, shape, dtype), boxed, sharding, transpose
            )

        return create

    with _sharding.mesh_of(sharding):  # NNX places annotated variables on the current mesh
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
    if operand is value:
        return True
    # Compared on the devices: a sharded weight is never gathered to the host.
    return operand.shape == value.shape and bool(
        jax.numpy.array_equal(operand, value.astype(operand.dtype))
    )


#: Attributes next to an adapted weight that belong to its adapter.
ADAPTER_SUFFIXES = (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LAYOUT_SUFFIX,
    STATE_SUFFIX,
    DROPOUT_SUFFIX,
    INITIAL_A_SUFFIX,
    INITIAL_B_SUFFIX,
    MAGNITUDE_SUFFIX,
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
