"""Folding LoRA updates into base weights: merge and unload, merge in place, disable.

Qwix adds ``scale * update(x, A, B)`` to the output of each adapted matmul,
and the update is linear in the input. So the adapted layer computes the base
matmul with the weight ``W + scale * delta``, where ``delta`` is the product
of the two factors laid out like ``W``: reshaped and transposed for a
``dot_general``, contracted over the rank for an ``einsum``, ``A @ B`` over
the output features for a convolution. Each adapter's :class:`LoraLayout`
records how its weight entered the matmul, which is all the layout needs.

Merging in place keeps the original weight values in an
``UnmergedWeight`` (``_variables``) next to the merged weight, so unmerging restores them
bit for bit (also for a QLoRA base, whose merged weight is requantized).

The adapter's variant folds the delta in (``Update.fold``): LoRA adds
``scale * delta``, DoRA also rescales each output feature to its magnitude.
A PiSSA or OLoRA adapter's weight already holds the residual, which is what
the delta is added to. Modules in ``modules_to_save`` need no folding: they
keep their trained values, and ``merge_and_unload`` gives their parameters
their original types back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from nnx_peft import _saved_modules
from nnx_peft._adapter import Adapter, adapters
from nnx_peft._adapter_state import AdapterState
from nnx_peft._errors import AdapterStateError, DtypeError, UnmergeableAdapterError
from nnx_peft._interception import unwrap
from nnx_peft._layout import LoraLayout
from nnx_peft._quantized import weight_value, weight_values, weight_variables

_HIGHEST = jax.lax.Precision.HIGHEST


# The maths: the update of each kind of matmul as a delta of the weight.


def dot_general_delta(
    lora_a: Float[Array, "*batch contract rank"],
    lora_b: Float[Array, "*batch rank remain"],
    layout: LoraLayout,
    weight_shape: tuple[int, ...],
) -> Float[Array, "*weight"]:
    """The weight delta of a ``dot_general`` adapter, in the weight's own axis order.

    Qwix flattens the weight's contracting axes (in ``dimension_numbers``
    order) into the rows of ``A`` and its remaining axes (ascending) into the
    columns of ``B``, with the batch axes leading both.

    Args:
        lora_a: ``A``, shaped ``(*batch, prod(contracting), rank)``.
        lora_b: ``B``, shaped ``(*batch, rank, prod(remaining))``.
        layout: The adapter's layout (``kind='dot_general'``).
        weight_shape: Shape of the base weight.

    Returns:
        ``A @ B`` unflattened and transposed to ``weight_shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> layout = LoraLayout("dot_general", contracting=(1,))
        >>> dot_general_delta(jnp.ones((3, 2)), jnp.ones((2, 5)), layout, (5, 3)).shape
        (5, 3)
    """
    rank_axes = (*layout.batch, *layout.contracting)
    remaining = tuple(i for i in range(len(weight_shape)) if i not in rank_axes)
    order = (*rank_axes, *remaining)
    product = jnp.matmul(lora_a, lora_b, precision=_HIGHEST)
    product = product.reshape(tuple(weight_shape[i] for i in order))
    return product.transpose(tuple(int(i) for i in np.argsort(order)))


def einsum_delta(
    lora_a: Float[Array, "*shared rank"],
    lora_b: Float[Array, "rank ..."],
    layout: LoraLayout,
) -> Float[Array, "*weight"]:
    """The weight delta of an ``einsum`` adapter, in the weight's own axis order.

    Qwix's update is ``einsum('<x>,<A>,<B>-><out>', x, A, B)``, where ``A``
    holds the weight's axes shared with the input plus the rank, and ``B`` the
    rank plus the rest; contracting the rank gives the weight's axes back.

    Args:
        lora_a: ``A``, shaped like the weight's shared axes plus ``rank``.
        lora_b: ``B``, shaped ``rank`` plus the weight's other axes.
        layout: The adapter's layout (``kind='einsum'``).

    Returns:
        The delta with the weight's subscripts ``layout.weight_str``.

    Example:
        >>> import jax.numpy as jnp
        >>> layout = LoraLayout("einsum", einsum_str="bd,dr,rnh->bnh", weight_str="nhd")
        >>> einsum_delta(jnp.ones((4, 2)), jnp.ones((2, 3, 5)), layout).shape
        (3, 5, 4)
    """
    a_str, b_str = layout.einsum_str.split("->")[0].split(",")[1:]
    return jnp.einsum(f"{a_str},{b_str}->{layout.weight_str}", lora_a, lora_b, precision=_HIGHEST)


def conv_delta(
    lora_a: Float[Array, "*window in_features rank"],
    lora_b: Float[Array, "rank out_features"],
) -> Float[Array, "*window in_features out_features"]:
    """The kernel delta of a convolution adapter.

    Qwix convolves with ``A`` (the kernel's shape, ``rank`` output features)
    and multiplies the result by ``B``; a convolution is linear in its kernel
    and acts on output features independently, so this equals convolving with
    ``A @ B``. Only for ungrouped convolutions: see :func:`check_mergeable`.

    Example:
        >>> import jax.numpy as jnp
        >>> conv_delta(jnp.ones((3, 4, 2)), jnp.ones((2, 6))).shape
        (3, 4, 6)
    """
    return jnp.matmul(lora_a, lora_b, precision=_HIGHEST)


def weight_delta(
    layout: LoraLayout, lora_a: jax.Array, lora_b: jax.Array, weight_shape: tuple[int, ...]
) -> jax.Array:
    """``delta`` such that the adapted layer computes its matmul with ``W + scale * delta``."""
    if layout.kind == "dot_general":
        return dot_general_delta(lora_a, lora_b, layout, weight_shape)
    if layout.kind == "einsum":
        return einsum_delta(lora_a, lora_b, layout)
    if layout.kind == "conv":
        return conv_delta(lora_a, lora_b)
    raise AssertionError(f"unknown adapter kind {layout.kind!r}")


def check_mergeable(adapter: Adapter) -> None:
    """Raises if the update of ``adapter`` has no exact form as a weight delta.

    Raises:
        UnmergeableAdapterError: The convolution is grouped (its update mixes
            groups, which a grouped kernel cannot), the module transformed
            the weight before its matmul (the update applies to the transform),
            or the weight is an embedding table tied to an output head.
    """
    layout, weight = adapter.layout, adapter.weight
    where = f"The adapter of {weight!r} in module {adapter.path!r}"
    if layout.feature_group_count != 1 or layout.batch_group_count != 1:
        raise UnmergeableAdapterError(
            f"{where} belongs to a grouped convolution (feature_group_count="
            f"{layout.feature_group_count}, batch_group_count={layout.batch_group_count}); "
            "a kernel delta can be folded only into an ungrouped convolution (group count 1). "
            "Qwix's update convolves with A in groups and then mixes all groups through B, "
            "which a grouped kernel cannot express. Keep this model unmerged, or exclude the "
            "module with LoraConfig.exclude before training."
        )
    if layout.tied:
        raise UnmergeableAdapterError(
            f"{where} updates the lookups of an embedding table that the model also "
            "multiplies by (a tied output head, such as nnx.Embed.attend or x @ table.T in "
            "another module). The head gets no "
            "update (as in HF PEFT), so folding the delta into the shared table would change "
            f"the head's outputs too; an untied {weight!r} was expected. Keep this model "
            "unmerged, or untie the head (a separate output weight) before training."
        )
    if not layout.operand_is_weight:
        raise UnmergeableAdapterError(
            f"{where} was created for a transformed copy of the weight (the module "
            "flips or masks it before its matmul), so its update has no exact form "
            f"as a change of the stored {weight!r}; a weight used as is was expected. Keep this "
            "model unmerged, or exclude the module with LoraConfig.exclude before training."
        )


# The adapters' state.


def in_use(model: nnx.Module) -> list[Adapter]:
    """The adapters in the active set: every one not ``INACTIVE`` (``PeftModel.set_adapter``)."""
    return [a for a in adapters(model) if a.state is not AdapterState.INACTIVE]


def is_merged(model: nnx.Module) -> bool:
    """Whether ``model`` has adapters in use and all of them are merged into the base weights."""
    return {adapter.state for adapter in in_use(model)} == {AdapterState.MERGED}


def is_disabled(model: nnx.Module) -> bool:
    """Whether ``model`` is inside a ``disable_adapter()`` block (some adapter is disabled)."""
    return any(adapter.state is AdapterState.DISABLED for adapter in adapters(model))


def _require(found: Sequence[Adapter], allowed: Sequence[AdapterState], action: str) -> None:
    """Raises :class:`AdapterStateError` unless every adapter is in an ``allowed`` state."""
    for adapter in found:
        state = adapter.state
        if state in allowed:
            continue
        where = f"{adapter.where} is {state.value}"
        if state is AdapterState.DISABLED:
            fix = (
                "This happens inside a `with model.disable_adapter():` block; "
                f"call {action} after the block."
            )
        elif state is AdapterState.MERGED:
            fix = (
                "The adapters are already merged (model.merged is True); merging again would "
                "add the update twice. Call model.unmerge_adapter() first, or use the model "
                "as it is."
            )
        else:
            fix = (
                "The adapters are not merged (model.merged is False), so there is nothing to "
                "take out of the base weights. Call model.merge_adapter() first."
            )
        expected = " or ".join(s.value for s in allowed)
        raise AdapterStateError(f"{action} needs every adapter {expected}, but {where}. {fix}")


def by_weight(found: Sequence[Adapter]) -> list[list[Adapter]]:
    """``found`` grouped by the weight they adapt (several names may adapt one), in order."""
    groups: dict[tuple[int, str], list[Adapter]] = {}
    for adapter in found:
        groups.setdefault((id(adapter.module), adapter.weight), []).append(adapter)
    return list(groups.values())


def _base_values(group: Sequence[Adapter]) -> list[jax.Array]:
    """The values of the base weight's variables without the updates, merged or not."""
    for adapter in group:
        unmerged = adapter.unmerged
        if unmerged is not None:
            return list(unmerged.get_value())
    return [variable.get_value() for variable in weight_variables(group[0].base)]


def _fold(adapter: Adapter, base: jax.Array, dtype: Any) -> jax.Array:
    """The weight computing what ``adapter`` adds to ``base``, rounded once to dtype.

    ``base + scale * delta`` for LoRA; the variant of the adapter decides.
    """
    layout = adapter.layout
    compute = jnp.promote_types(base.dtype, jnp.float32)
    sub = layout.subscripts
    assert sub is not None

    def fold(base: jax.Array, a: jax.Array, b: jax.Array, extras: dict[str, jax.Array]) -> Any:
        delta = weight_delta(layout, a, b, tuple(base.shape))
        return layout.update.fold(sub, base, delta, layout.scale, extras)

    if layout.layer_axis is not None:  # a scanned stack: the layout describes one layer
        fold = jax.vmap(fold, in_axes=layout.layer_axis, out_axes=layout.layer_axis)
    extras = {suffix: value.astype(compute) for suffix, value in adapter.extras().items()}
    a, b = (factor.get_value().astype(compute) for factor in (adapter.a, adapter.b))
    return fold(base.astype(compute), a, b, extras).astype(dtype)


def _fold_all(group: Sequence[Adapter], base: jax.Array, dtype: Any) -> jax.Array:
    """``base`` with the updates of every adapter of ``group`` (one weight) folded in,
    in the compute dtype, rounded once to ``dtype``."""
    compute = jnp.promote_types(base.dtype, jnp.float32)
    for adapter in group[:-1]:
        base = _fold(adapter, base, compute)
    return _fold(group[-1], base, dtype)


def _check_all_mergeable(found: Sequence[Adapter]) -> None:
    for adapter in found:
        check_mergeable(adapter)


def _float_dtype(dtype: Any) -> np.dtype[Any] | None:
    """``dtype`` as a NumPy dtype, checked to be floating point (``None`` stays ``None``)."""
    if dtype is None:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise DtypeError(
            f"merge_and_unload(dtype=...) takes a floating-point dtype for the merged weights; "
            f"got {dtype!r}. Pass e.g. dtype=jnp.float32 or jnp.bfloat16, or None to keep each "
            "weight's own dtype (for a QLoRA weight, that of its quantization scale)."
        )
    return resolved


# The verbs.


def merge_and_unload(
    model: nnx.Module, *, dtype: Any = None, names: Collection[str] | None = None
) -> nnx.Module:
    """A plain copy of the adapted ``model`` with the updates folded into its weights.

    Args:
        model: The adapted model (``PeftModel.model``); it is not modified.
        dtype: Dtype of the merged weights; ``None`` keeps each weight's dtype
            (for a QLoRA weight: dequantized, in the dtype of its scale).
            Weights without an adapter keep theirs.
        names: The adapters to fold in; ``None``: those in use (the active set).
            The others are dropped.

    Returns:
        A model of the base model's class with the base model's structure: no
        interception, no adapter variables, the merged weights as ``nnx.Param``.
        Weights without an adapter share their buffers with ``model``.

    Raises:
        DtypeError: ``dtype`` is not a floating-point dtype.
        UnmergeableAdapterError: An update cannot be folded exactly.
        AdapterStateError: Called inside ``disable_adapter()``.
    """
    resolved = _float_dtype(dtype)
    found = in_use(model) if names is None else adapters(model, names)
    _check_all_mergeable(found)
    allowed = (AdapterState.ACTIVE, AdapterState.MERGED)
    if names is None:
        _require(found, allowed, "merge_and_unload()")
    else:  # an adapter outside the active set may be folded in too
        _require(adapters(model), (*allowed, AdapterState.INACTIVE), "merge_and_unload()")
    chosen = {(a.path, a.weight, a.adapter) for a in found}
    plain = nnx.clone(model)
    for group in by_weight(adapters(plain)):
        stored = group[0].base
        base = weight_value(stored, _base_values(group))
        folded = [a for a in group if (a.path, a.weight, a.adapter) in chosen]
        if folded:
            base = _fold_all(folded, base, base.dtype if resolved is None else resolved)
        setattr(group[0].module, group[0].weight, weight_variables(stored)[0].replace(base))
        for adapter in group:
            adapter.remove()
    _saved_modules.unmark(plain)
    unwrap(plain)
    return plain


def merge_adapter(model: nnx.Module) -> None:
    """Folds the update of every adapter in use into its base weight, in place, keeping the
    originals.

    Float weights become ``W + scale * delta`` (the updates of all active adapters of the
    weight), rounded once to their dtype. QLoRA weights are dequantized, updated and
    quantized again the way Qwix quantized them, which rounds the sum to the quantization
    grid.

    Raises:
        AdapterStateError: The adapters are already merged, or disabled.
        UnmergeableAdapterError: An update cannot be folded exactly.
    """
    found = in_use(model)
    _require(found, (AdapterState.ACTIVE,), "merge_adapter()")
    _check_all_mergeable(found)
    merges = []
    for group in by_weight(found):  # compute all before changing any
        stored = group[0].base
        originals = _base_values(group)
        base = weight_value(stored, originals)
        merges.append((originals, weight_values(stored, _fold_all(group, base, base.dtype))))
    for group, (originals, merged) in zip(by_weight(found), merges, strict=True):
        for variable, value in zip(weight_variables(group[0].base), merged, strict=True):
            variable.set_value(value)
        group[0].keep_unmerged(originals)  # once per weight
        for adapter in group:
            adapter.set_state(AdapterState.MERGED)


def unmerge_adapter(model: nnx.Module) -> None:
    """Restores the base weights saved by :func:`merge_adapter`, bit for bit.

    Raises:
        AdapterStateError: The adapters are not merged, or disabled.
    """
    found = in_use(model)
    _require(found, (AdapterState.MERGED,), "unmerge_adapter()")
    for group in by_weight(found):
        holder = next(a for a in group if a.unmerged is not None)
        unmerged = holder.unmerged
        assert unmerged is not None
        for variable, value in zip(
            weight_variables(holder.base), unmerged.get_value(), strict=True
        ):
            variable.set_value(value)
        holder.drop_unmerged()
        for adapter in group:
            adapter.set_state(AdapterState.ACTIVE)


@contextlib.contextmanager
def disable_adapter(model: nnx.Module) -> Iterator[None]:
    """Runs the block with every update switched off, then restores the adapters.

    Merged adapters are unmerged for the block and merged again after it.
    Modules in ``modules_to_save`` hold their values from before training for
    the block. The previous state comes back also when the block raises.
    """
    was_merged = is_merged(model)
    if was_merged:
        unmerge_adapter(model)
    found = in_use(model)
    previous = [adapter.state for adapter in found]
    for adapter in found:
        adapter.set_state(AdapterState.DISABLED)
    try:
        with _saved_modules.originals(model):
            yield
    finally:
        for adapter, state in zip(found, previous, strict=True):
            adapter.set_state(state)
        if was_merged:
            merge_adapter(model)
