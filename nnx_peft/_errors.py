"""Error types nnx_peft raises.

Every error subclasses :class:`PeftError`, so ``except nnx_peft.PeftError``
catches them all, and also the built-in type callers already catch for that
kind of mistake (``ValueError`` for bad values, ``TypeError`` for bad types).
Messages say what was expected, what was received and what to do.
"""

from __future__ import annotations


class PeftError(Exception):
    """Base class of every error nnx_peft raises."""


class ConfigError(PeftError, ValueError):
    """A configuration field holds a value nnx_peft cannot use."""


class NotAModuleError(PeftError, TypeError):
    """The object to wrap is not a Flax NNX module."""


class AlreadyWrappedError(PeftError, ValueError):
    """The model to wrap already carries adapters (from nnx_peft or Qwix)."""


class RngsError(PeftError, TypeError):
    """``rngs`` is missing or is not an ``nnx.Rngs``."""


class SampleInputsError(PeftError, ValueError):
    """No sample inputs were given, so adapters cannot be created."""


class TargetNotFoundError(PeftError, ValueError):
    """A ``target`` pattern matches no module path of the model."""


class NoAdapterCreatedError(PeftError, ValueError):
    """A ``target`` pattern matches modules, but none of them got an adapter."""


class UnsupportedLayerError(PeftError, ValueError):
    """A targeted module computes in a way nnx_peft cannot adapt."""


class QuantizationError(PeftError, ValueError):
    """The QLoRA settings do not fit a targeted weight."""


class NothingTrainableError(PeftError, ValueError):
    """The model has no trainable variable to optimise."""
