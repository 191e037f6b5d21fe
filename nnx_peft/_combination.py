"""A new adapter made from a weighted combination of others (HF PEFT's ``add_weighted_adapter``).

Each adapted weight gets factors computed from the factors of the adapters combined,
with weights ``w_i``. With ``c_i = w_i * scale_i`` (``scale_i`` an adapter's
``alpha / rank``), the combination types are HF PEFT's:

- ``'cat'``: ``A = [c_1 A_1, c_2 A_2, ...]`` and ``B = [B_1; B_2; ...]`` along the rank,
  so ``A @ B = sum_i c_i A_i @ B_i`` exactly; the ranks add up.
- ``'linear'``: ``A = sum_i sqrt(c_i) A_i`` and ``B = sum_i sqrt(c_i) B_i``, for adapters
  of equal ranks on the same weights. ``A @ B`` then holds the cross terms
  ``sqrt(c_i c_j) A_i @ B_j`` too: it is not the weighted sum of the updates unless one
  adapter is combined, or the adapters' factors are orthogonal to each other.
- ``'svd'``: the best rank-``k`` approximation (Eckart-Young) of ``sum_i c_i A_i @ B_i``,
  from its singular value decomposition: ``A = U_k`` and ``B = S_k V_k^T``.

The new adapter's scale is 1 (``alpha = rank`` for every module), so its factors hold
the whole update. For every weight, the relative Frobenius distance between the new
update and ``sum_i c_i A_i @ B_i`` is measured and returned: 0 up to rounding for
``'cat'``, the truncation error for ``'svd'``, the cross terms for ``'linear'``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nnx_peft import _factors
from nnx_peft._adapter import Adapter, adapters
from nnx_peft._config import LoraConfig
from nnx_peft._errors import WeightedAdapterError
from nnx_peft._factors import Subscripts
from nnx_peft._quantized import float_weight

#: ``add_weighted_adapter``'s combination types.
COMBINATION_TYPES = ("cat", "linear", "svd")


@dataclasses.dataclass(frozen=True)
class Source:
    """The adapters of one weight that a combination reads, with their coefficients."""

    found: tuple[Adapter, ...]
    coefficients: tuple[float, ...]  # w_i * scale_i

    @property
    def where(self) -> str:
        first = self.found[0]
        return f"the weight {first.weight!r} of module {first.path!r}"

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(a.info().rank for a in self.found)


def check_weights(weights: object, count: int, combination_type: object) -> tuple[float, ...]:
    """The combination's weights as floats, and its type, checked.

    Raises:
        WeightedAdapterError: The type is unknown, there is not one finite real weight per
            adapter, or a ``'linear'`` weight is negative.
    """
    if combination_type not in COMBINATION_TYPES:
        raise WeightedAdapterError(
            f"add_weighted_adapter's combination_type is one of {list(COMBINATION_TYPES)}; "
            f"got {combination_type!r}."
        )
    listed = list(weights) if isinstance(weights, Sequence) else None
    if (
        listed is None
        or len(listed) != count
        or not all(isinstance(w, numbers.Real) and math.isfinite(float(w)) for w in listed)
    ):
        raise WeightedAdapterError(
            f"add_weighted_adapter takes one finite real weight per adapter combined ({count}); "
            f"got {weights!r}. Example: weights=[0.5, 0.5]."
        )
    floats = tuple(float(w) for w in listed)
    if combination_type == "linear" and any(w < 0 for w in floats):
        raise WeightedAdapterError(
            f"combination_type='linear' multiplies each adapter's A and B by sqrt(weight * "
            f"scale), so its weights must be >= 0; got {list(floats)}. Use 'cat' (exact) or "
            "'svd' for negative weights."
        )
    return floats


def sources(
    model: Any, names: Sequence[str], weights: Sequence[float], combination_type: str
) -> list[Source]:
    """The adapters of each weight that ``names`` adapt, checked for ``combination_type``.

    Raises:
        WeightedAdapterError: An adapter is a DoRA adapter or belongs to a grouped
            convolution; or, for ``'linear'``, the adapters do not adapt the same weights
            with equal ranks.
    """
    by_weight: dict[tuple[str, str], list[tuple[Adapter, float]]] = {}
    for name, weight in zip(names, weights, strict=True):
        for adapter in adapters(model, {name}):
            layout = adapter.layout
            if layout.update.name != "lora":
                raise WeightedAdapterError(
                    f"{adapter.where} is a {layout.update.name} adapter; add_weighted_adapter "
                    "combines plain LoRA adapters, whose updates are A @ B. Leave it out of "
                    "the combination."
                )
            if layout.feature_group_count != 1 or layout.batch_group_count != 1:
                raise WeightedAdapterError(
                    f"{adapter.where} belongs to a grouped convolution, whose A is grouped along "
                    "the rank, so ranks cannot be joined or factored anew. Exclude the module "
                    "from the adapters combined."
                )
            key = (adapter.path, adapter.weight)
            by_weight.setdefault(key, []).append((adapter, weight * layout.scale))
    found = [
        Source(tuple(a for a, _ in group), tuple(c for _, c in group))
        for group in by_weight.values()
    ]
    if combination_type == "linear":
        for source in found:
            if len(source.found) != len(names):
                missing = sorted(set(names) - {a.adapter for a in source.found})
                raise WeightedAdapterError(
                    f"combination_type='linear' adds the factors of adapters that adapt the "
                    f"same weights; {source.where} has no adapter {missing}. Use 'cat' or "
                    "'svd', which combine adapters of different targets."
                )
            if len(set(source.ranks)) != 1:
                raise WeightedAdapterError(
                    f"combination_type='linear' adds factors of equal ranks; at {source.where} "
                    f"the ranks of {list(names)} are {list(source.ranks)}. Use 'cat' or 'svd', "
                    "which combine adapters of any ranks."
                )
    return found


def ranks(found: Sequence[Source], combination_type: str, svd_rank: int | None) -> list[int]:
    """The new adapter's rank at each weight of ``found``."""
    if combination_type == "cat":
        return [sum(s.ranks) for s in found]
    if combination_type == "linear":
        return [s.ranks[0] for s in found]
    top = svd_rank if svd_rank is not None else max(r for s in found for r in s.ranks)
    return [top for _ in found]


