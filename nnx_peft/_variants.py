"""LoRA variants as strategies: how the update is scaled, how it enters the output, and the plan.

``LoraConfig``'s booleans and strings are resolved here once, into small
objects with a narrow interface that the Qwix provider, merging and the
summaries call without knowing which variant they hold:

- a :class:`Scaling` turns ``(alpha, rank)`` into the update's factor
  (``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA);
- an :class:`Update` says which extra trained arrays an adapter has, how its
  update enters the matmul's output, and how it folds into the weight (LoRA
  adds it; DoRA also rescales each output feature to a trained magnitude);
- an :class:`~nnx_peft._initializers.Initializer` says how ``A`` and ``B``
  start, and whether the weight is replaced by a residual;
- an :class:`AdapterPlan` gives each module path its :class:`AdapterSpec`
  (rank, alpha and scale from ``rank_pattern`` / ``alpha_pattern``, first
  match wins; the update variant and the initializer).
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from nnx_peft import _factors
from nnx_peft._config import LoraConfig
from nnx_peft._errors import UnsupportedLayerError
from nnx_peft._factors import Subscripts
from nnx_peft._initializers import Initializer, initializer
from nnx_peft._parts import MAGNITUDE_SUFFIX
from nnx_peft._scaling import Scaling, scaling

# One compiled program per layout and shapes (eagerly, each of its einsums would be one).
_feature_norms = jax.jit(_factors.feature_norms, static_argnums=0)


# --- How the update enters the output ------------------------------------------------------


class Update(abc.ABC):
    """How an adapter's update enters its matmul's output, and folds into the weight.

    Instances are frozen and hashable: the provider records the one of each
    adapter in its static ``LoraLayout``.
    """

    #: Short name, shown in summaries and checkpoint descriptions.
    name: str = ""
    #: Attribute suffixes of the trained arrays of :meth:`extra_params`.
    extra_suffixes: ClassVar[tuple[str, ...]] = ()
    #: Whether the variant needs the update as a change of the stored weight.
    needs_delta: ClassVar[bool] = False

    def extra_params(
        self, sub: Subscripts, weight: jax.Array, a: jax.Array, b: jax.Array, scale: float
    ) -> dict[str, tuple[jax.Array, tuple[int, ...]]]:
        """Trained arrays besides ``A`` and ``B``, created with the adapter.

        Returns:
            Per attribute suffix, the initial value (float32) and, per axis of
            it, the weight axis it stands for (for its sharding).
        """
        del sub, weight, a, b, scale
        return {}

    @abc.abstractmethod
    def apply(
        self,
        res: jax.Array,
        update: jax.Array,
        *,
        sub: Subscripts,
        weight: Callable[[], jax.Array],
        a: jax.Array,
        b: jax.Array,
        scale: float,
        extras: Mapping[str, jax.Array],
        template: str,
    ) -> jax.Array:
        """The adapted output.

        Args:
            res: The base matmul's output ``x W``.
            update: The scaled update ``scale * dropout(x) A B``, shaped like ``res``.
            sub: The adapter's subscripts.
            weight: Returns the matmul's weight operand as a float array.
            a: ``A``.
            b: ``B``.
            scale: The update's factor.
            extras: The arrays of :meth:`extra_params` by suffix.
            template: The output's axes (see ``_factors.dot_general_output``).
        """

    @abc.abstractmethod
    def fold(
        self,
        sub: Subscripts,
        weight: jax.Array,
        delta: jax.Array,
        scale: float,
        extras: Mapping[str, jax.Array],
    ) -> jax.Array:
        """The weight that computes :meth:`apply`'s output in one matmul (same dtype as given)."""


@dataclasses.dataclass(frozen=True)
class LoraUpdate(Update):
    """``x W + scale * x A B``: the update is added."""

    name: str = "lora"

    def apply(self, res: jax.Array, update: jax.Array, **_: Any) -> jax.Array:
        return res + update

    def fold(
        self,
        sub: Subscripts,
        weight: jax.Array,
        delta: jax.Array,
        scale: float,
        extras: Mapping[str, jax.Array],
    ) -> jax.Array:
        return weight + scale * delta


