"""Hugging Face PEFT adapter folders in and out: ``PeftModel.from_hf_peft`` and ``save_hf_peft``.

A PEFT folder holds ``adapter_config.json`` (``_hf_config``) and
``adapter_model.safetensors``, keyed ``base_model.model.<module name>.lora_A.weight``
(``(r, in)``) and ``...lora_B.weight`` (``(out, r)``), plus ``...lora_magnitude_vector``
(``(out,)``) for DoRA. A ``module_map`` gives each NNX module path its PyTorch name,
and ``_hf_layout`` lays each tensor out like its NNX weight. No torch is needed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnx_peft import _hf_config, _hf_layout, _hf_saved, _safetensors, _saved_modules
from nnx_peft._adapted import Adapted, AdaptedT
from nnx_peft._adapter import Adapter, adapters
from nnx_peft._checkpoint_format import adapter_variables, require_unmerged, values
from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    CheckpointExistsError,
    ConfigError,
    CorruptCheckpointError,
    FusedWeightError,
    HfShapeError,
    HfTensorPlacementError,
    UnsupportedPeftFieldError,
)
from nnx_peft._injection import as_pattern
from nnx_peft._paths import module_paths
from nnx_peft._sharding import require_addressable
from nnx_peft._variants import AdapterPlan

#: ``(nnx_path_regex, hf_name_template)`` pairs (first full match wins), or a function.
ModuleMap = Sequence[tuple[str, str]] | Callable[[str], str | None]

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_A, _B, _MAGNITUDE = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
#: An embedding's factors (``(r, vocab)`` and ``(features, r)``, as a Linear's ``A`` and ``B``).
_EMBEDDING_A, _EMBEDDING_B = ".lora_embedding_A", ".lora_embedding_B"
#: The full base table PEFT saves next to a LoRA on an embedding (``save_embedding_layers``).
_EMBEDDING_BASE = ".base_layer.weight"
_SUFFIXES = {
    "A": _A,
    "B": _B,
    "magnitude": _MAGNITUDE,
    "embedding_A": _EMBEDDING_A,
    "embedding_B": _EMBEDDING_B,
}
#: Files a PEFT folder may hold; a folder with anything else is never replaced.
_FOLDER_FILES = frozenset({_hf_config.CONFIG_FILE, WEIGHTS_FILE, "README.md"})


# --- The module map ----------------------------------------------------------------------


def mapper(module_map: ModuleMap) -> Callable[[str], str | None]:
    """``module_map`` as a function from NNX module path to PEFT module name (or ``None``).

    Raises:
        ConfigError: ``module_map`` is neither callable nor a sequence of
            ``(regex, template)`` string pairs with valid regexes.
    """
    if callable(module_map):
        return module_map
    example = r"[(r'layers/(\d+)/attn/(q|k|v|o)_proj', r'model.layers.\1.self_attn.\2_proj')]"
    if isinstance(module_map, str | bytes) or not isinstance(module_map, Sequence):
        raise ConfigError(
            f"module_map must be a sequence of (nnx_path_regex, hf_name_template) pairs or a "
            f"function; got {type(module_map).__name__}. Example: module_map={example}."
        )
    pairs = []
    for entry in module_map:
        if not (
            isinstance(entry, tuple | list)
            and len(entry) == 2
            and all(isinstance(s, str) for s in entry)
        ):
            raise ConfigError(
                f"module_map entries must be (nnx_path_regex, hf_name_template) string pairs; "
                f"got {entry!r}. Example: module_map={example}."
            )
        try:
            pairs.append((re.compile(entry[0]), entry[1]))
        except re.error as err:
            raise ConfigError(f"module_map has an invalid regex {entry[0]!r}: {err}.") from None

    def name(path: str) -> str | None:
        for pattern, template in pairs:
            match = pattern.fullmatch(path)
            if match:
                return match.expand(template)
        return None

    return name


def _names(model: nnx.Module, name_of: Callable[[str], str | None]) -> dict[str, str]:
    """Every module path of ``model`` that the map names, with its name."""
    named = {}
    for path in module_paths(model):
        name = name_of(path)
        if name is not None:
            if not isinstance(name, str):
                raise ConfigError(
                    f"module_map gave {name!r} for {path!r}; it must give a str or None."
                )
            named[path] = name
    return named


def _unique(named: Mapping[str, str], wanted: set[str] | None = None) -> dict[str, str]:
    """Name to path, refusing a name given to several paths (among ``wanted`` names)."""
    by_name: dict[str, list[str]] = {}
    for path, name in named.items():
        by_name.setdefault(name, []).append(path)
    for name, paths in by_name.items():
        if len(paths) > 1 and (wanted is None or name in wanted):
            raise HfTensorPlacementError(
                f"module_map gives the PEFT name {name!r} to several modules: {paths}. Each "
                "name must stand for one module; make the map's patterns more specific."
            )
    return {name: paths[0] for name, paths in by_name.items()}


@dataclasses.dataclass(frozen=True)
class _Adapted:
    """One adapted module of a wrapper: its adapter, and that adapter as a PEFT Linear."""

    adapter: Adapter
    linear: _hf_layout.HfLinear

    @property
    def path(self) -> str:
        return self.adapter.path

    @property
    def weight(self) -> str:
        return self.adapter.weight

    @property
    def lookup(self) -> bool:
        """Whether the adapter updates an embedding's row lookups."""
        return self.adapter.layout.lookup

    @property
    def suffixes(self) -> tuple[str, str]:
        """PEFT's key suffixes of ``A`` and ``B`` for this module (an embedding's or a Linear's)."""
        return (_EMBEDDING_A, _EMBEDDING_B) if self.lookup else (_A, _B)

    def base_as_hf(self) -> np.ndarray:
        """The base weight as PEFT saves it: an embedding's as is, a Linear's ``(out, in)``."""
        value = _host(self.adapter.base)
        return value if self.lookup else self.linear.weight_to_hf(value)


