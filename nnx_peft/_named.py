"""Several named adapters on one model: adding one, choosing one, and seeing one alone.

A ``PeftModel`` holds one adapter per name (HF PEFT's ``add_adapter`` / ``set_adapter``).
Each name's parts live beside the weights they adapt, under names of their own
(``_parts.part_name``); the forward pass adds the updates of the active ones
(``_adapter_ops.add_update``). This module does what concerns names only:

- :func:`base_view` and :func:`transplant` add an adapter by wrapping the model's base
  (its adapters removed) with the new config, exactly as a first wrap does, and moving
  the parts it creates into the model under the new name;
- :func:`isolate` shows one adapter alone, under the default name, for the length of a
  block: checkpoints, safetensors and the Hugging Face export then read and write it as
  they do a model's only adapter, so a checkpoint always holds one adapter, in one format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_peft import _adapter, _combination, _merging, _saved_modules
from nnx_peft._adapter import Adapter, adapters, adapters_of
from nnx_peft._adapter_ops import PER_EXAMPLE
from nnx_peft._adapter_state import AdapterState
from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    AdapterIdsError,
    AdapterNameError,
    AdapterStateError,
    AddedAdapterError,
    ConfigError,
    RngsError,
    SampleInputsError,
    WeightedAdapterError,
)
from nnx_peft._injection import ProviderKey, inject, sample_keywords
from nnx_peft._interception import PROVIDER_ATTRIBUTE, settle_classes, unwrap
from nnx_peft._parts import DEFAULT_ADAPTER, NAME_SEPARATOR
from nnx_peft._paths import path_string
from nnx_peft._quantized import QuantizedWeight

_NAME = re.compile(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*")


def check_new_name(name: object, existing: Collection[str]) -> str:
    """``name`` if it can name a new adapter.

    Raises:
        AdapterNameError: It is no string of letters, digits and single underscores, or
            an adapter has it already.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or NAME_SEPARATOR in name:
        raise AdapterNameError(
            f"An adapter name is a string of letters, digits and single underscores, such "
            f"as 'default' or 'task_2' (it becomes part of variable names); got {name!r}."
        )
    if name in existing:
        raise AdapterNameError(
            f"The model has an adapter named {name!r} already (adapters: {sorted(existing)}). "
            "Choose another name, or delete_adapter(name) first."
        )
    return name


def resolve(names: str | Sequence[str], existing: Collection[str], action: str) -> tuple[str, ...]:
    """``names`` (one name or several) as a tuple, each checked to be an adapter's.

    Raises:
        AdapterNameError: A name is unknown, given twice, or none is given.
    """
    chosen = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in chosen if n not in existing]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        problem = (
            f"unknown adapter name(s) {unknown}"
            if unknown
            else "no name"
            if not chosen
            else f"a name twice ({list(chosen)})"
        )
        raise AdapterNameError(
            f"{action} got {problem}; the model's adapters are {sorted(existing)}. Pass "
            "names from model.adapter_names."
        )
    return chosen


def check_addable(config: LoraConfig, others: Sequence[LoraConfig]) -> None:
    """Refuses a config whose adapter cannot share the model with adapters of ``others``.

    Raises:
        AddedAdapterError: Either starts from the weights (PiSSA, OLoRA: the weight then
            holds one adapter's residual), trains whole modules (``modules_to_save``),
            or they quantize the base differently (QLoRA: the base is quantized once).
    """
    for field, value in (("init", "default"), ("modules_to_save", ())):
        offending = [c for c in (config, *others) if getattr(c, field) != value]
        if offending:
            raise AddedAdapterError(
                f"Several adapters on one model need LoraConfig.{field}={value!r} for every "
                f"one of them; got {field}={getattr(offending[0], field)!r}. "
                + (
                    "PiSSA and OLoRA replace the weight by one adapter's residual, which the "
                    "others would then adapt too."
                    if field == "init"
                    else "A module trained whole belongs to one adapter."
                )
                + " Use separate PeftModels for such adapters."
            )
    first = others[0]
    for field in ("weight_qtype", "tile_size"):
        if getattr(config, field) != getattr(first, field):
            raise AddedAdapterError(
                f"An added adapter quantizes the base as the model's first adapter does: "
                f"LoraConfig.{field}={getattr(first, field)!r} was expected, got "
                f"{getattr(config, field)!r}. The base weights are quantized once, for all "
                f"adapters; pass {field}={getattr(first, field)!r}."
            )


