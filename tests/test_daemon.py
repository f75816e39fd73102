"""The real daemon, as a subprocess on a temporary ipc endpoint, driven with REQ and DEALER.

The zoo is two hand-built ONNX decoders (tests/test_zoo_graph.py): real onnxruntime sessions that
generate instantly per token, with a context big enough for slow, cancellable generations.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from test_zoo_graph import make_dir

from edged.zoo import GenerationParams, load_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
LONG = 65_536  # tokens (the protocol maximum): seconds of generation, to cancel or fill queues


@pytest.fixture(scope="session")
def rule_zoo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("daemon-zoo")
    config = {"max_position_embeddings": 1_000_000}
    return (make_dir(root, "small", mask=True, config=config),
            make_dir(root, "large", mask=True, config=config))


class Daemon:
    """`python -m edged serve` with a NOTIFY_SOCKET we listen on, and socket helpers."""

    def __init__(self, workdir: Path, config: str, extra_env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), endpoint: str | None = None) -> None:
        self.workdir = workdir
        self.sockdir = Path(tempfile.mkdtemp(prefix="edged-t-", dir="/tmp"))  # short ipc paths
        self.endpoint = endpoint or f"ipc://{self.sockdir}/edged.sock"
        self.config_path = workdir / "edged.toml"
        self.config_path.write_text(config)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.sockdir / "notify"))
        self.notify.settimeout(0.2)
        self.notes: list[str] = []
        self.log = workdir / "daemon.log"
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sockdir / "notify"),
               "EDGED_ENDPOINT": self.endpoint, "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", **(extra_env or {})}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edged", "serve", "--config", str(self.config_path),
                 *args],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        self.ctx = zmq.Context()
        # read notifications as they come, as systemd does: an unread datagram queue fills up
        # after a few watchdog pings (net.unix.max_dgram_qlen, 10 here) and drops the rest
        self._reader = threading.Thread(target=self._read_notes, daemon=True)
        self._reader.start()

    def _read_notes(self) -> None:
        while True:
            try:
                self.notes.append(self.notify.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:  # closed
                return

    def wait_note(self, prefix: str, timeout_s: float = 60.0) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for note in list(self.notes):
                if note.startswith(prefix):
                    return note
            if self.proc.poll() is not None and prefix != "STATUS=stopped":
                time.sleep(0.3)  # notes the daemon sent before it exited
                if not any(note.startswith(prefix) for note in list(self.notes)):
                    raise AssertionError(f"daemon exited {self.proc.returncode}:\n"
                                         f"{self.log.read_text()}")
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} in {self.notes}:\n{self.log.read_text()}")

    def socket(self, kind: int = zmq.DEALER) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def call(self, message: dict[str, Any], timeout_s: float = 30.0) -> dict[str, Any]:
        """One request over a fresh REQ socket."""
        sock = self.socket(zmq.REQ)
        try:
            sock.send(msgpack.packb({"v": 1, **message}))
            assert sock.poll(int(timeout_s * 1000)), f"no reply to {message}"
            return msgpack.unpackb(sock.recv())
        finally:
            sock.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.ctx.destroy(linger=0)
        self.notify.close()
        self._reader.join(5)
        shutil.rmtree(self.sockdir, ignore_errors=True)


def config_text(zoo: tuple[Path, Path], state: Path, **server: Any) -> str:
    server = {"queue_size": 2, "save_interval_s": 0.5, "deadline_max_ms": 60_000, **server}
    lines = ["[server]", f'state_dir = "{state}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    lines += ["[energy]", 'backend = "estimate"',
              "[router]", "alpha = 0.9", "seed = 1",
              "[models]", f"dirs = {json.dumps([str(p) for p in zoo])}",
              "[labels]", 'checker = "exact"']
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def daemon_options() -> dict[str, Any]:
    """[server] settings of the module's daemon; a test module may override this fixture."""
    return {}


@pytest.fixture(scope="module")
def daemon(rule_zoo, tmp_path_factory, daemon_options) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("daemon")
    d = Daemon(work, config_text(rule_zoo, work / "state", **daemon_options))
    try:
        d.wait_note("READY=1")
        yield d
    finally:
        d.stop()


