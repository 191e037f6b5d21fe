"""Hypothesis strategies: random NNX models mixing many layer kinds, and configs.

A generated model is a :class:`RandomNet`, a tree of layers named ``<kind><i>``
(``linear0``, ``block3/einsum1``, ...), every layer mapping ``(B, T, D)`` to
``(B, T, D)``. The spec that built it is kept, so tests can predict exactly
which weights get adapters and how many parameters those have.

Also generated: nets of NNX layers with mixed compute and parameter dtypes
(:func:`precision_cases`), an encoder-decoder used through several methods
(:func:`multi_method_cases`), and hand-written matmuls on ``nnx.Param``s
(:func:`raw_matmul_nets`), trees of blocks used through their submodules'
own methods (:func:`nested_cases`), routers over experts that the sample call
reaches only one of (:func:`routed_cases`), and models drawing dropout keys
from a call-time ``rngs=`` (:func:`call_rngs_cases`); and embedding tables looked up
by ids, tied to an output head or not (:func:`embedding_cases`).
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


# --- Mixed precision ----------------------------------------------------------------------

#: ``(dtype, param_dtype)`` of NNX layers: computed in ``dtype`` (``None``: promoted from the
#: input and weight), weights stored in ``param_dtype``.
PRECISIONS = (
    (None, jnp.float32),
    (jnp.bfloat16, jnp.float32),
    (None, jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16),
)
#: ``LoraConfig.adapter_dtype`` values.
ADAPTER_DTYPES = ("float32", "bfloat16", None)


class PrecisionNet(nnx.Module):
    """Adaptable NNX layers, each with its own compute and parameter dtype."""

    def __init__(self, layers: tuple[tuple[str, object, object], ...], d: int, *, rngs: nnx.Rngs):
        made = []
        for kind, dtype, param_dtype in layers:
            kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
            if kind == "linear":
                made.append(nnx.Linear(d, d, **kw))
            elif kind == "general":
                made.append(nnx.LinearGeneral(d, (2, d // 2), **kw))
            elif kind == "einsum":
                made.append(nnx.Einsum("BTD,DNH->BTNH", (d, 2, d // 2), **kw))
            elif kind == "conv":
                made.append(nnx.Conv(d, d, (3,), padding="SAME", **kw))
            else:
                raise AssertionError(kind)
        self.layers = nnx.List(made)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x).reshape(*x.shape[:-1], -1)
        return x


@dataclasses.dataclass(frozen=True)
class PrecisionCase:
    """A :class:`PrecisionNet`, its input dtype, and the adapters' dtype setting."""

    layers: tuple[tuple[str, object, object], ...]
    d: int
    input_dtype: object
    adapter_dtype: str | None
    rank: int

    def build(self, seed: int = 0) -> PrecisionNet:
        return PrecisionNet(self.layers, self.d, rngs=nnx.Rngs(seed))

    def sample(self, batch: int = 2, t: int = 3, seed: int = 1) -> jax.Array:
        x = jax.random.normal(jax.random.key(seed), (batch, t, self.d))
        return x.astype(self.input_dtype)

    def config(self) -> nnx_peft.LoraConfig:
        return nnx_peft.LoraConfig(
            rank=self.rank,
            alpha=2.0 * self.rank,
            target=r"layers/\d+",
            adapter_dtype=self.adapter_dtype,
        )


@st.composite
def precision_cases(draw: st.DrawFn) -> PrecisionCase:
    """Adaptable layers of random kinds and precisions, and an adapter dtype."""
    layer = st.tuples(
        st.sampled_from(("linear", "general", "einsum", "conv")), st.sampled_from(PRECISIONS)
    )
    layers = draw(st.lists(layer, min_size=1, max_size=3))
    return PrecisionCase(
        layers=tuple((kind, dtype, param_dtype) for kind, (dtype, param_dtype) in layers),
        d=draw(st.sampled_from([4, 8])),
        input_dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        adapter_dtype=draw(st.sampled_from(ADAPTER_DTYPES)),
        rank=draw(st.integers(1, 3)),
    )


