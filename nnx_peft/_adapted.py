"""What the checkpoint and interop functions need of a wrapper.

:mod:`nnx_peft._checkpoint`, :mod:`nnx_peft._safetensors` and :mod:`nnx_peft._hf_peft`
save and load adapters of a :class:`~nnx_peft.PeftModel`, which calls them; they read
only what :class:`Adapted` lists, so they do not import the wrapper they serve (imports
in ``nnx_peft`` point down only). Where they build a wrapper (``from_pretrained``,
``from_hf_peft``) they take the class to build as an argument.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from flax import nnx

from nnx_peft._adapter import AdapterInfo
from nnx_peft._config import LoraConfig


class Adapted(Protocol):
    """A wrapper's adapted model, its config and its adapters (a ``PeftModel`` is one)."""

    model: nnx.Module
    config: LoraConfig

    @property
    def merged(self) -> bool:
        """Whether the adapters are merged into the base weights."""
        ...

    def adapters(self) -> list[AdapterInfo]:
        """Every adapted weight of ``model``."""
        ...


#: A wrapper class that ``from_pretrained`` and ``from_hf_peft`` build and return.
AdaptedT = TypeVar("AdaptedT", bound=Adapted)
