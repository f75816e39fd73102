"""OpenAI's wire shapes <-> edged's protocol: request translation, bodies, SSE chunks, errors.

Pure functions, no I/O, so the mapping is tested without a server. OpenAI's request names map
onto the protocol's generate fields (`max_tokens` -> `max_new_tokens`, ...); parameters edged
cannot honour (`n` > 1, tools, logprobs, penalties) are refused with a 400 rather than ignored,
as the protocol refuses unknown fields: a client never gets silently different semantics.
edged's extras travel where OpenAI leaves room: an `edged` object in the request (reference,
deadline, top_k, repetition_penalty) and in the response (model, joules, route), plus headers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

VIRTUAL_MODELS = ("auto", "edged")  # "let MESS+ route"; a zoo model of that name is shadowed

# protocol error code -> HTTP status (docs/http.md has the table and the reasons)
STATUS = {
    "bad_request": 400,
    "too_large": 413,
    "unknown_request": 404,
    "model_not_found": 404,
    "cancelled": 409,
    "busy": 429,
    "shutting_down": 503,
    "deadline_exceeded": 504,
    "timeout": 504,
    "unavailable": 503,
    "model_error": 502,
    "unsupported_version": 500,
    "unknown_op": 500,
    "internal": 500,
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
RETRY_AFTER_S = {"busy": 1, "shutting_down": 5}

_EDGED_EXTRAS = {"reference": str, "deadline_ms": int, "top_k": int,
                 "repetition_penalty": (int, float)}
# accepted only at their no-op value: anything else changes semantics edged does not implement
_NOOP = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
    "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "best_of": (1,), "echo": (False,),
    "suffix": ("",),
}
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
           "stream_options", "edged"} | set(_NOOP) | _IGNORED
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "response_format"}
COMPLETION_FIELDS = _COMMON | {"prompt"}


class HttpError(Exception):
    """An error the front answers with OpenAI's error body; `code` is edged's stable code."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    @classmethod
    def from_code(cls, code: str, message: str) -> HttpError:
        """The protocol's code mapped to its status (and Retry-After where a retry helps)."""
        headers = {}
        if code in RETRY_AFTER_S:  # OpenAI's clients also read retry-after-ms
            headers = {"retry-after": str(RETRY_AFTER_S[code]),
                       "retry-after-ms": str(100 if code == "busy" else 1000 * RETRY_AFTER_S[code])}
        return cls(STATUS.get(code, 500), code, message, headers=headers)

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, "bad_request", message, param)


@dataclass
class GenerateCall:
    """One OpenAI request as a daemon `generate`: `fields` go to `AsyncClient.generate`."""

    kind: str                      # "chat" or "completion"
    requested: str                 # the model name the client asked for
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False

    @property
    def routed(self) -> bool:
        return "model" not in self.fields


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def _typed(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise bad(f"'{name}' must be {_kind_name(kind)}, got a boolean", name)
    if not isinstance(value, kind):
        raise bad(f"'{name}' must be {_kind_name(kind)}, got {type(value).__name__}", name)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _common(body: dict[str, Any], allowed: set[str], kind: str) -> GenerateCall:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name, noop in _NOOP.items():
        if name in body and body[name] is not None and body[name] not in noop:
            raise bad(f"'{name}' is not supported by edged", name)
    requested = _typed(body, "model", str) or "auto"
    fields: dict[str, Any] = {}
    if requested not in VIRTUAL_MODELS:
        fields["model"] = requested
    n = _typed(body, "n", int)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n")
    for name, target, kinds in (("temperature", "temperature", (int, float)),
                                ("top_p", "top_p", (int, float)), ("seed", "seed", int)):
        value = _typed(body, name, kinds)
        if value is not None:
            fields[target] = value
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, list) and not stop:
            stop = None
        elif not (isinstance(stop, str) or (isinstance(stop, list)
                                             and all(isinstance(s, str) for s in stop))):
            raise bad("'stop' must be a string or an array of strings", "stop")
        if stop is not None:
            fields["stop"] = stop
    extras = _typed(body, "edged", dict) or {}
    for name, value in extras.items():
        if name not in _EDGED_EXTRAS:
            raise bad(f"unknown field 'edged.{name}' (known: {', '.join(_EDGED_EXTRAS)})",
                      f"edged.{name}")
        if value is not None:
            fields[name] = _typed(extras, name, _EDGED_EXTRAS[name])
    stream = _typed(body, "stream", bool) or False
    options = _typed(body, "stream_options", dict) or {}
    include_usage = bool(options.get("include_usage", False))
    return GenerateCall(kind=kind, requested=requested, fields=fields, stream=stream,
                        include_usage=include_usage)


def _max_tokens(body: dict[str, Any], fields: dict[str, Any], *names: str) -> None:
    values = {name: _typed(body, name, int) for name in names}
    given = {v for v in values.values() if v is not None}
    if len(given) > 1:
        raise bad(f"{' and '.join(names)} disagree", names[-1])
    if given:
        fields["max_new_tokens"] = given.pop()


def chat_request(body: dict[str, Any]) -> GenerateCall:
    """`POST /v1/chat/completions` body -> a generate call (messages, chat template)."""
    call = _common(body, CHAT_FIELDS, "chat")
    _max_tokens(body, call.fields, "max_tokens", "max_completion_tokens")
    response_format = _typed(body, "response_format", dict)
    if response_format and response_format.get("type", "text") != "text":
        raise bad("only response_format {'type': 'text'} is supported", "response_format")
    messages = _typed(body, "messages", list)
    if not messages:
        raise bad("'messages' must be a non-empty array", "messages")
    call.messages = [_message(m, i) for i, m in enumerate(messages)]
    return call


