"""Model access: the only package that imports ``transformers``."""

from kvzip.model.loading import (
    DEFAULT_GGUF,
    DEFAULT_MODEL_NAME,
    ModelSource,
    check_architecture,
    resolve_model,
)
from kvzip.model.session import TORCH_DTYPES, ChatTemplate, KVModel, TimedGeneration

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_MODEL_NAME",
    "TORCH_DTYPES",
    "TimedGeneration",
    "ChatTemplate",
    "KVModel",
    "ModelSource",
    "check_architecture",
    "resolve_model",
]
