"""Adapter checkpoints with Orbax: atomic saves, resumable training, checked loads.

A checkpoint is an Orbax ``CheckpointManager`` directory. Each step directory
(``<path>/<step>/``) holds these Orbax items:

- ``adapter``: the adapter weights, nested by variable path relative to
  ``PeftModel.model``: ``layers/0/attn/q_proj/kernel_lora_a`` is stored at
  ``['layers']['0']['attn']['q_proj']['kernel_lora_a']``;
- ``description``: the JSON description (``_checkpoint_format.py``), in the
  file ``description/metadata``;
- training checkpoints also hold ``optimizer`` (every array of the
  ``nnx.Optimizer``: step count and optax state) and ``model_state`` (the
  model's array variables that are not ``nnx.Param``, such as dropout RNG
  state).

Why a manager directory even for a single adapter: Orbax writes each step
under a temporary name and renames it when complete, and deletes older steps
only after a newer one is committed, so replacing a checkpoint never leaves
the path without a complete one. Arrays are restored with the shardings of
the live model's arrays, so a checkpoint loads onto whatever mesh the model
is on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from nnx_peft._checkpoint_format import (
    ADAPTER,
    DESCRIPTION,
    MODEL_STATE,
    OPTIMIZER,
    ArraySpec,
    adapter_variables,
    array_variables,
    assign,
    check_config,
    check_fit,
    describe,
    flatten,
    model_state_variables,
    nest,
    parse_description,
    quote,
    require_unmerged,
    values,
    verify,
)
from nnx_peft._errors import (
    CheckpointExistsError,
    ConfigMismatchError,
    CorruptCheckpointError,
    NoAdapterCreatedError,
    NotACheckpointError,
    QuantizationError,
    TargetNotFoundError,
    UnsupportedLayerError,
)

if TYPE_CHECKING:
    from nnx_peft._peft_model import PeftModel


def _directory(path: epath.PathLike) -> epath.Path:
    """``path`` made absolute, as Orbax requires; URLs such as ``gs://...`` are kept as they are."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _reader(directory: epath.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=options)


def _writer(directory: epath.Path) -> ocp.CheckpointManager:
    """A synchronous manager keeping only the newest step, removing stale temporary dirs."""
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False,
        preservation_policy=ocp.checkpoint_managers.LatestN(1),
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory, options=options)


def find_step(manager: ocp.AbstractCheckpointManager, step: int | None, where: str) -> int:
    """``step``, or the newest committed step, checked to exist in ``manager``.

    Raises:
        NotACheckpointError: There is no such step (or no step at all).
    """
    steps = sorted(manager.all_steps())
    if not steps:
        raise NotACheckpointError(
            f"No checkpoint found at {where}: it does not exist or holds no committed Orbax "
            "step directory. Check the path; a save that was interrupted leaves nothing here."
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise NotACheckpointError(
            f"{where} has no step {step}; its steps are {steps}. Pass one of them, or "
            "step=None for the newest."
        )
    return step


def read_description(manager: ocp.AbstractCheckpointManager, step: int, where: str) -> Any:
    """The raw JSON description of ``step``.

    Raises:
        NotACheckpointError: The step has no description item.
        CorruptCheckpointError: The description cannot be read or parsed.
    """
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(description=ocp.args.JsonRestore())
        )
    except KeyError as err:
        raise NotACheckpointError(
            f"{where} is an Orbax checkpoint but not an nnx_peft one: it has no "
            f"{DESCRIPTION!r} item ({err}). Point to a directory written by "
            "PeftModel.save_adapter or PeftModel.save_training_checkpoint."
        ) from err
    except Exception as err:
        raise CorruptCheckpointError(
            f"The description of {where} cannot be read ({type(err).__name__}: {err}). It was "
            "damaged after saving; restore it from a copy, or save the adapter again."
        ) from err
    return restored[DESCRIPTION]


def _save_args(
    description: dict[str, Any], arrays: Mapping[str, Mapping[str, jax.Array]]
) -> ocp.args.Composite:
    items = {item: ocp.args.StandardSave(nest(a)) for item, a in arrays.items() if a}
    return ocp.args.Composite(description=ocp.args.JsonSave(description), **items)


