"""An adapted weight and its two factors written as einsum subscripts, and the maths on them.

Qwix adds to each adapted matmul the product of its input with ``A @ B``
laid out like the weight; how the factors' axes map onto the weight's depends
on the layout (``dot_general`` flattens axes, ``einsum`` keeps them, a
convolution's ``A`` has the kernel's window). :class:`Subscripts` writes that
mapping down once per adapter, when it is created: one letter per weight
axis, the letters of ``A``'s and ``B``'s (unflattened) axes plus a rank
letter, and which weight axes are output features (kept by the matmul)
rather than contracted. Everything the variants need is then written once for
every layout:

- the weight delta ``A @ B`` in the weight's own axis order;
- the norm of each output feature's column of ``W + scale * A @ B``, over the
  contracting axes, without materialising that sum (DoRA);
- the (batched) matrix that PiSSA and OLoRA factor, and the factors back in
  ``A``'s and ``B``'s shapes;
- the broadcast of a per-feature vector onto the matmul's output or onto the weight.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_HIGHEST = jax.lax.Precision.HIGHEST
#: The rank letter of the layouts nnx_peft letters itself; weight axes use the others.
_RANK = "r"
_LETTERS = "".join(c for c in string.ascii_letters if c != _RANK)


@dataclasses.dataclass(frozen=True)
class Subscripts:
    """Einsum subscripts of an adapted weight and of its factors (``delta = A @ B``).

    Attributes:
        weight: One letter per weight axis, in the weight's own order.
        a: The letters of ``A``'s axes once unflattened (see :meth:`views`).
        b: The letters of ``B``'s axes once unflattened.
        rank: The letter of the rank axis, in both ``a`` and ``b``.
        features: The weight letters the matmul keeps in its output (output
            features and batch axes), in the weight's order; the others are
            contracted with the input.

    Example:
        >>> sub = dot_general_subscripts(2, contracting=(0,), batch=())
        >>> sub.weight, sub.a, sub.b, sub.features, sub.contracting
        ('ab', 'ar', 'rb', 'b', 'a')
    """

    weight: str
    a: str
    b: str
    rank: str
    features: str

    @property
    def contracting(self) -> str:
        """The weight letters contracted with the input, in the weight's order."""
        return "".join(c for c in self.weight if c not in self.features)

    def sizes(self, weight_shape: tuple[int, ...], rank: int) -> dict[str, int]:
        """The size of every letter."""
        return {**dict(zip(self.weight, weight_shape, strict=True)), self.rank: rank}

    def feature_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a per-feature array (a DoRA magnitude)."""
        pairs = zip(self.weight, weight_shape, strict=True)
        return tuple(n for c, n in pairs if c in self.features)

    def feature_axes(self) -> tuple[int, ...]:
        """The weight axes of the features, in order."""
        return tuple(i for i, c in enumerate(self.weight) if c in self.features)

    def views(
        self, a: jax.Array, b: jax.Array, weight_shape: tuple[int, ...]
    ) -> tuple[jax.Array, jax.Array]:
        """``A`` and ``B`` reshaped to one axis per letter (``dot_general`` flattens some)."""
        sizes = self.sizes(weight_shape, a.shape[-1])
        return (
            a.reshape(tuple(sizes[c] for c in self.a)),
            b.reshape(tuple(sizes[c] for c in self.b)),
        )


def dot_general_subscripts(
    ndim: int, contracting: tuple[int, ...], batch: tuple[int, ...]
) -> Subscripts:
    """The subscripts of a ``dot_general`` weight with ``ndim`` axes.

    Qwix's ``A`` is ``(*batch, prod(contracting), rank)`` with the contracting
    axes in ``dimension_numbers`` order, and its ``B`` is ``(*batch, rank,
    prod(remaining))`` with the remaining axes ascending.
    """
    letters = _LETTERS[:ndim]
    remaining = [i for i in range(ndim) if i not in contracting and i not in batch]
    batch_letters = "".join(letters[i] for i in batch)
    return Subscripts(
        weight=letters,
        a=batch_letters + "".join(letters[i] for i in contracting) + _RANK,
        b=batch_letters + _RANK + "".join(letters[i] for i in remaining),
        rank=_RANK,
        features="".join(c for i, c in enumerate(letters) if i not in contracting),
    )


def einsum_subscripts(lora_einsum: str, weight: str, output: str) -> Subscripts:
    """The subscripts of an ``einsum`` weight, from Qwix's update einsum ``'x,A,B->out'``."""
    a, b = lora_einsum.split("->")[0].split(",")[1:]
    return Subscripts(
        weight=weight,
        a=a,
        b=b,
        rank=b[0],
        features="".join(c for c in weight if c in output),
    )


