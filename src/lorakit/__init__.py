"""lorakit: LoRA adapters for PyTorch models — attach, train, save, merge and serve."""

from .quiet import quiet_third_parties

quiet_third_parties()  # before anything imports torchao

from .attach import (
    AttachError,
    ParameterCount,
    adapters,
    attach,
    delete_adapter,
    disabled,
    set_active,
    trainable_parameters,
)
from .adapter import Adapter, LayerWeights
from .combine import CombineError, combine, compress
from .config import ConfigError, LoraConfig
from .files import (AdapterFileError, export_adapter, import_adapter, install, load_adapter, read_adapter,
                    save_adapter)
from .layers import LoraLayer
from .merge import MergeError, detach, merge, merged_state_dict, unmerge
from .variants import LoraAdapter
from .pipelines import load_pipeline_adapter, save_pipeline_adapter
from .pretrained import load_model, load_tokenizer


def __getattr__(name: str):
    """The trainer loads on first use: ``import lorakit`` brings in no training code."""
    if name in ("TrainConfig", "TrainingError", "train"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Adapter", "CombineError", "LayerWeights", "combine", "compress", "export_adapter", "import_adapter", "install",
    "merged_state_dict", "read_adapter",
    "AdapterFileError", "AttachError", "ConfigError", "LoraAdapter", "LoraConfig", "LoraLayer",
    "MergeError", "ParameterCount", "adapters", "attach", "delete_adapter", "detach", "disabled",
    "load_adapter", "load_pipeline_adapter", "save_pipeline_adapter", "load_model", "load_tokenizer", "merge",
    "save_adapter", "set_active",
    "trainable_parameters", "unmerge", "TrainConfig", "TrainingError", "train",
]
