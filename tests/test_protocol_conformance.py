"""Client conformance: docs/protocol.md against the real daemon, spoken with raw pyzmq + msgpack.

The client side of these tests imports nothing from edged: it is what a client in another
language would do with this page alone. The page's own tables (error codes, reply fields) are
parsed, so a field or code added to the daemon but not documented (or documented but never
sent) fails here. The daemons are subprocesses (`python -m edged serve`): one on two hand-built
models with a huge context (slow, cancellable generations), one on the shipped demo zoo (a
32-token context, a default stop string). Each numbered test is an item of issue 12.
"""

# ruff: noqa: F811 (the rule_zoo fixture is imported)
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from test_daemon import rule_zoo  # noqa: F401 (server-side setup: two ONNX model dirs)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
DEMO = REPO / "models" / "demo" / "zoo.toml"
LONG = 65_536


# -- what the page says ---------------------------------------------------------------------------


def doc_table(heading: str) -> list[list[str]]:
    """Rows (cells, backticks kept) of the first table after `heading`."""
    section = DOC.split(heading, 1)[1]
    rows = []
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


def ticked(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


DOC_CODES = {ticked(row[0]).pop() for row in doc_table("### Error codes")}
DOC_FIELDS = {row[0]: (ticked(row[1]), ticked(row[2])) for row in doc_table("### Reply fields")}
COMMON = {"v", "id", "ok", "done"}


def check_fields(kind: str, reply: dict[str, Any]) -> None:
    """`reply` carries the common fields, every `always` field of `kind`, nothing undocumented."""
    always, sometimes = DOC_FIELDS[kind]
    keys = set(reply)
    assert keys >= COMMON, f"{kind}: missing {COMMON - keys} in {reply}"
    assert always <= keys, f"{kind}: missing {always - keys} in {reply}"
    extra = keys - COMMON - always - sometimes
    assert not extra, f"{kind}: undocumented field(s) {extra} in {reply}"
    assert reply["v"] == 1
    assert reply["done"] is (kind != "delta")


# -- a raw client ---------------------------------------------------------------------------------


class Served:
    """`python -m edged serve` on a private ipc endpoint; raw sockets to it."""

    def __init__(self, config: str, work: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edged-p-", dir="/tmp"))
        self.endpoint = f"ipc://{self.dir}/edged.sock"
        (work / "edged.toml").write_text(config)
        self.log = work / "serve.log"
        env = {**os.environ, "EDGED_ENDPOINT": self.endpoint, "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1"}
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edged", "serve", "--config", str(work / "edged.toml")],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.ctx = zmq.Context()
        end = time.monotonic() + 120
        while not (self.dir / "edged.sock").exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < end, "the daemon never bound its socket"
            time.sleep(0.05)
        assert self.call({"id": "ready", "op": "health"})["ok"]

    def socket(self, kind: int = zmq.DEALER) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def call(self, message: dict[str, Any], *, raw: bytes | None = None,
             version: bool = True) -> dict[str, Any]:
        """One request over a fresh REQ socket (`raw`: these bytes as the payload)."""
        sock = self.socket(zmq.REQ)
        try:
            body = {"v": 1, **message} if version else message
            sock.send(raw if raw is not None else msgpack.packb(body))
            assert sock.poll(30_000), f"no reply to {message}"
            return msgpack.unpackb(sock.recv(), strict_map_key=False)
        finally:
            sock.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.ctx.destroy(linger=0)
            shutil.rmtree(self.dir, ignore_errors=True)


def send(sock: zmq.Socket, message: dict[str, Any]) -> None:
    sock.send_multipart([b"", msgpack.packb({"v": 1, **message})])


def recv(sock: zmq.Socket, timeout_s: float = 30.0) -> dict[str, Any]:
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return msgpack.unpackb(sock.recv_multipart()[-1])


def final(sock: zmq.Socket, rid: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The final reply to `rid` (streamed parts and other ids skipped)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        msg = recv(sock, max(0.1, end - time.monotonic()))
        if msg.get("id") == rid and msg.get("done") is not False:
            return msg
    raise AssertionError(f"no final reply to {rid}")


def wait_running(served: Served, count: int = 1) -> None:
    end = time.monotonic() + 60
    while True:
        health = served.call({"id": "w", "op": "health"})
        if health["in_flight"] - health["queue"] >= count:
            return
        assert time.monotonic() < end, health
        time.sleep(0.02)


def code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    check_fields("error", reply)
    return str(reply["error"]["code"])


def rule_config(zoo: tuple[Path, Path], state: Path, **server: Any) -> str:
    server = {"queue_size": 2, "deadline_max_ms": 60_000, "max_message_bytes": 4096, **server}
    return "\n".join([
        "[server]", f'state_dir = "{state}"',
        *(f"{k} = {json.dumps(v)}" for k, v in server.items()),
        "[energy]", 'backend = "estimate"', "[router]", "alpha = 0.9", "seed = 1",
        "[models]", f"dirs = {json.dumps([str(p) for p in zoo])}", "[labels]",
        'checker = "exact"']) + "\n"


@pytest.fixture(scope="module")
def rules(rule_zoo, tmp_path_factory) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("conform-rules")
    served = Served(rule_config(rule_zoo, work / "state"), work)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[Served]:
    if not DEMO.is_file():
        pytest.skip("demo zoo not trained")
    work = tmp_path_factory.mktemp("conform-demo")
    served = Served(f'[server]\nstate_dir = "{work / "state"}"\nqueue_size = 16\n'
                    f'[energy]\nbackend = "estimate"\n[models]\nmanifest = "{DEMO}"\n', work)
    try:
        yield served
    finally:
        served.stop()


# -- the page's own promises ----------------------------------------------------------------------


def test_page_tables_parse():
    assert len(DOC_CODES) == 12 and "busy" in DOC_CODES
    assert set(DOC_FIELDS) == {"error", "generate", "delta", "feedback", "cancel", "models",
                               "health", "stats"}


def test_wire_bytes_and_framing(rules):
    """The documented 19 bytes of a health request; REQ and both DEALER shapes get replies in
    the shape they sent."""
    raw = bytes.fromhex("83 a1 76 01 a2 69 64 a1 68 a2 6f 70 a6 68 65 61 6c 74 68")
    assert msgpack.unpackb(raw) == {"v": 1, "id": "h", "op": "health"}
    reply = rules.call({}, raw=raw)
    check_fields("health", reply)
    assert reply["id"] == "h" and reply["status"] == "serving"
    sock = rules.socket()
    sock.send(raw)  # DEALER without a delimiter
    frames = sock.recv_multipart()
    assert len(frames) == 1 and msgpack.unpackb(frames[0])["id"] == "h"
    sock.send_multipart([b"", raw])
    frames = sock.recv_multipart()
    assert len(frames) == 2 and frames[0] == b""
    sock.close()


def test_every_documented_code_is_sent_and_every_sent_code_documented(rules, tmp_path,
                                                                    rule_zoo):
    seen: dict[str, dict[str, Any]] = {}

    def note(reply: dict[str, Any]) -> None:
        seen[code(reply)] = reply

    note(rules.call({}, raw=b"\xc1"))                                 # bad_request: not msgpack
    note(rules.call({"id": "a", "op": "health", "v": 2}))             # unsupported_version
    note(rules.call({"id": "a", "op": "sing"}))                       # unknown_op
    note(rules.call({"id": "a", "op": "health", "pad": "x" * 5000}))  # too_large
    note(rules.call({"id": "a", "op": "cancel", "request_id": "nope"}))  # unknown_request
    note(rules.call({"id": "a", "op": "generate", "prompt": "t1", "model": "nope"}))
    # busy: a long generation runs, the queue (2) fills
    sock = rules.socket()
    send(sock, {"id": "long", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                "model": "small"})
    wait_running(rules)
    for i in range(3):
        send(sock, {"id": f"q{i}", "op": "generate", "prompt": "t1", "model": "small",
                    "max_new_tokens": 1, "deadline_ms": 200 if i == 0 else 60_000})
    note(final(sock, "q2"))                                          # busy
    note(final(sock, "q0"))                                          # deadline_exceeded
    assert seen["deadline_exceeded"]["text"] == ""  # queued: nothing generated
    assert rules.call({"id": "c", "op": "cancel", "request_id": "long"})["was"] == "running"
    stopped = final(sock, "long")
    note(stopped)                                                    # cancelled
    assert isinstance(stopped["text"], str) and stopped["text"]
    assert final(sock, "q1")["ok"]
    sock.close()
    # shutting_down: a daemon of its own, draining a long generation
    work = tmp_path / "drain"
    work.mkdir()
    drain = Served(rule_config(rule_zoo, work / "state"), work)
    try:
        d = drain.socket()
        send(d, {"id": "long", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                 "model": "small"})
        wait_running(drain)
        drain.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 30
        while drain.call({"id": "h", "op": "health"})["status"] != "draining":
            assert time.monotonic() < end
            time.sleep(0.02)
        note(drain.call({"id": "x", "op": "generate", "prompt": "t1"}))  # shutting_down
        drain.proc.send_signal(signal.SIGTERM)  # the second one cancels the long generation
        assert code(final(d, "long")) in ("cancelled", "shutting_down")
        d.close()
    finally:
        assert drain.stop() == 0
    untriggerable = {"internal", "model_error"}  # a daemon bug; a model that fails to run
    assert set(seen) == DOC_CODES - untriggerable, set(seen) ^ (DOC_CODES - untriggerable)
    for reply in seen.values():
        assert reply["error"]["message"]


def test_reply_fields_of_every_op(rules, demo):
    check_fields("health", rules.call({"id": "h", "op": "health"}))
    models = rules.call({"id": "m", "op": "models"})
    check_fields("models", models)
    for rank, entry in enumerate(models["models"]):
        assert set(entry) == {"name", "rank", "device", "context_length", "defaults"}
        assert entry["rank"] == rank and entry["context_length"] > 0
        assert set(entry["defaults"]) == {"max_new_tokens", "temperature", "top_k", "top_p",
                                          "repetition_penalty", "stop"}
    reply = demo.call({"id": "g", "op": "generate", "prompt": "12+34=", "reference": "46"})
    check_fields("generate", reply)
    assert reply["finish_reason"] in ("eos", "length", "stop")
    assert set(reply["usage"]) == {"prompt_tokens", "completion_tokens"}
    assert set(reply["timing"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_s"}
    assert set(reply["energy"]) == {"joules", "dynamic_joules", "method", "approximate",
                                    "per_rail_j", "window_s", "samples", "attribution",
                                    "scope_channels"}
    assert reply["route"]["routed"] is True and "labels" in reply
    assert {"t", "model", "explored", "run", "q", "z", "target", "predicted_satisfaction",
            "predicted_energy_j", "predicted_latency_s"} <= set(reply["route"])
    sock = demo.socket()
    send(sock, {"id": "s", "op": "generate", "prompt": "12+34=", "stream": True})
    parts = []
    while True:
        msg = recv(sock)
        if msg["done"] is False:
            check_fields("delta", msg)
            parts.append(msg["delta"])
        else:
            break
    check_fields("generate", msg)
    assert "".join(parts) == msg["text"]
    sock.close()
    named = demo.call({"id": "n", "op": "generate", "prompt": "1+1=", "model": "small"})
    assert named["route"] == {"routed": False}
    fb = demo.call({"id": "f", "op": "feedback", "request_id": "g", "satisfied": True,
                    "model": reply["model"]})
    if fb["ok"]:
        check_fields("feedback", fb)
    else:  # the reference already labelled it: a second label is refused
        assert fb["error"]["code"] == "bad_request"
    stats = demo.call({"id": "st", "op": "stats"})
    check_fields("stats", stats)
    doc_stats = doc_table("- `stats` (counters")
    documented = set().union(*(ticked(row[0]) for row in doc_stats))
    assert set(stats) - COMMON <= documented, set(stats) - COMMON - documented
    router_doc = next(row[1] for row in doc_stats if row[0] == "`router`")
    assert set(stats["router"]) <= ticked(router_doc), set(stats["router"]) - ticked(router_doc)
    for per_model in stats["models"].values():
        assert set(per_model) <= ticked(next(r[1] for r in doc_stats if r[0] == "`models`"))


# -- issue 12, protocol items ---------------------------------------------------------------------


def test_1_cancel_on_the_first_part_always_ends_cancelled(demo):
    """400 trials: a cancel sent as soon as the first streamed part arrives. Whenever its reply
    says `was: running` (or queued), the generation's reply is `cancelled` with `text`."""
    sock = demo.socket()
    counts = {"running": 0, "queued": 0, "unknown": 0}
    for i in range(400):
        rid = f"race{i}"
        send(sock, {"id": rid, "op": "generate", "prompt": f"{i}+{i}=", "stream": True,
                    "model": "large"})
        first = recv(sock)
        if first.get("done") is not False:  # finished before a part: nothing to race
            continue
        send(sock, {"id": f"c{i}", "op": "cancel", "request_id": rid})
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < 2:
            msg = recv(sock)
            if msg.get("done") is not False:
                replies[msg["id"]] = msg
        answer, gen = replies[f"c{i}"], replies[rid]
        if answer["ok"]:
            counts[answer["was"]] += 1
            assert gen["ok"] is False and gen["error"]["code"] == "cancelled", (answer, gen)
            assert isinstance(gen["text"], str)
        else:
            counts["unknown"] += 1
            assert answer["error"]["code"] == "unknown_request"
    sock.close()
    assert counts["running"] > 0, counts


def test_2_stopped_queued_requests_carry_text(rules):
    sock = rules.socket()
    send(sock, {"id": "long2", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                "model": "small"})
    wait_running(rules)
    send(sock, {"id": "queued2", "op": "generate", "prompt": "t1", "model": "small"})
    send(sock, {"id": "dl2", "op": "generate", "prompt": "t1", "model": "small",
                "deadline_ms": 100})
    assert rules.call({"id": "c", "op": "cancel", "request_id": "queued2"})["was"] == "queued"
    queued = final(sock, "queued2")
    assert code(queued) == "cancelled" and queued["text"] == ""
    expired = final(sock, "dl2")
    assert code(expired) == "deadline_exceeded" and expired["text"] == ""
    rules.call({"id": "c2", "op": "cancel", "request_id": "long2"})
    assert code(final(sock, "long2")) == "cancelled"
    sock.close()


def test_3_models_report_the_context_and_too_long_is_explained(demo):
    models = demo.call({"id": "m", "op": "models"})["models"]
    assert all(m["context_length"] == 32 for m in models)
    assert all(m["defaults"]["max_new_tokens"] < m["context_length"] for m in models)
    reply = demo.call({"id": "x", "op": "generate", "prompt": "1+1=", "max_new_tokens": 32,
                       "model": "small"})
    assert code(reply) == "bad_request"
    assert "max_new_tokens 32" in reply["error"]["message"]
    assert "context of 32 tokens" in reply["error"]["message"]
    long = demo.call({"id": "y", "op": "generate", "prompt": "What is the capital of France?"
                      * 3})
    assert code(long) == "bad_request" and "context" in long["error"]["message"]


def test_4_done_true_on_every_final_reply(rules, demo):
    assert rules.call({}, raw=msgpack.packb([1, 2]))["done"] is True       # not a map
    assert rules.call({"id": "d", "op": "generate", "prompt": 5})["done"] is True  # validation
    assert demo.call({"id": "d", "op": "generate", "prompt": "1+1=",
                      "max_new_tokens": 40})["done"] is True                  # context
    assert rules.call({"id": "d", "op": "health"})["done"] is True


@pytest.mark.parametrize(("field", "good", "bad"), [
    ("repetition_penalty", [0.01, 100, 1], [0.009, 100.5, 0]),
    ("top_k", [0, 1 << 20], [(1 << 20) + 1, -1]),
    ("seed", [0, (1 << 63) - 1], [1 << 63, -1]),
    ("top_p", [1e-9, 1, 0.5], [0, 1e-10, 1.5]),
    ("temperature", [0, 100], [100.1, -0.1]),
    ("max_new_tokens", [1, 2], [0, 65537]),
])
def test_5_documented_limits(rules, field, good, bad):
    base = {"op": "generate", "prompt": "t1", "model": "small", "max_new_tokens": 1}
    for value in good:
        reply = rules.call({**base, "id": "ok", field: value})
        assert reply["ok"], (field, value, reply)
    for value in bad:
        reply = rules.call({**base, "id": "bad", field: value})
        assert code(reply) == "bad_request" and field in reply["error"]["message"], (field, value)


def test_5_deadline_is_capped_and_ids_count_code_points(rules):
    base = {"op": "generate", "prompt": "t1", "model": "small", "max_new_tokens": 1}
    for value in (1 << 40, (1 << 40) + 1, (1 << 64) - 1):
        assert rules.call({**base, "id": "d", "deadline_ms": value})["ok"], value
    assert code(rules.call({**base, "id": "d", "deadline_ms": 0})) == "bad_request"
    wide = "é" * 128  # 128 code points, 256 bytes
    assert rules.call({"id": wide, "op": "health"})["id"] == wide
    too_long = "é" * 129
    reply = rules.call({"id": too_long, "op": "health"})
    assert code(reply) == "bad_request" and "code points" in reply["error"]["message"]


def test_6_whole_floats_are_accepted_in_int_fields(rules):
    base = {"id": "f", "op": "generate", "prompt": "t1", "model": "small"}
    reply = rules.call({**base, "max_new_tokens": 2.0, "top_k": 1.0, "seed": 2.0 ** 53,
                        "deadline_ms": 2.0 ** 53, "temperature": 1})
    assert reply["ok"] and reply["usage"]["completion_tokens"] == 2
    assert rules.call({"id": "v", "op": "health", "v": 1.0}, version=False)["ok"]
    fraction = rules.call({**base, "max_new_tokens": 2.5})
    assert code(fraction) == "bad_request" and "whole number" in fraction["error"]["message"]
    assert code(rules.call({**base, "max_new_tokens": True})) == "bad_request"


def test_7_invalid_ids_and_too_large_are_echoed(rules):
    long_id = "x" * 200
    assert rules.call({"id": long_id, "op": "health"})["id"] == long_id
    assert rules.call({"id": 42, "op": "health"})["id"] == 42
    assert rules.call({"id": "", "op": "health"})["id"] == ""
    assert rules.call({"op": "health"})["id"] is None
    # too_large (limit 4096 here): the id is found wherever it is in the map
    for message in ({"id": "big1", "op": "generate", "prompt": "x" * 6000},
                    {"op": "generate", "prompt": "x" * 6000, "v": 1, "id": "big2"}):
        reply = rules.call(message, version=False)
        assert code(reply) == "too_large" and reply["id"] == message["id"]
    assert rules.call({}, raw=msgpack.packb(["x" * 6000]))["id"] is None


def test_8_finish_reason_stop_from_the_models_default_stop_string(demo):
    models = {m["name"]: m for m in demo.call({"id": "m", "op": "models"})["models"]}
    assert models["large"]["defaults"]["stop"] == ["\n"]
    # the demo models rarely write a newline: sample hot until one does (bounded, seeded)
    sock = demo.socket()
    for seed in range(600):
        send(sock, {"id": f"s{seed}", "op": "generate", "prompt": "12+34=", "model": "small",
                    "temperature": 3.0, "seed": seed})
        reply = final(sock, f"s{seed}")
        if reply["finish_reason"] == "stop":
            break
    sock.close()
    assert reply["finish_reason"] == "stop", "no sampled newline in 600 seeds"
    assert "\n" not in reply["text"]


def test_9_codes_for_empty_and_unknown_models(demo):
    assert code(demo.call({"id": "e", "op": "generate", "prompt": "1+1=",
                           "model": ""})) == "model_not_found"
    assert demo.call({"id": "r", "op": "generate", "prompt": "1+1="})["ok"]
    unknown = demo.call({"id": "u", "op": "feedback", "request_id": "r", "satisfied": True,
                         "model": "nope"})
    assert code(unknown) == "model_not_found" and "nope" in unknown["error"]["message"]
    labels = demo.call({"id": "u", "op": "feedback", "request_id": "r", "labels": {"nope": True}})
    assert code(labels) == "model_not_found"
    assert code(demo.call({"id": "u", "op": "feedback", "request_id": "r", "satisfied": True,
                           "model": ""})) == "model_not_found"


def test_10_error_replies_to_generate_carry_no_model_usage_energy_route(demo):
    reply = demo.call({"id": "x", "op": "generate", "prompt": "1+1=", "max_new_tokens": 40})
    assert code(reply) == "bad_request"
    assert not {"model", "usage", "timing", "energy", "route"} & set(reply)


def test_11_stream_on_a_req_socket_is_refused(demo):
    reply = demo.call({"id": "r", "op": "generate", "prompt": "1+1=", "stream": True})
    assert code(reply) == "bad_request" and "DEALER" in reply["error"]["message"]
    sock = demo.socket()
    send(sock, {"id": "d", "op": "generate", "prompt": "1+1=", "stream": True})
    assert final(sock, "d")["ok"]
    sock.close()


def test_12_stats_nulls_and_definitions(rules):
    before = rules.call({"id": "s0", "op": "stats"})
    rules.call({"id": "g12", "op": "generate", "prompt": "t1", "max_new_tokens": 1,
                "model": "small"})
    after = rules.call({"id": "s1", "op": "stats"})
    assert after["completed"] == before["completed"] + 1
    assert after["received"] == before["received"] + 2  # the generate and this stats
    small = after["models"]["small"]
    if small["labels"] == 0:
        assert small["satisfaction"] is None  # documented: nil before the first label
    for key in ("debt", "lam", "explore_ratio", "energy_budget_j", "t", "q"):
        assert key in after["router"]