def _adapted(model: Adapted) -> dict[str, _Adapted]:
    """Every adapted module by path, refusing modules with several adapted weights."""
    found: dict[str, _Adapted] = {}
    for adapter in adapters(model.model):
        path, weight = adapter.path, adapter.weight
        where = f"weight {weight!r} of module {path!r}"
        if path in found:
            raise FusedWeightError(
                f"Module {path!r} has several adapted weights "
                f"({found[path].weight!r}, {weight!r}); a PEFT module name "
                "stands for one Linear. Leave the module out of module_map."
            )
        info = adapter.info()
        lin = _hf_layout.hf_linear(adapter.layout, info.a_shape, info.b_shape, where)
        if len(lin.sizes) < len(lin.sub.weight) + 1:
            shape = tuple(adapter.base.get_value().shape)
            if len(shape) == len(lin.sub.weight):
                lin = _hf_layout.with_weight_sizes(lin, shape)
        _hf_layout.check_explained(lin, info.a_shape, info.b_shape, where)
        found[path] = _Adapted(adapter, lin)
    return found


# --- Loading -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensors:
    """A PEFT file's tensors, sorted.

    Attributes:
        modules: LoRA tensors by PEFT module name: ``{'A': ..., 'B': ...}``
            (an embedding's as a Linear's, of the same shapes), and
            ``'magnitude'`` for DoRA.
        lookups: Names of the modules whose factors are an embedding's.
        bases: Full base tables PEFT saved next to LoRA on an embedding
            (``save_embedding_layers``), by module name.
        saved: Parameters of ``modules_to_save`` modules, by module name and
            PyTorch parameter name (``_hf_saved``).
    """

    modules: dict[str, dict[str, np.ndarray]]
    lookups: frozenset[str]
    bases: dict[str, np.ndarray]
    saved: dict[str, dict[str, np.ndarray]]


