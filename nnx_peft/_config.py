"""`LoraConfig`: what to adapt and how, as frozen keyword-only data."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from nnx_peft import _hf_config
from nnx_peft._errors import ConfigError
from nnx_peft._scaling import scaling

#: Base-weight quantization types accepted for QLoRA (names Qwix understands).
WEIGHT_QTYPES: tuple[str, ...] = ("nf4", "int4", "int8", "float8_e4m3fn")

#: Initialisations of the adapter factors (``LoraConfig.init``); see ``docs/variants.md``.
INIT_METHODS: tuple[str, ...] = ("default", "gaussian", "pissa", "olora")

#: ``LoraConfig.target`` shortcut: every module that multiplies by its own weight, except
#: the output head (see ``docs/variants.md#all-linear``).
ALL_LINEAR = "all-linear"


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


def _pattern_values(
    field: str, value: object, valid: Any, expected: str, example: str
) -> tuple[tuple[str, Any], ...]:
    """Normalises a ``{regex: value}`` mapping (or a sequence of pairs) to ordered pairs."""
    items: tuple[Any, ...] = (None,)  # reported below
    if isinstance(value, Mapping):
        items = tuple(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
    if not all(isinstance(item, tuple | list) and len(item) == 2 for item in items):
        raise ConfigError(
            f"LoraConfig.{field} must map module-path regexes to values, as a dict (first "
            f"match wins, in order) or a sequence of (regex, value) pairs; got "
            f"{type(value).__name__} {value!r}. Example: {field}={example}."
        )
    pairs = tuple((pattern, _native(v)) for pattern, v in items)
    _patterns(field, [pattern for pattern, _ in pairs], allow_empty=True)
    seen: set[str] = set()
    for pattern, v in pairs:
        if pattern in seen:
            raise ConfigError(
                f"LoraConfig.{field} lists the regex {pattern!r} twice; the first match wins, "
                "so the second could never apply. Keep one entry per regex."
            )
        seen.add(pattern)
        if not valid(v):
            raise ConfigError(
                f"LoraConfig.{field}[{pattern!r}] must be {expected}; got {v!r}. "
                f"Example: {field}={example}."
            )
    return pairs


def _adapter_dtype(value: object) -> str | None:
    """``LoraConfig.adapter_dtype`` as a dtype name (``None`` stays ``None``), checked to float."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(
            f"LoraConfig.adapter_dtype must be a floating-point dtype or None; got {value!r}. "
            "Use 'float32' (the default), 'bfloat16', or None for each weight's own dtype."
        )
    return dtype.name