def check_svd_rank(svd_rank: object, combination_type: str) -> int | None:
    """``svd_rank`` checked: ``None``, or a positive int with ``'svd'``.

    Raises:
        WeightedAdapterError: It is not a positive integer, or given for another type.
    """
    if svd_rank is None:
        return None
    if combination_type != "svd":
        raise WeightedAdapterError(
            f"svd_rank sets the rank of an 'svd' combination; got svd_rank={svd_rank!r} with "
            f"combination_type={combination_type!r}. Leave it out, or use 'svd'."
        )
    if isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral) or svd_rank < 1:
        raise WeightedAdapterError(
            f"svd_rank is a positive integer (the new adapter's rank); got {svd_rank!r}."
        )
    return int(svd_rank)


def config(first: LoraConfig, found: Sequence[Source], new_ranks: Sequence[int]) -> LoraConfig:
    """The new adapter's config: the first adapter's, targeting exactly the modules
    combined, each with its rank and ``alpha = rank`` (scale 1), without rsLoRA."""
    modules: dict[str, int] = {}
    for source, rank in zip(found, new_ranks, strict=True):
        path = source.found[0].path
        if modules.setdefault(path, rank) != rank:
            raise WeightedAdapterError(
                f"The module {path!r} has weights whose combined ranks differ "
                f"({modules[path]} and {rank}), and a LoraConfig gives a module one rank. "
                "Combine adapters of equal ranks on this module's weights, or use 'svd' with "
                "svd_rank."
            )
    common = max(set(modules.values()), key=list(modules.values()).count)
    exceptions = {_exactly(p): r for p, r in modules.items() if r != common}
    return dataclasses.replace(
        first,
        rank=common,
        alpha=float(common),
        target=[_exactly(path) for path in modules],
        exclude=(),
        use_rslora=False,
        rank_pattern=exceptions,
        alpha_pattern={p: float(r) for p, r in exceptions.items()},
    )


def _exactly(path: str) -> str:
    """A regex matching the module path ``path`` alone (``'^$'`` for the root, ``''``)."""
    return re.escape(path) if path else "^$"


