"""Error types nnx_peft raises.

Every error subclasses :class:`PeftError`, so ``except nnx_peft.PeftError``
catches them all, and also the built-in type callers already catch for that
kind of mistake (``ValueError`` for bad values, ``TypeError`` for bad types,
``ImportError`` for a missing optional dependency).
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


class AdapterStateError(PeftError, ValueError):
    """The adapters are merged, unmerged or disabled, and the operation needs another state."""


class UnmergeableAdapterError(PeftError, ValueError):
    """An adapter's update cannot be folded exactly into its base weight."""


class DtypeError(PeftError, TypeError):
    """A ``dtype`` argument is not a floating-point dtype."""


class CheckpointExistsError(PeftError, ValueError):
    """Saving would replace an existing checkpoint (without ``overwrite=True``) or other files."""


class NotACheckpointError(PeftError, ValueError):
    """The path holds no adapter checkpoint this nnx_peft can read."""


class CorruptCheckpointError(PeftError, ValueError):
    """A checkpoint's files cannot be read or disagree with its own description."""


class CheckpointMismatchError(PeftError, ValueError):
    """A checkpoint's arrays do not fit the model: missing, unexpected or of another shape or dtype.

    Attributes:
        missing: Paths the model has and the checkpoint lacks.
        unexpected: Paths the checkpoint has and the model lacks.
        mismatched: Paths present in both with a different shape or dtype.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class ConfigMismatchError(PeftError, ValueError):
    """A checkpoint's ``LoraConfig`` differs from the wrapper's, or does not fit the base model."""


class MissingDependencyError(PeftError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


class ShardingError(PeftError, ValueError):
    """Adapter shardings that do not fit the mesh or the adapters, or arrays one process cannot see.

    Raised by :meth:`PeftModel.shard_adapters` for rules that are malformed, match
    no adapter, or do not fit it (an axis the mesh lacks, a dimension the mesh
    axes do not divide), and by the safetensors export for arrays spread over
    several hosts.
    """
