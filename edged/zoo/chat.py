"""Chat messages -> prompt text, with the model's own Jinja chat template when it has one."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

from edged.zoo.errors import InvalidRequestError, ModelLoadError

Message = Mapping[str, Any]


class ChatTemplate:
    """A compiled chat template (sandboxed Jinja, as transformers renders it)."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str, model: str) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise InvalidRequestError(f"chat template of {model}: {message}")

        def strftime_now(fmt: str) -> str:
            return _dt.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelLoadError(model, f"chat template does not compile: {exc}") from exc
        self.bos_token, self.eos_token, self.model = bos_token, eos_token, model

    def render(self, messages: Sequence[Message]) -> str:
        import jinja2

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except InvalidRequestError:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template of {self.model} failed: {exc}") from exc


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Messages must be a non-empty list of {"role": str, "content": str} mappings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"messages[{i}] is {type(m).__name__}, not a mapping")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
        out.append(dict(m))
    return out


def plain_prompt(messages: Sequence[Message]) -> str:
    """Without a template the prompt is the message contents, one paragraph each."""
    return "\n\n".join(m["content"] for m in messages)
