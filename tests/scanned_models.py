"""Small scanned-layer models for the tests: the Flax pattern and a MaxText-style stack.

- :class:`FlaxStack`: blocks created with ``nnx.split_rngs`` + ``nnx.vmap`` and
  applied with ``nnx.scan`` (the Flax guide's scan-over-layers), optionally with
  ``nnx.remat`` inside the scan body, next to an unscanned input projection.
- :class:`LaxStack`: one module whose weights are stacked on ``axis`` (MaxText's
  ``param_scan_axis``), applied with ``jax.lax.scan`` over its split state with
  ``nnx.merge`` inside the body (with ``reassign``, replaced by a new module during
  Qwix's first call, as MaxText does). Its weights carry ``sharding_names`` with a
  ``'layers'`` name at the layer axis, removed inside the body, where a name
  list that does not fit a Variable's rank raises (as MaxText's scan does).
- :class:`Unrolled`: the same blocks as a list, from a stack's per-layer weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

#: Block kinds: an MLP of two Linears, or a multi-head einsum projection.
KINDS = ("mlp", "einsum")


class Block(nnx.Module):
    """One layer: ``x + f(x)`` with ``f`` a two-Linear MLP or an einsum projection pair."""

    def __init__(self, kind: str, d: int, f: int, *, rngs: nnx.Rngs) -> None:
        self.kind = kind
        if kind == "mlp":
            self.wi = nnx.Linear(d, f, rngs=rngs)
            self.wo = nnx.Linear(f, d, rngs=rngs)
        else:
            self.wi = nnx.Einsum("btd,dnh->btnh", (d, 2, f // 2), rngs=rngs)
            self.wo = nnx.Einsum("btnh,nhd->btd", (2, f // 2, d), (d,), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.wo(jnp.tanh(self.wi(x)))


class FlaxStack(nnx.Module):
    """An unscanned input projection, then ``depth`` blocks under ``nnx.scan``."""

    def __init__(
        self, depth: int, d: int, f: int, *, kind: str = "mlp", remat: bool = False, rngs: nnx.Rngs
    ) -> None:
        self.proj = nnx.Linear(d, d, rngs=rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> Block:
            return Block(kind, d, f, rngs=rngs)

        self.blocks = make(rngs)
        self.remat = remat

    def __call__(self, x: jax.Array) -> jax.Array:
        def apply(block: Block, x: jax.Array) -> jax.Array:
            return block(x)

        step = nnx.remat(apply) if self.remat else apply

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x: jax.Array, block: Block) -> jax.Array:
            return step(block, x)

        return body(self.proj(x), self.blocks)


def _names(variable: nnx.Variable[Any]) -> tuple[Any, ...] | None:
    names = variable.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


class LaxStack(nnx.Module):
    """``depth`` blocks as one module with every weight stacked on ``axis``, MaxText-style."""

    def __init__(
        self,
        depth: int,
        d: int,
        f: int,
        *,
        kind: str = "mlp",
        axis: int = 1,
        remat: bool = False,
        reassign: bool = False,
        slice_rngs: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        layers = [Block(kind, d, f, rngs=rngs) for _ in range(depth)]
        graphdef, first = nnx.split(layers[0])
        states = [nnx.state(layer) for layer in layers]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis), *states)
        self.layers = nnx.merge(graphdef, stacked)
        del first
        # Axis names as MaxText's scan leaves them: 'layers' at the layer axis. Without
        # a mesh, so not placed eagerly.
        for path, module in nnx.iter_modules(self.layers):
            for name, variable in list(vars(module).items()):
                if isinstance(variable, nnx.Param):
                    names = [f"{name}{i}" for i in range(variable.get_value().ndim - 1)]
                    names.insert(axis, "layers")
                    named = nnx.Param(
                        variable.get_value(), out_sharding=tuple(names), eager_sharding=False
                    )
                    setattr(module, name, named)
            del path
        self.axis = axis
        self.remat = remat
        self.reassign = reassign
        self.slice_rngs = slice_rngs

    def __call__(self, x: jax.Array) -> jax.Array:
        # Every variable is stacked (parameters, and the adapters' other variables) but
        # RNG state, which is shared; with slice_rngs, RNG state is sliced too (and, as
        # everything else, not returned from the body).
        sliced = ... if self.slice_rngs else nnx.Not(nnx.RngState)
        graphdef, state, rest = nnx.split(self.layers, sliced, ...)
        axis = self.axis

        def to_body(variable: nnx.Variable[Any]) -> nnx.Variable[Any]:
            # MaxText's nnx_remove_scan_axis: the per-layer names, checked against the rank.
            names = _names(variable)
            value = jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), variable.get_value())
            if names is not None:
                kept = tuple(n for n in names if n != "layers")
                if len(kept) > value.ndim - 1:
                    raise ValueError(
                        f"Sharding names {list(kept)} still exceed value rank {value.ndim - 1} "
                        "after removing scan axis 'layers'"
                    )
                return variable.replace(value, out_sharding=kept)
            return variable.replace(value)

        scanned = jax.tree.map(to_body, state, is_leaf=lambda v: isinstance(v, nnx.Variable))

        def apply(layer_state: Any, x: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, layer_state, rest)(x)

        step = jax.checkpoint(apply) if self.remat else apply

        def body(carry: jax.Array, layer_state: Any) -> tuple[jax.Array, None]:
            return step(layer_state, carry), None

        out, _ = jax.lax.scan(body, x, scanned)
        if self.reassign and getattr(self, "disable_quant_stats_update", False):
            # MaxText, during Qwix's first call ("dynamic graph init"), puts a module
            # merged anew from the scan's state in place of the stack it sliced.
            self.layers = nnx.merge(graphdef, state, rest)
        return out


class Unrolled(nnx.Module):
    """The blocks of a stack as a list (``blocks/<i>/...``), after an optional projection."""

    def __init__(self, blocks: list[Block], proj: nnx.Linear | None = None) -> None:
        self.proj = proj
        self.blocks = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.proj is not None:
            x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


def layer_of(stacked: nnx.Module, index: int, axis: int) -> nnx.Module:
    """Layer ``index`` of a stacked module, as a module of its own (values copied).

    Axis names lose the stack's ``'layers'``, as those of an unscanned model have none.
    """
    graphdef, state = nnx.split(stacked)

    def one_layer(variable: nnx.Variable[Any]) -> nnx.Variable[Any]:
        value = jnp.take(variable.get_value(), index, axis=axis)
        names = _names(variable)
        if names is None:
            return variable.replace(value)
        return variable.replace(value, out_sharding=tuple(n for n in names if n != "layers"))

    sliced = jax.tree.map(one_layer, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, sliced)


def unrolled(model: FlaxStack | LaxStack, depth: int) -> Unrolled:
    """The unrolled equivalent of a stack model, with the same weights."""
    if isinstance(model, FlaxStack):
        blocks = [layer_of(model.blocks, i, 0) for i in range(depth)]
        return Unrolled(blocks, nnx.clone(model.proj))
    blocks = [layer_of(model.layers, i, model.axis) for i in range(depth)]
    return Unrolled(blocks)
