"""A flat safetensors file of the adapter weights, for tools outside JAX.

Tensors are keyed by variable path relative to ``PeftModel.model``
(``layers/0/attn/q_proj/kernel_lora_a``). The file's metadata holds, under
``nnx_peft``, the same JSON description as an Orbax adapter checkpoint, so a
file written here is checked as fully when read back. A file written by
another tool without that entry is checked for keys, shapes and dtypes only.

safetensors is an optional dependency: ``pip install 'nnx_peft[safetensors]'``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np

from nnx_peft._adapted import Adapted
from nnx_peft._checkpoint_format import (
    ADAPTER,
    ArraySpec,
    adapter_items,
    adapter_variables,
    assign,
    check_adapters,
    check_config,
    check_fit,
    check_layers,
    describe,
    parse_description,
    require_enabled,
    require_unmerged,
    values,
    verify,
)
from nnx_peft._errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    MissingDependencyError,
    NotACheckpointError,
)

#: Key of the description in the file's (string-valued) metadata.
METADATA_KEY = "nnx_peft"


def _safetensors() -> ModuleType:
    """The ``safetensors`` package, or a :class:`MissingDependencyError` saying how to get it."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as err:
        raise MissingDependencyError(
            "Reading and writing safetensors files needs the optional 'safetensors' package, "
            "which is not installed. Install it with: pip install 'nnx_peft[safetensors]' (or "
            "pip install safetensors). Orbax checkpoints (save_adapter) need nothing extra."
        ) from err
    return safetensors


def _target_problem(target: Path, overwrite: bool) -> str | None:
    """Why ``target`` cannot be written (a message), or ``None``."""
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                return (
                    f"{parent} is a file, so {target} cannot be written inside it; nnx_peft "
                    "does not replace it. Choose another path."
                )
            break
    if target.is_dir():
        return (
            f"{target} is a directory; a safetensors export is one file. Choose a file path "
            "such as 'adapter.safetensors'."
        )
    if target.exists() and not overwrite:
        return (
            f"{target} already exists. Pass overwrite=True to replace it (it is replaced only "
            "once the new file is complete), or choose another path."
        )
    return None


def _on_host(x: jax.Array) -> np.ndarray:
    """``x`` in this process's memory; gathered from every process if it spans several."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_safetensors(model: Adapted, path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Writes ``model``'s adapters to one safetensors file, atomically.

    The file is written under a temporary name in the same directory and
    renamed over ``path`` once complete (``os.replace`` is atomic), so an
    interrupted save leaves any previous file intact. In a multi-process job
    every process calls it: arrays spread over several processes are gathered
    (``multihost_utils.process_allgather``), the first process checks the path
    and writes the file, and every process returns once it is written.

    Raises:
        MissingDependencyError: safetensors is not installed.
        CheckpointExistsError: ``path`` exists and ``overwrite`` is False, or it
            is a directory.
    """
    safetensors = _safetensors()
    require_enabled(model, "save_safetensors")
    target = Path(path).expanduser()
    primary = jax.process_index() == 0
    problem = _target_problem(target, overwrite) if primary else None
    if jax.process_count() > 1:  # every process raises, or none does
        from jax.experimental import multihost_utils

        if bool(multihost_utils.broadcast_one_to_all(np.int32(problem is not None))):
            problem = problem or f"The first process of this job cannot write {target}."
    if problem is not None:
        raise CheckpointExistsError(problem)
    items = {item: values(v) for item, v in adapter_items(model).items()}
    metadata = {METADATA_KEY: json.dumps(describe(model, items))}
    tensors = {
        name: _on_host(x) for item_arrays in items.values() for name, x in item_arrays.items()
    }
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)  # as save_adapter makes its directory
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
        try:
            safetensors.numpy.save_file(tensors, partial, metadata=metadata)
            with open(partial, "rb") as written:
                os.fsync(written.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"nnx_peft save_safetensors {target}")


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of the file and its metadata.

    Raises:
        NotACheckpointError: There is no such file.
        CorruptCheckpointError: It cannot be parsed as safetensors.
    """
    safetensors = _safetensors()
    if not path.is_file():
        raise NotACheckpointError(
            f"No safetensors file at {path}"
            + (
                " (it is a directory; Orbax checkpoints load with load_adapter)"
                if path.is_dir()
                else ""
            )
            + ". Check the path."
        )
    try:
        with safetensors.safe_open(path, framework="np") as file:
            return {k: file.get_tensor(k) for k in file.keys()}, file.metadata() or {}  # noqa: SIM118
    except Exception as err:
        raise CorruptCheckpointError(
            f"{path} cannot be read as a safetensors file ({type(err).__name__}: {err}). It is "
            "damaged or another kind of file; nothing was loaded."
        ) from err


def _placed(tensor: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """``tensor`` as an array with ``sharding``, on however many hosts.

    Each process builds its own shards from the whole file it has read.
    """
    return jax.make_array_from_callback(tensor.shape, sharding, lambda index: tensor[index])


def load_safetensors(model: Adapted, path: str | os.PathLike[str]) -> None:
    """Loads adapter weights from a safetensors file into ``model`` after checking everything.

    Raises:
        MissingDependencyError, NotACheckpointError, CorruptCheckpointError,
        ConfigMismatchError, CheckpointMismatchError: see :meth:`PeftModel.load_safetensors`.
    """
    source = Path(path).expanduser()
    require_unmerged(model, "load_safetensors")
    tensors, metadata = _read(source)
    where = str(source)
    found = {name: ArraySpec(tuple(t.shape), str(t.dtype)) for name, t in tensors.items()}
    specs: dict[str, dict[str, ArraySpec]] | None = None
    if METADATA_KEY in metadata:
        try:
            data: Any = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as err:
            raise CorruptCheckpointError(
                f"The nnx_peft description in {where} is not valid JSON ({err}); the file was "
                "damaged after saving. Nothing was loaded."
            ) from err
        config, specs = parse_description(data, where)
        listed = {k: (s.shape, s.dtype) for item in specs.values() for k, s in item.items()}
        if listed != {k: (s.shape, s.dtype) for k, s in found.items()}:
            raise CorruptCheckpointError(
                f"The tensors of {where} differ from the list in its own nnx_peft description; "
                "the file was changed after saving. Nothing was loaded."
            )
        check_layers(data, model, where)
        check_config(model.config, config, where)
        variables = adapter_items(model, specs, data.get("format_version"))
    else:  # another tool's file: the adapters alone
        variables = {ADAPTER: adapter_variables(model)}
    every = {path: v for item in variables.values() for path, v in item.items()}
    check_fit(ADAPTER, values(every), found, where)
    if specs is not None:
        check_adapters(data, model, where)
    arrays = {
        item: {
            name: _placed(tensors[name], variable.get_value().sharding)
            for name, variable in item_variables.items()
        }
        for item, item_variables in variables.items()
    }
    if specs is not None:
        verify(arrays, specs, where)
    assign(variables, arrays)
