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
from edged.zoo.manifest import ModelEntry, Zoo, ZooManifest, ZooSettings
from edged.zoo.model import LoadedModel, ProviderFallbackWarning, SessionConfig, load_model
from edged.zoo.params import GenerationParams, GenerationResult
from edged.zoo.remote import (
    CircuitBreaker,
    CostModel,
    RemoteModel,
    RemoteResult,
    RemoteSpec,
    RemoteTimeoutError,
    RemoteUnavailableError,
)

__all__ = [
    "CircuitBreaker",
    "ContextOverflowError",
    "CostModel",
    "GenerationParams",
    "GenerationResult",
    "InvalidRequestError",
    "LoadedModel",
    "ManifestError",
    "ModelEntry",
    "ModelLoadError",
    "ProviderError",
    "ProviderFallbackWarning",
    "RemoteModel",
    "RemoteResult",
    "RemoteSpec",
    "RemoteTimeoutError",
    "RemoteUnavailableError",
    "SessionConfig",
    "UnknownModelError",
    "Zoo",
    "ZooError",
    "ZooManifest",
    "ZooSettings",
    "load_model",
]