def _restore(
    manager: ocp.AbstractCheckpointManager,
    step: int,
    live: Mapping[str, Mapping[str, jax.Array]],
    where: str,
) -> dict[str, dict[str, jax.Array]]:
    """Reads ``live``'s items from ``step`` into new arrays shaped and sharded like ``live``."""

    def target(x: jax.Array) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    args = {
        item: ocp.args.StandardRestore(nest({p: target(x) for p, x in a.items()}))
        for item, a in live.items()
        if a
    }
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as err:
        raise CorruptCheckpointError(
            f"The arrays of {where} cannot be read ({type(err).__name__}: {err}). Its files are "
            "incomplete or damaged; nothing was loaded. Restore them from a copy, or save again."
        ) from err
    return {item: flatten(restored[item]) if item in args else {} for item in live}


def restore_into(
    manager: ocp.AbstractCheckpointManager,
    step: int,
    variables: Mapping[str, Mapping[str, nnx.Variable[Any]]],
    specs: Mapping[str, Mapping[str, ArraySpec]],
    where: str,
) -> None:
    """Checks ``step`` against ``variables`` (per item), reads, verifies, and only then assigns.

    Raises:
        NotACheckpointError: The checkpoint lacks one of the items.
        CheckpointMismatchError: Some item's arrays do not fit.
        CorruptCheckpointError: The data cannot be read or fails its checksums.
    """
    live = {item: values(v) for item, v in variables.items()}
    for item, arrays in live.items():
        if item not in specs:
            raise NotACheckpointError(
                f"{where} holds no {item!r} item (it has {sorted(specs)}); an adapter saved with "
                "save_adapter has no optimizer state. Load it with load_adapter and start a new "
                "optimizer, or point to a checkpoint written by save_training_checkpoint."
            )
        check_fit(item, arrays, specs[item], where)
    restored = _restore(manager, step, live, where)
    verify(restored, specs, where)
    assign(variables, restored)


# --- Adapter checkpoints -------------------------------------------------------------------


def _adapter_variables(model: PeftModel) -> dict[str, dict[str, nnx.Variable[Any]]]:
    return {ADAPTER: adapter_variables(model)}


def _existing_step(directory: epath.Path) -> int | None:
    """The newest step of the nnx_peft checkpoint at ``directory``, or None if there is none.

    Raises:
        CheckpointExistsError: ``directory`` is a file, or holds something else than an
            nnx_peft checkpoint (Orbax's temporary directories of interrupted saves aside).
    """
    if not directory.exists():
        return None
    if not directory.is_dir():
        raise CheckpointExistsError(
            f"{directory} is a file, not a checkpoint directory; nnx_peft does not replace "
            "it, even with overwrite=True. Choose another path."
        )
    with _reader(directory) as manager:
        steps = manager.all_steps()
        if not steps:
            tmp_suffix = ocp.path.step.TMP_DIR_SUFFIX
            foreign = sorted(p.name for p in directory.iterdir() if tmp_suffix not in p.name)
            if foreign:
                raise CheckpointExistsError(
                    f"{directory} holds files that are not an nnx_peft checkpoint "
                    f"({quote(foreign)}); nnx_peft does not write into it, even with "
                    "overwrite=True. Choose a new or empty directory."
                )
            return None
        latest = max(steps)
        try:
            read_description(manager, latest, str(directory))
        except NotACheckpointError as err:
            raise CheckpointExistsError(
                f"{directory} holds an Orbax checkpoint that is not an nnx_peft adapter "
                "checkpoint; nnx_peft does not replace it, even with overwrite=True. Choose "
                "another path."
            ) from err
        except CorruptCheckpointError:
            pass  # a damaged nnx_peft checkpoint may be replaced
        return latest


def save_adapter(model: PeftModel, path: epath.PathLike, *, overwrite: bool) -> None:
    """Writes ``model``'s adapters and description as a new step at ``path``.

    With ``overwrite=True`` the new step is committed before the old one is
    deleted, so an interrupted save leaves the previous checkpoint loadable.

    Raises:
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is
            False, or holds something that is not an nnx_peft checkpoint.
    """
    directory = _directory(path)
    latest = _existing_step(directory)
    if latest is not None and not overwrite:
        raise CheckpointExistsError(
            f"{directory} already holds an adapter checkpoint (step {latest}). Pass "
            "overwrite=True to replace it (the old one stays until the new one is complete), "
            "or choose another path."
        )
    arrays = {item: values(v) for item, v in _adapter_variables(model).items()}
    description = describe(model, arrays)
    with _writer(directory) as manager:
        manager.save(0 if latest is None else latest + 1, args=_save_args(description, arrays))


