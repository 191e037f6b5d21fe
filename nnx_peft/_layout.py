"""What the Qwix provider records: each adapter's layout, and the sample call's matmuls.

Plain data, kept apart from ``_qwix_bridge`` (the one module using Qwix
internals) because merging, the summaries and the targeting read it too.
"""

from __future__ import annotations

import dataclasses

from nnx_peft._factors import Subscripts
from nnx_peft._variants import LORA, Update


@dataclasses.dataclass(frozen=True)
class LoraLayout:
    """How an adapted weight enters its matmul: what merging needs to fold ``A @ B`` back.

    Stored on the adapted module as ``<weight>_lora_layout`` when the adapter is
    created. ``kind`` is ``'dot_general'``, ``'einsum'`` or ``'conv'``.

    Attributes:
        kind: The intercepted operation.
        scale: Factor of the update, ``alpha / rank`` of the rule that made it.
        contracting: Weight axes contracted with the input (``dot_general``).
        batch: Weight axes that are batch axes of the ``dot_general``.
        einsum_str: The three-operand einsum Qwix uses for the update
            (``'<input>,<A>,<B>-><output>'``), for ``einsum``.
        weight_str: Subscripts of the weight operand in its own axis order, for
            ``einsum`` (the update's einsum string does not keep that order).
        feature_group_count: ``feature_group_count`` of the convolution.
        batch_group_count: ``batch_group_count`` of the convolution.
        operand_is_weight: Whether the matmul's operand was the stored weight
            itself (possibly cast or transposed, see ``_transposed``). ``False``
            when the module transformed it otherwise first (flipped, masked):
            the update then applies to that transform, and cannot be folded
            into the stored weight.
        update: How the update enters the output (``_variants.LORA`` or ``DORA``).
        subscripts: The weight and its factors as einsum subscripts, for the
            variants' maths (``_factors``).
        layer_axis: For a weight of a scanned layer stack, the axis along which
            its layers are stacked; the adapter's arrays are stacked along the
            same axis, and every other field describes one layer. ``None`` for
            a weight that is not stacked.
        lookup: Whether the weight is an embedding table whose rows are looked
            up by integer ids (``jnp.take(weight, ids, axis=0)``), which is the
            ``dot_general`` of the ids' one-hot vectors with the weight
            (``contracting=(0,)``): the update is ``scale * A[ids] @ B``.
        tied: For a ``lookup``, whether the module also multiplies by the table
            itself (a tied output head: ``Embed.attend``, ``x @ table.T``).
            That product gets no update, as in HF PEFT, so folding the delta
            into the shared table would change it: such an adapter is not
            mergeable.
    """

    kind: str
    scale: float = 1.0
    contracting: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    einsum_str: str = ""
    weight_str: str = ""
    feature_group_count: int = 1
    batch_group_count: int = 1
    operand_is_weight: bool = True
    update: Update = LORA
    subscripts: Subscripts | None = None
    layer_axis: int | None = None
    lookup: bool = False
    tied: bool = False


@dataclasses.dataclass
class CallRecord:
    """What a recording :class:`PeftLoraProvider` saw during the sample call.

    Attributes:
        ops: Per intercepted matmul of a module a rule selects, in call order:
            the module path, the name of its weight operand (``None`` when the
            operand is not one of the module's weights) and the result's size.
        output_sizes: The sizes of the arrays the model returned.
        reached: The paths of the modules the call ran (a method of theirs).
    """

    ops: list[tuple[str, str | None, int]] = dataclasses.field(default_factory=list)
    output_sizes: list[int] = dataclasses.field(default_factory=list)
    reached: set[str] = dataclasses.field(default_factory=set)
