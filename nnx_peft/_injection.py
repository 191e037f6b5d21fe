"""Injecting adapters into an NNX model through Qwix, and finding them again."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import qwix
from flax import nnx

from nnx_peft import _saved_modules
from nnx_peft._config import ALL_LINEAR, LoraConfig
from nnx_peft._errors import NoAdapterCreatedError, TargetNotFoundError
from nnx_peft._paths import is_under, module_paths, path_string
from nnx_peft._qwix_bridge import (
    LAYOUT_SUFFIX,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    CallRecord,
    LoraLayout,
    PeftLoraProvider,
)
from nnx_peft._variables import AdapterParam
from nnx_peft._variants import MAGNITUDE_SUFFIX, AdapterPlan


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapted weight: where it is, the shapes of its factors, and how it is scaled.

    Attributes:
        module_path: ``/``-joined path of the module holding the weight, relative
            to the adapted model (``PeftModel.model``).
        weight: Attribute name of the base weight in that module, e.g. ``kernel``.
        a_shape: Shape of ``<weight>_lora_a``.
        b_shape: Shape of ``<weight>_lora_b``.
        dtype: Adapter dtype (that of the base weight, or of its quantization scale).
        rank: The adapter's rank (``LoraConfig.rank`` or its ``rank_pattern``).
        scale: The factor of its update (``alpha / rank``, or ``alpha / sqrt(rank)``
            with ``use_rslora``, from its ``alpha_pattern`` and ``rank_pattern``).
        variant: ``'lora'``, or ``'dora'`` for a weight-decomposed adapter.
        magnitude_shape: Shape of a DoRA adapter's ``<weight>_lora_magnitude``
            (the weight's shape without its contracting axes), else ``None``.
    """

    module_path: str
    weight: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str
    rank: int
    scale: float
    variant: str = "lora"
    magnitude_shape: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        """Number of trained adapter parameters (A, B and a DoRA magnitude)."""
        magnitude = math.prod(self.magnitude_shape) if self.magnitude_shape is not None else 0
        return math.prod(self.a_shape) + math.prod(self.b_shape) + magnitude


def is_all_linear(config: LoraConfig) -> bool:
    """Whether ``config`` targets ``'all-linear'``."""
    return config.target == (ALL_LINEAR,)


def matches(config: LoraConfig, pattern: str, path: str) -> bool:
    """Whether ``pattern`` (one of ``config.target``) selects ``path`` after exclusions."""
    return re.fullmatch(pattern, path) is not None and not any(
        re.fullmatch(excluded, path) for excluded in config.exclude
    )


def matching_pattern(config: LoraConfig, path: str) -> str | None:
    """The first ``config.target`` pattern that selects ``path`` (first match wins).

    For ``target='all-linear'`` this is ``'all-linear'`` for every path: call
    it for adapted paths only.
    """
    if is_all_linear(config):
        return ALL_LINEAR
    return next((p for p in config.target if matches(config, p, path)), None)


def weight_holders(modules: dict[str, nnx.Module]) -> list[str]:
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
                f"Module paths that hold weights: {weight_holders(modules)}\n"
                f"All module paths: {list(modules)}\n"
                "Fix the pattern, e.g. r'.*q_proj' to match 'layers/0/attn/q_proj'."
            )


def rules(config: LoraConfig, targets: Iterable[str]) -> list[qwix.QuantizationRule]:
    """Qwix rules selecting ``targets``: exclusions first (Qwix applies the first match).

    Rank and alpha here are placeholders: the provider takes each module's
    from the :class:`AdapterPlan`.
    """
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
        for pattern in targets
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
            layout: LoraLayout = getattr(module, weight + LAYOUT_SUFFIX)
            magnitude = getattr(module, weight + MAGNITUDE_SUFFIX, None)
            yield AdapterInfo(
                module_path=path_string(path),
                weight=weight,
                a_shape=tuple(value.get_value().shape),
                b_shape=tuple(lora_b.get_value().shape),
                dtype=str(value.get_value().dtype),
                rank=int(value.get_value().shape[-1]),
                scale=layout.scale,
                variant=layout.update.name,
                magnitude_shape=(None if magnitude is None else tuple(magnitude.get_value().shape)),
            )


# --- Running the provider ------------------------------------------------------------------


def run(
    model: nnx.Module,
    config: LoraConfig,
    targets: Iterable[str],
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
    *,
    record: CallRecord | None = None,
    traced: bool = False,
) -> nnx.Module:
    """``qwix.apply_lora_to_model`` with nnx_peft's provider: an adapted clone of ``model``.

    ``traced`` says that the call runs under ``jax.eval_shape`` to mirror an eager one.
    """
    plan = AdapterPlan.from_config(config)
    provider = PeftLoraProvider(rules(config, targets), plan, record=record, dry_run=traced)
    return qwix.apply_lora_to_model(model, provider, *sample_args, rngs=rngs, **sample_kwargs)


def dry_run(
    model: nnx.Module,
    config: LoraConfig,
    targets: Iterable[str],
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    *,
    record: CallRecord | None = None,
) -> list[AdapterInfo]:
    """The adapters :func:`run` would create, found without computing anything.

    The injection runs on a copy of ``model`` under ``jax.eval_shape``: only
    shapes are traced (no weight is read, no factor drawn, no SVD computed),
    and ``model`` is left exactly as it was.
    """
    graphdef, state = nnx.split(model)
    found: list[AdapterInfo] = []

    def traced(state: nnx.State) -> None:
        clone = nnx.merge(graphdef, state)
        rngs = nnx.Rngs(0)  # only shapes come out of this trace
        adapted = run(
            clone, config, targets, sample_args, sample_kwargs, rngs, record=record, traced=True
        )
        found.extend(iter_adapters(adapted))

    jax.eval_shape(traced, state)
    return found


