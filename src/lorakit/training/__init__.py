"""Fine-tuning on top of the lorakit core: data, batches, the loop, checkpoints."""

from .config import TrainConfig, load_yaml
from .data import DataError
from .loop import TrainingError
from .text import TrainResult, fit, train

__all__ = ["DataError", "TrainConfig", "TrainResult", "TrainingError", "fit", "load_yaml", "train"]