def _split_keys(
    tensors: Mapping[str, np.ndarray], where: str, modules_to_save: Sequence[str] = ()
) -> _Tensors:
    """The file's tensors by PEFT module name, refusing any that is no LoRA tensor,
    embedding base table or parameter of a module ``modules_to_save`` names."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    lookups: set[str] = set()
    bases: dict[str, np.ndarray] = {}
    saved: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        if key.startswith(PREFIX) and key.endswith(_EMBEDDING_BASE):
            bases[key[len(PREFIX) : -len(_EMBEDDING_BASE)]] = tensor
            continue
        kind = next((k for k, suffix in _SUFFIXES.items() if key.endswith(suffix)), None)
        in_saved = _hf_saved.split_name(key[len(PREFIX) :], modules_to_save)
        if key.startswith(PREFIX) and kind is None and in_saved is not None:
            saved.setdefault(in_saved[0], {})[in_saved[1]] = tensor
            continue
        if not key.startswith(PREFIX) or kind is None:
            raise UnsupportedPeftFieldError(
                f"{where} holds {key!r}, which is no LoRA factor "
                f"('{PREFIX}<module>.lora_A.weight', '.lora_B.weight', "
                "'.lora_embedding_A', '.lora_embedding_B' or '.lora_magnitude_vector'): a "
                "bias, a modules_to_save weight of a module the config does not list, or "
                "another method's tensor, which nnx_peft does not import. Retrain without it."
            )
        name = key[len(PREFIX) : -len(_SUFFIXES[kind])]
        if kind.startswith("embedding_"):
            lookups.add(name)
        modules.setdefault(name, {})[kind.removeprefix("embedding_")] = tensor
    for name, parts in modules.items():
        linear = {k for k in ("A", "B") if PREFIX + name + _SUFFIXES[k] in tensors}
        if name in lookups and linear:
            raise CorruptCheckpointError(
                f"{where} holds both lora_A/B and lora_embedding_A/B for module {name!r}; a "
                "module is a Linear or an embedding, not both. Save the adapter again."
            )
        if "A" not in parts or "B" not in parts:
            raise CorruptCheckpointError(
                f"{where} holds only {sorted(parts)} for module {name!r}; every module needs "
                "lora_A and lora_B (lora_embedding_A and lora_embedding_B for an embedding). "
                "The file is incomplete; save the adapter again."
            )
    return _Tensors(modules, frozenset(lookups), bases, saved)


def _nnx_pattern(
    keys: Sequence[tuple[str, Any]], placed: Mapping[str, str]
) -> tuple[tuple[str, Any], ...]:
    """PEFT pattern keys as NNX patterns: each key becomes the paths whose names it governs."""
    pairs = []
    for key, value in keys:
        governed = sorted(
            path
            for name, path in placed.items()
            if _hf_config.pattern_key([k for k, _ in keys], name) == key
        )
        if governed:
            pairs.append((as_pattern(governed), value))
    return tuple(pairs)


def from_hf_peft(
    cls: Callable[..., AdaptedT],
    base_model: nnx.Module,
    path: str | os.PathLike[str],
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    *,
    rngs: nnx.Rngs,
    module_map: ModuleMap,
) -> AdaptedT:
    """``base_model`` wrapped with the adapter of a PEFT folder (``PeftModel.from_hf_peft``)."""
    folder = Path(path)
    data = _hf_config.read_config(folder)
    where = str(folder)
    settings = _hf_config.parse(data, str(folder / _hf_config.CONFIG_FILE))
    if settings.init_lora_weights not in (True, False, "gaussian"):
        raise UnsupportedPeftFieldError(
            f"{where}: init_lora_weights={settings.init_lora_weights!r}. PEFT saves such an "
            "adapter relative to a base model it changed (a residual), not the original one. "
            "Convert it in PEFT to a plain LoRA adapter (save_pretrained with "
            "path_initial_model_for_weight_conversion) and import that."
        )
    tensors, _ = _safetensors._read(folder / WEIGHTS_FILE)
    split = _split_keys(tensors, where, settings.modules_to_save)
    modules = split.modules
    if any(("magnitude" in parts) != settings.use_dora for parts in modules.values()):
        raise CorruptCheckpointError(
            f"{where}: use_dora={settings.use_dora}, but lora_magnitude_vector tensors are "
            f"{'missing' if settings.use_dora else 'present'}. The config and the tensors "
            "disagree; save the adapter again."
        )
    named = _names(base_model, mapper(module_map))
    by_name = _unique(named, {*modules, *split.saved})
    unplaced = sorted(
        name for name in {*modules, *split.bases, *split.saved} if name not in by_name
    )
    if unplaced:
        raise HfTensorPlacementError(
            f"{where} has tensors for {len(unplaced)} PEFT modules that module_map gives to no "
            f"module of the model: {unplaced[:8]}. Names the map gives: "
            f"{sorted(by_name)[:8]}{' ...' if len(by_name) > 8 else ''}. Fix module_map (or "
            "load the adapter onto the architecture it was trained for)."
        )
    placed = {name: by_name[name] for name in modules}
    saved = {name: by_name[name] for name in split.saved}
    for name, parts in modules.items():
        if parts["A"].ndim != 2 or parts["B"].ndim != 2:
            raise HfShapeError(
                f"{where}: {PREFIX}{name} has factors of shapes {parts['A'].shape} and "
                f"{parts['B'].shape}; a Linear's are (r, in) and (out, r)."
            )
        rank = settings.rank(name)
        if parts["A"].shape[0] != rank or parts["B"].shape[1] != rank:
            raise HfShapeError(
                f"{where}: {PREFIX}{name} has rank {parts['A'].shape[0]} (lora_A "
                f"{parts['A'].shape}, lora_B {parts['B'].shape}), but the config (r, "
                f"rank_pattern) gives it rank {rank}. The config and tensors disagree."
            )
    config = LoraConfig(
        rank=settings.r,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        target=[re.escape(p) for p in sorted(placed.values())],
        use_rslora=settings.use_rslora,
        use_dora=settings.use_dora,
        rank_pattern=_nnx_pattern(settings.rank_pattern, placed),
        alpha_pattern=_nnx_pattern(settings.alpha_pattern, placed),
        modules_to_save=[re.escape(p) for p in sorted(saved.values())],
    )
    model = cls(base_model, config, *sample_args, rngs=rngs, **sample_kwargs)
    adapted = _adapted(model)
    arrays: list[tuple[nnx.Variable[Any], np.ndarray]] = []
    _check_kinds(adapted, placed, split, where)
    for name, parts in modules.items():
        entry = adapted[placed[name]]
        lin = entry.linear
        variables: dict[str, nnx.Variable[Any]] = {"A": entry.adapter.a, "B": entry.adapter.b}
        expected: dict[str, tuple[int, ...]] = {
            "A": (lin.sizes[lin.sub.rank], lin.size(lin.inputs))
        }
        expected["B"] = (lin.size(lin.outputs), lin.sizes[lin.sub.rank])
        if settings.use_dora:
            magnitude = entry.adapter.magnitude
            assert magnitude is not None  # the wrapper was made with use_dora
            variables["magnitude"] = magnitude
            expected["magnitude"] = (lin.size(lin.outputs),)
        suffixes = dict(zip(("A", "B"), entry.suffixes, strict=True)) | {"magnitude": _MAGNITUDE}
        for kind, shape in expected.items():
            if tuple(parts[kind].shape) != shape:
                raise HfShapeError(
                    f"{where}: {PREFIX}{name}{suffixes[kind]} has shape "
                    f"{tuple(parts[kind].shape)}, but "
                    f"module {placed[name]!r} (weight {entry.weight!r}, in axes "
                    f"{[lin.sizes[c] for c in lin.inputs]}, out axes "
                    f"{[lin.sizes[c] for c in lin.outputs]}) needs {shape}. The adapter was "
                    "trained on another model size; load it onto the model it was made for."
                )
        arrays.append((variables["A"], lin.a_to_nnx(parts["A"], variables["A"].get_value().shape)))
        arrays.append((variables["B"], lin.b_to_nnx(parts["B"], variables["B"].get_value().shape)))
        if settings.use_dora:
            arrays.append((variables["magnitude"], lin.magnitude_to_nnx(parts["magnitude"])))
    wrapped = module_paths(model.model)
    for name, module_path in saved.items():
        arrays += _hf_saved.to_nnx(
            wrapped[module_path], module_path, name, split.saved[name], where
        )
    # Everything fits: only now is anything assigned (to the new wrapper only).
    for variable, value in arrays:
        current = variable.get_value()
        cast = value.astype(current.dtype)
        variable.set_value(_safetensors._placed(cast, current.sharding))
    return model


def _check_kinds(
    adapted: Mapping[str, _Adapted], placed: Mapping[str, str], split: _Tensors, where: str
) -> None:
    """Refuses factors of the wrong kind for their module, and saved base weights that differ.

    Raises:
        HfTensorPlacementError: An embedding's factors on a module that multiplies
            by its weight, or a Linear's on one that looks rows up, or a base
            weight for a module with no factors.
        UnsupportedPeftFieldError: A base weight PEFT saved differs from the
            model's (a resized or trained embedding).
    """
    for name, path in placed.items():
        entry = adapted[path]
        if entry.lookup != (name in split.lookups):
            needed, found = ("lora_embedding_A/B", "lora_A/B")[:: 1 if entry.lookup else -1]
            kind = "looks up rows of" if entry.lookup else "multiplies by"
            raise HfTensorPlacementError(
                f"{where}: module {name!r} has {found} tensors, but module_map places it on "
                f"{path!r}, which {kind} its weight {entry.weight!r} and so needs {needed}. "
                "Fix module_map (an embedding's name to the NNX embedding, a Linear's to a "
                "matmul)."
            )
    for name, base in split.bases.items():
        if name not in placed:
            raise HfTensorPlacementError(
                f"{where} holds the base weight {PREFIX}{name}{_EMBEDDING_BASE} but no LoRA "
                f"factors for {name!r}. The file is incomplete; save the adapter again."
            )
        entry = adapted[placed[name]]
        ours = entry.base_as_hf()
        if base.shape != ours.shape or not np.array_equal(base.astype(ours.dtype), ours):
            raise UnsupportedPeftFieldError(
                f"{where} holds the full weight {PREFIX}{name}{_EMBEDDING_BASE} (PEFT's "
                f"save_embedding_layers), of shape {base.shape}, which differs from the weight "
                f"{entry.weight!r} of {entry.path!r} (shape {ours.shape}): the embedding was "
                "resized or trained in full. nnx_peft imports adapters onto the unchanged base; "
                "load the base model the adapter was saved with."
            )


# --- Export --------------------------------------------------------------------------------


def _refuse_unexportable(config: LoraConfig) -> None:
    if config.init in ("pissa", "olora"):
        raise UnsupportedPeftFieldError(
            f"LoraConfig.init={config.init!r}: this adapter is relative to a residual base "
            "weight (W - scale * A0 @ B0), not to the base model PEFT would load it onto. "
            "Merge it (merge_and_unload) instead, or train with init='default'."
        )


def _grouped(
    pairs: tuple[tuple[str, Any], ...],
    default: Any,
    values: Mapping[str, Any],
    names: Mapping[str, str],
) -> dict[str, Any]:
    """A PEFT pattern dict giving each name its value, one key per config pattern used."""
    groups: dict[int, list[str]] = {}
    for path, value in values.items():
        if value == default:
            continue
        index = next(i for i, (p, _) in enumerate(pairs) if re.fullmatch(p, path))
        groups.setdefault(index, []).append(path)
    return {
        _hf_config.selecting_key([names[p] for p in group], names.values()): pairs[index][1]
        for index, group in sorted(groups.items())
    }


def save_hf_peft(
    model: Adapted, path: str | os.PathLike[str], *, module_map: ModuleMap, overwrite: bool
) -> None:
    """Writes ``model``'s adapters as a PEFT folder; see ``PeftModel.save_hf_peft``."""
    require_unmerged(model, "save_hf_peft")
    config = model.config
    _refuse_unexportable(config)
    target = _check_target(Path(path), overwrite)
    adapted = _adapted(model)
    named = _names(model.model, mapper(module_map))
    nameless = sorted(p for p in adapted if p not in named)
    if nameless:
        raise HfTensorPlacementError(
            f"module_map gives no PEFT name to the adapted modules {nameless[:8]}. Add a pair "
            "for them, e.g. (r'layers/(\\d+)/attn/q_proj', r'model.layers.\\1.self_attn.q_proj')."
        )
    roots = dict(_saved_modules.roots(model.model))
    unnamed = sorted(p for p in roots if p not in named)
    if unnamed:
        raise HfTensorPlacementError(
            f"module_map gives no PEFT name to the modules_to_save modules {unnamed[:8]}. Add "
            "a pair for them, e.g. (r'head', r'score')."
        )
    names = {p: named[p] for p in adapted}
    _unique({**names, **{p: named[p] for p in roots}})
    require_addressable(values(adapter_variables(model)), "save_hf_peft")
    plan = AdapterPlan.from_config(config)
    tensors: dict[str, np.ndarray] = {}
    for p, entry in adapted.items():
        lin = entry.linear
        key = f"{PREFIX}{names[p]}"
        a_suffix, b_suffix = entry.suffixes
        tensors[key + a_suffix] = lin.a_to_hf(_host(entry.adapter.a))
        tensors[key + b_suffix] = lin.b_to_hf(_host(entry.adapter.b))
        if config.use_dora:
            magnitude = entry.adapter.magnitude
            assert magnitude is not None  # the wrapper was made with use_dora
            tensors[key + _MAGNITUDE] = lin.magnitude_to_hf(_host(magnitude))
    for p, module in roots.items():
        for param, value in _hf_saved.to_hf(module, p).items():
            tensors[f"{PREFIX}{named[p]}.{param}"] = value
    ranks = {p: plan.spec(p).rank for p in adapted}
    alphas = {p: plan.spec(p).alpha for p in adapted}
    data = _hf_config.hf_dict(
        r=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        targets=_hf_config.target_modules(names.values(), named.values()),
        rank_pattern=_grouped(config.rank_pattern, config.rank, ranks, names),  # type: ignore[arg-type]
        alpha_pattern=_grouped(config.alpha_pattern, config.alpha, alphas, names),  # type: ignore[arg-type]
        modules_to_save=sorted(named[p] for p in roots),
    )
    _write_folder(target, data, {k: np.ascontiguousarray(v) for k, v in tensors.items()})


