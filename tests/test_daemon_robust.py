"""Hostile input against the real daemon: every message is answered or dropped, none kills it."""

from __future__ import annotations

import random
import time

import msgpack
import pytest
import zmq
from test_daemon import (  # noqa: F401 (fixtures)
    Daemon,
    config_text,
    daemon,
    finals,
    rule_zoo,
    send,
    wait_idle,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ERROR_CODES = {
    "bad_request", "unsupported_version", "unknown_op", "too_large", "busy", "shutting_down",
    "deadline_exceeded", "cancelled", "unknown_request", "model_not_found", "model_error",
    "internal",
}


@pytest.fixture(scope="module")
def daemon_options():
    return {"max_message_bytes": 64 * 1024}


def random_object(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bytes", "bool", "nil", "list", "map", "request"]
    kind = rng.choice(kinds if depth < 3 else kinds[:6])
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), 1e308])
    if kind == "str":
        return "".join(rng.choice("abc\x00é😀 ") for _ in range(rng.randint(0, 12)))
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 12))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "nil":
        return None
    if kind == "list":
        return [random_object(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "map":
        return {random_object(rng, 3) if rng.random() < 0.2 else rng.choice(
            ["v", "id", "op", "prompt", "x"]): random_object(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}
    # a near-valid request with one field wrong
    base = {"v": 1, "id": f"fz{rng.randint(0, 10**6)}", "op": rng.choice(
        ["generate", "feedback", "cancel", "health", "stats", "models", "nope"])}
    if base["op"] == "generate":
        base["prompt"] = "t1"
        base["max_new_tokens"] = 2
    key = rng.choice(["v", "id", "op", "prompt", "max_new_tokens", "stop", "messages",
                      "request_id", "satisfied", "labels", "temperature", "deadline_ms"])
    base[key] = random_object(rng, depth + 1)
    return base


def drain_replies(d: Daemon, sock: zmq.Socket, quiet_ms: int = 1500) -> list[dict]:
    """Every reply to what `sock` sent: the loop answers in order up to a marker `health`, then
    the workers' replies, until the daemon is idle and the socket quiet."""
    send(sock, {"id": "marker", "op": "health"})
    replies = []
    end = time.monotonic() + 120
    while True:
        assert time.monotonic() < end, "no reply to the marker"
        if sock.poll(200):
            reply = msgpack.unpackb(sock.recv_multipart()[-1], strict_map_key=False)
            if reply.get("id") == "marker":
                break
            replies.append(reply)
    wait_idle(d)
    while sock.poll(quiet_ms):
        replies.append(msgpack.unpackb(sock.recv_multipart()[-1], strict_map_key=False))
    return replies


def test_fuzz_random_bytes_and_objects(daemon):  # noqa: F811
    rng = random.Random(1234)
    sock = daemon.socket()
    sent = 0
    try:
        for i in range(400):
            if i % 2:
                payload = rng.randbytes(rng.randint(0, 64))
            else:
                payload = msgpack.packb(random_object(rng), use_bin_type=rng.random() < 0.5)
            sock.send_multipart([b"", payload])
            sent += 1
        replies = drain_replies(daemon, sock)
    finally:
        sock.close()
    assert 0 < len(replies) <= sent
    for reply in replies:
        assert reply["v"] == 1 and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] in ERROR_CODES, reply
            assert reply["error"]["code"] != "internal", reply
    health = daemon.call({"id": "after-fuzz", "op": "health"})
    assert health["ok"] and health["status"] == "serving"


def test_frames_and_envelopes(daemon):  # noqa: F811
    sock = daemon.socket()
    try:
        sock.send_multipart([b"", b"a", b"b"])  # two payload frames
        assert sock.poll(10_000)
        reply = msgpack.unpackb(sock.recv_multipart()[-1])
        assert reply["error"]["code"] == "bad_request" and reply["id"] is None
        sock.send_multipart([b""])  # delimiter only: no payload
        assert sock.poll(10_000)
        reply = msgpack.unpackb(sock.recv_multipart()[-1])
        assert reply["error"]["code"] == "bad_request" and "got 0" in reply["error"]["message"]
        send(sock, {"id": "ok", "op": "health"})
        assert sock.poll(10_000)
        assert msgpack.unpackb(sock.recv_multipart()[-1])["id"] == "ok"
    finally:
        sock.close()


def test_too_large_is_answered_or_dropped(daemon):  # noqa: F811
    limit = 64 * 1024  # [server] max_message_bytes in this module's config
    sock = daemon.socket()
    try:
        send(sock, {"id": "big", "op": "generate", "prompt": "t1 " * (limit // 3 + 10)})
        assert sock.poll(10_000)
        reply = msgpack.unpackb(sock.recv_multipart()[-1])
        assert reply["error"]["code"] == "too_large"
    finally:
        sock.close()
    huge = daemon.socket()  # beyond ZMQ_MAXMSGSIZE: ZeroMQ drops the connection
    try:
        huge.send_multipart([b"", b"\x00" * (4 * limit)])
        assert not huge.poll(1000)
    finally:
        huge.close()
    assert daemon.call({"id": "h", "op": "health"})["status"] == "serving"


def test_flood_gets_busy_not_a_dead_daemon(daemon):  # noqa: F811
    sock = daemon.socket()
    n = 300
    try:
        for i in range(n):
            send(sock, {"id": f"fl{i}", "op": "generate", "prompt": "t1", "max_new_tokens": 50,
                        "model": "small"})
        replies = finals(sock, n, timeout_s=120)
    finally:
        sock.close()
    assert len(replies) == n  # every request answered
    codes = {m["error"]["code"] for m in replies.values() if not m["ok"]}
    assert codes <= {"busy"}
    assert any(m["ok"] for m in replies.values())
    assert daemon.call({"id": "h", "op": "health"})["status"] == "serving"