def collect(sock: zmq.Socket, ids: list[str], timeout_s: float = 60.0
            ) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Deltas and final reply of each request in `ids`, read from one DEALER socket."""
    deltas: dict[str, list[str]] = {rid: [] for rid in ids}
    finals: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + timeout_s
    while len(finals) < len(ids) and time.monotonic() < end:
        if not sock.poll(200):
            continue
        msg = msgpack.unpackb(sock.recv_multipart()[-1])
        if msg.get("id") not in deltas:
            continue
        if msg.get("done") is False:
            deltas[msg["id"]].append(msg["delta"])
        else:
            finals[msg["id"]] = msg
    missing = set(ids) - set(finals)
    assert not missing, f"no final reply for {missing}"
    return {rid: (deltas[rid], finals[rid]) for rid in ids}


def finals(sock: zmq.Socket, count: int, replies: dict[str, dict[str, Any]] | None = None,
           timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Final replies (streamed parts skipped) by id, read until `replies` holds `count`."""
    replies = {} if replies is None else replies
    end = time.monotonic() + timeout_s
    while len(replies) < count and time.monotonic() < end:
        if sock.poll(200):
            msg = msgpack.unpackb(sock.recv_multipart()[-1])
            if msg.get("done") is not False:
                replies[msg["id"]] = msg
    return replies


def send(sock: zmq.Socket, message: dict[str, Any]) -> None:
    sock.send_multipart([b"", msgpack.packb({"v": 1, **message})])


