"""Remote zoo models (issue 15) against real servers on loopback, no mocks of the transport:

* `kind = "edged"`: a second `edged serve` on tcp://127.0.0.1 with CURVE (keys from
  `edged keys generate`), reached by the front daemon's remote model;
* `kind = "openai"`: edged's own OpenAI-compatible front (`edged http`) over a third daemon,
  reached with the standard library's http.client (SSE streamed).

Both: pinned and routed requests, joules (measured by the remote / the cost model), streaming,
cancel (the remote stops), a per-entry timeout, and an outage: the circuit opens, the router
routes around the remote, every request is still served by the local model, with no `internal`
error and no label for the remote learned from the outage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_daemon import (
    LONG,
    Daemon,
    collect,
    rule_zoo,  # noqa: F401 (fixture)
    send,
)
from test_daemon_lifecycle import free_port

from edged.cli import main as cli_main
from edged.client import Client
from edged.router import Router, RouterConfig, RouterError
from edged.zoo import (
    CircuitBreaker,
    GenerationParams,
    ManifestError,
    RemoteModel,
    RemoteUnavailableError,
    ZooManifest,
)

pytestmark = [pytest.mark.timeout(180)]
PROMPT = "t3 t5 t9"


# -- units: manifest, breaker, router ------------------------------------------------------------

def manifest(tmp_path: Path, text: str) -> ZooManifest:
    path = tmp_path / "zoo.toml"
    path.write_text(text)
    return ZooManifest.load(path)


def test_manifest_remote_entries(tmp_path):
    (tmp_path / "small").mkdir()
    m = manifest(tmp_path, """
