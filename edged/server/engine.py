"""Generation execution: a bounded queue, one worker per device, energy windows, routing, labels.

One worker per device means at most one generation runs on a device at any time, so the energy
window around it measures that generation alone (docs/daemon.md). The socket loop (main thread)
submits jobs, cancels them and sweeps deadlines; workers route, generate and reply through `emit`,
which is thread-safe. The router is not thread-safe: every call to it holds `router_lock`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edged.checkers import Checker
from edged.energy import EnergyError, EnergyMeter, EnergyRecord
from edged.protocol import (
    CancelRequest,
    ErrorCode,
    FeedbackRequest,
    GenerateRequest,
    ProtocolError,
    delta_message,
    error_reply,
    ok_reply,
)
from edged.router import Decision, Router
from edged.zoo import (
    GenerationParams,
    GenerationResult,
    InvalidRequestError,
    LoadedModel,
    UnknownModelError,
    Zoo,
    ZooError,
)

log = logging.getLogger("edged.server")

Emit = Callable[[list[bytes], dict[str, Any]], None]
FINISHED_KEPT = 10_000  # finished requests remembered for feedback


@dataclass(eq=False)  # identity: the queue withdraws this very job
class Job:
    """One generate request from arrival to reply."""

    request: GenerateRequest
    envelope: list[bytes]
    received: float                      # time.monotonic()
    deadline: float                      # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: ErrorCode | None = None      # why `cancel` was set
    started: bool = False                # a worker owns it (guarded by Engine._lock)
    answered: bool = False               # its reply went out before a worker took it

    def stop(self, reason: ErrorCode) -> None:
        if not self.cancel.is_set():
            self.reason = reason
            self.cancel.set()


@dataclass
class _Finished:
    decision: Decision | None            # None: the client chose the model (no routing)
    router: Router | None                # the router that decided (a reload may replace it)
    primary: str
    ran: tuple[str, ...]
    labelled: set[str] = field(default_factory=set)


@dataclass
class _Output:
    result: GenerationResult
    record: EnergyRecord | None

    @property
    def joules(self) -> float | None:
        """The measured joules; None when unmeasured (a failed window, or the "none" meter's
        NaN), so the router never learns a made-up cost."""
        rec = self.record
        return rec.joules if rec is not None and math.isfinite(rec.joules) else None


@dataclass
class _ModelStats:
    calls: int = 0
    joules: float = 0.0
    labels: int = 0
    satisfied: int = 0


class JobQueue:
    """A bounded FIFO whose queued jobs can be withdrawn, so a cancel frees its slot at once."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Job | None] = deque()
        self._cond = threading.Condition()

    def put(self, job: Job) -> bool:
        """False when full."""
        with self._cond:
            if sum(item is not None for item in self._items) >= self.maxsize:
                return False
            self._items.append(job)
            self._cond.notify()
            return True

    def put_stop(self) -> None:
        """Wake one worker and tell it to exit (not bounded by `maxsize`)."""
        with self._cond:
            self._items.append(None)
            self._cond.notify()

    def get(self) -> Job | None:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    def withdraw(self, job: Job) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._items.remove(job)

    def __len__(self) -> int:
        with self._cond:
            return sum(item is not None for item in self._items)