def base_view(model: nnx.Module) -> nnx.Module:
    """A copy of the adapted ``model`` as its base: no adapter, no interception.

    The copy shares the base weights' buffers (a QLoRA weight stays quantized).
    """
    plain = nnx.clone(model)
    for adapter in adapters(plain):
        adapter.remove()
    _saved_modules.unmark(plain)
    unwrap(plain)
    return plain


def transplant(adapted: nnx.Module, model: nnx.Module, name: str) -> list[Adapter]:
    """Moves the adapters of ``adapted`` (a wrap of ``base_view(model)``) into ``model``,
    under the name ``name``, each set ``INACTIVE``; returns them.

    Raises:
        AddedAdapterError: The new wrap quantized a weight the model holds in float (a QLoRA
            adapter targeting a module the model's adapters do not).
    """
    targets = dict(nnx.iter_modules(model))
    moved = []
    for path, module in nnx.iter_modules(adapted):
        for source in adapters_of(path_string(path), module):
            target = targets[path]
            if isinstance(source.base, QuantizedWeight) and not isinstance(
                getattr(target, source.weight), QuantizedWeight
            ):
                raise AddedAdapterError(
                    f"The adapter {name!r} targets module {source.path!r}, whose weight "
                    f"{source.weight!r} the model holds in float: with QLoRA, the base weights "
                    "are quantized once, by the first wrap, so an added adapter can target "
                    "only modules the first one adapts. Narrow LoraConfig.target, or wrap "
                    "anew with a config targeting them all."
                )
            moved.append((source, target))
    made = []
    for source, target in moved:
        adapter = Adapter(source.path, target, source.weight, name)
        adapter.attach(source.detach())
        adapter.set_state(AdapterState.INACTIVE)
        made.append(adapter)
    return made


@contextlib.contextmanager
def isolate(model: nnx.Module, name: str) -> Iterator[None]:
    """Runs the block with ``model`` holding the adapter ``name`` alone, as the default one.

    The other adapters' parts are taken off their modules and put back after the block
    (also when it raises); those of ``name`` are renamed to the default names and back,
    so that whatever the block changed in them stays. An ``INACTIVE`` adapter is active
    for the block.
    """
    hidden = [(a, a.detach()) for a in adapters(model) if a.adapter != name]
    shown = [a.rename(DEFAULT_ADAPTER) for a in adapters(model, {name})]
    inactive = [a.state is AdapterState.INACTIVE for a in shown]
    for adapter, off in zip(shown, inactive, strict=True):
        if off:
            adapter.set_state(AdapterState.ACTIVE)
    try:
        yield
    finally:
        for adapter, off in zip(shown, inactive, strict=True):
            if off:
                adapter.set_state(AdapterState.INACTIVE)
            adapter.rename(name)
        for adapter, parts in hidden:
            adapter.attach(parts)