def _host(variable: nnx.Variable[Any]) -> np.ndarray:
    """The array of ``variable``, on the host."""
    return np.asarray(jax.device_get(variable.get_value()))


def _check_target(target: Path, overwrite: bool) -> Path:
    if target.exists() and not target.is_dir():
        raise CheckpointExistsError(
            f"{target} is a file; a PEFT adapter is a folder. Choose a folder path."
        )
    if target.is_dir() and any(target.iterdir()):
        others = sorted(p.name for p in target.iterdir() if p.name not in _FOLDER_FILES)
        if others:
            raise CheckpointExistsError(
                f"{target} holds other files ({others[:5]}), so it is not replaced even with "
                "overwrite=True. Choose an empty or new folder."
            )
        if not overwrite:
            raise CheckpointExistsError(
                f"{target} already holds a PEFT adapter. Pass overwrite=True to replace it (the "
                "old one stays until the new one is complete), or choose another path."
            )
    return target


def _write_folder(target: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Writes the folder under a temporary name next to ``target``, then renames it into place.

    An existing folder is moved aside first and deleted once the new one is in
    place, so an interrupted save leaves the old or the new adapter, never half of one.
    """
    import json

    safetensors = _safetensors._safetensors()
    token = uuid.uuid4().hex
    partial = target.with_name(f".{target.name}.{token}.partial")
    old = target.with_name(f".{target.name}.{token}.old")
    try:
        partial.mkdir(parents=True)
        weights = partial / WEIGHTS_FILE
        safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
        (partial / _hf_config.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for file in (weights, partial / _hf_config.CONFIG_FILE):
            with open(file, "rb") as written:
                os.fsync(written.fileno())
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
