"""`LoraConfig`: what to adapt and how, as frozen keyword-only data."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from nnx_peft._errors import ConfigError

#: Base-weight quantization types accepted for QLoRA (names Qwix understands).
WEIGHT_QTYPES: tuple[str, ...] = ("nf4", "int4", "int8", "float8_e4m3fn")


def _patterns(field: str, value: object, *, allow_empty: bool) -> tuple[str, ...]:
    """Normalises a regex or a sequence of regexes to a tuple, checking each."""
    if isinstance(value, str):
        patterns: tuple[object, ...] = (value,)
    elif isinstance(value, Sequence):
        patterns = tuple(value)
    else:
        raise ConfigError(
            f"LoraConfig.{field} must be a regex string or a list of them; "
            f"got {type(value).__name__} {value!r}. Example: {field}=r'.*(q_proj|v_proj)'."
        )
    if not patterns and not allow_empty:
        raise ConfigError(
            f"LoraConfig.{field} is empty; give at least one regex matched in full "
            "against '/'-joined module paths, e.g. r'.*(q_proj|v_proj)'."
        )
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(
                f"LoraConfig.{field} entries must be non-empty regex strings; got {pattern!r}."
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(
                f"LoraConfig.{field} has an invalid regex {pattern!r}: {err}. "
                "Fix the pattern (it is matched with re.fullmatch against module paths "
                "such as 'layers/0/attn/q_proj')."
            ) from None
    return patterns  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which modules get LoRA adapters, and their rank, scaling and dropout.

    Module paths are the attribute names from the model root joined by ``/``
    (list items by their index), e.g. ``layers/0/attn/q_proj``. A module is
    adapted when some ``target`` pattern matches its path in full
    (``re.fullmatch``) and no ``exclude`` pattern does. Inside an adapted
    module, every ``dot_general``, two-operand ``einsum`` and
    ``conv_general_dilated`` whose weight is an ``nnx.Param`` of that module
    gets a low-rank update ``W + (alpha / rank) * A @ B``.

    Args:
        rank: Rank ``r`` of the update, a positive integer.
        alpha: Scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: Dropout rate on the adapter input, in ``[0, 1)``. It follows
            NNX's ``model.train()`` / ``model.eval()``.
        target: Regex (or list of regexes) selecting module paths to adapt.
        exclude: Regex (or list) of module paths never adapted, even if targeted.
        weight_qtype: Quantize the adapted modules' base weights (QLoRA), one
            of ``WEIGHT_QTYPES``; ``None`` keeps them in their own dtype.
        tile_size: Sub-channel quantization tile along the innermost
            contracting axis; needs ``weight_qtype`` and must divide that axis.

    Raises:
        ConfigError: A field holds an invalid value; the message names it.

    Example:
        >>> import nnx_peft
        >>> config = nnx_peft.LoraConfig(rank=8, alpha=16.0, target=r".*(q_proj|v_proj)")
        >>> config.target
        ('.*(q_proj|v_proj)',)
    """

    rank: int
    alpha: float
    target: str | Sequence[str]
    dropout: float = 0.0
    exclude: str | Sequence[str] = ()
    weight_qtype: str | None = None
    tile_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(
                f"LoraConfig.rank must be a positive int; got {self.rank!r}. "
                "Typical values are 4 to 64, e.g. rank=8."
            )
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ConfigError(
                f"LoraConfig.alpha must be a positive finite number; got {self.alpha!r}. "
                "A common choice is alpha = 2 * rank."
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(
                f"LoraConfig.dropout must be a number in [0, 1); got {self.dropout!r}. "
                "Use 0.0 for no dropout, or e.g. 0.05."
            )
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "target", _patterns("target", self.target, allow_empty=False))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude, allow_empty=True))
        if self.weight_qtype is not None and self.weight_qtype not in WEIGHT_QTYPES:
            raise ConfigError(
                f"LoraConfig.weight_qtype must be None or one of {WEIGHT_QTYPES}; "
                f"got {self.weight_qtype!r}. Use 'nf4' for QLoRA as in the QLoRA paper."
            )
        if self.tile_size is not None:
            if (
                isinstance(self.tile_size, bool)
                or not isinstance(self.tile_size, int)
                or self.tile_size < 1
            ):
                raise ConfigError(
                    f"LoraConfig.tile_size must be None or a positive int; got {self.tile_size!r}. "
                    "It must divide the contracting axis of every targeted weight, e.g. 64."
                )
            if self.weight_qtype is None:
                raise ConfigError(
                    f"LoraConfig.tile_size={self.tile_size} needs weight_qtype, since it "
                    "tiles the base-weight quantization; set weight_qtype='nf4' (or another "
                    "of WEIGHT_QTYPES) or drop tile_size."
                )

    @property
    def scale(self) -> float:
        """The factor applied to the low-rank update: ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as JSON-compatible data (lists for pattern tuples)."""
        data = dataclasses.asdict(self)
        data["target"] = list(self.target)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Builds a config from :meth:`to_dict` output, rejecting unknown fields.

        Raises:
            ConfigError: ``data`` has fields ``LoraConfig`` does not know, or
                invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"Unknown LoraConfig fields {unknown}; expected a subset of {sorted(known)}. "
                "The data may come from a newer nnx_peft; upgrade, or remove those fields."
            )
        return cls(**data)
