"""Adapters on a device mesh: shardings derived from the base weight, and overrides.

Each axis of an adapter factor stands for some axes of its base weight: A's
for the weight's batch and contracting (input-side) axes, B's for its batch
and remaining (output-side) axes, and the rank axis for none. When Qwix creates
an adapter (``_qwix_bridge`` calls :func:`adapter_value`), each of its axes is
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
:func:`shard_adapters` overrides the derived shardings by rules.
"""

from __future__ import annotations

import contextlib
import math
import re
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
#: Adapter sharding rules: module-path regex to the specs of (A, B); the first match wins.
Rules: TypeAlias = Mapping[str, tuple[Spec, Spec]]
#: Per adapter axis, the weight axes it stands for: one index, several, or ``None``.
Groups: TypeAlias = Sequence[int | tuple[int, ...] | None]


def _axes(group: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if group is None:
        return ()
    return (group,) if isinstance(group, int) else tuple(group)


def _names(entry: Any) -> tuple[Any, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _joined(names: Sequence[Any]) -> Any:
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
        None if size == 1 else _joined([n for i in _axes(g) for n in _names(spec[i])])
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
            derived.append(_joined([n for i in sharded for n in _names(resolved[i])]))
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
    names = metadata.get("out_sharding")
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
    sharding = getattr(weight, "sharding", None)
    if isinstance(weight, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return
    spec = tuple(sharding.spec) + (None,) * (weight.ndim - len(sharding.spec))
    for variable in quantized:
        value = variable.get_value()
        if not isinstance(value, jax.Array) or value.ndim != weight.ndim:
            continue
        entries = tuple(
            entry
            if size > 1 and size % math.prod(sharding.mesh.shape[n] for n in _names(entry)) == 0
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


def first_named_sharding(arrays: Any) -> NamedSharding | None:
    """The sharding of the first leaf of ``arrays`` that lies on a mesh, if any."""
    for leaf in jax.tree.leaves(arrays):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding
    return None


# --- Overrides -------------------------------------------------------------------------------


def _checked_spec(pattern: str, which: str, spec: Any) -> tuple[Entry, ...]:
    entries = tuple(spec) if isinstance(spec, PartitionSpec | Sequence) else None
    if isinstance(spec, str) or entries is None:
        raise ShardingError(
            f"shard_adapters rule {pattern!r}: the {which} spec must be a PartitionSpec or a "
            f"list of entries (None, a mesh axis name, or a list of names); got {spec!r}. "
            "Example: {r'.*q_proj': (P('fsdp', None), P(None, 'tp', None))}."
        )
    checked: list[Entry] = []
    for entry in entries:
        if entry is None or isinstance(entry, str):
            checked.append(entry)
        elif isinstance(entry, Sequence) and all(isinstance(n, str) for n in entry):
            checked.append(_joined(list(entry)))
        else:
            raise ShardingError(
                f"shard_adapters rule {pattern!r}: the {which} spec {spec!r} has the entry "
                f"{entry!r}; each entry is None, a mesh axis name, or a list of names."
            )
    return tuple(checked)


def checked_rules(rules: Any) -> dict[str, tuple[tuple[Entry, ...], tuple[Entry, ...]]]:
    """``rules`` with every spec as a tuple of entries, after checking their form.

    Raises:
        ShardingError: ``rules`` is not a mapping of regexes to (A spec, B spec) pairs.
    """
    if not isinstance(rules, Mapping) or not rules:
        raise ShardingError(
            f"shard_adapters takes a non-empty mapping of module-path regexes to (A spec, B "
            f"spec) pairs; got {rules!r}. Example: {{r'.*q_proj': (P('fsdp', None), "
            "P(None, 'tp', None))}."
        )
    checked = {}
    for pattern, pair in rules.items():
        if not isinstance(pattern, str) or not pattern:
            raise ShardingError(
                f"shard_adapters rule keys are non-empty regex strings; got {pattern!r}."
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise ShardingError(
                f"shard_adapters rule {pattern!r} is not a valid regex: {err}. It is matched "
                "in full (re.fullmatch) against module paths such as 'layers/0/attn/q_proj'."
            ) from None
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ShardingError(
                f"shard_adapters rule {pattern!r} maps to {pair!r}; it must map to a pair "
                "(A spec, B spec), e.g. (P('fsdp', None), P(None, 'tp'))."
            )
        checked[pattern] = (
            _checked_spec(pattern, "A", pair[0]),
            _checked_spec(pattern, "B", pair[1]),
        )
    return checked


def _fit(
    value: jax.Array, entries: tuple[Entry, ...], name: str, pattern: str
) -> tuple[NamedSharding, tuple[Entry, ...]]:
    """The sharding ``entries`` give ``value`` on its mesh, checked to fit it."""
    current = getattr(value, "sharding", None)
    if not isinstance(current, NamedSharding):
        raise ShardingError(
            f"{name} is not on a device mesh (its sharding is {current}), so rule {pattern!r} "
            "has no mesh to shard it over. Build the base model on a mesh (under "
            "jax.set_mesh(mesh), with sharding metadata such as nnx.with_partitioning) and wrap "
            "it there; its adapters then live on that mesh."
        )
    mesh = current.mesh
    if len(entries) > value.ndim:
        raise ShardingError(
            f"Rule {pattern!r} gives {name} (shape {tuple(value.shape)}) the spec {entries}, "
            f"with more entries than its {value.ndim} axes. Give at most one entry per axis."
        )
    entries += (None,) * (value.ndim - len(entries))
    used = [n for entry in entries for n in _names(entry)]
    unknown = [n for n in used if n not in mesh.axis_names]
    if unknown:
        raise ShardingError(
            f"Rule {pattern!r} shards {name} over {unknown}, which the mesh of its base weights "
            f"lacks; its axes are {list(mesh.axis_names)}."
        )
    if len(set(used)) != len(used):
        raise ShardingError(
            f"Rule {pattern!r} gives {name} the spec {entries}, which uses a mesh axis twice; "
            "each mesh axis can shard one array axis only."
        )
    for axis, (entry, size) in enumerate(zip(entries, value.shape, strict=True)):
        shards = math.prod(mesh.shape[n] for n in _names(entry))
        if size % shards:
            raise ShardingError(
                f"Rule {pattern!r} shards axis {axis} of {name} (size {size}) over {entry!r}, "
                f"{shards} devices, which do not divide it. Choose mesh axes whose sizes "
                "divide it, or leave that axis unsharded (None)."
            )
    return NamedSharding(mesh, PartitionSpec(*entries)), entries


def shard_adapters(model: nnx.Module, rules: Rules) -> None:
    """Moves the adapters that ``rules`` select to the given shardings, and records them.

    Args:
        model: The adapted model (``PeftModel.model``).
        rules: Module-path regex (``re.fullmatch``, as ``LoraConfig.target``) to
            the partition specs of that module's (A, B); the first match wins.
            Adapters no rule selects keep their sharding.

    Raises:
        ShardingError: A rule is malformed, selects no adapter, or does not fit
            an adapter it selects. Nothing is moved then.
    """
    # Imported here: the injection module imports the Qwix bridge, which imports this one.
    from nnx_peft._injection import iter_adapters, module_paths
    from nnx_peft._qwix_bridge import LORA_A_SUFFIX, LORA_B_SUFFIX

    checked = checked_rules(rules)
    modules = module_paths(model)
    planned: list[tuple[nnx.Variable[Any], NamedSharding, tuple[Entry, ...]]] = []
    used: set[str] = set()
    adapted: list[str] = []
    for info in iter_adapters(model):
        adapted.append(info.module_path)
        pattern = next((p for p in checked if re.fullmatch(p, info.module_path)), None)
        if pattern is None:
            continue
        used.add(pattern)
        module = modules[info.module_path]
        for suffix, entries in zip((LORA_A_SUFFIX, LORA_B_SUFFIX), checked[pattern], strict=True):
            variable = getattr(module, info.weight + suffix)
            name = "/".join(p for p in (info.module_path, info.weight + suffix) if p)
            planned.append((variable, *_fit(variable.get_value(), entries, name, pattern)))
    unused = [pattern for pattern in checked if pattern not in used]
    if unused:
        raise ShardingError(
            f"shard_adapters rules {unused} select no adapted module; nothing was moved. The "
            f"adapted module paths are {sorted(set(adapted))} (matched in full, re.fullmatch)."
        )
    for variable, sharding, entries in planned:
        variable.set_value(jax.device_put(variable.get_value(), sharding))
        variable.set_metadata(out_sharding=entries)


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
