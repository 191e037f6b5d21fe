"""Adapters for scanned layer stacks: one adapter per layer, stacked like the weights.

A model that scans over its layers (``nnx.scan`` over ``nnx.vmap``-created
blocks, or ``jax.lax.scan`` over a split state with ``nnx.merge`` in the body,
as MaxText does) keeps one module whose weights carry an extra layer axis. Its
call runs on a per-layer copy of that module inside the scan body, where the
weights are traced slices and no variable can be added (the scan's carry and
outputs are fixed). So when the Qwix provider meets a weight without adapter
in such a copy, it only records a :class:`Pending` adapter: what the per-layer
adapter looks like. After the sample call, :func:`create` makes the stacked
adapter on the stacked module itself: per layer, the factors (and DoRA's
magnitude, and PiSSA's residual) the unstacked code would make for that
layer's weight, computed under ``jax.vmap`` and stacked along the weight's
layer axis. From then on the scan body slices the adapters with the weights,
and the per-layer layout the provider recorded applies to each slice; merging
maps the per-layer maths over the layer axis (``LoraLayout.layer_axis``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_peft import _sharding
from nnx_peft._errors import (
    LayerStackError,
    PeftError,
    StackedPatternError,
    UnsupportedLayerError,
)
from nnx_peft._layout import LoraLayout
from nnx_peft._paths import path_string
from nnx_peft._variables import AdapterParam
from nnx_peft._variants import AdapterSpec


def _params(module: nnx.Module) -> dict[str, nnx.Variable[Any]]:
    """The module's own base parameters (no adapters), by attribute name."""
    return {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, nnx.Param) and not isinstance(value, AdapterParam)
    }


def _shape_pairs(
    stacked: nnx.Module, layer: nnx.Module
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per base weight of ``stacked``, its shape and that of ``layer``'s copy of it."""
    pairs = {}
    for name, variable in _params(stacked).items():
        inner = getattr(layer, name, None)
        if isinstance(inner, nnx.Variable):
            pairs[name] = (tuple(variable.get_value().shape), tuple(inner.get_value().shape))
    return pairs


def describe_shapes(stacked: nnx.Module, layer: nnx.Module) -> str:
    """``'kernel (4, 8, 8) -> (8, 8), ...'``: the weights whole and as a layer, for messages."""
    pairs = _shape_pairs(stacked, layer).items()
    return ", ".join(f"{name} {whole} -> {part}" for name, (whole, part) in pairs)


def layer_axes(stacked: nnx.Module, layer: nnx.Module, where: str) -> tuple[int | None, ...]:
    """The axes along which ``stacked`` may hold the weights that ``layer`` sees one layer of.

    Args:
        stacked: The module of the model.
        layer: The copy of it that a transform (the scan body) runs.
        where: The module, for messages.

    Returns:
        The axes that fit every weight, ``None`` standing for a transform
        such as ``nnx.remat`` that does not slice; several when the shapes
        cannot tell (an output kernel ``(layers, heads, head_dim, width)`` with
        as many heads as layers): :func:`resolve` decides those.

    Raises:
        LayerStackError: The copy's weights are not the module's with one and
            the same axis removed.
    """
    candidates: set[int | None] | None = None
    for whole, part in _shape_pairs(stacked, layer).values():
        fits: set[int | None] = {None} if whole == part else set()
        fits |= {i for i in range(len(whole)) if whole[:i] + whole[i + 1 :] == part}
        candidates = fits if candidates is None else candidates & fits
    if not candidates:
        raise LayerStackError(
            f"Module {where!r} runs inside a transform (a scan over layers) whose per-layer "
            f"weights are not its weights with one common axis removed: "
            f"{describe_shapes(stacked, layer)}. "
            "Adapters need a stack of equal layers, every weight stacked along the same axis. "
            "Stack every weight of the module, or exclude it with LoraConfig.exclude."
        )
    return tuple(sorted(candidates, key=lambda a: -1 if a is None else a))


def _shared_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.split("/"), b.split("/"), strict=False):
        if x != y:
            break
        count += 1
    return count


