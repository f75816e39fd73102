"""Remote zoo models: another edged daemon, or any OpenAI-compatible server, as one zoo entry.

A `RemoteModel` looks like a `LoadedModel` to the engine (`generate` with `on_delta` and
`cancel`, `defaults`, `context`, `provider`, `close`), but it has no onnxruntime session: it
forwards the request and always streams, so deltas and cancel pass through. Its result is a
`RemoteResult` that carries the joules for the reply: the remote edged daemon's measured
`energy`, or, for an OpenAI server whose energy nobody measures here, the manifest's cost model
(`method = "remote-estimate"`, always approximate).

Failures are typed (`RemoteUnavailableError`, `RemoteTimeoutError`) so the engine can tell an
outage from a bad request, and each model has a `CircuitBreaker`: after `breaker_failures`
failures in a row the model is unavailable for `breaker_open_s` (the router routes around it),
then one request probes it (half-open).

Nothing here contacts a remote while loading: a remote that is down at start costs requests
(and opens its breaker), never the daemon's start. Transports: edged's own protocol over a
DEALER socket (pyzmq, CURVE keys as `edged.client` takes them) and HTTP with the standard
library's `http.client` (no new runtime dependency; the SSE stream is read line by line).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged.zoo.chat import Message, validate_messages
from edged.zoo.errors import InvalidRequestError, ManifestError, ModelLoadError, ZooError
from edged.zoo.params import GenerationParams, GenerationResult

if TYPE_CHECKING:
    import http.client

KINDS = ("edged", "openai")
POLL_S = 0.05               # how often a waiting call looks at its cancel event and budget
CANCEL_GRACE_S = 5.0        # after a cancel: how long to wait for the remote's partial text
DEADLINE_GRACE_S = 1.0      # a forwarded deadline: ours (a cancel) should arrive first
REMOTE_METHOD = "remote-estimate"


class RemoteUnavailableError(ZooError):
    """The remote could not serve this request (down, refused, overloaded, misconfigured):
    an outage, not a property of the request. `retryable`: worth another attempt now."""

    def __init__(self, model: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"remote model {model}: {message}")
        self.model = model
        self.reason = message
        self.retryable = retryable


class RemoteTimeoutError(RemoteUnavailableError):
    """The remote did not finish within the entry's `timeout_s` (or never connected)."""


