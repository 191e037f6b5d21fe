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

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from nnx_peft._adapted import Adapted, AdaptedT
from nnx_peft._checkpoint_format import (
    ADAPTER,
    DESCRIPTION,
    MODEL_STATE,
    OPTIMIZER,
    ArraySpec,
    adapter_items,
    adapter_variables,
    array_variables,
    assign,
    check_adapters,
    check_config,
    check_fit,
    check_layers,
    describe,
    flatten,
    model_state_variables,
    nest,
    parse_description,
    quote,
    require_enabled,
    require_unmerged,
    values,
    verify,
)
from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    CheckpointExistsError,
    ConcurrentSaveError,
    ConfigMismatchError,
    CorruptCheckpointError,
    MissingDependencyError,
    NoAdapterCreatedError,
    NotACheckpointError,
    OptimizerError,
    QuantizationError,
    StepError,
    TargetNotFoundError,
    UnsupportedLayerError,
)
from nnx_peft._event_loops import finishing_pending_tasks

try:
    import fcntl
except ImportError:  # not on Windows: saves there are not locked
    fcntl = None  # type: ignore[assignment]


def _directory(path: epath.PathLike) -> epath.Path:
    """``path`` made absolute (``~`` expanded), as Orbax requires; URLs are kept as they are.

    Raises:
        MissingDependencyError: A URL (``gs://...``) whose file system package is missing.
    """
    text = os.fspath(path)
    if "://" not in text:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    directory = epath.Path(text)
    try:
        directory.exists()
    except ImportError as err:
        raise MissingDependencyError(
            f"The checkpoint path {text} needs a file system package that is not installed "
            f"({err}). For gs:// paths: pip install gcsfs. Or use a local path."
        ) from err
    return directory


