"""The edged wire protocol: one msgpack map per ZeroMQ message, versioned, validated.

Both the daemon and clients use this module, so it imports nothing else from edged. Every way a
request can be wrong maps to a `ProtocolError` with one of the stable `ErrorCode` strings; clients
in other languages depend on those strings (docs/protocol.md), so never rename one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgpack

VERSION = 1
SOCKET_NAME = "edged.sock"  # the default endpoint is ipc://<runtime dir>/edged.sock
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20
MAX_ID_CHARS = 128
MAX_STOP_SEQUENCES = 8
MAX_MESSAGES = 256
MAX_NEW_TOKENS_LIMIT = 1 << 16
MAX_TOP_K = 1 << 20
MAX_SEED = (1 << 63) - 1
MAX_UINT64 = (1 << 64) - 1  # deadline_ms: any msgpack uint; the server caps it


class ErrorCode(str, Enum):
    """Stable error codes carried in `{"error": {"code": ...}}`."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    UNKNOWN_REQUEST = "unknown_request"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"


ERROR_CODES: frozenset[str] = frozenset(code.value for code in ErrorCode)


class ProtocolError(Exception):
    """A request the server cannot serve; becomes an error reply with `code`.

    `request_id` is the client's id when it could be read, so the reply can still be matched.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


OPS = ("generate", "feedback", "cancel", "models", "stats", "health")


@dataclass(frozen=True)
class Request:
    """A request without arguments (`models`, `stats`, `health`)."""

    id: str
    op: str


@dataclass(frozen=True)
class GenerateRequest(Request):
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stream: bool = False
    reference: str | None = None
    model: str | None = None
    deadline_ms: int | None = None

    def text(self) -> str:
        """The request text the router sees: the prompt, or every message's content."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages or ())


@dataclass(frozen=True)
class FeedbackRequest(Request):
    request_id: str = ""
    labels: dict[str, bool] | None = None
    satisfied: bool | None = None
    model: str | None = None


@dataclass(frozen=True)
class CancelRequest(Request):
    request_id: str = ""


# -- encoding --------------------------------------------------------------------------------


def pack(message: dict[str, Any]) -> bytes:
    """Encode one message (str as msgpack str, bytes as bin)."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Any:
    """Decode one message with every msgpack limit set, so a hostile payload cannot balloon.

    Raises `ProtocolError(too_large)` or `ProtocolError(bad_request)`.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"message is {len(payload)} bytes; the limit is {max_bytes}"
        )
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes // 2,
            max_ext_len=max_bytes,
        )
    except msgpack.ExtraData:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "more than one msgpack object") from None
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "a msgpack str is not valid UTF-8") from None
    except (ValueError, TypeError, msgpack.StackError, msgpack.UnpackException) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"not valid msgpack: {exc}") from None


# -- validation ------------------------------------------------------------------------------


def _bad(message: str, request_id: str | None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id)


def _opt(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], rid: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _bad(f"{key!r} must be {_kind_name(kind)}, not a bool", rid)
    if not isinstance(value, kind):
        raise _bad(f"{key!r} must be {_kind_name(kind)}, not {type(value).__name__}", rid)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def whole(value: Any) -> Any:
    """A float with a whole value as an int (JavaScript msgpack encoders send some integers,
    and every one above 2^53, as float64); anything else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _opt_int(obj: dict[str, Any], key: str, rid: str, lo: int, hi: int) -> int | None:
    raw = obj.get(key)
    if isinstance(raw, float) and not raw.is_integer():
        raise _bad(f"{key!r} must be a whole number, got {raw}", rid)
    value = _opt({key: whole(raw)}, key, int, rid)
    if value is not None and not lo <= value <= hi:
        raise _bad(f"{key!r} must be in [{lo}, {hi}], got {value}", rid)
    return value


def _opt_float(obj: dict[str, Any], key: str, rid: str, lo: float, hi: float) -> float | None:
    value = _opt(obj, key, (int, float), rid)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _bad(f"{key!r} must be a finite number in [{lo}, {hi}], got {value}", rid)
    return value


def _req_str(obj: dict[str, Any], key: str, rid: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{key!r} must be a non-empty string", rid)
    return value


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], rid: str) -> None:
    unknown = sorted(str(key) for key in set(obj) - allowed)  # keys may be bin as well as str
    if unknown:
        raise _bad(f"unknown field(s): {', '.join(unknown)}", rid)


_COMMON = frozenset({"v", "id", "op"})
_GENERATE_KEYS = _COMMON | {
    "prompt", "messages", "max_new_tokens", "temperature", "top_k", "top_p",
    "repetition_penalty", "seed", "stop", "stream", "reference", "model", "deadline_ms",
}
_FEEDBACK_KEYS = _COMMON | {"request_id", "satisfied", "model", "labels"}
_CANCEL_KEYS = _COMMON | {"request_id"}


def peek_id(obj: Any) -> str | None:
    """The request id if `obj` carries a usable one, so even a bad request gets a matched reply."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS:
            return rid
    return None


