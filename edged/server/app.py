"""The daemon's lifecycle and socket loop: bind, serve, reload on SIGHUP, drain on SIGTERM.

Only the main thread touches the ROUTER socket. Workers hand their replies to it over an inproc
PULL socket, so a slow or vanished client never blocks a generation, and `ROUTER_MANDATORY` turns
a reply to a vanished client into an error we handle (the client's work is cancelled) instead of
a silent drop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
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
    echo_id,
    error_reply,
    ok_reply,
    pack,
    parse_request,
    peek_large_id,
    unpack,
)
from edged.router import Router, RouterConfig, RouterConfigError, StateError
from edged.router.state import StateUnreadableError
from edged.server.engine import Engine, Job
from edged.server.journal import Journal, JournalError, file_digest
from edged.server.labels import LabelConfigError, LabelSources, build_label_sources
from edged.server.outbox import Outbox
from edged.server.sdnotify import Notifier
from edged.server.security import (
    SecurityError,
    bind,
    check_endpoint,
    ipc_path,
    remove_socket,
    setup_curve,
)
from edged.zoo import Zoo, ZooError

log = logging.getLogger("edged.server")

REPLIES = "inproc://edged-replies"
TICK_S = 0.05           # loop wake-up: deadlines, timers, signals
BATCH = 256             # messages handled per socket per tick, so neither side starves
STATE_FILE = "router-state.npz"  # before issue 11: one file for whatever zoo was served
FLUSH_MS = 2000         # after a drain: how long the last replies may take to leave the socket
#: the GIL hand-off period: every ZeroMQ call releases the GIL, and taking it back from a
#: worker in Python code waited up to the 5 ms default, per call, under load. 0.1 ms: at 128
#: closed-loop clients the loop thread spent ~64 us of CPU per message but ~200 us of wall time
#: (waiting for the GIL and the CPU); 0.5 ms gave a probe `busy` p99 of ~12 ms, 0.1 ms ~5.5 ms,
#: with the same generation throughput (tools/bench/load.py)
SWITCH_INTERVAL_S = 0.0001
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


def build_zoo(config: Config, source: str | None = None) -> Zoo:
    """Load every model now (READY means loaded). `source` names where the model list came
    from when it was not the config file (`--model`)."""
    models = config.models
    try:
        with warnings.catch_warnings():
            # an eager zoo warns about a model it cannot load; `get` below raises the same
            # error, reported once as a StartupError (not as a warning with a source line)
            warnings.simplefilter("ignore", RuntimeWarning)
            if models.dirs:
                zoo = Zoo.from_dirs(list(models.dirs))
            else:
                zoo = Zoo.from_manifest(models.manifest or demo_zoo_dir() / "zoo.toml")
        for name in zoo.names:
            zoo.get(name)
    except ZooError as exc:
        raise StartupError(f"{source or config.where('[models]')}: {exc}") from None
    return zoo


def peer_type(frame: zmq.Frame | None) -> str | None:
    """The client's socket type (ZMTP metadata: "REQ", "DEALER", ...), None when unknown."""
    if frame is None:
        return None
    try:
        return str(frame.get("Socket-Type"))
    except (zmq.ZMQError, KeyError, UnicodeDecodeError):
        return None


def model_info(zoo: Zoo) -> dict[str, dict[str, Any]]:
    """What `models` reports beyond name/rank/device, taken once per (re)load so the socket
    loop never loads a model to answer: the context length and the generation defaults a
    request gets for the fields it leaves out."""
    info = {}
    for name in zoo.names:
        model = zoo.get(name)
        d = model.defaults
        info[name] = {
            # a remote model without `context` in the manifest: unknown here (it checks)
            "context_length": None if model.context is None else int(model.context),
            "defaults": {"max_new_tokens": d.max_new_tokens, "temperature": d.temperature,
                         "top_k": d.top_k, "top_p": d.top_p,
                         "repetition_penalty": d.repetition_penalty, "stop": list(d.stop or ())},
        }
    return info


def device_of(provider: str) -> str:
    """Models on one device share one worker; the device is named by its execution provider."""
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return "cuda"
    if provider.startswith("remote:"):  # a remote model: its own worker, never a local lock
        return provider
    return "cpu" if provider == "CPUExecutionProvider" else provider.removesuffix(
        "ExecutionProvider").lower()


