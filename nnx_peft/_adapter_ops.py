"""What an intercepted product does to its module's adapter: create it, read it, add its update.

The provider (``_qwix_bridge``) calls these from inside a targeted module's
``dot_general``, einsum, convolution or lookup, with the weight operand and the
factors' shapes (``_products``). They run on the module Qwix reports as current:

- on the wrapper's sample call, the adapter is created: its factors as
  :class:`~nnx_peft.AdapterParam` in ``LoraConfig.adapter_dtype``, placed and annotated
  from the base weight's sharding (``_sharding``), its recorded :class:`LoraLayout`,
  its initializer's start (a PiSSA/OLoRA residual replacing the weight), the
  variant's extra arrays (DoRA's magnitude), and an ``nnx.Dropout`` submodule for its
  input, so that dropout follows ``model.train()`` / ``model.eval()``. That call's
  update is zero, so it is skipped;
- on every later call, the update is added as the adapter's :class:`AdapterState`
  and variant ask, in the layer's compute dtype and then cast to the base output's;
- the weight operand is looked up among the module's base weights only (Qwix's
  lookup by shape also counts the adapters).

The parts of an adapter, by attribute name, are listed in ``_parts``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import flax.errors
import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from nnx_peft import _embedding, _quantized, _qwix_internals, _sharding
from nnx_peft._adapter import Adapter, adapters_of
from nnx_peft._adapter_state import AdapterState, refuse_adapter_gradients
from nnx_peft._errors import (
    AdapterIdsError,
    AdapterStateError,
    UnreachedTargetError,
    UnsupportedLayerError,
)
from nnx_peft._factors import Subscripts
from nnx_peft._layout import LoraLayout
from nnx_peft._parts import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
)
from nnx_peft._products import FactorShapes
from nnx_peft._quantized import QuantizedWeight, weight_variables
from nnx_peft._qwix_internals import QWIX_RNGS
from nnx_peft._variables import AdapterParam
from nnx_peft._variants import AdapterSpec, check_supported

#: The wrapper's sample call, while it runs: ``WRAP_TIME.provider`` is its provider
#: (adapters are created only then), ``WRAP_TIME.reached`` the Qwix paths of the modules
#: it ran (see ``_interception``).
WRAP_TIME = threading.local()


def module_path() -> str:
    return "/".join(map(str, _qwix_internals.get_current_module_path()))


def base_weights(module: nnx.Module) -> dict[str, Any]:
    """A module's own base weights by name: its ``nnx.Param`` (not adapters) and QLoRA weights."""
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, QuantizedWeight | nnx.Param) and not isinstance(value, AdapterParam)
    }


def find_weight(operand: Any, as_if_eager: bool) -> str | None:
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
    weights = base_weights(_qwix_internals.get_current_module())
    if as_if_eager:
        name = next((n for n, v in weights.items() if _qwix_internals.unbox(v) is operand), None)
    else:
        try:
            name = _qwix_internals.find_param(operand, QuantizedWeight)
        except ValueError:  # only for an ambiguous shape match (the module is known), redone below
            name = None
    if name in weights:
        return name
    same_shape = [n for n, v in weights.items() if tuple(v.shape) == tuple(operand.shape)]
    return same_shape[0] if len(same_shape) == 1 else None


def multiplies_lookup_table(weight_name: str | None, operand: Any, traced: bool) -> bool:
    """Whether a matmul multiplies by a table the current module looks rows up from.

    A tied output head (``nnx.Embed.attend``: ``x @ table.T``) gets no update,
    as in HF PEFT; the lookup's adapter is marked ``tied`` (see ``_embedding``)
    during the wrapper's sample call, so that merging refuses it. An eager
    transposed table is found by value (Qwix does not find it), a traced one
    by Qwix's match through the transpose.
    """
    for adapter in adapters_of(module_path(), _qwix_internals.get_current_module()):
        layout = adapter.layout
        if not layout.lookup or weight_name not in (None, adapter.weight):
            continue
        table = _qwix_internals.unbox(adapter.base)
        if weight_name is None and not _embedding.multiplies_table(
            operand, table, traced or layout.tied
        ):
            continue
        if not layout.tied and getattr(WRAP_TIME, "provider", None) is not None:
            adapter.set_layout(dataclasses.replace(layout, tied=True))
        return True
    return False


#: A call with one adapter per example (``PeftModel.__call__(..., adapter_ids=...)``), while
#: it runs: ``PER_EXAMPLE.ids`` the adapter index of each example of the batch,
#: ``PER_EXAMPLE.names`` the adapter names they index.
PER_EXAMPLE = threading.local()


