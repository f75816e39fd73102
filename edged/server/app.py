"""The daemon's lifecycle and socket loop: bind, serve, reload on SIGHUP, drain on SIGTERM.

Only the main thread touches the ROUTER socket. Workers hand their replies to it over an inproc
PULL socket, so a slow or vanished client never blocks a generation, and `ROUTER_MANDATORY` turns
a reply to a vanished client into an error we handle (the client's work is cancelled) instead of
a silent drop.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from edged import __version__
from edged.checkers import UnknownCheckerError, get_checker
from edged.config import Config, ConfigError, load_config, validate_endpoint
from edged.energy import (
    BackendUnavailable,
    EnergyConfigError,
    EnergyError,
    EnergyMeter,
    create_meter,
)
from edged.paths import demo_zoo_dir, runtime_dir, state_dir
from edged.protocol import (
    SOCKET_NAME,
    CancelRequest,
    ErrorCode,
    FeedbackRequest,
    GenerateRequest,
    ProtocolError,
    error_reply,
    ok_reply,
    pack,
    parse_request,
    peek_id,
    unpack,
)
from edged.router import Router, RouterConfig, RouterConfigError, StateError
from edged.server.engine import Engine, Job
from edged.server.sdnotify import Notifier
from edged.server.security import SecurityError, bind, check_endpoint, ipc_path, setup_curve
from edged.zoo import Zoo, ZooError

log = logging.getLogger("edged.server")

REPLIES = "inproc://edged-replies"
TICK_S = 0.05           # loop wake-up: deadlines, timers, signals
BATCH = 256             # messages handled per socket per tick, so neither side starves
STATE_FILE = "router-state.npz"
FLUSH_MS = 2000         # after a drain: how long the last replies may take to leave the socket
HELD_MAX = 10_000       # final replies kept for clients at their high-water mark
PART, FINAL = b"p", b"f"  # first frame of a worker's message on the inproc pair


class StartupError(RuntimeError):
    """The daemon cannot start (bad config, models, endpoint); the message says which."""


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that win over the config file (and survive a reload)."""

    endpoint: str | None = None
    state_dir: Path | None = None
    model_dirs: tuple[Path, ...] = ()


def resolve_config(path: Path | None, overrides: Overrides) -> Config:
    config = load_config(path)
    server = config.server
    if overrides.endpoint:
        server = replace(server, endpoint=validate_endpoint(overrides.endpoint, "--endpoint"))
    if overrides.state_dir:
        server = replace(server, state_dir=overrides.state_dir)
    models = config.models
    if overrides.model_dirs:
        models = replace(models, manifest=None, dirs=overrides.model_dirs)
    return replace(config, server=server, models=models)


def default_endpoint() -> str:
    return f"ipc://{runtime_dir() / SOCKET_NAME}"


def build_zoo(config: Config) -> Zoo:
    models = config.models
    try:
        if models.dirs:
            zoo = Zoo.from_dirs(list(models.dirs))
        else:
            zoo = Zoo.from_manifest(models.manifest or demo_zoo_dir() / "zoo.toml")
        for name in zoo.names:  # READY means loaded: load now, not on the first request
            zoo.get(name)
    except ZooError as exc:
        raise StartupError(f"{config.where('[models]')}: {exc}") from None
    return zoo


def device_of(provider: str) -> str:
    """Models on one device share one worker; the device is named by its execution provider."""
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return "cuda"
    return "cpu" if provider == "CPUExecutionProvider" else provider.removesuffix(
        "ExecutionProvider").lower()


def build_router_config(config: Config) -> RouterConfig:
    try:
        return RouterConfig.from_dict(dict(config.router))
    except (RouterConfigError, TypeError) as exc:
        raise StartupError(f"{config.where('[router]')}: {exc}") from None


def build_checker(config: Config, zoo: Zoo) -> Any:
    name = config.checker or zoo.manifest.checker or "exact"
    try:
        return get_checker(name)
    except UnknownCheckerError as exc:
        raise StartupError(f"{config.where('[labels] checker')}: {exc}") from None


def restore_router(path: Path, names: list[str], rconf: RouterConfig) -> Router:
    try:
        return Router.restore(path, names, rconf)
    except StateError as exc:
        log.error("%s; starting with a fresh router", exc)
        return Router(names, rconf)


