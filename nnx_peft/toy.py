"""Tiny built-in models and texts for examples, tests and benchmarks.

Nothing here is needed to use nnx_peft; it gives runnable examples a real
model to adapt without downloads: a decoder-only language model shaped like
Gemma, Llama or Qwen (RMSNorm, attention with multi-axis einsum projections,
gated MLP), two small built-in texts and a character tokenizer.

Module paths of :class:`TinyDecoder` (for ``LoraConfig.target``)::

    embed
    layers/<i>/attn_norm, layers/<i>/attn/{q_proj,k_proj,v_proj,o_proj}
    layers/<i>/mlp_norm,  layers/<i>/mlp/{gate_proj,up_proj,down_proj}
    final_norm, lm_head

With ``DecoderConfig(scan_layers=True)`` the blocks are one stack (created with
``nnx.vmap``, applied with ``nnx.scan``), every weight with a leading layer
axis, and the paths lose the ``<i>``: ``layers/attn/q_proj`` and so on.

``DecoderConfig(mesh_axes=("fsdp", "tp"))`` annotates every weight with NNX
sharding metadata (``nnx.with_partitioning``) for a device mesh; see
:class:`DecoderConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.linear import default_embed_init, default_kernel_init
from jaxtyping import Array, Float, Int

#: First built-in text: used to pretrain the toy model.
TEXT_A = (
    "The river runs past the old mill, and the mill wheel turns slowly in the "
    "morning light. The miller opens the door, sweeps the floor, and sets out "
    "the sacks of grain. Children walk along the bank to school, and the river "
    "carries leaves down to the sea. In the evening the wheel stops, the door "
    "closes, and the lamps are lit along the road. The river runs on in the dark. "
) * 4

#: Second built-in text: a new domain the adapters are trained on.
TEXT_B = (
    "To bake bread, mix flour, water, salt and yeast in a large bowl. Knead the "
    "dough for ten minutes until it is smooth, then cover it and let it rise for "
    "an hour. Shape the loaf, let it rise again, and bake it in a hot oven until "
    "the crust is brown and the loaf sounds hollow when tapped. Let it cool "
    "before you slice it. "
) * 4


class CharTokenizer:
    """Maps characters to integer ids; the vocabulary is built from given texts."""

    def __init__(self, *texts: str) -> None:
        self.chars = sorted(set("".join(texts)))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Text to an int32 array of ids."""
        return np.array([self._ids[c] for c in text], dtype=np.int32)

    def decode(self, ids: np.ndarray | jax.Array) -> str:
        """Ids back to text."""
        return "".join(self.chars[int(i)] for i in np.asarray(ids))


