"""The model zoo: ONNX-exported causal LLMs run with onnxruntime, tokenizers and numpy alone."""

from __future__ import annotations

from edged.zoo.errors import (
    ContextOverflowError,
    InvalidRequestError,
    ManifestError,
    ModelLoadError,
    ProviderError,
    UnknownModelError,
    ZooError,
)
from edged.zoo.model import LoadedModel, ProviderFallbackWarning, SessionConfig, load_model
from edged.zoo.params import GenerationParams, GenerationResult

__all__ = [
    "ContextOverflowError",
    "GenerationParams",
    "GenerationResult",
    "InvalidRequestError",
    "LoadedModel",
    "ManifestError",
    "ModelLoadError",
    "ProviderError",
    "ProviderFallbackWarning",
    "SessionConfig",
    "UnknownModelError",
    "ZooError",
    "load_model",
]
