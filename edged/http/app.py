"""The HTTP front as a Starlette app: a client of the daemon's socket through `AsyncClient`.

One DEALER socket carries every request in flight (matched by id), so the front adds one
loopback hop and some JSON, not a connection per request. It keeps no state the daemon needs:
killing it loses only the status page's recent-decisions log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edged.client import AsyncClient, ClientError, RemoteError, RequestTimeout
from edged.http import openai
from edged.http.metrics import CONTENT_TYPE, Metrics
from edged.http.openai import ChunkWriter, GenerateCall, HttpError
from edged.http.status import StatusLog, page

OPEN_PATHS = frozenset({"/health"})  # liveness probes need no key


@dataclass(frozen=True)
class HttpConfig:
    """What the front needs: the daemon's endpoint, its own key, client timeouts."""

    endpoint: str
    api_key: str | None = None
    timeout_s: float = 600.0       # a generation's wait for the daemon (its deadline max)
    info_timeout_s: float = 2.0    # health / stats / models
    curve_server_key: str | Path | None = None
    curve_client_cert: str | Path | None = None


class JSON(JSONResponse):
    """Compact JSON (the default pretty-prints nothing but spends time on `ensure_ascii`)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(exc: HttpError) -> Response:
    return JSON(exc.body(), status_code=exc.status, headers=exc.headers)


class BearerAuth:
    """Pure ASGI middleware (no per-request task, streams untouched): `Authorization: Bearer
    <key>` on every path but /health, compared in constant time."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                exc = HttpError(401, "invalid_api_key",
                                "missing or wrong API key (Authorization: Bearer <key>)")
                response = error_response(exc)
                response.headers["www-authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Front:
    """Handlers sharing one `AsyncClient`, the metrics registry and the status log."""

    def __init__(self, config: HttpConfig) -> None:
        self.config = config
        self.client: AsyncClient | None = None
        self.metrics = Metrics()
        self.log = StatusLog()
        self._background: set[asyncio.Task[Any]] = set()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.client = AsyncClient(
            self.config.endpoint, timeout_s=self.config.timeout_s, retries=1,
            curve_server_key=self.config.curve_server_key,
            curve_client_cert=self.config.curve_client_cert)
        try:
            yield
        finally:
            for task in list(self._background):
                task.cancel()
            await self.client.close()

    @property
    def daemon(self) -> AsyncClient:
        if self.client is None:
            raise HttpError(503, "unavailable", "the front is not started")
        return self.client

    async def _info(self, op: str) -> dict[str, Any]:
        """health/stats/models, or a 503/504 HttpError saying the daemon did not answer."""
        try:
            return await self.daemon.request(op, self.config.info_timeout_s)
        except RequestTimeout:
            raise HttpError(503, "unavailable", f"the daemon at {self.config.endpoint} did "
                            f"not answer {op} in {self.config.info_timeout_s} s") from None
        except RemoteError as exc:
            raise HttpError.from_code(exc.code, exc.message) from None

    async def _stats_or_none(self) -> dict[str, Any] | None:
        try:
            return await self._info("stats")
        except HttpError:
            return None

    # -- routes ----------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return Response(page(), media_type="text/html; charset=utf-8",
                        headers={"cache-control": "no-cache"})

    async def status_json(self, request: Request) -> Response:
        return JSON(self.log.snapshot(await self._stats_or_none()),
                    headers={"cache-control": "no-store"})

    async def health(self, request: Request) -> Response:
        try:
            health = await self._info("health")
        except HttpError as exc:
            return JSON({"status": "unreachable", "error": exc.message}, status_code=503)
        body = {k: v for k, v in health.items() if k not in ("v", "ok", "id")}
        return JSON(body, status_code=200 if body.get("status") == "serving" else 503)

    async def scrape(self, request: Request) -> Response:
        return Response(self.metrics.render(await self._stats_or_none()), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        return JSON(openai.model_list((await self._info("models"))["models"]))

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        for entry in openai.model_list((await self._info("models"))["models"])["data"]:
            if entry["id"] == name:
                return JSON(entry)
        raise HttpError(404, "model_not_found", f"no model {name!r} (GET /v1/models lists them)")

    async def feedback(self, request: Request) -> Response:
        body = openai.parse_json(await request.body())
        unknown = sorted(set(body) - {"id", "satisfied", "model", "labels"})
        if unknown:
            raise openai.bad(f"unrecognized field(s): {', '.join(unknown)}", unknown[0])
        rid, satisfied = body.get("id"), body.get("satisfied")
        model, labels = body.get("model"), body.get("labels")
        if not isinstance(rid, str) or not rid:
            raise openai.bad("'id' must be the response's id", "id")
        if (satisfied is None) == (labels is None):
            raise openai.bad("give exactly one of 'satisfied' (bool) and 'labels' "
                             "({model: bool})", "satisfied")
        if satisfied is not None and not isinstance(satisfied, bool):
            raise openai.bad("'satisfied' must be a boolean", "satisfied")
        if model is not None and not isinstance(model, str):
            raise openai.bad("'model' must be a string", "model")
        if labels is not None and not (isinstance(labels, dict) and all(
                isinstance(k, str) and isinstance(v, bool) for k, v in labels.items())):
            raise openai.bad("'labels' must map model names to booleans", "labels")
        request_id = openai.daemon_id(rid)
        try:
            reply = await self.daemon.feedback(request_id, satisfied, model=model, labels=labels)
        except RemoteError as exc:
            raise HttpError.from_code(exc.code, exc.message) from None
        except RequestTimeout:
            raise HttpError(504, "timeout", "the daemon did not answer the feedback") from None
        self.log.feedback(request_id, reply.get("labels") or {})
        return JSON({"object": "edged.feedback", "id": rid, "labels": reply.get("labels"),
                     "durable": reply.get("durable")})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", openai.chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", openai.completion_request)

    # -- generations -----------------------------------------------------------------------

    def _failure(self, endpoint: str, call: GenerateCall, exc: Exception) -> HttpError:
        """Count the failure and translate it into the HTTP error to answer."""
        if isinstance(exc, RemoteError):
            error = HttpError.from_code(exc.code, exc.message)
        elif isinstance(exc, RequestTimeout):
            error = HttpError(504, "timeout", f"no answer from the daemon: {exc}")
        else:
            error = HttpError(502, "unavailable", f"daemon client error: {exc}")
        self.metrics.failed(endpoint, call.fields.get("model", call.requested), error.code)
        return error

    def _done(self, endpoint: str, reply: dict[str, Any], started: float) -> None:
        self.metrics.observe(endpoint, reply, time.perf_counter() - started)
        self.log.record(reply)

    async def _generate(self, request: Request, endpoint: str,
                        parse: Callable[[dict[str, Any]], GenerateCall]) -> Response:
        started = time.perf_counter()
        call = parse(openai.parse_json(await request.body()))
        if call.stream:
            return await self._stream(endpoint, call, started)
        try:
            reply = await self.daemon.generate(call.prompt, messages=call.messages,
                                               **call.fields)
        except ClientError as exc:
            raise self._failure(endpoint, call, exc) from None
        self._done(endpoint, reply, started)
        return JSON(openai.completion_body(call, reply), headers=openai.headers(reply))

    async def _stream(self, endpoint: str, call: GenerateCall, started: float) -> Response:
        """Wait for the daemon's first message before answering, so that `busy` or
        `model_not_found` get their real status; after that, errors travel as SSE events."""
        stream = await self.daemon.stream(call.prompt, messages=call.messages, **call.fields)
        deltas = stream.__aiter__()
        first: str | None = None
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            pass
        except ClientError as exc:
            raise self._failure(endpoint, call, exc) from None
        writer = ChunkWriter(call, stream.id)

        async def body() -> AsyncIterator[bytes]:
            finished = False
            try:
                yield writer.start()
                if first is not None:
                    yield writer.delta(first)
                async for delta in deltas:
                    yield writer.delta(delta)
                finished = True
                assert stream.reply is not None
                self._done(endpoint, stream.reply, started)
                yield writer.finish(stream.reply)
            except ClientError as exc:
                finished = True
                yield writer.error(self._failure(endpoint, call, exc))
            finally:
                if not finished:  # the HTTP client went away: stop the generation
                    self._spawn(self._abandon(deltas, stream.id))

        return StreamingResponse(body(), media_type="text/event-stream", headers={
            "cache-control": "no-cache", "x-accel-buffering": "no",
            "x-edged-request-id": stream.id})

    async def _abandon(self, deltas: AsyncIterator[str], request_id: str) -> None:
        with contextlib.suppress(Exception):
            await deltas.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(ClientError):
            await self.daemon.cancel(request_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return error_response(HttpError(exc.status_code, code, str(exc.detail)))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(exc)


def create_app(config: HttpConfig) -> Starlette:
    """The ASGI app; run it with `edged.http.server.serve` (or any ASGI server)."""
    front = Front(config)
    routes = [
        Route("/", front.index, methods=["GET"]),
        Route("/status.json", front.status_json, methods=["GET"]),
        Route("/health", front.health, methods=["GET"]),
        Route("/metrics", front.scrape, methods=["GET"]),
        Route("/v1/models", front.models, methods=["GET"]),
        Route("/v1/models/{name:path}", front.model, methods=["GET"]),
        Route("/v1/chat/completions", front.chat, methods=["POST"]),
        Route("/v1/completions", front.completions, methods=["POST"]),
        Route("/v1/feedback", front.feedback, methods=["POST"]),
    ]
    middleware = [Middleware(BearerAuth, key=config.api_key)] if config.api_key else []
    app = Starlette(routes=routes, middleware=middleware, lifespan=front.lifespan,
                    exception_handlers={HTTPException: _http_exception, HttpError: _http_error})
    app.state.front = front
    return app
