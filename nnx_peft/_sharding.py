"""Adapters on a device mesh: the shardings an adapter derives from its base weight.

Each axis of an adapter factor stands for some axes of its base weight: A's
for the weight's batch and contracting (input-side) axes, B's for its batch
and remaining (output-side) axes, and the rank axis for none. When Qwix creates
an adapter (``_adapter_ops`` calls :func:`adapter_value`), each of its axes is
sharded over the mesh axes of the weight axes it stands for, in order:

- ``nnx.Linear``, kernel ``(D, F)`` sharded ``('fsdp', 'tp')``: A ``(D, r)`` is
  ``('fsdp', None)`` and B ``(r, F)`` is ``(None, 'tp')``;
- an einsum keeps the weight's axes: ``'BTD,DNH->BTNH'`` with a kernel
  ``(D, N, H)`` sharded ``('fsdp', 'tp', None)`` gives A ``(D, r)``
  ``('fsdp', None)`` and B ``(r, N, H)`` ``(None, 'tp', None)``;
- a ``dot_general`` over several contracting (or remaining) axes flattens them
  into one adapter axis: ``nnx.LinearGeneral`` with a kernel ``(D, N, H)``
  gives B ``(r, N * H)``, sharded over the mesh axes of ``N`` and then ``H``.
  Qwix alone takes those of the first axis only, which leaves B replicated
  when ``H`` is sharded and ``N`` is not.

The base weight's NNX sharding metadata (``out_sharding``) is rewritten the same
way for the adapter, so ``nnx.get_partition_spec`` tells where the adapters
are, and an ``nnx.Optimizer`` places its state there too.
``_resharding.shard_adapters`` overrides the derived shardings by rules; this module is
the low-level placement the Qwix bridge uses, and imports nothing above it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import jax
from flax import nnx
from flax.nnx import spmd
from jax.sharding import NamedSharding, PartitionSpec

from nnx_peft._errors import ShardingError

#: One entry of a partition spec: no mesh axis, one, or several (major to minor).
Entry: TypeAlias = str | tuple[str, ...] | None
#: A partition spec for one adapter factor: a ``PartitionSpec`` or a sequence of entries.
Spec: TypeAlias = PartitionSpec | Sequence[str | Sequence[str] | None]
#: Adapter sharding rules: module-path regex to the specs of (A, B), or of (A, B, DoRA
#: magnitude), or, for a ``modules_to_save`` module, a mapping of its parameter paths to
#: their specs; the first match wins.
Rules: TypeAlias = Mapping[str, tuple[Spec, ...] | Mapping[str, Spec]]
#: Per adapter axis, the weight axes it stands for: one index, several, or ``None``.
Groups: TypeAlias = Sequence[int | tuple[int, ...] | None]


def _axes(group: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if group is None:
        return ()
    return (group,) if isinstance(group, int) else tuple(group)


def entry_names(entry: Any) -> tuple[Any, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def joined_entry(names: Sequence[Any]) -> Any:
    return None if not names else names[0] if len(names) == 1 else tuple(names)


def derive_spec(spec: Sequence[Entry], groups: Groups, shape: Sequence[int]) -> tuple[Entry, ...]:
    """An adapter factor's spec: each axis over the mesh axes of the weight axes it stands for.

    Args:
        spec: The base weight's partition spec, one entry per weight axis.
        groups: Per adapter axis, the weight axes it stands for.
        shape: The adapter factor's shape; an axis of size 1 is not sharded.

    Example:
        >>> derive_spec(("fsdp", None, "tp"), [None, (1, 2)], (4, 32))
        (None, 'tp')
        >>> derive_spec(("fsdp", "tp", None), [0, None], (16, 4))
        ('fsdp', None)
    """
    return tuple(
        None if size == 1 else joined_entry([n for i in _axes(g) for n in entry_names(spec[i])])
        for g, size in zip(groups, shape, strict=True)
    )


def _derive_metadata(
    base: nnx.Variable[Any], names: Sequence[Any], groups: Groups, shape: Sequence[int]
) -> tuple[Any, ...]:
    """The adapter's ``out_sharding`` metadata from the base weight's, in the same vocabulary.

    Names may be logical axis names that rules map to mesh axes. An adapter
    axis standing for one weight axis keeps its name. One that flattens several
    keeps the name of the only one mapped to a mesh axis, and otherwise gets
    their mesh axes, since a tuple of logical names is not something rules map.
    """
    names = tuple(names) + (None,) * (len(base.shape) - len(names))
    resolved = tuple(spmd.get_var_pspec(base) or ())
    resolved += (None,) * (len(names) - len(resolved))
    derived: list[Any] = []
    for group, size in zip(groups, shape, strict=True):
        axes = _axes(group)
        sharded = [i for i in axes if names[i] is not None and resolved[i] is not None]
        if size == 1 or not axes:
            derived.append(None)
        elif len(axes) == 1:
            derived.append(names[axes[0]])
        elif len(sharded) <= 1:
            derived.append(names[sharded[0]] if sharded else None)
        else:
            derived.append(joined_entry([n for i in sharded for n in entry_names(resolved[i])]))
    return tuple(derived)


def adapter_value(
    value: jax.Array,
    base: Any,
    sharding: NamedSharding | None,
    groups: Groups,
) -> Any:
    """A new adapter factor placed and annotated like its base weight.

    Args:
        value: The factor's initial value.
        base: The base weight's variable (for a QLoRA weight, that of its
            quantized values), or a bare array.
        sharding: The base weight's ``NamedSharding`` with a full-length spec,
            or ``None`` when it is not on a mesh.
        groups: Per axis of ``value``, the weight axes it stands for.

    Returns:
        ``value`` on the derived sharding; wrapped in ``nnx.VariableMetadata``
        with the base weight's metadata, its ``out_sharding`` derived alike,
        when ``base`` is a variable.
    """
    if sharding is not None:
        spec = PartitionSpec(*derive_spec(tuple(sharding.spec), groups, value.shape))
        value = jax.device_put(value, sharding.update(spec=spec))
    if not isinstance(base, nnx.Variable):
        return value
    metadata = dict(base.get_metadata())
    # Flax treats ``sharding_names`` (and ``sharding``) as aliases of ``out_sharding``
    # and lets them override it when a Variable is made from this metadata: copied
    # as they are, the adapter would carry the weight's axis names. They are read
    # as the weight's names (as Flax would) and replaced by the derived ones.
    aliases = [metadata.pop(alias) for alias in ("sharding_names", "sharding") if alias in metadata]
    names = aliases[0] if aliases else metadata.get("out_sharding")
    if isinstance(names, tuple | list | PartitionSpec):
        derived = _derive_metadata(base, tuple(names), groups, value.shape)
        metadata["out_sharding"] = (
            PartitionSpec(*derived) if isinstance(names, PartitionSpec) else derived
        )
    return nnx.VariableMetadata(value, metadata=metadata)


def place_quantized(weight: Any, quantized: Sequence[nnx.Variable[Any]]) -> None:
    """Puts the arrays of a QLoRA weight (quantized values, scales) on the float weight's layout.

    Qwix quantizes a weight with eager operations whose outputs XLA may lay out
    differently, e.g. the quantized values replicated over an axis that sharded
    the float weight. Each array axis keeps the weight axis's mesh axes where
    they divide its size (a scale's axis of tiles, say) and is not sharded
    otherwise; its ``out_sharding`` metadata, copied from the weight by Qwix,
    drops what placement drops.

    Args:
        weight: The float weight the arrays were quantized from.
        quantized: The variables of the quantized weight.
    """
    sharding = sharding_of(weight)
    if not isinstance(sharding, NamedSharding):
        return
    spec = tuple(sharding.spec) + (None,) * (weight.ndim - len(sharding.spec))
    for variable in quantized:
        value = variable.get_value()
        if not isinstance(value, jax.Array) or value.ndim != weight.ndim:
            continue
        mesh_shape = sharding.mesh.shape
        entries = tuple(
            entry
            if size > 1 and size % math.prod(mesh_shape[n] for n in entry_names(entry)) == 0
            else None
            for entry, size in zip(spec, value.shape, strict=True)
        )
        variable.set_value(jax.device_put(value, sharding.update(spec=PartitionSpec(*entries))))
        names = variable.get_metadata().get("out_sharding")
        if isinstance(names, tuple | list | PartitionSpec) and len(names) == value.ndim:
            kept = tuple(n if e is not None else None for n, e in zip(names, entries, strict=True))
            variable.set_metadata(out_sharding=kept)


@contextlib.contextmanager
def mesh_of(sharding: Any) -> Iterator[None]:
    """Makes the mesh of ``sharding`` the current mesh while no mesh is set.

    NNX places a variable that carries sharding metadata when it is created
    (eager sharding), on the current mesh, and refuses without one. A model
    built under ``jax.set_mesh(mesh)`` keeps its weights on that mesh after the
    block ends, so the adapters and optimizer state made for it later are put
    on the mesh its weights are on.
    """
    mesh = getattr(sharding, "mesh", None)
    if isinstance(mesh, jax.sharding.Mesh) and jax.sharding.get_abstract_mesh().empty:
        with jax.set_mesh(mesh):
            yield
    else:
        yield


def sharding_of(value: Any) -> Any:
    """``value.sharding``, or None where it has none, a tracer included.

    A tracer has no ``sharding``, and asking it costs a walk over everything
    traced so far (JAX builds the ``AttributeError``'s message from it), so
    asking once per weight in a traced wrap grows with the model's depth
    squared. This never asks a tracer.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    return getattr(value, "sharding", None)


def first_named_sharding(arrays: Any) -> NamedSharding | None:
    """The sharding of the first leaf of ``arrays`` that lies on a mesh, if any."""
    for leaf in jax.tree.leaves(arrays):
        sharding = sharding_of(leaf)
        if isinstance(sharding, NamedSharding):
            return sharding
    return None


def require_addressable(arrays: Mapping[str, jax.Array], action: str) -> None:
    """Raises :class:`ShardingError` if this process does not hold all of some array.

    On several hosts an array sharded across them has parts on the other
    hosts' devices only; copying it to this host's memory is impossible.
    """
    spread = sorted(path for path, x in arrays.items() if not x.is_fully_addressable)
    if spread:
        raise ShardingError(
            f"{action} needs every adapter array on this process's devices, but "
            f"{len(spread)} are spread over several hosts ({', '.join(spread[:3])}, ...). Use "
            "save_adapter (Orbax writes sharded arrays from every host), or gather the adapters "
            "first with jax.experimental.multihost_utils.process_allgather and write from one "
            "process."
        )
