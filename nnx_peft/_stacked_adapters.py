"""Adapters of a scanned layer stack: one per layer, stacked along the weight's layer axis.

Inside ``nnx.scan`` / ``nnx.vmap`` (or a ``jax.lax.scan`` merging split state), the
module a product runs in is a traced copy of one layer of a stacked module, where no
adapter can be created. The provider records a :class:`~nnx_peft._stacks.Pending`
adapter instead, and creates it on the stacked module of the model once the sample
call is over, its factors stacked along the layer axis ``_stacks`` finds.
"""

from __future__ import annotations

import dataclasses

import jax
import qwix
from flax import nnx

from nnx_peft import _adapter_ops, _qwix_internals, _sharding, _stacks
from nnx_peft._adapter import Adapter
from nnx_peft._factors import Subscripts
from nnx_peft._layout import LoraLayout
from nnx_peft._parts import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
)
from nnx_peft._products import FactorShapes
from nnx_peft._qwix_internals import QWIX_PATH
from nnx_peft._variables import AdapterParam
from nnx_peft._variants import AdapterSpec, check_supported


def create_stacked(pending: _stacks.Pending, rngs: nnx.Rngs | None) -> None:
    """Creates a pending adapter on its (stacked) module, as ``adapter`` does on a module."""
    module, name = pending.module, pending.name
    param = getattr(module, name)
    stored = _qwix_internals.unbox(param)
    if not isinstance(rngs, nnx.Rngs):
        raise AssertionError("the wrapper passes Qwix an nnx.Rngs")
    made = _stacks.stacked_values(pending, stored, rngs)
    sharding = _adapter_ops.canonical_sharding(param)
    values = {LORA_A_SUFFIX: made.a, LORA_B_SUFFIX: made.b, **made.extras}
    groups = {LORA_A_SUFFIX: made.groups["a"], LORA_B_SUFFIX: made.groups["b"]}
    groups.update({suffix: made.groups[suffix] for suffix in made.extras})
    adapter = Adapter(pending.path, module, name)
    with _sharding.mesh_of(sharding):
        for suffix, value in values.items():
            placed = _sharding.adapter_value(value, param, sharding, groups[suffix])
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


def pending_adapter(
    owner: nnx.Module,
    name: str,
    rule: qwix.LoraRule,
    spec: AdapterSpec,
    shapes: FactorShapes,
    layout: LoraLayout,
    sub: Subscripts,
) -> _stacks.Pending:
    """The adapter of ``name`` in a transformed copy of ``owner`` (a layer of a stack),
    to create on ``owner`` stacked once the sample call is over (see ``_stacks``)."""
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