def resolve(pending: Sequence[Pending]) -> list[Pending]:
    """``pending`` with each layer axis decided.

    A module whose shapes fit several axes takes the axis of the modules
    nearest to it in the module tree (the longest shared path prefix) whose
    shapes tell theirs: the layers of one stack are sliced alike.

    Raises:
        LayerStackError: No such module tells the axis, or they disagree.
    """
    known = [p for p in pending if len(p.axes) == 1]
    resolved = []
    for item in pending:
        if len(item.axes) == 1:
            resolved.append(item)
            continue
        near = [(_shared_prefix(item.path, k.path), k) for k in known]
        best = max((n for n, _ in near), default=0)
        told = {k.axes[0] for n, k in near if n == best and n > 0} & set(item.axes)
        if len(told) != 1:
            axes = [a for a in item.axes if a is not None]
            raise LayerStackError(
                f"Module {item.path!r} runs inside a scan over layers, and its layer axis "
                f"cannot be told from its shapes (axes {axes} all fit {item.shapes}), nor from "
                "other adapted modules of the same stack. Also target a module of the stack "
                "whose shapes tell the axis (one with no other axis as long as the stack is "
                "deep), or exclude the module with LoraConfig.exclude."
            )
        resolved.append(dataclasses.replace(item, axes=(told.pop(),)))
    return resolved


def check_pattern_names_no_layer(field: str, pattern: str, stacks: dict[str, int]) -> None:
    """Refuses a ``rank_pattern`` / ``alpha_pattern`` key that selects one layer of a stack.

    A key that applies to no adapted module, yet fully matches a stacked
    module's path with a layer index put in it (``'blocks/1/wi'`` for the
    stack ``'blocks/wi'``, as the unrolled model would name the layer), asks
    for one rank within a stack whose layers share one module.

    Args:
        field: ``'rank_pattern'`` or ``'alpha_pattern'``.
        pattern: The key, which applies to no adapted module.
        stacks: The stacked modules' paths, with their number of layers.

    Raises:
        StackedPatternError: Naming the stacked module and the layers the key picks.
    """
    for path, depth in stacks.items():
        parts = path.split("/")
        for cut in range(len(parts) + 1):
            picked = [
                i
                for i in range(depth)
                if re.fullmatch(pattern, "/".join([*parts[:cut], str(i), *parts[cut:]]))
            ]
            if picked:
                raise StackedPatternError(
                    f"LoraConfig.{field} key {pattern!r} names layer(s) {picked} of the stacked "
                    f"module {path!r} ({depth} layers scanned as one module): the layers of a "
                    "stack share one module, so they share its rank and alpha. Patterns apply "
                    f"to the stacked module as a whole: use a key matching {path!r}, or unroll "
                    "the layers (scan_layers=False) to give them different ranks."
                )