def echo_id(obj: Any) -> str | int | None:
    """What an error reply's `id` echoes: the request's `id` as sent when it is a string or an
    integer, even one that is invalid (too long, empty, a number), so a client with many
    requests in flight can still match the error; nil when there is none."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
            return rid
    return None


def peek_large_id(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> str | int | None:
    """The `id` of a payload too large to decode, read without decoding the other values (they
    are skipped, not allocated), so a `too_large` reply can still be matched."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(payload) + 1,
                                max_str_len=MAX_ID_CHARS * 4, max_bin_len=0, max_array_len=0,
                                max_map_len=0, max_ext_len=0)
    unpacker.feed(payload)
    try:
        for _ in range(min(unpacker.read_map_header(), 64)):
            key = unpacker.unpack()
            if key == "id":
                return echo_id({"id": unpacker.unpack()})
            unpacker.skip()
    except Exception:  # not a map, a huge key, truncated: no id to echo
        return None
    return None


def parse_request(obj: Any) -> Request:
    """Validate a decoded message and return the typed request; raises `ProtocolError`."""
    if not isinstance(obj, dict):
        raise _bad(f"a request must be a map, not {type(obj).__name__}", None)
    rid = peek_id(obj)
    raw_id = obj.get("id")
    if rid is None:
        if not isinstance(raw_id, str) or not raw_id:
            raise _bad("'id' must be a non-empty string", None)
        raise _bad(f"'id' is {len(raw_id)} characters (code points); the limit is "
                   f"{MAX_ID_CHARS}", None)
    version = whole(obj.get("v"))
    if isinstance(version, bool) or not isinstance(version, int):
        raise _bad("'v' must be an integer protocol version", rid)
    if version != VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"protocol version {version} is not {VERSION}", rid
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise _bad("'op' must be a string", rid)
    if op not in OPS:
        raise ProtocolError(
            ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; valid: {', '.join(OPS)}", rid
        )
    if op == "generate":
        return _parse_generate(obj, rid)
    if op == "feedback":
        return _parse_feedback(obj, rid)
    if op == "cancel":
        _check_keys(obj, _CANCEL_KEYS, rid)
        return CancelRequest(id=rid, op=op, request_id=_req_str(obj, "request_id", rid))
    _check_keys(obj, _COMMON, rid)
    return Request(id=rid, op=op)


def _parse_messages(value: Any, rid: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list of {role, content} maps", rid)
    if len(value) > MAX_MESSAGES:
        raise _bad(f"'messages' has more than {MAX_MESSAGES} entries", rid)
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise _bad(f"messages[{i}] must be a map with exactly 'role' and 'content'", rid)
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role must be system, user or assistant", rid)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string", rid)
        out.append({"role": role, "content": content})
    return tuple(out)


