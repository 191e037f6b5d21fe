"""Each adapter's state (active, disabled, merged) and what the forward pass does with it.

The state lives on the adapted module as the static attribute
``<weight>_lora_state``, part of the NNX graph definition, so ``nnx.jit``
retraces when it changes; ``_adapter.Adapter.state`` reads it and ``set_state`` sets
it. The Qwix provider (``_adapter_ops.add_update``) reads it on every call; merging
(``_merging``) sets it.
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import jax
from jax.custom_derivatives import SymbolicZero

from nnx_peft._errors import AdapterStateError


class AdapterState(enum.Enum):
    """What the provider does with one adapter on each forward pass.

    Kept per adapted weight as the static attribute ``<weight>_lora_state``
    (absent means ``ACTIVE``). Being static, it is part of the NNX graph
    definition: ``nnx.jit`` retraces when it changes instead of reusing a
    trace made in another state.
    """

    #: Add the low-rank update to the output.
    ACTIVE = "active"
    #: Skip the update: the module computes what the base model computes.
    DISABLED = "disabled"
    #: Skip the update: the adapter is not in the active set (``PeftModel.set_adapter``).
    #: Its parts stay, frozen; it is left out of merging and ``disable_adapter()``.
    INACTIVE = "inactive"
    #: Skip the update, which is already folded into the base weight.
    #: Differentiating with respect to the adapters raises AdapterStateError.
    MERGED = "merged"


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def refuse_adapter_gradients(
    module_path: str, res: jax.Array, adapters: tuple[jax.Array, ...]
) -> jax.Array:
    """Returns ``res``; differentiating it with respect to the adapters raises.

    A merged adapter is not used by the forward pass, so its gradient would be
    silently zero: a training step would change nothing, or only apply weight
    decay to adapters already folded into the weights. Tracing the derivative
    fails loudly instead. Gradients with respect to anything else (inputs,
    base weights) pass through, and compiled forward passes contain no trace of
    this function.
    """
    del module_path, adapters
    return res


def _refuse_adapter_gradients_jvp(
    module_path: str, primals: tuple[jax.Array, ...], tangents: tuple[Any, ...]
) -> tuple[jax.Array, Any]:
    if not all(isinstance(t, SymbolicZero) for t in tangents[1]):
        raise AdapterStateError(
            f"A gradient with respect to the adapters of module {module_path!r} was "
            "requested while they are merged into the base weights (merge_adapter()); a "
            "merged adapter is not used by the forward pass, so its gradient would be zero. "
            "Call model.unmerge_adapter() before training, and merge_adapter() again after."
        )
    res_dot = tangents[0]
    if isinstance(res_dot, SymbolicZero):
        res_dot = jax.numpy.zeros_like(primals[0])
    return primals[0], res_dot


refuse_adapter_gradients.defjvp(_refuse_adapter_gradients_jvp, symbolic_zeros=True)
