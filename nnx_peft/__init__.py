"""nnx_peft: LoRA-family fine-tuning for any Flax NNX model, on top of Qwix."""

from nnx_peft._adapter import AdapterInfo as AdapterInfo
from nnx_peft._adapter import OfAdapters as OfAdapters
from nnx_peft._config import INIT_METHODS as INIT_METHODS
from nnx_peft._config import WEIGHT_QTYPES as WEIGHT_QTYPES
from nnx_peft._config import LoraConfig as LoraConfig
from nnx_peft._errors import AdapterIdsError as AdapterIdsError
from nnx_peft._errors import AdapterNameError as AdapterNameError
from nnx_peft._errors import AdapterStateError as AdapterStateError
from nnx_peft._errors import AddedAdapterError as AddedAdapterError
from nnx_peft._errors import AlreadyWrappedError as AlreadyWrappedError
from nnx_peft._errors import BaseWeightsMismatchError as BaseWeightsMismatchError
from nnx_peft._errors import CheckpointExistsError as CheckpointExistsError
from nnx_peft._errors import CheckpointMismatchError as CheckpointMismatchError
from nnx_peft._errors import ConcurrentSaveError as ConcurrentSaveError
from nnx_peft._errors import ConfigError as ConfigError
from nnx_peft._errors import ConfigMismatchError as ConfigMismatchError
from nnx_peft._errors import CorruptCheckpointError as CorruptCheckpointError
from nnx_peft._errors import DtypeError as DtypeError
from nnx_peft._errors import FusedWeightError as FusedWeightError
from nnx_peft._errors import HfConfigError as HfConfigError
from nnx_peft._errors import HfShapeError as HfShapeError
from nnx_peft._errors import HfTensorPlacementError as HfTensorPlacementError
from nnx_peft._errors import LayerStackError as LayerStackError
from nnx_peft._errors import MissingDependencyError as MissingDependencyError
from nnx_peft._errors import NeedsBaseWeightsError as NeedsBaseWeightsError
from nnx_peft._errors import NoAdapterCreatedError as NoAdapterCreatedError
from nnx_peft._errors import NotACheckpointError as NotACheckpointError
from nnx_peft._errors import NotAModuleError as NotAModuleError
from nnx_peft._errors import NothingTrainableError as NothingTrainableError
from nnx_peft._errors import OptimizerError as OptimizerError
from nnx_peft._errors import PeftError as PeftError
from nnx_peft._errors import QuantizationError as QuantizationError
from nnx_peft._errors import RngsError as RngsError
from nnx_peft._errors import SampleInputsError as SampleInputsError
from nnx_peft._errors import SampleShapeError as SampleShapeError
from nnx_peft._errors import ScannedCheckpointError as ScannedCheckpointError
from nnx_peft._errors import ShardingError as ShardingError
from nnx_peft._errors import StackedPatternError as StackedPatternError
from nnx_peft._errors import StepError as StepError
from nnx_peft._errors import TargetNotFoundError as TargetNotFoundError
from nnx_peft._errors import TileSizeError as TileSizeError
from nnx_peft._errors import UnmergeableAdapterError as UnmergeableAdapterError
from nnx_peft._errors import UnreachedTargetError as UnreachedTargetError
from nnx_peft._errors import UnsupportedLayerError as UnsupportedLayerError
from nnx_peft._errors import UnsupportedPeftFieldError as UnsupportedPeftFieldError
from nnx_peft._errors import WeightedAdapterError as WeightedAdapterError
from nnx_peft._peft_model import PeftModel as PeftModel
from nnx_peft._peft_model import merge as merge
from nnx_peft._planning import bytes_per_device as bytes_per_device
from nnx_peft._summary import ParameterSummary as ParameterSummary
from nnx_peft._targeting import ModuleTarget as ModuleTarget
from nnx_peft._targeting import TargetReport as TargetReport
from nnx_peft._targeting import inspect_targets as inspect_targets
from nnx_peft._variables import FROZEN_PARAMS as FROZEN_PARAMS
from nnx_peft._variables import AdapterParam as AdapterParam
from nnx_peft._variables import SavedParam as SavedParam

__version__ = "0.1.0"

__all__ = [
    "FROZEN_PARAMS",
    "INIT_METHODS",
    "WEIGHT_QTYPES",
    "AdapterIdsError",
    "AdapterInfo",
    "AdapterNameError",
    "AdapterParam",
    "AdapterStateError",
    "AddedAdapterError",
    "AlreadyWrappedError",
    "BaseWeightsMismatchError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "ConcurrentSaveError",
    "ConfigError",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "DtypeError",
    "FusedWeightError",
    "HfConfigError",
    "HfShapeError",
    "HfTensorPlacementError",
    "LayerStackError",
    "LoraConfig",
    "MissingDependencyError",
    "ModuleTarget",
    "NeedsBaseWeightsError",
    "NoAdapterCreatedError",
    "NotACheckpointError",
    "NotAModuleError",
    "NothingTrainableError",
    "OfAdapters",
    "OptimizerError",
    "ParameterSummary",
    "PeftError",
    "PeftModel",
    "QuantizationError",
    "RngsError",
    "SampleInputsError",
    "SampleShapeError",
    "SavedParam",
    "ScannedCheckpointError",
    "ShardingError",
    "StackedPatternError",
    "StepError",
    "TargetNotFoundError",
    "TargetReport",
    "TileSizeError",
    "UnmergeableAdapterError",
    "UnreachedTargetError",
    "UnsupportedLayerError",
    "UnsupportedPeftFieldError",
    "WeightedAdapterError",
    "bytes_per_device",
    "inspect_targets",
    "merge",
]
