"""Hugging Face PEFT's ``adapter_config.json``: reading it, refusing what cannot be reproduced,
and writing one that ``peft.PeftModel.from_pretrained`` loads.

PEFT names modules with ``.``-joined PyTorch names (``model.layers.0.self_attn.q_proj``)
and matches them in two ways that this module reproduces:

- ``target_modules`` as a list selects a module whose name equals an entry or ends
  with ``'.' + entry``; as a string it is a regex matched in full;
- a ``rank_pattern`` / ``alpha_pattern`` key ``k`` selects a module named ``n`` when
  ``re.match(rf"(.*\\.)?({k})$", n)`` succeeds; the first key in order wins
  (``peft.utils.other.get_pattern_key``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nnx_peft._errors import HfConfigError, UnsupportedPeftFieldError

CONFIG_FILE = "adapter_config.json"

#: Fields that describe the folder or the training run, not the adapted model's outputs.
_INFORMATIONAL = frozenset(
    {
        "auto_mapping",
        "base_model_name_or_path",
        "inference_mode",
        "init_lora_weights",  # checked separately
        "megatron_core",
        "peft_version",
        "qalora_group_size",  # only read with use_qalora, which is refused
        "revision",
        "task_type",
        "exclude_modules",  # handled by from_hf; from_hf_peft adapts what has tensors
        "target_modules",
    }
)
#: Fields nnx_peft reproduces.
_SUPPORTED = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "bias",
        "modules_to_save",
    }
)
#: The fix suggested for a field set to something nnx_peft cannot reproduce.
_FIXES = {
    "fan_in_fan_out": "this is for GPT-2-style Conv1D weights stored (in, out); nnx_peft reads "
    "the (out, in) layout of nn.Linear only",
    "bias": "nnx_peft trains no biases; retrain with bias='none'",
    "layers_to_transform": "list the adapted layers in target_modules (or as tensors) instead",
    "layers_pattern": "use it without layers_to_transform, or list the layers in target_modules",
    "lora_bias": "nnx_peft's LoRA has no bias on B; retrain with lora_bias=False",
    "trainable_token_indices": "token-level embedding training is not supported",
    "layer_replication": "replicated layers are not supported",
    "target_parameters": "LoRA on bare parameters (not modules) is not supported",
}
_DEFAULT_FIX = "nnx_peft cannot reproduce it exactly; retrain without it"


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def check_supported(data: Mapping[str, Any], where: str) -> None:
    """Raises :class:`UnsupportedPeftFieldError` for the first field nnx_peft cannot reproduce.

    Every field that is neither informational nor supported must be unset
    (``null``, ``false``, ``{}``, ``[]``): a field from a newer PEFT with a real
    value is refused rather than ignored.
    """
    if data.get("peft_type", "LORA") != "LORA":
        raise UnsupportedPeftFieldError(
            f"{where}: peft_type={data['peft_type']!r}; nnx_peft imports LoRA adapters only "
            "(peft_type='LORA'). Train a LoRA adapter, or use a tool for that method."
        )
    if data.get("fan_in_fan_out", False) is not False:
        raise UnsupportedPeftFieldError(
            f"{where}: fan_in_fan_out={data['fan_in_fan_out']!r}; {_FIXES['fan_in_fan_out']}."
        )
    if data.get("bias", "none") != "none":
        raise UnsupportedPeftFieldError(
            f"{where}: bias={data['bias']!r}; {_FIXES['bias']} (PEFT's default)."
        )
    for field, value in data.items():
        if field in _INFORMATIONAL or field in _SUPPORTED or _is_unset(value):
            continue
        raise UnsupportedPeftFieldError(
            f"{where}: {field}={value!r} is not supported: {_FIXES.get(field, _DEFAULT_FIX)}. "
            f"Fields nnx_peft reproduces: {sorted(_SUPPORTED)}."
        )


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``folder``.

    Raises:
        HfConfigError: It is missing, not JSON, or not a JSON object.
    """
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise HfConfigError(
            f"No {CONFIG_FILE} in {folder}. A Hugging Face PEFT adapter folder holds "
            f"{CONFIG_FILE} and adapter_model.safetensors, as written by "
            "peft_model.save_pretrained(path); point path at that folder."
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HfConfigError(
            f"{file} cannot be read as JSON ({type(err).__name__}: {err}). Save the adapter "
            "again with PEFT's save_pretrained; nothing was loaded."
        ) from err
    if not isinstance(data, dict):
        raise HfConfigError(
            f"{file} holds a JSON {type(data).__name__}, not an object of LoRA settings. Save "
            "the adapter again with PEFT's save_pretrained."
        )
    return data


@dataclasses.dataclass(frozen=True)
class HfSettings:
    """The LoRA settings of a PEFT config, validated, with PEFT's own names and key semantics."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    target_modules: str | tuple[str, ...] | None
    exclude_modules: str | tuple[str, ...] | None
    init_lora_weights: bool | str
    modules_to_save: tuple[str, ...] = ()

    def rank(self, name: str) -> int:
        """The rank PEFT gives module ``name``."""
        key = pattern_key([k for k, _ in self.rank_pattern], name)
        return dict(self.rank_pattern).get(key, self.r) if key is not None else self.r

    def alpha(self, name: str) -> float:
        """The alpha PEFT gives module ``name``."""
        key = pattern_key([k for k, _ in self.alpha_pattern], name)
        return (
            dict(self.alpha_pattern).get(key, self.lora_alpha)
            if key is not None
            else (self.lora_alpha)
        )


def _invalid(where: str, field: str, value: Any, expected: str) -> HfConfigError:
    return HfConfigError(
        f"{where}: {field} must be {expected}; got {value!r}. Fix the file, or save the adapter "
        "again with PEFT's save_pretrained."
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _names(where: str, field: str, value: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _invalid(where, field, value, "null, a regex string or a list of module names")


def _pattern(where: str, field: str, value: Any, valid: Any) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
        raise _invalid(where, field, value, "an object of {name or regex: positive number}")
    for key in value:
        try:
            re.compile(key)
        except re.error as err:
            raise _invalid(where, field, value, f"valid regex keys ({key!r}: {err})") from None
    return tuple(value.items())


def parse(data: Mapping[str, Any], where: str) -> HfSettings:
    """Validates a PEFT LoRA config and returns its settings.

    Raises:
        UnsupportedPeftFieldError: A field asks for something nnx_peft cannot reproduce.
        HfConfigError: A field is missing or has a value of the wrong kind.
    """
    check_supported(data, where)
    r = data.get("r", 8)
    if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1):
        raise _invalid(where, "r", r, "a positive integer")
    alpha = data.get("lora_alpha", 8)
    if not (_number(alpha) and alpha > 0):
        raise _invalid(where, "lora_alpha", alpha, "a positive number")
    dropout = data.get("lora_dropout", 0.0)
    if not (_number(dropout) and 0 <= dropout < 1):
        raise _invalid(where, "lora_dropout", dropout, "a number in [0, 1)")
    flags = {}
    for field in ("use_rslora", "use_dora"):
        flags[field] = data.get(field, False)
        if not isinstance(flags[field], bool):
            raise _invalid(where, field, flags[field], "true or false")
    init = data.get("init_lora_weights", True)
    if not isinstance(init, bool | str):
        raise _invalid(where, "init_lora_weights", init, "true, false or a method name")
    saved = data.get("modules_to_save") or []
    if not (isinstance(saved, list) and all(isinstance(v, str) and v for v in saved)):
        raise _invalid(where, "modules_to_save", saved, "null or a list of module names")
    return HfSettings(
        r=r,
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        use_rslora=flags["use_rslora"],
        use_dora=flags["use_dora"],
        rank_pattern=_pattern(
            where, "rank_pattern", data.get("rank_pattern"), lambda v: isinstance(v, int) and v > 0
        ),
        alpha_pattern=_pattern(
            where, "alpha_pattern", data.get("alpha_pattern"), lambda v: _number(v) and v > 0
        ),
        target_modules=_names(where, "target_modules", data.get("target_modules")),
        exclude_modules=_names(where, "exclude_modules", data.get("exclude_modules")),
        init_lora_weights=init,
        modules_to_save=tuple(saved),
    )


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first pattern key (of ``rank_pattern`` or ``alpha_pattern``) PEFT picks for ``name``."""
    return next((key for key in keys if re.match(rf"(.*\.)?({key})$", name)), None)


# --- HF config -> LoraConfig (names typed by hand) --------------------------------------------


def _nnx_names(value: str | tuple[str, ...]) -> str:
    """A regex over ``/``-joined NNX paths with PEFT's semantics for module names."""
    if isinstance(value, str):
        return value
    return r"(?:.*/)?(?:" + "|".join(re.escape(v) for v in value) + ")"


_INITS = {True: "default", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def lora_kwargs(data: Mapping[str, Any]) -> dict[str, Any]:
    """``LoraConfig.from_hf``'s arguments, from PEFT's field names, matched against NNX paths.

    ``target_modules`` (a list: module names that end a path; a string: a regex
    matched in full; ``'all-linear'``), ``exclude_modules`` and the pattern keys keep
    PEFT's semantics, applied to ``/``-joined NNX paths.
    """
    where = "LoraConfig.from_hf"
    if not isinstance(data, Mapping):
        raise HfConfigError(
            f"{where} takes the dict of an adapter_config.json; got {type(data).__name__}."
        )
    settings = parse(data, where)
    if settings.target_modules is None:
        raise HfConfigError(
            f"{where}: target_modules is missing; nnx_peft has no per-architecture defaults. "
            "Give target_modules=['q_proj', 'v_proj'] (names that end NNX module paths)."
        )
    init = _INITS.get(settings.init_lora_weights)
    if init is None:
        raise UnsupportedPeftFieldError(
            f"{where}: init_lora_weights={settings.init_lora_weights!r} is not supported; use "
            f"one of {sorted(map(str, _INITS))}."
        )
    target = settings.target_modules
    return dict(
        rank=settings.r,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target="all-linear" if target == "all-linear" else _nnx_names(target),
        exclude=() if settings.exclude_modules is None else _nnx_names(settings.exclude_modules),
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        init=init,
        rank_pattern=tuple((rf"(?:.*/)?(?:{k})", v) for k, v in settings.rank_pattern),
        alpha_pattern=tuple((rf"(?:.*/)?(?:{k})", v) for k, v in settings.alpha_pattern),
        modules_to_save=_nnx_names(settings.modules_to_save) if settings.modules_to_save else (),
    )


# --- Export -------------------------------------------------------------------------------


def selecting_key(group: Iterable[str], names: Iterable[str]) -> str:
    """A pattern key that selects exactly ``group`` among ``names`` under PEFT's semantics.

    The shortest dotted suffix common to ``group`` (``'q_proj'`` for every
    layer's ``q_proj``), not starting at a list index, that selects nothing
    else: as written (its dots then match any character) or else escaped.
    Otherwise the escaped full names.
    """
    group = sorted(group)
    others = [n for n in names if n not in group]
    parts = [name.split(".") for name in group]
    for length in range(1, min(map(len, parts)) + 1):
        suffixes = {".".join(p[-length:]) for p in parts}
        if len(suffixes) != 1:
            break
        suffix = suffixes.pop()
        if suffix.split(".")[0].isdigit() and length < min(map(len, parts)):
            continue  # 'layers.1.k_proj' rather than '1.k_proj'
        for key in (suffix, re.escape(suffix)):  # as typed by hand when that is exact
            try:
                exact = all(pattern_key([key], n) for n in group) and not any(
                    pattern_key([key], n) for n in others
                )
            except re.error:  # a name with regex syntax in it, used unescaped
                continue
            if exact:
                return key
    return "|".join(re.escape(name) for name in group)


def target_modules(adapted: Iterable[str], mappable: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly the ``adapted`` names.

    A last name component (``'q_proj'``) where every module of the model that
    the map names with it is adapted, else the full names. ``mappable`` is
    every name the module map gives a module of the model.
    """
    adapted = set(adapted)
    mappable = set(mappable) | adapted
    targets: set[str] = set()
    for name in adapted:
        last = name.rsplit(".", 1)[-1]
        same = {n for n in mappable if n == last or n.endswith("." + last)}
        targets.add(last if same <= adapted else name)
    return sorted(targets)


def hf_dict(
    *,
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    use_dora: bool,
    targets: list[str],
    rank_pattern: dict[str, int],
    alpha_pattern: dict[str, float],
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of an exported adapter: the fields PEFT reads, all set."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": modules_to_save or None,
    }
