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
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from nnx_peft._checkpoint_format import (
    ADAPTER,
    ArraySpec,
    adapter_variables,
    assign,
    check_config,
    check_fit,
    describe,
    parse_description,
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
from nnx_peft._sharding import require_addressable

if TYPE_CHECKING:
    from nnx_peft._peft_model import PeftModel

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


def save_safetensors(model: PeftModel, path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Writes ``model``'s adapters to one safetensors file, atomically.

    The file is written under a temporary name in the same directory and
    renamed over ``path`` once complete (``os.replace`` is atomic), so an
    interrupted save leaves any previous file intact.

    Raises:
        MissingDependencyError: safetensors is not installed.
        CheckpointExistsError: ``path`` exists and ``overwrite`` is False, or it
            is a directory.
        ShardingError: Some adapter is sharded over several hosts' devices.
    """
    safetensors = _safetensors()
    target = Path(path)
    if target.is_dir():
        raise CheckpointExistsError(
            f"{target} is a directory; a safetensors export is one file. Choose a file path "
            "such as 'adapter.safetensors'."
        )
    if target.exists() and not overwrite:
        raise CheckpointExistsError(
            f"{target} already exists. Pass overwrite=True to replace it (it is replaced only "
            "once the new file is complete), or choose another path."
        )
    arrays = values(adapter_variables(model))
    require_addressable(arrays, "save_safetensors")
    metadata = {METADATA_KEY: json.dumps(describe(model, {ADAPTER: arrays}))}
    tensors = {name: np.asarray(jax.device_get(x)) for name, x in arrays.items()}
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    try:
        safetensors.numpy.save_file(tensors, partial, metadata=metadata)
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


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


def load_safetensors(model: PeftModel, path: str | os.PathLike[str]) -> None:
    """Loads adapter weights from a safetensors file into ``model`` after checking everything.

    Raises:
        MissingDependencyError, NotACheckpointError, CorruptCheckpointError,
        ConfigMismatchError, CheckpointMismatchError: see :meth:`PeftModel.load_safetensors`.
    """
    source = Path(path)
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
        if {k: (s.shape, s.dtype) for k, s in specs[ADAPTER].items()} != {
            k: (s.shape, s.dtype) for k, s in found.items()
        }:
            raise CorruptCheckpointError(
                f"The tensors of {where} differ from the list in its own nnx_peft description; "
                "the file was changed after saving. Nothing was loaded."
            )
        check_config(model.config, config, where)
    variables = adapter_variables(model)
    check_fit(ADAPTER, values(variables), found, where)
    arrays = {
        ADAPTER: {
            name: _placed(tensors[name], variable.get_value().sharding)
            for name, variable in variables.items()
        }
    }
    if specs is not None:
        verify(arrays, specs, where)
    assign({ADAPTER: variables}, arrays)
