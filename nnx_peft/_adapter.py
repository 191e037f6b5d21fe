"""What an adapter is: one object, :class:`Adapter`, that every part of nnx_peft reads.

The adapter of a weight ``w`` is a set of parts stored as attributes of the module holding
``w`` (Qwix's providers read the factors there, as ``w_lora_a`` and ``w_lora_b``; the part
names are in :mod:`nnx_peft._parts`). Nothing outside this module and the code that creates
adapters inside Qwix's interception (:mod:`nnx_peft._adapter_ops`) names those attributes:
merging, checkpoints, sharding, the summaries and the Hugging Face mapping take an
:class:`Adapter` from :func:`adapters` and read its parts by name.

An :class:`Adapter` holds no data of its own: it is a view of the module, so it never goes
stale, and the NNX graph (``nnx.state``, ``nnx.split``, ``nnx.jit``) sees the parts as the
ordinary variables and static attributes of that module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import jax
from flax import nnx

from nnx_peft._adapter_state import AdapterState
from nnx_peft._layout import LoraLayout
from nnx_peft._parts import (
    ADAPTER_SUFFIXES,
    DEFAULT_ADAPTER,
    DROPOUT_SUFFIX,
    INITIAL_A_SUFFIX,
    INITIAL_B_SUFFIX,
    LAYOUT_SUFFIX,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    MAGNITUDE_SUFFIX,
    STATE_SUFFIX,
    UNMERGED_SUFFIX,
    parse_part_name,
    part_name,
)
from nnx_peft._paths import path_string
from nnx_peft._variables import AdapterParam, InitialFactor, UnmergedWeight


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapted weight: where it is, the shapes of its factors, and how it is scaled.

    Attributes:
        module_path: ``/``-joined path of the module holding the weight, relative
            to the adapted model (``PeftModel.model``).
        weight: Attribute name of the base weight in that module, e.g. ``kernel``.
        a_shape: Shape of ``<weight>_lora_a``.
        b_shape: Shape of ``<weight>_lora_b``.
        dtype: Adapter dtype (``LoraConfig.adapter_dtype``, or with ``None`` that of the
            base weight or of its quantization scale).
        rank: The adapter's rank (``LoraConfig.rank`` or its ``rank_pattern``).
        scale: The factor of its update (``alpha / rank``, or ``alpha / sqrt(rank)``
            with ``use_rslora``, from its ``alpha_pattern`` and ``rank_pattern``).
        variant: ``'lora'``, or ``'dora'`` for a weight-decomposed adapter.
        magnitude_shape: Shape of a DoRA adapter's ``<weight>_lora_magnitude``
            (the weight's shape without its contracting axes), else ``None``.
        layers: For a weight of a scanned layer stack, the number of layers
            (each has its own adapter; the shapes above are the stacked ones,
            with the layer axis at ``layer_axis``); ``None`` otherwise.
        layer_axis: The layer axis of the weight and of its adapter's arrays,
            or ``None``.
        adapter_name: The name of the adapter (``PeftModel.add_adapter``) this is part of.
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
    layers: int | None = None
    layer_axis: int | None = None
    adapter_name: str = DEFAULT_ADAPTER

    @property
    def size(self) -> int:
        """Number of trained adapter parameters (A, B and a DoRA magnitude), all layers."""
        magnitude = math.prod(self.magnitude_shape) if self.magnitude_shape is not None else 0
        return math.prod(self.a_shape) + math.prod(self.b_shape) + magnitude

    @property
    def layer_size(self) -> int:
        """Number of trained adapter parameters of one layer (``size`` if not stacked)."""
        return self.size // (self.layers or 1)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The adapter of ``module.<weight>``: its factors, layout, state and the rest.

    Attributes:
        path: ``/``-joined path of ``module`` in the adapted model (``''`` for the root).
        module: The module holding the weight and, beside it, the adapter's parts.
        weight: The weight's attribute name, e.g. ``kernel``.
        adapter: The adapter's name (``PeftModel.add_adapter``): one weight may have
            several, each with parts of its own.
    """

    path: str
    module: nnx.Module
    weight: str
    adapter: str = DEFAULT_ADAPTER

    # --- Reading the parts -----------------------------------------------------------------

    def name(self, suffix: str) -> str:
        """The attribute name of one part (a suffix of :mod:`nnx_peft._parts`)."""
        return part_name(self.weight, suffix, self.adapter)

    def part(self, suffix: str) -> Any:
        """One part of the adapter, ``None`` where this adapter has none."""
        return getattr(self.module, self.name(suffix), None)

    @property
    def exists(self) -> bool:
        """Whether the weight has an adapter (its factors are created)."""
        return self.part(LORA_A_SUFFIX) is not None

    @property
    def where(self) -> str:
        """The adapter in words, for error messages."""
        named = "" if self.adapter == DEFAULT_ADAPTER else f" named {self.adapter!r}"
        return f"the adapter{named} of {self.weight!r} in module {self.path!r}"

    @property
    def base(self) -> Any:
        """The adapted weight as stored (an ``nnx.Param``, or a QLoRA quantized weight)."""
        return getattr(self.module, self.weight)

    @property
    def a(self) -> AdapterParam:
        """The factor ``A`` (rank last; stacked along ``layout.layer_axis`` in a stack)."""
        return getattr(self.module, self.name(LORA_A_SUFFIX))

    @property
    def b(self) -> AdapterParam:
        """The factor ``B`` (rank first after any batch axes)."""
        return getattr(self.module, self.name(LORA_B_SUFFIX))

    @property
    def layout(self) -> LoraLayout:
        """How the weight enters its matmul, the scale and the update variant."""
        return getattr(self.module, self.name(LAYOUT_SUFFIX))

    @property
    def magnitude(self) -> AdapterParam | None:
        """DoRA's trained magnitude, ``None`` for a plain LoRA adapter."""
        return self.part(MAGNITUDE_SUFFIX)

    @property
    def dropout(self) -> nnx.Dropout | None:
        """The dropout on the adapter's input, ``None`` at rate 0."""
        return self.part(DROPOUT_SUFFIX)

    @property
    def initial(self) -> tuple[InitialFactor, InitialFactor] | None:
        """``(A0, B0)`` of an adapter started from its weight (PiSSA, OLoRA), else ``None``.

        The weight then holds the residual ``W - scale * A0 @ B0``.
        """
        a, b = self.part(INITIAL_A_SUFFIX), self.part(INITIAL_B_SUFFIX)
        return None if a is None or b is None else (a, b)

    @property
    def unmerged(self) -> UnmergedWeight | None:
        """The weight's values from before ``merge_adapter``, ``None`` while unmerged."""
        return vars(self.module).get(self.name(UNMERGED_SUFFIX))

    def trained(self) -> dict[str, AdapterParam]:
        """The trained parts by suffix: ``A``, ``B`` and the variant's extras (a magnitude)."""
        names = (LORA_A_SUFFIX, LORA_B_SUFFIX, *self.layout.update.extra_suffixes)
        return {suffix: getattr(self.module, self.name(suffix)) for suffix in names}

    def extras(self) -> dict[str, jax.Array]:
        """The values of the variant's extra trained arrays by suffix (DoRA's magnitude)."""
        return {
            suffix: getattr(self.module, self.name(suffix)).get_value()
            for suffix in self.layout.update.extra_suffixes
        }

    @property
    def state(self) -> AdapterState:
        """What the forward pass does with this adapter (absent means ``ACTIVE``).

        A weight holding its pre-merge values is merged even where the static attribute
        says otherwise: that happens when a merged model's ``nnx.state`` is put into an
        unmerged one with ``nnx.update``, which adds the variable but not the static
        attribute. The weights are merged then, so the update must not be added again.
        """
        state: AdapterState = getattr(self.module, self.name(STATE_SUFFIX), AdapterState.ACTIVE)
        if state is AdapterState.ACTIVE and self.unmerged is not None:
            return AdapterState.MERGED
        return state

    def info(self) -> AdapterInfo:
        """The adapter's summary: where it is, its shapes, rank, scale and variant."""
        layout = self.layout
        a = self.a.get_value()
        a_shape = tuple(a.shape)
        axis = layout.layer_axis
        layer_a_shape = a_shape if axis is None else a_shape[:axis] + a_shape[axis + 1 :]
        magnitude = self.magnitude
        return AdapterInfo(
            module_path=self.path,
            weight=self.weight,
            a_shape=a_shape,
            b_shape=tuple(self.b.get_value().shape),
            dtype=str(a.dtype),
            rank=int(layer_a_shape[-1]),
            scale=layout.scale,
            variant=layout.update.name,
            magnitude_shape=None if magnitude is None else tuple(magnitude.get_value().shape),
            layers=None if axis is None else a_shape[axis],
            layer_axis=axis,
            adapter_name=self.adapter,
        )

    # --- Changing the parts ----------------------------------------------------------------

    def set_layout(self, layout: LoraLayout) -> None:
        setattr(self.module, self.name(LAYOUT_SUFFIX), layout)

    def set_initial(self, a: jax.Array, b: jax.Array) -> None:
        """Keeps ``(A0, B0)`` of an adapter whose weight now holds the residual."""
        setattr(self.module, self.name(INITIAL_A_SUFFIX), InitialFactor(a))
        setattr(self.module, self.name(INITIAL_B_SUFFIX), InitialFactor(b))

    def set_dropout(self, layer: nnx.Dropout) -> None:
        setattr(self.module, self.name(DROPOUT_SUFFIX), layer)

    def set_state(self, state: AdapterState) -> None:
        """Sets the state; ``ACTIVE`` removes the attribute.

        Removing it returns the model to the very graph definition it had before, so
        ``nnx.jit`` finds its earlier trace.
        """
        name = self.name(STATE_SUFFIX)
        if state is AdapterState.ACTIVE:
            if name in vars(self.module):
                delattr(self.module, name)
        else:
            setattr(self.module, name, state)

    def keep_unmerged(self, values: Sequence[jax.Array]) -> None:
        """Keeps the weight's values from before a merge, for an exact unmerge."""
        setattr(self.module, self.name(UNMERGED_SUFFIX), UnmergedWeight(tuple(values)))

    def drop_unmerged(self) -> None:
        delattr(self.module, self.name(UNMERGED_SUFFIX))

    def remove(self) -> None:
        """Deletes every part, leaving the module with its weight alone."""
        self.detach()

    def detach(self) -> dict[str, Any]:
        """Takes every part off the module; returns them by suffix (see :meth:`attach`)."""
        parts = {}
        for suffix in (*ADAPTER_SUFFIXES, UNMERGED_SUFFIX):
            if self.name(suffix) in vars(self.module):
                parts[suffix] = vars(self.module)[self.name(suffix)]
                delattr(self.module, self.name(suffix))
        return parts

    def attach(self, parts: dict[str, Any]) -> None:
        """Puts parts (by suffix, as :meth:`detach` returns them) on the module under this
        adapter's names."""
        for suffix, value in parts.items():
            setattr(self.module, self.name(suffix), value)

    def rename(self, adapter: str) -> Adapter:
        """Moves every part to the names of the adapter ``adapter``; returns its view."""
        renamed = dataclasses.replace(self, adapter=adapter)
        renamed.attach(self.detach())
        return renamed


