"""The engine in-process (real zoo, router, meter and worker thread), for the orderings a live
daemon shows only by chance: a cancel or a reload landing mid-request, an exploration run that
fails after the routed model answered."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_zoo_graph import make_dir

from edged.checkers import get_checker
from edged.energy import create_meter
from edged.protocol import ErrorCode, FeedbackRequest, GenerateRequest, ProtocolError
from edged.router import Router, RouterConfig
from edged.server.engine import Engine, Job, lower_priority
from edged.zoo import Zoo

pytestmark = pytest.mark.timeout(120)

BIG = {"max_position_embeddings": 1_000_000}


class Replies:
    """The engine's `emit`: collects messages; `on_delta` runs in the worker on each part."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.done = threading.Event()
        self.on_delta: Any = None

    def __call__(self, envelope: list[bytes], message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message.get("done") is False:
            if self.on_delta is not None:
                self.on_delta()
        else:
            self.done.set()

    def final(self) -> dict[str, Any]:
        assert self.done.wait(60), "no final reply"
        return self.messages[-1]


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engine-zoo")
    # small has a 64-token context, large a huge one: 100 new tokens overflow small only
    return make_dir(root, "small", mask=True), make_dir(root, "large", mask=True, config=BIG)


@pytest.fixture
def backend() -> str:
    return "estimate"


@pytest.fixture
def engine(zoo_dirs, backend) -> Iterator[tuple[Engine, Replies]]:
    zoo = Zoo.from_dirs(list(zoo_dirs))
    replies = Replies()
    meter = create_meter(backend)
    engine = Engine(zoo, Router(list(zoo.names), RouterConfig(alpha=0.9, seed=1)), meter,
                    get_checker("exact"), emit=replies, queue_size=4,
                    devices=dict.fromkeys(zoo.names, "cpu"))
    engine.start()
    try:
        yield engine, replies
    finally:
        engine.stop_all()
        engine.stop()
        meter.close()
        zoo.close()


def job(rid: str, **fields: Any) -> Job:
    now = time.monotonic()
    request = GenerateRequest(id=rid, op="generate", **{"prompt": "t1", **fields})
    return Job(request=request, envelope=[b"client", b""], received=now, deadline=now + 60)


def explored(eng: Engine, count: int = 1) -> dict[str, Any]:
    """Stats once `count` exploration runs have finished (they run after the reply)."""
    end = time.monotonic() + 60
    while eng.stats()["exploration"]["done"] < count and time.monotonic() < end:
        time.sleep(0.01)
    stats = eng.stats()
    assert stats["exploration"]["done"] >= count, stats["exploration"]
    return stats


def test_failed_exploration_keeps_the_routed_answer(engine):
    eng, replies = engine
    eng.submit(job("x1", max_new_tokens=100))  # cold start: every model runs
    reply = replies.final()
    assert reply["ok"], reply
    assert reply["model"] == "large" and set(reply["route"]["run"]) == {"small", "large"}
    # issue 16.5: exploration runs after the reply, which says so
    assert reply["exploration"] == [{"model": "small", "status": "queued"}]
    assert reply["exploration_energy"] == "after_reply"
    stats = explored(eng)
    assert stats["models"]["large"]["calls"] == 1 and "small" not in stats["models"]
    assert stats["router"]["t"] == 1
    labels = eng.feedback(FeedbackRequest(id="f", op="feedback", request_id="x1",
                                          labels={"large": True}))
    assert labels["labels"] == {"large": True}
    with pytest.raises(ProtocolError, match="did not answer"):  # it failed: nothing to label
        eng.feedback(FeedbackRequest(id="f2", op="feedback", request_id="x1",
                                     labels={"small": True}))


def test_reply_goes_out_before_exploration_which_still_teaches(engine):
    """Issue 16.5: the client waits for the served model only; the explored model runs after
    the reply, its joules in the router and the stats, its reference label learned then; a
    deadline sweep after the reply does not cut it short."""
    eng, replies = engine
    at_reply: dict[str, Any] = {}

    def snapshot() -> None:
        at_reply.update(eng.stats(), idle=eng.idle())
        eng.sweep(time.monotonic() + 3600)  # the request's deadline passes after its reply

    sent = replies.__call__

    def emit(envelope: list[bytes], message: dict[str, Any]) -> None:
        if message.get("done") is not False:
            snapshot()
        sent(envelope, message)

    eng._emit = emit
    eng.submit(job("e1", max_new_tokens=4, reference="nope"))  # cold start: explores
    reply = replies.final()
    assert reply["ok"] and reply["route"]["explored"], reply
    assert reply["labels"] == {"large": False}
    assert "small" not in at_reply["models"]  # not run yet when the reply left
    # ... but already counted: a client reading `stats` right after its reply sees it coming
    assert at_reply["exploration"]["queued"] == 1 and not at_reply["idle"], at_reply
    stats = explored(eng)
    small = stats["models"]["small"]
    assert small["calls"] == 1 and small["explorations"] == 1
    assert small["exploration_joules"] > 0 and small["labels"] == 1
    router = stats["router"]["models"]["small"]
    assert router["energy_j"] is not None and router["labels"] == 1  # learned from it
    with pytest.raises(ProtocolError, match="already has a label"):  # the reference's
        eng.feedback(FeedbackRequest(id="f", op="feedback", request_id="e1",
                                     labels={"small": True}))


def test_reload_mid_request_learns_on_the_current_router(engine):
    """Issue 16.4: a request decided before a reload teaches the router that replaced the one
    that decided it (the old one is discarded and would never be saved)."""
    eng, replies = engine
    old = eng.router
    new = Router(list(eng.zoo.names), RouterConfig(alpha=0.9, seed=2))

    def reload() -> None:  # what Server._reload does, while this request generates
        with eng.router_lock:
            eng.router = new
        replies.on_delta = None

    replies.on_delta = reload
    eng.submit(job("r1", max_new_tokens=4, stream=True, reference="nope"))
    reply = replies.final()
    assert reply["ok"], reply
    explored(eng)
    assert old.stats()["labels"] == 0 and new.stats()["labels"] == 1
    assert new.stats()["models"]["large"]["energy_j"] is not None  # its energy was learned
    assert new.stats()["models"]["small"]["energy_j"] is not None  # and the exploration's
    assert old.stats()["models"]["large"]["energy_j"] is None
    assert new.predictor.labels.sum() == 2  # the reference labelled both models


def test_reload_to_another_zoo_drops_labels_it_cannot_use(engine):
    eng, replies = engine
    eng.submit(job("z1", max_new_tokens=4))
    assert replies.final()["ok"]
    explored(eng)
    with eng.router_lock:
        eng.router = Router(["other"], RouterConfig(alpha=0.9, seed=2))
    fb = eng.feedback(FeedbackRequest(id="f", op="feedback", request_id="z1", satisfied=True))
    assert fb["labels"] == {"large": True}  # accepted, but the new zoo has no "large"
    assert eng.router.stats()["labels"] == 0


def test_cancel_while_deciding_answers_cancelled(engine):
    eng, replies = engine
    submitted = job("c1", max_new_tokens=4)

    class CancelledWhileDeciding(Router):
        def decide(self, text: str, deadline_ms: float | None = None) -> Any:
            decision = super().decide(text, deadline_ms)
            submitted.stop(ErrorCode.CANCELLED)  # the socket loop's cancel lands now
            return decision

    eng.router = CancelledWhileDeciding(list(eng.zoo.names), RouterConfig(alpha=0.9, seed=1))
    eng.submit(submitted)
    reply = replies.final()
    assert not reply["ok"] and reply["error"]["code"] == "cancelled", reply
    assert eng.idle()


@pytest.mark.parametrize("backend", ["none"])
def test_unmeasured_energy_is_not_learned(engine):
    eng, replies = engine
    eng.submit(job("n1", max_new_tokens=4))
    reply = replies.final()
    assert reply["ok"], reply
    assert reply["energy"]["method"] == "none" and math.isnan(reply["energy"]["joules"])
    stats = explored(eng)
    assert stats["router"]["t"] == 1 and stats["models"]["large"]["joules"] == 0.0
    # issue 16.6: unmeasured runs are not 0 J in the mean
    assert stats["models"]["large"]["mean_joules"] is None
    assert stats["models"]["large"]["measured"] == 0
    assert all(m["energy_j"] is None for m in stats["router"]["models"].values())


def test_a_reply_that_cannot_be_sent_does_not_kill_the_worker(engine):
    eng, replies = engine
    sent = replies.__call__
    failures = iter([RuntimeError("socket gone")])

    def flaky(envelope: list[bytes], message: dict[str, Any]) -> None:
        if message.get("id") == "lost":
            raise next(failures)
        sent(envelope, message)

    eng._emit = flaky
    eng.submit(job("lost", max_new_tokens=2))
    eng.submit(job("next", max_new_tokens=2))
    reply = replies.final()
    assert reply["id"] == "next" and reply["ok"], reply


def test_lp_window_change_on_reload_migrates_the_state(tmp_path):
    """Issue 16.4: a SIGHUP that changes lp_window used to set the state aside as corrupt."""
    from edged.server.app import restore_router

    path = tmp_path / "router-state.npz"
    names = ["small", "large"]
    router = Router(names, RouterConfig(alpha=0.9, seed=1, lp_window=32))
    for i in range(40):
        decision = router.decide(f"t{i % 7}")
        router.observe_energy(decision, energy_j={decision.model: 1.0 + i})
        router.observe_labels(decision, {decision.model: bool(i % 2)})
    router.save(path)
    for window in (16, 64, 32):
        again = restore_router(path, names, RouterConfig(alpha=0.9, seed=1, lp_window=window))
        assert again.t == 40 and again.stats()["labels"] == 40
        assert again.recent.shape == (window, 2)
        newest = router.recent[40 % 32]
        assert (again.recent[40 % window] == newest).all()  # the newest step kept its place
        old_rows = {tuple(row) for row in router.recent}
        steps = range(max(1, 40 - window + 1), 41)  # the steps the new window holds
        assert {tuple(again.recent[s % window]) for s in steps} <= old_rows  # no made-up rows
    assert list(tmp_path.iterdir()) == [path]  # nothing set aside


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_workers_run_nicer_than_the_socket_loop(zoo_dirs):
    """`worker_nice` lowers the workers' priority, not the caller's (the socket loop's)."""
    zoo = Zoo.from_dirs(list(zoo_dirs))
    meter = create_meter("estimate")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    engine = Engine(zoo, Router(list(zoo.names), RouterConfig(alpha=0.9, seed=1)), meter,
                    get_checker("exact"), emit=Replies(), queue_size=4,
                    devices=dict.fromkeys(zoo.names, "cpu"), worker_nice=3)
    engine.start()
    try:
        workers = [t for t in threading.enumerate() if t.name.startswith("edged-worker-")]
        assert workers
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                os.getpriority(os.PRIO_PROCESS, t.native_id) != min(19, base + 3)
                for t in workers):
            time.sleep(0.01)
        assert [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in workers] == [
            min(19, base + 3)] * len(workers)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        engine.stop()
        meter.close()
        zoo.close()


def test_lower_priority_zero_changes_nothing():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    assert lower_priority(0) is None
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