def conv_subscripts(ndim: int) -> Subscripts:
    """The subscripts of a convolution kernel ``(*window, in, out)``: ``A`` has the kernel's
    axes with ``rank`` output features, ``B`` is ``(rank, out)``."""
    letters = _LETTERS[:ndim]
    return Subscripts(
        weight=letters,
        a=letters[:-1] + _RANK,
        b=_RANK + letters[-1],
        rank=_RANK,
        features=letters[-1],
    )


# Output templates: the output's axes, a weight letter where the axis is a weight
# feature and '.' where it comes from the input only.


def dot_general_output(sub: Subscripts, ndim: int) -> str:
    """``dot_general`` outputs batch axes, then the input's free axes, then the weight's."""
    batch = "".join(c for c in sub.a if c in sub.b and c != sub.rank)
    remaining = sub.b[sub.b.index(sub.rank) + 1 :]
    return batch + "." * (ndim - len(batch) - len(remaining)) + remaining


def einsum_output(sub: Subscripts, output: str) -> str:
    """The einsum's output subscripts (ellipses expanded), input-only letters as ``'.'``."""
    return "".join(c if c in sub.features else "." for c in output)


def conv_output(sub: Subscripts, ndim: int) -> str:
    """A convolution (features last, as adapters require) outputs its features last."""
    return "." * (ndim - 1) + sub.features


# The maths.


def delta(
    sub: Subscripts, a: jax.Array, b: jax.Array, weight_shape: tuple[int, ...]
) -> Float[Array, "*weight"]:
    """``A @ B`` in the weight's own layout.

    Example:
        >>> sub = dot_general_subscripts(2, contracting=(1,), batch=())
        >>> delta(sub, jnp.ones((3, 2)), jnp.ones((2, 5)), (5, 3)).shape
        (5, 3)
    """
    a, b = sub.views(a, b, weight_shape)
    return jnp.einsum(f"{sub.a},{sub.b}->{sub.weight}", a, b, precision=_HIGHEST)


def _summed(sub: Subscripts, x: str, y: str, keep: str) -> str:
    """The letters of ``x`` and ``y`` left after summing those in both and not in ``keep``."""
    return "".join(c for c in dict.fromkeys(x + y) if not (c in x and c in y and c not in keep))


#: Below this fraction of ``||w||^2``, the expanded square of :func:`feature_norms` has
#: lost more than 2 bits to cancellation, and the norm is computed directly instead.
CANCELLATION = 0.25


def feature_norms(
    sub: Subscripts, weight: jax.Array, a: jax.Array, b: jax.Array, scale: float
) -> Float[Array, "*features"]:
    """``||W + scale * A @ B||`` per output feature, over the contracting axes, in float32.

    Computed as ``sqrt(||w||^2 + 2 scale <w, A b> + scale^2 ||A b||^2)`` per
    feature column ``w`` (with ``b`` its column of ``B``): contracting ``W``
    with ``A`` first costs ``rank`` times the weight's size and never builds a
    weight-sized array, and ``A^T A`` is ``rank x rank``. That sum cancels when
    the adapted column is much shorter than ``w`` (its float32 error grows like
    ``||w||^2 / ||w + scale A b||^2``), so where any feature's square falls below
    :data:`CANCELLATION` times ``||w||^2``, the norms are those of the
    materialised ``W + scale * A @ B`` instead (a ``lax.cond``: only then is it built).
    """
    w, k = sub.weight, sub.features
    r2 = next(c for c in string.ascii_letters if c not in w + sub.a + sub.b)  # a second rank
    weight = weight.astype(jnp.float32)
    a, b = (x.astype(jnp.float32) for x in sub.views(a, b, weight.shape))
    squares = jnp.einsum(f"{w},{w}->{k}", weight, weight, precision=_HIGHEST)
    wa = _summed(sub, w, sub.a, keep=k + sub.b)
    projected = jnp.einsum(f"{w},{sub.a}->{wa}", weight, a, precision=_HIGHEST)
    cross = jnp.einsum(f"{wa},{sub.b}->{k}", projected, b, precision=_HIGHEST)
    a2, b2 = sub.a.replace(sub.rank, r2), sub.b.replace(sub.rank, r2)
    aa = _summed(sub, sub.a, a2, keep=k + sub.b + b2)
    gram = jnp.einsum(f"{sub.a},{a2}->{aa}", a, a, precision=_HIGHEST)
    quadratic = jnp.einsum(f"{aa},{sub.b},{b2}->{k}", gram, b, b, precision=_HIGHEST)
    expanded = squares + 2 * scale * cross + scale**2 * quadratic

    def direct() -> jax.Array:
        delta = jnp.einsum(f"{sub.a},{sub.b}->{w}", a, b, precision=_HIGHEST)
        return exact_feature_norms(sub, weight + scale * delta)

    def from_expansion() -> jax.Array:
        return jnp.sqrt(jnp.maximum(expanded, 0.0))

    cancels = jnp.any(expanded < CANCELLATION * squares)
    return jax.lax.cond(cancels, direct, from_expansion)