def build_router_config(config: Config) -> RouterConfig:
    """RouterConfig from `[router]`; a value of the wrong kind is named by its key (the
    dataclass's own checks would compare a string with a float and say only that)."""
    table = dict(config.router)
    defaults = RouterConfig()
    for key, value in table.items():
        default = getattr(defaults, key, None)
        if isinstance(default, bool) or default is None:
            kinds: tuple[type, ...] | None = (bool,) if isinstance(default, bool) else None
        elif isinstance(default, (int, float)):
            kinds = (int, float) if isinstance(default, float) else (int,)
        else:
            kinds = None  # strings and unions ("auto" or a number) are checked by RouterConfig
        if kinds is not None and (not isinstance(value, kinds)
                                  or (bool not in kinds and isinstance(value, bool))):
            want = " or ".join(k.__name__ for k in kinds)
            raise StartupError(f"{config.where(f'[router] {key}')}: must be {want}, "
                               f"got {value!r}")
    try:
        return RouterConfig.from_dict(table)
    except (RouterConfigError, TypeError, ValueError) as exc:
        raise StartupError(f"{config.where('[router]')}: {exc}") from None


def build_checker(config: Config, zoo: Zoo) -> Any:
    name = config.checker or zoo.manifest.checker or "exact"
    try:
        return get_checker(name)
    except UnknownCheckerError as exc:
        raise StartupError(f"{config.where('[labels] checker')}: {exc}") from None


def build_labels(config: Config, zoo: Zoo, rconf: RouterConfig) -> tuple[LabelSources,
                                                                           RouterConfig]:
    """[labels] as LabelSources; with agreement, the router config it needs (the top model
    is the reference, exploration follows the label need)."""
    lab = config.labels
    try:
        sources = build_label_sources(
            lab.sources, checker_name=config.checker or zoo.manifest.checker or "exact",
            agreement_checker=lab.agreement_checker, similarity_threshold=lab.similarity,
            judge_model=lab.judge_model, judge_template=lab.judge_template,
            zoo_names=zoo.names,
        )
    except LabelConfigError as exc:
        raise StartupError(f"{config.source}: {exc}") from None
    return sources, rconf.for_agreement() if sources.uses("agreement") else rconf


def zoo_key(names: list[str]) -> str:
    """The zoo's model names as a file-name part: readable when the names allow it."""
    slug = "+".join(names)
    if re.fullmatch(r"[A-Za-z0-9._+-]{1,120}", slug):
        return slug
    return "zoo-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def state_file(directory: Path, names: list[str]) -> Path:
    """One state file per zoo, so a reload to another zoo and back restores what it learned."""
    return directory / f"router-state.{zoo_key(names)}.npz"


def journal_file(directory: Path, names: list[str]) -> Path:
    return directory / f"labels.{zoo_key(names)}.sqlite"