def has_adapter(module: nnx.Module, weight_name: str) -> bool:
    """Whether the weight ``weight_name`` of ``module`` has an adapter, of any name."""
    return any(adapter.weight == weight_name for adapter in adapters_of("", module))


def add_update(
    res: jax.Array,
    weight_name: str,
    rule: qwix.LoraRule,
    lhs: jax.Array,
    operand: Any,
    created: bool,
    update: Callable[[float], Callable[[jax.Array, jax.Array, jax.Array], jax.Array]],
    template: str,
) -> jax.Array:
    """The adapted output, as the states and variants of the weight's adapters ask.

    Every adapter of the weight (one per name, ``PeftModel.add_adapter``) that is active
    adds its update; a merged one adds none (its gradient is refused); a disabled or
    inactive one adds none, or, started from the weight (PiSSA, OLoRA), adds its initial
    update back to the residual the weight holds.

    Args:
        res: The base matmul's output.
        weight_name: The adapted weight.
        rule: The Qwix rule (for the dropout rate of an adapter created by this call).
        lhs: The matmul's input.
        operand: The matmul's weight operand.
        created: Whether this call created the adapter (see ``adapter``): its update is zero.
        update: ``update(scale)(x, A, B)`` is ``scale * x A B``, shaped like ``res``.
        template: The output's axes (``_factors.dot_general_output`` and the like).
    """
    module = _qwix_internals.get_current_module()
    if created:
        # Created with the adapter, not inside a later jit; a layer of a stack (whose
        # RNGs are not lent) gets its slice of the stack's (see ``create_stacked``).
        if getattr(module, QWIX_RNGS, None) is not None:
            dropout_layer(weight_name, rule)
        return res
    found = [a for a in adapters_of(module_path(), module) if a.weight == weight_name]
    compute = _compute_dtype(lhs, operand)
    ids = getattr(PER_EXAMPLE, "ids", None)
    if ids is not None:
        return _add_per_example(found, res, lhs, ids, PER_EXAMPLE.names, update, compute)

    def cast_update(parts: Adapter, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        # In the layer's compute dtype, then in the base output's: the adapted
        # output has exactly the base layer's dtype, whatever the adapters'.
        out = update(parts.layout.scale)(x.astype(compute), a.astype(compute), b.astype(compute))
        return out.astype(res.dtype)

    active = [parts for parts in found if parts.state is AdapterState.ACTIVE]
    if len(active) > 1 and any(parts.layout.update.extra_suffixes for parts in active):
        raise AdapterStateError(
            f"{len(active)} adapters of the weight {weight_name!r} in module {module_path()!r} "
            f"are active ({[p.adapter for p in active]}) and one of them is a DoRA adapter, "
            "whose update rescales the layer's whole output and so cannot be added to "
            "another's. Activate one at a time (model.set_adapter(name))."
        )
    adapted = res
    for parts in found:
        state = parts.state
        if state is AdapterState.ACTIVE:
            adapted = _add_active(parts, adapted, lhs, operand, cast_update, template)
        elif state is AdapterState.MERGED:
            arrays = (*_factors_of(parts), *_extras_of(parts).values())
            adapted = refuse_adapter_gradients(module_path(), adapted, arrays)
        elif (initial := parts.initial) is not None:
            # The weight holds the residual W - scale * A0 B0: add the initial adapter back.
            adapted = adapted + cast_update(
                parts, lhs, initial[0].get_value(), initial[1].get_value()
            )
    return adapted


def _add_per_example(
    found: list[Adapter],
    res: jax.Array,
    lhs: jax.Array,
    ids: jax.Array,
    names: tuple[str, ...],
    update: Callable[[float], Callable[[jax.Array, jax.Array, jax.Array], jax.Array]],
    compute: Any,
) -> jax.Array:
    """``res`` plus, for each example ``i`` of the batch, the update of adapter
    ``names[ids[i]]`` (none where that adapter does not adapt this weight).

    The factors of all adapters are stacked (ranks padded with zeros, each scale folded
    into its ``B``), gathered per example, and the update is taken once, vectorized over
    the batch: one batched product, whatever the number of adapters.

    Raises:
        AdapterIdsError: The matmul's input does not lead with the batch axis of
            ``adapter_ids``; an adapter is merged, a DoRA adapter, or an embedding lookup;
            or dropout is on (``model.train()``).
    """
    if not found:
        return res
    # Inside disable_adapter() no per-example call reaches here (``_named.per_example``).
    where = f"the weight {found[0].weight!r} of module {module_path()!r}"
    for parts in found:
        problem = None
        if parts.state is AdapterState.MERGED:
            problem = "is merged into the base weights (call unmerge_adapter() first)"
        elif parts.layout.update.extra_suffixes:
            problem = f"is a {parts.layout.update.name!r} adapter, whose update rescales the output"
        elif parts.layout.lookup:
            problem = "adapts an embedding lookup"
        elif parts.dropout is not None and not parts.dropout.deterministic:
            problem = "has dropout on (call model.eval() to serve)"
        if problem is not None:
            raise AdapterIdsError(
                f"A call with adapter_ids reached {where}, whose adapter {parts.adapter!r} "
                f"{problem}; per-example adapters serve plain LoRA adapters of matmuls, "
                "unmerged, in evaluation mode. Call the model with one active adapter instead "
                "(model.set_adapter(name))."
            )
    if jnp.ndim(lhs) == 0 or lhs.shape[0] != ids.shape[0]:
        raise AdapterIdsError(
            f"A call with adapter_ids of {ids.shape[0]} entries reached {where}, whose input "
            f"has shape {tuple(jnp.shape(lhs))}: per-example adapters need the batch as the "
            "leading axis of every adapted matmul's input. Give one id per example of the "
            "batch, or call the model with one active adapter (model.set_adapter(name))."
        )
    by_name = {parts.adapter: parts for parts in found}
    shapes = [tuple(jnp.shape(f)) for n in names if n in by_name for f in _factors_of(by_name[n])]
    a_shapes, b_shapes = shapes[::2], shapes[1::2]
    a_shape, b_shape = _padded(a_shapes, where), _padded(b_shapes, where)

    def factors(name: str) -> tuple[jax.Array, jax.Array]:
        parts = by_name.get(name)
        if parts is None:  # this adapter leaves the weight as it is
            return jnp.zeros(a_shape, compute), jnp.zeros(b_shape, compute)
        a, b = (f.astype(compute) for f in _factors_of(parts))
        b = b * jnp.asarray(parts.layout.scale, compute)
        return _pad(a, a_shape), _pad(b, b_shape)

    stacked = [factors(name) for name in names]
    a_all = jnp.stack([a for a, _ in stacked])
    b_all = jnp.stack([b for _, b in stacked])
    # Out-of-range ids give NaN rows (JAX cannot raise inside a compiled call): never a
    # silently wrong adapter. Eager calls are checked before this (``PeftModel.__call__``).
    a_each = jnp.take(a_all, ids, axis=0, mode="fill", fill_value=jnp.nan)
    b_each = jnp.take(b_all, ids, axis=0, mode="fill", fill_value=jnp.nan)
    unscaled = update(1.0)

    def one(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return unscaled(x[None].astype(compute), a, b)[0]

    return res + jax.vmap(one)(lhs, a_each, b_each).astype(res.dtype)


def _padded(shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """The shape holding every one of ``shapes`` (one factor of several adapters of one
    weight, which differ in their rank axis only)."""
    padded = tuple(max(sizes) for sizes in zip(*shapes, strict=True))
    if sum(any(s[i] != padded[i] for s in shapes) for i in range(len(padded))) > 1:
        raise AdapterIdsError(
            f"The adapters of {where} have factors of shapes {shapes}, which differ in more "
            "than their rank; a per-example call cannot stack them. Call the model with one "
            "active adapter (model.set_adapter(name))."
        )
    return padded


def _pad(factor: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``factor`` padded with zeros to ``shape`` (a larger rank adds nothing)."""
    return jnp.pad(factor, [(0, n - m) for m, n in zip(factor.shape, shape, strict=True)])


def _factors_of(parts: Adapter) -> tuple[jax.Array, jax.Array]:
    return _qwix_internals.unbox(parts.a), _qwix_internals.unbox(parts.b)


def _extras_of(parts: Adapter) -> dict[str, jax.Array]:
    extras = parts.layout.update.extra_suffixes
    return {suffix: _qwix_internals.unbox(parts.part(suffix)) for suffix in extras}


def _add_active(
    parts: Adapter,
    res: jax.Array,
    lhs: jax.Array,
    operand: Any,
    cast_update: Callable[..., jax.Array],
    template: str,
) -> jax.Array:
    """``res`` with the update of the active adapter ``parts``, as its variant adds it."""
    layout = parts.layout
    assert layout.subscripts is not None
    a, b = _factors_of(parts)
    layer = parts.dropout
    x = lhs if layer is None else layer(lhs)
    adapted = layout.update.apply(
        res,
        cast_update(parts, x, a, b),
        sub=layout.subscripts,
        weight=lambda: _float_operand(parts.module, parts.weight, operand),
        a=a,
        b=b,
        scale=layout.scale,
        extras=_extras_of(parts),
        template=template,
    )
    return adapted.astype(res.dtype)


def _compute_dtype(lhs: jax.Array, operand: Any) -> Any:
    """The dtype a matmul of ``lhs`` by ``operand`` computes in (a QLoRA weight: ``lhs``'s)."""
    if isinstance(operand, QuantizedWeight) or not hasattr(operand, "dtype"):
        return lhs.dtype
    return jax.numpy.promote_types(lhs.dtype, operand.dtype)


def _float_operand(module: nnx.Module, weight_name: str, operand: Any) -> jax.Array:
    """The matmul's weight operand as a float array (a QLoRA weight dequantized)."""
    if isinstance(operand, QuantizedWeight):
        return qwix.dequantize(operand.array)
    stored = getattr(module, weight_name)
    if isinstance(stored, QuantizedWeight):  # the first call quantizes its float operand
        return qwix.dequantize(stored.array)
    return jax.numpy.asarray(operand)


def dropout_layer(weight_name: str, rule: qwix.LoraRule) -> nnx.Dropout | None:
    """The adapter's dropout submodule (``None`` at rate 0), created on the first call."""
    if rule.dropout == 0:
        return None
    module = _qwix_internals.get_current_module()
    parts = Adapter(module_path(), module, weight_name)
    layer = parts.dropout
    if layer is None:
        layer = nnx.Dropout(rule.dropout, rngs=getattr(module, QWIX_RNGS))
        parts.set_dropout(layer)
    return layer


def canonical_sharding(boxed: Any) -> jax.sharding.NamedSharding | None:
    """The base weight's ``NamedSharding`` with its spec padded to full rank, if any."""
    value = _qwix_internals.unbox(boxed)
    sharding = _sharding.sharding_of(value)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    return sharding.update(spec=sharding.spec + (None,) * (value.ndim - len(sharding.spec)))


def adapter(
    name: str,
    rule: qwix.LoraRule,
    spec: AdapterSpec,
    shapes: FactorShapes,
    layout: LoraLayout,
    sub: Subscripts,
    operand: Any,
) -> None:
    """Creates the adapter of the weight ``name`` of the current module, as ``spec`` says
    (``shapes``: see ``_products``).

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
    module = _qwix_internals.get_current_module()
    parts = Adapter(module_path(), module, name)
    if getattr(WRAP_TIME, "provider", None) is None:
        raise UnreachedTargetError(
            f"Module {module_path()!r} is targeted and a call after wrapping multiplies by its "
            f"weight {name!r}, which has no adapter: the sample call never ran this matmul, and "
            "adapters are created only while wrapping. Wrap with sample inputs that reach it "
            "(for routed experts, a batch that every expert receives), or exclude the module "
            "with LoraConfig.exclude."
        )
    param = getattr(module, name)
    layout = dataclasses.replace(layout, scale=spec.scale, update=spec.update, subscripts=sub)
    where = f"the weight {name!r} of module {module_path()!r}"
    check_supported(
        spec,
        groups=(layout.feature_group_count, layout.batch_group_count),
        transformed=lambda: not _is_stored_weight(operand, param),
        where=where,
    )
    start = spec.init.start(
        sub=sub,
        weight=lambda: _qwix_internals.unbox(param),
        rank=spec.rank,
        scale=spec.scale,
        a_shape=shapes.a,
        b_shape=shapes.b,
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
        lora_a, lora_b = _create_factors(name, rule, shapes, layout, operand, spec.dtype)
    except flax.errors.TraceContextError as error:
        raise traced_weight_error(name) from error
    weight = _float_operand(module, name, operand)
    if start.residual is not None:
        stored = _qwix_internals.unbox(param)
        residual = start.residual
        if not isinstance(stored, jax.core.Tracer):
            residual = jax.device_put(residual, stored.sharding)
        param.set_value(residual)  # in the wrapper's clone only
        parts.set_initial(lora_a, lora_b)
        weight = residual.astype(weight.dtype)
    extras = spec.update.extra_params(sub, weight, lora_a, lora_b, spec.scale)
    if extras:
        dtype, boxed = _quantized.dtype_and_boxed(param)
        dtype = spec.dtype or dtype
        sharding = canonical_sharding(boxed)
        with _sharding.mesh_of(sharding):
            for suffix, (value, axes) in extras.items():
                # Kept in float32 at least (a DoRA magnitude): rounded to bfloat16, a
                # fresh adapter would not give the base model's outputs.
                stored = value.astype(jax.numpy.promote_types(dtype, jax.numpy.float32))
                placed = _sharding.adapter_value(stored, boxed, sharding, axes)
                _qwix_internals.get_or_create_param(
                    parts.name(suffix), lambda placed=placed: placed, nnx_param_type=AdapterParam
                )
    return None


def traced_weight_error(name: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"Module {module_path()!r} multiplies by its weight {name!r} inside a function that "
        "JAX traces on its own (a jax.jit inside the model's call), where no adapter can "
        "be added to the module. Multiply outside that jax.jit (the model is jitted as a "
        "whole anyway), or exclude the module with LoraConfig.exclude."
    )


def _create_factors(
    name: str,
    rule: qwix.LoraRule,
    shapes: FactorShapes,
    layout: LoraLayout,
    operand: Any,
    adapter_dtype: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Qwix's ``_get_or_create_lora_params`` for NNX, creating :class:`AdapterParam`s.

    New adapters are stored in ``adapter_dtype`` (``LoraConfig.adapter_dtype``),
    or, when it is ``None``, in the weight's dtype (a QLoRA weight: its scale's).

    Also records ``layout`` as ``<name>_lora_layout`` on the module, completed
    with whether ``operand`` (the matmul's weight operand) is the stored
    weight. The adapters are placed and annotated from the weight axes each of
    their axes stands for (``shapes``) by ``_sharding.adapter_value``, on the
    base weight's mesh.
    """
    module = _qwix_internals.get_current_module()
    parts = Adapter(module_path(), module, name)
    param = getattr(module, name)
    if isinstance(param, QuantizedWeight):  # quantized from ``operand`` in this very call
        _sharding.place_quantized(operand, weight_variables(param))
    layout = dataclasses.replace(layout, operand_is_weight=_is_stored_weight(operand, param))
    parts.set_layout(layout)
    dtype, boxed = _quantized.dtype_and_boxed(param)
    dtype = adapter_dtype or dtype
    sharding = canonical_sharding(boxed)

    def init(initializer: Callable[..., jax.Array], shape: tuple[int, ...], transpose: Any):
        def create(rng: jax.Array) -> Any:
            return _sharding.adapter_value(
                initializer(rng, shape, dtype), boxed, sharding, transpose
            )

        return create

    with _sharding.mesh_of(sharding):  # NNX places annotated variables on the current mesh
        lora_a = _qwix_internals.get_or_create_param(
            parts.name(LORA_A_SUFFIX),
            init(rule.lora_a_initializer, shapes.a, shapes.a_groups),
            nnx_param_type=AdapterParam,
            need_rng=True,
        )
        lora_b = _qwix_internals.get_or_create_param(
            parts.name(LORA_B_SUFFIX),
            init(rule.lora_b_initializer, shapes.b, shapes.b_groups),
            nnx_param_type=AdapterParam,
            need_rng=True,
        )
    return lora_a, lora_b


def _is_stored_weight(operand: Any, param: Any) -> bool:
    """Whether a matmul's weight operand is ``param`` itself, possibly cast to another dtype.

    Qwix matches an operand to a weight by identity, through unary operations
    or, failing both, by shape alone; so a flipped kernel (``nnx.ConvTranspose``)
    or a masked one (``nnx.Conv(mask=...)``) gets an adapter too, whose update
    then applies to the transform. (A transposed weight reaches the product as
    itself: ``_transposed``.) The sample call
    runs eagerly, so the values can be compared; under tracing (a model that
    jits or scans inside ``__call__``) they cannot, and Qwix's match is trusted.
    """
    if isinstance(param, QuantizedWeight):
        return True  # Qwix hands the quantized weight itself to the matmul
    value = _qwix_internals.unbox(param)
    if isinstance(operand, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
        return True
    if operand is value:
        return True
    # Compared on the devices: a sharded weight is never gathered to the host.
    return operand.shape == value.shape and bool(
        jax.numpy.array_equal(operand, value.astype(operand.dtype))
    )
