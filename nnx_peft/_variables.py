"""The variable types nnx_peft creates: trained adapters, and what merging and PiSSA keep."""

from __future__ import annotations

import jax
from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """A variable nnx_peft trains: ``<weight>_lora_a``, ``<weight>_lora_b``, a DoRA magnitude
    ``<weight>_lora_magnitude``, or (as :class:`SavedParam`) a ``modules_to_save`` parameter.

    A subclass of ``nnx.LoRAParam`` (and so of ``nnx.Param``): the usual NNX
    tools select it by type, e.g. ``nnx.state(model, nnx_peft.AdapterParam)``.
    Having its own type keeps ``LoRAParam`` variables that the base model
    already had (``nnx.LoRALinear``, say) out of the trainable set.
    """


#: Frozen base weights: every ``nnx.Param`` that is not an adapter.
#: Note that ``nnx.Param`` alone would also select the adapters.
FROZEN_PARAMS = nnx.All(nnx.Param, nnx.Not(AdapterParam))


class SavedParam(AdapterParam):
    """A parameter of a module listed in ``LoraConfig.modules_to_save``, trained in full.

    Being an :class:`AdapterParam`, it is selected by ``PeftModel.trainable_filter``
    and saved in adapter checkpoints with the adapters. It keeps the metadata
    of the parameter it replaced (sharding included) and, under
    ``'saved_from'``, that parameter's type, which ``merge_and_unload`` restores.
    """


class InitialFactor(nnx.Variable[jax.Array]):
    """The initial value of an adapter factor started from its weight (PiSSA, OLoRA).

    Stored as ``<weight>_lora_initial_a`` / ``_b`` next to a weight that holds
    the residual ``W - scale * A0 @ B0``: ``disable_adapter()`` adds
    ``scale * A0 @ B0`` back to give the base model's outputs. Not an
    ``nnx.Param``: never trained, and not saved (it is recomputed from the base
    weights when a checkpoint is loaded).
    """


class UnmergedWeight(nnx.Variable[tuple[jax.Array, ...]]):
    """A base weight's values from before ``merge_adapter``, kept for an exact unmerge.

    Not an ``nnx.Param``: never trained, never counted as a parameter. It
    exists only while the adapters are merged, as ``<weight>_lora_unmerged``.
    """