class Engine:
    """Owns the zoo, the router, the meter and the workers; the socket loop drives it."""

    def __init__(
        self,
        zoo: Zoo,
        router: Router,
        meter: EnergyMeter,
        checker: Checker,
        *,
        emit: Emit,
        queue_size: int,
        devices: dict[str, str],
    ) -> None:
        self.zoo = zoo
        self.router = router
        self.meter = meter
        self.checker = checker
        self.devices = devices
        self.router_lock = threading.Lock()
        self.router_dirty = False
        self._emit = emit
        self._queue = JobQueue(queue_size)
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self._device_locks = {d: threading.Lock() for d in set(devices.values()) or {"cpu"}}
        self._stats: dict[str, _ModelStats] = {}
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self.draining = False
        self._workers = [
            threading.Thread(target=self._work, name=f"edged-worker-{d}", daemon=True)
            for d in sorted(self._device_locks)
        ]

    # -- lifecycle (main thread) --------------------------------------------------------------

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the workers once the queue is empty (call after draining)."""
        for _ in self._workers:
            self._queue.put_stop()
        end = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(0.0, end - time.monotonic()))

    def set_queue_size(self, size: int) -> None:
        self._queue.maxsize = size

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    def count_error(self, code: ErrorCode) -> None:
        with self._lock:
            self.errors[code.value] += 1

    def idle(self) -> bool:
        with self._lock:
            return not self._active

    def depth(self) -> int:
        return len(self._queue)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._active)

    # -- requests from the socket loop (main thread) ------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a generation or raise `ProtocolError` (busy, shutting_down, duplicate, ...)."""
        rid = job.request.id
        if self.draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down", rid)
        if job.request.model is not None and job.request.model not in self.zoo.names:
            raise ProtocolError(
                ErrorCode.MODEL_NOT_FOUND,
                f"no model {job.request.model!r}; models: {', '.join(self.zoo.names)}",
                rid,
            )
        with self._lock:
            if rid in self._active:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST, f"request id {rid!r} is already in flight", rid
                )
            if not self._queue.put(job):
                raise ProtocolError(
                    ErrorCode.BUSY, f"the queue is full ({self._queue.maxsize} waiting)", rid
                )
            self._active[rid] = job

    def cancel(self, request: CancelRequest) -> dict[str, Any]:
        with self._lock:
            job = self._active.get(request.request_id)
            if job is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_REQUEST,
                    f"no request {request.request_id!r} is queued or running",
                    request.id,
                )
            queued = not job.started
            job.stop(ErrorCode.CANCELLED)
            replies = [self._take_queued(job, ErrorCode.CANCELLED, "cancelled while queued")
                       ] if queued else []
        self._emit_all(replies)
        return {"request_id": request.request_id, "was": "queued" if queued else "running"}

    def sweep(self, now: float) -> None:
        """Enforce deadlines: answer expired queued jobs, stop expired running ones."""
        replies = []
        with self._lock:
            expired = [j for j in self._active.values() if now >= j.deadline]
            for job in expired:
                job.stop(ErrorCode.DEADLINE_EXCEEDED)
                if not job.started:
                    replies.append(self._take_queued(
                        job, ErrorCode.DEADLINE_EXCEEDED, "deadline passed queued"))
        self._emit_all(replies)

    def vanished(self, identity: bytes) -> None:
        """A client went away: stop its work, nobody will read the reply."""
        with self._lock:
            for job in list(self._active.values()):
                if job.envelope and job.envelope[0] == identity:
                    job.stop(ErrorCode.CANCELLED)
                    if not job.started:
                        job.answered = True
                        self._queue.withdraw(job)
                        del self._active[job.request.id]

    def stop_all(self) -> None:
        """Second SIGTERM: stop everything now."""
        replies = []
        with self._lock:
            for job in list(self._active.values()):
                job.stop(ErrorCode.SHUTTING_DOWN)
                if not job.started:
                    replies.append(self._take_queued(
                        job, ErrorCode.SHUTTING_DOWN, "the daemon is stopping"))
        self._emit_all(replies)

    def _take_queued(
        self, job: Job, code: ErrorCode, message: str
    ) -> tuple[list[bytes], dict[str, Any]]:
        """Withdraw a queued job (caller holds `_lock`) and return its error reply, which the
        caller sends once the lock is released: a send to a vanished client re-enters the lock
        through `vanished`."""
        job.answered = True
        self._queue.withdraw(job)
        self._active.pop(job.request.id, None)
        self.errors[code.value] += 1
        return job.envelope, error_reply(job.request.id, code, message, done=True)

    def _emit_all(self, replies: list[tuple[list[bytes], dict[str, Any]]]) -> None:
        for envelope, reply in replies:
            self._emit(envelope, reply)

    def feedback(self, request: FeedbackRequest) -> dict[str, Any]:
        rid = request.request_id
        with self._lock:
            finished = self._finished.get(rid)
            running = rid in self._active
        if finished is None:
            why = "is still running" if running else "is unknown or too old"
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"request {rid!r} {why}", request.id)
        if finished.decision is None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"request {rid!r} named its model, so it bypassed routing: nothing to label",
                request.id,
            )
        labels = request.labels or {request.model or finished.primary: bool(request.satisfied)}
        for name in labels:
            if name not in finished.ran:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"model {name!r} did not answer request {rid!r} (ran: "
                    f"{', '.join(finished.ran)})",
                    request.id,
                )
            if name in finished.labelled:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"request {rid!r} already has a label for {name!r}",
                    request.id,
                )
        self._observe_labels(finished, labels)
        return {"request_id": rid, "labels": labels}

    # -- workers -------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.answered:
                    continue
                job.started = True
            try:
                reply = self._run(job)
            except ProtocolError as exc:
                self.count_error(exc.code)
                extra = {"text": exc.text} if isinstance(exc, Stopped) else {}
                reply = error_reply(job.request.id, exc.code, exc.message, **extra)
            except Exception as exc:  # the daemon must outlive a bug in one request
                log.exception("request %s failed", job.request.id)
                self.count_error(ErrorCode.INTERNAL)
                reply = error_reply(job.request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}")
            reply["done"] = True
            with self._lock:
                self._active.pop(job.request.id, None)
            try:
                self._emit(job.envelope, reply)
            except Exception:  # a reply that cannot be sent must not take the worker with it
                log.exception("reply to %s could not be sent", job.request.id)

    def _run(self, job: Job) -> dict[str, Any]:
        req = job.request
        started = time.monotonic()
        if job.cancel.is_set():
            raise ProtocolError(job.reason or ErrorCode.CANCELLED, "stopped in queue", req.id)
        queue_ms = (started - job.received) * 1000.0
        zoo = self.zoo
        decision: Decision | None = None
        router: Router | None = None
        if req.model is not None:
            run = [req.model]
        else:
            remaining_ms = max(0.0, (job.deadline - started) * 1000.0)
            with self.router_lock:
                router = self.router  # a reload may swap it: learn on the one that decided
                decision = router.decide(req.text(), deadline_ms=remaining_ms)
                self.router_dirty = True
            run = [decision.model] + [m for m in decision.run if m != decision.model]
        primary = run[0]
        outputs: dict[str, _Output] = {}     # finished runs: learned from, labelled
        others: dict[str, dict[str, Any]] = {}  # every other model of the run, as reported
        for name in run:
            if job.cancel.is_set():
                reason = job.reason or ErrorCode.CANCELLED
                if name == primary:
                    raise ProtocolError(reason, "stopped before it started", req.id)
                others[name] = _error_fields(reason, "not run: the request was stopped")
                continue
            try:
                out = self._generate(zoo, name, job, stream=req.stream and name == primary)
            except ProtocolError as exc:
                if name == primary:
                    raise
                log.warning("request %s: exploring %s failed: %s", req.id, name, exc.message)
                others[name] = _error_fields(exc.code, exc.message)
                continue
            self._count_run(name, out)
            if name != primary:
                others[name] = _output_fields(out, name, queue_ms)
            if out.result.finish_reason != "cancelled":
                outputs[name] = out
            elif name == primary:
                raise Stopped(job.reason or ErrorCode.CANCELLED,
                              _stopped_message(job.reason, out.result), req.id, out.result.text)
        finished = _Finished(decision=decision, router=router, primary=primary,
                             ran=tuple(outputs))
        energy_j = {m: j for m, o in outputs.items() if (j := o.joules) is not None}
        if router is not None and decision is not None and energy_j:
            latency_s = {m: o.result.total_ms / 1000.0 for m, o in outputs.items()}
            with self.router_lock:
                router.observe_energy(decision, energy_j=energy_j, latency_s=latency_s)
        labels: dict[str, bool] = {}
        if req.reference is not None:
            reference = req.reference
            labels = {m: bool(self.checker(o.result.text, reference)) for m, o in outputs.items()}
            if decision is not None:
                self._observe_labels(finished, labels)
        with self._lock:
            self._finished[req.id] = finished
            self._finished.move_to_end(req.id)
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
            self.completed += 1
        reply = ok_reply(req.id, **_output_fields(outputs[primary], primary, queue_ms))
        reply["route"] = _route_fields(decision)
        if labels:
            reply["labels"] = labels
        if others:
            reply["exploration"] = [{"model": m, **fields} for m, fields in others.items()]
        return reply

    def _count_run(self, name: str, out: _Output) -> None:
        """Every run spent energy, finished or cut short: count it in the per-model stats."""
        with self.router_lock:
            stats = self._stats.setdefault(name, _ModelStats())
            stats.calls += 1
            stats.joules += out.joules or 0.0

    def _observe_labels(self, finished: _Finished, labels: dict[str, bool]) -> None:
        with self.router_lock:
            assert finished.router is not None and finished.decision is not None
            finished.router.observe_labels(finished.decision, labels)
            self.router_dirty = True
            finished.labelled.update(labels)
            for name, ok in labels.items():
                stats = self._stats.setdefault(name, _ModelStats())
                stats.labels += 1
                stats.satisfied += int(ok)

    def _generate(self, zoo: Zoo, name: str, job: Job, *, stream: bool) -> _Output:
        req = job.request
        try:
            model = zoo.get(name)
        except UnknownModelError:
            raise ProtocolError(ErrorCode.MODEL_NOT_FOUND, f"no model {name!r}", req.id) from None
        except ZooError as exc:
            raise ProtocolError(ErrorCode.MODEL_ERROR, str(exc), req.id) from None
        try:
            params = _params(model, req)
        except InvalidRequestError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc), req.id) from None
        on_delta = None
        if stream:
            def on_delta(text: str) -> None:
                self._emit(job.envelope, delta_message(req.id, text))

        def call() -> GenerationResult:
            if req.prompt is not None:
                return model.generate(req.prompt, params=params, on_delta=on_delta,
                                      cancel=job.cancel)
            return model.generate(messages=[dict(m) for m in req.messages or ()],
                                  params=params, on_delta=on_delta, cancel=job.cancel)

        with self._device_lock(name):
            try:
                return self._measured(call)
            except InvalidRequestError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name}: {exc}", req.id) from None
            except ZooError as exc:
                raise ProtocolError(ErrorCode.MODEL_ERROR, f"{name}: {exc}", req.id) from None

    def _device_lock(self, name: str) -> threading.Lock:
        """The lock of the model's device (a device new since a reload shares the first one)."""
        lock = self._device_locks.get(self.devices.get(name, "cpu"))
        return lock if lock is not None else next(iter(self._device_locks.values()))

    def _measured(self, call: Callable[[], GenerationResult]) -> _Output:
        """Run `call` in an energy window; a failing meter costs the reading, not the reply."""
        results: list[GenerationResult] = []
        try:
            with self.meter.window() as window:
                results.append(call())
            return _Output(results[0], window.record)
        except EnergyError as exc:
            log.warning("energy window failed: %s", exc)
            return _Output(results[0] if results else call(), None)

    # -- reporting -----------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "rank": i, "device": self.devices.get(name, "cpu")}
            for i, name in enumerate(self.zoo.names)
        ]

    def stats(self) -> dict[str, Any]:
        with self.router_lock:
            router_stats = _plain(self.router.stats())
            models = {
                name: {
                    "calls": s.calls,
                    "joules": s.joules,
                    "mean_joules": s.joules / s.calls if s.calls else None,
                    "labels": s.labels,
                    "satisfied": s.satisfied,
                    "satisfaction": s.satisfied / s.labels if s.labels else None,
                }
                for name, s in self._stats.items()
            }
        return {
            "completed": self.completed,
            "errors": self._error_counts(),
            "queue": self.depth(),
            "queue_size": self.queue_size,
            "in_flight": self.in_flight(),
            "models": models,
            "router": router_stats,
        }

    def _error_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.errors)

    def save(self, path: Path) -> bool:
        """Persist the router state (atomic in Router.save) if it changed; True when written."""
        with self.router_lock:
            if not self.router_dirty:
                return False
            self.router.save(path)
            self.router_dirty = False
            return True