def per_example(
    model: nnx.Module,
    names: tuple[str, ...],
    ids: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``model(*args, **kwargs)`` with example ``i`` of the batch using the adapter
    ``names[ids[i]]`` alone (``_adapter_ops.add_update`` batches them); inside
    ``disable_adapter()``, every example runs the base model.

    Raises:
        AdapterIdsError: ``ids`` is not a vector of integers, or (when concrete) holds an
            index out of range.
    """
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise AdapterIdsError(
            "adapter_ids takes one integer per example of the batch, an index into "
            f"model.adapter_names {list(names)}; got an array of shape {ids.shape} and "
            f"dtype {ids.dtype}. Example: adapter_ids=jnp.array([0, 1, 1, 0])."
        )
    if not isinstance(ids, jax.core.Tracer):
        bad = [int(i) for i in np.asarray(ids) if not 0 <= i < len(names)]
        if bad:
            raise AdapterIdsError(
                f"adapter_ids holds {bad}, out of range for the {len(names)} adapters "
                f"{list(names)}: each id must be in [0, {len(names)})."
            )
    if _merging.is_disabled(model):
        # Inside disable_adapter() every example runs the base model. The adapters a module
        # holds need not include the disabled (active) ones, so this is decided here, for
        # the whole model, not module by module.
        return model(*args, **kwargs)
    saved = getattr(PER_EXAMPLE, "ids", None), getattr(PER_EXAMPLE, "names", None)
    PER_EXAMPLE.ids, PER_EXAMPLE.names = ids, names
    try:
        return model(*args, **kwargs)
    finally:
        PER_EXAMPLE.ids, PER_EXAMPLE.names = saved


def rename_all(model: nnx.Module, old: str, new: str) -> None:
    """Renames the adapter ``old`` of ``model`` to ``new``, every part of it."""
    for adapter in adapters(model, {old}):
        adapter.rename(new)


#: Each wrapper's sample inputs, kept for :meth:`NamedAdapters.add_adapter` (not state of
#: the wrapper: they are not saved, split or copied with it).
_SAMPLES: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One named adapter of a wrapper: its config, and the targets its wrap resolved."""

    name: str
    config: LoraConfig
    targets: tuple[str, ...]


class NamedAdapters:
    """``PeftModel``'s verbs for several named adapters (HF PEFT's names and meanings).

    The wrapper keeps one :class:`Entry` per adapter, in the order they were added.
    """

    model: nnx.Module
    config: LoraConfig
    _entries: tuple[Entry, ...]

    def _remember_samples(self, sample_args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        _SAMPLES[self] = (sample_args, kwargs)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The names of the adapters, in the order they were added."""
        return tuple(entry.name for entry in self._entries)

    @property
    def active_adapters(self) -> tuple[str, ...]:
        """The names of the adapters in the active set (:meth:`set_adapter`), in order."""
        states = {a.adapter for a in adapters(self.model) if a.state is not AdapterState.INACTIVE}
        return tuple(name for name in self.adapter_names if name in states)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Each adapter's ``LoraConfig``, by name (as HF PEFT's ``peft_config``)."""
        return {entry.name: entry.config for entry in self._entries}

    def add_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        *sample_args: Any,
        rngs: nnx.Rngs,
        sample_kwargs: Mapping[str, Any] | None = None,
        **keywords: Any,
    ) -> None:
        """Adds an adapter named ``adapter_name``, made for ``config`` as a wrap would make it.

        It may target the same modules as the others or other ones, with another rank,
        alpha or variant. It starts outside the active set, so the model computes what it
        computed before; :meth:`set_adapter` activates it.

        Args:
            adapter_name: A new name: letters, digits and single underscores.
            config: The new adapter's config. ``weight_qtype`` and ``tile_size`` must be
                those of the first adapter (the base is quantized once); ``init`` must be
                ``'default'`` and ``modules_to_save`` empty, for every adapter.
            *sample_args: Sample inputs for the call that creates the adapter; none:
                those the wrapper was made with.
            rngs: Initialises the new adapter (as for :class:`PeftModel`).
            sample_kwargs: Sample keyword inputs by name (as for :class:`PeftModel`).
            **keywords: More sample keyword inputs.

        Raises:
            AdapterNameError: The name is invalid or taken.
            AddedAdapterError: The configs cannot share the model (see ``config``).
            AdapterStateError: The adapters are merged or disabled.
            SampleInputsError: No sample inputs are given and the wrapper has none kept
                (a copy made by ``nnx.clone`` or ``nnx.merge`` does not keep them).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> other = nnx_peft.LoraConfig(rank=4, alpha=4.0, target=".*")
            >>> model.add_adapter("other", other, rngs=nnx.Rngs(2))
            >>> model.adapter_names, model.active_adapters
            (('default', 'other'), ('default',))
        """
        kwargs = sample_keywords(sample_kwargs, keywords, "add_adapter")
        check_new_name(adapter_name, self.adapter_names)
        if not isinstance(config, LoraConfig):
            raise ConfigError(
                f"add_adapter takes an nnx_peft.LoraConfig; got {type(config).__qualname__}."
            )
        if not isinstance(rngs, nnx.Rngs):
            raise RngsError(
                f"rngs must be an nnx.Rngs; got {type(rngs).__qualname__}. Pass "
                "rngs=nnx.Rngs(seed) to initialise the new adapter."
            )
        check_addable(config, [entry.config for entry in self._entries])
        self._require_plain("add_adapter()")
        if not sample_args and not kwargs:
            kept = _SAMPLES.get(self)
            if kept is None:
                raise SampleInputsError(
                    "add_adapter needs sample inputs for one call of the model, during which "
                    "the adapter is created, and this wrapper kept none (copies made with "
                    "nnx.clone, nnx.merge or pickle do not). Pass them: "
                    "model.add_adapter(name, config, x, rngs=...)."
                )
            sample_args, kwargs = kept
        adapted = inject(base_view(self.model), config, sample_args, kwargs, rngs)
        key: ProviderKey = vars(adapted)[PROVIDER_ATTRIBUTE]
        transplant(adapted, self.model, adapter_name)
        self._entries = (*self._entries, Entry(adapter_name, config, key.targets))
        self._settle()

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        *,
        svd_rank: int | None = None,
        sample_args: Sequence[Any] = (),
        sample_kwargs: Mapping[str, Any] | None = None,
    ) -> dict[str, float]:
        """Adds ``adapter_name``, a combination of the ``adapters`` with ``weights``.

        In HF PEFT's names and meanings (``c_i`` is ``weights[i]`` times that adapter's
        scale, ``alpha / rank``):

        - ``'cat'``: the factors joined along the rank (the ranks add up); its update is
          ``sum_i c_i A_i @ B_i`` exactly;
        - ``'linear'``: ``A = sum_i sqrt(c_i) A_i``, ``B = sum_i sqrt(c_i) B_i``, for
          adapters of equal ranks on the same weights; its update holds cross terms
          ``sqrt(c_i c_j) A_i @ B_j`` as HF PEFT's does;
        - ``'svd'`` (the default, as in HF PEFT): the best rank-``svd_rank``
          approximation of ``sum_i c_i A_i @ B_i``, weight by weight.

        The new adapter targets the modules any of them adapts, with scale 1
        (``alpha = rank``); like :meth:`add_adapter`'s, it starts outside the active set.

        Args:
            adapters: Names of the plain LoRA adapters to combine.
            weights: One real weight per adapter (``>= 0`` for ``'linear'``).
            adapter_name: The new adapter's name.
            combination_type: ``'cat'``, ``'linear'`` or ``'svd'``.
            svd_rank: The rank of an ``'svd'`` combination; by default the largest rank
                of the adapters combined.
            sample_args: Sample inputs for the call that creates the adapter; empty: the
                wrapper's (as for :meth:`add_adapter`).
            sample_kwargs: Sample keyword inputs by name.

        Returns:
            For each adapted weight (``'<module path>/<weight>'``), the relative Frobenius
            distance between the new update and ``sum_i c_i A_i @ B_i``: 0 up to rounding
            for ``'cat'`` (and for ``'svd'`` at a rank as large as that sum's), the
            truncation error for ``'svd'``, the cross terms for ``'linear'``.

        Raises:
            AdapterNameError: A name combined is unknown or given twice, or the new name is
                invalid or taken.
            WeightedAdapterError: The combination type is unknown; the weights are not one
                finite real number per adapter; an adapter is a DoRA adapter or adapts a
                grouped convolution; for ``'linear'``, a weight is negative or the adapters
                differ in targets or ranks; the weights of one module would need different
                ranks; or the sample call reaches other weights than the adapters adapt.
            AdapterStateError: The adapters are merged or disabled.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> import nnx_peft
            >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
            >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
            >>> model.add_adapter("other", config, rngs=nnx.Rngs(2))
            >>> errors = model.add_weighted_adapter(
            ...     ["default", "other"], [0.5, 0.5], "both", combination_type="cat"
            ... )
            >>> model.peft_config["both"].rank, list(errors)
            (4, ['kernel'])
        """
        names = resolve(adapters, self.adapter_names, "add_weighted_adapter")
        check_new_name(adapter_name, self.adapter_names)
        floats = _combination.check_weights(weights, len(names), combination_type)
        svd_rank = _combination.check_svd_rank(svd_rank, combination_type)
        self._require_plain("add_weighted_adapter()")
        found = _combination.sources(self.model, names, floats, combination_type)
        new_ranks = _combination.ranks(found, combination_type, svd_rank)
        first = next(e.config for e in self._entries if e.name == names[0])
        config = _combination.config(first, found, new_ranks)
        self.add_adapter(
            adapter_name, config, *sample_args, rngs=nnx.Rngs(0), sample_kwargs=sample_kwargs
        )
        made = {(a.path, a.weight): a for a in _adapter.adapters(self.model, {adapter_name})}
        wanted = [(s.found[0].path, s.found[0].weight) for s in found]
        if set(made) != set(wanted):  # the sample call reached other weights than theirs
            self.delete_adapter(adapter_name)
            raise WeightedAdapterError(
                f"The combined adapter's sample call adapted the weights {sorted(made)}, and "
                f"the adapters {list(names)} adapt {sorted(wanted)} (as (module path, weight)). "
                "Pass sample inputs that reach every one of theirs: "
                "add_weighted_adapter(..., sample_args=(x,))."
            )
        return {
            f"{path}/{weight}".lstrip("/"): _combination.fill(
                made[path, weight], s, combination_type
            )
            for (path, weight), s in zip(wanted, found, strict=True)
        }

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Makes ``adapter_name`` (one name, or several) the active set.

        The updates of the active adapters add up; the others stay, frozen, and
        :attr:`trainable_filter` leaves them out. With a DoRA adapter, that one alone.

        Raises:
            AdapterNameError: A name is unknown.
            AdapterStateError: The adapters are merged or disabled; or several are
                asked for and one is a DoRA adapter.
        """
        names = resolve(adapter_name, self.adapter_names, "set_adapter")
        self._require_plain("set_adapter()")
        if len(names) > 1:
            dora = [e.name for e in self._entries if e.name in names and e.config.use_dora]
            if dora:
                raise AdapterStateError(
                    f"set_adapter({list(names)}) would activate the DoRA adapter(s) {dora} "
                    "together with others; a DoRA update rescales the layer's whole output and "
                    "cannot be added to another's. Activate a DoRA adapter alone."
                )
        for adapter in adapters(self.model):
            on = adapter.adapter in names
            adapter.set_state(AdapterState.ACTIVE if on else AdapterState.INACTIVE)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deletes the adapter ``adapter_name`` and every part of it.

        If it was in the active set, the others of the set stay active.

        Raises:
            AdapterNameError: The name is unknown.
            AdapterStateError: It is the model's last adapter (use ``merge_and_unload()``
                or the base model instead), or it is active while the adapters are merged.
        """
        (name,) = resolve(adapter_name, self.adapter_names, "delete_adapter")
        if len(self._entries) == 1:
            raise AdapterStateError(
                f"delete_adapter({name!r}) would delete the model's last adapter; a PeftModel "
                "holds at least one. Use merge_and_unload() for a plain model, or the base "
                "model itself."
            )
        if name in self.active_adapters and _merging.is_merged(self.model):
            raise AdapterStateError(
                f"The adapter {name!r} is merged into the base weights (model.merged is True); "
                "deleting it would leave its update in them. Call model.unmerge_adapter() "
                "first."
            )
        for adapter in adapters(self.model, {name}):
            adapter.remove()
        self._entries = tuple(e for e in self._entries if e.name != name)
        self._settle()

    def _rename(self, adapter_name: str) -> None:
        """Renames the only adapter (of a wrapper just made) to ``adapter_name``."""
        (entry,) = self._entries
        rename_all(self.model, entry.name, adapter_name)
        self._entries = (dataclasses.replace(entry, name=adapter_name),)

    def _settle(self) -> None:
        """The root's provider key and the adapted classes, for the adapters there are now."""
        first, *rest = self._entries
        key = ProviderKey(first.config, first.targets, tuple((e.config, e.targets) for e in rest))
        self.config = first.config
        settle_classes(self.model, key)

    def _require_plain(self, action: str) -> None:
        if _merging.is_merged(self.model) or _merging.is_disabled(self.model):
            raise AdapterStateError(
                f"{action} needs the adapters unmerged and enabled; call model.unmerge_adapter() "
                "first, or call it after the `with model.disable_adapter():` block."
            )

    def _require_one_adapter(self, action: str) -> None:
        if len(self._entries) > 1:
            raise AdapterNameError(
                f"{action} saves or restores a training run of one adapter, and the model has "
                f"several: {list(self.adapter_names)}. Save each adapter with "
                "save_adapter(path, adapter_name=...), or train in a wrapper holding one."
            )

    @contextlib.contextmanager
    def _only(self, adapter_name: str | None, action: str) -> Iterator[None]:
        """Runs the block with the adapter ``adapter_name`` alone, as a single-adapter wrapper.

        ``None`` names the model's only adapter.

        Raises:
            AdapterNameError: The name is unknown, or ``None`` while there are several.
        """
        if adapter_name is None:
            if len(self._entries) > 1:
                raise AdapterNameError(
                    f"{action} reads or writes one adapter, and the model has several: "
                    f"{list(self.adapter_names)}. Pass adapter_name=..."
                )
            (entry,) = self._entries
        else:
            (name,) = resolve(adapter_name, self.adapter_names, action)
            entry = next(e for e in self._entries if e.name == name)
        if len(self._entries) == 1 and entry.name == DEFAULT_ADAPTER:
            yield
            return
        entries, config = self._entries, self.config
        self._entries = (dataclasses.replace(entry, name=DEFAULT_ADAPTER),)
        self.config = entry.config
        try:
            with isolate(self.model, entry.name):
                yield
        finally:
            self._entries, self.config = entries, config
