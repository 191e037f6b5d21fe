"""Adapters of a scanned layer stack: one per layer, stacked along the weight's layer axis.

Inside ``nnx.scan`` / ``nnx.vmap`` (or a ``jax.lax.scan`` merging split state), the
module a product runs in is a traced copy of one layer of a stacked module, where no
adapter can be created. The provider records a :class:`~nnx_peft._stacks.Pending`
adapter instead, and creates it on the stacked module of the model once the sample
call is over, its factors stacked along the layer axis ``_stacks`` finds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import qwix
from flax import nnx

from nnx_peft import _adapter_ops, _quantized, _qwix_internals, _sharding, _stacks
from nnx_peft._adapter import Adapter
from nnx_peft._factors import Subscripts
from nnx_peft._layout import LoraLayout
from nnx_peft._parts import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
)
from nnx_peft._products import FactorShapes
from nnx_peft._quantized import QuantizedWeight, weight_variables
from nnx_peft._qwix_internals import QWIX_PATH
from nnx_peft._variables import AdapterParam
from nnx_peft._variants import AdapterSpec, check_supported


def create_stacked(pending: _stacks.Pending, rngs: nnx.Rngs | None) -> None:
    """Creates a pending adapter on its (stacked) module, as ``adapter`` does on a module."""
    module, name = pending.module, pending.name
    if not isinstance(rngs, nnx.Rngs):
        raise AssertionError("the wrapper passes Qwix an nnx.Rngs")
    if pending.quantize is not None:
        quantize_stacked(module, name, _stacks.stacked_how(pending.quantize, pending.axis))
    param = getattr(module, name)
    # The weight the products use from now on (a QLoRA weight dequantized), and the
    # variable the adapters' sharding derives from (a QLoRA weight's quantized values).
    stored = _quantized.float_weight(param)
    _, boxed = _quantized.dtype_and_boxed(param)
    made = _stacks.stacked_values(pending, stored, rngs)
    sharding = _adapter_ops.canonical_sharding(boxed)
    values = {LORA_A_SUFFIX: made.a, LORA_B_SUFFIX: made.b, **made.extras}
    groups = {LORA_A_SUFFIX: made.groups["a"], LORA_B_SUFFIX: made.groups["b"]}
    groups.update({suffix: made.groups[suffix] for suffix in made.extras})
    adapter = Adapter(pending.path, module, name)
    with _sharding.mesh_of(sharding):
        for suffix, value in values.items():
            placed = _sharding.adapter_value(value, boxed, sharding, groups[suffix])
            setattr(module, adapter.name(suffix), jax.tree.map(AdapterParam, placed))
    adapter.set_layout(dataclasses.replace(pending.layout, layer_axis=pending.axis))
    if pending.dropout:
        adapter.set_dropout(_stacks.stacked_dropout(pending, stored, rngs))
    if made.residual is not None:
        residual = made.residual
        if not isinstance(stored, jax.core.Tracer):
            residual = jax.device_put(residual, stored.sharding)
        param.set_value(residual)  # in the wrapper's clone only
        adapter.set_initial(made.a, made.b)


def quantizes_later(
    rule: qwix.LoraRule | None,
    rhs: Any,
    how: Callable[..., Any],
    owner: Callable[[], nnx.Module | None],
    later: dict[tuple[str, str], Any],
    as_if_eager: bool,
) -> bool:
    """Whether a QLoRA weight's product in a transformed copy of a module (a layer of a
    stack) runs unquantized in the sample call, recording in ``later`` how to quantize it.

    Qwix quantizes a weight on its first product and stores it in the module; in the
    copy the weight is a traced slice where nothing can be stored. So the provider
    records how Qwix would quantize one layer (``how``: Qwix's ``get_how_to_quantize``
    of the product), by (module path, weight name), and :func:`create_stacked` quantizes
    the stack after the call. ``owner`` gives the model's module the current one copies.
    """
    if rule is None or rule.weight_qtype is None or isinstance(rhs, QuantizedWeight):
        return False
    # After wrapping, a stacked QLoRA weight is quantized already. The weight lookup,
    # which may compare values, runs last: only in a copy during the sample call.
    module = _qwix_internals.get_current_module()
    if not getattr(module, _qwix_internals.DISABLE_QUANT_STATS_UPDATE, False) or owner() is None:
        return False
    name = _adapter_ops.find_weight(rhs, as_if_eager)
    if name is None:
        return False
    later[(_adapter_ops.module_path(), name)] = layer_how(rule, how)
    return True


def layer_how(rule: qwix.LoraRule, how: Callable[..., Any]) -> Any:
    """How Qwix quantizes one layer's weight for ``rule`` (``how``: Qwix's
    ``get_how_to_quantize`` of the product), as its PTQ provider would ask for it."""
    return how(
        for_lhs=False,
        tile_size=rule.tile_size,
        qtype=rule.weight_qtype,
        calibration_method=rule.weight_calibration_method,
    )


def quantize_stacked(module: nnx.Module, name: str, how: Any) -> None:
    """Replaces the float weight ``module.<name>`` by its QLoRA quantization, as Qwix would.

    Qwix quantizes a weight on the first product that uses it, storing the quantized
    array with ``how`` in place of the ``nnx.Param``; in a scan over layers that product
    runs on a traced slice, so the stack is quantized here instead, after the sample
    call, with the layer axis a channel axis (``_stacks.stacked_how``): each layer gets
    the very values and scales Qwix gives that layer's weight unstacked.
    """
    param = getattr(module, name)
    value = _qwix_internals.unbox(param)
    quantized = qwix.quantize(
        value,
        how.qtype,
        channelwise_axes=how.channelwise_axes,
        tiled_axes=how.tiled_axes,
        calibration_method=how.calibration_method,
    )
    boxed = QuantizedWeight(jax.tree.map(param.replace, quantized), how)
    _sharding.place_quantized(value, weight_variables(boxed))
    setattr(module, name, boxed)


def pending_adapter(
    owner: nnx.Module,
    name: str,
    rule: qwix.LoraRule,
    spec: AdapterSpec,
    shapes: FactorShapes,
    layout: LoraLayout,
    sub: Subscripts,
    quantize: Any = None,
) -> _stacks.Pending:
    """The adapter of ``name`` in a transformed copy of ``owner`` (a layer of a stack),
    to create on ``owner`` stacked once the sample call is over (see ``_stacks``).

    ``quantize`` is how Qwix would quantize one layer's weight (QLoRA), else ``None``.
    """
    module = _qwix_internals.get_current_module()
    path = _adapter_ops.module_path()
    check_supported(
        spec,
        groups=(layout.feature_group_count, layout.batch_group_count),
        transformed=lambda: False,  # traced: Qwix's match is trusted, as under jit
        where=f"the weight {name!r} of module {path!r}",
    )
    return _stacks.Pending(
        module=owner,
        path=path,
        name=name,
        axes=_stacks.layer_axes(owner, module, path),
        shapes=_stacks.describe_shapes(owner, module),
        spec=spec,
        a_shape=shapes.a,
        b_shape=shapes.b,
        a_groups=shapes.a_groups,
        b_groups=shapes.b_groups,
        layout=dataclasses.replace(layout, scale=spec.scale, update=spec.update, subscripts=sub),
        dropout=rule.dropout,
        quantize=quantize,
    )


def create_pending(
    pending: list[_stacks.Pending], root: nnx.Module | None, rngs: nnx.Rngs | None
) -> None:
    """Creates the stacked adapters the sample call left pending, once it is over.

    Each goes on the module at its path in ``root`` as the call left it: a scan may
    put a new stacked module in place of the one it sliced (MaxText assigns its
    scan's output state to the decoder's ``layers`` while Qwix wraps).
    """
    paths = ((getattr(m, QWIX_PATH, None), m) for _, m in nnx.iter_modules(root)) if root else ()
    now = {"/".join(map(str, path)): m for path, m in paths if path is not None}
    for item in _stacks.resolve(pending):
        create_stacked(dataclasses.replace(item, module=now.get(item.path, item.module)), rngs)
