"""Generation execution: a bounded queue, one worker per device, energy windows, routing, labels.

One worker per device, and each worker runs only its device's generations, so at most one
generation runs on a device at a time and no worker waits on another device's lock. A worker
takes, in order: requests already routed to its device, new requests (it routes them and hands
them to the right device), then exploration runs for its device. The reply goes out when the
served model finishes; the other models of an exploring decision run afterwards at the lowest
priority, and their joules and labels go to the router and the stats, not to the reply. With
several devices each generation is measured in a device window (docs/energy.md): its own scope
where the meter has one, shared channels split by active time and marked approximate.
The socket loop (main thread) submits jobs, cancels them and sweeps deadlines; workers route,
generate and reply through `emit`, which is thread-safe. The router is not thread-safe: every
call to it holds `router_lock`, and learning always goes to the current router (a reload
replaces it), never to a discarded one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
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
from edged.router import Decision, Router, RouterError
from edged.server.journal import Entry, Journal, JournalError, file_digest
from edged.server.labels import PSEUDO, SOURCES, LabelSources, parse_judge
from edged.zoo import (
    GenerationParams,
    GenerationResult,
    InvalidRequestError,
    LoadedModel,
    RemoteModel,
    RemoteResult,
    RemoteUnavailableError,
    UnknownModelError,
    Zoo,
    ZooError,
)

log = logging.getLogger("edged.server")

Emit = Callable[[list[bytes], dict[str, Any]], None]
FINISHED_KEPT = 10_000  # finished requests remembered for feedback


def lower_priority(delta: int) -> int | None:
    """Raise the calling thread's nice value by `delta` (at most 19); its new nice, or None
    when nothing changed. Linux only: there a thread has its own nice value (elsewhere
    `setpriority` would lower the whole process, the socket loop with it).

    Why: a worker is CPU-bound for as long as requests wait, the socket loop needs a CPU for a
    few tens of microseconds per message. At equal priority the loop waited for a CPU about
    twice as long as it ran under 128 closed-loop clients, and every `busy` reply waited with
    it (tools/bench/load.py, docs/daemon.md). Raising one's own nice needs no privilege."""
    if delta <= 0 or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + delta)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        log.warning("cannot lower the priority of %s: %s", threading.current_thread().name, exc)
        return None
    return nice


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


#: journal source of a request the agreement reference (top model) served: no label, a queue
#: entry (see `Router.observe_reference`)
SERVED_REFERENCE = "served-reference"

#: how the reply accounts for exploration energy (the reply's `exploration_energy` field)
EXPLORATION_ENERGY = "after_reply"


@dataclass
class _Finished:
    """A replied request, kept for feedback and for its explorations still to come."""

    decision: Decision | None            # None: the client chose the model (no routing)
    dim_bits: int                        # feature size of the router that decided
    primary: str
    text: str = ""                       # what the router featurized (the journal replays it)
    ran: set[str] = field(default_factory=set)        # finished: may be labelled
    pending: set[str] = field(default_factory=set)    # exploration queued or running
    labelled: set[str] = field(default_factory=set)
    texts: dict[str, str] = field(default_factory=dict)        # each finished run's reply
    sources: dict[str, str] = field(default_factory=dict)      # label source per model
    values: dict[str, float] = field(default_factory=dict)     # label per model


@dataclass
class _Output:
    result: GenerationResult
    record: EnergyRecord | None
    #: a remote model: the local meter over the wait (reported apart, never learned)
    wait: EnergyRecord | None = None

    @property
    def joules(self) -> float | None:
        """The measured joules; None when unmeasured (a failed window, or the "none" meter's
        NaN), so the router never learns a made-up cost."""
        rec = self.record
        return rec.joules if rec is not None and math.isfinite(rec.joules) else None


@dataclass
class _ModelStats:
    calls: int = 0
    measured: int = 0                    # calls whose joules were measured
    joules: float = 0.0
    explorations: int = 0
    exploration_joules: float = 0.0
    labels: int = 0
    satisfied: int = 0
    labels_reference: int = 0
    labels_feedback: int = 0
    labels_agreement: int = 0
    labels_judge: int = 0
    judge_calls: int = 0
    judge_joules: float = 0.0


@dataclass(eq=False)
class _Routed:
    """A decided job waiting for (or on) its served model's device."""

    job: Job
    decision: Decision | None
    dim_bits: int
    run: tuple[str, ...]                 # served model first
    queue_ms: float
    excluded: frozenset[str] = frozenset()  # remote models that failed this request


@dataclass(eq=False)
class _Exploration:
    """One model of an exploring decision, or a judge, run after the reply."""

    job: Job                             # a copy with its own cancel event and no deadline
    finished: _Finished
    model: str
    judged: str | None = None            # a judge run: the model whose reply it judges