def _parse_generate(obj: dict[str, Any], rid: str) -> GenerateRequest:
    _check_keys(obj, _GENERATE_KEYS, rid)
    prompt = _opt(obj, "prompt", str, rid)
    has_messages = obj.get("messages") is not None
    if (prompt is None) == (not has_messages):
        raise _bad("give exactly one of 'prompt' (string) or 'messages' (list)", rid)
    messages = _parse_messages(obj["messages"], rid) if has_messages else None
    stop = obj.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise _bad(
                f"'stop' must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES}", rid
            )
        stop = tuple(stop)
    stream = _opt(obj, "stream", bool, rid)
    model = _opt(obj, "model", str, rid)
    if model == "":
        raise ProtocolError(ErrorCode.MODEL_NOT_FOUND,
                            "'model' is empty: no model has that name (leave it out to route)",
                            rid)
    return GenerateRequest(
        id=rid,
        op="generate",
        prompt=prompt,
        messages=messages,
        max_new_tokens=_opt_int(obj, "max_new_tokens", rid, 1, MAX_NEW_TOKENS_LIMIT),
        temperature=_opt_float(obj, "temperature", rid, 0.0, 100.0),
        top_k=_opt_int(obj, "top_k", rid, 0, MAX_TOP_K),
        top_p=_opt_float(obj, "top_p", rid, 1e-9, 1.0),
        repetition_penalty=_opt_float(obj, "repetition_penalty", rid, 0.01, 100.0),
        seed=_opt_int(obj, "seed", rid, 0, MAX_SEED),
        stop=stop,
        stream=bool(stream),
        reference=_opt(obj, "reference", str, rid),
        model=model,
        deadline_ms=_opt_int(obj, "deadline_ms", rid, 1, MAX_UINT64),
    )


def _parse_feedback(obj: dict[str, Any], rid: str) -> FeedbackRequest:
    _check_keys(obj, _FEEDBACK_KEYS, rid)
    request_id = _req_str(obj, "request_id", rid)
    satisfied = _opt(obj, "satisfied", bool, rid)
    labels = obj.get("labels")
    model = _opt(obj, "model", str, rid)
    if model == "":
        raise ProtocolError(ErrorCode.MODEL_NOT_FOUND, "'model' is empty: no model has that name",
                            rid)
    if (satisfied is None) == (labels is None):
        raise _bad("give exactly one of 'satisfied' (bool) or 'labels' ({model: bool})", rid)
    if labels is not None:
        if (
            not isinstance(labels, dict)
            or not labels
            or not all(isinstance(k, str) and isinstance(v, bool) for k, v in labels.items())
        ):
            raise _bad("'labels' must be a non-empty map of model name to bool", rid)
        if model is not None:
            raise _bad("'model' goes with 'satisfied', not with 'labels'", rid)
    return FeedbackRequest(
        id=rid, op="feedback", request_id=request_id, labels=labels, satisfied=satisfied,
        model=model,
    )


# -- replies ---------------------------------------------------------------------------------


def ok_reply(request_id: str, /, **fields: Any) -> dict[str, Any]:
    """A final reply: `done: true` on every reply that is not a streamed part."""
    return {"v": VERSION, "id": request_id, "ok": True, "done": True, **fields}


def error_reply(
    request_id: str | int | None, code: ErrorCode, message: str, /, **fields: Any
) -> dict[str, Any]:
    """`id` echoes the request's id (see `echo_id`); nil when there was none to read."""
    return {
        "v": VERSION, "id": request_id, "ok": False, "done": True,
        "error": {"code": code.value, "message": message}, **fields,
    }


def delta_message(request_id: str, delta: str) -> dict[str, Any]:
    """One streamed part; the final reply of a streamed request carries `"done": true`."""
    return {"v": VERSION, "id": request_id, "ok": True, "delta": delta, "done": False}


@dataclass
class Reply:
    """A decoded reply as a client sees it."""

    id: str | None
    ok: bool
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def is_delta(self) -> bool:
        return self.body.get("done") is False and "delta" in self.body


def parse_reply(payload: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Reply:
    """Decode a server message; raises `ProtocolError(bad_request)` when it is not a reply."""
    obj = unpack(payload, max_bytes)
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "the server sent something that is no reply")
    rid = obj.get("id")
    return Reply(id=rid if isinstance(rid, str) else None, ok=obj["ok"], body=obj)