def stacked_groups(groups: _sharding.Groups, axis: int) -> tuple[Any, ...]:
    """Per axis of a stacked factor, the stacked weight's axes it stands for.

    ``groups`` names, per axis of one layer's factor, axes of one layer's
    weight; the stacked factor has the layer axis at ``axis``, standing for
    the weight's layer axis.
    """

    def shift(group: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
        if group is None:
            return None
        if isinstance(group, int):
            return group + (group >= axis)
        return tuple(g + (g >= axis) for g in group)

    shifted = [shift(g) for g in groups]
    shifted.insert(axis, axis)
    return tuple(shifted)


@dataclasses.dataclass(frozen=True)
class Pending:
    """An adapter to create on a stacked module after the sample call.

    Attributes:
        module: The stacked module (of the model, not the scan body's copy).
        path: Its path, for messages.
        name: The adapted weight's attribute name.
        axes: The possible layer axes (``None``: a transform that does not
            slice); one, once :func:`resolve` has decided.
        shapes: The weights' shapes, whole and per layer, for messages.
        spec: The module's rank, scale, variant and initializer.
        a_shape: One layer's A shape.
        b_shape: One layer's B shape.
        a_groups: Per axis of one layer's A, the weight axes it stands for.
        b_groups: The same for B.
        layout: One layer's layout (its scale, variant and subscripts set).
        dropout: The adapter's dropout rate.
        quantize: For QLoRA, how Qwix quantizes one layer's weight (a
            ``HowToQuantize``): the stacked weight is quantized so before
            the adapter is made (see :func:`stacked_how`). ``None`` otherwise.
    """

    module: nnx.Module
    path: str
    name: str
    axes: tuple[int | None, ...]
    shapes: str
    spec: AdapterSpec
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_groups: _sharding.Groups
    b_groups: _sharding.Groups
    layout: LoraLayout
    dropout: float = 0.0
    quantize: Any = None

    @property
    def axis(self) -> int | None:
        """The layer axis, once decided."""
        (axis,) = self.axes
        return axis


@dataclasses.dataclass(frozen=True)
class Stacked:
    """The arrays of a new stacked adapter.

    Attributes:
        a: A, stacked on the layer axis.
        b: B, stacked alike.
        extras: The variant's extra trained arrays (DoRA's magnitude), by
            attribute suffix, stacked alike.
        residual: The stacked weight's new value (PiSSA, OLoRA), or ``None``.
        groups: Per array (``'a'``, ``'b'`` and the extras' suffixes), the
            stacked weight's axes each of its axes stands for.
    """

    a: jax.Array
    b: jax.Array
    extras: dict[str, jax.Array]
    residual: jax.Array | None
    groups: dict[str, tuple[Any, ...]]


def stacked_values(pending: Pending, weight: jax.Array, rngs: nnx.Rngs) -> Stacked:
    """The arrays of the stacked adapter ``pending`` describes, for the stacked ``weight``.

    Each layer's factors are what the unstacked code makes for that layer's
    weight: drawn from its own key, or (PiSSA, OLoRA) computed from its own
    weight with one decomposition per layer; DoRA's magnitude is that layer's.

    Raises:
        LayerStackError: A per-layer array has fewer axes than the layer
            axis's position, so it cannot be stacked there.
    """
    axis, spec, sub = pending.axis, pending.spec, pending.layout.subscripts
    assert sub is not None
    where = f"the weight {pending.name!r} of module {pending.path!r}"
    dtype = spec.dtype or weight.dtype  # LoraConfig.adapter_dtype, as for a weight not stacked
    extra_dtype = jnp.promote_types(dtype, jnp.float32)  # a DoRA magnitude: float32 at least
    extra_groups: dict[str, tuple[int, ...]] = {}

    def one_layer(key_a: jax.Array, key_b: jax.Array, w: jax.Array) -> Any:
        start = spec.init.start(
            sub=sub,
            weight=lambda: w,
            rank=spec.rank,
            scale=spec.scale,
            a_shape=pending.a_shape,
            b_shape=pending.b_shape,
            where=where,
        )
        a = start.a(key_a, pending.a_shape, dtype)
        b = start.b(key_b, pending.b_shape, dtype)
        used = w if start.residual is None else start.residual.astype(w.dtype)
        extras = spec.update.extra_params(sub, used, a, b, spec.scale)
        extra_groups.update({suffix: groups for suffix, (_, groups) in extras.items()})
        values = {suffix: value.astype(extra_dtype) for suffix, (value, _) in extras.items()}
        return a, b, start.residual, values

    key_a, key_b = rngs.params(), rngs.params()
    if axis is None:
        a, b, residual, extras = one_layer(key_a, key_b, weight)
    else:
        depth = weight.shape[axis]
        per_layer = jax.vmap(one_layer, in_axes=(0, 0, axis), out_axes=0)(
            jax.random.split(key_a, depth), jax.random.split(key_b, depth), weight
        )

        def to_axis(x: jax.Array) -> jax.Array:
            if x.ndim - 1 < axis:
                raise LayerStackError(
                    f"The adapter of {where} has a per-layer array of {x.ndim - 1} axes, which "
                    f"cannot be stacked on the weight's layer axis {axis}. Stack the module's "
                    "weights on an earlier axis, or exclude the module with LoraConfig.exclude."
                )
            return jnp.moveaxis(x, 0, axis)

        a, b, residual, extras = jax.tree.map(to_axis, per_layer)

    def stacked(per_layer: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(per_layer) if axis is None else stacked_groups(per_layer, axis)

    groups = {"a": stacked(pending.a_groups), "b": stacked(pending.b_groups)}
    groups.update({suffix: stacked(g) for suffix, g in extra_groups.items()})
    return Stacked(a=a, b=b, extras=extras, residual=residual, groups=groups)


def stacked_how(how: Any, axis: int | None) -> Any:
    """How to quantize a stack so that each layer is quantized as ``how`` quantizes one layer.

    The layer axis becomes a channel axis (each layer its own scales: no tile crosses
    it) and every other axis of ``how`` moves past it. ``None`` (a transform that does
    not slice) keeps ``how``.
    """
    if axis is None:
        return how

    def shift(a: int) -> int:
        return a + 1 if a >= axis else a

    return dataclasses.replace(
        how,
        channelwise_axes=(axis, *(shift(a) for a in how.channelwise_axes)),
        tiled_axes={shift(a): tile for a, tile in how.tiled_axes.items()},
    )


def stacked_dropout(pending: Pending, weight: jax.Array, rngs: nnx.Rngs) -> nnx.Dropout:
    """The adapter's dropout for a stack: one RNG stream per layer, stacked on axis 0.

    The scan slices the stream with the weights, so each layer draws its own
    masks, and carries the advanced counts back (nnx.scan does;
    :func:`check_dropout_carried` checks it).

    Raises:
        LayerStackError: The layer axis is not 0: a layer's RNG key is a
            scalar, so it can be stacked only on a leading axis.
    """
    axis = pending.axis
    layer = nnx.Dropout(pending.dropout, rngs=rngs)
    if axis is None:
        return layer
    if axis != 0:
        raise LayerStackError(
            f"LoraConfig.dropout={pending.dropout} on the weight {pending.name!r} of module "
            f"{pending.path!r}, stacked on axis {axis}: a layer's dropout RNG key is a scalar, "
            "so per-layer keys stack only on axis 0, which this scan does not slice. Use "
            "dropout=0.0, stack the weights on axis 0, or exclude the module with "
            "LoraConfig.exclude."
        )
    assert layer.rngs is not None
    stacked = StackedDropout(pending.dropout)
    stacked.rngs = layer.rngs.split(weight.shape[0])  # one stream per layer
    return stacked


class StackedDropout(nnx.Dropout):
    """An adapter's dropout on a stack: its RNG key and count have a leading layer axis."""


def check_dropout_carried(model: nnx.Module, call: Callable[[], Any]) -> None:
    """Refuses stacked dropout whose scan does not slice its RNG state or carry it back.

    Runs ``call`` (the sample call) once with the stacked dropouts in training
    mode, then puts every RNG counter of ``model`` back. Each layer must have
    drawn from its own stream and the scan must have returned the advanced
    counts; otherwise every step would draw the same masks (a ``jax.lax.scan``
    whose body does not return its state), or the call fails (a scan that
    broadcasts RNG state instead of slicing it).

    Raises:
        UnsupportedLayerError: Naming the stacked modules and the fix.
    """
    layers = {
        path_string(path): m for path, m in nnx.iter_modules(model) if isinstance(m, StackedDropout)
    }
    if not layers:
        return
    counters = [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.RngCount))]
    saved = [v.get_value() for v in counters]
    modes = {path: m.deterministic for path, m in layers.items()}
    for m in layers.values():
        m.deterministic = False
    before = {path: np.asarray(_count(m)) for path, m in layers.items()}
    fix = (
        "Slice every variable of the stacked module in the scan, RNG state included, and "
        "return the body's updated state (nnx.scan does both), or use dropout=0.0, or "
        "exclude the stacked modules with LoraConfig.exclude."
    )
    try:
        call()
    except PeftError:
        raise
    except Exception as error:  # the scan's own failure on the dropout's RNG state
        raise UnsupportedLayerError(
            f"LoraConfig.dropout on the stacked modules {sorted(layers)}: the model's scan "
            f"fails on their per-layer dropout RNG state ({type(error).__name__}: {error}). " + fix
        ) from error
    finally:
        for path, m in layers.items():
            m.deterministic = modes[path]
    stale = sorted(p for p, m in layers.items() if not np.all(np.asarray(_count(m)) > before[p]))
    for variable, value in zip(counters, saved, strict=True):
        variable.set_value(value)
    if stale:
        raise UnsupportedLayerError(
            f"LoraConfig.dropout on the stacked modules {stale}: after a call in training "
            "mode their per-layer dropout RNG counts did not advance, so the model's scan "
            "does not carry that state back and every step would draw the same masks. " + fix
        )


def _count(layer: nnx.Dropout) -> Any:
    assert layer.rngs is not None
    return layer.rngs.count.get_value()
