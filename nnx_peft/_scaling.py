"""How an adapter's ``alpha`` and ``rank`` become the factor of its update.

Plain arithmetic, with no JAX: :class:`~nnx_peft.LoraConfig` reports its ``scale`` from
here, and the variants (:mod:`nnx_peft._variants`) scale each adapter's update with it.
"""

from __future__ import annotations

import abc
import dataclasses
import math


class Scaling(abc.ABC):
    """Turns an adapter's ``alpha`` and ``rank`` into the factor of its update."""

    @abc.abstractmethod
    def __call__(self, alpha: float, rank: int) -> float:
        """The factor of the update."""


@dataclasses.dataclass(frozen=True)
class LoraScaling(Scaling):
    """``alpha / rank``, as in the LoRA paper."""

    def __call__(self, alpha: float, rank: int) -> float:
        return alpha / rank


@dataclasses.dataclass(frozen=True)
class RankStabilizedScaling(Scaling):
    """``alpha / sqrt(rank)``: rsLoRA (Kalajdzievski, 2023), stable across ranks."""

    def __call__(self, alpha: float, rank: int) -> float:
        return alpha / math.sqrt(rank)


def scaling(use_rslora: bool) -> Scaling:
    """The scaling ``LoraConfig.use_rslora`` asks for."""
    return RankStabilizedScaling() if use_rslora else LoraScaling()