def clean_stale_temps(directory: Path) -> None:
    """Remove state temp files (`.<name>.tmp-<pid>`) left by a daemon killed mid-save."""
    for tmp in directory.glob(".router-state*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another daemon on this state dir is saving right now
        try:
            size = tmp.stat().st_size
            tmp.unlink()
            log.info("removed %s (%d bytes) left by an interrupted save", tmp, size)
        except OSError as exc:
            log.warning("cannot remove stale %s: %s", tmp, exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_router(path: Path, names: list[str], rconf: RouterConfig) -> Router:
    """The saved router, or a fresh one when the file is corrupt (set aside, or left in place
    with a warning when the directory is read-only: no crash loop). A file we may not read is
    a StartupError: it may be good, and starting fresh would overwrite it at the next save."""
    legacy = path.with_name(STATE_FILE)
    if not path.exists() and legacy.exists():
        try:  # a state from before per-zoo files: adopt it if it is this zoo's
            router = Router.restore(legacy, names, rconf)
            os.replace(legacy, path)
            log.info("router state %s renamed to %s (one file per zoo)", legacy, path)
            log_restored(router, path)
            return router
        except StateUnreadableError as exc:
            raise StartupError(str(exc)) from None
        except (StateError, OSError) as exc:
            log.warning("%s; not adopted", exc)
    try:
        router = Router.restore(path, names, rconf)
    except StateUnreadableError as exc:
        raise StartupError(str(exc)) from None
    except StateError as exc:
        if exc.aside is None:
            log.warning("%s; starting with a fresh router in memory", exc)
        else:
            log.error("%s; starting with a fresh router", exc)
        return Router(names, rconf)
    except OSError as exc:  # e.g. a bad file that cannot be moved aside
        log.warning("router state %s: %s; starting with a fresh router in memory", path, exc)
        return Router(names, rconf)
    log_restored(router, path)
    return router


def log_restored(router: Router, path: Path) -> None:
    """Say at start (and reload) what the router begins from, so an operator can tell a
    restored router from a fresh one."""
    if not path.exists():
        log.info("router: no saved state at %s; starting fresh", path)
        return
    stats = router.stats()
    log.info("router state restored from %s: t=%s requests, %s labels, q=%.3f", path,
             stats.get("t"), stats.get("labels"), float(stats.get("q") or 0.0))


def open_journal(directory: Path, names: list[str]) -> Journal | None:
    try:
        return Journal(journal_file(directory, names))
    except JournalError as exc:
        log.warning("%s: labels are not durable between saves (a kill loses them)", exc)
        return None


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
        self._outbox: Outbox | None = None
        self._sock_file: tuple[int, int] | None = None  # (device, inode) of our ipc socket
        self.received = 0
        self.dropped = 0
        self.paused = 0  # requests of clients that do not read their replies, not served
        self.started = time.monotonic()

    # -- start ---------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
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
        self.state_dir = server.state_dir or state_dir()
        self.notifier.status("loading models")
        zoo = self._zoo = build_zoo(self.config, self._models_source())
        self.model_info = model_info(zoo)
        devices = {n: device_of(zoo.get(n).provider) for n in zoo.names}
        rconf = build_router_config(self.config)
        checker = build_checker(self.config, zoo)
        labels, rconf = build_labels(self.config, zoo, rconf)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("cannot create the state directory %s: %s", self.state_dir, exc)
        clean_stale_temps(self.state_dir)
        self.state_path = state_file(self.state_dir, list(zoo.names))
        router = restore_router(self.state_path, list(zoo.names), rconf)
        journal = open_journal(self.state_dir, list(zoo.names))
        try:
            meter = self._meter = create_meter(
                self.config.energy.backend, **self.config.energy.options
            )
        except (EnergyConfigError, BackendUnavailable) as exc:
            raise StartupError(f"{self.config.where('[energy]')}: {exc}") from None
        unseen = sorted(d for d in set(devices.values())
                        if not d.startswith("remote:") and not meter.covers(d))
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
        self._outbox = Outbox(self._sock, lambda identity: self.engine.vanished(identity))
        self.engine = Engine(
            zoo, router, meter, checker, labels=labels,
            emit=self._emit, queue_size=server.queue_size, devices=devices,
            fallback_meter=self._fallback, worker_nice=server.worker_nice,
            exploration_backlog=server.exploration_backlog,
        )
        self._attach_journal(journal)
        self.engine.start()
        self.last_save = time.monotonic()
        names = ", ".join(zoo.names)
        log.info("serving %s on %s (energy: %s)", names, self.endpoint, meter.backend)
        self.notifier.ready(f"serving {len(zoo.names)} models on {self.endpoint}")

    def _models_source(self) -> str | None:
        """`--model` when the command line named the models (the config file did not)."""
        return "--model" if self.overrides.model_dirs else None

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
        self._sock_file = bind(sock, self.endpoint, server)
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
        outbox = self._outbox
        assert outbox is not None
        last_watchdog = 0.0
        last_tick = 0.0
        stopping_since: float | None = None
        while True:
            events = dict(poller.poll(TICK_S * 1000))
            if self._replies_in in events:
                self._forward_replies()
            if self._sock in events:
                self._serve_requests()
            now = time.monotonic()
            if now - last_tick < TICK_S:
                continue  # a message woke us: timers and held replies wait for the tick
            last_tick = now
            outbox.retry()  # bounded: a slow reader costs O(1) per tick
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
        while outbox.held and time.monotonic() < end:
            time.sleep(TICK_S / 5)
            outbox.flush()
        saved = self._save(final=True)
        # LINGER=0 would discard the drained replies still queued in the socket at close
        self._sock.setsockopt(zmq.LINGER, FLUSH_MS)
        if not saved:
            log.error("stopped after draining, but the final router state save failed: "
                      "exit status 1")
            return 1
        log.info("stopped after draining")
        return 0

    def _serve_requests(self) -> None:
        """Up to BATCH requests. A client with replies held (it is not reading) is paused: its
        generations get `busy` (queued behind its other replies) and, once its held queue is
        full, its requests are dropped unread, so it spends nobody's time but its own."""
        assert self._sock is not None and self._outbox is not None
        outbox = self._outbox
        sock = self._sock
        for _ in range(BATCH):
            try:
                frames = [sock.recv(zmq.NOBLOCK)]
            except zmq.Again:
                return
            # the first frame from the peer is kept as a zmq.Frame: its metadata names the
            # peer's socket type (REQ cannot take a stream); the others are plain copies
            meta: zmq.Frame | None = None
            while sock.getsockopt(zmq.RCVMORE):
                if meta is None:
                    meta = sock.recv(copy=False)
                    frames.append(meta.bytes)
                else:
                    frames.append(sock.recv())
            self.received += 1
            paused = outbox.backed_up(frames[0])
            if paused and outbox.full(frames[0]):
                self.paused += 1
                continue
            self._handle(frames, paused, meta)

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
        final replies are held (bounded per client, see `Outbox`) until there is room."""
        assert self._outbox is not None
        self._outbox.send(frames, final)

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

    def _handle(self, frames: list[bytes], paused: bool = False,
                meta: zmq.Frame | None = None) -> None:
        """Split the envelope (identities up to the empty delimiter) from the one payload."""
        if len(frames) < 2:
            self.dropped += 1
            return
        try:
            split = frames.index(b"", 1) + 1
        except ValueError:
            split = 1  # a DEALER that sends no delimiter
        envelope, payload = frames[:split], frames[split:]
        rid: str | int | None = None
        limit = self.config.server.max_message_bytes
        try:
            if len(payload) != 1:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"expected one payload frame, got {len(payload)}"
                )
            try:
                obj = unpack(payload[0], limit)
            except ProtocolError as exc:
                if exc.code is ErrorCode.TOO_LARGE:
                    rid = peek_large_id(payload[0], limit)
                raise
            rid = echo_id(obj)
            request = parse_request(obj)
            if (isinstance(request, GenerateRequest) and request.stream
                    and peer_type(meta) == "REQ"):
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, "'stream' needs a DEALER socket: a REQ socket takes "
                    "exactly one reply per request, so the parts and the final reply would be "
                    "lost; send it without 'stream' or over DEALER", request.id)
            reply = self._dispatch(request, envelope, paused)
        except ProtocolError as exc:
            self.engine.count_error(exc.code)
            reply = error_reply(exc.request_id if exc.request_id is not None else rid,
                                exc.code, exc.message)
        except Exception as exc:  # a bug in one request must not stop the daemon
            log.exception("request failed")
            self.engine.count_error(ErrorCode.INTERNAL)
            reply = error_reply(rid, ErrorCode.INTERNAL, type(exc).__name__)
        if reply is not None:
            self._emit(envelope, reply)

    def _dispatch(self, request: Any, envelope: list[bytes],
                  paused: bool = False) -> dict[str, Any] | None:
        if isinstance(request, GenerateRequest):
            if paused:
                raise ProtocolError(ErrorCode.BUSY, "earlier replies to this client are still "
                                    "unread: read them before sending more", request.id)
            now = time.monotonic()
            limit_ms = self.config.server.deadline_max_ms
            deadline_ms = min(request.deadline_ms or limit_ms, limit_ms)
            self.engine.submit(
                Job(request=request, envelope=envelope, received=now,
                    deadline=now + deadline_ms / 1000.0)
            )
            return None  # a worker replies
        if isinstance(request, FeedbackRequest):
            unknown = sorted(set(request.labels or ([request.model] if request.model else []))
                             - set(self.engine.zoo.names))
            if unknown:
                raise ProtocolError(
                    ErrorCode.MODEL_NOT_FOUND, f"no model {', '.join(map(repr, unknown))}; "
                    f"models: {', '.join(self.engine.zoo.names)}", request.id)
            return ok_reply(request.id, **self.engine.feedback(request))
        if isinstance(request, CancelRequest):
            return ok_reply(request.id, **self.engine.cancel(request))
        if request.op == "health":
            return ok_reply(request.id, **self.health())
        if request.op == "models":
            return ok_reply(request.id, models=[{**m, **self.model_info.get(m["name"], {})}
                                                for m in self.engine.models()])
        if request.op == "stats":
            return ok_reply(request.id, **self.stats())
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {request.op!r}", request.id)

    def health(self) -> dict[str, Any]:
        reply = {
            "status": "draining" if self.engine.draining else "serving",
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "models": len(self.engine.zoo.names),
            "queue": self.engine.depth(),
            "queue_size": self.engine.queue_size,
            "in_flight": self.engine.in_flight(),
        }
        remotes = self.engine.zoo.remotes()
        if remotes:  # a remote in an outage does not make the daemon unhealthy: it says so
            reply["remotes"] = remotes
        return reply

    def stats(self) -> dict[str, Any]:
        return {
            **self.engine.stats(),
            "received": self.received,
            "dropped": self.dropped + (self._outbox.dropped if self._outbox else 0),
            "outbox": self.outbox_stats(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "energy_backend": self.engine.meter.backend,
        }

    def outbox_stats(self) -> dict[str, int]:
        """Replies held for clients that do not read, and what they cost the loop."""
        box = self._outbox
        if box is None:
            return {"held": 0, "peers": 0, "retries": 0, "paused_requests": self.paused}
        return {"held": box.held, "peers": box.peers(), "retries": box.attempts,
                "paused_requests": self.paused}

    # -- state, reload, close ------------------------------------------------------------------

    def _attach_journal(self, journal: Journal | None, *, locked: bool = False) -> None:
        """Give the engine the zoo's journal and learn what it holds beyond the snapshot
        (`locked`: the caller holds router_lock)."""
        engine = self.engine
        engine.journal = journal
        if journal is None:
            return
        engine.load_stats(journal.load_json("model_stats"))
        start = journal.replay_start(file_digest(self.state_path))
        entries = journal.entries(start)
        replayed = engine.replay_locked(entries) if locked else engine.replay(entries)
        if replayed:
            log.info("replayed %d journalled labels after the saved router state", replayed)

    def _save(self, *, final: bool = False) -> bool:
        """Snapshot the router if it changed; False when that failed (logged)."""
        unsaved = self.engine.unsaved_labels
        try:
            if self.engine.save(self.state_path):
                log.debug("router state saved to %s", self.state_path)
            return True
        except OSError as exc:
            kept = ("they are in the label journal" if self.engine.journal is not None
                    else "they are lost" if final else "they will be lost if it keeps failing")
            log.error("cannot save router state to %s: %s (%d labels since the last save; %s)",
                      self.state_path, exc, unsaved, kept)
            return False

    def _reload(self) -> None:
        """Apply a changed config without dropping connections; a bad one keeps the old."""
        self.notifier.reloading()
        log.info("reloading config")
        old = self.config
        try:
            new = resolve_config(self.config_path, self.overrides)
            if new.models != old.models:
                with self.notifier.keepalive():  # loading blocks the loop's watchdog pings
                    zoo = build_zoo(new, self._models_source())
            else:
                zoo = self.engine.zoo
            rconf = build_router_config(new)
            checker = build_checker(new, zoo)
            labels, rconf = build_labels(new, zoo, rconf)
            # what the next start would refuse is refused now, not reported as "reloaded"
            check_endpoint(new.server.endpoint or default_endpoint(), new.server)
        except (ConfigError, StartupError, SecurityError) as exc:
            log.error("reload failed, keeping the old config: %s", exc)
            self.notifier.ready(f"serving on {self.endpoint} (reload failed: {exc})")
            return
        restart_only = [
            key for key in ("endpoint", "hwm", "max_message_bytes", "ipc_mode", "worker_nice",
                            "allow_insecure_tcp", "curve_secret_key", "curve_client_keys")
            if getattr(new.server, key) != getattr(old.server, key)
        ]
        if new.energy != old.energy:
            restart_only.append("energy")
        if restart_only:
            log.warning("changes to %s take effect on restart", ", ".join(restart_only))
        engine = self.engine
        self._save()
        names = list(zoo.names)
        path = state_file(self.state_dir, names)
        with engine.router_lock:
            if zoo is not engine.zoo or rconf != engine.router.config:
                # saved and replaced under one hold of the lock, so nothing learned in between
                # is lost; requests decided before learn on the new router (same zoo), and
                # a reshaped state (lp_window) is migrated by Router.restore. Another zoo has
                # its own state file and journal: switching back restores it.
                try:
                    engine.save_locked(self.state_path)
                except OSError as exc:
                    log.error("cannot save router state to %s: %s", self.state_path, exc)
                try:
                    router = restore_router(path, names, rconf)
                except StartupError as exc:
                    log.error("reload: %s; keeping the old router", exc)
                    router = None
                if router is not None:
                    engine.router = router
                    engine.router_dirty = False
                    engine.unsaved_labels = 0
                    if path != self.state_path:
                        old_journal = engine.journal
                        self.state_path = path
                        self._attach_journal(open_journal(self.state_dir, names), locked=True)
                        if old_journal is not None:
                            old_journal.close()
            engine.devices = {n: device_of(zoo.get(n).provider) for n in zoo.names}
            old_zoo, engine.zoo = engine.zoo, zoo
            engine.checker = checker
            engine.labels = labels
        if old_zoo is not zoo:
            old_zoo.close()  # a generation still running on it keeps its session until done
        self.model_info = model_info(zoo)
        engine.set_queue_size(new.server.queue_size)
        engine.set_exploration_backlog(new.server.exploration_backlog)
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
            remove_socket(self.endpoint_path, self._sock_file)
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