def _native(value: Any) -> Any:
    """A NumPy scalar (``np.float32(2.0)``, ``np.int64(4)``) as the Python number it holds."""
    return value.item() if isinstance(value, np.generic) else value


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_float(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which modules get LoRA adapters, and their rank, scaling and dropout.

    Module paths are the attribute names from the model root joined by ``/``
    (list items by their index), e.g. ``layers/0/attn/q_proj``. A module is
    adapted when some ``target`` pattern matches its path in full
    (``re.fullmatch``) and no ``exclude`` pattern does. Inside an adapted
    module, every ``dot_general``, two-operand ``einsum`` and
    ``conv_general_dilated`` whose weight is an ``nnx.Param`` of that module
    gets a low-rank update ``W + (alpha / rank) * A @ B``. Variants
    (rsLoRA, DoRA, PiSSA and OLoRA initialisation, per-module rank and alpha,
    fully trained ``modules_to_save``) are described in ``docs/variants.md``.

    Args:
        rank: Rank ``r`` of the update, a positive integer.
        alpha: Scaling numerator; the update is scaled by ``alpha / rank``
            (``alpha / sqrt(rank)`` with ``use_rslora``).
        dropout: Dropout rate on the adapter input, in ``[0, 1)``. It follows
            NNX's ``model.train()`` / ``model.eval()``.
        target: Regex (or list of regexes) selecting module paths to adapt, or
            ``'all-linear'``: every module that multiplies by its own weight,
            except the output head.
        exclude: Regex (or list) of module paths never adapted, even if targeted.
        weight_qtype: Quantize the adapted modules' base weights (QLoRA), one
            of ``WEIGHT_QTYPES``; ``None`` keeps them in their own dtype.
        tile_size: Sub-channel quantization tile along the innermost
            contracting axis; needs ``weight_qtype`` and must divide that axis.
        use_rslora: Scale updates by ``alpha / sqrt(rank)`` (rank-stabilised
            LoRA) instead of ``alpha / rank``.
        use_dora: Weight-decomposed updates (DoRA): a trained magnitude per
            output feature times the direction ``W + scale * A @ B``.
        init: How A and B start, one of ``INIT_METHODS``: ``'default'`` (A
            He-uniform, B zero), ``'gaussian'`` (A normal with std ``1 / rank``,
            B zero), ``'pissa'`` (principal singular vectors of the weight) or
            ``'olora'`` (QR of the weight). PiSSA and OLoRA replace the adapted
            weights by the residual ``W - scale * A @ B`` in the wrapper.
        rank_pattern: ``{regex: rank}`` overriding ``rank`` for the module paths
            a regex matches in full; the first matching regex wins.
        alpha_pattern: ``{regex: alpha}`` overriding ``alpha`` likewise.
        modules_to_save: Regex (or list) of module paths trained in full next to
            the adapters (a classification head, a norm, an embedding).
        adapter_dtype: Floating-point dtype the adapters (and so their
            gradients and optimizer state) are stored in, as a name or a NumPy/JAX
            dtype; ``'float32'`` by default, as HF PEFT's
            ``autocast_adapter_dtype=True``. ``None`` stores each adapter in its
            weight's dtype (a QLoRA weight: that of its quantization scale),
            so a bfloat16 base gets bfloat16 adapters. The update is computed
            in the layer's compute dtype and the output keeps the base layer's
            dtype either way (see ``docs/training.md#precision``).

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
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: Mapping[str, int] | Sequence[tuple[str, int]] = ()
    alpha_pattern: Mapping[str, float] | Sequence[tuple[str, float]] = ()
    modules_to_save: str | Sequence[str] = ()
    adapter_dtype: Any = "float32"

    def __post_init__(self) -> None:
        for field in ("rank", "alpha", "dropout", "tile_size"):  # np.int64(8) means 8
            object.__setattr__(self, field, _native(getattr(self, field)))
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
        object.__setattr__(self, "adapter_dtype", _adapter_dtype(self.adapter_dtype))
        self._check_variants()

    def _check_variants(self) -> None:
        """Validates and normalises the variant fields (rsLoRA, DoRA, init, patterns, saving)."""
        if ALL_LINEAR in self.target and len(self.target) > 1:
            raise ConfigError(
                f"LoraConfig.target={list(self.target)} mixes {ALL_LINEAR!r} with regexes; "
                f"{ALL_LINEAR!r} stands alone. Use target={ALL_LINEAR!r} with exclude=[...] to "
                "leave modules out, or list regexes only."
            )
        for field in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(
                    f"LoraConfig.{field} must be True or False; got {getattr(self, field)!r}. "
                    f"Example: {field}=True."
                )
        if self.init not in INIT_METHODS:
            raise ConfigError(
                f"LoraConfig.init must be one of {INIT_METHODS}; got {self.init!r}. Use "
                "'default' (B = 0), or 'pissa' to start from the weight's principal components."
            )
        if self.init in ("pissa", "olora") and self.weight_qtype is not None:
            raise ConfigError(
                f"LoraConfig.init={self.init!r} with weight_qtype={self.weight_qtype!r}: "
                f"{self.init} replaces each adapted weight by a float residual, which a QLoRA "
                "base would have to quantize again. Use init='default' with QLoRA, or "
                "weight_qtype=None."
            )
        ranks = _pattern_values(
            "rank_pattern", self.rank_pattern, _positive_int, "a positive int", "{r'.*mlp.*': 16}"
        )
        alphas = _pattern_values(
            "alpha_pattern",
            self.alpha_pattern,
            _positive_float,
            "a positive finite number",
            "{r'.*mlp.*': 32.0}",
        )
        object.__setattr__(self, "rank_pattern", ranks)
        object.__setattr__(self, "alpha_pattern", tuple((p, float(a)) for p, a in alphas))
        object.__setattr__(
            self,
            "modules_to_save",
            _patterns("modules_to_save", self.modules_to_save, allow_empty=True),
        )

    @property
    def scale(self) -> float:
        """The factor of the low-rank update: ``alpha / rank`` (``alpha / sqrt(rank)`` with
        ``use_rslora``), for modules without a ``rank_pattern`` or ``alpha_pattern`` entry."""
        return scaling(self.use_rslora)(self.alpha, self.rank)

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as JSON-compatible data (lists for pattern tuples)."""
        data = dataclasses.asdict(self)
        data["target"] = list(self.target)
        data["exclude"] = list(self.exclude)
        data["modules_to_save"] = list(self.modules_to_save)
        data["rank_pattern"] = dict(self.rank_pattern)  # JSON objects keep their order
        data["alpha_pattern"] = dict(self.alpha_pattern)
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

    @classmethod
    def from_hf(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Builds a config from Hugging Face PEFT's field names (an ``adapter_config.json`` dict).

        ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
        ``exclude_modules``, ``use_rslora``, ``use_dora``, ``init_lora_weights``,
        ``rank_pattern`` and ``alpha_pattern`` become ``rank``, ``alpha``,
        ``dropout``, ``target``, ``exclude``, ``use_rslora``, ``use_dora``,
        ``init``, ``rank_pattern`` and ``alpha_pattern``. Module names keep
        PEFT's semantics, applied to ``/``-joined NNX paths: a list of
        ``target_modules`` selects paths ending in one of its names, a string
        is a regex matched in full, and a pattern key selects paths it ends.
        Metadata fields (``task_type``, ``peft_version``, ...) are ignored.
        To load a PEFT adapter folder with its weights, use
        :meth:`PeftModel.from_hf_peft`.

        Raises:
            UnsupportedPeftFieldError: A field nnx_peft cannot reproduce is set
                (``fan_in_fan_out=True``, ``bias`` other than ``'none'``,
                ``layers_to_transform``, ``peft_type`` other than ``'LORA'``, ...).
            HfConfigError: A field has a value of the wrong kind, or
                ``target_modules`` is missing.

        Example:
            >>> import nnx_peft
            >>> config = nnx_peft.LoraConfig.from_hf(
            ...     {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
            ... )
            >>> config.rank, config.alpha, config.target
            (8, 16.0, ('(?:.*/)?(?:q_proj|v_proj)',))
        """
        return cls(**_hf_config.lora_kwargs(data))