# -- manifest ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CostModel:
    """Joules of a remote run nobody measures: per prompt token, per completion token and per
    second of (local wall-clock) latency. An estimate, so its records say `approximate`."""

    joules_per_prompt_token: float = 0.0
    joules_per_completion_token: float = 0.0
    joules_per_second: float = 0.0

    @property
    def set(self) -> bool:
        return any(v > 0 for v in (self.joules_per_prompt_token,
                                   self.joules_per_completion_token, self.joules_per_second))

    def joules(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> float:
        return (self.joules_per_prompt_token * prompt_tokens
                + self.joules_per_completion_token * completion_tokens
                + self.joules_per_second * seconds)

    def record(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> dict[str, Any]:
        """An energy record (the keys of `EnergyRecord.to_dict`) for the wire."""
        joules = self.joules(prompt_tokens, completion_tokens, seconds)
        return {"joules": joules, "dynamic_joules": joules, "method": REMOTE_METHOD,
                "approximate": True, "per_rail_j": {}, "window_s": seconds, "samples": 0,
                "attribution": "exclusive", "scope_channels": []}


@dataclass(frozen=True)
class RemoteSpec:
    """A remote `[[models]]` entry (`kind = "edged"` or `"openai"`), validated."""

    kind: str
    endpoint: str = ""                  # edged: tcp://host:port or ipc://path
    base_url: str = ""                  # openai: http(s)://host:port/v1
    model: str | None = None            # edged: pin the remote's model (None: it routes)
    curve_server_key: Path | None = None
    curve_client_cert: Path | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    timeout_s: float = 120.0
    connect_timeout_s: float = 3.0
    retries: int = 0
    breaker_failures: int = 3
    breaker_open_s: float = 30.0
    cost: CostModel = field(default_factory=CostModel)

    @property
    def where(self) -> str:
        return self.endpoint or self.base_url

    def describe(self) -> dict[str, Any]:
        """What `models` and `health` say about the remote (never a key)."""
        out: dict[str, Any] = {"kind": self.kind, "where": self.where,
                               "model": self.model, "timeout_s": self.timeout_s}
        if self.cost.set:
            out["cost"] = {k: getattr(self.cost, k) for k in (
                "joules_per_prompt_token", "joules_per_completion_token", "joules_per_second")}
        return out


REMOTE_FIELDS = {
    "name", "kind", "endpoint", "base_url", "model", "curve_server_key", "curve_client_cert",
    "api_key_env", "api_key_file", "timeout_s", "connect_timeout_s", "retries",
    "breaker_failures", "breaker_open_s", "joules_per_prompt_token",
    "joules_per_completion_token", "joules_per_second", "context", "generation",
}


def parse_remote(entry: Mapping[str, Any], name: str, path: Path) -> RemoteSpec:
    """The remote part of a `[[models]]` table (`context`/`generation` are the manifest's)."""
    kind = entry["kind"]
    if kind not in KINDS:
        raise ManifestError(path, f"{kind!r} is not a model kind (local models have no kind; "
                                  f"remote: {', '.join(map(repr, KINDS))})", model=name,
                            field="kind")
    unknown = sorted(set(entry) - REMOTE_FIELDS)
    if unknown:
        raise ManifestError(path, f"unknown field for a {kind} model (allowed: "
                                  f"{sorted(REMOTE_FIELDS)})", model=name, field=unknown[0])

    def text(key: str, required: bool = False) -> str | None:
        value = entry.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise ManifestError(path, f"{value!r} is not a non-empty string", model=name,
                                field=key)
        return value

    def number(key: str, default: float, low: float, *, integer: bool = False) -> Any:
        value = entry.get(key, default)
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
        if not ok or isinstance(value, bool) or not math.isfinite(value) or value < low:
            want = "an integer" if integer else "a number"
            raise ManifestError(path, f"{value!r} is not {want} >= {low:g}", model=name,
                                field=key)
        return value

    def file(key: str) -> Path | None:
        value = text(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else path.parent / p

    if kind == "edged":
        for key in ("base_url", "api_key_env", "api_key_file"):
            if key in entry:
                raise ManifestError(path, "is for openai models", model=name, field=key)
        endpoint = text("endpoint", required=True)
        assert endpoint is not None
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise ManifestError(path, f"{endpoint!r} is not tcp://HOST:PORT or ipc://PATH",
                                model=name, field="endpoint")
        server_key, client_cert = file("curve_server_key"), file("curve_client_cert")
        if (server_key is None) != (client_cert is None):
            raise ManifestError(path, "CURVE needs both curve_server_key (the remote's public "
                                      "key) and curve_client_cert (our key_secret file)",
                                model=name, field="curve_server_key")
        extra: dict[str, Any] = {"endpoint": endpoint, "curve_server_key": server_key,
                                 "curve_client_cert": client_cert}
    else:
        for key in ("endpoint", "curve_server_key", "curve_client_cert"):
            if key in entry:
                raise ManifestError(path, "is for edged models", model=name, field=key)
        base_url = text("base_url", required=True)
        assert base_url is not None
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ManifestError(path, f"{base_url!r} is not an http(s) URL", model=name,
                                field="base_url")
        if "api_key_env" in entry and "api_key_file" in entry:
            raise ManifestError(path, "give api_key_env or api_key_file, not both", model=name,
                                field="api_key_file")
        extra = {"base_url": base_url.rstrip("/"), "api_key_env": text("api_key_env"),
                 "api_key_file": file("api_key_file")}
        if "model" not in entry:
            raise ManifestError(path, "an openai model needs the server's model name",
                                model=name, field="model")
    cost = CostModel(number("joules_per_prompt_token", 0.0, 0.0),
                     number("joules_per_completion_token", 0.0, 0.0),
                     number("joules_per_second", 0.0, 0.0))
    if kind == "openai" and not cost.set:
        raise ManifestError(path, "an openai model's joules are not measured here: set a cost "
                                  "model (joules_per_prompt_token, joules_per_completion_token "
                                  "and/or joules_per_second > 0)", model=name,
                            field="joules_per_completion_token")
    timeout = number("timeout_s", RemoteSpec.timeout_s, 0.001)
    connect = number("connect_timeout_s", RemoteSpec.connect_timeout_s, 0.001)
    return RemoteSpec(
        kind=kind, model=text("model"), timeout_s=float(timeout),
        connect_timeout_s=float(min(connect, timeout)),
        retries=number("retries", 0, 0, integer=True),
        breaker_failures=number("breaker_failures", 3, 1, integer=True),
        breaker_open_s=float(number("breaker_open_s", 30.0, 0.0)), cost=cost, **extra,
    )


# -- circuit breaker --------------------------------------------------------------------------

class CircuitBreaker:
    """closed -> (N failures in a row) -> open for `open_s` -> half-open: the next call probes;
    its success closes the circuit, its failure opens it again. Thread-safe."""

    def __init__(self, failures: int, open_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0                # in a row
        self.opened_at: float | None = None
        self.times_opened = 0
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self._clock() - self.opened_at >= self.open_s else "open"

    def allow(self) -> bool:
        """May a request go to the remote now (closed, or half-open: a probe)?"""
        return self.state != "open"

    def success(self) -> None:
        with self._lock:
            self.failures = 0
            self.opened_at = None

    def failure(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = reason
            if self._state() == "half-open" or self.failures >= self.threshold:
                if self.opened_at is None or self._state() == "half-open":
                    self.times_opened += 1
                self.opened_at = self._clock()

    def status(self) -> dict[str, Any]:
        with self._lock:
            state = self._state()
            retry = (max(0.0, self.opened_at + self.open_s - self._clock())
                     if state == "open" and self.opened_at is not None else 0.0)
            return {"state": state, "failures": self.failures, "opened": self.times_opened,
                    "retry_in_s": round(retry, 3), "last_error": self.last_error}


# -- results ----------------------------------------------------------------------------------

@dataclass
class RemoteResult(GenerationResult):
    """A remote generation: `energy` is the reply's energy record (the remote's measurement or
    the cost model's estimate; None when neither exists); `remote` says where it ran."""

    energy: dict[str, Any] | None = None
    remote: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """What one attempt has collected so far."""

    started: float
    text: str = ""
    first: float | None = None
    chunks: int = 0

    def delta(self, piece: str, on_delta: Callable[[str], None] | None) -> None:
        if not piece:
            return
        if self.first is None:
            self.first = time.monotonic()
        self.text += piece
        self.chunks += 1
        if on_delta is not None:
            on_delta(piece)

    def timing(self) -> tuple[float, float]:
        now = time.monotonic()
        ttft = ((self.first or now) - self.started) * 1000.0
        return ttft, (now - self.started) * 1000.0


# -- the model --------------------------------------------------------------------------------

class RemoteModel:
    """A remote model behind the LoadedModel interface the engine uses."""

    remote = True
    size_bytes = 0

    def __init__(self, name: str, spec: RemoteSpec, *, defaults: GenerationParams | None = None,
                 context: int | None = None) -> None:
        self.name = name
        self.spec = spec
        self.defaults = defaults or GenerationParams()
        #: None: not known here (the remote checks its own context and says `bad_request`)
        self.context = context
        #: the engine names a model's worker device after its provider: one worker per remote,
        #: so a slow remote never holds up a local generation
        self.provider = f"remote:{name}"
        self.breaker = CircuitBreaker(spec.breaker_failures, spec.breaker_open_s)
        self._api_key = self._read_api_key()
        self._closed = False
        self._sock_lock = threading.Lock()
        self._sock: Any = None             # edged: the DEALER socket, kept between requests
        self._monitor: Any = None
        self._deadline: float | None = None  # of the call in progress (one at a time: its worker)

    def _read_api_key(self) -> str | None:
        """A configuration error (unset variable, unreadable file) fails the load, at start."""
        spec = self.spec
        if spec.api_key_env is not None:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ModelLoadError(self.name, f"api_key_env {spec.api_key_env} is not set")
            return key
        if spec.api_key_file is not None:
            try:
                key = spec.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ModelLoadError(self.name, f"api_key_file {spec.api_key_file}: "
                                                f"{exc.strerror or exc}") from None
            if not key:
                raise ModelLoadError(self.name, f"api_key_file {spec.api_key_file} is empty")
            return key
        return None

    def available(self) -> bool:
        return not self._closed and self.breaker.allow()

    def status(self) -> dict[str, Any]:
        return {**self.spec.describe(), **self.breaker.status()}

    def generate(self, prompt: str | bytes | None = None, *,
                 params: GenerationParams | None = None,
                 messages: Sequence[Message] | None = None,
                 on_delta: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None,
                 deadline: float | None = None) -> RemoteResult:
        """Forward one generation (streamed), within `timeout_s` and the monotonic `deadline`.

        Raises InvalidRequestError when the remote refuses the request itself, and
        RemoteUnavailableError (counted by the breaker) when the remote cannot serve it."""
        params = params or self.defaults
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        msgs = [dict(m) for m in validate_messages(messages)] if messages is not None else None
        text = _text(prompt) if prompt is not None else None
        if self._closed:
            raise RemoteUnavailableError(self.name, "the zoo was closed")
        if not self.breaker.allow():
            status = self.breaker.status()
            raise RemoteUnavailableError(
                self.name, f"circuit open after {status['failures']} failures (retry in "
                           f"{status['retry_in_s']:.1f} s; last: {status['last_error']})")
        cancel = cancel or threading.Event()
        # the entry's timeout is the remote's budget: running past it is the remote's failure.
        # The request's own deadline is the caller's: it cancels (the engine's sweep sets
        # `cancel`), and an edged remote is told it (plus a grace) so it stops by itself too.
        end = time.monotonic() + self.spec.timeout_s
        self._deadline = deadline if deadline is not None and math.isfinite(deadline) else None
        call = self._edged if self.spec.kind == "edged" else self._openai
        attempt = 0
        while True:
            run = _Run(started=time.monotonic())
            try:
                result = call(text, msgs, params, run, on_delta, cancel, end)
            except RemoteUnavailableError as exc:
                if (exc.retryable and attempt < self.spec.retries and not run.chunks
                        and not cancel.is_set() and time.monotonic() < end):
                    attempt += 1
                    cancel.wait(min(0.2 * attempt, max(0.0, end - time.monotonic())))
                    continue
                if not cancel.is_set():  # our own cancel or deadline is not the remote's fault
                    self.breaker.failure(exc.reason)
                raise
            self.breaker.success()
            return result

    def close(self) -> None:
        """No new requests; the socket goes now unless a request still uses it (then with
        the model object)."""
        self._closed = True
        if self._sock_lock.acquire(blocking=False):
            try:
                if self._sock is not None:
                    self._drop_socket()
            finally:
                self._sock_lock.release()

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r}, {self.spec.kind} {self.spec.where})"

    # -- edged ---------------------------------------------------------------------------------

    def _edged(self, text: str | None, messages: list[dict[str, Any]] | None,
               params: GenerationParams, run: _Run, on_delta: Callable[[str], None] | None,
               cancel: threading.Event, end: float) -> RemoteResult:
        """Another edged daemon over this model's DEALER socket (streamed when the caller
        streams); a cancel is forwarded by request id."""
        import zmq

        from edged.client import generate_message, new_id, raise_for
        from edged.protocol import VERSION, pack, parse_reply

        spec = self.spec
        with self._sock_lock:
            sock = self._connected(cancel, end)
            try:
                rid = new_id()
                # past our own limit by a grace: our cancel (deadline) or timeout comes first
                until = end if self._deadline is None else min(end, self._deadline)
                remaining_ms = max(1, int((until + DEADLINE_GRACE_S - time.monotonic()) * 1000))
                fields = {key: getattr(params, key) for key in (
                    "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                    "seed")}
                # deltas only when someone reads them: each streamed part costs the remote's
                # socket loop (and CURVE) CPU inside its measured window; a cancel reply
                # carries the text anyway
                body = generate_message(text, messages, on_delta is not None, **fields,
                                        stop=list(params.stop) or None, model=spec.model,
                                        deadline_ms=remaining_ms)
                sock.send_multipart([b"", pack({"v": VERSION, "id": rid, "op": "generate",
                                                **body})])

                def send_cancel() -> None:
                    sock.send_multipart([b"", pack({"v": VERSION, "id": new_id(),
                                                    "op": "cancel", "request_id": rid})])

                cancelled_at: float | None = None
                while True:
                    now = time.monotonic()
                    if cancel.is_set() and cancelled_at is None:
                        cancelled_at = now
                        send_cancel()
                    if cancelled_at is not None and now - cancelled_at > CANCEL_GRACE_S:
                        return self._result(run, "cancelled", None, None)
                    if cancelled_at is None and now >= end:  # stop the remote's work too
                        send_cancel()
                        raise RemoteTimeoutError(self.name, f"no reply within "
                                                            f"{spec.timeout_s:g} s")
                    if not sock.poll(int(POLL_S * 1000)):
                        continue
                    try:
                        reply = parse_reply(sock.recv_multipart()[-1])
                    except Exception as exc:  # a peer that does not speak edged's protocol
                        raise RemoteUnavailableError(self.name, f"bad reply: {exc}") from None
                    if reply.id != rid:
                        continue  # the answer to a cancel, or to an abandoned request
                    if reply.is_delta:
                        run.delta(str(reply.body.get("delta", "")), on_delta)
                        continue
                    return self._edged_final(reply, run, cancel, raise_for)
            except zmq.ZMQError as exc:
                self._drop_socket()
                raise RemoteUnavailableError(self.name, f"socket: {exc}") from None

    def _connected(self, cancel: threading.Event, end: float) -> Any:
        """This model's DEALER socket once a peer is connected (handshake done), within
        `connect_timeout_s`: one connection (and one CURVE handshake) for every request, not
        one each. IMMEDIATE: nothing is queued for a peer that is not there, so a remote that
        is down is known within `connect_timeout_s`, not after the whole timeout. Caller holds
        `_sock_lock`."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        spec = self.spec
        if self._sock is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if spec.curve_server_key is not None:
                from edged.client import apply_curve

                try:
                    apply_curve(sock, spec.curve_server_key, spec.curve_client_cert)
                except (OSError, ValueError, zmq.ZMQError) as exc:
                    sock.close(linger=0)
                    raise RemoteUnavailableError(self.name, f"CURVE keys: {exc}") from None
            self._monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            sock.connect(spec.endpoint)
            self._sock = sock
        sock, monitor = self._sock, self._monitor
        limit = min(end, time.monotonic() + spec.connect_timeout_s)
        failed: int | None = None
        while True:
            while monitor is not None and monitor.poll(0):
                failed = recv_monitor_message(monitor)["event"]
            if failed is not None:
                self._drop_socket()
                if failed == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise RemoteUnavailableError(self.name, f"{spec.endpoint} refused our "
                                                            "CURVE key (is it in its "
                                                            "curve_client_keys?)")
                raise RemoteUnavailableError(self.name, f"handshake with {spec.endpoint} "
                                                        "failed (CURVE keys on both sides?)")
            if sock.poll(0, zmq.POLLOUT):
                return sock
            if cancel.is_set():
                raise RemoteUnavailableError(self.name, "cancelled before it connected")
            if time.monotonic() >= limit:
                self._drop_socket()
                raise RemoteTimeoutError(self.name, f"no connection to {spec.endpoint} within "
                                                    f"{spec.connect_timeout_s:g} s",
                                         retryable=True)
            time.sleep(min(0.01, POLL_S))

    def _drop_socket(self) -> None:
        """Close the socket (caller holds `_sock_lock`): the next request connects afresh."""
        import zmq

        if self._monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._monitor = None

    def _edged_final(self, reply: Any, run: _Run, cancel: threading.Event,
                     raise_for: Callable[[Any], dict[str, Any]]) -> RemoteResult:
        from edged.client import RemoteError

        try:
            body = raise_for(reply)
        except RemoteError as exc:
            partial = str(exc.body.get("text") or run.text)
            if exc.code == "cancelled" or (exc.code == "deadline_exceeded" and cancel.is_set()):
                run.text = partial
                return self._result(run, "cancelled", None, None)
            if exc.code == "bad_request":
                raise InvalidRequestError(f"remote: {exc.message}") from None
            if exc.code == "deadline_exceeded":  # the forwarded budget ran out over there
                why = f"no reply within {self.spec.timeout_s:g} s (the remote stopped it: " \
                      f"{exc.message})"
                raise RemoteTimeoutError(self.name, why) from None
            retry = exc.code in ("busy", "shutting_down")
            raise RemoteUnavailableError(self.name, f"{exc.code}: {exc.message}",
                                         retryable=retry) from None
        usage = body.get("usage") or {}
        timing = body.get("timing") or {}
        run.text = str(body.get("text", run.text))
        energy = body.get("energy") if isinstance(body.get("energy"), dict) else None
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(
            usage.get("completion_tokens", 0))
        if energy is None and self.spec.cost.set:  # the remote could not measure
            energy = self.spec.cost.record(prompt, completion, run.timing()[1] / 1000.0)
        route = body.get("route") or {}
        where = {"served_by": body.get("model"), "routed": bool(route.get("routed", False))}
        return self._result(run, str(body.get("finish_reason", "stop")), energy, (prompt,
                            completion), float(timing.get("tokens_per_s", 0.0) or 0.0), where)

    # -- openai ----------------------------------------------------------------------------------

    def _openai(self, text: str | None, messages: list[dict[str, Any]] | None,
                params: GenerationParams, run: _Run, on_delta: Callable[[str], None] | None,
                cancel: threading.Event, end: float) -> RemoteResult:
        """An OpenAI-compatible server: `/completions` or `/chat/completions`, always streamed
        (SSE). A cancel (or the budget) shuts the socket down: the server sees the client go."""
        spec = self.spec
        url = urllib.parse.urlsplit(spec.base_url)
        body: dict[str, Any] = {"model": spec.model, "stream": True,
                                "stream_options": {"include_usage": True},
                                "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.top_k:  # not OpenAI's; vLLM and others take them as extra parameters
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        chat = messages is not None
        if chat:
            body["messages"] = messages
        else:
            body["prompt"] = text
        path = url.path.rstrip("/") + ("/chat/completions" if chat else "/completions")
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        import http.client  # here: a zoo without an OpenAI-compatible remote never loads it

        conn_cls = (http.client.HTTPSConnection if url.scheme == "https"
                    else http.client.HTTPConnection)
        connect = max(0.001, min(spec.connect_timeout_s, end - time.monotonic()))
        conn = conn_cls(url.hostname or "localhost", url.port, timeout=connect)
        done = threading.Event()
        why: list[str] = []
        try:
            try:
                conn.connect()
            except OSError as exc:
                cls = RemoteTimeoutError if isinstance(exc, TimeoutError) else \
                    RemoteUnavailableError
                raise cls(self.name, f"cannot connect to {spec.base_url}: {exc}",
                          retryable=True) from None
            assert conn.sock is not None
            conn.sock.settimeout(max(0.001, end - time.monotonic()))
            watcher = threading.Thread(target=_watch, args=(conn.sock, cancel, end, done, why),
                                       name=f"edged-remote-{self.name}", daemon=True)
            watcher.start()
            try:
                conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    self._http_error(resp.status, resp.read(65536))
                return self._sse(resp, run, on_delta, chat, why)
            except (OSError, http.client.HTTPException) as exc:
                if cancel.is_set() or "cancel" in why:
                    return self._result(run, "cancelled", None, None)
                if "timeout" in why or isinstance(exc, TimeoutError):
                    raise RemoteTimeoutError(self.name, f"no complete reply within "
                                                        f"{spec.timeout_s:g} s") from None
                raise RemoteUnavailableError(self.name, f"{spec.base_url}: {exc!r}",
                                             retryable=not run.chunks) from None
        finally:
            done.set()
            conn.close()

    def _http_error(self, status: int, raw: bytes) -> None:
        try:
            error = json.loads(raw).get("error")
            message = error.get("message") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = raw[:200].decode("utf-8", "replace")
        if status in (400, 413, 422):
            raise InvalidRequestError(f"remote: HTTP {status}: {message}")
        raise RemoteUnavailableError(self.name, f"HTTP {status}: {message}",
                                     retryable=status in (408, 429, 502, 503, 504))

    def _sse(self, resp: http.client.HTTPResponse, run: _Run,
             on_delta: Callable[[str], None] | None, chat: bool, why: list[str]) -> RemoteResult:
        """Read `data:` events up to `[DONE]`: text deltas, the finish reason, the usage."""
        finish, usage, data = "stop", None, []
        while True:
            line = resp.readline()
            if not line:
                if why:
                    raise OSError(why[0])
                raise RemoteUnavailableError(self.name, "the stream ended without [DONE]")
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
                continue
            if line or not data:
                continue  # comments, event names, keep-alives
            payload, data = b"\n".join(data), []
            if payload == b"[DONE]":
                break
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise RemoteUnavailableError(self.name, "a stream event is not JSON") from None
            if chunk.get("error"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else str(error)
                code = error.get("code") if isinstance(error, dict) else None
                if code == "cancelled" or "cancel" in why:
                    return self._result(run, "cancelled", None, None)
                raise RemoteUnavailableError(self.name, f"error mid-stream: {message}")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                piece = ((choice.get("delta") or {}).get("content") if chat
                         else choice.get("text"))
                run.delta(piece or "", on_delta)
                if choice.get("finish_reason"):
                    finish = "length" if choice["finish_reason"] == "length" else "stop"
        seconds = run.timing()[1] / 1000.0
        if usage is not None:
            tokens = (int(usage.get("prompt_tokens") or 0),
                      int(usage.get("completion_tokens") or 0))
        else:  # a server that reports no usage: chunks ~ tokens, 4 characters ~ a token
            tokens = (0, run.chunks)
        energy = self.spec.cost.record(*tokens, seconds)
        return self._result(run, finish, energy, tokens, 0.0, {"served_by": self.spec.model})

    # -- shared ----------------------------------------------------------------------------------

    def _result(self, run: _Run, finish: str, energy: dict[str, Any] | None,
                tokens: tuple[int, int] | None, tokens_per_s: float = 0.0,
                extra: dict[str, Any] | None = None) -> RemoteResult:
        ttft, total = run.timing()
        prompt, completion = tokens or (0, run.chunks)
        if not tokens_per_s and completion > 1 and run.first is not None and total > ttft:
            tokens_per_s = (completion - 1) / ((total - ttft) / 1000.0)
        return RemoteResult(
            text=run.text, token_ids=[], prompt_tokens=prompt, completion_tokens=completion,
            finish_reason=finish, ttft_ms=ttft, total_ms=total,  # type: ignore[arg-type]
            tokens_per_s=tokens_per_s, provider=self.provider, model=self.name, energy=energy,
            remote={"kind": self.spec.kind, "where": self.spec.where, **(extra or {})},
        )


def _watch(sock: socket.socket, cancel: threading.Event, end: float, done: threading.Event,
           why: list[str]) -> None:
    """Shut the HTTP socket down on cancel or when the budget is spent: the blocked read in
    the generating thread returns at once, and the server sees the client leave."""
    while not done.wait(POLL_S):
        reason = "cancel" if cancel.is_set() else "timeout" if time.monotonic() >= end else None
        if reason is not None:
            why.append(reason)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return


def _text(prompt: str | bytes) -> str:
    if isinstance(prompt, bytes):
        try:
            return prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"prompt is not valid UTF-8: byte {exc.start}") from None
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be str or UTF-8 bytes, not {type(prompt).__name__}")
    return prompt