@dataclasses.dataclass(frozen=True)
class OfAdapters:
    """An NNX filter: the trained parts (A, B, a DoRA magnitude) of the adapters named."""

    names: tuple[str, ...]

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        if not path or not isinstance(value, AdapterParam):
            return False
        key = str(path[-1])
        for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX, MAGNITUDE_SUFFIX):
            parsed = parse_part_name(key, suffix)
            if parsed is not None:
                return parsed[1] in self.names
        return False


def adapters_of(path: str, module: nnx.Module) -> Iterator[Adapter]:
    """The adapters of the weights of ``module`` itself (not of its submodules), all names.

    In the order of the weights' first adapter in the module, and for one weight the
    default adapter first, then the others by name (whatever order they were attached in).
    """
    found = []
    for name, value in list(vars(module).items()):
        parsed = parse_part_name(name, LORA_A_SUFFIX)
        if parsed is not None and isinstance(value, AdapterParam):
            found.append(parsed)
    weights = list(dict.fromkeys(weight for weight, _ in found))
    found.sort(key=lambda p: (weights.index(p[0]), p[1] != DEFAULT_ADAPTER, p[1]))
    for weight, adapter in found:
        yield Adapter(path, module, weight, adapter)


def adapters(model: nnx.Module, names: Collection[str] | None = None) -> list[Adapter]:
    """Every adapter nnx_peft created in ``model`` (only those named in ``names`` if given),
    in module order."""
    return [
        adapter
        for path, module in nnx.iter_modules(model)
        for adapter in adapters_of(path_string(path), module)
        if names is None or adapter.adapter in names
    ]
