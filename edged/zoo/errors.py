"""Typed zoo errors: callers (CLI, daemon) map each class to an exit code or a protocol error."""

from __future__ import annotations


class ZooError(Exception):
    """Base class of every error the zoo raises on purpose."""


class ModelLoadError(ZooError):
    """A model directory cannot be loaded (missing files, bad graph, tokenizer mismatch, ...)."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"model {model}: {message}")
        self.model = model
        self.reason = message


class ProviderError(ModelLoadError):
    """The execution providers asked for are not the ones onnxruntime really uses."""


class ManifestError(ZooError):
    """A zoo manifest is invalid; the message names the file, the model and the field."""

    def __init__(self, path: object, message: str, *, model: str | None = None,
                 field: str | None = None) -> None:
        where = str(path)
        if model is not None:
            where += f": model {model!r}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.model = model
        self.field = field


class UnknownModelError(ZooError, KeyError):
    """A model name that the zoo does not list."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class InvalidRequestError(ZooError, ValueError):
    """A generation request that cannot be served as asked (bad prompt or parameters)."""


class ContextOverflowError(InvalidRequestError):
    """The prompt plus the requested new tokens do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context: int) -> None:
        super().__init__(
            f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the "
            f"model's context of {context} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context = context
