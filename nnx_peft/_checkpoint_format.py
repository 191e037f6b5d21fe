"""The self-description of an adapter checkpoint, and the checks made before loading one.

Shared by the Orbax checkpoints (``_checkpoint.py``) and the safetensors
export (``_safetensors.py``). A description is JSON:

- ``format``, ``format_version``: what this is, so anything else is refused; a newer
  version says which nnx_peft to upgrade to, older versions load (see
  :data:`FORMAT_VERSION`);
- ``nnx_peft_version``, ``base_model``: who wrote it, from which model class;
- ``config``: the full ``LoraConfig`` (``LoraConfig.to_dict()``);
- ``adapters``: every adapter's module path, weight, factor shapes, dtype,
  rank, scale, variant and (DoRA) magnitude shape;
- ``arrays``: per stored item (``adapter``, and for training checkpoints
  ``optimizer`` and ``model_state``) and per variable path relative to the
  wrapped model, the ``shape``, ``dtype`` and ``checksum`` of the array;
- ``description_checksum`` (version 2): the SHA-256 of the rest of the description
  (:func:`description_checksum`), so an edited or damaged field, ``alpha`` say, is
  refused instead of loaded.

The recorded ``adapters`` entries (shapes, rank, scale, variant) are also
compared with the adapters of the model built to load into.

Arrays are checked against the live model (keys, shapes, dtypes; never cast)
before anything is read, and against their checksums after reading, before
anything is assigned. Checksums are needed because Orbax restores a flipped
byte inside its data files without complaint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_peft import _merging, _saved_modules
from nnx_peft._adapted import Adapted
from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    AdapterStateError,
    CheckpointMismatchError,
    ConfigError,
    ConfigMismatchError,
    CorruptCheckpointError,
    NotACheckpointError,
    ScannedCheckpointError,
)
from nnx_peft._injection import path_string
from nnx_peft._interception import unwrapped_type
from nnx_peft._variables import AdapterParam, InitialFactor

#: Value of the description's ``format`` field.
FORMAT = "nnx_peft.adapter_checkpoint"
#: The format version this code writes. It reads every version from 1 to this one; a newer
#: version is refused with the nnx_peft version to upgrade to. Version 1 had no
#: ``description_checksum`` (and, in its first releases, fewer ``adapters`` fields).
FORMAT_VERSION = 2
#: Key of the description's own checksum (format version 2 on).
DESCRIPTION_CHECKSUM = "description_checksum"

#: Orbax item names inside a step directory.
ADAPTER, DESCRIPTION, OPTIMIZER, MODEL_STATE = "adapter", "description", "optimizer", "model_state"
BASE_STATE = "base_state"

#: The weights an adapter checkpoint holds: every adapter nnx_peft created (factors, DoRA
#: magnitudes, parameters of ``modules_to_save``); see :func:`adapter_variables`.
SAVED_WEIGHTS = AdapterParam

_LISTED = 20  # offending paths quoted in an error message; the exception keeps them all


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape, dtype and checksum of one stored array, as the description records them."""

    shape: tuple[int, ...]
    dtype: str
    checksum: str = ""


# --- Arrays of a live model --------------------------------------------------------------


def array_variables(node: Any, where: nnx.filterlib.Filter) -> dict[str, nnx.Variable[Any]]:
    """The variables of ``node`` that ``where`` selects and that hold a ``jax.Array``, by path."""
    predicate = nnx.filterlib.to_predicate(where)
    return {
        path_string(path): value
        for path, value in nnx.iter_graph(node)
        if isinstance(value, nnx.Variable)
        and predicate(path, value)
        and isinstance(value.get_value(), jax.Array)
    }


def adapter_variables(model: Adapted) -> dict[str, nnx.Variable[Any]]:
    """What an adapter checkpoint holds, by path relative to ``model.model``.

    Every :data:`SAVED_WEIGHTS` variable, and the other array state of the
    ``modules_to_save`` (their batch statistics, say), which training changes
    too. Never a base weight: a PiSSA or OLoRA residual is recomputed from the
    base weights when the checkpoint is loaded.
    """
    return {**array_variables(model.model, SAVED_WEIGHTS), **_saved_modules.state(model.model)}