def wait_health(d: Daemon, in_flight: int, queue: int, timeout_s: float = 60.0) -> None:
    """Poll `health` until it shows `in_flight` requests of which `queue` are queued."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        health = d.call({"id": "h", "op": "health"})
        if (health["in_flight"], health["queue"]) == (in_flight, queue):
            return
        time.sleep(0.05)
    raise AssertionError(f"health never showed in_flight={in_flight} queue={queue}: {health}")


def wait_idle(d: Daemon, timeout_s: float = 60.0) -> None:
    wait_health(d, 0, 0, timeout_s)


# -- happy paths ---------------------------------------------------------------------------------


def test_req_generate_models_health_stats(daemon, rule_zoo):
    health = daemon.call({"id": "h1", "op": "health"})
    assert health["ok"] and health["id"] == "h1" and health["status"] == "serving"
    assert health["models"] == 2
    models = daemon.call({"id": "m1", "op": "models"})["models"]
    assert [m["name"] for m in models] == ["small", "large"]
    assert all(m["device"] == "cpu" for m in models)
    reply = daemon.call({"id": "g1", "op": "generate", "prompt": "t3 t5 t9",
                         "max_new_tokens": 5})
    assert reply["ok"] and reply["id"] == "g1" and reply["done"] is True
    assert reply["model"] in ("small", "large")
    local = load_model(rule_zoo[0]).generate("t3 t5 t9", params=GenerationParams(
        max_new_tokens=5))
    assert reply["text"] == local.text and len(reply["text"].split()) == 5
    assert reply["usage"] == {"prompt_tokens": local.prompt_tokens, "completion_tokens": 5}
    assert reply["finish_reason"] == "length"
    assert set(reply["timing"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_s"}
    assert reply["energy"]["method"] and reply["energy"]["joules"] >= 0
    route = reply["route"]
    assert route["routed"] and route["model"] == reply["model"] and route["t"] >= 1
    assert set(route["predicted_satisfaction"]) == {"small", "large"}
    if route["explored"]:
        assert {e["model"] for e in reply["exploration"]} | {reply["model"]} == set(route["run"])
    stats = daemon.call({"id": "s1", "op": "stats"})
    assert stats["ok"] and stats["router"]["t"] >= 1 and stats["completed"] >= 1
    assert stats["energy_backend"] == "estimate"


def test_bypass_routing_and_unknown_model(daemon):
    reply = daemon.call({"id": "b1", "op": "generate", "prompt": "t1", "model": "large",
                         "max_new_tokens": 2})
    assert reply["ok"] and reply["model"] == "large" and reply["route"] == {"routed": False}
    reply = daemon.call({"id": "b2", "op": "generate", "prompt": "t1", "model": "huge"})
    assert not reply["ok"] and reply["error"]["code"] == "model_not_found"


def test_dealer_streams_interleaved(daemon):
    sock = daemon.socket()
    try:
        for rid in ("s1", "s2"):  # one runs, one waits: within queue_size
            send(sock, {"id": rid, "op": "generate", "prompt": "t2 t7", "max_new_tokens": 40,
                        "stream": True})
        for deltas, final in collect(sock, ["s1", "s2"]).values():
            assert final["ok"] and final["done"] is True
            assert deltas and "".join(deltas) == final["text"]
            assert final["usage"]["completion_tokens"] == 40
    finally:
        sock.close()


def test_dealer_without_delimiter_and_messages(daemon):
    sock = daemon.socket()
    try:
        sock.send(msgpack.packb({"v": 1, "id": "n1", "op": "generate", "max_new_tokens": 3,
                                 "messages": [{"role": "user", "content": "t4"}]}))
        assert sock.poll(30_000)
        frames = sock.recv_multipart()
        assert len(frames) == 1
        reply = msgpack.unpackb(frames[0])
        assert reply["ok"] and reply["usage"]["completion_tokens"] == 3
    finally:
        sock.close()


def test_reference_labels_and_feedback_move_the_queue(daemon):
    q0 = daemon.call({"id": "s", "op": "stats"})["router"]
    wrong = daemon.call({"id": "r1", "op": "generate", "prompt": "t3 t5 t9",
                         "max_new_tokens": 2, "reference": "nope"})
    assert wrong["ok"] and set(wrong["labels"].values()) == {False}
    q1 = daemon.call({"id": "s", "op": "stats"})["router"]
    assert q1["labels"] == q0["labels"] + 1
    assert q1["q"] > q0["q"]  # unsatisfied under alpha = 0.9: the queue grows

    right = daemon.call({"id": "r2", "op": "generate", "prompt": "t3 t5 t9",
                         "max_new_tokens": 2, "reference": wrong["text"]})
    assert right["labels"][right["model"]] is True

    plain = daemon.call({"id": "f1", "op": "generate", "prompt": "t1", "max_new_tokens": 2})
    before = daemon.call({"id": "s", "op": "stats"})["router"]
    fb = daemon.call({"id": "fb1", "op": "feedback", "request_id": "f1", "satisfied": False})
    assert fb["ok"], fb
    assert fb["labels"] == {plain["model"]: False}
    after = daemon.call({"id": "s", "op": "stats"})["router"]
    assert after["labels"] == before["labels"] + 1 and after["q"] > before["q"]

    again = daemon.call({"id": "fb2", "op": "feedback", "request_id": "f1", "satisfied": True})
    assert again["error"]["code"] == "bad_request" and "already" in again["error"]["message"]
    unknown = daemon.call({"id": "fb3", "op": "feedback", "request_id": "nope",
                           "satisfied": True})
    assert unknown["error"]["code"] == "unknown_request"
    other = "large" if plain["model"] == "small" else "small"
    if other not in plain["route"]["run"]:
        wrong_model = daemon.call({"id": "fb4", "op": "feedback", "request_id": "f1",
                                   "satisfied": True, "model": other})
        assert wrong_model["error"]["code"] == "bad_request"


# -- cancel, busy, deadlines -------------------------------------------------------------------


def test_cancel_running_stream(daemon):
    sock = daemon.socket()
    try:
        send(sock, {"id": "c1", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                    "stream": True, "model": "small"})
        assert sock.poll(30_000)
        first = msgpack.unpackb(sock.recv_multipart()[-1])
        assert first["done"] is False
        send(sock, {"id": "c1-cancel", "op": "cancel", "request_id": "c1"})
        got = finals(sock, 2)
        assert got["c1-cancel"]["ok"] and got["c1-cancel"]["was"] == "running"
        assert got["c1"]["error"]["code"] == "cancelled"
        assert got["c1"]["text"]  # what was generated before the stop
    finally:
        sock.close()
    missing = daemon.call({"id": "c2", "op": "cancel", "request_id": "c1"})
    assert missing["error"]["code"] == "unknown_request"


def test_busy_when_queue_full_and_cancel_queued(daemon):
    wait_idle(daemon)
    sock = daemon.socket()
    ids = [f"busy{i}" for i in range(6)]
    try:
        send(sock, {"id": ids[0], "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                    "model": "small", "stream": True})
        assert sock.poll(30_000)  # its first delta: it runs, the queue is empty
        for rid in ids[1:]:  # two wait (queue_size = 2), the rest are refused
            send(sock, {"id": rid, "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                        "model": "small"})
        replies = finals(sock, 3)
        assert {r["error"]["code"] for r in replies.values()} == {"busy"}
        accepted = [rid for rid in ids if rid not in replies]
        assert len(accepted) == 3
        for rid in [*accepted[1:], accepted[0]]:  # the queued first, then the running one
            send(sock, {"id": f"x-{rid}", "op": "cancel", "request_id": rid})
        finals(sock, 9, replies)
        was = sorted(replies[f"x-{rid}"]["was"] for rid in accepted)
        assert was == ["queued", "queued", "running"]
        assert {replies[rid]["error"]["code"] for rid in accepted} == {"cancelled"}
    finally:
        sock.close()


def test_deadline_stops_generation(daemon):
    wait_idle(daemon)
    reply = daemon.call({"id": "d1", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                         "deadline_ms": 300, "model": "small"})
    assert reply["error"]["code"] == "deadline_exceeded"
    assert len(reply.get("text", "").split()) < LONG  # stopped (queued or between tokens)


def test_vanished_client_is_cancelled(daemon):
    wait_idle(daemon)
    sock = daemon.socket()
    send(sock, {"id": "v1", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                "stream": True, "model": "small"})
    assert sock.poll(30_000)
    sock.close()
    wait_idle(daemon)  # the next delta finds the client gone, and the generation stops
    assert daemon.call({"id": "h", "op": "health"})["status"] == "serving"


def test_queued_request_of_a_vanished_client_expires(daemon):
    """Its deadline passes while queued and the error reply finds the client gone: the loop
    must not wedge (the reply used to be sent under the engine lock, which `vanished` takes)."""
    wait_idle(daemon)
    errors0 = daemon.call({"id": "s", "op": "stats"})["errors"].get("deadline_exceeded", 0)
    busy = daemon.socket()
    try:
        send(busy, {"id": "w-run", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                    "model": "small"})  # not streamed: no part reveals a vanished client
        wait_health(daemon, 1, 0)
        gone = daemon.socket()
        send(gone, {"id": "w-queued", "op": "generate", "prompt": "t1", "max_new_tokens": 2,
                    "model": "small", "deadline_ms": 3000})
        wait_health(daemon, 2, 1)
        gone.close()
        wait_health(daemon, 1, 0)  # expired and withdrawn; the loop still answers
        errors = daemon.call({"id": "s", "op": "stats"})["errors"]
        assert errors["deadline_exceeded"] == errors0 + 1
        send(busy, {"id": "w-stop", "op": "cancel", "request_id": "w-run"})
        (_, final), (_, stop) = collect(busy, ["w-run", "w-stop"]).values()
        assert final["error"]["code"] == "cancelled" and stop["was"] == "running"
    finally:
        busy.close()
    wait_idle(daemon)


def test_ipc_socket_is_group_only(daemon):
    path = Path(daemon.endpoint[len("ipc://"):])
    assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o660


# -- exploration and a real Llama -----------------------------------------------------------------


def test_exploration_runs_every_model_each_in_its_window(rule_zoo, tmp_path):
    text = config_text(rule_zoo, tmp_path / "state").replace(
        "seed = 1", 'seed = 1\nc = 1.0\nexplore_runs = "all"')  # explore on every request
    d = Daemon(tmp_path, text)
    try:
        d.wait_note("READY=1")
        reply = d.call({"id": "e1", "op": "generate", "prompt": "t3", "max_new_tokens": 3})
        assert reply["route"]["explored"] and set(reply["route"]["run"]) == {"small", "large"}
        (other,) = reply["exploration"]  # it runs after the reply (issue 16.5)
        assert {other["model"], reply["model"]} == {"small", "large"}
        assert other["status"] == "queued" and reply["exploration_energy"] == "after_reply"
        assert reply["energy"]["joules"] >= 0
        end = time.monotonic() + 60
        while time.monotonic() < end:
            stats = d.call({"id": "s", "op": "stats"})
            if stats["exploration"]["done"] == 1:
                break
            time.sleep(0.02)
        assert stats["models"][other["model"]]["exploration_joules"] >= 0
        fb = d.call({"id": "f", "op": "feedback", "request_id": "e1",
                     "labels": {"small": True, "large": False}})
        assert fb["ok"] and fb["labels"] == {"small": True, "large": False}
        stats = d.call({"id": "s", "op": "stats"})
        assert stats["models"]["small"]["labels"] == 1 and stats["models"]["large"]["calls"] == 1
        assert stats["router"]["explorations"] == 1
    finally:
        assert d.stop() == 0


def test_stories260k_through_the_daemon_matches_in_process(stories260k, tmp_path):
    onnx = stories260k / "onnx"
    text = config_text((onnx,), tmp_path / "state")
    d = Daemon(tmp_path, text)
    try:
        d.wait_note("READY=1")
        reply = d.call({"id": "g", "op": "generate", "prompt": "Once upon a time",
                        "max_new_tokens": 24, "temperature": 0})
        local = load_model(onnx).generate("Once upon a time",
                                          params=GenerationParams(max_new_tokens=24))
        assert reply["ok"] and reply["text"] == local.text
        assert reply["usage"]["completion_tokens"] == local.completion_tokens
    finally:
        assert d.stop() == 0


def test_final_reply_survives_a_client_that_reads_late(daemon):
    """Streamed parts may be dropped at the high-water mark; the final reply never is."""
    wait_idle(daemon)
    done0 = daemon.call({"id": "s", "op": "stats"})["completed"]
    sock = daemon.socket()
    sock.setsockopt(zmq.RCVHWM, 10)
    try:
        send(sock, {"id": "late", "op": "generate", "prompt": "t1", "max_new_tokens": 20_000,
                    "stream": True, "model": "small"})
        end = time.monotonic() + 60  # finished while nobody read the socket
        while daemon.call({"id": "s", "op": "stats"})["completed"] == done0:
            assert time.monotonic() < end, "the generation never finished"
            time.sleep(0.05)
        final = finals(sock, 1)["late"]
        assert final["ok"] and final["usage"]["completion_tokens"] == 20_000
    finally:
        sock.close()
