"""minke: the DeepSeek-V3/R1 system — model, pretraining, reasoning RL and inference — in one PyTorch package."""

from .config import ConfigError, ModelConfig, preset
from .model.transformer import Output, Transformer, build
from .model.weights import CheckpointError, load, save

__all__ = ["ModelConfig", "ConfigError", "CheckpointError", "preset", "build", "load", "save",
           "Transformer", "Output"]
__version__ = "0.1.0"