def base_state_variables(model: Adapted) -> dict[str, nnx.Variable[Any]]:
    """The base model's ``nnx.BatchStat`` variables outside the ``modules_to_save``.

    A forward pass in training mode updates them (BatchNorm running means and
    variances), so an adapter checkpoint stores them as its ``base_state`` item
    (format version 2 on): without them a reloaded model would not compute what
    the saved one did. Training checkpoints hold them in ``model_state``.
    """
    saved = adapter_variables(model)
    return {
        path: variable
        for path, variable in array_variables(model.model, nnx.BatchStat).items()
        if path not in saved
    }


def model_state_variables(model: Adapted) -> dict[str, nnx.Variable[Any]]:
    """The other array variables a training checkpoint holds (RNG state, batch statistics).

    Those of :func:`adapter_variables` are left out, and so are the initial
    factors of PiSSA and OLoRA adapters, which the base weights determine.
    """
    saved = adapter_variables(model)
    return {
        path: variable
        for path, variable in array_variables(model.model, nnx.Not(nnx.Param)).items()
        if path not in saved and not isinstance(variable, InitialFactor)
    }


def values(variables: Mapping[str, nnx.Variable[Any]]) -> dict[str, jax.Array]:
    """The current arrays of ``variables``."""
    return {path: variable.get_value() for path, variable in variables.items()}


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a/b': x}`` to ``{'a': {'b': x}}``: Orbax stores nested dicts of string keys."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`nest`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


# --- Checksums -----------------------------------------------------------------------------

_UNSIGNED = {4: jnp.uint4, 8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as ``uint32`` words."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    info = jnp.iinfo(x.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else jnp.finfo(x.dtype)
    if info.bits > 32:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[info.bits]).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """Sum and position-weighted sum of the words, modulo ``2**32``.

    Integer addition is exact and associative, so the result does not depend
    on how the array is sharded, and any single changed word changes the sum.
    """
    words = _words(x).ravel()
    weights = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


# Compiled per shape and dtype (a model has few), not per model.
_checksum_jit = jax.jit(_checksum)


def checksums(arrays: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, dict[str, str]]:
    """Hex checksums of every array, per item and path; computed on device, fetched at once.

    On several processes, the checksum of an array spread over them is a collective
    that every process must run in the same order. A two-process restore hung here,
    both processes inside this loop (one run in three under load). The possible
    causes: a different order of the mappings on each process, or asynchronously
    dispatched programs running at once, whose collectives then pair up across
    processes in thread order. So on several processes the checksums run one at a
    time, in sorted order; on one, they overlap.
    """
    one_at_a_time = jax.process_count() > 1
    sums: dict[str, dict[str, jax.Array]] = {}
    for item in sorted(arrays):
        sums[item] = {}
        for path in sorted(arrays[item]):
            checksum = _checksum_jit(arrays[item][path])
            sums[item][path] = jax.block_until_ready(checksum) if one_at_a_time else checksum
    sums = jax.device_get(sums)
    return {
        item: {path: f"{int(s[0]):08x}{int(s[1]):08x}" for path, s in item_sums.items()}
        for item, item_sums in sums.items()
    }


# --- The description -------------------------------------------------------------------------


def describe(model: Adapted, arrays: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
    """The JSON description of a checkpoint of ``model`` holding ``arrays`` (per item).

    Args:
        model: The wrapper being saved.
        arrays: The arrays to store, by item name and then variable path.

    Returns:
        JSON-compatible data; see the module docstring for the fields.
    """
    from nnx_peft import __version__  # the package imports this module; import at call time

    base = unwrapped_type(model.model)
    sums = checksums(arrays)
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nnx_peft_version": __version__,
        "base_model": f"{base.__module__}.{base.__qualname__}",
        "config": model.config.to_dict(),
        "adapters": _adapter_records(model.adapters()),
        "arrays": {
            item: {
                path: {"shape": list(x.shape), "dtype": str(x.dtype), "checksum": sums[item][path]}
                for path, x in item_arrays.items()
            }
            for item, item_arrays in arrays.items()
        },
    }
    return {**description, DESCRIPTION_CHECKSUM: description_checksum(description)}