def _layer_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return shape if axis is None else shape[:axis] + shape[axis + 1 :]


def _combine(
    combination_type: str,
    subs: tuple[Subscripts, ...],
    new_sub: Subscripts,
    weight_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    """One layer's combination: ``(coefficients, As, Bs) -> (A, B, |error|^2, |target|^2)``."""

    def combine(
        coefficients: jax.Array, a_list: list[jax.Array], b_list: list[jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        deltas = [
            _factors.delta(sub, a, b, weight_shape)
            for sub, a, b in zip(subs, a_list, b_list, strict=True)
        ]
        target = sum(c * d for c, d in zip(coefficients, deltas, strict=True))
        assert isinstance(target, jax.Array)
        # The rank axis: A's counted from its end, B's from its start (nothing before B's
        # rank, nor after A's, is flattened).
        a_axis = subs[0].a.index(subs[0].rank) - len(subs[0].a)
        b_axis = subs[0].b.index(subs[0].rank)
        if combination_type == "cat":
            a = jnp.concatenate(
                [c * a for c, a in zip(coefficients, a_list, strict=True)], axis=a_axis
            )
            b = jnp.concatenate(b_list, axis=b_axis)
        elif combination_type == "linear":
            roots = jnp.sqrt(coefficients)
            a = sum(r * a for r, a in zip(roots, a_list, strict=True))
            b = sum(r * b for r, b in zip(roots, b_list, strict=True))
        else:
            matrix = _factors.factor_matrix(new_sub, target)
            u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
            k = a_shape[a_axis]
            pad = max(0, k - s.shape[-1])  # a rank above min(p, q): exact, padded with zeros
            u = jnp.pad(u[..., :k], ((0, 0), (0, 0), (0, pad)))
            vt = jnp.pad((s[..., :, None] * vt)[..., :k, :], ((0, 0), (0, pad), (0, 0)))
            a, b = _factors.factors_from_matrices(new_sub, u, vt, weight_shape, a_shape, b_shape)
        assert isinstance(a, jax.Array) and isinstance(b, jax.Array)
        made = _factors.delta(new_sub, a, b, weight_shape)
        return a, b, jnp.sum((made - target) ** 2), jnp.sum(target**2)

    return combine


def fill(new: Adapter, source: Source, combination_type: str) -> float:
    """Sets the factors of ``new`` from ``source``; returns the relative error of its update.

    The new adapter's scale must be 1.
    """
    layout = new.layout
    assert layout.scale == 1.0 and layout.subscripts is not None
    axis = layout.layer_axis
    weight_shape = _layer_shape(tuple(jax.eval_shape(lambda: float_weight(new.base)).shape), axis)
    a_param, b_param = new.a, new.b
    current_a, current_b = a_param.get_value(), b_param.get_value()
    compute = jnp.promote_types(current_a.dtype, jnp.float32)
    subs = tuple(a.layout.subscripts for a in source.found)
    assert all(sub is not None for sub in subs)
    combine = _combine(
        combination_type,
        subs,  # type: ignore[arg-type]
        layout.subscripts,
        weight_shape,
        _layer_shape(tuple(current_a.shape), axis),
        _layer_shape(tuple(current_b.shape), axis),
    )
    if axis is not None:  # a scanned stack: the layouts describe one layer
        combine = jax.vmap(combine, in_axes=(None, axis, axis), out_axes=(axis, axis, 0, 0))
    a, b, squared_error, squared_norm = combine(
        jnp.asarray(source.coefficients, compute),
        [x.a.get_value().astype(compute) for x in source.found],
        [x.b.get_value().astype(compute) for x in source.found],
    )
    a_param.set_value(jax.device_put(a.astype(current_a.dtype), current_a.sharding))
    b_param.set_value(jax.device_put(b.astype(current_b.dtype), current_b.sharding))
    error, norm = float(jnp.sum(squared_error)), float(jnp.sum(squared_norm))
    if norm == 0:  # nothing to approximate: the combined adapters' updates are all zero
        return 0.0 if error == 0 else math.inf
    return math.sqrt(error / norm)