class Server:
    """`edged serve`: run until SIGTERM/SIGINT, then drain and return the exit code."""

    def __init__(self, config_path: Path | None, overrides: Overrides) -> None:
        self.config_path = config_path
        self.overrides = overrides
        self.notifier = Notifier()
        self._signals: list[int] = []
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._replies_in: zmq.Socket | None = None
        self._local = threading.local()
        self._main = threading.get_ident()
        self._auth: Any = None
        self._meter: EnergyMeter | None = None
        self._fallback: EnergyMeter | None = None
        self._zoo: Zoo | None = None
        self._held: deque[list[bytes]] = deque()  # final replies waiting for room
        self.received = 0
        self.dropped = 0
        self.started = time.monotonic()

    # -- start ---------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self._start()
        except (ConfigError, StartupError, SecurityError) as exc:
            return self._failed(2, str(exc))
        except (EnergyError, zmq.ZMQError, OSError) as exc:
            return self._failed(1, f"cannot start: {exc}")
        except Exception as exc:  # a bug: say so in the journal and in systemd's status
            log.exception("cannot start")
            return self._failed(1, f"cannot start: {type(exc).__name__}: {exc}")
        try:
            return self._loop()
        finally:
            self._close()
            self.notifier.status("stopped")
            self.notifier.close()

    def _failed(self, code: int, message: str) -> int:
        log.error("%s", message)
        self._close()
        self.notifier.status(f"failed: {message}")
        self.notifier.close()
        return code

    def _start(self) -> None:
        self.notifier.status("reading config")
        self.config = resolve_config(self.config_path, self.overrides)
        server = self.config.server
        self.endpoint = server.endpoint or default_endpoint()
        check_endpoint(self.endpoint, server)
        self.state_path = (server.state_dir or state_dir()) / STATE_FILE
        self.notifier.status("loading models")
        zoo = self._zoo = build_zoo(self.config)
        devices = {n: device_of(zoo.get(n).provider) for n in zoo.names}
        rconf = build_router_config(self.config)
        checker = build_checker(self.config, zoo)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        router = restore_router(self.state_path, list(zoo.names), rconf)
        try:
            meter = self._meter = create_meter(
                self.config.energy.backend, **self.config.energy.options
            )
        except (EnergyConfigError, BackendUnavailable) as exc:
            raise StartupError(f"{self.config.where('[energy]')}: {exc}") from None
        unseen = sorted(d for d in set(devices.values()) if not meter.covers(d))
        if unseen:  # e.g. a CPU model beside NVML: never bill it the GPU's joules
            log.warning("the %s meter does not see device(s) %s: their generations are "
                        "estimated (CPU time x watts per core)", meter.backend, ", ".join(unseen))
            self._fallback = create_meter("estimate")
        self.notifier.status("binding")
        self._ctx = zmq.Context()
        self._replies_in = self._ctx.socket(zmq.PULL)
        self._replies_in.setsockopt(zmq.RCVHWM, 0)
        self._replies_in.bind(REPLIES)
        self._sock = self._make_socket(server)
        self.engine = Engine(
            zoo, router, meter, checker,
            emit=self._emit, queue_size=server.queue_size, devices=devices,
            fallback_meter=self._fallback,
        )
        self.engine.start()
        self.last_save = time.monotonic()
        names = ", ".join(zoo.names)
        log.info("serving %s on %s (energy: %s)", names, self.endpoint, meter.backend)
        self.notifier.ready(f"serving {len(zoo.names)} models on {self.endpoint}")

    def _make_socket(self, server: Any) -> zmq.Socket:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, server.hwm)
        sock.setsockopt(zmq.RCVHWM, server.hwm)
        # twice the protocol limit: between the two the client gets a `too_large` reply, above
        # it ZeroMQ drops the message and the connection before we ever allocate it
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * server.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        if server.curve_secret_key is not None:
            self._auth = setup_curve(self._ctx, sock, server)
        bind(sock, self.endpoint, server)
        return sock

    # -- loop ----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _loop(self) -> int:
        assert self._sock is not None and self._replies_in is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._replies_in, zmq.POLLIN)
        watchdog_s = self.notifier.watchdog_interval_s
        last_watchdog = 0.0
        stopping_since: float | None = None
        while True:
            events = dict(poller.poll(TICK_S * 1000))
            if self._held:
                self._send_held()
            if self._replies_in in events:
                self._forward_replies()
            if self._sock in events:
                self._serve_requests()
            now = time.monotonic()
            self.engine.sweep(now)
            if watchdog_s is not None and now - last_watchdog >= watchdog_s:
                self.notifier.watchdog()
                last_watchdog = now
            if now - self.last_save >= self.config.server.save_interval_s:
                self._save()
                self.last_save = now
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self._reload()
                elif stopping_since is None:
                    stopping_since = now
                    self.engine.draining = True
                    log.info("stopping: draining %d requests", self.engine.in_flight())
                    self.notifier.stopping(f"draining {self.engine.in_flight()} requests")
                else:
                    log.warning("second stop signal: cancelling in-flight requests")
                    self.engine.stop_all()
            if stopping_since is not None and self.engine.idle():
                break
        self.engine.stop()
        self._forward_replies(everything=True)
        end = time.monotonic() + FLUSH_MS / 1000.0
        while self._held and time.monotonic() < end:
            time.sleep(TICK_S / 5)
            self._send_held()
        self._save()
        # LINGER=0 would discard the drained replies still queued in the socket at close
        self._sock.setsockopt(zmq.LINGER, FLUSH_MS)
        log.info("stopped after draining")
        return 0

    def _serve_requests(self) -> None:
        assert self._sock is not None
        for _ in range(BATCH):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.received += 1
            self._handle(frames)

    def _forward_replies(self, everything: bool = False) -> None:
        assert self._replies_in is not None
        count = 0
        while everything or count < BATCH:
            try:
                kind, *frames = self._replies_in.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._send_frames(frames, final=kind == FINAL)
            count += 1

    def _send_frames(self, frames: list[bytes], final: bool) -> None:
        """Send without blocking. A client at its high-water mark loses streamed parts, but its
        final reply is held and retried every tick until there is room or the client is gone."""
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EAGAIN and final:
                self._held.append(frames)
                if len(self._held) > HELD_MAX:
                    self._held.popleft()
                    self.dropped += 1
                return
            self.dropped += 1
            if exc.errno == errno.EHOSTUNREACH:
                self.engine.vanished(frames[0])
            elif exc.errno != errno.EAGAIN:
                log.warning("reply dropped: %s", exc)

    def _send_held(self) -> None:
        for _ in range(len(self._held)):
            self._send_frames(self._held.popleft(), final=True)  # held again if still full

    def _emit(self, envelope: list[bytes], message: dict[str, Any]) -> None:
        """Send a reply from any thread: directly from the main one, else through inproc."""
        frames = [*envelope, pack(message)]
        final = message.get("done") is not False
        if threading.get_ident() == self._main:
            self._send_frames(frames, final)
            return
        push = getattr(self._local, "push", None)
        if push is None:
            assert self._ctx is not None
            push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 0)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(REPLIES)
            self._local.push = push
        push.send_multipart([FINAL if final else PART, *frames])

    # -- one request ---------------------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        """Split the envelope (identities up to the empty delimiter) from the one payload."""
        if len(frames) < 2:
            self.dropped += 1
            return
        try:
            split = frames.index(b"", 1) + 1
        except ValueError:
            split = 1  # a DEALER that sends no delimiter
        envelope, payload = frames[:split], frames[split:]
        rid: str | None = None
        try:
            if len(payload) != 1:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"expected one payload frame, got {len(payload)}"
                )
            obj = unpack(payload[0], self.config.server.max_message_bytes)
            rid = peek_id(obj)
            request = parse_request(obj)
            reply = self._dispatch(request, envelope)
        except ProtocolError as exc:
            self.engine.count_error(exc.code)
            reply = error_reply(exc.request_id or rid, exc.code, exc.message)
        except Exception as exc:  # a bug in one request must not stop the daemon
            log.exception("request failed")
            self.engine.count_error(ErrorCode.INTERNAL)
            reply = error_reply(rid, ErrorCode.INTERNAL, type(exc).__name__)
        if reply is not None:
            self._emit(envelope, reply)

    def _dispatch(self, request: Any, envelope: list[bytes]) -> dict[str, Any] | None:
        if isinstance(request, GenerateRequest):
            now = time.monotonic()
            limit_ms = self.config.server.deadline_max_ms
            deadline_ms = min(request.deadline_ms or limit_ms, limit_ms)
            self.engine.submit(
                Job(request=request, envelope=envelope, received=now,
                    deadline=now + deadline_ms / 1000.0)
            )
            return None  # a worker replies
        if isinstance(request, FeedbackRequest):
            return ok_reply(request.id, **self.engine.feedback(request))
        if isinstance(request, CancelRequest):
            return ok_reply(request.id, **self.engine.cancel(request))
        if request.op == "health":
            return ok_reply(request.id, **self.health())
        if request.op == "models":
            return ok_reply(request.id, models=self.engine.models())
        if request.op == "stats":
            return ok_reply(request.id, **self.stats())
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {request.op!r}", request.id)

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.engine.draining else "serving",
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "models": len(self.engine.zoo.names),
            "queue": self.engine.depth(),
            "queue_size": self.engine.queue_size,
            "in_flight": self.engine.in_flight(),
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.engine.stats(),
            "received": self.received,
            "dropped": self.dropped,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "energy_backend": self.engine.meter.backend,
        }

    # -- state, reload, close ------------------------------------------------------------------

    def _save(self) -> None:
        try:
            if self.engine.save(self.state_path):
                log.debug("router state saved to %s", self.state_path)
        except OSError as exc:
            log.error("cannot save router state to %s: %s", self.state_path, exc)

    def _reload(self) -> None:
        """Apply a changed config without dropping connections; a bad one keeps the old."""
        self.notifier.reloading()
        log.info("reloading config")
        old = self.config
        try:
            new = resolve_config(self.config_path, self.overrides)
            if new.models != old.models:
                with self.notifier.keepalive():  # loading blocks the loop's watchdog pings
                    zoo = build_zoo(new)
            else:
                zoo = self.engine.zoo
            rconf = build_router_config(new)
            checker = build_checker(new, zoo)
        except (ConfigError, StartupError) as exc:
            log.error("reload failed, keeping the old config: %s", exc)
            self.notifier.ready(f"serving on {self.endpoint} (reload failed: {exc})")
            return
        restart_only = [
            key for key in ("endpoint", "hwm", "max_message_bytes", "ipc_mode",
                            "allow_insecure_tcp", "curve_secret_key", "curve_client_keys")
            if getattr(new.server, key) != getattr(old.server, key)
        ]
        if new.energy != old.energy:
            restart_only.append("energy")
        if restart_only:
            log.warning("changes to %s take effect on restart", ", ".join(restart_only))
        engine = self.engine
        self._save()
        with engine.router_lock:
            if zoo is not engine.zoo or rconf != engine.router.config:
                # saved and replaced under one hold of the lock, so nothing learned in between
                # is lost; requests decided before learn on the new router (same zoo), and
                # a reshaped state (lp_window) is migrated by Router.restore
                try:
                    engine.router.save(self.state_path)
                except OSError as exc:
                    log.error("cannot save router state to %s: %s", self.state_path, exc)
                names = list(zoo.names)
                engine.router = restore_router(self.state_path, names, rconf)
                engine.router_dirty = False
            engine.devices = {n: device_of(zoo.get(n).provider) for n in zoo.names}
            old_zoo, engine.zoo = engine.zoo, zoo
            engine.checker = checker
        if old_zoo is not zoo:
            old_zoo.close()  # a generation still running on it keeps its session until done
        engine.set_queue_size(new.server.queue_size)
        self.config = replace(
            new, server=replace(new.server, **{k: getattr(old.server, k) for k in restart_only
                                               if k != "energy"}),
            energy=old.energy,
        )
        log.info("reloaded")
        self.notifier.ready(f"serving {len(zoo.names)} models on {self.endpoint}")

    def _close(self) -> None:
        """Release everything `_start` got, however far it came."""
        if self._auth is not None:
            self._auth.stop()
        if self._sock is not None:
            self._sock.close()  # with its own LINGER: 0, or FLUSH_MS after a drain
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        if self.endpoint_path is not None:
            self.endpoint_path.unlink(missing_ok=True)
        if self._meter is not None:
            self._meter.close()
        if self._fallback is not None:
            self._fallback.close()
        engine = getattr(self, "engine", None)
        zoo = engine.zoo if engine is not None else self._zoo
        if zoo is not None:
            zoo.close()

    @property
    def endpoint_path(self) -> Path | None:
        endpoint = getattr(self, "endpoint", None)
        if endpoint is None or self._sock is None:
            return None
        return ipc_path(endpoint)