def description_checksum(data: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``data`` but its :data:`DESCRIPTION_CHECKSUM`, as canonical JSON.

    Canonical: sorted keys, no spaces, ASCII, so it does not depend on how the
    JSON was written out.
    """
    rest = {k: v for k, v in data.items() if k != DESCRIPTION_CHECKSUM}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _adapter_records(infos: Any) -> list[dict[str, Any]]:
    """``model.adapters()`` as the description's ``adapters`` entries."""
    return [
        {
            # The layer fields only for scanned stacks: other descriptions stay as they were.
            # A checkpoint holds one adapter, whatever its name in the model was.
            **{
                k: v
                for k, v in dataclasses.asdict(info).items()
                if (k not in ("layers", "layer_axis") or info.layers is not None)
                and k != "adapter_name"
            },
            "a_shape": list(info.a_shape),
            "b_shape": list(info.b_shape),
            "magnitude_shape": (
                None if info.magnitude_shape is None else list(info.magnitude_shape)
            ),
        }
        for info in infos
    ]


def _spec(entry: Any) -> ArraySpec:
    """One ``arrays`` entry of a description; raises ``TypeError``/``KeyError`` if malformed."""
    shape, dtype, checksum = entry["shape"], entry["dtype"], entry["checksum"]
    if not (isinstance(shape, list) and all(isinstance(n, int) for n in shape)):
        raise TypeError(f"shape {shape!r} is not a list of ints")
    if not (isinstance(dtype, str) and isinstance(checksum, str)):
        raise TypeError(f"dtype {dtype!r} or checksum {checksum!r} is not a string")
    return ArraySpec(tuple(shape), dtype, checksum)


def parse_description(data: Any, where: str) -> tuple[LoraConfig, dict[str, dict[str, ArraySpec]]]:
    """Checks a description and returns its config and array specs (per item and path).

    Raises:
        NotACheckpointError: ``data`` is not an nnx_peft description, or one of
            a format version this nnx_peft cannot read.
        CorruptCheckpointError: It claims to be one but its fields are malformed.
    """
    found = data.get("format") if isinstance(data, dict) else type(data).__name__
    if found != FORMAT:
        raise NotACheckpointError(
            f"{where} is not an nnx_peft adapter checkpoint: its description has format "
            f"{found!r}, expected {FORMAT!r}. Point to a directory written by "
            "PeftModel.save_adapter or PeftModel.save_training_checkpoint."
        )
    version = data.get("format_version")
    writer = data.get("nnx_peft_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(
            f"The description of {where} has format_version {version!r}; a whole number from "
            f"1 to {FORMAT_VERSION} was expected. It was edited or damaged after saving. "
            "Restore it from a copy, or save the adapter again."
        )
    if version > FORMAT_VERSION:
        from nnx_peft import __version__  # the package imports this module; import at call time

        raise NotACheckpointError(
            f"{where} has checkpoint format version {version}, written by nnx_peft "
            f"{writer!r}; this nnx_peft ({__version__}) reads versions 1 to {FORMAT_VERSION}. "
            f"Upgrade nnx_peft to {writer} or newer: pip install -U 'nnx_peft>={writer}'."
        )
    try:
        config = LoraConfig.from_dict(data["config"])
        specs = {
            item: {path: _spec(entry) for path, entry in entries.items()}
            for item, entries in data["arrays"].items()
        }
        if ADAPTER not in specs:
            raise KeyError(f"arrays[{ADAPTER!r}]")
        if not isinstance(data["adapters"], list):
            raise TypeError(f"adapters {data['adapters']!r} is not a list")
    except (KeyError, TypeError, AttributeError, ConfigError) as err:
        raise CorruptCheckpointError(
            f"The description of {where} is malformed ({type(err).__name__}: {err}); it was "
            "edited or damaged after saving. Restore it from a copy, or save the adapter again."
        ) from err
    if version >= 2 and data.get(DESCRIPTION_CHECKSUM) != description_checksum(data):
        raise CorruptCheckpointError(
            f"The description of {where} does not match its own checksum "
            f"({DESCRIPTION_CHECKSUM}): a field (the config's alpha or dropout, say) was "
            "edited or damaged after saving, so none of it can be trusted; nothing was "
            "loaded. Restore it from a copy, or save the adapter again."
        )
    return config, specs


def _stacks(entries: Any) -> dict[str, str]:
    """``'<module>/<weight>'`` to ``'N layers on axis K'`` for each stacked adapter described."""
    stacks = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("layers") is not None:
            key = f"{entry.get('module_path')}/{entry.get('weight')}"
            stacks[key] = f"{entry['layers']} layers on axis {entry.get('layer_axis')}"
    return stacks


def check_layers(data: Mapping[str, Any], model: Adapted, where: str) -> None:
    """Raises :class:`ScannedCheckpointError` unless the checkpoint's adapters are stacked
    (scanned layers) exactly where the model's are, the same way."""
    saved = _stacks(data.get("adapters"))
    live = _stacks([dataclasses.asdict(info) for info in model.adapters()])
    if saved == live:
        return
    if saved and not live:
        problem = (
            f"holds stacked adapters of a scanned layer stack ({_listed(saved)}), but this "
            "model's adapters are not stacked (an unrolled model?)"
        )
    elif live and not saved:
        problem = (
            "holds adapters that are not stacked (saved from an unrolled model?), but this "
            f"model's are stacked ({_listed(live)})"
        )
    else:
        problem = f"has the stacks {_listed(saved)}, but this model has {_listed(live)}"
    raise ScannedCheckpointError(
        f"{where} {problem}; nothing was loaded. nnx_peft does not convert between scanned and "
        "unrolled layers: load the checkpoint into a model built the way the saved one was "
        "(the same scan over layers, or the same unrolled layers)."
    )


def _listed(stacks: Mapping[str, str]) -> str:
    return quote([f"{key}: {how}" for key, how in sorted(stacks.items())])


def adapter_items(
    model: Adapted, specs: Mapping[str, Any] | None = None, version: Any = FORMAT_VERSION
) -> dict[str, dict[str, nnx.Variable[Any]]]:
    """The variables an adapter checkpoint of ``model`` holds, per item.

    With the ``specs`` of a checkpoint to load, ``base_state`` is left out
    where that checkpoint cannot have it: format version 1, or a training
    checkpoint (which keeps the base state in ``model_state``).
    """
    items = {ADAPTER: adapter_variables(model)}
    base = base_state_variables(model)
    cannot_have = (
        specs is not None and BASE_STATE not in specs and (version == 1 or OPTIMIZER in specs)
    )
    if base and not cannot_have:
        items[BASE_STATE] = base
    return items


def check_config(expected: LoraConfig, saved: LoraConfig, where: str) -> None:
    """Raises :class:`ConfigMismatchError` naming each field where ``saved`` differs."""
    if saved == expected:
        return
    ours, theirs = expected.to_dict(), saved.to_dict()
    diffs = [
        f"{k}: checkpoint {theirs[k]!r}, model {ours[k]!r}" for k in ours if ours[k] != theirs[k]
    ]
    raise ConfigMismatchError(
        f"{where} was saved with another LoraConfig than this PeftModel's; differing fields: "
        f"{'; '.join(diffs)}. Load it with PeftModel.from_pretrained(base_model, path, "
        "*sample_inputs, rngs=...), which builds the wrapper from the saved config."
    )


def check_adapters(data: Mapping[str, Any], model: Adapted, where: str) -> None:
    """Raises :class:`CorruptCheckpointError` if the recorded adapters are not ``model``'s.

    ``model`` was built with the saved config, so its adapters (module paths,
    shapes, dtype, rank, scale, variant) must be the recorded ones; fields an
    older description lacks are not compared.
    """
    live = {(r["module_path"], r["weight"]): r for r in _adapter_records(model.adapters())}
    recorded: dict[Any, Any] = {}
    for entry in data["adapters"]:
        if not isinstance(entry, dict):
            recorded[repr(entry)] = entry
        else:
            recorded[(entry.get("module_path"), entry.get("weight"))] = entry
    problems = [f"{key}: not in the model" for key in recorded if key not in live]
    problems += [f"{key}: not recorded" for key in live if key not in recorded]
    for key in live.keys() & recorded.keys():
        problems += [
            f"{key[0]!r}.{key[1]} {field}: recorded {value!r}, model {live[key][field]!r}"
            for field, value in recorded[key].items()
            if field in live[key] and value != live[key][field]
        ]
    if problems:
        raise CorruptCheckpointError(
            f"The adapters recorded in the description of {where} differ from those its own "
            f"config creates: {quote(sorted(problems))}. The description was edited or "
            "damaged after saving; nothing was loaded. Restore it from a copy, or save the "
            "adapter again."
        )


def quote(paths: list[str]) -> str:
    """The first paths of ``paths`` for a message, saying how many more there are."""
    shown = ", ".join(paths[:_LISTED])
    return f"{shown}, ... ({len(paths) - _LISTED} more)" if len(paths) > _LISTED else shown


def check_fit(
    item: str, live: Mapping[str, jax.Array], saved: Mapping[str, ArraySpec], where: str
) -> None:
    """Raises :class:`CheckpointMismatchError` unless ``saved`` has exactly ``live``'s arrays.

    Args:
        item: What is compared (``'adapter'``, ``'optimizer'``, ...), for the message.
        live: The model's arrays by path.
        saved: The checkpoint's array specs by path.
        where: The checkpoint, for the message.
    """
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    mismatched = sorted(
        path
        for path in set(live) & set(saved)
        if (saved[path].shape, saved[path].dtype)
        != (tuple(live[path].shape), str(live[path].dtype))
    )
    described = [
        f"{path} (checkpoint {saved[path].shape} {saved[path].dtype}, model "
        f"{tuple(live[path].shape)} {live[path].dtype})"
        for path in mismatched
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = [
        f"{title} ({len(paths)}): {quote(paths)}"
        for title, paths in (
            ("missing from the checkpoint", missing),
            ("in the checkpoint but not in the model", unexpected),
            ("of another shape or dtype", described),
        )
        if paths
    ]
    raise CheckpointMismatchError(
        f"The {item} arrays of {where} do not fit this model; nothing was loaded.\n  "
        + "\n  ".join(problems)
        + "\nLoad a checkpoint saved from the same architecture, dtype and LoraConfig (nothing "
        "is cast for you); PeftModel.from_pretrained builds the wrapper from the saved config.",
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        mismatched=tuple(mismatched),
    )


def verify(
    arrays: Mapping[str, Mapping[str, jax.Array]],
    specs: Mapping[str, Mapping[str, ArraySpec]],
    where: str,
) -> None:
    """Raises :class:`CorruptCheckpointError` for arrays whose checksum is not the recorded one."""
    sums = checksums(arrays)
    bad = sorted(
        f"{item}/{path}"
        for item, item_sums in sums.items()
        for path, checksum in item_sums.items()
        if checksum != specs[item][path].checksum
    )
    if bad:
        raise CorruptCheckpointError(
            f"The data of {len(bad)} arrays in {where} does not match the checksums in its "
            f"description: {quote(bad)}. The files were changed or damaged after saving; "
            "nothing was loaded. Restore them from a copy, or save the adapter again."
        )


def assign(
    variables: Mapping[str, Mapping[str, nnx.Variable[Any]]],
    arrays: Mapping[str, Mapping[str, jax.Array]],
) -> None:
    """Sets every variable to its array; called only once everything has been checked."""
    for item, item_variables in variables.items():
        for path, variable in item_variables.items():
            variable.set_value(arrays[item][path])


def require_enabled(model: Adapted, action: str) -> None:
    """Raises :class:`AdapterStateError` inside a ``disable_adapter()`` block.

    The ``modules_to_save`` hold their values from before training there: a
    save would write those instead of the trained ones, and values loaded there
    would be replaced by the trained ones when the block ends.
    """
    if _merging.is_disabled(model.model):
        raise AdapterStateError(
            f"{action} was called inside a `with model.disable_adapter():` block, where the "
            "modules_to_save hold their values from before training and the adapters are "
            "switched off: it would save or load the wrong values. Call it after the block."
        )


def require_unmerged(model: Adapted, action: str) -> None:
    """Raises :class:`AdapterStateError` if ``model``'s adapters are merged into its weights.

    Loading new adapter values then would leave the old update in the base
    weights, and the forward pass (which skips merged adapters) would not see them.
    Also raises inside a ``disable_adapter()`` block (:func:`require_enabled`).
    """
    require_enabled(model, action)
    if model.merged:
        raise AdapterStateError(
            f"{action} needs unmerged adapters, but this model's adapters are merged into its "
            "base weights (model.merged is True): the loaded values would not be used. Call "
            "model.unmerge_adapter() first, then load, then merge_adapter() again if wanted."
        )
