"""Injecting adapters into an NNX model through Qwix, and finding them again."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import qwix
from flax import nnx

from nnx_peft._config import LoraConfig
from nnx_peft._errors import NoAdapterCreatedError, TargetNotFoundError
from nnx_peft._qwix_bridge import LORA_A_SUFFIX, LORA_B_SUFFIX, PeftLoraProvider
from nnx_peft._variables import AdapterParam


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapted weight: where it is and the shapes of its two factors.

    Attributes:
        module_path: ``/``-joined path of the module holding the weight, relative
            to the adapted model (``PeftModel.model``).
        weight: Attribute name of the base weight in that module, e.g. ``kernel``.
        a_shape: Shape of ``<weight>_lora_a``.
        b_shape: Shape of ``<weight>_lora_b``.
        dtype: Adapter dtype (that of the base weight, or of its quantization scale).
    """

    module_path: str
    weight: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of adapter parameters (A and B together)."""
        a = b = 1
        for n in self.a_shape:
            a *= n
        for n in self.b_shape:
            b *= n
        return a + b


def path_string(path: tuple[Any, ...]) -> str:
    """Joins a graph path with ``/``, the form ``LoraConfig.target`` is matched against."""
    return "/".join(map(str, path))


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every module of ``model`` by ``/``-joined path (the root is ``''``)."""
    return {path_string(path): module for path, module in nnx.iter_modules(model)}


def matches(config: LoraConfig, pattern: str, path: str) -> bool:
    """Whether ``pattern`` (one of ``config.target``) selects ``path`` after exclusions."""
    return re.fullmatch(pattern, path) is not None and not any(
        re.fullmatch(excluded, path) for excluded in config.exclude
    )


def matching_pattern(config: LoraConfig, path: str) -> str | None:
    """The first ``config.target`` pattern that selects ``path`` (first match wins)."""
    return next((p for p in config.target if matches(config, p, path)), None)


def _weight_holders(modules: dict[str, nnx.Module]) -> list[str]:
    """Paths of modules that own an ``nnx.Param`` directly (candidates for adapters)."""
    return [
        path
        for path, module in modules.items()
        if any(isinstance(v, nnx.Param) for v in vars(module).values())
    ]


def check_targets_exist(config: LoraConfig, model: nnx.Module) -> None:
    """Raises :class:`TargetNotFoundError` if a target pattern selects no module."""
    modules = module_paths(model)
    for pattern in config.target:
        if not any(matches(config, pattern, path) for path in modules):
            excluded = [p for p in modules if re.fullmatch(pattern, p)]
            raise TargetNotFoundError(
                f"LoraConfig.target pattern {pattern!r} matches no module path"
                + (
                    f" (it matches {excluded} but exclude={list(config.exclude)} removes them)"
                    if excluded
                    else ""
                )
                + ". Patterns are matched in full (re.fullmatch) against '/'-joined paths.\n"
                f"Module paths that hold weights: {_weight_holders(modules)}\n"
                f"All module paths: {list(modules)}\n"
                "Fix the pattern, e.g. r'.*q_proj' to match 'layers/0/attn/q_proj'."
            )


def rules(config: LoraConfig) -> list[qwix.QuantizationRule]:
    """Qwix rules for ``config``: exclusions first (Qwix applies the first match)."""
    skip = [qwix.QuantizationRule(module_path=pattern) for pattern in config.exclude]
    lora = [
        qwix.LoraRule(
            module_path=pattern,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            weight_qtype=config.weight_qtype,
            tile_size=config.tile_size,
        )
        for pattern in config.target
    ]
    return [*skip, *lora]


def iter_adapters(model: nnx.Module) -> Iterator[AdapterInfo]:
    """Yields every adapter pair nnx_peft created in ``model``, in module order."""
    for path, module in nnx.iter_modules(model):
        for name, value in list(vars(module).items()):
            if not (name.endswith(LORA_A_SUFFIX) and isinstance(value, AdapterParam)):
                continue
            weight = name[: -len(LORA_A_SUFFIX)]
            lora_b = getattr(module, weight + LORA_B_SUFFIX)
            yield AdapterInfo(
                module_path=path_string(path),
                weight=weight,
                a_shape=tuple(value.get_value().shape),
                b_shape=tuple(lora_b.get_value().shape),
                dtype=str(value.get_value().dtype),
            )


def inject(
    model: nnx.Module,
    config: LoraConfig,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Returns an adapted clone of ``model``; ``model`` itself is not modified.

    Raises:
        TargetNotFoundError: A target pattern matches no module path.
        NoAdapterCreatedError: A target pattern matches modules but none got an
            adapter during the sample forward pass.
    """
    check_targets_exist(config, model)
    provider = PeftLoraProvider(rules(config))
    adapted = qwix.apply_lora_to_model(model, provider, *sample_args, rngs=rngs, **sample_kwargs)
    # The sample call ran in whatever mode the model was in: it may have advanced
    # dropout RNG counters or updated batch statistics. Put every non-parameter
    # variable back as the base model has it, so the wrapper starts where it did.
    nnx.update(adapted, nnx.state(model, nnx.Not(nnx.Param)))
    adapted_paths = {info.module_path for info in iter_adapters(adapted)}
    modules = module_paths(adapted)
    for pattern in config.target:
        selected = [path for path in modules if matches(config, pattern, path)]
        if not adapted_paths.intersection(selected):
            raise NoAdapterCreatedError(
                f"LoraConfig.target pattern {pattern!r} matches modules {selected}, but none "
                "of them got an adapter: during the sample call of __call__ none of them ran a "
                "matmul (dot_general, two-operand einsum or convolution) on an nnx.Param it "
                "owns directly. Embedding lookups, norms and container modules get no "
                f"adapter. Modules that did get one: {sorted(adapted_paths)}. Target the "
                "modules that own the projection weights, e.g. r'.*(q_proj|v_proj)'."
            )
    return adapted
