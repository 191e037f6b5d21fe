"""``PeftModel.shard_adapters``: moving adapters to shardings given by rules.

The shardings an adapter gets when it is created are derived from its base weight's
(:mod:`nnx_peft._sharding`); this module overrides them after the wrap, by module-path
rules, for the adapters, DoRA magnitudes and ``modules_to_save`` parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnx_peft import _saved_modules
from nnx_peft._adapter import adapters
from nnx_peft._errors import ShardingError
from nnx_peft._parts import LORA_A_SUFFIX, LORA_B_SUFFIX, MAGNITUDE_SUFFIX
from nnx_peft._sharding import Entry, Rules, entry_names, joined_entry


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
            checked.append(joined_entry(list(entry)))
        else:
            raise ShardingError(
                f"shard_adapters rule {pattern!r}: the {which} spec {spec!r} has the entry "
                f"{entry!r}; each entry is None, a mesh axis name, or a list of names."
            )
    return tuple(checked)


#: A checked rule: the entries of (A, B, magnitude or None), or per saved parameter path.
Checked: TypeAlias = tuple[tuple[Entry, ...] | None, ...] | dict[str, tuple[Entry, ...]]


def checked_rules(rules: Any) -> dict[str, Checked]:
    """``rules`` with every spec as a tuple of entries, after checking their form.

    Raises:
        ShardingError: ``rules`` is not a mapping of regexes to (A spec, B spec)
            pairs, (A, B, magnitude) triples, or mappings of parameter paths to specs.
    """
    if not isinstance(rules, Mapping) or not rules:
        raise ShardingError(
            f"shard_adapters takes a non-empty mapping of module-path regexes to (A spec, B "
            f"spec) pairs; got {rules!r}. Example: {{r'.*q_proj': (P('fsdp', None), "
            "P(None, 'tp', None))}."
        )
    checked: dict[str, Checked] = {}
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
        if isinstance(pair, Mapping):
            if not pair or not all(isinstance(k, str) and k for k in pair):
                raise ShardingError(
                    f"shard_adapters rule {pattern!r} maps to {pair!r}; a rule for a "
                    "modules_to_save module maps its parameter paths to specs, e.g. "
                    "{'head': {'kernel': P(None, 'tp'), 'bias': P('tp')}}."
                )
            checked[pattern] = {k: _checked_spec(pattern, k, v) for k, v in pair.items()}
            continue
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) not in (2, 3):
            raise ShardingError(
                f"shard_adapters rule {pattern!r} maps to {pair!r}; it must map to a pair "
                "(A spec, B spec), e.g. (P('fsdp', None), P(None, 'tp')), or a triple (A spec, "
                "B spec, DoRA magnitude spec)."
            )
        checked[pattern] = (
            _checked_spec(pattern, "A", pair[0]),
            _checked_spec(pattern, "B", pair[1]),
            _checked_spec(pattern, "magnitude", pair[2]) if len(pair) == 3 else None,
        )
    return checked


def _magnitude_entries(
    b_entries: tuple[Entry, ...], b_shape: tuple[int, ...], rank_axis: int, shape: tuple[int, ...]
) -> tuple[Entry, ...] | None:
    """B's entries without its rank axis, if B holds the magnitude's axes unflattened."""
    b_entries += (None,) * (len(b_shape) - len(b_entries))
    if b_shape[:rank_axis] + b_shape[rank_axis + 1 :] != shape:
        return None
    return b_entries[:rank_axis] + b_entries[rank_axis + 1 :]


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
    used = [n for entry in entries for n in entry_names(entry)]
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
        shards = math.prod(mesh.shape[n] for n in entry_names(entry))
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
    checked = checked_rules(rules)
    planned: list[tuple[nnx.Variable[Any], NamedSharding, tuple[Entry, ...]]] = []
    used: set[str] = set()
    adapted: list[str] = []
    for adapter in adapters(model):
        info = adapter.info()
        adapted.append(info.module_path)
        pattern = next((p for p in checked if re.fullmatch(p, info.module_path)), None)
        if pattern is None:
            continue
        rule = checked[pattern]
        if isinstance(rule, dict):
            raise ShardingError(
                f"shard_adapters rule {pattern!r} maps parameter paths to specs, which is for "
                f"modules_to_save modules, but it selects the adapted module "
                f"{info.module_path!r}; give it (A spec, B spec) instead."
            )
        used.add(pattern)
        a_entries, b_entries, m_entries = rule
        for suffix, entries in ((LORA_A_SUFFIX, a_entries), (LORA_B_SUFFIX, b_entries)):
            assert entries is not None
            variable: nnx.Variable[Any] = adapter.trained()[suffix]
            name = "/".join(p for p in (info.module_path, adapter.name(suffix)) if p)
            planned.append((variable, *_fit(variable.get_value(), entries, name, pattern)))
        name = "/".join(p for p in (info.module_path, adapter.name(MAGNITUDE_SUFFIX)) if p)
        magnitude = adapter.magnitude
        if magnitude is None or info.magnitude_shape is None:
            if m_entries is not None:
                raise ShardingError(
                    f"shard_adapters rule {pattern!r} gives a magnitude spec, but the adapter of "
                    f"{info.module_path!r} is not a DoRA adapter; give (A spec, B spec)."
                )
            continue
        if m_entries is None:
            assert b_entries is not None
            layout = adapter.layout
            rank_axis = len(layout.batch) if layout.kind == "dot_general" else 0
            m_entries = _magnitude_entries(b_entries, info.b_shape, rank_axis, info.magnitude_shape)
            if m_entries is None:
                raise ShardingError(
                    f"shard_adapters rule {pattern!r} moves the DoRA adapter of "
                    f"{info.module_path!r}, whose magnitude {name} (shape "
                    f"{info.magnitude_shape}) does not follow B's axes {info.b_shape}; give its "
                    "spec as a third element: (A spec, B spec, magnitude spec)."
                )
        planned.append((magnitude, *_fit(magnitude.get_value(), m_entries, name, pattern)))
    saved = _saved_modules.state(model)
    roots = sorted({root for root, _ in _saved_modules.roots(model)})
    for root in roots:
        pattern = next((p for p in checked if re.fullmatch(p, root)), None)
        if pattern is None:
            continue
        rule = checked[pattern]
        if not isinstance(rule, dict):
            raise ShardingError(
                f"shard_adapters rule {pattern!r} selects the modules_to_save module {root!r}, "
                "whose parameters are trained in full; map its parameter paths to specs, "
                "e.g. {'head': {'kernel': P(None, 'tp'), 'bias': P('tp')}}."
            )
        used.add(pattern)
        for inner, entries in rule.items():
            name = "/".join(p for p in (root, inner) if p)
            if name not in saved:
                params = sorted(p[len(root) :].lstrip("/") for p in saved if p.startswith(root))
                raise ShardingError(
                    f"shard_adapters rule {pattern!r} names {inner!r}, which the "
                    f"modules_to_save module {root!r} lacks; its variables are {params}."
                )
            variable = saved[name]
            planned.append((variable, *_fit(variable.get_value(), entries, name, pattern)))
    unused = [pattern for pattern in checked if pattern not in used]
    if unused:
        raise ShardingError(
            f"shard_adapters rules {unused} select no adapted module; nothing was moved. The "
            f"adapted module paths are {sorted(set(adapted))}, the modules_to_save {roots} "
            "(matched in full, re.fullmatch)."
        )
    for variable, sharding, entries in planned:
        variable.set_value(jax.device_put(variable.get_value(), sharding))
        variable.set_metadata(out_sharding=entries)
