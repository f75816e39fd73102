"""Clients for the edged daemon: `Client` (blocking) and `AsyncClient` (asyncio).

`Client` sends one-shot requests over a REQ socket the Lazy Pirate way: wait `timeout_s`, then
throw the socket away and resend, `retries` times, but only for operations that are safe to repeat
(`health`, `models`, `stats`); a generation or a label is never sent twice behind your back.
Streams use a DEALER socket of their own. Errors from the daemon arrive as `RemoteError`
subclasses carrying the protocol's stable `code`.

Without an endpoint both use `default_endpoint()`, the same default as the `edged` commands. An
ipc endpoint whose socket file is missing, or that nobody listens on, fails at once with
`DaemonNotRunning` instead of waiting for the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from edged.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SOCKET_NAME,
    VERSION,
    ErrorCode,
    ProtocolError,
    Reply,
    pack,
    parse_reply,
)

IDEMPOTENT = frozenset({"health", "models", "stats"})
HEALTH_TIMEOUT_S = 2.0  # `health` is answered by the socket loop, never queued
_GENERATE_FIELDS = frozenset({
    "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
    "reference", "model", "deadline_ms",
})


class ClientError(Exception):
    """Base class of every error the client raises."""


class RequestTimeout(ClientError, TimeoutError):
    """No reply within the timeout (after the retries allowed for this operation)."""


class DaemonNotRunning(ClientError, ConnectionError):
    """Nothing listens at the endpoint (no socket file, or a dead daemon's): known at once."""


#: where `edged serve` listens under systemd (`RuntimeDirectory=edged`)
SYSTEMD_SOCKET = Path("/run/edged") / SOCKET_NAME


def default_endpoint() -> str:
    """The endpoint the `edged` commands and `Client()` use when given none: `$EDGED_ENDPOINT`;
    else the socket a hand-started `edged serve` binds (`$XDG_RUNTIME_DIR/edged/edged.sock`, else
    `/tmp/edged-<uid>/edged.sock`) if it exists; else the systemd unit's
    `/run/edged/edged.sock` if that exists; else the hand-started one (to name in errors)."""
    env = os.environ.get("EDGED_ENDPOINT")
    if env:
        return env
    from edged.paths import runtime_dir  # standard library only

    own = runtime_dir() / SOCKET_NAME
    if not own.exists() and SYSTEMD_SOCKET.exists():
        return f"ipc://{SYSTEMD_SOCKET}"
    return f"ipc://{own}"


def check_listening(endpoint: str) -> None:
    """Raise `DaemonNotRunning` when an ipc endpoint's socket file is missing, is not a socket
    or refuses connections (its daemon is gone); ZeroMQ itself would wait silently. Other
    endpoints (tcp, abstract ipc) are left to the timeout."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://"):]
    hint = "start it with `edged serve`, or pass the daemon's endpoint (--endpoint, EDGED_ENDPOINT)"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DaemonNotRunning(f"no daemon at {endpoint}: the socket file does not exist; "
                               f"{hint}") from None
    except OSError as exc:
        raise DaemonNotRunning(f"cannot reach {endpoint}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise DaemonNotRunning(f"{path} is not a socket; {hint}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        raise DaemonNotRunning(f"no daemon at {endpoint}: the socket file is left over from one "
                               f"that stopped; {hint}") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise DaemonNotRunning(f"cannot connect to {endpoint}: permission denied (members "
                                   "of the daemon's group may connect)") from None
        raise DaemonNotRunning(f"cannot connect to {endpoint}: {exc.strerror}") from None
    finally:
        probe.close()


class RemoteError(ClientError):
    """The daemon answered with an error; `code` is one of `edged.protocol.ErrorCode`."""

    def __init__(self, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.body = body or {}


class BadRequest(RemoteError): ...
class Busy(RemoteError): ...
class ShuttingDown(RemoteError): ...
class DeadlineExceeded(RemoteError): ...
class Cancelled(RemoteError): ...
class UnknownRequest(RemoteError): ...
class ModelNotFound(RemoteError): ...
class ModelFailed(RemoteError): ...


_ERRORS: dict[str, type[RemoteError]] = {
    ErrorCode.BAD_REQUEST.value: BadRequest,
    ErrorCode.BUSY.value: Busy,
    ErrorCode.SHUTTING_DOWN.value: ShuttingDown,
    ErrorCode.DEADLINE_EXCEEDED.value: DeadlineExceeded,
    ErrorCode.CANCELLED.value: Cancelled,
    ErrorCode.UNKNOWN_REQUEST.value: UnknownRequest,
    ErrorCode.MODEL_NOT_FOUND.value: ModelNotFound,
    ErrorCode.MODEL_ERROR.value: ModelFailed,
}


def raise_for(reply: Reply) -> dict[str, Any]:
    """The reply body, or the typed `RemoteError` it carries."""
    if reply.ok:
        return reply.body
    error = reply.body.get("error")
    code, message = "internal", "malformed error reply"
    if isinstance(error, dict):
        code = str(error.get("code", code))
        message = str(error.get("message", message))
    raise _ERRORS.get(code, RemoteError)(code, message, reply.body)


def new_id() -> str:
    return uuid.uuid4().hex


def generate_message(
    prompt: str | None, messages: list[dict[str, str]] | None, stream: bool, **fields: Any
) -> dict[str, Any]:
    unknown = set(fields) - _GENERATE_FIELDS
    if unknown:
        raise TypeError(f"unknown generate argument(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = messages
    if stream:
        body["stream"] = True
    return body


def feedback_message(
    request_id: str, satisfied: bool | None, model: str | None, labels: dict[str, bool] | None
) -> dict[str, Any]:
    """`labels` ({model: bool}, for exploration replies) or `satisfied` (+ optional `model`)."""
    if labels is not None:
        return {"request_id": request_id, "labels": labels}
    fields: dict[str, Any] = {"request_id": request_id, "satisfied": satisfied}
    if model is not None:
        fields["model"] = model
    return fields


def apply_curve(
    sock: zmq.Socket, server_key: bytes | str | Path | None, client_cert: str | Path | None
) -> None:
    """Make `sock` a CURVE client: the server's public key (bytes, z85 text or a `.key` file)
    and our own certificate (a `.key_secret` file; None: a throwaway pair). Public so other
    socket users (remote zoo models) configure CURVE exactly as the clients do."""
    if server_key is None:
        return
    import zmq.auth

    if isinstance(server_key, (str, Path)) and Path(server_key).is_file():
        server_key = zmq.auth.load_certificate(server_key)[0]
    if client_cert is None:
        public, secret = zmq.curve_keypair()
    else:
        public, secret = zmq.auth.load_certificate(client_cert)
        if not secret:
            raise ClientError(f"{client_cert} holds no secret key")
    sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret


class Client:
    """Blocking client. Use as a context manager, or call `close()`. `endpoint` defaults to
    `default_endpoint()`."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 2,
        curve_server_key: bytes | str | Path | None = None,
        curve_client_cert: str | Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_message_bytes = max_message_bytes
        self._curve = (curve_server_key, curve_client_cert)
        self._ctx = zmq.Context()
        self._req: zmq.Socket | None = None

    def _socket(self, kind: int) -> zmq.Socket:
        check_listening(self.endpoint)
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        apply_curve(sock, *self._curve)
        sock.connect(self.endpoint)
        return sock

    def request(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request, wait for its reply; returns the reply body or raises. `timeout_s`
        is per attempt; `health`, `models` and `stats` are tried `1 + retries` times."""
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        message = {"v": VERSION, "id": new_id(), "op": op, **fields}
        payload = pack(message)
        attempts = 1 + (self.retries if op in IDEMPOTENT else 0)
        for _ in range(attempts):
            if self._req is None:
                self._req = self._socket(zmq.REQ)
            self._req.send(payload)
            if self._req.poll(timeout_ms, zmq.POLLIN):
                reply = self._parse(self._req.recv())
                return raise_for(reply)
            self._req.close(linger=0)  # Lazy Pirate: a REQ socket that lost a reply is stuck
            self._req = None
        each = timeout_ms / 1000
        what = (f"{each:g} s (1 attempt)" if attempts == 1
                else f"{attempts * each:g} s ({attempts} attempts of {each:g} s)")
        raise RequestTimeout(f"{op}: no reply from {self.endpoint} in {what}")

    def _parse(self, payload: bytes) -> Reply:
        try:
            return parse_reply(payload, self.max_message_bytes)
        except ProtocolError as exc:
            raise ClientError(f"bad reply from {self.endpoint}: {exc.message}") from None

    def generate(
        self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
        timeout_s: float | None = None, **fields: Any,
    ) -> dict[str, Any]:
        """One completion: `text`, `model`, `usage`, `timing`, `energy`, `route`, ..."""
        return self.request("generate", timeout_s, **generate_message(prompt, messages, False,
                                                                      **fields))

    def stream(
        self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
        timeout_s: float | None = None, **fields: Any,
    ) -> Stream:
        """Iterate over text deltas; the full reply is `.reply` once the iterator ends."""
        body = generate_message(prompt, messages, True, **fields)
        sock = self._socket(zmq.DEALER)
        return Stream(self, sock, body, self.timeout_s if timeout_s is None else timeout_s)

    def feedback(
        self, request_id: str, satisfied: bool | None = None, *, model: str | None = None,
        labels: dict[str, bool] | None = None,
    ) -> dict[str, Any]:
        return self.request("feedback", **feedback_message(request_id, satisfied, model, labels))

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self.request("cancel", request_id=request_id)

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Is the daemon up? The socket loop answers at once, so by default this waits at most
        2 s in all (split over the attempts, and never longer than the client's timeout per
        attempt), not the generation timeout. `timeout_s` is the whole wait."""
        whole = HEALTH_TIMEOUT_S if timeout_s is None else timeout_s
        per_try = whole / (1 + self.retries)
        if timeout_s is None:
            per_try = min(per_try, self.timeout_s)
        return self.request("health", per_try)

    def models(self) -> list[dict[str, Any]]:
        return self.request("models")["models"]

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def close(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None
        self._ctx.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Stream:
    """A streamed generation over its own DEALER socket: iterate for deltas, then `.reply`."""

    def __init__(self, client: Client, sock: zmq.Socket, body: dict[str, Any],
                 timeout_s: float) -> None:
        self.id = new_id()
        self.reply: dict[str, Any] | None = None
        self._client = client
        self._sock = sock
        self._timeout_ms = int(timeout_s * 1000)
        sock.send_multipart([b"", pack({"v": VERSION, "id": self.id, "op": "generate", **body})])

    def __iter__(self) -> Iterator[str]:
        try:
            while self.reply is None:
                if not self._sock.poll(self._timeout_ms, zmq.POLLIN):
                    raise RequestTimeout(f"stream {self.id}: nothing for {self._timeout_ms} ms")
                reply = self._client._parse(self._sock.recv_multipart()[-1])
                if reply.id != self.id:
                    continue  # the answer to our cancel
                if reply.is_delta:
                    yield str(reply.body["delta"])
                else:
                    self.reply = raise_for(reply)
        finally:
            self.close()

    def cancel(self) -> None:
        """Ask the daemon to stop; the iterator then ends with `Cancelled` (or with the reply,
        when the answer was complete and only exploration runs were left)."""
        self._sock.send_multipart(
            [b"", pack({"v": VERSION, "id": new_id(), "op": "cancel", "request_id": self.id})]
        )

    def close(self) -> None:
        self._sock.close(linger=0)


class AsyncClient:
    """asyncio client: one DEALER socket, many requests in flight, matched by id."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 2,
        curve_server_key: bytes | str | Path | None = None,
        curve_client_cert: str | Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        endpoint = endpoint or default_endpoint()
        check_listening(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        apply_curve(self._sock, curve_server_key, curve_client_cert)
        self._sock.connect(endpoint)
        self._waiting: dict[str, asyncio.Queue[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                reply = parse_reply(frames[-1], self.max_message_bytes)
            except ProtocolError:
                continue
            queue = self._waiting.get(reply.id or "")
            if queue is not None:
                queue.put_nowait(reply)

    async def _send(self, op: str, fields: dict[str, Any]) -> tuple[str, asyncio.Queue[Reply]]:
        self._ensure_reader()
        rid = new_id()
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        self._waiting[rid] = queue
        await self._sock.send_multipart([b"", pack({"v": VERSION, "id": rid, "op": op, **fields})])
        return rid, queue

    async def request(self, op: str, timeout_s: float | None = None,
                      **fields: Any) -> dict[str, Any]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempts = 1 + (self.retries if op in IDEMPOTENT else 0)
        for _ in range(attempts):
            rid, queue = await self._send(op, fields)
            try:
                reply = await asyncio.wait_for(queue.get(), timeout)
                return raise_for(reply)
            except asyncio.TimeoutError:
                continue
            finally:
                self._waiting.pop(rid, None)
        raise RequestTimeout(f"{op}: no reply from {self.endpoint} in {timeout} s")

    async def generate(self, prompt: str | None = None, *,
                       messages: list[dict[str, str]] | None = None,
                       timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        return await self.request(
            "generate", timeout_s, **generate_message(prompt, messages, False, **fields)
        )

    async def stream(self, prompt: str | None = None, *,
                     messages: list[dict[str, str]] | None = None,
                     timeout_s: float | None = None, **fields: Any) -> AsyncStream:
        """Start a streamed generation: `async for delta in stream`, then `stream.reply`."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        rid, queue = await self._send("generate",
                                      generate_message(prompt, messages, True, **fields))
        return AsyncStream(self, rid, queue, timeout)

    async def feedback(self, request_id: str, satisfied: bool | None = None, *,
                       model: str | None = None,
                       labels: dict[str, bool] | None = None) -> dict[str, Any]:
        return await self.request(
            "feedback", **feedback_message(request_id, satisfied, model, labels)
        )

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return await self.request("cancel", request_id=request_id)

    async def health(self) -> dict[str, Any]:
        return await self.request("health")

    async def models(self) -> list[dict[str, Any]]:
        return (await self.request("models"))["models"]

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._sock.close(linger=0)
        self._ctx.destroy(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncStream:
    """A streamed generation on the `AsyncClient`'s socket: iterate for deltas, then `.reply`."""

    def __init__(self, client: AsyncClient, rid: str, queue: asyncio.Queue[Reply],
                 timeout_s: float) -> None:
        self.id = rid
        self.reply: dict[str, Any] | None = None
        self._client = client
        self._queue = queue
        self._timeout_s = timeout_s

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while self.reply is None:
                try:
                    reply = await asyncio.wait_for(self._queue.get(), self._timeout_s)
                except asyncio.TimeoutError:
                    raise RequestTimeout(
                        f"stream {self.id}: nothing for {self._timeout_s} s"
                    ) from None
                if reply.is_delta:
                    yield str(reply.body["delta"])
                else:
                    self.reply = raise_for(reply)
        finally:
            self._client._waiting.pop(self.id, None)

    async def cancel(self) -> dict[str, Any]:
        """Ask the daemon to stop; the iteration then ends with `Cancelled` (or with the reply,
        when the answer was complete and only exploration runs were left)."""
        return await self._client.cancel(self.id)