class _Outage(ProtocolError):
    """A remote model could not serve (down, slow, refused): `model_error` for a request that
    named it; a routed request is routed again without it, unless text already streamed."""

    def __init__(self, message: str, request_id: str, model: str, streamed: bool) -> None:
        super().__init__(ErrorCode.MODEL_ERROR, message, request_id)
        self.model = model
        self.streamed = streamed


class Tasks:
    """New jobs (bounded FIFO, withdrawable) and per-device routed jobs and explorations.

    `get(device)` serves, in order: jobs routed to `device`, new jobs (anyone may route them),
    then explorations on `device`, so exploration does not delay a new request, until more
    than `backlog` explorations wait on the device: then the oldest runs first. Explorations
    are where the router's labels come from (the only source with agreement labels); under a
    back-to-back stream they would otherwise all wait for its end, and the router would learn
    nothing while it lasts.
    """

    def __init__(self, maxsize: int, devices: list[str], backlog: int = 8) -> None:
        self.maxsize = maxsize
        self.backlog = backlog
        self._incoming: deque[Job] = deque()
        self._routed: dict[str, deque[_Routed]] = {d: deque() for d in devices}
        self._explore: dict[str, deque[_Exploration]] = {d: deque() for d in devices}
        self._stopping = False
        self._cond = threading.Condition()

    def put(self, job: Job) -> bool:
        """False when full."""
        with self._cond:
            if len(self._incoming) >= self.maxsize:
                return False
            self._incoming.append(job)
            self._cond.notify_all()
            return True

    def put_routed(self, device: str, routed: _Routed) -> None:
        with self._cond:
            self._routed[device].append(routed)
            self._cond.notify_all()

    def put_exploration(self, device: str, task: _Exploration) -> None:
        with self._cond:
            self._explore[device].append(task)
            self._cond.notify_all()

    def get(self, device: str) -> Job | _Routed | _Exploration | None:
        """The next task for `device`'s worker; None once stopping and nothing is left for it."""
        with self._cond:
            while True:
                if self._routed[device]:
                    return self._routed[device].popleft()
                if len(self._explore[device]) > self.backlog and not self._stopping:
                    return self._explore[device].popleft()
                if self._incoming:
                    return self._incoming.popleft()
                if self._stopping:
                    return None
                if self._explore[device]:
                    return self._explore[device].popleft()
                self._cond.wait()

    def stop(self) -> None:
        """Workers exit once routed and new jobs are done; queued explorations are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def drop_explorations(self) -> list[_Exploration]:
        with self._cond:
            dropped = [t for q in self._explore.values() for t in q]
            for q in self._explore.values():
                q.clear()
            return dropped

    def explorations(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._explore.values())

    def withdraw(self, job: Job) -> None:
        with self._cond, contextlib.suppress(ValueError):
            self._incoming.remove(job)

    def __len__(self) -> int:
        with self._cond:
            return len(self._incoming)


class Engine:
    """Owns the zoo, the router, the meter and the workers; the socket loop drives it."""

    def __init__(
        self,
        zoo: Zoo,
        router: Router,
        meter: EnergyMeter,
        checker: Checker,
        *,
        labels: LabelSources | None = None,
        emit: Emit,
        queue_size: int,
        devices: dict[str, str],
        fallback_meter: EnergyMeter | None = None,
        worker_nice: int = 0,
        exploration_backlog: int = 8,
    ) -> None:
        self.zoo = zoo
        self.router = router
        self.meter = meter
        #: measures devices `meter` does not see (a CPU model beside NVML): an estimate
        self.fallback_meter = fallback_meter
        self.checker = checker
        self.labels = labels or LabelSources()
        self.devices = devices
        #: workers run this much nicer than the thread that starts them (the socket loop)
        self.worker_nice = worker_nice
        self.router_lock = threading.Lock()
        self.router_dirty = False
        #: write-ahead label journal of the current router's zoo (None: labels not durable)
        self.journal: Journal | None = None
        self.unsaved_labels = 0              # labels learned since the last snapshot
        self._journal_failed = False
        self._emit = emit
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}
        self._finished: OrderedDict[str, _Finished] = OrderedDict()
        self._device_locks = {d: threading.Lock() for d in set(devices.values()) or {"cpu"}}
        self._queue = Tasks(queue_size, sorted(self._device_locks), exploration_backlog)
        self._stats: dict[str, _ModelStats] = {}
        self._exploring: set[_Exploration] = set()  # running now
        #: explorations of a reply already sent, not yet queued: counted as queued, so `stats`
        #: and `idle` never miss them in between (a client reading `stats` right after its
        #: reply, while the worker that sent it waits for a CPU, saw none)
        self._announced = 0
        self.explorations_done = 0
        self.explorations_dropped = 0
        self.errors: Counter[str] = Counter()
        self.completed = 0
        self._draining = False
        self._workers = [
            threading.Thread(target=self._work, args=(d,), name=f"edged-worker-{d}", daemon=True)
            for d in sorted(self._device_locks)
        ]

    # -- lifecycle (main thread) --------------------------------------------------------------

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the workers once the queue is empty (call after draining)."""
        self._queue.stop()
        end = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.join(max(0.0, end - time.monotonic()))

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        """Draining takes no new work: queued explorations are dropped (running ones finish)."""
        self._draining = value
        if value:
            self._drop_explorations("the daemon is stopping")

    def _drop_explorations(self, why: str) -> None:
        dropped = self._queue.drop_explorations()
        if dropped:
            log.info("dropped %d queued exploration runs: %s", len(dropped), why)
        with self._lock:
            self.explorations_dropped += len(dropped)
            for task in dropped:
                task.finished.pending.discard(task.model)

    def set_queue_size(self, size: int) -> None:
        self._queue.maxsize = size

    def set_exploration_backlog(self, backlog: int) -> None:
        self._queue.backlog = backlog

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    def count_error(self, code: ErrorCode) -> None:
        with self._lock:
            self.errors[code.value] += 1

    def idle(self) -> bool:
        """No request in flight and no exploration running or queued."""
        with self._lock:
            busy = bool(self._active or self._exploring or self._announced)
        return not busy and self._queue.explorations() == 0

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
            for task in self._exploring:
                task.job.stop(ErrorCode.SHUTTING_DOWN)
        self._drop_explorations("the daemon is stopping now")
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
        return job.envelope, error_reply(job.request.id, code, message, text="")

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
        if not self.labels.uses("feedback"):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                "feedback is not a label source of this daemon ([labels] sources)",
                                request.id)
        labels = request.labels or {request.model or finished.primary: bool(request.satisfied)}
        replaces: dict[str, float] = {}
        for name in labels:
            if name in finished.pending:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_REQUEST,
                    f"model {name!r} is still exploring request {rid!r}: label it once it ran",
                    request.id,
                )
            if name not in finished.ran:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"model {name!r} did not answer request {rid!r} (ran: "
                    f"{', '.join(sorted(finished.ran))})",
                    request.id,
                )
            if name in finished.labelled:
                if finished.sources.get(name) not in PSEUDO:
                    raise ProtocolError(
                        ErrorCode.BAD_REQUEST,
                        f"request {rid!r} already has a label for {name!r}",
                        request.id,
                    )
                replaces[name] = finished.values[name]  # a real label overrides a pseudo one
        pseudo = sorted(replaces)
        served = finished.decision.model
        if served in labels and finished.sources.get(served) == SERVED_REFERENCE:
            replaces[served] = 1.0  # the queue counted the top model's reply as agreeing
        weight = 1.0
        if served in replaces:  # it takes the pseudo-label's place and weight
            weight = 1.0 / max(finished.decision.top_chance, 1e-9)
        durable = self._observe_labels(finished, labels, "feedback", replaces, weight)
        return {"request_id": rid, "labels": labels, "source": "feedback", "durable": durable,
                "replaced": pseudo}

    # -- workers -------------------------------------------------------------------------------

    def _worker_device(self, name: str) -> str:
        """The worker device of a model (a device new since a reload shares the first one)."""
        device = self.devices.get(name, "cpu")
        return device if device in self._device_locks else next(iter(sorted(self._device_locks)))

    def _work(self, device: str) -> None:
        lower_priority(self.worker_nice)
        while True:
            task = self._queue.get(device)
            if task is None:
                return
            if isinstance(task, _Exploration):
                self._explore(task)
                continue
            job = task.job if isinstance(task, _Routed) else task
            if isinstance(task, Job):
                with self._lock:
                    if job.answered:
                        continue
                    job.started = True
            try:
                routed = task if isinstance(task, _Routed) else self._route(job)
                target = self._worker_device(routed.run[0])
                if target != device:  # the served model lives on another device's worker
                    self._queue.put_routed(target, routed)
                    continue
                try:
                    reply, explore = self._serve(routed)
                except _Outage as exc:
                    excluded = routed.excluded | {exc.model}
                    if (routed.decision is None or exc.streamed
                            or excluded >= set(self.zoo.names)):
                        raise
                    # the router learns nothing from the outage: this decision is dropped and
                    # the request decided again without the failed model
                    log.warning("request %s: %s; routing it again without %s",
                                job.request.id, exc.message, exc.model)
                    routed = self._route(job, frozenset(excluded))
                    self._queue.put_routed(self._worker_device(routed.run[0]), routed)
                    continue
            except ProtocolError as exc:
                self.count_error(exc.code)
                extra = ({"text": exc.text} if isinstance(exc, Stopped)
                         else {"text": ""} if exc.code in _STOP_CODES else {})
                reply, explore = error_reply(job.request.id, exc.code, exc.message, **extra), []
            except Exception as exc:  # the daemon must outlive a bug in one request
                log.exception("request %s failed", job.request.id)
                self.count_error(ErrorCode.INTERNAL)
                reply = error_reply(job.request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}")
                explore = []
            reply["done"] = True
            with self._lock:
                self._active.pop(job.request.id, None)
                self._announced += len(explore)
                if reply["ok"] and job.reason is ErrorCode.CANCELLED:
                    # the cancel came after the last token but before this point: it was told
                    # `was: running`, so the reply is `cancelled` (with the whole text)
                    self.errors[ErrorCode.CANCELLED.value] += 1
                    reply = error_reply(job.request.id, ErrorCode.CANCELLED,
                                        "cancelled after the generation had finished",
                                        text=reply.get("text", ""))
            try:
                self._emit(job.envelope, reply)
            except Exception:  # a reply that cannot be sent must not take the worker with it
                log.exception("reply to %s could not be sent", job.request.id)
            for task in explore:  # after the reply: the client does not wait for these
                self._queue.put_exploration(self._worker_device(task.model), task)
            if explore:
                with self._lock:  # after queueing them: a reader counts them once or twice,
                    self._announced -= len(explore)  # never not at all

    def _route(self, job: Job, excluded: frozenset[str] = frozenset()) -> _Routed:
        req = job.request
        started = time.monotonic()
        if job.cancel.is_set():
            raise ProtocolError(job.reason or ErrorCode.CANCELLED, "stopped in queue", req.id)
        queue_ms = (started - job.received) * 1000.0
        decision: Decision | None = None
        with self.router_lock:
            dim_bits = self.router.config.dim_bits
            if req.model is None:
                # the client waits for the served model only: its remaining time is the budget
                remaining_ms = max(1e-3, (job.deadline - started) * 1000.0)
                down = (self.zoo.unavailable() | excluded) & set(self.router.names)
                if down:  # remote models in an outage: routed around, nothing learned
                    decision = self.router.decide(req.text(), deadline_ms=remaining_ms,
                                                  exclude=down)
                else:
                    decision = self.router.decide(req.text(), deadline_ms=remaining_ms)
                self.router_dirty = True
        if decision is None:
            assert req.model is not None
            run: tuple[str, ...] = (req.model,)
        else:
            run = (decision.model, *(m for m in decision.run if m != decision.model))
        return _Routed(job, decision, dim_bits, run, queue_ms, excluded)

    def _serve(self, routed: _Routed) -> tuple[dict[str, Any], list[_Exploration]]:
        """Run the served model, learn from it, and return the reply and the explorations."""
        job, decision, primary = routed.job, routed.decision, routed.run[0]
        req = job.request
        if job.cancel.is_set():
            raise ProtocolError(job.reason or ErrorCode.CANCELLED, "stopped before it started",
                                req.id)
        out = self._generate(primary, job, stream=req.stream)
        self._count_run(primary, out, exploring=False)
        if out.result.finish_reason == "cancelled":
            raise Stopped(job.reason or ErrorCode.CANCELLED,
                          _stopped_message(job.reason, out.result), req.id, out.result.text)
        finished = _Finished(decision=decision, dim_bits=routed.dim_bits, primary=primary,
                             ran={primary}, text=req.text() if decision is not None else "",
                             texts={primary: out.result.text})
        explore = [
            _Exploration(replace(job, cancel=threading.Event(), reason=None, deadline=math.inf),
                         finished, name)
            for name in routed.run[1:]
        ]
        judge = self._judge_task(job, finished)
        if judge is not None:
            explore.append(judge)
        finished.pending.update(task.model for task in explore if task.judged is None)
        self._learn(finished, primary, out, req.reference)
        self._served_reference(finished, judged=judge is not None)
        with self._lock:
            self._finished[req.id] = finished
            self._finished.move_to_end(req.id)
            while len(self._finished) > FINISHED_KEPT:
                self._finished.popitem(last=False)
            self.completed += 1
        reply = ok_reply(req.id, **_output_fields(out, primary, routed.queue_ms))
        reply["route"] = _route_fields(decision)
        if req.reference is not None and self.labels.uses("reference"):
            reply["labels"] = {primary: bool(self.checker(out.result.text, req.reference))}
            reply["label_source"] = "reference"
        runs = [t for t in explore if t.judged is None]
        if runs:
            reply["exploration"] = [{"model": t.model, "status": "queued"} for t in runs]
            reply["exploration_energy"] = EXPLORATION_ENERGY
        if judge is not None:
            reply["judge"] = {"model": judge.model, "status": "queued"}
        return reply, explore

    def _served_reference(self, finished: _Finished, judged: bool = False) -> None:
        """With agreement labels, a request the top model served counts in the queue as
        agreeing (its answer is the reference); journalled so a restart keeps the queue. Not
        when another label of the served reply moves the queue instead: a reference label
        already learned, or a judge run on its way (`judged`)."""
        if not self.labels.uses("agreement") or finished.decision is None or judged:
            return
        with self._lock:
            if finished.primary in finished.labelled:
                return
        with self.router_lock:
            router = self._router_for(finished)
            if router is None or finished.primary != router.names[-1]:
                return
            if self.journal is not None:
                with contextlib.suppress(JournalError):
                    self.journal.append(finished.text, finished.decision.model,
                                        finished.decision.target, {}, SERVED_REFERENCE)
            router.observe_reference(finished.decision)
            self.router_dirty = True
        with self._lock:  # a feedback label for the reply later takes this entry's place
            finished.sources[finished.primary] = SERVED_REFERENCE
            finished.values[finished.primary] = 1.0

    def _judge_task(self, job: Job, finished: _Finished) -> _Exploration | None:
        """A judge run for the served reply, when the judge is a label source and no reference
        labels the request."""
        judge = self.labels.judge_model
        req = job.request
        if (judge is None or not self.labels.uses("judge") or finished.decision is None
                or (req.reference is not None and self.labels.uses("reference"))):
            return None
        prompt = self.labels.judge_prompt(req.text(), finished.texts[finished.primary])
        request = replace(req, prompt=prompt, messages=None, stream=False, reference=None,
                          max_new_tokens=self.labels.judge_max_new_tokens, temperature=0.0,
                          stop=None, seed=None)
        return _Exploration(replace(job, request=request, cancel=threading.Event(), reason=None,
                                    deadline=math.inf), finished, judge, judged=finished.primary)

    def _explore(self, task: _Exploration) -> None:
        """One exploration run after the reply: its joules and label teach the router."""
        if task.judged is not None:
            self._judge(task)
            return
        name, finished, req = task.model, task.finished, task.job.request
        with self._lock:
            self._exploring.add(task)
        try:
            out = self._generate(name, task.job, stream=False)
        except ProtocolError as exc:
            log.warning("request %s: exploring %s failed: %s", req.id, name, exc.message)
            out = None
        except Exception:
            log.exception("request %s: exploring %s failed", req.id, name)
            out = None
        try:
            if out is not None:
                self._count_run(name, out, exploring=True)
                if out.result.finish_reason != "cancelled":
                    self._learn(finished, name, out, req.reference)
                    with self._lock:
                        finished.ran.add(name)
                        finished.texts[name] = out.result.text
        finally:
            with self._lock:
                finished.pending.discard(name)
                last = not finished.pending
            try:
                if last:  # before the run stops counting as running: stats then show them
                    self._agree(finished)
            finally:
                with self._lock:
                    self._exploring.discard(task)
                    self.explorations_done += 1

    def _agree(self, finished: _Finished) -> None:
        """Agreement pseudo-labels once every run of an exploring decision is in: the zoo's
        top model's reply is the reference for the others (not labelled by a real source)."""
        if not self.labels.uses("agreement") or finished.decision is None:
            return
        with self.router_lock:
            top = self.router.names[-1]
        with self._lock:
            texts = {n: t for n, t in finished.texts.items() if n in finished.ran}
            skip = set(finished.labelled)
        labels = self.labels.agreement(texts, top, skip)
        if labels:
            weight = 1.0
            if finished.decision.model in labels:  # stands for the served requests unexplored
                weight = 1.0 / max(finished.decision.top_chance, 1e-9)
            self._observe_labels(finished, labels, "agreement", weight=weight)

    def _judge(self, task: _Exploration) -> None:
        """A judge run: its yes/no labels the served reply, unless a real label came first."""
        finished, judged = task.finished, task.judged
        assert judged is not None
        with self._lock:
            self._exploring.add(task)
        out = None
        try:
            out = self._generate(task.model, task.job, stream=False)
        except Exception as exc:  # a failed judge costs a label, never the daemon
            log.warning("request %s: judge %s failed: %s", task.job.request.id, task.model, exc)
        finally:
            with self._lock:
                self._exploring.discard(task)
        if out is None:
            return
        joules = out.joules
        with self.router_lock:
            stats = self._stats.setdefault(task.model, _ModelStats())
            stats.judge_calls += 1
            stats.judge_joules += joules or 0.0
        verdict = parse_judge(out.result.text)
        with self._lock:
            taken = judged in finished.labelled
        if verdict is not None and not taken and out.result.finish_reason != "cancelled":
            self._observe_labels(finished, {judged: verdict}, "judge")

    def _learn(self, finished: _Finished, name: str, out: _Output, reference: str | None) -> None:
        """Joules, seconds and (with a reference) the label of one finished run."""
        if finished.decision is None:
            return
        joules = out.joules
        with self.router_lock:
            router = self._router_for(finished, name)
            if router is not None and joules is not None:
                router.observe_energy(finished.decision, energy_j={name: joules},
                                      latency_s={name: out.result.total_ms / 1000.0})
                self.router_dirty = True
        if reference is not None and self.labels.uses("reference"):
            self._observe_labels(finished, {name: bool(self.checker(out.result.text, reference))},
                                 "reference")

    def _router_for(self, finished: _Finished, *names: str) -> Router | None:
        """The current router, if it can learn from this decision (caller holds router_lock):
        same feature size, and it knows the served model and `names` (a reload may change the
        zoo)."""
        router, decision = self.router, finished.decision
        if decision is None or router.config.dim_bits != finished.dim_bits:
            return None
        known = set(router.names)
        if decision.model not in known or not set(names) <= known:
            return None
        return router

    def _count_run(self, name: str, out: _Output, *, exploring: bool) -> None:
        """Every run spent energy, finished or cut short: count it in the per-model stats."""
        joules = out.joules
        with self.router_lock:
            stats = self._stats.setdefault(name, _ModelStats())
            stats.calls += 1
            if joules is not None:
                stats.measured += 1
                stats.joules += joules
            if exploring:
                stats.explorations += 1
                stats.exploration_joules += joules or 0.0

    def _observe_labels(
        self,
        finished: _Finished,
        labels: dict[str, bool],
        source: str,
        replaces: dict[str, float] | None = None,
        weight: float = 1.0,
    ) -> bool:
        """Journal the labels (write-ahead, fsync'ed), then learn them; True when durable.
        `replaces`: pseudo-labels of this request that these real ones override; `weight`: see
        `Router.observe_labels`."""
        durable = False
        with self._lock:  # replaced queue entries that were no label: the counters keep them
            from_reference = tuple(n for n in (replaces or {})
                                   if finished.sources.get(n) == SERVED_REFERENCE)
        with self.router_lock:
            router = self._router_for(finished, *labels)
            if router is not None:
                assert finished.decision is not None
                durable = self._journal(finished, labels, source, replaces, weight,
                                        from_reference)
                router.observe_labels(finished.decision, labels, replaces, weight,
                                      pseudo=source in PSEUDO)
                self.router_dirty = True
                self.unsaved_labels += len(labels)
            else:
                log.info("labels %s: the router that decided was replaced by an incompatible "
                         "one; not learned", labels)
            with self._lock:
                finished.labelled.update(labels)
                for name, ok in labels.items():
                    finished.sources[name] = source
                    finished.values[name] = float(ok)
            for name, ok in labels.items():
                stats = self._stats.setdefault(name, _ModelStats())
                replaced = None if name in from_reference else (replaces or {}).get(name)
                _count_label(stats, source, ok, replaced)
        return durable

    def _journal(
        self,
        finished: _Finished,
        labels: dict[str, bool],
        source: str,
        replaces: dict[str, float] | None,
        weight: float,
        from_reference: tuple[str, ...] = (),
    ) -> bool:
        """Append to the journal (caller holds router_lock); a failure is logged once per run
        of failures and the label is still learned in memory."""
        if self.journal is None or finished.decision is None:
            return False
        try:
            self.journal.append(finished.text, finished.decision.model,
                                finished.decision.target, labels, source, replaces, weight,
                                from_reference)
        except JournalError as exc:
            if not self._journal_failed:
                log.error("%s: labels are learned but not durable until the next save", exc)
            self._journal_failed = True
            return False
        self._journal_failed = False
        return True

    def replay(self, entries: list[Entry]) -> int:
        """Learn journalled labels again on the current router (at start, after the snapshot);
        the number replayed. Uses the router's public API only: a Decision rebuilt from the
        stored text, served model and target is all `observe_labels` reads."""
        with self.router_lock:
            return self.replay_locked(entries)

    def replay_locked(self, entries: list[Entry]) -> int:
        """`replay` for a caller that holds router_lock (a reload)."""
        done = 0
        router = self.router
        for entry in entries:
            decision = Decision(
                t=0, model=entry.model, explored=len(entry.labels) > 1,
                run=tuple(entry.labels), q=0.0, z=0.0, target=entry.target,
                predicted_satisfaction={}, predicted_energy_j={}, predicted_latency_s={},
                features=router.predictor.featurize(entry.text),
            )
            try:
                if entry.source == SERVED_REFERENCE:
                    router.observe_reference(decision)
                    continue
                router.observe_labels(decision, entry.labels, entry.replaces or None,
                                      entry.weight, pseudo=entry.source in PSEUDO)
            except RouterError as exc:
                log.warning("journal row %d not replayed: %s", entry.seq, exc)
                continue
            done += 1
            for name, label in entry.labels.items():
                stats = self._stats.setdefault(name, _ModelStats())
                replaced = None if name in entry.replaced_reference else entry.replaces.get(name)
                _count_label(stats, entry.source, label >= 0.5, replaced)
        if done:
            self.router_dirty = True
            self.unsaved_labels += done
        return done

    def stats_state(self) -> dict[str, dict[str, Any]]:
        """Per-model counters for the journal's meta table (they survive a restart)."""
        return {name: asdict(s) for name, s in self._stats.items()}

    def load_stats(self, saved: Any) -> None:
        """Counters from `stats_state`, tolerant of junk (it only feeds `edged stats`)."""
        if not isinstance(saved, dict):
            return
        known = {f.name: f.type for f in fields(_ModelStats)}
        for name, values in saved.items():
            if not isinstance(values, dict):
                continue
            clean = {k: v for k, v in values.items() if k in known
                     and isinstance(v, (int, float)) and not isinstance(v, bool)
                     and math.isfinite(v) and v >= 0}
            with contextlib.suppress(TypeError):
                self._stats[str(name)] = _ModelStats(**clean)

    def _generate(self, name: str, job: Job, *, stream: bool) -> _Output:
        req = job.request
        try:
            model = self.zoo.get(name)
        except UnknownModelError:
            raise ProtocolError(ErrorCode.MODEL_NOT_FOUND, f"no model {name!r}", req.id) from None
        except ZooError as exc:
            raise ProtocolError(ErrorCode.MODEL_ERROR, str(exc), req.id) from None
        try:
            params = _params(model, req)
        except InvalidRequestError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc), req.id) from None
        on_delta = None
        streamed: list[bool] = []
        if stream:
            def on_delta(text: str) -> None:
                streamed.append(True)
                self._emit(job.envelope, delta_message(req.id, text))
        remote = isinstance(model, RemoteModel)
        # a remote's budget also ends at the request's deadline (network time included)
        extra: dict[str, Any] = {"deadline": job.deadline} if remote else {}

        def call() -> GenerationResult:
            if req.prompt is not None:
                return model.generate(req.prompt, params=params, on_delta=on_delta,
                                      cancel=job.cancel, **extra)
            return model.generate(messages=[dict(m) for m in req.messages or ()],
                                  params=params, on_delta=on_delta, cancel=job.cancel, **extra)

        device = self._worker_device(name)
        with self._device_locks[device]:
            try:
                return self._measured(call, self.devices.get(name, device), remote=remote)
            except RemoteUnavailableError as exc:
                raise _Outage(str(exc), req.id, name, bool(streamed)) from None
            except InvalidRequestError as exc:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name}: {exc}", req.id) from None
            except ZooError as exc:
                raise ProtocolError(ErrorCode.MODEL_ERROR, f"{name}: {exc}", req.id) from None

    def _window(self, device: str) -> Any:
        """The energy window of one generation on `device`. One device: the meter's whole
        scope. Several: a device window (its own channels, shared ones split by active time);
        a device the meter does not see is measured by the fallback meter, or not at all."""
        meter = self.meter
        if not meter.covers(device):
            if self.fallback_meter is None:
                return None
            meter = self.fallback_meter
        local = [d for d in self._device_locks if not d.startswith("remote:")]
        if len(local) <= 1:  # remote workers are no local device: nothing to split with
            return meter.window()
        return meter.window(device=device)

    def _measured(self, call: Callable[[], GenerationResult], device: str, *,
                  remote: bool = False) -> _Output:
        """Run `call` in an energy window; a failing meter costs the reading, not the reply.
        A remote model's joules come with its result; the local meter measures the wait over
        its whole scope (no device window: a wait must not take a share of a local
        generation's joules), reported apart."""
        results: list[GenerationResult] = []
        try:
            window = self.meter.window() if remote else self._window(device)
            if window is None:
                return _remote_output(call(), None) if remote else _Output(call(), None)
            with window:
                results.append(call())
            if remote:
                return _remote_output(results[0], window.record)
            return _Output(results[0], window.record)
        except EnergyError as exc:
            log.warning("energy window failed: %s", exc)
            result = results[0] if results else call()
            return _remote_output(result, None) if remote else _Output(result, None)

    # -- reporting -----------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        remotes = self.zoo.remotes()
        return [
            {"name": name, "rank": i, "device": self.devices.get(name, "cpu"),
             **({"remote": remotes[name]} if name in remotes else {})}
            for i, name in enumerate(self.zoo.names)
        ]

    def stats(self) -> dict[str, Any]:
        with self.router_lock:
            router_stats = _plain(self.router.stats())
            models = {
                name: {
                    "calls": s.calls,
                    "measured": s.measured,
                    "joules": s.joules,
                    "mean_joules": s.joules / s.measured if s.measured else None,
                    "explorations": s.explorations,
                    "exploration_joules": s.exploration_joules,
                    "labels": s.labels,
                    "satisfied": s.satisfied,
                    "satisfaction": s.satisfied / s.labels if s.labels else None,
                    "labels_by_source": {src: getattr(s, f"labels_{src}") for src in SOURCES},
                    "judge_calls": s.judge_calls,
                    "judge_joules": s.judge_joules,
                }
                for name, s in self._stats.items()
            }
        return {
            "completed": self.completed,
            "errors": self._error_counts(),
            "queue": self.depth(),
            "queue_size": self.queue_size,
            "in_flight": self.in_flight(),
            "exploration": self._exploration_counts(),
            "models": models,
            "label_sources": sorted(self.labels.sources, key=SOURCES.index),
            "labels_by_source": {
                src: sum(m["labels_by_source"][src] for m in models.values()) for src in SOURCES
            },
            "router": router_stats,
        }

    def _exploration_counts(self) -> dict[str, int]:
        with self._lock:  # the announced ones first: then the queue (see `_announced`)
            counts = {"queued": self._announced, "running": len(self._exploring),
                      "done": self.explorations_done, "dropped": self.explorations_dropped}
        counts["queued"] += self._queue.explorations()
        return counts

    def _error_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.errors)

    def save(self, path: Path, *, force: bool = False) -> bool:
        """Snapshot the router state if it changed (see `save_locked`); True when written."""
        with self.router_lock:
            if not (self.router_dirty or force):
                return False
            self.save_locked(path)
            return True

    def save_locked(self, path: Path) -> None:
        """Snapshot the router (atomic in Router.save), then compact the journal, with the
        markers of edged.server.journal around the write (caller holds router_lock). OSError
        when the snapshot cannot be written: nothing is compacted then."""
        journal = self.journal
        seq = 0
        if journal is not None:
            try:
                seq = journal.last_seq()
                journal.begin_snapshot(seq)
            except Exception as exc:  # sqlite3.Error: the snapshot still goes out
                log.warning("label journal %s: %s", journal.path, exc)
                journal = None
        self.router.save(path)
        self.router_dirty = False
        self.unsaved_labels = 0
        if journal is not None:
            try:
                journal.commit_snapshot(seq, file_digest(path),
                                        {"model_stats": json.dumps(self.stats_state())})
            except Exception as exc:  # the rows stay; replay_start skips them by pending_seq
                log.warning("label journal %s: compaction failed: %s", journal.path, exc)


