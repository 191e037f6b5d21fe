"""A dry run of the targeting: which modules a ``LoraConfig`` adapts, before wrapping."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from flax import nnx

from nnx_peft import _saved_modules
from nnx_peft._config import ALL_LINEAR, LoraConfig
from nnx_peft._injection import (
    AdapterInfo,
    all_linear,
    as_pattern,
    dry_run,
    is_all_linear,
    module_paths,
    sample_keywords,
    unused_value_patterns,
)
from nnx_peft._paths import is_under


@dataclasses.dataclass(frozen=True)
class ModuleTarget:
    """One module of a :func:`inspect_targets` report.

    Attributes:
        path: The module's ``/``-joined path (``''`` for the root).
        holds_weights: Whether it owns an ``nnx.Param`` directly.
        target: The first ``target`` regex matching its path in full, or
            ``'all-linear'`` for a module that multiplies by its own weight;
            ``None`` when nothing selects it.
        skipped: Why a selected module is not adapted (an ``exclude`` regex,
            the output head of ``'all-linear'``, ``modules_to_save``), or ``None``.
        saved: The ``modules_to_save`` regex that makes it trained in full, or ``None``.
        adapters: The adapters it would get (shapes, rank, scale, variant).
    """

    path: str
    holds_weights: bool
    target: str | None
    skipped: str | None
    saved: str | None
    adapters: tuple[AdapterInfo, ...]


@dataclasses.dataclass(frozen=True)
class TargetReport:
    """What ``PeftModel(base_model, config, ...)`` would adapt, from :func:`inspect_targets`.

    Attributes:
        modules: Every module of the model, in ``nnx.iter_modules`` order.
        unused: Each pattern of the config that selects nothing (a target,
            ``exclude``, ``rank_pattern``, ``alpha_pattern`` or
            ``modules_to_save`` regex), saying why; wrapping raises for all of
            them but ``exclude``.
        output_head: For ``target='all-linear'``, the module left out as the
            output head, or ``None`` (see ``docs/variants.md#all-linear``).
    """

    modules: tuple[ModuleTarget, ...]
    unused: tuple[str, ...]
    output_head: str | None = None

    @property
    def adapted(self) -> tuple[str, ...]:
        """The paths of the modules that would get adapters."""
        return tuple(m.path for m in self.modules if m.adapters)

    def format(self) -> str:
        """The report as a table, then the patterns that matched nothing."""

        def describe(infos: tuple[AdapterInfo, ...]) -> str:
            return "; ".join(
                f"{i.weight}: A {i.a_shape} B {i.b_shape}"
                + (f" m {i.magnitude_shape}" if i.magnitude_shape is not None else "")
                + f", rank {i.rank}, scale {i.scale:.4g}"
                + (f", {i.layers} layers on axis {i.layer_axis}" if i.layers is not None else "")
                + (f", {i.variant}" if i.variant != "lora" else "")
                for i in infos
            )

        header = ("module", "weights", "target", "adapters")
        rows = [header] + [
            (
                m.path or "(root)",
                "yes" if m.holds_weights else "-",
                m.target or "-",
                describe(m.adapters)
                or (f"skipped: {m.skipped}" if m.skipped else "")
                or (f"trained in full (modules_to_save {m.saved})" if m.saved else "-"),
            )
            for m in self.modules
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in (*widths, len(header[3]))))
        if self.output_head is not None:
            lines.append(f"output head left out by {ALL_LINEAR!r}: {self.output_head}")
        lines.append("patterns that matched nothing: " + ("none" if not self.unused else ""))
        lines += [f"  {entry}" for entry in self.unused]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.format()


def inspect_targets(
    base_model: nnx.Module,
    config: LoraConfig,
    *sample_args: Any,
    sample_kwargs: Mapping[str, Any] | None = None,
    **keywords: Any,
) -> TargetReport:
    """Lists what ``PeftModel(base_model, config, *sample_args)`` would adapt, without wrapping.

    The injection runs under ``jax.eval_shape`` on a copy of ``base_model``:
    only shapes are traced, nothing is computed (no factor drawn, no PiSSA
    SVD), and ``base_model`` is left exactly as it was. Patterns that select
    nothing are reported instead of raised. Errors the sample call itself
    raises (an unsupported layer, a QLoRA tile size that does not divide a
    weight) are raised as when wrapping.

    Args:
        base_model: The model to adapt.
        config: The configuration to check.
        *sample_args: Sample positional inputs, as for ``PeftModel``.
        sample_kwargs: Sample keyword inputs by name, as for ``PeftModel``.
        **keywords: More sample keyword inputs.

    Returns:
        Every module with its target, the adapters it would get and why it is
        skipped; the patterns that match nothing; the ``'all-linear'`` output head.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import nnx_peft
        >>> from nnx_peft.toy import DecoderConfig, TinyDecoder
        >>> base = TinyDecoder(DecoderConfig(vocab_size=11, num_layers=1), rngs=nnx.Rngs(0))
        >>> config = nnx_peft.LoraConfig(rank=4, alpha=8.0, target="all-linear")
        >>> report = nnx_peft.inspect_targets(base, config, jnp.zeros((1, 4), jnp.int32))
        >>> report.output_head, len(report.adapted)
        ('lm_head', 7)
    """
    sample_kwargs = sample_keywords(sample_kwargs, keywords, "inspect_targets")
    modules = module_paths(base_model)
    saved_matches = _saved_modules.find(config, base_model)
    saved = {p: pattern for pattern, paths in saved_matches.items() for p in paths}
    unused = [
        f"modules_to_save {pattern!r}: matches no module holding an nnx.Param"
        for pattern, paths in saved_matches.items()
        if not paths
    ]
    head = None
    if is_all_linear(config):
        resolved = all_linear(base_model, config, sample_args, sample_kwargs, saved)
        head, targets = resolved.head, resolved.targets
        candidates = set(resolved.candidates)
        infos = dry_run(
            base_model, config, [as_pattern(targets)] if targets else [], sample_args, sample_kwargs
        )
    else:
        candidates = set()
        infos = dry_run(base_model, config, config.target, sample_args, sample_kwargs)
    by_path: dict[str, list[AdapterInfo]] = {}
    for info in infos:
        by_path.setdefault(info.module_path, []).append(info)
    report = []
    for path, module in modules.items():
        target, skipped = _selection(config, path, candidates, head, saved)
        report.append(
            ModuleTarget(
                path=path,
                holds_weights=any(isinstance(v, nnx.Param) for v in vars(module).values()),
                target=target,
                skipped=skipped if not by_path.get(path) else None,
                saved=next((s for root, s in saved.items() if is_under(path, root)), None),
                adapters=tuple(by_path.get(path, ())),
            )
        )
    unused += _unused(config, modules, set(by_path))
    return TargetReport(modules=tuple(report), unused=tuple(unused), output_head=head)


def _selection(
    config: LoraConfig, path: str, candidates: set[str], head: str | None, saved: dict[str, str]
) -> tuple[str | None, str | None]:
    """The target selecting ``path`` (before exclusions) and why it is skipped, if it is."""
    if is_all_linear(config):
        target = ALL_LINEAR if path in candidates else None
    else:
        target = next((p for p in config.target if re.fullmatch(p, path)), None)
    if target is None:
        return None, None
    excluded = next((p for p in config.exclude if re.fullmatch(p, path)), None)
    if excluded is not None:
        return target, f"exclude {excluded!r}"
    if path == head:
        return target, "output head"
    root = next((r for r in saved if is_under(path, r)), None)
    if root is not None and is_all_linear(config):
        return target, f"inside modules_to_save module {root!r}"
    return target, None


def _unused(config: LoraConfig, modules: dict[str, nnx.Module], adapted: set[str]) -> list[str]:
    """The patterns of ``config`` that select nothing, with the reason."""
    unused = []
    if not is_all_linear(config):
        for pattern in config.target:
            selected = [
                p
                for p in modules
                if re.fullmatch(pattern, p) and not any(re.fullmatch(e, p) for e in config.exclude)
            ]
            if not selected:
                unused.append(f"target {pattern!r}: matches no module path (after exclude)")
            elif not adapted.intersection(selected):
                unused.append(
                    f"target {pattern!r}: matches {selected}, which get no adapter (no matmul "
                    "on a weight of their own)"
                )
    for pattern in config.exclude:
        if not any(re.fullmatch(pattern, p) for p in modules):
            unused.append(f"exclude {pattern!r}: matches no module path")
    unused += [
        f"{field} {pattern!r}: applies to no adapted module"
        for field, pattern in unused_value_patterns(config, adapted)
    ]
    return unused
