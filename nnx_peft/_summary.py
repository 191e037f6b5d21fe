"""Counting trainable parameters and formatting the per-target table."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from nnx_peft import _saved_modules
from nnx_peft._adapter import AdapterInfo
from nnx_peft._config import LoraConfig
from nnx_peft._injection import iter_adapters, matching_pattern


@dataclasses.dataclass(frozen=True)
class ParameterSummary:
    """Parameter counts of an adapted model.

    Attributes:
        trainable: Number of trainable parameters (array elements).
        total: Number of ``nnx.Param`` elements, adapters included. A quantized
            base weight counts its quantized values and its scales.
        adapters: Each adapted weight with the target pattern that selected it.
        saved: Each module of ``modules_to_save``, with the pattern that
            selected it and its number of parameters (all trained).
    """

    trainable: int
    total: int
    adapters: tuple[tuple[AdapterInfo, str | None], ...]
    saved: tuple[tuple[str, str, int], ...] = ()

    @property
    def fraction(self) -> float:
        """``trainable / total`` (0.0 for a model without parameters)."""
        return self.trainable / self.total if self.total else 0.0

    def format(self) -> str:
        """The summary as a table, one row per adapted weight and saved module, then the totals.

        ``rank`` and ``scale`` are each adapter's own (``rank_pattern``,
        ``alpha_pattern``, ``use_rslora``); a DoRA adapter's ``params`` include
        its magnitude, whose shape the ``magnitude`` column shows. A weight of
        a scanned layer stack shows its stacked shapes and its ``params`` as
        ``<per layer> x <layers> = <total>``.
        """
        dora = any(info.magnitude_shape is not None for info, _ in self.adapters)
        header: tuple[str, ...] = ("module", "weight", "target", "rank", "scale", "A shape")
        header += ("B shape",) + ("magnitude",) * dora + ("params",)
        rows = [header] + [
            (
                info.module_path,
                info.weight,
                str(pattern),
                str(info.rank),
                f"{info.scale:.4g}",
                str(info.a_shape),
                str(info.b_shape),
                *(("-" if info.magnitude_shape is None else str(info.magnitude_shape),) * dora),
                f"{info.size:,}"
                if info.layers is None
                else f"{info.layer_size:,} x {info.layers} = {info.size:,}",
            )
            for info, pattern in self.adapters
        ]
        rows += [
            (path, "(all)", f"modules_to_save {pattern}", *("-",) * (len(header) - 4), f"{n:,}")
            for path, pattern, n in self.saved
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.4f}"
        )
        return "\n".join(lines)


def _count(state: nnx.State) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(state))


def summarize(
    model: nnx.Module, config: LoraConfig, trainable_filter: nnx.filterlib.Filter
) -> ParameterSummary:
    """Counts parameters of the adapted ``model`` (the module Qwix wrapped)."""
    adapters = tuple(
        (info, matching_pattern(config, info.module_path)) for info in iter_adapters(model)
    )
    patterns = _saved_modules.select(config, model) if config.modules_to_save else {}
    return ParameterSummary(
        trainable=_count(nnx.state(model, trainable_filter)),
        total=_count(nnx.state(model, nnx.Param)),  # adapters are Params too
        adapters=adapters,
        saved=tuple(
            (path, patterns.get(path, "?"), n) for path, n in _saved_modules.sizes(model).items()
        ),
    )