class Stopped(ProtocolError):
    """A generation stopped early (cancel, deadline, shutdown); `text` is what it had produced."""

    def __init__(self, code: ErrorCode, message: str, request_id: str, text: str) -> None:
        super().__init__(code, message, request_id)
        self.text = text


def _stopped_message(reason: ErrorCode | None, result: GenerationResult) -> str:
    what = {
        ErrorCode.DEADLINE_EXCEEDED: "deadline passed",
        ErrorCode.SHUTTING_DOWN: "the daemon is stopping",
    }.get(reason or ErrorCode.CANCELLED, "cancelled")
    return f"{what} after {result.completion_tokens} tokens"


def _params(model: LoadedModel, req: GenerateRequest) -> GenerationParams:
    """The model's generation defaults, overridden by what the request sets."""
    changes = {
        key: getattr(req, key)
        for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                    "seed", "stop")
        if getattr(req, key) is not None
    }
    return replace(model.defaults, **changes)


def _output_fields(out: _Output, name: str, queue_ms: float) -> dict[str, Any]:
    r, rec = out.result, out.record
    return {
        "text": r.text,
        "model": name,
        "finish_reason": r.finish_reason,
        "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens},
        "timing": {
            "queue_ms": round(queue_ms, 3),
            "ttft_ms": round(r.ttft_ms, 3),
            "total_ms": round(r.total_ms, 3),
            "tokens_per_s": round(r.tokens_per_s, 3),
        },
        "energy": None if rec is None else rec.to_dict(),
    }


def _error_fields(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"error": {"code": code.value, "message": message}}


def _route_fields(decision: Decision | None) -> dict[str, Any]:
    if decision is None:
        return {"routed": False}
    return {"routed": True, **_plain(decision.to_dict())}


def _plain(value: Any) -> Any:
    """Numpy scalars, tuples and dataclass-ish values as msgpack-able plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
