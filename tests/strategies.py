"""Hypothesis strategies: random NNX models mixing many layer kinds, and configs.

A generated model is a :class:`RandomNet`, a tree of layers named ``<kind><i>``
(``linear0``, ``block3/einsum1``, ...), every layer mapping ``(B, T, D)`` to
``(B, T, D)``. The spec that built it is kept, so tests can predict exactly
which weights get adapters and how many parameters those have.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from hypothesis import strategies as st

import nnx_peft

#: Layer kinds that own a weight used in a matmul, and so get adapters.
ADAPTABLE = ("linear", "general", "einsum", "conv", "custom")
#: Layer kinds that get no adapter (no matmul on an own nnx.Param).
PASSIVE = ("embed", "norm", "dropout", "batchnorm")


class CustomEinsum(nnx.Module):
    """A user module calling ``jnp.einsum`` on its own multi-axis ``nnx.Param``."""

    def __init__(self, d: int, *, rngs: nnx.Rngs) -> None:
        self.w = nnx.Param(jax.random.normal(rngs.params(), (d, 2, d // 2)) / math.sqrt(d))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("btd,dnh->btnh", x, self.w[...]).reshape(x.shape)


class Layer(nnx.Module):
    """One leaf layer of a random net; ``inner`` is the NNX layer itself."""

    def __init__(self, kind: str, d: int, *, rngs: nnx.Rngs) -> None:
        self.kind = kind
        if kind == "linear":
            self.inner = nnx.Linear(d, d, rngs=rngs)
        elif kind == "general":
            self.inner = nnx.LinearGeneral(d, (2, d // 2), rngs=rngs)
        elif kind == "einsum":
            self.inner = nnx.Einsum("BTD,DNH->BTNH", (d, 2, d // 2), rngs=rngs)
        elif kind == "conv":
            self.inner = nnx.Conv(d, d, (3,), padding="SAME", rngs=rngs)
        elif kind == "custom":
            self.inner = CustomEinsum(d, rngs=rngs)
        elif kind == "embed":
            self.inner = nnx.Embed(7, d, rngs=rngs)
        elif kind == "norm":
            self.inner = nnx.LayerNorm(d, rngs=rngs)
        elif kind == "dropout":
            self.inner = nnx.Dropout(0.25, rngs=rngs)
        elif kind == "batchnorm":
            self.inner = nnx.BatchNorm(d, rngs=rngs)
        else:
            raise AssertionError(kind)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "embed":
            positions = jnp.arange(x.shape[1]) % 7
            return x + self.inner(positions)
        return self.inner(x).reshape(x.shape)


class RandomNet(nnx.Module):
    """A tree of layers; a nested list in the spec becomes a ``block<i>`` submodule."""

    def __init__(self, spec: tuple, d: int, *, rngs: nnx.Rngs) -> None:
        names = []
        for i, item in enumerate(spec):
            name = f"block{i}" if isinstance(item, tuple) else f"{item}{i}"
            child = (
                RandomNet(item, d, rngs=rngs)
                if isinstance(item, tuple)
                else Layer(item, d, rngs=rngs)
            )
            setattr(self, name, child)
            names.append(name)
        self.names = tuple(names)

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def leaf_layers(spec: tuple, prefix: str = "") -> list[tuple[str, str]]:
    """``(path of the Layer module, kind)`` for every leaf layer of ``spec``."""
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, tuple):
            out += leaf_layers(item, f"{prefix}block{i}/")
        else:
            out.append((f"{prefix}{item}{i}", item))
    return out


def adapter_size(kind: str, d: int, rank: int) -> int:
    """Parameters of the adapter pair of one adaptable layer (weight shapes known by kind)."""
    if kind == "conv":  # kernel (3, d, d): A (3, d, r), B (r, d)
        return rank * (3 * d + d)
    return rank * (d + d)  # contracting d, remaining d (possibly split over axes)


@dataclasses.dataclass(frozen=True)
class Case:
    """A random model spec, width, and a config targeting some of its layers."""

    spec: tuple
    d: int
    config: nnx_peft.LoraConfig
    targeted: tuple[tuple[str, str], ...]  # (module path of the weight owner, kind)

    def build(self, seed: int = 0) -> RandomNet:
        return RandomNet(self.spec, self.d, rngs=nnx.Rngs(seed))

    def sample(self, batch: int = 2, t: int = 5, seed: int = 1) -> jax.Array:
        return jax.random.normal(jax.random.key(seed), (batch, t, self.d))


def _specs(depth: int) -> st.SearchStrategy[tuple]:
    kinds = st.sampled_from(ADAPTABLE + PASSIVE)
    if depth == 0:
        return st.lists(kinds, min_size=1, max_size=4).map(tuple)
    return st.lists(st.one_of(kinds, _specs(depth - 1)), min_size=1, max_size=4).map(tuple)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A random net with at least one adaptable layer and a valid config for it."""
    spec = draw(_specs(1).filter(lambda s: any(k in ADAPTABLE for _, k in leaf_layers(s))))
    layers = leaf_layers(spec)
    present = sorted({k for _, k in layers if k in ADAPTABLE})
    kinds = draw(st.lists(st.sampled_from(present), min_size=1, unique=True))
    target = [rf"(.*/)?{kind}\d+/inner" for kind in kinds]
    candidates = [(path, k) for path, k in layers if k in kinds]
    # Exclude some targeted layers by exact path, keeping one layer per targeted kind.
    dropped: list[tuple[str, str]] = []
    for item in draw(st.lists(st.sampled_from(candidates), unique=True)):
        same_kind_left = [c for c in candidates if c[1] == item[1] and c not in dropped]
        if len(same_kind_left) > 1:
            dropped.append(item)
    kept = [c for c in candidates if c not in dropped]
    config = nnx_peft.LoraConfig(
        rank=draw(st.integers(1, 4)),
        alpha=draw(st.sampled_from([1.0, 2.0, 8.0])),
        target=target,
        exclude=[rf"{p}/inner" for p, _ in dropped],
    )
    d = draw(st.sampled_from([4, 6, 8]))
    return Case(spec=spec, d=d, config=config, targeted=tuple((f"{p}/inner", k) for p, k in kept))
