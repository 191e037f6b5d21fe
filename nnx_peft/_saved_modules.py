"""``LoraConfig.modules_to_save``: whole modules trained in full next to the adapters.

A saved module (a classification head, a norm, an embedding) is a subtree of
the wrapped model. In the wrapper's clone, and only there, each of its
``nnx.Param`` variables is replaced by a :class:`~nnx_peft.SavedParam` holding
the same array and metadata (sharding included) and, under ``'saved_from'``,
the original type. ``SavedParam`` subclasses ``AdapterParam``, so one type
still selects everything trainable: ``trainable_filter``, optimizers,
``split_trainable``, checkpoints and parameter counts pick the saved
parameters up without knowing about them.

The saved module also keeps its values from before training (every array
variable but RNG state, batch statistics included) in a
:class:`SavedOriginal` variable named ``lora_saved_original``; it shares the
base model's buffers until training replaces them. ``disable_adapter()``
swaps them in for its block, so it still gives the base model's outputs, and
marks where saved modules are. ``merge_and_unload()`` gives the parameters
their original types back, with their trained values.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

from nnx_peft._config import LoraConfig
from nnx_peft._errors import AdapterStateError, ConfigError, TargetNotFoundError
from nnx_peft._parts import ORIGINAL_ATTRIBUTE
from nnx_peft._paths import is_under, module_paths, path_string
from nnx_peft._variables import AdapterParam, InitialFactor, SavedParam

#: Metadata key of a ``SavedParam`` holding the type of the parameter it replaced.
SAVED_FROM = "saved_from"


class SavedOriginal(nnx.Variable[dict[str, jax.Array]]):
    """A saved module's array values from before training, by path inside the module.

    Not an ``nnx.Param``: never trained, counted or saved in checkpoints.
    """


def _holds_params(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(module))


def find(config: LoraConfig, model: nnx.Module) -> dict[str, list[str]]:
    """Per ``modules_to_save`` pattern, the paths of the modules holding parameters it selects."""
    modules = module_paths(model)
    return {
        pattern: [p for p, m in modules.items() if re.fullmatch(pattern, p) and _holds_params(m)]
        for pattern in config.modules_to_save
    }


def select(config: LoraConfig, model: nnx.Module) -> dict[str, str]:
    """The saved modules' paths (outermost only), each with the pattern that selected it.

    Raises:
        TargetNotFoundError: A ``modules_to_save`` pattern selects no module
            holding an ``nnx.Param``.
    """
    modules = module_paths(model)
    selected: dict[str, str] = {}
    for pattern, matched in find(config, model).items():
        if not matched:
            holders = [p for p, m in modules.items() if p and _holds_params(m)]
            raise TargetNotFoundError(
                f"LoraConfig.modules_to_save pattern {pattern!r} matches no module that holds "
                "an nnx.Param (patterns are matched in full, re.fullmatch, against '/'-joined "
                f"module paths). Modules holding parameters: {holders}. Fix the pattern, e.g. "
                "r'classifier' or r'.*final_norm'."
            )
        for path in matched:
            selected.setdefault(path, pattern)
    return {
        path: pattern
        for path, pattern in selected.items()
        if not any(is_under(path, other) for other in selected if other != path)
    }


def check_disjoint(saved: dict[str, str], adapted: set[str]) -> None:
    """Raises :class:`ConfigError` if a saved module is, or contains, an adapted module."""
    for root, pattern in saved.items():
        clash = sorted(path for path in adapted if is_under(path, root))
        if clash:
            raise ConfigError(
                f"LoraConfig.modules_to_save pattern {pattern!r} selects {root!r}, which holds "
                f"adapted modules {clash}: a weight is either trained in full or adapted, not "
                "both. Leave them out of target (or add them to exclude), or save a smaller module."
            )


def roots(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """The saved modules of ``model``, by path."""
    return _roots(model)


def _roots(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    return [
        (path_string(p), m) for p, m in nnx.iter_modules(model) if ORIGINAL_ATTRIBUTE in vars(m)
    ]


def _is_state(variable: Any) -> bool:
    """Array variables a saved module keeps and restores: all but RNG state and bookkeeping."""
    return (
        isinstance(variable, nnx.Variable)
        and not isinstance(variable, nnx.RngState | SavedOriginal | InitialFactor)
        and isinstance(variable.get_value(), jax.Array | jax.ShapeDtypeStruct)
    )


def _variables(module: nnx.Module) -> dict[tuple[Any, ...], nnx.Variable[Any]]:
    return {path: v for path, v in nnx.iter_graph(module) if _is_state(v)}


def _replace(module: nnx.Module, path: tuple[Any, ...], variable: nnx.Variable[Any]) -> None:
    """Puts ``variable`` at ``path`` inside ``module`` (attributes, or list items)."""
    parent: Any = module
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = variable
    else:
        setattr(parent, path[-1], variable)


def mark(model: nnx.Module, saved: dict[str, str]) -> None:
    """Makes the saved modules of ``model`` trainable, keeping their current values."""
    modules = module_paths(model)
    for root in saved:
        module = modules[root]
        variables = _variables(module)
        for path, variable in variables.items():
            if isinstance(variable, nnx.Param) and not isinstance(variable, AdapterParam):
                metadata = {**variable.get_metadata(), SAVED_FROM: type(variable)}
                _replace(module, path, SavedParam.from_metadata(variable.get_raw_value(), metadata))
        originals = {path_string(p): v.get_value() for p, v in variables.items()}
        setattr(module, ORIGINAL_ATTRIBUTE, SavedOriginal(originals))


def unmark(model: nnx.Module) -> None:
    """The inverse of :func:`mark`, keeping the current values (for ``merge_and_unload``)."""
    for _, module in _roots(model):
        for path, variable in _variables(module).items():
            if isinstance(variable, SavedParam):
                metadata = dict(variable.get_metadata())
                original = metadata.pop(SAVED_FROM)
                _replace(module, path, original.from_metadata(variable.get_raw_value(), metadata))
        delattr(module, ORIGINAL_ATTRIBUTE)


def state(model: nnx.Module) -> dict[str, nnx.Variable[Any]]:
    """Every array variable of the saved modules (but RNG state), by path relative to ``model``."""
    return {
        "/".join(filter(None, (root, path_string(path)))): variable
        for root, module in _roots(model)
        for path, variable in _variables(module).items()
    }


def sizes(model: nnx.Module) -> dict[str, int]:
    """Per saved module, the number of trained (``SavedParam``) elements."""
    return {
        root: sum(v.get_value().size for v in _variables(m).values() if isinstance(v, SavedParam))
        for root, m in _roots(model)
    }


@contextlib.contextmanager
def originals(model: nnx.Module) -> Iterator[None]:
    """Runs the block with every saved module's values from before training, then restores.

    Values changed inside the block (an optimizer update, batch statistics of
    a training forward) would be thrown away by the restore, so the block's
    exit raises instead of losing them silently.

    Raises:
        AdapterStateError: On leaving the block, if it changed a saved module's
            values; the trained values are back in place, the block's changes are not.
    """
    current = []
    for root, module in _roots(model):
        kept = getattr(module, ORIGINAL_ATTRIBUTE).get_value()
        for path, variable in _variables(module).items():
            original = kept[path_string(path)]
            name = "/".join(filter(None, (root, path_string(path))))
            current.append((name, variable, variable.get_value(), original))
            variable.set_value(original)
    failed = True
    try:
        yield
        failed = False
    finally:
        changed = [
            name
            for name, variable, _, original in current
            if not failed and _changed(variable.get_value(), original)
        ]
        for _, variable, value, _ in current:
            variable.set_value(value)
    if changed:
        raise AdapterStateError(
            f"The values of modules_to_save variables {changed} were changed inside a "
            "`with model.disable_adapter():` block (by an optimizer update, or a training "
            "forward updating batch statistics). The block runs them with their values from "
            "before training, so the change cannot be kept: the trained values are back in "
            "place and the block's changes are dropped. Train and update outside the block; "
            "inside it, run the model in eval mode (model.eval()) for reference outputs only."
        )


def _changed(value: Any, original: Any) -> bool:
    if value is original:
        return False
    if getattr(value, "shape", None) != getattr(original, "shape", None):
        return True
    return not bool(jax.numpy.array_equal(value, original, equal_nan=True))
