"""nnx_peft: LoRA-family fine-tuning for any Flax NNX model, on top of Qwix."""

from nnx_peft._config import INIT_METHODS as INIT_METHODS
from nnx_peft._config import WEIGHT_QTYPES as WEIGHT_QTYPES
from nnx_peft._config import LoraConfig as LoraConfig
from nnx_peft._errors import AdapterStateError as AdapterStateError
from nnx_peft._errors import AlreadyWrappedError as AlreadyWrappedError
from nnx_peft._errors import CheckpointExistsError as CheckpointExistsError
from nnx_peft._errors import CheckpointMismatchError as CheckpointMismatchError
from nnx_peft._errors import ConfigError as ConfigError
from nnx_peft._errors import ConfigMismatchError as ConfigMismatchError
from nnx_peft._errors import CorruptCheckpointError as CorruptCheckpointError
from nnx_peft._errors import DtypeError as DtypeError
from nnx_peft._errors import MissingDependencyError as MissingDependencyError
from nnx_peft._errors import NoAdapterCreatedError as NoAdapterCreatedError
from nnx_peft._errors import NotACheckpointError as NotACheckpointError
from nnx_peft._errors import NotAModuleError as NotAModuleError
from nnx_peft._errors import NothingTrainableError as NothingTrainableError
from nnx_peft._errors import PeftError as PeftError
from nnx_peft._errors import QuantizationError as QuantizationError
from nnx_peft._errors import RngsError as RngsError
from nnx_peft._errors import SampleInputsError as SampleInputsError
from nnx_peft._errors import ShardingError as ShardingError
from nnx_peft._errors import TargetNotFoundError as TargetNotFoundError
from nnx_peft._errors import UnmergeableAdapterError as UnmergeableAdapterError
from nnx_peft._errors import UnsupportedLayerError as UnsupportedLayerError
from nnx_peft._injection import AdapterInfo as AdapterInfo
from nnx_peft._peft_model import PeftModel as PeftModel
from nnx_peft._peft_model import merge as merge
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
    "AdapterInfo",
    "AdapterParam",
    "AdapterStateError",
    "AlreadyWrappedError",
    "CheckpointExistsError",
    "CheckpointMismatchError",
    "ConfigError",
    "ConfigMismatchError",
    "CorruptCheckpointError",
    "DtypeError",
    "LoraConfig",
    "MissingDependencyError",
    "ModuleTarget",
    "NoAdapterCreatedError",
    "NotACheckpointError",
    "NotAModuleError",
    "NothingTrainableError",
    "ParameterSummary",
    "PeftError",
    "PeftModel",
    "QuantizationError",
    "RngsError",
    "SampleInputsError",
    "SavedParam",
    "ShardingError",
    "TargetNotFoundError",
    "TargetReport",
    "UnmergeableAdapterError",
    "UnsupportedLayerError",
    "inspect_targets",
    "merge",
]