@dataclasses.dataclass(frozen=True)
class AllLinear:
    """What ``target='all-linear'`` resolves to on one model.

    Attributes:
        candidates: Modules that multiply by one of their own weights during
            the sample call, in module order.
        head: The output head, left out: the module of the sample call's last
            intercepted matmul, if that matmul is on one of its own weights and
            its result has as many elements as the model's output (or one of
            its outputs); ``None`` otherwise (e.g. logits computed with a tied,
            transposed embedding).
        targets: The candidates adapted: all but the head, ``exclude`` and
            modules inside ``modules_to_save``.
    """

    candidates: tuple[str, ...]
    head: str | None
    targets: tuple[str, ...]


def all_linear(
    model: nnx.Module,
    config: LoraConfig,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    saved: Iterable[str],
) -> AllLinear:
    """Resolves ``target='all-linear'`` on ``model`` with a dry run that records call order."""
    probe = dataclasses.replace(
        config,
        target=".*",
        exclude=(),
        dropout=0.0,
        weight_qtype=None,
        tile_size=None,
        use_dora=False,
        init="default",
        rank_pattern=(),
        alpha_pattern=(),
        modules_to_save=(),
    )
    record = CallRecord()
    found = dry_run(model, probe, (".*",), sample_args, sample_kwargs, record=record)
    candidates = tuple(dict.fromkeys(info.module_path for info in found))
    head = None
    if record.ops:
        path, weight, size = record.ops[-1]
        if weight is not None and size in record.output_sizes:
            head = path
    saved = tuple(saved)
    targets = tuple(
        path
        for path in candidates
        if path != head
        and not any(re.fullmatch(pattern, path) for pattern in config.exclude)
        and not any(is_under(path, root) for root in saved)
    )
    return AllLinear(candidates, head, targets)


def as_pattern(paths: Iterable[str]) -> str:
    """One regex matching exactly ``paths``."""
    return "(?:" + "|".join(re.escape(path) for path in paths) + ")"


def inject(
    model: nnx.Module,
    config: LoraConfig,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Returns an adapted clone of ``model``; ``model`` itself is not modified.

    Raises:
        TargetNotFoundError: A target, ``rank_pattern``, ``alpha_pattern`` or
            ``modules_to_save`` pattern selects nothing.
        NoAdapterCreatedError: A target pattern matches modules but none got an
            adapter during the sample forward pass.
        ConfigError: A saved module is, or holds, an adapted module.
    """
    saved = _saved_modules.select(config, model)
    if is_all_linear(config):
        resolved = all_linear(model, config, sample_args, sample_kwargs, saved)
        if not resolved.targets:
            raise NoAdapterCreatedError(
                f"LoraConfig.target={ALL_LINEAR!r} found no module to adapt: modules that "
                f"multiply by their own weight: {list(resolved.candidates)}, output head "
                f"{resolved.head!r} (left out), exclude={list(config.exclude)}. Target "
                "modules by regex instead."
            )
        targets: tuple[str, ...] = (as_pattern(resolved.targets),)
    else:
        check_targets_exist(config, model)
        targets = tuple(config.target)
    adapted = run(model, config, targets, sample_args, sample_kwargs, rngs)
    # The sample call ran in whatever mode the model was in: it may have advanced
    # dropout RNG counters or updated batch statistics. Put every non-parameter
    # variable back as the base model has it, so the wrapper starts where it did.
    nnx.update(adapted, nnx.state(model, nnx.Not(nnx.Param)))
    adapted_paths = {info.module_path for info in iter_adapters(adapted)}
    if not is_all_linear(config):
        _check_every_target_adapted(config, adapted, adapted_paths)
    _check_patterns_used(config, adapted_paths)
    _saved_modules.check_disjoint(saved, adapted_paths)
    _saved_modules.mark(adapted, saved)
    return adapted


def _check_every_target_adapted(
    config: LoraConfig, adapted: nnx.Module, adapted_paths: set[str]
) -> None:
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


def unused_value_patterns(config: LoraConfig, adapted_paths: set[str]) -> list[tuple[str, str]]:
    """``(field, regex)`` of each ``rank_pattern`` / ``alpha_pattern`` key that applies to no
    adapted module: it matches none in full, or only ones an earlier key takes."""
    unused = []
    for field in ("rank_pattern", "alpha_pattern"):
        pairs = getattr(config, field)
        for index, (pattern, _) in enumerate(pairs):
            earlier = [e for e, _ in pairs[:index]]
            if not any(
                re.fullmatch(pattern, p) and not any(re.fullmatch(e, p) for e in earlier)
                for p in adapted_paths
            ):
                unused.append((field, pattern))
    return unused


def _check_patterns_used(config: LoraConfig, adapted_paths: set[str]) -> None:
    """Raises :class:`TargetNotFoundError` for a rank or alpha pattern no adapter uses."""
    for field, pattern in unused_value_patterns(config, adapted_paths):
        raise TargetNotFoundError(
            f"LoraConfig.{field} key {pattern!r} applies to no adapted module: it matches "
            "none of them in full, or only ones an earlier key already took (the first match "
            f"wins). Adapted modules: {sorted(adapted_paths)}. Fix or remove the key."
        )
