"""The names of an adapter's parts: the attributes it adds to a module, next to its weight.

The adapter of a weight ``w`` is stored as attributes of the module holding ``w``, named
``w`` plus a suffix. Qwix chose the layout (its providers read ``<weight>_lora_a`` and
``<weight>_lora_b``), and state paths, checkpoints, sharding rules and the Hugging Face
mapping all name these attributes; this module is the one place that names them, and
:class:`nnx_peft._adapter.Adapter` the one object through which the rest of nnx_peft reads
them.

=================  =======================  ==================================================
part               attribute                what it holds
=================  =======================  ==================================================
A, B               ``w_lora_a``,            the factors (``AdapterParam``; stacked along the
                   ``w_lora_b``             layer axis in a scanned stack)
layout             ``w_lora_layout``        ``LoraLayout``: which weight axes the factors stand
                                            for, scale, variant, layer axis (static)
state              ``w_lora_state``         ``AdapterState`` when not active (static)
dropout            ``w_lora_dropout``       ``nnx.Dropout`` on the adapter's input (rate > 0)
initial A, B       ``w_lora_initial_a``,    ``InitialFactor``: PiSSA/OLoRA starts, the weight
                   ``w_lora_initial_b``     holding the residual
magnitude          ``w_lora_magnitude``     DoRA's trained magnitude (``AdapterParam``)
unmerged           ``w_lora_unmerged``      the weight's values before ``merge_adapter``
=================  =======================  ==================================================

Only A, B and the magnitude are trained; a checkpoint holds them, the initial factors, and
(in its description) each layout.

Several named adapters (``PeftModel.add_adapter``) can adapt one weight: the parts of the
adapter named :data:`DEFAULT_ADAPTER` carry the names above, those of an adapter named ``n``
the same names followed by ``__n`` (``w_lora_a__n``); :func:`part_name` builds a name and
:func:`parse_part_name` reads one back.

A module fully trained instead (``LoraConfig.modules_to_save``) keeps its values from before
training in one attribute of its own, :data:`ORIGINAL_ATTRIBUTE`.
"""

from __future__ import annotations

from nnx_peft._qwix_internals import QWIX_EINSUM_STR_SUFFIX

LORA_A_SUFFIX = "_lora_a"
LORA_B_SUFFIX = "_lora_b"
LAYOUT_SUFFIX = "_lora_layout"
STATE_SUFFIX = "_lora_state"
DROPOUT_SUFFIX = "_lora_dropout"
INITIAL_A_SUFFIX = "_lora_initial_a"
INITIAL_B_SUFFIX = "_lora_initial_b"
MAGNITUDE_SUFFIX = "_lora_magnitude"
UNMERGED_SUFFIX = "_lora_unmerged"

#: The name of the adapter a wrap creates unless told otherwise (as in HF PEFT).
DEFAULT_ADAPTER = "default"
#: Between a part's name and the name of its adapter (other than the default).
NAME_SEPARATOR = "__"

#: Attribute of a saved module (``modules_to_save``) holding its values from before training.
ORIGINAL_ATTRIBUTE = "lora_saved_original"

#: Every part but the unmerged values, which belong to the weight while it is merged, plus
#: Qwix's own record of a LoRA einsum (its provider sets it; nnx_peft's does not).
ADAPTER_SUFFIXES = (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LAYOUT_SUFFIX,
    STATE_SUFFIX,
    DROPOUT_SUFFIX,
    INITIAL_A_SUFFIX,
    INITIAL_B_SUFFIX,
    MAGNITUDE_SUFFIX,
    QWIX_EINSUM_STR_SUFFIX,
)


def part_name(weight: str, suffix: str, adapter: str = DEFAULT_ADAPTER) -> str:
    """The attribute holding the part ``suffix`` of the adapter named ``adapter`` of ``weight``."""
    if adapter == DEFAULT_ADAPTER:
        return weight + suffix
    return weight + suffix + NAME_SEPARATOR + adapter


def parse_part_name(attribute: str, suffix: str) -> tuple[str, str] | None:
    """``(weight, adapter name)`` if ``attribute`` names the part ``suffix`` of an adapter."""
    stem, separator, adapter = attribute.rpartition(NAME_SEPARATOR)
    if not separator or not stem.endswith(suffix):
        stem, adapter = attribute, DEFAULT_ADAPTER
    if not stem.endswith(suffix) or len(stem) == len(suffix):
        return None
    return stem[: -len(suffix)], adapter