def _open(path: epath.PathLike, step: int | None) -> tuple[ocp.CheckpointManager, int, str, Any]:
    """A reader on ``path``, the step to load, its name for messages, and its raw description."""
    directory = _directory(path)
    manager = _reader(directory)
    try:
        step = find_step(manager, step, str(directory))
        where = f"{directory} (step {step})"
        return manager, step, where, read_description(manager, step, where)
    except BaseException:
        manager.close()
        raise


def load_adapter(model: PeftModel, path: epath.PathLike, *, step: int | None) -> None:
    """Loads the adapters of ``path`` into ``model`` after checking everything.

    Raises:
        NotACheckpointError, CorruptCheckpointError, ConfigMismatchError,
        CheckpointMismatchError: see :meth:`PeftModel.load_adapter`.
    """
    require_unmerged(model, "load_adapter")
    manager, step, where, data = _open(path, step)
    with manager:
        config, specs = parse_description(data, where)
        check_config(model.config, config, where)
        restore_into(manager, step, _adapter_variables(model), specs, where)


def from_pretrained(
    cls: type[PeftModel],
    base_model: nnx.Module,
    path: epath.PathLike,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    *,
    rngs: nnx.Rngs,
    step: int | None,
) -> PeftModel:
    """Wraps ``base_model`` with the saved config and loads the saved adapters into it.

    Raises:
        ConfigMismatchError: The saved config does not fit ``base_model``.
        NotACheckpointError, CorruptCheckpointError, CheckpointMismatchError:
            see :meth:`PeftModel.from_pretrained`.
    """
    manager, step, where, data = _open(path, step)
    with manager:
        config, specs = parse_description(data, where)
        try:
            model = cls(base_model, config, *sample_args, rngs=rngs, **sample_kwargs)
        except (
            TargetNotFoundError,
            NoAdapterCreatedError,
            UnsupportedLayerError,
            QuantizationError,
        ) as err:
            raise ConfigMismatchError(
                f"The LoraConfig saved in {where} does not fit this base model "
                f"({type(base_model).__qualname__}; the checkpoint was saved from "
                f"{data.get('base_model')}): {err}\nLoad it onto the kind of base model it was "
                "trained on."
            ) from err
        restore_into(manager, step, _adapter_variables(model), specs, where)
    return model


# --- Training checkpoints ----------------------------------------------------------------------


def _training_variables(
    model: PeftModel, optimizer: nnx.Optimizer[Any]
) -> dict[str, dict[str, nnx.Variable[Any]]]:
    """Everything training changes: adapters, optimizer arrays, non-``Param`` model arrays."""
    return {
        **_adapter_variables(model),
        OPTIMIZER: array_variables(optimizer, nnx.Variable),
        MODEL_STATE: model_state_variables(model),
    }


def save_training_checkpoint(
    model: PeftModel,
    manager: ocp.AbstractCheckpointManager,
    step: int,
    optimizer: nnx.Optimizer[Any],
) -> bool:
    """Saves adapters, optimizer state and model state as ``step`` of ``manager``.

    Returns:
        Whether a checkpoint was started (``manager``'s save policy may skip ``step``).
    """
    if not manager.should_save(step):
        return False
    arrays = {item: values(v) for item, v in _training_variables(model, optimizer).items()}
    return manager.save(step, args=_save_args(describe(model, arrays), arrays))


def restore_training_checkpoint(
    model: PeftModel,
    manager: ocp.AbstractCheckpointManager,
    optimizer: nnx.Optimizer[Any],
    *,
    step: int | None,
) -> int:
    """Restores ``step`` (default: the newest) into ``model`` and ``optimizer``; returns the step.

    Raises:
        NotACheckpointError, CorruptCheckpointError, ConfigMismatchError,
        CheckpointMismatchError: see :meth:`PeftModel.restore_training_checkpoint`.
    """
    require_unmerged(model, "restore_training_checkpoint")
    directory = str(manager.directory)
    step = find_step(manager, step, directory)
    where = f"{directory} (step {step})"
    config, specs = parse_description(read_description(manager, step, where), where)
    check_config(model.config, config, where)
    restore_into(manager, step, _training_variables(model, optimizer), specs, where)
    return step
