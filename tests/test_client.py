"""edged.client (sync and asyncio) and the client CLI commands against the real daemon."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from pathlib import Path

import msgpack
import pytest
import zmq
from test_daemon import LONG, daemon, daemon_options, rule_zoo  # noqa: F401 (fixtures)

from edged.cli import main as cli_main
from edged.client import (
    AsyncClient,
    BadRequest,
    Cancelled,
    Client,
    ModelNotFound,
    RequestTimeout,
    UnknownRequest,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_sync_generate_feedback_and_info(daemon):  # noqa: F811
    with Client(daemon.endpoint, timeout_s=30) as client:
        assert client.health()["status"] == "serving"
        assert [m["name"] for m in client.models()] == ["small", "large"]
        reply = client.generate("t3 t5", max_new_tokens=4)
        assert reply["usage"]["completion_tokens"] == 4
        labels = client.feedback(reply["id"], True)["labels"]
        assert labels == {reply["model"]: True}
        with pytest.raises(BadRequest, match="already"):
            client.feedback(reply["id"], False)
        with pytest.raises(UnknownRequest) as info:
            client.feedback("never-sent", True)
        assert info.value.code == "unknown_request"
        with pytest.raises(ModelNotFound):
            client.generate("t1", model="nope")
        assert client.stats()["router"]["labels"] >= 1


def test_sync_stream_and_cancel(daemon):  # noqa: F811
    with Client(daemon.endpoint, timeout_s=30) as client:
        stream = client.stream("t2", max_new_tokens=30)
        deltas = list(stream)
        assert "".join(deltas) == stream.reply["text"]
        long = client.stream("t2", max_new_tokens=LONG, model="small")
        with pytest.raises(Cancelled) as info:
            for i, _ in enumerate(long):
                if i == 0:
                    long.cancel()
        assert info.value.body["text"]


def test_lazy_pirate_retries_then_times_out():
    sockdir = Path(tempfile.mkdtemp(prefix="edged-c-", dir="/tmp"))
    endpoint = f"ipc://{sockdir}/flaky.sock"
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.bind(endpoint)
    seen: list[str] = []

    def flaky() -> None:  # drops the first request, answers the second
        for _ in range(2):
            if not server.poll(10_000):
                return
            frames = server.recv_multipart()
            request = msgpack.unpackb(frames[-1])
            seen.append(request["id"])
            if len(seen) == 2:
                reply = {"v": 1, "id": request["id"], "ok": True, "status": "serving"}
                server.send_multipart([*frames[:-1], msgpack.packb(reply)])

    thread = threading.Thread(target=flaky)
    thread.start()
    try:
        # long enough for a busy machine to answer the resent request before a third try
        with Client(endpoint, timeout_s=3, retries=2) as client:
            assert client.health()["status"] == "serving"
        thread.join(10)
        assert len(seen) == 2 and seen[0] == seen[1]  # the same request, resent
        with Client(endpoint, timeout_s=0.2, retries=2) as client:
            with pytest.raises(RequestTimeout, match="3 attempts"):
                client.health()
            with pytest.raises(RequestTimeout, match="1 attempt"):  # never resent
                client.generate("t1")
    finally:
        server.close()
        ctx.destroy(linger=0)


def test_async_client_many_in_flight(daemon):  # noqa: F811
    async def main() -> None:
        async with AsyncClient(daemon.endpoint, timeout_s=30) as client:
            health = await client.health()
            assert health["status"] == "serving"
            replies = await asyncio.gather(
                *(client.generate(f"t{i}", max_new_tokens=3) for i in range(2))
            )
            assert [r["usage"]["completion_tokens"] for r in replies] == [3, 3]
            assert len({r["id"] for r in replies}) == 2
            stream = await client.stream("t4", max_new_tokens=12)
            deltas = [d async for d in stream]
            assert "".join(deltas) == stream.reply["text"]
            long = await client.stream("t4", max_new_tokens=LONG, model="small")
            with pytest.raises(Cancelled):
                cancelled = False
                async for _ in long:
                    if not cancelled:
                        assert (await long.cancel())["was"] == "running"
                        cancelled = True

    asyncio.run(main())


def test_cli_ask_health_stats_feedback(daemon, capsys):  # noqa: F811
    ep = ["--endpoint", daemon.endpoint]
    assert cli_main(["health", *ep]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "serving"

    assert cli_main(["ask", *ep, "--json", "--max-new-tokens", "3", "t3 t5"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["usage"]["completion_tokens"] == 3

    assert cli_main(["ask", *ep, "--stream", "--max-new-tokens", "3", "t3 t5"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == reply["text"].strip() and "id " in out.err

    assert cli_main(["feedback", *ep, reply["id"], "--unsatisfied"]) == 0
    assert json.loads(capsys.readouterr().out) == {reply["model"]: False}
    assert cli_main(["feedback", *ep, reply["id"], "--satisfied"]) == 1
    assert "bad_request" in capsys.readouterr().err

    assert cli_main(["stats", *ep]) == 0
    table = capsys.readouterr().out
    assert "small" in table and "alpha 0.9" in table
    assert cli_main(["stats", *ep, "--prometheus"]) == 0
    prom = capsys.readouterr().out
    assert '# TYPE edged_model_calls_total counter' in prom
    assert 'edged_router_alpha 0.9' in prom
    lines = [ln for ln in prom.splitlines() if ln and not ln.startswith("#")]
    for line in lines:  # name{labels} value
        name, value = line.rsplit(" ", 1)
        float(value)
        assert name.startswith("edged_")


def test_cli_unreachable_exits_3(capsys):
    sockdir = tempfile.mkdtemp(prefix="edged-c-", dir="/tmp")
    code = cli_main(["health", "--endpoint", f"ipc://{sockdir}/none.sock", "--timeout", "0.2"])
    err = capsys.readouterr().err
    assert code == 3 and "no daemon at" in err and "does not exist" in err
