"""How an adapter's factors start (``LoraConfig.init``), as strategies.

An :class:`Initializer` gives, for one new adapter, the initializers of ``A``
and ``B`` (called by Qwix's parameter creation with one RNG key each, so the
default draws exactly what Qwix draws) and, when it starts from the weight
itself, the residual that replaces the weight:

- ``'default'``: ``A`` He-uniform (Qwix's default), ``B`` zero;
- ``'gaussian'``: ``A`` normal with standard deviation ``1 / rank`` (HF PEFT's
  ``init_lora_weights='gaussian'``), ``B`` zero;
- ``'pissa'`` (Meng et al., 2024): ``A`` and ``B`` span the weight's ``rank``
  principal singular directions, ``scale * A @ B = U_r S_r V_r^T``, and the
  weight becomes the residual ``W - scale * A @ B``;
- ``'olora'`` (Büyükakyüz, 2024): from the QR decomposition of the weight,
  ``B`` holds ``rank`` orthonormal output directions and ``A`` their
  coefficients, and the weight becomes ``W - scale * A @ B``.

The weight is factored as the (batched) matrix ``A @ B`` is laid out in
(``_factors.factor_matrix``), so every layout works the same way. PiSSA and
OLoRA are deterministic functions of the weight: a checkpoint reloaded onto
the same base weights recomputes the same residual before loading ``A`` and
``B`` (see ``docs/variants.md``).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnx_peft import _factors
from nnx_peft._errors import UnsupportedLayerError
from nnx_peft._factors import Subscripts

#: ``(key, shape, dtype) -> array``, the signature of ``jax.nn.initializers``.
InitFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Start:
    """How one new adapter starts.

    Attributes:
        a: Initializer of ``A``.
        b: Initializer of ``B``.
        residual: The value replacing the weight (``W - scale * A @ B``), or
            ``None`` when the weight is kept.
    """

    a: InitFn
    b: InitFn
    residual: jax.Array | None = None


class Initializer(abc.ABC):
    """How ``A`` and ``B`` start; instances are frozen and hashable."""

    #: The ``LoraConfig.init`` value.
    name: str = ""
    #: Whether :meth:`start` reads the weight and returns a residual for it.
    replaces_weight: bool = False

    @abc.abstractmethod
    def start(
        self,
        *,
        sub: Subscripts,
        weight: Callable[[], jax.Array],
        rank: int,
        scale: float,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        where: str,
    ) -> Start:
        """The initializers of a new adapter (and the weight's residual).

        Args:
            sub: The adapter's subscripts.
            weight: Returns the stored weight (only called when ``replaces_weight``).
            rank: The adapter's rank.
            scale: The update's factor.
            a_shape: Shape of ``A``.
            b_shape: Shape of ``B``.
            where: The module path and weight, for error messages.
        """


# Random starts, drawn flat. JAX lays its counter-based random bits out in row-major
# order, and its initializers transform each bit pattern on its own (elementwise), so
# drawing prod(shape) values and reshaping gives exactly the array a draw of `shape`
# gives, on every JAX version tested (the formulas changed, the layout did not;
# tests/test_qwix_bridge.py compares with Qwix's own adapters bit for bit). Wrapping
# compiles one draw per distinct size instead of per shape, and a 1-D draw compiles
# several times faster on CPU than a 3-D one (0.16 s against 0.85 s for an einsum
# adapter's (8, 64, 16) A).


def he_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """``jax.nn.initializers.he_uniform()(key, shape, dtype)``, drawn flat.

    Example:
        >>> key, reference = jax.random.key(0), jax.nn.initializers.he_uniform()
        >>> bool((he_uniform(key, (2, 3, 4)) == reference(key, (2, 3, 4))).all())
        True
    """
    receptive_field = math.prod(shape) / shape[-2] / shape[-1]
    variance = jnp.array(2.0 / (shape[-2] * receptive_field), dtype=dtype)
    values = jax.random.uniform(key, (math.prod(shape),), dtype, -1).reshape(shape)
    return values * jnp.sqrt(3 * variance)


def normal(
    key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32, *, stddev: float
) -> jax.Array:
    """``jax.nn.initializers.normal(stddev)(key, shape, dtype)``, drawn flat.

    JAX's own initializer draws the flat array, so this follows however the
    installed JAX computes it (JAX 0.12 scales ``erf_inv`` of uniform bits, where
    earlier versions scaled ``jax.random.normal``; the roundings differ).
    """
    return jax.nn.initializers.normal(stddev)(key, (math.prod(shape),), dtype).reshape(shape)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Zeros, put on the device from the host (nothing to compile per shape)."""
    del key
    return jnp.asarray(np.zeros(shape, dtype))


@dataclasses.dataclass(frozen=True)
class RandomInit(Initializer):
    """``A`` He-uniform (Qwix's default), ``B`` zero: a fresh adapter changes nothing."""

    name: str = "default"

    def start(self, **_: Any) -> Start:
        return Start(a=he_uniform, b=zeros)


@dataclasses.dataclass(frozen=True)
class GaussianInit(Initializer):
    """``A`` normal with standard deviation ``1 / rank``, ``B`` zero."""

    name: str = "gaussian"

    def start(self, *, rank: int, **_: Any) -> Start:
        return Start(a=functools.partial(normal, stddev=1.0 / rank), b=zeros)


class _FromWeight(Initializer):
    """Factors computed from the weight; the weight becomes ``W - scale * A @ B``."""

    replaces_weight = True

    @abc.abstractmethod
    def factor(self, matrix: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
        """``A`` ``(g, p, rank)`` and ``B`` ``(g, rank, q)`` from float32 matrices ``(g, p, q)``."""

    def start(
        self,
        *,
        sub: Subscripts,
        weight: Callable[[], jax.Array],
        rank: int,
        scale: float,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        where: str,
    ) -> Start:
        w = weight()
        _, p, q = jax.eval_shape(lambda w: _factors.factor_matrix(sub, w), w).shape
        if rank > min(p, q):
            raise UnsupportedLayerError(
                f"LoraConfig.init={self.name!r} needs rank <= {min(p, q)} for {where}, whose "
                f"weight {tuple(w.shape)} is factored as {p} x {q} matrices; its rank is "
                f"{rank}. Lower it for this module with LoraConfig.rank_pattern, or exclude "
                "the module."
            )
        a, b, residual = _start(self, sub, rank, a_shape, b_shape, w, scale)

        def constant(value: jax.Array) -> InitFn:
            def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
                del key
                assert tuple(shape) == value.shape, (shape, value.shape)
                return value.astype(dtype)

            return init

        return Start(a=constant(a), b=constant(b), residual=residual)


@dataclasses.dataclass(frozen=True)
class PissaInit(_FromWeight):
    """PiSSA: ``A = U_r sqrt(S_r / scale)``, ``B = sqrt(S_r / scale) V_r^T``."""

    name: str = "pissa"

    def factor(self, matrix: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
        u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
        root = jnp.sqrt(s[..., :rank] / scale)
        return u[..., :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


@dataclasses.dataclass(frozen=True)
class OloraInit(_FromWeight):
    """OLoRA: ``M^T = Q R``; ``B = Q_r^T`` (orthonormal rows), ``A = R_r^T``.

    As in HF PEFT, the factors are not divided by ``scale``; the residual
    absorbs whatever ``scale * A @ B`` is.
    """

    name: str = "olora"

    def factor(self, matrix: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
        q, r = jnp.linalg.qr(jnp.swapaxes(matrix, -1, -2))
        return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _start(
    init: _FromWeight,
    sub: Subscripts,
    rank: int,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    w: jax.Array,
    scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``A``, ``B`` (in ``w``'s dtype) and the residual ``W - scale * A @ B``, compiled once
    per layout and shapes."""
    a, b = init.factor(_factors.factor_matrix(sub, w.astype(jnp.float32)), rank, scale)
    a, b = _factors.factors_from_matrices(sub, a, b, tuple(w.shape), a_shape, b_shape)
    # The residual subtracts the factors as stored (rounded to the weight's dtype),
    # so the fresh adapted layer computes the weight as closely as it can.
    a, b = a.astype(w.dtype), b.astype(w.dtype)
    delta = _factors.delta(sub, a.astype(jnp.float32), b.astype(jnp.float32), tuple(w.shape))
    return a, b, (w.astype(jnp.float32) - scale * delta).astype(w.dtype)


_INITIALIZERS: dict[str, Initializer] = {
    init.name: init for init in (RandomInit(), GaussianInit(), PissaInit(), OloraInit())
}


def initializer(name: str) -> Initializer:
    """The initializer of ``LoraConfig.init`` (validated there)."""
    return _INITIALIZERS[name]