[[models]]
name = "small"
path = "small"
[[models]]
name = "big"
kind = "edged"
endpoint = "tcp://127.0.0.1:5555"
model = "large"
curve_server_key = "keys/server.key"
curve_client_cert = "keys/client.key_secret"
timeout_s = 5
breaker_failures = 2
[models.generation]
max_new_tokens = 9
[[models]]
name = "cloud"
kind = "openai"
base_url = "http://127.0.0.1:8000/v1/"
model = "meta-llama/Llama-3.1-70B-Instruct"
api_key_env = "VLLM_KEY"
joules_per_prompt_token = 0.01
joules_per_completion_token = 0.2
context = 8192
""")
    small, big, cloud = m.models
    assert small.remote is None and m.names == ["small", "big", "cloud"]
    assert big.remote.kind == "edged" and big.remote.model == "large"
    assert big.remote.curve_server_key == tmp_path / "keys/server.key"
    assert big.remote.timeout_s == 5 and big.remote.breaker_failures == 2
    assert big.generation.max_new_tokens == 9 and big.context is None
    assert cloud.remote.base_url == "http://127.0.0.1:8000/v1" and cloud.context == 8192
    assert cloud.remote.cost.joules(10, 5, 1.0) == pytest.approx(0.01 * 10 + 0.2 * 5)


@pytest.mark.parametrize(("entry", "field"), [
    ('kind = "openai"\nbase_url = "http://h/v1"\nmodel = "m"', "joules_per_completion_token"),
    ('kind = "edged"\nendpoint = "http://h"', "endpoint"),
    ('kind = "edged"\nendpoint = "tcp://h:1"\npath = "x"', "path"),
    ('kind = "edged"\nendpoint = "tcp://h:1"\ncurve_server_key = "k"', "curve_server_key"),
    ('kind = "openai"\nbase_url = "http://h/v1"\njoules_per_second = 1', "model"),
    ('kind = "grpc"', "kind"),
    ('kind = "edged"\nendpoint = "tcp://h:1"\ntimeout_s = -1', "timeout_s"),
])
def test_manifest_remote_errors_name_the_field(tmp_path, entry, field):
    with pytest.raises(ManifestError) as info:
        manifest(tmp_path, f'[[models]]\nname = "r"\n{entry}\n')
    assert info.value.field == field and info.value.model == "r"


def test_circuit_breaker_opens_half_opens_and_closes():
    now = [0.0]
    b = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    b.failure("down")
    assert b.state == "closed" and b.allow()
    b.failure("down")
    assert b.state == "open" and not b.allow() and b.status()["retry_in_s"] == 10.0
    now[0] = 10.0
    assert b.state == "half-open" and b.allow()
    b.failure("still down")  # the probe failed: open again for a full period
    assert b.state == "open" and b.status()["opened"] == 2
    now[0] = 20.0
    b.success()
    assert b.state == "closed" and b.status()["failures"] == 0


def test_router_never_serves_or_explores_an_excluded_model():
    router = Router(["small", "big", "top"], RouterConfig(alpha=0.9, seed=0))
    for i in range(40):  # cold start runs every model that is up: "big" never
        d = router.decide(f"request {i}", exclude={"big"})
        assert "big" not in d.run and d.model != "big"
        router.observe_energy(d, {m: 1.0 for m in d.run})
    t = router.t
    with pytest.raises(RouterError):
        router.decide("x", exclude={"nope"})
    assert router.t == t  # a bad call changes nothing
    d = router.decide("x", exclude={"small", "big", "top"})  # nothing left: ignored
    assert d.model in router.names


def test_unreachable_remote_fails_fast_and_opens_its_circuit():
    from edged.zoo.remote import RemoteSpec

    port = free_port()  # nothing listens there
    model = RemoteModel("r", RemoteSpec(kind="edged", endpoint=f"tcp://127.0.0.1:{port}",
                                        connect_timeout_s=0.3, breaker_failures=2))
    for _ in range(2):
        with pytest.raises(RemoteUnavailableError, match="no connection"):
            model.generate(PROMPT, params=GenerationParams(max_new_tokens=2))
    assert not model.available() and model.status()["state"] == "open"
    with pytest.raises(RemoteUnavailableError, match="circuit open"):
        model.generate(PROMPT)


# -- real servers ----------------------------------------------------------------------------------

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    keys = tmp_path_factory.mktemp("keys")
    for name in ("server", "client", "stranger"):
        assert cli_main(["keys", "generate", str(keys), "--name", name]) == 0
    (keys / "allowed").mkdir()
    (keys / "allowed" / "client.key").write_bytes((keys / "client.key").read_bytes())
    return keys


def server_config(state: Path, models: str, **server: Any) -> str:
    lines = ["[server]", f'state_dir = "{state}"', "queue_size = 8", "save_interval_s = 60",
             "deadline_max_ms = 60000"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in server.items()]
    lines += ["[energy]", 'backend = "estimate"', "[router]", "alpha = 0.9", "seed = 1",
              "[models]", models, "[labels]", 'checker = "exact"']
    return "\n".join(lines) + "\n"


def start_back(work: Path, zoo: tuple[Path, Path], keys: Path | None) -> Daemon:
    """The remote edged: the rule zoo on tcp loopback (CURVE when `keys`), or on ipc."""
    models = f"dirs = {json.dumps([str(p) for p in zoo])}"
    if keys is None:
        d = Daemon(work, server_config(work / "state", models))
    else:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        cfg = server_config(work / "state", models,
                            curve_secret_key=str(keys / "server.key_secret"),
                            curve_client_keys=str(keys / "allowed"))
        d = Daemon(work, cfg, endpoint=endpoint, args=("--endpoint", endpoint))
    d.wait_note("READY=1")
    return d


def start_front(work: Path, small: Path, remotes: str) -> Daemon:
    """The daemon under test: the local `small` model, then the remote entries."""
    zoo = work / "zoo.toml"
    zoo.write_text(f'[[models]]\nname = "small"\npath = "{small}"\n'
                   '[models.generation]\nmax_new_tokens = 4\n' + remotes)
    d = Daemon(work, server_config(work / "state", f'manifest = "{zoo}"'))
    d.wait_note("READY=1")
    return d


def edged_entry(name: str, back: Daemon, keys: Path, **extra: Any) -> str:
    fields = {"kind": "edged", "endpoint": back.endpoint, "model": "large",
              "curve_server_key": str(keys / "server.key"),
              "curve_client_cert": str(keys / "client.key_secret"), "connect_timeout_s": 2,
              **extra}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    return f'[[models]]\nname = "{name}"\n{body}\n[models.generation]\nmax_new_tokens = 4\n'


def back_client(back: Daemon, keys: Path) -> Client:
    return Client(back.endpoint, timeout_s=10, curve_server_key=keys / "server.key",
                  curve_client_cert=keys / "client.key_secret")


def wait_for(check, what: str, timeout_s: float = 30.0) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def stream(d: Daemon, message: dict[str, Any], cancel_after_first: bool = False
           ) -> tuple[list[str], dict[str, Any]]:
    sock = d.socket(zmq.DEALER)
    try:
        send(sock, {"op": "generate", "stream": True, **message})
        if cancel_after_first:
            assert sock.poll(30_000)
            first = collect_one(sock)
            send(sock, {"id": "c-" + message["id"], "op": "cancel",
                        "request_id": message["id"]})
            deltas, final = collect(sock, [message["id"]])[message["id"]]
            return [first, *deltas], final
        return collect(sock, [message["id"]])[message["id"]]
    finally:
        sock.close()


def collect_one(sock: zmq.Socket) -> str:
    import msgpack

    msg = msgpack.unpackb(sock.recv_multipart()[-1])
    assert msg.get("done") is False, msg
    return msg["delta"]


def no_internal(d: Daemon) -> dict[str, Any]:
    stats = d.call({"id": "s", "op": "stats"})
    assert "internal" not in stats["errors"], stats["errors"]
    return stats


@pytest.fixture(scope="module")
def edged_pair(rule_zoo, keys, tmp_path_factory) -> Iterator[tuple[Daemon, Daemon]]:  # noqa: F811
    back = start_back(tmp_path_factory.mktemp("back"), rule_zoo, keys)
    try:
        remotes = (edged_entry("big", back, keys)
                   + edged_entry("slow", back, keys, timeout_s=1.0, breaker_failures=3))
        front = start_front(tmp_path_factory.mktemp("front"), rule_zoo[0], remotes)
        try:
            yield back, front
        finally:
            front.stop()
    finally:
        back.stop()


@slow
def test_edged_remote_models_and_health(edged_pair):
    back, front = edged_pair
    models = {m["name"]: m for m in front.call({"id": "m", "op": "models"})["models"]}
    assert [*models] == ["small", "big", "slow"]
    big = models["big"]
    assert big["device"] == "remote:big" and models["small"]["device"] == "cpu"
    assert big["remote"]["kind"] == "edged" and big["remote"]["where"] == back.endpoint
    assert big["remote"]["state"] == "closed" and big["defaults"]["max_new_tokens"] == 4
    health = front.call({"id": "h", "op": "health"})
    assert health["status"] == "serving" and set(health["remotes"]) == {"big", "slow"}


@slow
def test_edged_remote_pinned_reply_carries_the_remotes_joules(edged_pair, keys):
    back, front = edged_pair
    with back_client(back, keys) as client:
        direct = client.generate(PROMPT, model="large", max_new_tokens=3)
        before = client.stats()["models"]["large"]["calls"]
    reply = front.call({"id": "p1", "op": "generate", "prompt": PROMPT, "model": "big",
                        "max_new_tokens": 3})
    assert reply["ok"], reply
    assert reply["model"] == "big" and reply["text"] == direct["text"]
    assert reply["usage"] == direct["usage"] and reply["route"] == {"routed": False}
    # the joules are the remote daemon's measurement (its estimate meter), not ours
    assert reply["energy"]["method"] == "estimate" and reply["energy"]["joules"] >= 0
    assert reply["remote"]["kind"] == "edged" and reply["remote"]["served_by"] == "large"
    assert reply["remote"]["local_wait"]["method"] == "estimate"  # the wait, reported apart
    assert reply["timing"]["total_ms"] >= reply["timing"]["ttft_ms"] > 0
    with back_client(back, keys) as client:
        assert client.stats()["models"]["large"]["calls"] == before + 1


@slow
def test_edged_remote_routed_and_learned(edged_pair):
    _, front = edged_pair
    reply = front.call({"id": "r1", "op": "generate", "prompt": PROMPT, "reference": "x"})
    assert reply["ok"], reply
    assert set(reply["route"]["run"]) == {"small", "big", "slow"}  # cold start: every model
    wait_for(lambda: front.call({"id": "h", "op": "health"})["in_flight"] == 0
             and no_internal(front)["exploration"]["running"] == 0
             and no_internal(front)["exploration"]["queued"] == 0, "explorations done")
    stats = no_internal(front)
    assert stats["models"]["big"]["measured"] >= 1 and stats["models"]["big"]["labels"] >= 1
    # the router learned the remote's joules and its latency as seen here (network included)
    learned = stats["router"]["models"]["big"]
    assert learned["energy_j"] is not None and learned["energy_j"] >= 0
    assert learned["latency_s"] is not None and learned["latency_s"] > 0


@slow
def test_edged_remote_streams(edged_pair):
    _, front = edged_pair
    deltas, final = stream(front, {"id": "s1", "prompt": PROMPT, "model": "big",
                                   "max_new_tokens": 5})
    assert final["ok"] and len(deltas) >= 2 and "".join(deltas) == final["text"]


@slow
def test_edged_remote_cancel_stops_the_remote(edged_pair, keys):
    back, front = edged_pair
    with back_client(back, keys) as client:
        cancelled = client.stats()["errors"].get("cancelled", 0)
    deltas, final = stream(front, {"id": "c1", "prompt": PROMPT, "model": "big",
                                   "max_new_tokens": LONG}, cancel_after_first=True)
    assert not final["ok"] and final["error"]["code"] == "cancelled", final
    assert final["text"].startswith("".join(deltas)[:1])
    with back_client(back, keys) as client:
        wait_for(lambda: client.stats()["errors"].get("cancelled", 0) == cancelled + 1,
                 "the remote cancelled too")
        wait_for(lambda: client.health()["in_flight"] == 0, "the remote idle")


@slow
def test_edged_remote_timeout_is_a_model_error_and_the_remote_stops(edged_pair, keys):
    back, front = edged_pair
    reply = front.call({"id": "t1", "op": "generate", "prompt": PROMPT, "model": "slow",
                        "max_new_tokens": LONG})
    assert not reply["ok"] and reply["error"]["code"] == "model_error"
    assert "within 1 s" in reply["error"]["message"]
    with back_client(back, keys) as client:
        wait_for(lambda: client.health()["in_flight"] == 0, "the remote stopped the timed-out run")
    health = front.call({"id": "h", "op": "health"})
    assert health["remotes"]["slow"]["failures"] == 1
    assert health["remotes"]["slow"]["state"] == "closed"  # one failure of three
    no_internal(front)


@slow
def test_edged_remote_deadline_is_the_clients_not_an_outage(edged_pair, keys):
    back, front = edged_pair
    reply = front.call({"id": "dl", "op": "generate", "prompt": PROMPT, "model": "big",
                        "max_new_tokens": LONG, "deadline_ms": 700})
    assert reply["error"]["code"] == "deadline_exceeded" and reply["text"], reply
    with back_client(back, keys) as client:
        wait_for(lambda: client.health()["in_flight"] == 0, "the remote stopped too")
    assert front.call({"id": "h", "op": "health"})["remotes"]["big"]["failures"] == 0


@slow
def test_stranger_key_is_refused_by_the_remote(edged_pair, keys):
    from edged.zoo.remote import RemoteSpec

    back, _ = edged_pair
    spec = RemoteSpec(kind="edged", endpoint=back.endpoint, model="large",
                      curve_server_key=keys / "server.key",
                      curve_client_cert=keys / "stranger.key_secret", connect_timeout_s=5)
    with pytest.raises(RemoteUnavailableError, match="refused our CURVE key"):
        RemoteModel("r", spec).generate(PROMPT, params=GenerationParams(max_new_tokens=2))


def outage_checks(front: Daemon, remote: str) -> None:
    """Routed requests with references after the remote went down: all served locally."""
    before = no_internal(front)["models"].get(remote, {}).get("labels", 0)
    # every label is False, so the queue grows and the router soon picks (or explores) the
    # remote: each such request is routed again without it, until the circuit opens
    for i in range(60):
        reply = front.call({"id": f"o{i}", "op": "generate", "prompt": f"t{i} t5",
                            "reference": "x"})
        assert reply["ok"], reply
        assert reply["model"] == "small" and set(reply["labels"]) == {"small"}
        health = front.call({"id": "h", "op": "health"})
        assert health["status"] == "serving"
        if health["remotes"][remote]["state"] == "open":
            break
    assert health["remotes"][remote]["state"] == "open", health
    wait_for(lambda: no_internal(front)["exploration"]["running"] == 0
             and no_internal(front)["exploration"]["queued"] == 0, "explorations done")
    stats = no_internal(front)
    assert stats["models"].get(remote, {}).get("labels", 0) == before  # nothing learned
    later = front.call({"id": "o-late", "op": "generate", "prompt": PROMPT})
    assert remote not in later["route"]["run"]  # routed around while open
    pinned = front.call({"id": "o-pin", "op": "generate", "prompt": PROMPT, "model": remote})
    assert pinned["error"]["code"] == "model_error" and "circuit open" in \
        pinned["error"]["message"]


@slow
def test_edged_remote_outage_opens_the_circuit_and_local_serves(rule_zoo, keys, tmp_path):  # noqa: F811
    (tmp_path / "back").mkdir()
    (tmp_path / "front").mkdir()
    back = start_back(tmp_path / "back", rule_zoo, keys)
    front = start_front(tmp_path / "front", rule_zoo[0], edged_entry(
        "big", back, keys, connect_timeout_s=0.5, breaker_failures=2, breaker_open_s=600))
    try:
        up = front.call({"id": "u", "op": "generate", "prompt": PROMPT, "reference": "x"})
        assert up["ok"] and "big" in up["route"]["run"]
        back.stop()  # the remote tier goes down
        outage_checks(front, "big")
    finally:
        front.stop()
        back.close()


# -- openai: edged's own HTTP front over a third daemon ------------------------------------------

@pytest.fixture(scope="module")
def openai_pair(rule_zoo, tmp_path_factory) -> Iterator[tuple[Daemon, Any, Daemon]]:  # noqa: F811
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from test_http import Front

    work = tmp_path_factory.mktemp("oai")
    (work / "back").mkdir()
    back = start_back(work / "back", rule_zoo, None)
    key = work / "api.key"
    key.write_text("k-0123456789abcdef")
    key.chmod(0o600)
    http = Front(back.endpoint, work, "--api-key-file", str(key))
    try:
        def entry(name: str, **extra: Any) -> str:
            fields = {"kind": "openai", "base_url": f"{http.url}/v1", "model": "large",
                      "api_key_file": str(key), "joules_per_prompt_token": 0.25,
                      "joules_per_completion_token": 0.5, "connect_timeout_s": 1,
                      "breaker_failures": 1, "breaker_open_s": 600, **extra}
            body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
            return f'[[models]]\nname = "{name}"\n{body}\n[models.generation]\nmax_new_tokens = 4\n'

        (work / "front").mkdir()
        front = start_front(work / "front", rule_zoo[0],
                            entry("gpt") + entry("gpt-slow", timeout_s=1.0, breaker_failures=3))
        try:
            yield back, http, front
        finally:
            front.stop()
    finally:
        http.stop()
        back.stop()


@slow
def test_openai_remote_pinned_reply_is_estimated(openai_pair):
    back, _, front = openai_pair
    direct = back.call({"id": "d", "op": "generate", "prompt": PROMPT, "model": "large",
                        "max_new_tokens": 3})
    reply = front.call({"id": "p", "op": "generate", "prompt": PROMPT, "model": "gpt",
                        "max_new_tokens": 3})
    assert reply["ok"], reply
    assert reply["text"] == direct["text"] and reply["usage"] == direct["usage"]
    energy = reply["energy"]
    assert energy["method"] == "remote-estimate" and energy["approximate"] is True
    usage = reply["usage"]
    assert energy["joules"] == pytest.approx(0.25 * usage["prompt_tokens"]
                                             + 0.5 * usage["completion_tokens"])
    assert reply["remote"]["kind"] == "openai" and reply["remote"]["local_wait"] is not None
    chat = front.call({"id": "pc", "op": "generate", "model": "gpt", "max_new_tokens": 2,
                       "messages": [{"role": "user", "content": PROMPT}]})
    assert chat["ok"] and chat["usage"]["completion_tokens"] == 2


@slow
def test_openai_remote_routed_streams_and_learns(openai_pair):
    _, _, front = openai_pair
    deltas, final = stream(front, {"id": "os", "prompt": PROMPT, "model": "gpt",
                                   "max_new_tokens": 5})
    assert final["ok"] and len(deltas) >= 2 and "".join(deltas) == final["text"]
    routed = front.call({"id": "or", "op": "generate", "prompt": PROMPT, "reference": "x"})
    assert routed["ok"] and "gpt" in routed["route"]["run"]
    wait_for(lambda: no_internal(front)["exploration"]["running"] == 0
             and no_internal(front)["exploration"]["queued"] == 0, "explorations done")
    assert no_internal(front)["models"]["gpt"]["measured"] >= 1


@slow
def test_openai_remote_cancel_and_timeout_stop_the_server(openai_pair):
    back, _, front = openai_pair
    before = back.call({"id": "s", "op": "stats"})["errors"].get("cancelled", 0)
    deltas, final = stream(front, {"id": "oc", "prompt": PROMPT, "model": "gpt",
                                   "max_new_tokens": LONG}, cancel_after_first=True)
    assert final["error"]["code"] == "cancelled" and deltas
    wait_for(lambda: back.call({"id": "s", "op": "stats"})["errors"].get("cancelled", 0)
             > before, "the HTTP front cancelled the generation behind it")
    wait_for(lambda: back.call({"id": "h", "op": "health"})["in_flight"] == 0, "back idle")
    slow = front.call({"id": "ot", "op": "generate", "prompt": PROMPT, "model": "gpt-slow",
                       "max_new_tokens": LONG})
    assert slow["error"]["code"] == "model_error" and "within 1 s" in slow["error"]["message"]
    wait_for(lambda: back.call({"id": "h", "op": "health"})["in_flight"] == 0, "back idle")
    no_internal(front)


@slow
def test_openai_remote_outage(openai_pair):
    _, http, front = openai_pair
    http.stop()  # the OpenAI server goes away (connection refused from now on)
    outage_checks(front, "gpt")