def exact_feature_norms(sub: Subscripts, weight: jax.Array) -> Float[Array, "*features"]:
    """``||W||`` per output feature, over the contracting axes, of a materialised weight."""
    weight = weight.astype(jnp.float32)
    return jnp.sqrt(
        jnp.einsum(f"{sub.weight},{sub.weight}->{sub.features}", weight, weight, precision=_HIGHEST)
    )


def to_output(g: jax.Array, sub: Subscripts, template: str) -> jax.Array:
    """A per-feature array laid out to broadcast against an output with ``template`` axes."""
    order = [c for c in template if c != "."]
    moved = jnp.transpose(g, [sub.features.index(c) for c in order])
    sizes = dict(zip(order, moved.shape, strict=True))
    return moved.reshape(tuple(sizes.get(c, 1) for c in template))


def to_weight(g: jax.Array, sub: Subscripts) -> jax.Array:
    """A per-feature array laid out to broadcast against the weight (size 1 where contracted)."""
    sizes = dict(zip(sub.features, g.shape, strict=True))
    return g.reshape(tuple(sizes.get(c, 1) for c in sub.weight))


def _groups(sub: Subscripts) -> tuple[str, str, str]:
    """Letters shared by ``A`` and ``B`` (batch), ``A``'s own, ``B``'s own (rank aside)."""
    shared = "".join(c for c in sub.a if c in sub.b and c != sub.rank)
    own_a = "".join(c for c in sub.a if c not in shared and c != sub.rank)
    own_b = "".join(c for c in sub.b if c not in shared and c != sub.rank)
    return shared, own_a, own_b


def factor_matrix(sub: Subscripts, weight: jax.Array) -> Float[Array, "g p q"]:
    """The weight as the batch of matrices that ``A @ B`` is: ``(batch, A's axes, B's axes)``.

    Example:
        >>> sub = einsum_subscripts("btd,dr,rnh->btnh", "dnh", "btnh")
        >>> factor_matrix(sub, jnp.ones((8, 2, 3))).shape
        (1, 8, 6)
    """
    shared, own_a, own_b = _groups(sub)
    sizes = dict(zip(sub.weight, weight.shape, strict=True))
    moved = jnp.einsum(f"{sub.weight}->{shared + own_a + own_b}", weight)
    return moved.reshape(tuple(math.prod(sizes[c] for c in g) for g in (shared, own_a, own_b)))


def factors_from_matrices(
    sub: Subscripts,
    a: Float[Array, "g p r"],
    b: Float[Array, "g r q"],
    weight_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    """The inverse of :func:`factor_matrix` for the factors: ``A`` and ``B`` in Qwix's shapes."""
    shared, own_a, own_b = _groups(sub)
    sizes = sub.sizes(weight_shape, a.shape[-1])
    a = a.reshape(tuple(sizes[c] for c in shared + own_a + sub.rank))
    b = b.reshape(tuple(sizes[c] for c in shared + sub.rank + own_b))
    a = jnp.einsum(f"{shared + own_a + sub.rank}->{sub.a}", a)
    b = jnp.einsum(f"{shared + sub.rank + own_b}->{sub.b}", b)
    return a.reshape(a_shape), b.reshape(b_shape)
