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


class NeedsBaseWeightsError(ConfigError):
    """The config starts trained arrays from the base weights (DoRA, PiSSA, OLoRA,
    ``modules_to_save``), which ``PeftModel.from_base_weights`` reads only after."""


class NotAModuleError(PeftError, TypeError):
    """The object to wrap is not a Flax NNX module."""


class AlreadyWrappedError(PeftError, ValueError):
    """The model to wrap already carries adapters (from nnx_peft or Qwix)."""


class RngsError(PeftError, TypeError):
    """``rngs`` is missing or is not an ``nnx.Rngs``."""


class SampleInputsError(PeftError, ValueError):
    """No sample inputs were given, so adapters cannot be created."""


class SampleShapeError(SampleInputsError):
    """Abstract sample inputs (``jax.ShapeDtypeStruct``) whose shape or dtype the model
    cannot take."""


class TargetNotFoundError(PeftError, ValueError):
    """A ``target`` pattern matches no module path of the model."""


class NoAdapterCreatedError(PeftError, ValueError):
    """A ``target`` pattern matches modules, but none of them got an adapter."""


class UnsupportedLayerError(PeftError, ValueError):
    """A targeted module computes in a way nnx_peft cannot adapt."""


class UnreachedTargetError(PeftError, ValueError):
    """A targeted module would get its adapter only after wrapping: the sample call missed it.

    Raised at wrap time for targeted modules owning a weight that the sample
    call did not reach and whose shapes nnx_peft cannot know without a call,
    and at call time when a call after wrapping would create an adapter.
    """


class QuantizationError(PeftError, ValueError):
    """The QLoRA settings do not fit a targeted weight."""


class TileSizeError(QuantizationError):
    """``LoraConfig.tile_size`` does not divide the tiled axis of a targeted weight."""


class NothingTrainableError(PeftError, ValueError):
    """The model has no trainable variable to optimise."""


class AdapterStateError(PeftError, ValueError):
    """The adapters are merged, unmerged or disabled, and the operation needs another state."""


class AdapterNameError(PeftError, ValueError):
    """An adapter name is unknown, taken already, or not a valid name."""


class AddedAdapterError(ConfigError):
    """An adapter to add (``PeftModel.add_adapter``) cannot share the model with the others:
    its config, or theirs, asks for something several adapters cannot share."""


class WeightedAdapterError(PeftError, ValueError):
    """Adapters cannot be combined as asked (``PeftModel.add_weighted_adapter``): an unknown
    combination type, weights that do not fit, or adapters that type cannot combine."""


class AdapterIdsError(PeftError, ValueError):
    """A call with one adapter per example (``adapter_ids``) that cannot be served: ids of
    the wrong shape or out of range, or an adapter such a call cannot batch."""


class OptimizerError(PeftError, TypeError):
    """A training checkpoint is saved or restored without an ``nnx.Optimizer``."""


class UnmergeableAdapterError(PeftError, ValueError):
    """An adapter's update cannot be folded exactly into its base weight."""


class DtypeError(PeftError, TypeError):
    """A ``dtype`` argument is not a floating-point dtype."""


class CheckpointExistsError(PeftError, ValueError):
    """Saving would replace an existing checkpoint (without ``overwrite=True``) or other files."""


class ConcurrentSaveError(CheckpointExistsError):
    """Another process (or thread) is saving to the same checkpoint path at this moment."""


class NotACheckpointError(PeftError, ValueError):
    """The path holds no adapter checkpoint this nnx_peft can read."""


class StepError(PeftError, TypeError):
    """A checkpoint ``step`` argument is not a whole number (or ``None``)."""


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


class BaseWeightsMismatchError(CheckpointMismatchError):
    """Base weights on disk that do not fit the abstract base model: a name missing or
    unexpected, or another shape or dtype (``PeftModel.from_base_weights``)."""


class ConfigMismatchError(PeftError, ValueError):
    """A checkpoint's ``LoraConfig`` differs from the wrapper's, or does not fit the base model."""


class MissingDependencyError(PeftError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


class ShardingError(PeftError, ValueError):
    """Adapter shardings that do not fit the mesh or the adapters.

    Raised by :meth:`PeftModel.shard_adapters` for rules that are malformed, match
    no adapter, or do not fit it (an axis the mesh lacks, a dimension the mesh
    axes do not divide).
    """


class HfConfigError(PeftError, ValueError):
    """A Hugging Face PEFT folder has no readable, valid ``adapter_config.json``."""


class UnsupportedPeftFieldError(PeftError, ValueError):
    """A Hugging Face PEFT config or adapter uses a feature nnx_peft cannot reproduce exactly.

    For example ``fan_in_fan_out=True``, ``bias != 'none'``, ``layers_to_transform``,
    a ``peft_type`` other than ``'LORA'``, or LoRA on embeddings.
    """


class HfTensorPlacementError(PeftError, ValueError):
    """``module_map`` places a PEFT tensor on no module of the model, or an adapter on no name."""


class HfShapeError(PeftError, ValueError):
    """A PEFT tensor's shape does not fit the NNX weight it is mapped to (another model size)."""


class FusedWeightError(PeftError, ValueError):
    """An NNX weight has no exact counterpart as one Hugging Face ``Linear`` (a fused or
    batched weight such as a ``(2, K, D, H)`` ``kv_einsum``, or a convolution)."""


class LayerStackError(PeftError, ValueError):
    """A module applied inside a scan whose weights are not one stack of equal layers.

    Raised when wrapping: the per-layer weights the scan body sees are not the
    module's weights with one axis (the same for all of them) removed, so no
    layer axis can be told, or when the stack does not fit the adapter (a
    per-layer factor with fewer axes than the layer axis's position).
    """


class StackedPatternError(PeftError, ValueError):
    """A ``rank_pattern`` / ``alpha_pattern`` key names one layer of a stacked (scanned) module.

    The layers of a stack share one module, so they share its rank and alpha:
    a key that picks a layer index would give the stacked module two ranks.
    """


class ScannedCheckpointError(PeftError, ValueError):
    """A checkpoint of stacked (scanned) adapters loaded into a model whose adapters are not
    stacked the same way, or the other way round."""