@dataclasses.dataclass(frozen=True)
class DoraUpdate(Update):
    """DoRA (Liu et al., 2024): ``(m / ||W + scale A B||_c) * (x W + scale x A B)``.

    ``m`` is a trained magnitude per output feature (``<weight>_lora_magnitude``,
    shaped like the weight without its contracting axes), initialised to
    ``||W + scale A B||_c`` of the fresh adapter, so a fresh adapter changes
    nothing. The norm is taken per output feature over the weight's
    contracting axes (batch axes of a ``dot_general`` or ``einsum`` keep their
    own norms) and treated as a constant when differentiating, as the DoRA
    paper (section 4.3) and HF PEFT do. The base output ``x W`` is computed
    once and the update as in LoRA; the norm costs ``rank`` times the weight's
    size (``_factors.feature_norms``), not a materialised ``W + scale A B``.
    """

    name: str = "dora"
    extra_suffixes: ClassVar[tuple[str, ...]] = (MAGNITUDE_SUFFIX,)
    needs_delta: ClassVar[bool] = True

    def extra_params(
        self, sub: Subscripts, weight: jax.Array, a: jax.Array, b: jax.Array, scale: float
    ) -> dict[str, tuple[jax.Array, tuple[int, ...]]]:
        magnitude = _feature_norms(sub, weight, a, b, scale)
        return {MAGNITUDE_SUFFIX: (magnitude, sub.feature_axes())}

    def _ratio(self, magnitude: jax.Array, norms: jax.Array) -> jax.Array:
        # A zero column has a zero output whatever the ratio; keep it finite.
        return magnitude.astype(jnp.float32) / jnp.where(norms == 0, 1.0, norms)

    def apply(
        self,
        res: jax.Array,
        update: jax.Array,
        *,
        sub: Subscripts,
        weight: Callable[[], jax.Array],
        a: jax.Array,
        b: jax.Array,
        scale: float,
        extras: Mapping[str, jax.Array],
        template: str,
    ) -> jax.Array:
        norms = jax.lax.stop_gradient(_feature_norms(sub, weight(), a, b, scale))
        ratio = self._ratio(extras[MAGNITUDE_SUFFIX], norms)
        return _factors.to_output(ratio, sub, template).astype(res.dtype) * (res + update)

    def fold(
        self,
        sub: Subscripts,
        weight: jax.Array,
        delta: jax.Array,
        scale: float,
        extras: Mapping[str, jax.Array],
    ) -> jax.Array:
        direction = weight + scale * delta
        ratio = self._ratio(extras[MAGNITUDE_SUFFIX], _factors.exact_feature_norms(sub, direction))
        return (_factors.to_weight(ratio, sub) * direction).astype(direction.dtype)


LORA, DORA = LoraUpdate(), DoraUpdate()


# --- The plan: one spec per module path ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Everything that decides one module's adapters.

    Attributes:
        rank: The rank (``rank_pattern`` or ``LoraConfig.rank``).
        alpha: The scaling numerator (``alpha_pattern`` or ``LoraConfig.alpha``).
        scale: The update's factor, from the config's :class:`Scaling`.
        update: How the update enters the output (LoRA or DoRA).
        init: How ``A`` and ``B`` start.
        dtype: The adapters' dtype name, ``None`` for the weight's own.
    """

    rank: int
    alpha: float
    scale: float
    update: Update
    init: Initializer
    dtype: str | None = None


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """Per module path, the :class:`AdapterSpec` of its adapters, resolved from a ``LoraConfig``."""

    rank: int
    alpha: float
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    scaling: Scaling
    update: Update
    init: Initializer
    dtype: str | None = None
    #: Specs already resolved, by path: the plan's own, so it is freed with the plan.
    _specs: dict[str, AdapterSpec] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def from_config(cls, config: LoraConfig) -> AdapterPlan:
        """Resolves ``config``'s flags and names into strategies, once."""
        return cls(
            rank=config.rank,
            alpha=config.alpha,
            rank_pattern=tuple(config.rank_pattern),  # type: ignore[arg-type]
            alpha_pattern=tuple(config.alpha_pattern),  # type: ignore[arg-type]
            scaling=scaling(config.use_rslora),
            update=DORA if config.use_dora else LORA,
            init=initializer(config.init),
            dtype=config.adapter_dtype,
        )

    def spec(self, path: str) -> AdapterSpec:
        """The spec of the module at ``path``: the first matching pattern wins.

        Dropout is not part of it: the Qwix rule carries the rate (``LoraConfig.dropout``).
        """
        if path in self._specs:
            return self._specs[path]
        rank = first_match(self.rank_pattern, path, self.rank)
        alpha = first_match(self.alpha_pattern, path, self.alpha)
        spec = AdapterSpec(
            rank=rank,
            alpha=alpha,
            scale=self.scaling(alpha, rank),
            update=self.update,
            init=self.init,
            dtype=self.dtype,
        )
        self._specs[path] = spec
        return spec


def first_match(pairs: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    """The value of the first ``(regex, value)`` pair whose regex matches ``path`` in full."""
    return next((value for pattern, value in pairs if re.fullmatch(pattern, path)), default)


def check_supported(
    spec: AdapterSpec, *, groups: tuple[int, int], transformed: Callable[[], bool], where: str
) -> None:
    """Refuses variants that need the update as a change of the stored weight where it is not.

    Args:
        spec: The module's spec.
        groups: The convolution's feature and batch group counts (``(1, 1)``
            for any other layout).
        transformed: Whether the module transforms (flips, masks) the weight
            before its matmul; called only when it matters (a transpose is
            followed to the weight, see ``_transposed``).
        where: The weight and its module, for the message.

    Raises:
        UnsupportedLayerError: DoRA, PiSSA or OLoRA on a grouped convolution
            (its update mixes groups, which a grouped kernel cannot express), or
            PiSSA or OLoRA on a transformed weight (the residual would replace
            the stored weight while the update applies to the transform).
    """
    needs = []
    if spec.update.needs_delta:
        needs.append("use_dora=True (it normalises W + scale * A @ B)")
    if spec.init.replaces_weight:
        needs.append(f"init={spec.init.name!r} (it replaces W by W - scale * A @ B)")
    if not needs:
        return
    if groups != (1, 1):
        problem = (
            f"a grouped convolution (feature_group_count={groups[0]}, batch_group_count="
            f"{groups[1]}), whose update is no change of its kernel"
        )
    elif spec.init.replaces_weight and transformed():
        problem = "transformed (flipped or masked) by its module before the matmul"
    else:
        return
    raise UnsupportedLayerError(
        f"LoraConfig {' and '.join(needs)} cannot adapt {where}: it is {problem}. Use plain "
        "LoRA for it, or exclude the module with LoraConfig.exclude."
    )
