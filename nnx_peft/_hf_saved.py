"""PEFT's ``modules_to_save`` in a PEFT folder: whole trained modules as PyTorch parameters.

PEFT saves a module listed in ``modules_to_save`` (a name that ends module
names) as its PyTorch parameters, ``base_model.model.<module name>.<param>``:
for ``nn.Linear`` ``weight`` ``(out, in)`` and ``bias``, for ``nn.Embedding``
``weight`` ``(vocab, dim)``, for a norm ``weight`` and ``bias``. nnx_peft's own
``modules_to_save`` (``_saved_modules``) holds the same values as NNX
parameters; this module maps them for the NNX layers whose layout is PyTorch's
up to a transpose: ``nnx.Linear`` (``kernel`` is ``weight.T``), ``nnx.Embed``
(``embedding`` is ``weight``), ``nnx.LayerNorm`` and ``nnx.RMSNorm``
(``scale`` is ``weight``). Other modules are refused: their parameters have
no known PyTorch names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnx_peft._errors import HfShapeError, HfTensorPlacementError, UnsupportedPeftFieldError

#: Per NNX layer, each PyTorch parameter name: (NNX attribute, whether it is transposed).
_LAYOUTS: dict[type, dict[str, tuple[str, bool]]] = {
    nnx.Linear: {"weight": ("kernel", True), "bias": ("bias", False)},
    nnx.Embed: {"weight": ("embedding", False)},
    nnx.LayerNorm: {"weight": ("scale", False), "bias": ("bias", False)},
    nnx.RMSNorm: {"weight": ("scale", False)},
}


def split_name(name: str, saved: Iterable[str]) -> tuple[str, str] | None:
    """``(module name, parameter)`` of a tensor name under a ``modules_to_save`` entry.

    PEFT's semantics: an entry selects the modules whose names it ends.
    """
    module, _, param = name.rpartition(".")
    if module and any(module == s or module.endswith("." + s) for s in saved):
        return module, param
    return None


def _parameters(module: nnx.Module, path: str) -> dict[str, tuple[nnx.Variable[Any], bool]]:
    """The module's parameters by PyTorch name, each with whether it is transposed."""
    layout = _LAYOUTS.get(type(module))
    if layout is None:
        raise UnsupportedPeftFieldError(
            f"modules_to_save: module {path!r} is a {type(module).__qualname__}, whose "
            "parameters have no known PyTorch names (nnx_peft maps nnx.Linear, nnx.Embed, "
            "nnx.LayerNorm and nnx.RMSNorm). Leave it out of modules_to_save, or save it "
            "with save_adapter (nnx_peft's own format)."
        )
    found = {}
    for hf_name, (attribute, transposed) in layout.items():
        variable = getattr(module, attribute, None)
        if isinstance(variable, nnx.Variable):
            found[hf_name] = (variable, transposed)
    return found


def to_nnx(
    module: nnx.Module, path: str, name: str, tensors: Mapping[str, np.ndarray], where: str
) -> list[tuple[nnx.Variable[Any], np.ndarray]]:
    """The values for ``module``'s parameters from PEFT's tensors of module ``name``.

    Raises:
        UnsupportedPeftFieldError: The module's layer type has no PyTorch names.
        HfTensorPlacementError: The tensors are not exactly its parameters.
        HfShapeError: A tensor's shape does not fit.
    """
    parameters = _parameters(module, path)
    if set(tensors) != set(parameters):
        raise HfTensorPlacementError(
            f"{where}: the modules_to_save tensors of {name!r} are {sorted(tensors)}, but "
            f"module {path!r} ({type(module).__qualname__}) has exactly "
            f"{sorted(parameters)}. Fix module_map, or load the adapter onto the architecture "
            "it was trained for."
        )
    pairs = []
    for hf_name, (variable, transposed) in parameters.items():
        value = tensors[hf_name].T if transposed else tensors[hf_name]
        shape = tuple(variable.get_value().shape)
        if value.shape != shape:
            raise HfShapeError(
                f"{where}: {name}.{hf_name} has shape {tensors[hf_name].shape}, but module "
                f"{path!r} needs {shape[::-1] if transposed else shape}. The adapter was "
                "trained on another model size; load it onto the model it was made for."
            )
        pairs.append((variable, np.ascontiguousarray(value)))
    return pairs


def to_hf(module: nnx.Module, path: str) -> dict[str, np.ndarray]:
    """``module``'s parameters as PEFT saves them, by PyTorch name."""
    tensors = {}
    for hf_name, (variable, transposed) in _parameters(module, path).items():
        value = np.asarray(jax.device_get(variable.get_value()))
        tensors[hf_name] = np.ascontiguousarray(value.T if transposed else value)
    return tensors
