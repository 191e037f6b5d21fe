"""Abstract sample inputs: wrapping with ``jax.ShapeDtypeStruct`` in place of a real batch.

Adapters are created during one sample call of the base model, but their
shapes follow from the weights and the matmuls, never from the values of the
activations. So a sample input may be a ``jax.ShapeDtypeStruct`` (any mix of
abstract and concrete inputs): the call is then traced, each abstract input
standing in as zeros of its shape, dtype and sharding inside the trace.

- Inside a trace already (``nnx.eval_shape`` or ``nnx.jit`` around the
  wrapper's creation) the sample call just runs there.
- Otherwise the wrap runs once under ``jax.jit``, which returns only what the
  wrap creates or changes (adapters, quantized weights): the activations are
  dead code that XLA removes, so no batch is ever materialized, and the base
  weights the wrap leaves alone are the caller's own arrays, not copies.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnx_peft._errors import PeftError, SampleShapeError
from nnx_peft._sharding import first_named_sharding

#: ``inject(model, config, sample_args, sample_kwargs, rngs)``.
Inject = Callable[..., nnx.Module]


def is_abstract(x: Any) -> bool:
    """Whether ``x`` is a ``jax.ShapeDtypeStruct`` (a shape without a value)."""
    return isinstance(x, jax.ShapeDtypeStruct)


def has_abstract(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a ``jax.ShapeDtypeStruct``."""
    return any(is_abstract(x) for x in jax.tree.leaves(tree))


def _zeros(x: Any) -> Any:
    if not is_abstract(x):
        return x
    value = jnp.zeros(x.shape, x.dtype)
    if isinstance(x.sharding, jax.sharding.NamedSharding):
        value = jax.lax.with_sharding_constraint(value, x.sharding)
    return value


def traced_inputs(tree: Any) -> Any:
    """``tree`` with each ``ShapeDtypeStruct`` as zeros of its shape: call inside a trace only."""
    return jax.tree.map(_zeros, tree)


def _describe(tree: Any) -> str:
    shapes = [
        f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', ()))}"
        for x in jax.tree.leaves(tree)
    ]
    return ", ".join(shapes) or "none"


@contextlib.contextmanager
def sample_shape_errors(
    tree: Any, where: Callable[[BaseException], tuple[str, str] | None]
) -> Iterator[None]:
    """Raises :class:`SampleShapeError` for a sample call that fails on the inputs' shapes.

    ``where(err)`` gives the module and source line where the call failed, if
    the failure is inside an adapted module.
    """
    try:
        yield
    except PeftError:
        raise
    except (TypeError, ValueError) as err:
        found = where(err)
        place = f" in module {found[0]!r} at {found[1]!r}" if found else ""
        raise SampleShapeError(
            f"The sample call on abstract inputs ({_describe(tree)}) failed{place} with "
            f"{type(err).__name__}: {err}\nEach jax.ShapeDtypeStruct must have a shape and "
            "dtype the model can take, as a real batch would: check the feature sizes (the "
            "last axis, usually) and the dtype (integer token ids, say) against the model's."
        ) from err


def in_trace(model: nnx.Module) -> bool:
    """Whether ``model``'s arrays are traced (its creation runs under ``nnx.eval_shape``, say)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(model)))


def inject_abstract(
    inject: Inject,
    model: nnx.Module,
    config: Any,
    sample_args: tuple[Any, ...],
    sample_kwargs: dict[str, Any],
    rngs: nnx.Rngs,
    where: Callable[[BaseException], tuple[str, str] | None],
) -> nnx.Module:
    """``inject`` with sample inputs that hold ``jax.ShapeDtypeStruct`` leaves.

    The result equals that of ``inject`` on zeros of the same shapes, and
    ``rngs`` advances as it would.
    """
    if in_trace(model):
        with sample_shape_errors((sample_args, sample_kwargs), where):
            args, kwargs = traced_inputs((sample_args, sample_kwargs))
            return inject(model, config, args, kwargs, rngs)

    graphdef, state = nnx.split(model)
    rngs_graphdef, rngs_state = nnx.split(rngs)
    mesh = _mesh(state)
    found: dict[str, Any] = {}

    def wrap(state: nnx.State, rngs_state: nnx.State) -> tuple[nnx.State, nnx.State]:
        inner_rngs = nnx.merge(rngs_graphdef, rngs_state)
        args, kwargs = traced_inputs((sample_args, sample_kwargs))
        adapted = inject(nnx.merge(graphdef, state), config, args, kwargs, inner_rngs)
        adapted_graphdef, adapted_state = nnx.split(adapted)
        # Arrays the wrap left alone are the traced inputs themselves: returned from the
        # jit, they would be copies, so they are taken from the caller's state instead.
        inputs = {id(v.get_value()): path for path, v in nnx.to_flat_state(state)}
        kept, made = {}, []
        for path, variable in nnx.to_flat_state(adapted_state):
            source = inputs.get(id(variable.get_value()))
            if source is None:
                made.append((path, variable))
            else:
                kept[path] = source
        found.update(
            graphdef=adapted_graphdef, kept=kept, order=list(nnx.to_flat_state(adapted_state))
        )
        return nnx.from_flat_state(_placed(made, mesh)), nnx.state(inner_rngs)

    with sample_shape_errors((sample_args, sample_kwargs), where):
        made, rngs_after = jax.jit(wrap)(state, rngs_state)
    nnx.update(rngs, rngs_after)
    originals = dict(nnx.to_flat_state(state))
    values = dict(nnx.to_flat_state(made))
    values.update((path, originals[source]) for path, source in found["kept"].items())
    flat = [(path, values[path]) for path, _ in found["order"]]
    return nnx.merge(found["graphdef"], nnx.from_flat_state(flat))


def _mesh(state: nnx.State) -> jax.sharding.Mesh | None:
    """The current mesh, or else the mesh the model's weights are on, if any."""
    mesh = jax.sharding.get_mesh()
    if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty:
        return mesh
    sharding = first_named_sharding(state)
    found = None if sharding is None else sharding.mesh
    return found if isinstance(found, jax.sharding.Mesh) else None


def _placed(
    made: list[tuple[Any, nnx.Variable[Any]]], mesh: jax.sharding.Mesh | None
) -> list[tuple[Any, nnx.Variable[Any]]]:
    """``made`` with each array constrained to the layout its sharding metadata names.

    Eagerly, Qwix's quantized weights are placed on the float weight's layout
    (``_sharding.place_quantized``); in a trace that placement cannot be made, and XLA
    would choose one. Axes whose size the mesh axes do not divide stay unsharded.
    """
    if mesh is None:
        return made
    placed = []
    for path, variable in made:
        names = variable.get_metadata().get("out_sharding")
        names = names.spec if isinstance(names, NamedSharding) else names
        value = variable.get_value()
        if isinstance(names, tuple | list | PartitionSpec) and len(names) == value.ndim:
            entries = [
                entry
                if entry is not None
                and size % math.prod(mesh.shape[n] for n in _axis_names(entry)) == 0
                else None
                for entry, size in zip(names, value.shape, strict=True)
            ]
            sharding = NamedSharding(mesh, PartitionSpec(*entries))
            variable = variable.replace(jax.lax.with_sharding_constraint(value, sharding))
        placed.append((path, variable))
    return placed


def _axis_names(entry: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)