def _check_parents(directory: epath.Path) -> None:
    """Raises :class:`CheckpointExistsError` if a parent of ``directory`` is a file."""
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointExistsError(
                    f"{parent} is a file, so no checkpoint directory can be made at "
                    f"{directory} inside it; nnx_peft does not replace it. Choose another path."
                )
            return


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
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | np.integer)):
        raise StepError(
            f"step must be a whole number (an int) or None for the newest step; got "
            f"{type(step).__name__} {step!r}. Pass e.g. step=100."
        )
    steps = sorted(manager.all_steps())
    if not steps:
        raise NotACheckpointError(
            f"No checkpoint found at {where}: it does not exist or holds no committed Orbax "
            "step directory. Check the path; a save that was interrupted leaves nothing here."
        )
    if step is None:
        return steps[-1]
    step = int(step)
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
        with finishing_pending_tasks():
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
        with finishing_pending_tasks():
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
    check: Callable[[], None] = lambda: None,
) -> None:
    """Checks ``step`` against ``variables`` (per item), reads, verifies, and only then assigns.

    ``check`` runs once the arrays are known to fit, before anything is read.

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
    check()
    restored = _restore(manager, step, live, where)
    verify(restored, specs, where)
    assign(variables, restored)


# --- Adapter checkpoints -------------------------------------------------------------------


def _adapter_variables(
    model: Adapted, data: Any = None, specs: Mapping[str, Any] | None = None
) -> dict[str, dict[str, nnx.Variable[Any]]]:
    """What an adapter checkpoint holds (or, given a checkpoint's description, held)."""
    version = data.get("format_version") if isinstance(data, dict) else None
    return adapter_items(model, specs, version)


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
            data = read_description(manager, latest, str(directory))
        except NotACheckpointError as err:
            raise CheckpointExistsError(
                f"{directory} holds an Orbax checkpoint that is not an nnx_peft adapter "
                "checkpoint; nnx_peft does not replace it, even with overwrite=True. Choose "
                "another path."
            ) from err
        except CorruptCheckpointError:
            return latest  # a damaged nnx_peft checkpoint may be replaced
        arrays = data.get("arrays") if isinstance(data, dict) else None
        if isinstance(arrays, dict) and OPTIMIZER in arrays:
            raise CheckpointExistsError(
                f"{directory} holds a training run (steps {sorted(steps)}, with optimizer "
                "state, written by save_training_checkpoint); save_adapter would replace all "
                "of it by one adapter step, so it does not, even with overwrite=True. Save the "
                "adapter to another path, or delete the run first if you mean to (e.g. "
                "shutil.rmtree(path))."
            )
        return latest


def save_adapter(model: Adapted, path: epath.PathLike, *, overwrite: bool) -> None:
    """Writes ``model``'s adapters and description as a new step at ``path``.

    With ``overwrite=True`` the new step is committed before the old one is
    deleted, so an interrupted save leaves the previous checkpoint loadable.

    Raises:
        CheckpointExistsError: ``path`` holds a checkpoint and ``overwrite`` is
            False, or holds something that is not an nnx_peft checkpoint.
    """
    require_enabled(model, "save_adapter")
    directory = _directory(path)
    _check_parents(directory)
    with _exclusive(directory):
        latest = _existing_step(directory)
        if latest is not None and not overwrite:
            raise CheckpointExistsError(
                f"{directory} already holds an adapter checkpoint (step {latest}). Pass "
                "overwrite=True to replace it (the old one stays until the new one is "
                "complete), or choose another path."
            )
        arrays = {item: values(v) for item, v in _adapter_variables(model).items()}
        description = describe(model, arrays)
        with finishing_pending_tasks(), _writer(directory) as manager:
            step = 0 if latest is None else latest + 1
            manager.save(step, args=_save_args(description, arrays))


@contextlib.contextmanager
def _exclusive(directory: epath.Path) -> Iterator[None]:
    """Holds an exclusive lock on the checkpoint directory (created if missing) for the block.

    Two saves to one path would otherwise interleave their Orbax steps and
    clean-ups, and could delete the previous checkpoint. The lock is
    ``fcntl.flock`` on the directory itself, so no lock file is left behind; the
    kernel releases it if the process dies. In a multi-process job, whose
    processes save together, the first process takes the lock and tells the
    others whether it got it. Local paths only: saves to URLs (``gs://...``) and
    on systems without ``fcntl`` are not locked.

    Raises:
        CheckpointExistsError: ``directory`` is a file.
        ConcurrentSaveError: Another save holds the lock.
    """
    if "://" in str(directory) or fcntl is None:
        yield
        return
    if directory.exists() and not directory.is_dir():
        _existing_step(directory)  # raises, naming the file
    primary = jax.process_index() == 0
    created = not directory.exists()
    handle = None
    acquired = True
    if primary:
        os.makedirs(directory, exist_ok=True)
        handle = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            acquired = False
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        acquired = bool(multihost_utils.broadcast_one_to_all(np.int32(acquired)))
    try:
        if not acquired:
            raise ConcurrentSaveError(
                f"Another save to {directory} is under way (it holds the directory's lock), "
                "so this one stopped before writing anything; the checkpoint already there "
                "is untouched. Save to another path, or retry once the other save has "
                "finished."
            )
        try:
            yield
        except BaseException:
            if created and primary:
                with contextlib.suppress(OSError):
                    os.rmdir(directory)  # only if still empty: a new, failed save leaves nothing
            raise
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock


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


def load_adapter(model: Adapted, path: epath.PathLike, *, step: int | None) -> None:
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
        _restore_adapters(manager, step, model, data, specs, where)


def _restore_adapters(
    manager: ocp.CheckpointManager,
    step: int,
    model: Adapted,
    data: Mapping[str, Any],
    specs: Mapping[str, Any],
    where: str,
) -> None:
    """Restores an adapter checkpoint into ``model`` after checking that it describes
    ``model``'s adapters (stacked the same way, same shapes and scales)."""
    check_layers(data, model, where)
    restore_into(
        manager,
        step,
        _adapter_variables(model, data, specs),
        specs,
        where,
        lambda: check_adapters(data, model, where),
    )


def saved_config(path: epath.PathLike, step: int | None) -> LoraConfig:
    """The ``LoraConfig`` of the adapter checkpoint at ``path`` (its newest step by default).

    Raises:
        NotACheckpointError, CorruptCheckpointError: As :func:`load_adapter`.
    """
    manager, _, where, data = _open(path, step)
    with manager:
        config, _ = parse_description(data, where)
    return config


def from_pretrained(
    cls: Callable[..., AdaptedT],
    base_model: nnx.Module,
    path: epath.PathLike,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    *,
    rngs: nnx.Rngs,
    step: int | None,
) -> AdaptedT:
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
            model = cls(base_model, config, *sample_args, rngs=rngs, sample_kwargs=sample_kwargs)
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
        _restore_adapters(manager, step, model, data, specs, where)
    return model


# --- Training checkpoints ----------------------------------------------------------------------


def require_optimizer(optimizer: Any, action: str) -> None:
    """Raises :class:`OptimizerError` unless ``optimizer`` is an ``nnx.Optimizer``."""
    if not isinstance(optimizer, nnx.Optimizer):
        raise OptimizerError(
            f"{action} takes the nnx.Optimizer training the model, whose state it saves or "
            f"restores; got {type(optimizer).__qualname__}. Pass the optimizer, e.g. from "
            "model.make_optimizer(optax.adamw(1e-4)); to save the adapters alone, use "
            "model.save_adapter(path)."
        )


def _training_variables(
    model: Adapted, optimizer: nnx.Optimizer[Any]
) -> dict[str, dict[str, nnx.Variable[Any]]]:
    """Everything training changes: adapters, optimizer arrays, non-``Param`` model arrays."""
    return {
        ADAPTER: adapter_variables(model),
        OPTIMIZER: array_variables(optimizer, nnx.Variable),
        MODEL_STATE: model_state_variables(model),
    }


def save_training_checkpoint(
    model: Adapted,
    manager: ocp.AbstractCheckpointManager,
    step: int,
    optimizer: nnx.Optimizer[Any],
) -> bool:
    """Saves adapters, optimizer state and model state as ``step`` of ``manager``.

    Returns:
        Whether a checkpoint was started (``manager``'s save policy may skip ``step``).
    """
    require_enabled(model, "save_training_checkpoint")
    require_optimizer(optimizer, "save_training_checkpoint")
    if not manager.should_save(step):
        return False
    arrays = {item: values(v) for item, v in _training_variables(model, optimizer).items()}
    with finishing_pending_tasks():
        return manager.save(step, args=_save_args(describe(model, arrays), arrays))


def restore_training_checkpoint(
    model: Adapted,
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
    require_optimizer(optimizer, "restore_training_checkpoint")
    directory = str(manager.directory)
    step = find_step(manager, step, directory)
    where = f"{directory} (step {step})"
    data = read_description(manager, step, where)
    config, specs = parse_description(data, where)
    check_layers(data, model, where)
    check_config(model.config, config, where)
    restore_into(
        manager,
        step,
        _training_variables(model, optimizer),
        specs,
        where,
        lambda: check_adapters(data, model, where),
    )
    return step
