"""The daemon's life: sd_notify order, watchdog, SIGTERM drain, state across restarts, SIGHUP,
bad configs, the tcp rule and CURVE."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from test_daemon import LONG, Daemon, collect, config_text, rule_zoo, send  # noqa: F401 (fixture)

from edged.cli import main as cli_main
from edged.client import Client, RequestTimeout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def statuses(notes: list[str]) -> list[str]:
    """The first line of each notification: the sequence systemd sees."""
    return [n.split("\n")[0] for n in notes]


def test_notify_order_drain_state_and_restart(rule_zoo, tmp_path):  # noqa: F811
    state = tmp_path / "state"
    cfg = config_text(rule_zoo, state, save_interval_s=3600)  # only the shutdown save
    d = Daemon(tmp_path, cfg, extra_env={"WATCHDOG_USEC": "300000"})
    try:
        d.wait_note("READY=1")
        d.wait_note("WATCHDOG=1", 30)
        sock = d.socket()
        ids = ["a", "b"]
        for rid in ids:
            send(sock, {"id": rid, "op": "generate", "prompt": "t1", "max_new_tokens": 8_000,
                        "stream": True, "reference": "t1"})
        assert sock.poll(30_000)  # the first is running
        d.proc.send_signal(signal.SIGTERM)
        results = collect(sock, ids)
        sock.close()
        assert all(final["ok"] for _, final in results.values())  # drained, not dropped
        t_max = max(final["route"]["t"] for _, final in results.values())
        assert d.proc.wait(60) == 0
        d.wait_note("STATUS=stopped", 30)
    finally:
        d.close()
    seq = statuses(d.notes)
    head = ["STATUS=reading config", "STATUS=loading models", "STATUS=binding", "READY=1"]
    assert seq[:4] == head
    assert seq.index("STOPPING=1") > seq.index("WATCHDOG=1") > seq.index("READY=1")
    assert seq[-1] == "STATUS=stopped" and seq.count("READY=1") == 1
    assert (state / "router-state.small+large.npz").is_file()  # one state file per zoo

    again = Daemon(tmp_path, cfg)
    try:
        again.wait_note("READY=1")
        router = again.call({"id": "s", "op": "stats"})["router"]
        assert router["t"] == t_max and router["labels"] >= 2
    finally:
        assert again.stop() == 0


def test_sighup_reloads_and_keeps_old_config_when_bad(rule_zoo, tmp_path):  # noqa: F811
    state = tmp_path / "state"
    d = Daemon(tmp_path, config_text(rule_zoo, state))
    try:
        d.wait_note("READY=1")
        assert d.call({"id": "h", "op": "health"})["queue_size"] == 2
        d.config_path.write_text(config_text(rule_zoo, state, queue_size=5))
        d.notes.clear()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_note("READY=1")
        assert statuses(d.notes)[0] == "RELOADING=1"
        assert d.call({"id": "h", "op": "health"})["queue_size"] == 5

        d.config_path.write_text(config_text((rule_zoo[1],), state, queue_size=5))
        d.notes.clear()
        d.proc.send_signal(signal.SIGHUP)  # another zoo: swapped in, router rebuilt for it
        d.wait_note("READY=1")
        assert [m["name"] for m in d.call({"id": "m", "op": "models"})["models"]] == ["large"]
        reply = d.call({"id": "g", "op": "generate", "prompt": "t1", "max_new_tokens": 2})
        assert reply["ok"] and reply["model"] == "large"

        d.config_path.write_text("[server]\nqueue_size = -3\n")
        d.notes.clear()
        d.proc.send_signal(signal.SIGHUP)
        ready = d.wait_note("READY=1")
        assert "reload failed" in ready and "queue_size" in ready
        health = d.call({"id": "h", "op": "health"})
        assert health["status"] == "serving" and health["queue_size"] == 5
    finally:
        assert d.stop() == 0


def test_bad_config_exits_2_naming_the_key(rule_zoo, tmp_path):  # noqa: F811
    d = Daemon(tmp_path, config_text(rule_zoo, tmp_path / "s").replace("alpha = 0.9",
                                                                        "alpha = 7"))
    try:
        assert d.proc.wait(60) == 2
    finally:
        d.close()
    log = d.log.read_text()
    assert "edged.toml: [router] alpha: must be" in log


def test_unknown_router_field_and_checker(rule_zoo, tmp_path):  # noqa: F811
    text = config_text(rule_zoo, tmp_path / "s").replace("seed = 1", "seed = 1\nwarp = 3")
    d = Daemon(tmp_path, text)
    try:
        assert d.proc.wait(60) == 2
    finally:
        d.close()
    assert "[router]" in d.log.read_text() and "warp" in d.log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_on_all_interfaces_needs_curve(rule_zoo, tmp_path):  # noqa: F811
    d = Daemon(tmp_path, config_text(rule_zoo, tmp_path / "s"),
               args=("--endpoint", f"tcp://0.0.0.0:{free_port()}"))
    try:
        assert d.proc.wait(60) == 2
    finally:
        d.close()
    assert "refusing" in d.log.read_text() and "CURVE" in d.log.read_text()


def test_curve_admits_listed_clients_only(rule_zoo, tmp_path):  # noqa: F811
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    assert cli_main(["keys", "generate", str(keys), "--name", "server"]) == 0
    assert cli_main(["keys", "generate", str(keys), "--name", "client"]) == 0
    assert cli_main(["keys", "generate", str(keys), "--name", "stranger"]) == 0
    assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600
    allowed.mkdir()
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    endpoint = f"tcp://0.0.0.0:{free_port()}"
    cfg = config_text(rule_zoo, tmp_path / "s", curve_secret_key=str(keys / "server.key_secret"),
                      curve_client_keys=str(allowed))
    d = Daemon(tmp_path, cfg, args=("--endpoint", endpoint))
    local = endpoint.replace("0.0.0.0", "127.0.0.1")
    try:
        d.wait_note("READY=1")
        with Client(local, timeout_s=10, curve_server_key=keys / "server.key",
                    curve_client_cert=keys / "client.key_secret") as client:
            assert client.health()["status"] == "serving"
            assert client.generate("t1", max_new_tokens=2)["usage"]["completion_tokens"] == 2
        with Client(local, timeout_s=1, retries=0, curve_server_key=keys / "server.key",
                    curve_client_cert=keys / "stranger.key_secret") as client, \
                pytest.raises(RequestTimeout):
            client.health()
        plain = zmq.Context.instance().socket(zmq.REQ)  # no CURVE at all: no answer either
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(local)
        plain.send(msgpack.packb({"v": 1, "id": "x", "op": "health"}))
        assert not plain.poll(1000)
        plain.close()
    finally:
        assert d.stop() == 0


def test_stale_socket_file_is_replaced(rule_zoo, tmp_path):  # noqa: F811
    d = Daemon(tmp_path, config_text(rule_zoo, tmp_path / "s"))
    try:
        d.wait_note("READY=1")
        path = Path(d.endpoint[len("ipc://"):])
        d.proc.kill()
        d.proc.wait(30)
        assert path.exists()  # SIGKILL leaves the socket file behind
        second = Daemon(tmp_path, config_text(rule_zoo, tmp_path / "s"), endpoint=d.endpoint)
        try:
            second.wait_note("READY=1")
            assert second.call({"id": "h", "op": "health"})["ok"]
            third = Daemon(tmp_path, config_text(rule_zoo, tmp_path / "s"), endpoint=d.endpoint)
            try:  # a live daemon on the socket: the newcomer refuses instead of stealing it
                assert third.proc.wait(60) == 2
                assert "another process" in third.log.read_text()
            finally:
                third.close()
            time.sleep(0.1)
            assert second.call({"id": "h", "op": "health"})["ok"]
        finally:
            assert second.stop() == 0
    finally:
        d.close()


def test_serve_model_dirs_without_a_config_file(rule_zoo, tmp_path):  # noqa: F811
    d = Daemon(tmp_path, "", args=("--model", str(rule_zoo[1]), "--model", str(rule_zoo[0]),
                                   "--state-dir", str(tmp_path / "state")))
    try:
        d.wait_note("READY=1")
        names = [m["name"] for m in d.call({"id": "m", "op": "models"})["models"]]
        assert names == ["large", "small"]  # the order given is the cost order
        reply = d.call({"id": "g", "op": "generate", "prompt": "t2", "max_new_tokens": 2})
        assert reply["ok"] and reply["energy"] is not None
    finally:
        assert d.stop() == 0
    assert list((tmp_path / "state").glob("router-state.*.npz"))  # one state file per zoo


def test_second_sigterm_stops_in_flight_work(rule_zoo, tmp_path):  # noqa: F811
    d = Daemon(tmp_path, config_text(rule_zoo, tmp_path / "state"))
    try:
        d.wait_note("READY=1")
        sock = d.socket()
        send(sock, {"id": "long", "op": "generate", "prompt": "t1", "max_new_tokens": LONG,
                    "stream": True, "model": "small"})
        assert sock.poll(30_000)
        d.proc.send_signal(signal.SIGTERM)
        d.wait_note("STOPPING=1", 30)
        late = d.socket()  # draining: no new generations
        send(late, {"id": "late", "op": "generate", "prompt": "t1"})
        assert late.poll(30_000)
        assert msgpack.unpackb(late.recv_multipart()[-1])["error"]["code"] == "shutting_down"
        late.close()
        d.proc.send_signal(signal.SIGTERM)
        _, final = collect(sock, ["long"])["long"]
        sock.close()
        assert final["error"]["code"] == "shutting_down" and final["text"]
        assert d.proc.wait(30) == 0
    finally:
        d.close()
