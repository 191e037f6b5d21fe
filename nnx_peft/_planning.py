"""Planning memory before buying hardware: bytes per device of an abstract state."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding


def _axis_names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _shard_shape(leaf: Any) -> tuple[int, ...]:
    """The shape of the largest shard of ``leaf`` one device holds."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return tuple(leaf.shape)
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    sizes = dict(sharding.mesh.shape)
    return tuple(
        -(-size // math.prod(sizes[name] for name in _axis_names(entry)))
        for size, entry in zip(leaf.shape, spec, strict=True)
    )


def bytes_per_device(tree: Any) -> int:
    """Bytes of ``tree``'s arrays that the most loaded device holds, from their shardings.

    Works on abstract states (``nnx.eval_shape`` under a mesh, even a
    ``jax.sharding.AbstractMesh`` of devices you do not have) as on concrete
    ones. An array without a ``NamedSharding`` counts whole on every device; a
    sharded axis counts its largest shard (sizes the mesh axes do not divide
    are rounded up); sub-byte dtypes (``uint4``) count at their bit width.

    Args:
        tree: Any pytree of arrays or ``jax.ShapeDtypeStruct`` (an ``nnx.State``,
            a module, an optimizer).

    Returns:
        The bytes per device.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax.sharding import AbstractMesh, AxisType
        >>> import nnx_peft
        >>> mesh = AbstractMesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
        >>> init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", None))
        >>> with jax.sharding.use_abstract_mesh(mesh):
        ...     layer = nnx.eval_shape(lambda: nnx.Linear(1024, 512, kernel_init=init,
        ...                                               use_bias=False, rngs=nnx.Rngs(0)))
        >>> nnx_peft.bytes_per_device(layer)  # 1024 * 512 float32 over 8 devices
        262144
    """
    if isinstance(tree, nnx.Pytree):
        tree = nnx.state(tree)
    total = 0
    for leaf in jax.tree.leaves(tree):
        bits = jax.dtypes.itemsize_bits(leaf.dtype)
        total += math.prod(_shard_shape(leaf)) * bits // 8
    return total
