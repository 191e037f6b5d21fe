"""`PeftModel`: an NNX module wrapping any NNX model with LoRA adapters."""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from nnx_peft._config import LoraConfig
from nnx_peft._errors import (
    AlreadyWrappedError,
    ConfigError,
    NotAModuleError,
    NothingTrainableError,
    RngsError,
    SampleInputsError,
)
from nnx_peft._injection import AdapterInfo, inject, iter_adapters
from nnx_peft._qwix_bridge import is_qwix_wrapped
from nnx_peft._summary import ParameterSummary, summarize
from nnx_peft._variables import AdapterParam


class PeftModel(nnx.Module):
    """Any Flax NNX model with LoRA adapters injected through Qwix.

    The wrapper holds an adapted *clone* of ``base_model`` in ``self.model``.
    The clone has new module and variable objects that share the base model's
    (immutable) ``jax.Array`` buffers, so wrapping costs no extra memory for
    the base weights, and ``base_model`` itself stays exactly as it was: same
    class, same attributes, same outputs. Training replaces arrays inside the
    wrapper only. Two consequences worth knowing: to free the base weights'
    memory (say, after a QLoRA wrap quantized them), drop your own reference
    to ``base_model``; and donating the wrapper's *frozen* arrays to a jitted
    function (``donate_argnums``) invalidates them in ``base_model`` too, so
    donate only the trainable state and the optimizer state.

    Qwix intercepts ``__call__`` of the clone. Calling any other method of
    ``self.model`` runs without adapters.

    Args:
        base_model: The model to adapt, any ``nnx.Module``.
        config: What to adapt and how.
        *sample_args: Positional inputs for one sample call of
            ``base_model(*sample_args, **sample_kwargs)``; adapters are created
            during that call. Only shapes and dtypes matter; a batch of one is enough.
        rngs: Random state for the adapter initialisation (and dropout). Required:
            nnx_peft never falls back to a fixed seed.
        **sample_kwargs: Keyword inputs for the sample call.

    Raises:
        NotAModuleError: ``base_model`` is not an ``nnx.Module``.
        AlreadyWrappedError: ``base_model`` already has adapters.
        RngsError: ``rngs`` is not an ``nnx.Rngs``.
        SampleInputsError: No sample inputs were given.
        TargetNotFoundError: A target pattern matches no module.
        NoAdapterCreatedError: A target pattern matched modules that got no adapter.
        QuantizationError: QLoRA settings do not fit a targeted weight.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import nnx_peft
        >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
        >>> model(jnp.ones((2, 4))).shape
        (2, 3)
        >>> [info.module_path for info in model.adapters()]
        ['']
    """

    def __init__(
        self,
        base_model: nnx.Module,
        config: LoraConfig,
        *sample_args: Any,
        rngs: nnx.Rngs,
        **sample_kwargs: Any,
    ) -> None:
        if not isinstance(base_model, nnx.Module):
            raise NotAModuleError(
                f"PeftModel wraps Flax NNX modules; got {type(base_model).__module__}."
                f"{type(base_model).__qualname__}. Build the model with flax.nnx (a Linen "
                "module can be bridged with flax.nnx.bridge.ToNNX)."
            )
        if isinstance(base_model, PeftModel) or is_qwix_wrapped(base_model) or any(
            True for _ in iter_adapters(base_model)
        ):
            raise AlreadyWrappedError(
                f"The model ({type(base_model).__qualname__}) already has LoRA adapters. "
                "Wrap the original base model instead, or use the existing PeftModel "
                "(merge_and_unload() gives a plain model to wrap again)."
            )
        if not isinstance(config, LoraConfig):
            raise ConfigError(
                f"config must be an nnx_peft.LoraConfig; got {type(config).__qualname__}. "
                "Example: nnx_peft.LoraConfig(rank=8, alpha=16.0, target=r'.*(q_proj|v_proj)')."
            )
        if not isinstance(rngs, nnx.Rngs):
            raise RngsError(
                f"rngs must be an nnx.Rngs; got {type(rngs).__qualname__}. Pass "
                "rngs=nnx.Rngs(seed) to initialise the adapters (there is no default seed)."
            )
        if not sample_args and not sample_kwargs:
            raise SampleInputsError(
                "PeftModel needs sample inputs for one call of the base model, during "
                "which the adapters are created: PeftModel(base_model, config, x, rngs=...) "
                "with x shaped like a real batch (a batch of one is enough)."
            )
        self.config = config
        self.model = inject(base_model, config, sample_args, sample_kwargs, rngs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the adapted model."""
        return self.model(*args, **kwargs)

    @property
    def trainable_filter(self) -> nnx.filterlib.Filter:
        """An NNX filter selecting exactly the trainable variables (the adapters).

        Use it wherever NNX takes a filter: ``nnx.state(model, f)``,
        ``nnx.DiffState(0, f)`` for gradients, ``nnx.Optimizer(..., wrt=f)``.
        Do not use ``nnx.Param`` or ``nnx.LoRAParam`` for this: adapters are
        ``nnx.Param`` subclasses, and ``nnx.Param`` selects the base weights too.
        """
        return AdapterParam

    def adapters(self) -> list[AdapterInfo]:
        """Every adapted weight: module path (relative to ``self.model``), name and shapes."""
        return list(iter_adapters(self.model))

    def make_optimizer(self, tx: optax.GradientTransformation) -> nnx.Optimizer:
        """An ``nnx.Optimizer`` whose state covers the trainable variables only.

        Args:
            tx: Any optax transformation, e.g. ``optax.adamw(1e-4)``.

        Returns:
            ``nnx.Optimizer(self, tx, wrt=self.trainable_filter)``. Update it with
            gradients taken w.r.t. ``self.trainable_filter``.

        Raises:
            NothingTrainableError: The model has no trainable variable.
        """
        if not nnx.state(self, self.trainable_filter):
            raise NothingTrainableError(
                "make_optimizer found no trainable variable in this PeftModel (no "
                "AdapterParam left, e.g. after nnx.pop). Optimising nothing is almost "
                "certainly a mistake: wrap the base model again to get fresh adapters."
            )
        return nnx.Optimizer(self, tx, wrt=self.trainable_filter)

    def split_trainable(self) -> tuple[nnx.GraphDef[PeftModel], nnx.State, nnx.State]:
        """Splits the model into graph definition, trainable state and the rest.

        The rest holds everything that is not trained: frozen base weights,
        quantized weights, batch statistics, RNG state. ``nnx_peft.merge`` of
        the three gives back an equal model.

        Returns:
            ``(graphdef, trainable, rest)``.
        """
        return nnx.split(self, self.trainable_filter, ...)

    def trainable_parameters(self) -> ParameterSummary:
        """Trainable and total parameter counts, with one entry per adapted weight."""
        return summarize(self.model, self.config, self.trainable_filter)

    def print_trainable_parameters(self) -> None:
        """Prints the per-target table and the trainable fraction."""
        print(self.trainable_parameters().format())


def merge(graphdef: nnx.GraphDef[PeftModel], trainable: nnx.State, rest: nnx.State) -> PeftModel:
    """Rebuilds a :class:`PeftModel` from :meth:`PeftModel.split_trainable` output.

    The exact inverse of ``split_trainable``: same variables, same outputs. Use
    it inside a pure ``jax.jit`` step to call the model on the current
    trainable state.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import nnx_peft
        >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> config = nnx_peft.LoraConfig(rank=2, alpha=4.0, target=".*")
        >>> model = nnx_peft.PeftModel(base, config, jnp.ones((1, 4)), rngs=nnx.Rngs(1))
        >>> graphdef, trainable, rest = model.split_trainable()
        >>> same = nnx_peft.merge(graphdef, trainable, rest)
        >>> bool((same(jnp.ones((1, 4))) == model(jnp.ones((1, 4)))).all())
        True
    """
    return nnx.merge(graphdef, trainable, rest)