# --- Models used through several methods ----------------------------------------------------

#: Methods of :class:`MultiMethodNet`, each reaching at least one adaptable layer.
METHODS = ("__call__", "encode", "decode", "generate")


def _layer(kind: str, d: int, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "linear":
        return nnx.Linear(d, d, rngs=rngs)
    if kind == "general":
        return nnx.LinearGeneral(d, (2, d // 2), rngs=rngs)
    if kind == "einsum":
        return nnx.Einsum("BTD,DNH->BTNH", (d, 2, d // 2), rngs=rngs)
    if kind == "conv":
        return nnx.Conv(d, d, (3,), padding="SAME", rngs=rngs)
    raise AssertionError(kind)


class MultiMethodNet(nnx.Module):
    """An encoder-decoder used through ``encode``, ``decode``, ``generate`` and ``__call__``."""

    def __init__(self, kinds: tuple[str, str], d: int, *, rngs: nnx.Rngs) -> None:
        self.encoder = _layer(kinds[0], d, rngs)
        self.decoder = _layer(kinds[1], d, rngs)

    @property
    def layers(self) -> tuple[nnx.Module, nnx.Module]:  # not a method: never intercepted
        return (self.encoder, self.decoder)

    @staticmethod
    def flat(x: jax.Array, like: jax.Array) -> jax.Array:
        return x.reshape(like.shape)

    def encode(self, x: jax.Array) -> jax.Array:
        return jnp.tanh(self.flat(self.encoder(x), x))

    def decode(self, h: jax.Array) -> jax.Array:
        return self.flat(self.decoder(h), h)

    def generate(self, x: jax.Array, steps: int = 2) -> jax.Array:
        for _ in range(steps):  # methods calling methods
            x = self.decode(self.encode(x))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


@dataclasses.dataclass(frozen=True)
class MultiMethodCase:
    """A :class:`MultiMethodNet`, the methods to check, and the adapters' rank."""

    methods: tuple[str, ...]
    d: int
    rank: int
    kinds: tuple[str, str] = ("linear", "linear")

    def build(self, seed: int = 0) -> MultiMethodNet:
        return MultiMethodNet(self.kinds, self.d, rngs=nnx.Rngs(seed))

    def sample(self, batch: int = 2, t: int = 3, seed: int = 1) -> jax.Array:
        return jax.random.normal(jax.random.key(seed), (batch, t, self.d))

    def config(self) -> nnx_peft.LoraConfig:
        return nnx_peft.LoraConfig(rank=self.rank, alpha=2.0 * self.rank, target="encoder|decoder")


@st.composite
def multi_method_cases(draw: st.DrawFn) -> MultiMethodCase:
    """Layer kinds, width, rank, and a non-empty subset of :data:`METHODS`."""
    kind = st.sampled_from(("linear", "general", "einsum", "conv"))
    return MultiMethodCase(
        methods=tuple(draw(st.lists(st.sampled_from(METHODS), min_size=1, unique=True))),
        d=draw(st.sampled_from([4, 8])),
        rank=draw(st.integers(1, 3)),
        kinds=(draw(kind), draw(kind)),
    )


# --- Hand-written matmuls on nnx.Params -------------------------------------------------------

#: How :class:`RawMatmulNet` multiplies by each of its weights.
RAW_MATMULS = ("@", "@-value", "matmul", "dot", "tensordot", "inner", "lax.dot")


class RawMatmulNet(nnx.Module):
    """A hand-written model: one ``nnx.Param`` per op, multiplied without any NNX layer."""

    def __init__(self, ops: tuple[str, ...], d: int, *, rngs: nnx.Rngs) -> None:
        self.ops = ops
        for i in range(len(ops)):
            shape = (d, d)  # square: jnp.inner contracts the weight's last axis, (out, in)
            setattr(self, f"w{i}", nnx.Param(jax.random.normal(rngs.params(), shape) / d**0.5))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, op in enumerate(self.ops):
            w = getattr(self, f"w{i}")
            if op == "@":
                x = x @ w  # the Variable itself
            elif op == "@-value":
                x = x @ w[...]
            elif op == "matmul":
                x = jnp.matmul(x, w[...])
            elif op == "dot":
                x = jnp.dot(x, w[...])
            elif op == "tensordot":
                x = jnp.tensordot(x, w[...], axes=1)
            elif op == "inner":
                x = jnp.inner(x, w[...])
            elif op == "lax.dot":
                x = jax.lax.dot(x, w[...])
            else:
                raise AssertionError(op)
            x = jnp.tanh(x)
        return x


@st.composite
def raw_matmul_nets(draw: st.DrawFn) -> tuple[tuple[str, ...], int]:
    """``(ops, width)`` of a :class:`RawMatmulNet`."""
    ops = tuple(draw(st.lists(st.sampled_from(RAW_MATMULS), min_size=1, max_size=5)))
    return ops, draw(st.sampled_from([3, 4, 6]))


#: How :class:`TransposedWeightNet` transposes each weight it stores as PyTorch does
#: (``(out, in)``, or ``(heads, head_dim, in)`` for ``'einsum-heads'``) before its product.
TRANSPOSED_PRODUCTS = (
    "@ .T",  # x @ w.T, on the Variable
    "@ [...].T",
    "jnp.transpose",
    ".transpose()",
    ".mT",
    "jnp.swapaxes",
    ".swapaxes()",
    "jnp.moveaxis",
    "jnp.permute_dims",
    "dot_general .T",
    "einsum .T",
    "einsum-heads",
)


class TransposedWeightNet(nnx.Module):
    """A model ported from PyTorch: each weight stored ``(out, in)``, multiplied transposed.

    ``widths`` are the features between layers; ``'einsum-heads'`` stores
    ``(2, out // 2, in)`` and contracts it transposed to ``(in, 2, out // 2)``.
    ``direct=True`` is its twin that multiplies each weight as stored, with an einsum.
    """

    def __init__(
        self,
        ops: tuple[str, ...],
        widths: tuple[int, ...],
        *,
        direct: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.ops, self.direct = ops, direct
        for i, op in enumerate(ops):
            d_in, d_out = widths[i], widths[i + 1]
            shape = (2, d_out // 2, d_in) if op == "einsum-heads" else (d_out, d_in)
            weight = jax.random.normal(rngs.params(), shape) / d_in**0.5
            setattr(self, f"w{i}", nnx.Param(weight))

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, op in enumerate(self.ops):
            w = getattr(self, f"w{i}")
            x = jnp.tanh(
                _stored_product(op, x, w) if self.direct else _transposed_product(op, x, w)
            )
        return x


def _stored_product(op: str, x: jax.Array, w: nnx.Param[jax.Array]) -> jax.Array:
    """The product of ``op`` written on the weight as stored (the ``direct`` twin)."""
    if op == "einsum-heads":
        return jnp.einsum("bi,hdi->bhd", x, w[...]).reshape(x.shape[0], -1)
    return jnp.einsum("bi,oi->bo", x, w[...])


def _transposed_product(op: str, x: jax.Array, w: nnx.Param[jax.Array]) -> jax.Array:
    if op == "@ .T":
        return x @ w.T
    if op == "@ [...].T":
        return x @ w[...].T
    if op == "jnp.transpose":
        return x @ jnp.transpose(w[...])
    if op == ".transpose()":
        return x @ w[...].transpose()
    if op == ".mT":
        return x @ w[...].mT
    if op == "jnp.swapaxes":
        return x @ jnp.swapaxes(w[...], 0, 1)
    if op == ".swapaxes()":
        return x @ w[...].swapaxes(0, 1)
    if op == "jnp.moveaxis":
        return x @ jnp.moveaxis(w[...], 0, -1)
    if op == "jnp.permute_dims":
        return x @ jnp.permute_dims(w[...], (1, 0))
    if op == "dot_general .T":
        return jax.lax.dot_general(x, w[...].T, (((1,), (0,)), ((), ())))
    if op == "einsum .T":
        return jnp.einsum("bi,io->bo", x, w[...].T)
    if op == "einsum-heads":
        heads = jnp.einsum("bi,ihd->bhd", x, jnp.transpose(w[...], (2, 0, 1)))
        return heads.reshape(x.shape[0], -1)
    raise AssertionError(op)


@st.composite
def transposed_weight_nets(draw: st.DrawFn) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(ops, widths)`` of a :class:`TransposedWeightNet`: non-square weights mostly."""
    ops = tuple(draw(st.lists(st.sampled_from(TRANSPOSED_PRODUCTS), min_size=1, max_size=4)))
    widths = tuple(
        draw(st.lists(st.sampled_from([2, 4, 6]), min_size=len(ops) + 1, max_size=len(ops) + 1))
    )
    return ops, widths


# --- Embedding tables ---------------------------------------------------------------------


class IndexedTable(nnx.Module):
    """A table looked up by indexing its ``nnx.Param`` (``table[(ids,)]``), as tunix's Embedder."""

    def __init__(self, vocab: int, features: int, *, rngs: nnx.Rngs) -> None:
        self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, features)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.input_embedding[(ids,)]

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.input_embedding[...].T)


def table_variable(embedder: nnx.Module) -> nnx.Param:
    """The table of an :class:`EmbeddingNet`'s ``embedder`` (an Embed or an IndexedTable)."""
    return embedder.embedding if isinstance(embedder, nnx.Embed) else embedder.input_embedding


class EmbeddingNet(nnx.Module):
    """Ids -> table lookup -> projection -> logits, by a head of its own or the tied table.

    A tied head is the embedder's own ``attend``, or (``tied_outside``) a product in this
    module's code by the embedder's table, as many hand-written LLMs compute their logits.
    """

    def __init__(
        self,
        vocab: int,
        features: int,
        lookup: str,
        tied: bool,
        *,
        rngs: nnx.Rngs,
        tied_outside: bool = False,
    ):
        if lookup == "embed":
            self.embedder: nnx.Module = nnx.Embed(vocab, features, rngs=rngs)
        else:
            self.embedder = IndexedTable(vocab, features, rngs=rngs)
        self.proj = nnx.Linear(features, features, rngs=rngs)
        self.head = None if tied else nnx.Linear(features, vocab, rngs=rngs)
        self.tied_outside = tied_outside

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.after_lookup(self.embedder(ids))

    def after_lookup(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(self.proj(x))
        if self.head is not None:
            return self.head(h)
        if self.tied_outside:
            return h @ table_variable(self.embedder)[...].T
        return self.embedder.attend(h)


@dataclasses.dataclass(frozen=True)
class EmbeddingCase:
    """An :class:`EmbeddingNet` and the adapters' rank and alpha."""

    vocab: int
    features: int
    rank: int
    alpha: float
    lookup: str  # 'embed' (nnx.Embed: jnp.take) or 'index' (table[(ids,)])
    tied: bool
    target: str = "embedder|proj"
    tied_outside: bool = False  # a tied head: the table multiplied outside the embedder

    def build(self, seed: int = 0) -> EmbeddingNet:
        return EmbeddingNet(
            self.vocab,
            self.features,
            self.lookup,
            self.tied,
            rngs=nnx.Rngs(seed),
            tied_outside=self.tied_outside,
        )

    def ids(self, seed: int = 3) -> jax.Array:
        return jax.random.randint(jax.random.key(seed), (2, 5), 0, self.vocab)


@st.composite
def embedding_cases(draw: st.DrawFn, tied: bool | None = None) -> EmbeddingCase:
    """Table sizes, lookup style, tied (by the embedder or outside it) or not, rank, alpha
    and targets."""
    tied = draw(st.booleans()) if tied is None else tied
    return EmbeddingCase(
        vocab=draw(st.sampled_from([3, 7, 12])),
        features=draw(st.sampled_from([4, 6])),
        rank=draw(st.integers(1, 3)),
        alpha=draw(st.sampled_from([1.0, 4.0])),
        lookup=draw(st.sampled_from(["embed", "index"])),
        tied=tied,
        target=draw(st.sampled_from(["embedder", "embedder|proj", ".*"])),
        tied_outside=tied and draw(st.booleans()),
    )


# --- Nested modules used through their own methods -----------------------------------------

#: Leaf kinds of a :class:`NestedBlock`; ``raw`` is a :class:`RawMatmulNet` of two ``@``.
NESTED_LEAVES = ("linear", "general", "einsum", "conv", "raw", "norm")


def _nested_leaf(kind: str, d: int, rngs: nnx.Rngs) -> nnx.Module:
    if kind == "raw":
        return RawMatmulNet(("@", "matmul"), d, rngs=rngs)
    if kind == "norm":
        return nnx.LayerNorm(d, rngs=rngs)
    return _layer(kind, d, rngs)


class NestedBlock(nnx.Module):
    """A block of parts (leaves or blocks), used through ``first``, ``rest`` and ``__call__``."""

    def __init__(self, spec: tuple, d: int, *, rngs: nnx.Rngs) -> None:
        self.parts = nnx.List(
            [
                NestedBlock(s, d, rngs=rngs) if isinstance(s, tuple) else _nested_leaf(s, d, rngs)
                for s in spec
            ]
        )

    def first(self, x: jax.Array) -> jax.Array:
        return self.parts[0](x).reshape(x.shape)

    def rest(self, x: jax.Array) -> jax.Array:
        for part in self.parts[1:]:
            x = part(x).reshape(x.shape)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.rest(self.first(x))


def block_paths(spec: tuple, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """The part indices leading to every :class:`NestedBlock` of ``spec`` (the root is ``()``)."""
    paths = [prefix]
    for i, item in enumerate(spec):
        if isinstance(item, tuple):
            paths += block_paths(item, (*prefix, i))
    return paths


def _nested_specs(depth: int) -> st.SearchStrategy[tuple]:
    leaf = st.sampled_from(NESTED_LEAVES)
    part = leaf if depth == 0 else st.one_of(leaf, _nested_specs(depth - 1))
    return st.lists(part, min_size=1, max_size=3).map(tuple)


def _has_adaptable(spec: tuple) -> bool:
    return any(_has_adaptable(s) if isinstance(s, tuple) else s != "norm" for s in spec)


@dataclasses.dataclass(frozen=True)
class NestedCase:
    """A :class:`NestedBlock` tree, its width, and the adapters' rank."""

    spec: tuple
    d: int
    rank: int

    def build(self, seed: int = 0) -> NestedBlock:
        return NestedBlock(self.spec, self.d, rngs=nnx.Rngs(seed))

    def sample(self, batch: int = 2, t: int = 3, seed: int = 1) -> jax.Array:
        return jax.random.normal(jax.random.key(seed), (batch, t, self.d))

    def config(self) -> nnx_peft.LoraConfig:
        # Every leaf (norms too: they own a weight and get no adapter).
        return nnx_peft.LoraConfig(rank=self.rank, alpha=2.0 * self.rank, target=r"(.*/)?parts/\d+")


@st.composite
def nested_cases(draw: st.DrawFn) -> NestedCase:
    """A tree of blocks two deep with at least one adaptable leaf, a width and a rank."""
    spec = draw(_nested_specs(2).filter(_has_adaptable))
    return NestedCase(spec=spec, d=draw(st.sampled_from([4, 6])), rank=draw(st.integers(1, 3)))


# --- Routed experts ---------------------------------------------------------------------------


class RoutedNet(nnx.Module):
    """A top-1 router, in Python on concrete values, over experts of NNX layer kinds."""

    def __init__(self, kinds: tuple[str, ...], d: int, *, rngs: nnx.Rngs) -> None:
        self.experts = nnx.List([_layer(kind, d, rngs) for kind in kinds])

    def __call__(self, x: jax.Array) -> jax.Array:
        expert = int(jnp.argmax(x[0, 0, : len(self.experts)]))  # the first token decides
        return self.experts[expert](x).reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class RoutedCase:
    """A :class:`RoutedNet`, the expert its sample reaches, and the adapters' rank."""

    kinds: tuple[str, ...]
    d: int
    rank: int
    reached: int

    def build(self, seed: int = 0) -> RoutedNet:
        return RoutedNet(self.kinds, self.d, rngs=nnx.Rngs(seed))

    def routed_to(self, expert: int, seed: int = 1) -> jax.Array:
        """A batch whose first token routes to ``expert``."""
        x = jax.random.normal(jax.random.key(seed), (2, 3, self.d))
        return x.at[0, 0, :].set(-1.0).at[0, 0, expert].set(1.0)

    def config(self) -> nnx_peft.LoraConfig:
        return nnx_peft.LoraConfig(rank=self.rank, alpha=2.0 * self.rank, target=r"experts/\d+")


@st.composite
def routed_cases(draw: st.DrawFn) -> RoutedCase:
    """Two to four experts of random kinds, one of them reached by the sample."""
    kinds = draw(
        st.lists(st.sampled_from(("linear", "general", "einsum", "conv")), min_size=2, max_size=4)
    )
    return RoutedCase(
        kinds=tuple(kinds),
        d=draw(st.sampled_from([4, 6])),
        rank=draw(st.integers(1, 3)),
        reached=draw(st.integers(0, len(kinds) - 1)),
    )


# --- Call-time rngs ---------------------------------------------------------------------------


class CallRngsNet(nnx.Module):
    """Adaptable layers, each followed by dropout drawing from the call's own ``rngs=``."""

    def __init__(self, kinds: tuple[str, ...], rate: float, d: int, *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([_layer(kind, d, rngs) for kind in kinds])
        self.drop = nnx.Dropout(rate)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs) -> jax.Array:
        for layer in self.layers:
            x = self.drop(layer(x).reshape(x.shape), rngs=rngs)
        return x


@dataclasses.dataclass(frozen=True)
class CallRngsCase:
    """A :class:`CallRngsNet`, its dropout rate, call seeds, and the adapters' rank."""

    kinds: tuple[str, ...]
    rate: float
    seeds: tuple[int, ...]
    d: int
    rank: int

    def build(self, seed: int = 0) -> CallRngsNet:
        return CallRngsNet(self.kinds, self.rate, self.d, rngs=nnx.Rngs(seed))

    def sample(self, seed: int = 1) -> jax.Array:
        return jax.random.normal(jax.random.key(seed), (2, 3, self.d))

    def config(self) -> nnx_peft.LoraConfig:
        return nnx_peft.LoraConfig(rank=self.rank, alpha=2.0 * self.rank, target=r"layers/\d+")


@st.composite
def call_rngs_cases(draw: st.DrawFn) -> CallRngsCase:
    """One to three layers, a dropout rate, two or three call seeds, a width and a rank."""
    kinds = draw(
        st.lists(st.sampled_from(("linear", "general", "einsum", "conv")), min_size=1, max_size=3)
    )
    seeds = draw(st.lists(st.integers(0, 2**16), min_size=2, max_size=3, unique=True))
    return CallRngsCase(
        kinds=tuple(kinds),
        rate=draw(st.sampled_from([0.1, 0.5])),
        seeds=tuple(seeds),
        d=draw(st.sampled_from([4, 6])),
        rank=draw(st.integers(1, 3)),
    )


def randomized_adapters(
    model: nnx_peft.PeftModel, seed: int = 0, scale: float = 0.1
) -> nnx_peft.PeftModel:
    """Gives every adapter array random values, ``scale`` times a standard normal draw.

    Fresh adapters have ``B = 0``, which would hide layout mistakes: tests of the update's
    values start from random factors instead.
    """
    key = jax.random.key(seed)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx_peft.AdapterParam):
            key, sub = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(scale * jax.random.normal(sub, value.shape, value.dtype))
    return model