def batches(
    ids: np.ndarray, *, batch_size: int, seq_len: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless (inputs, next-token targets) batches of random windows of ``ids``."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
        window = np.stack([ids[s : s + seq_len + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Sizes of :class:`TinyDecoder`, and how its weights are laid out on a device mesh.

    ``mesh_axes=(fsdp, tp)`` names two mesh axes (either may be ``None``) and
    annotates every weight with NNX sharding metadata, Megatron-style: ``fsdp``
    shards each weight's model-width axis (``embed_dim``), ``tp`` its heads,
    MLP-hidden or vocabulary axis. Query, key and value kernels ``(D, N, H)``
    are laid out ``(fsdp, tp, None)``, the output kernel ``(N, H, D)``
    ``(tp, None, fsdp)``, gate and up ``(D, F)`` ``(fsdp, tp)``, down
    ``(F, D)`` ``(tp, fsdp)``, the embedding ``(V, D)`` ``(tp, fsdp)``, the
    position embedding ``(max_len, D)`` ``(None, fsdp)`` and the head ``(D, V)``
    ``(fsdp, tp)``; norm scales are replicated. Build the model
    under ``jax.set_mesh(mesh)``, where NNX places each weight as annotated.
    The default ``None`` adds no annotation; the initial values do not depend
    on it.

    ``scan_layers=True`` stacks the blocks on a leading layer axis and applies
    them with ``nnx.scan`` (compile time flat in depth, as large models do);
    its initial values differ from the unrolled model's.
    """

    vocab_size: int
    num_layers: int = 2
    embed_dim: int = 64
    num_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 128
    max_len: int = 256
    dtype: jnp.dtype = jnp.float32
    mesh_axes: tuple[str | None, str | None] | None = None
    scan_layers: bool = False


def _partitioned(
    cfg: DecoderConfig, init: Callable[..., Any], *axes: str | None
) -> Callable[..., Any]:
    """``init`` annotated with the mesh axes ``cfg`` gives ``axes`` (``'fsdp'``, ``'tp'``, None)."""
    if cfg.mesh_axes is None:
        return init
    names = dict(zip(("fsdp", "tp"), cfg.mesh_axes, strict=True))
    return nnx.with_partitioning(init, tuple(names[a] if a else None for a in axes))


def _param(cfg: DecoderConfig, value: jax.Array, *axes: str | None) -> nnx.Param[jax.Array]:
    """An ``nnx.Param`` of ``value``, annotated like :func:`_partitioned`."""
    return nnx.Param(_partitioned(cfg, lambda: value, *axes)())


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale, replicated if ``cfg.mesh_axes`` is set."""

    def __init__(
        self, dim: int, *, dtype: jnp.dtype = jnp.float32, cfg: DecoderConfig | None = None
    ) -> None:
        scale = jnp.ones((dim,), dtype)
        self.scale = _param(cfg, scale, None) if cfg else nnx.Param(scale)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x * jax.lax.rsqrt(variance + 1e-6)).astype(x.dtype) * self.scale[...]


class Attention(nnx.Module):
    """Causal multi-head attention with einsum projections ('BTD,DNH->BTNH')."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_dim

        def proj(spec: str, shape: tuple[int, ...], *axes: str | None) -> nnx.Einsum:
            return nnx.Einsum(
                spec,
                shape,
                dtype=cfg.dtype,
                param_dtype=cfg.dtype,
                kernel_init=_partitioned(cfg, default_kernel_init, *axes),
                rngs=rngs,
            )

        self.q_proj = proj("BTD,DNH->BTNH", (d, n, h), "fsdp", "tp", None)
        self.k_proj = proj("BTD,DNH->BTNH", (d, n, h), "fsdp", "tp", None)
        self.v_proj = proj("BTD,DNH->BTNH", (d, n, h), "fsdp", "tp", None)
        self.o_proj = proj("BTNH,NHD->BTD", (n, h, d), "tp", None, "fsdp")

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        t = x.shape[1]
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return self.o_proj(jnp.einsum("BNTS,BSNH->BTNH", weights, v))


class MLP(nnx.Module):
    """Gated MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        d, f = cfg.embed_dim, cfg.mlp_dim

        def linear(n_in: int, n_out: int, *axes: str | None) -> nnx.Linear:
            return nnx.Linear(
                n_in,
                n_out,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.dtype,
                kernel_init=_partitioned(cfg, default_kernel_init, *axes),
                rngs=rngs,
            )

        self.gate_proj = linear(d, f, "fsdp", "tp")
        self.up_proj = linear(d, f, "fsdp", "tp")
        self.down_proj = linear(f, d, "tp", "fsdp")

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        self.attn_norm = RMSNorm(cfg.embed_dim, dtype=cfg.dtype, cfg=cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, dtype=cfg.dtype, cfg=cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nnx.Module):
    """A decoder-only language model: token ids ``(batch, time)`` to logits.

    Example:
        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> model = TinyDecoder(DecoderConfig(vocab_size=11), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 5), jnp.int32)).shape
        (2, 5, 11)
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.embed_dim,
            dtype=cfg.dtype,
            param_dtype=cfg.dtype,
            embedding_init=_partitioned(cfg, default_embed_init, "tp", "fsdp"),
            rngs=rngs,
        )
        self.pos_embed = _param(
            cfg,
            0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.embed_dim), cfg.dtype),
            None,
            "fsdp",
        )
        if cfg.scan_layers:
            # The layer axis gets no mesh axis: each device holds all layers of its shard.
            metadata = {nnx.PARTITION_NAME: None} if cfg.mesh_axes is not None else {}

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=metadata)
            def stack(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs=rngs)

            self.layers: Block | nnx.List[Block] = stack(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.embed_dim, dtype=cfg.dtype, cfg=cfg)
        self.lm_head = nnx.Linear(
            cfg.embed_dim,
            cfg.vocab_size,
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.dtype,
            kernel_init=_partitioned(cfg, default_kernel_init, "fsdp", "tp"),
            rngs=rngs,
        )

    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t v"]:
        x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
        if isinstance(self.layers, Block):  # scan_layers=True

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x: jax.Array, layer: Block) -> jax.Array:
                return layer(x)

            x = body(x, self.layers)
        else:
            for layer in self.layers:
                x = layer(x)
        return self.lm_head(self.final_norm(x))


def next_token_loss(logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> jax.Array:
    """Mean cross-entropy of next-token prediction."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@nnx.jit
def _window_loss(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> jax.Array:
    return next_token_loss(model(x), jnp.asarray(y))


def evaluate_loss(model: nnx.Module, ids: np.ndarray, *, seq_len: int) -> float:
    """Mean next-token loss of ``model`` over 4 batches of 32 random windows of ``ids``.

    The windows are drawn with a fixed seed, so every call (before and after
    training, say) scores the same text.
    """
    data = batches(ids, batch_size=32, seq_len=seq_len, seed=123)
    losses = [float(_window_loss(model, *next(data))) for _ in range(4)]
    return sum(losses) / len(losses)
