"""LoRA on embedding tables: the lookup ``table[ids]`` as a matmul of one-hot ids.

Looking rows up, ``jnp.take(table, ids, axis=0)`` with a ``(vocab, features)``
table, is the ``dot_general`` of the ids' one-hot vectors with the table,
contracting its axis 0. An adapter on it is the one of that matmul: ``A`` is
``(vocab, r)``, ``B`` is ``(r, features)``, and the update is
``scale * A[ids] @ B`` (rows of ``A`` looked up the same way), so merging
folds ``scale * A @ B`` into the table as for any ``dot_general``, and HF
PEFT's ``lora_embedding_A`` ``(r, vocab)`` and ``lora_embedding_B``
``(features, r)`` are ``A`` and ``B`` transposed, like a ``Linear``'s factors.

As in HF PEFT, the lookup takes no dropout (the input is token ids), and a
tied output head that multiplies by the same table (``nnx.Embed.attend``)
gets no update: such an adapter is marked ``tied`` and refuses merging.

Qwix intercepts no lookups; ``_lookups`` intercepts ``jnp.take`` and the
indexing of a module's weight (``self.table[ids]``) and calls this module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from nnx_peft._layout import LoraLayout

#: The layout of a lookup adapter (the weight delta is a ``dot_general``'s).
LOOKUP_LAYOUT = LoraLayout("dot_general", contracting=(0,), lookup=True)
#: For each axis of ``A`` and ``B``, the table axes it stands for (``_sharding``).
A_GROUPS = ((0,), None)
B_GROUPS = (None, (1,))


def is_lookup(table: Any, ids: Any, axis: int | None) -> bool:
    """Whether ``jnp.take(table, ids, axis=axis)`` looks up rows of a 2-D table by integer ids."""
    return (
        axis is not None
        and axis % 2 == 0
        and jnp.ndim(table) == 2
        and jnp.issubdtype(jnp.result_type(ids), jnp.integer)
    )


def index_ids(index: Any) -> Any | None:
    """The ids of ``table[index]`` when that is a row lookup (``table[ids]``, ``table[(ids,)]``)."""
    if isinstance(index, tuple):
        if len(index) != 1:
            return None
        (index,) = index
    if isinstance(index, jax.Array | np.ndarray) and jnp.issubdtype(index.dtype, jnp.integer):
        return index
    return None


def lookup_update(
    ids: Integer[Array, " *ids"],
    lora_a: Float[Array, "vocab rank"],
    lora_b: Float[Array, "rank features"],
    scale: float,
    **take_kwargs: Any,
) -> Float[Array, "*ids features"]:
    """``scale * A[ids] @ B``: the update of a lookup, rows of ``A`` taken as the table's."""
    rows = jnp.take(lora_a, ids, axis=0, **take_kwargs)
    return (rows @ lora_b) * scale


def multiplies_table(operand: Any, table: Any, traced: bool) -> bool:
    """Whether a matmul operand is the table itself or its transpose (a tied output head).

    Compared by value on concrete arrays; by shape alone under tracing.
    """
    if tuple(operand.shape) not in (tuple(table.shape), tuple(table.shape[::-1])):
        return False
    if traced or isinstance(operand, jax.core.Tracer) or isinstance(table, jax.core.Tracer):
        return True
    operand = jnp.asarray(operand)
    return any(
        c.shape == operand.shape and bool(jnp.array_equal(operand, c.astype(operand.dtype)))
        for c in (table, table.T)
    )
