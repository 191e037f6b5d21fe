"""The variable type of the adapter weights nnx_peft creates."""

from __future__ import annotations

from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """An adapter weight (``<weight>_lora_a`` or ``<weight>_lora_b``) created by nnx_peft.

    A subclass of ``nnx.LoRAParam`` (and so of ``nnx.Param``): the usual NNX
    tools select it by type, e.g. ``nnx.state(model, nnx_peft.AdapterParam)``.
    Having its own type keeps ``LoRAParam`` variables that the base model
    already had (``nnx.LoRALinear``, say) out of the trainable set.
    """


#: Frozen base weights: every ``nnx.Param`` that is not an adapter.
#: Note that ``nnx.Param`` alone would also select the adapters.
FROZEN_PARAMS = nnx.All(nnx.Param, nnx.Not(AdapterParam))