def _message(message: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object", where)
    role = message.get("role")
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise bad(f"{where}.role must be system, developer, user or assistant, got {role!r} "
                  "(edged has no tools)", f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"{where}.content: only text parts are supported", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or an array of text parts",
                  f"{where}.content")
    return {"role": role, "content": content}


def completion_request(body: dict[str, Any]) -> GenerateCall:
    """`POST /v1/completions` body -> a generate call (raw prompt)."""
    call = _common(body, COMPLETION_FIELDS, "completion")
    _max_tokens(body, call.fields, "max_tokens")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (or an array of one string)", "prompt")
    call.prompt = prompt
    return call


def finish_reason(reply: dict[str, Any]) -> str:
    """eos and stop strings are both OpenAI's "stop"."""
    return "length" if reply.get("finish_reason") == "length" else "stop"


def usage(reply: dict[str, Any]) -> dict[str, int]:
    u = reply.get("usage") or {}
    prompt, completion = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def edged_extras(reply: dict[str, Any]) -> dict[str, Any]:
    """The `edged` object of a response: who served, what it cost, why it was chosen."""
    energy = reply.get("energy") or {}
    route = reply.get("route") or {"routed": False}
    extras = {
        "request_id": reply.get("id"), "model": reply.get("model"),
        "routed": bool(route.get("routed")), "joules": energy.get("joules"),
        "method": energy.get("method"), "approximate": energy.get("approximate"),
        "energy": reply.get("energy"), "timing": reply.get("timing"), "route": route,
    }
    for key in ("labels", "exploration"):
        if key in reply:
            extras[key] = reply[key]
    return extras


def headers(reply: dict[str, Any]) -> dict[str, str]:
    """`x-edged-*` headers of a non-streamed response (a stream's come in its last chunk)."""
    energy = reply.get("energy") or {}
    out = {"x-edged-request-id": str(reply.get("id")), "x-edged-model": str(reply.get("model")),
           "x-edged-routed": "true" if (reply.get("route") or {}).get("routed") else "false"}
    if energy.get("joules") is not None:
        out["x-edged-joules"] = repr(float(energy["joules"]))
        out["x-edged-energy-method"] = str(energy.get("method"))
        out["x-edged-energy-approximate"] = "true" if energy.get("approximate") else "false"
    return out


def response_id(call: GenerateCall, request_id: str) -> str:
    return f"{'chatcmpl' if call.kind == 'chat' else 'cmpl'}-{request_id}"


def daemon_id(openai_id: str) -> str:
    """The daemon's request id inside a response id (`chatcmpl-<id>`, `cmpl-<id>` or bare)."""
    for prefix in ("chatcmpl-", "cmpl-"):
        if openai_id.startswith(prefix):
            return openai_id[len(prefix):]
    return openai_id


def completion_body(call: GenerateCall, reply: dict[str, Any],
                    created: int | None = None) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    created = int(time.time()) if created is None else created
    if call.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                          "content": reply.get("text", "")},
                                  "logprobs": None, "finish_reason": finish_reason(reply)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": reply.get("text", ""), "logprobs": None,
                  "finish_reason": finish_reason(reply)}
        obj = "text_completion"
    return {"id": response_id(call, str(reply.get("id"))), "object": obj, "created": created,
            "model": reply.get("model"), "system_fingerprint": None, "choices": [choice],
            "usage": usage(reply), "edged": edged_extras(reply)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line, as OpenAI's clients parse."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


class ChunkWriter:
    """The SSE chunks of one streamed response, in OpenAI's order: role, deltas, finish,
    (usage), [DONE]."""

    def __init__(self, call: GenerateCall, request_id: str, created: int | None = None) -> None:
        self.call = call
        self.id = response_id(call, request_id)
        self.created = int(time.time()) if created is None else created

    def _chunk(self, choices: list[dict[str, Any]], model: str | None = None,
               **extra: Any) -> dict[str, Any]:
        chat = self.call.kind == "chat"
        chunk = {"id": self.id, "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": self.created, "model": model or self.call.requested,
                 "system_fingerprint": None, "choices": choices}
        if self.call.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.call.kind == "chat":
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def start(self) -> bytes:
        if self.call.kind != "chat":
            return b""
        return sse(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]))

    def delta(self, text: str) -> bytes:
        return sse(self._chunk([self._choice(text, None)]))

    def finish(self, reply: dict[str, Any]) -> bytes:
        """The finish chunk carries the served model and the `edged` object; then usage."""
        out = sse(self._chunk([self._choice(None, finish_reason(reply))],
                              model=reply.get("model"), edged=edged_extras(reply)))
        if self.call.include_usage:
            out += sse(self._chunk([], model=reply.get("model"), usage=usage(reply)))
        return out + SSE_DONE

    @staticmethod
    def error(exc: HttpError) -> bytes:
        return sse(exc.body())


def model_list(zoo: list[dict[str, Any]], created: int = 0) -> dict[str, Any]:
    """`GET /v1/models`: the virtual routed models, then the zoo cheapest first."""
    data = [{"id": name, "object": "model", "created": created, "owned_by": "edged",
             "edged": {"routed": True}} for name in VIRTUAL_MODELS]
    data += [{"id": m["name"], "object": "model", "created": created, "owned_by": "edged",
              "edged": {"routed": False, "rank": m.get("rank"), "device": m.get("device")}}
             for m in zoo if m.get("name") not in VIRTUAL_MODELS]
    return {"object": "list", "data": data}