class Stopped(ProtocolError):
    """A generation stopped early (cancel, deadline, shutdown); `text` is what it had produced."""

    def __init__(self, code: ErrorCode, message: str, request_id: str, text: str) -> None:
        super().__init__(code, message, request_id)
        self.text = text


#: codes of a generation stopped early: their replies carry `text` ("" when it never ran)
_STOP_CODES = (ErrorCode.CANCELLED, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.SHUTTING_DOWN)


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


def _remote_output(result: GenerationResult, wait: EnergyRecord | None) -> _Output:
    """A remote run's output: the record the remote (or the cost model) gave, the wait apart."""
    energy = result.energy if isinstance(result, RemoteResult) else None
    record = None
    if isinstance(energy, dict):
        try:
            record = EnergyRecord(
                joules=float(energy["joules"]),
                dynamic_joules=float(energy.get("dynamic_joules", energy["joules"])),
                per_rail_j={str(k): float(v) for k, v in (energy.get("per_rail_j") or {}).items()},
                window_s=float(energy.get("window_s", 0.0)), method=str(energy.get("method", "")),
                approximate=bool(energy.get("approximate", True)),
                samples=int(energy.get("samples", 0)),
                attribution=str(energy.get("attribution", "exclusive")),
                scope_channels=tuple(map(str, energy.get("scope_channels") or ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("remote %s: energy record unreadable (%s): not learned", result.model,
                        exc)
        if record is not None and not (math.isfinite(record.joules) and record.joules >= 0):
            record = None
    return _Output(result, record, wait)


def _output_fields(out: _Output, name: str, queue_ms: float) -> dict[str, Any]:
    r, rec = out.result, out.record
    energy = None if rec is None else rec.to_dict()
    if isinstance(r, RemoteResult):
        wait = None if out.wait is None else out.wait.to_dict()
        return {**_fields(r, name, queue_ms, energy),
                "remote": {**_plain(r.remote), "local_wait": wait}}
    return _fields(r, name, queue_ms, energy)


def _fields(r: GenerationResult, name: str, queue_ms: float,
            energy: dict[str, Any] | None) -> dict[str, Any]:
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
        "energy": energy,
    }


def _error_fields(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"error": {"code": code.value, "message": message}}


def _route_fields(decision: Decision | None) -> dict[str, Any]:
    if decision is None:
        return {"routed": False}
    return {"routed": True, **_plain(decision.to_dict())}


def _count_label(stats: _ModelStats, source: str, ok: bool, replaced: float | None) -> None:
    """Per-model label counters; a real label that replaces a pseudo one takes its place in
    `labels`/`satisfied` and is counted under its own source."""
    if replaced is None:
        stats.labels += 1
    else:
        stats.satisfied -= int(replaced >= 0.5)
    stats.satisfied += int(ok)
    if source in SOURCES:
        setattr(stats, f"labels_{source}", getattr(stats, f"labels_{source}") + 1)


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
