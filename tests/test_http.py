"""`edged http` against real daemons: the official `openai` client, raw HTTP for SSE framing
(http.client and curl), feedback, API keys, a Prometheus scrape, the Grafana dashboard and the
status page in headless Chromium.

Two daemons: the demo zoo (arithmetic, real answers and labels) and the rule zoo of
tests/test_daemon.py (endless generations, to fill the queue for `busy` and to cancel).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from test_daemon import (  # noqa: E402
    LONG,
    Daemon,
    daemon,  # noqa: F401 (fixture)
    daemon_options,  # noqa: F401 (fixture)
    rule_zoo,  # noqa: F401 (fixture)
    send,
    wait_health,
    wait_idle,
)

from edged.paths import demo_zoo_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
DEMO = demo_zoo_dir() / "zoo.toml"
KEY = "test-key-0123456789abcdef"


class Front:
    """`python -m edged http --listen 127.0.0.1:0` on a daemon's endpoint; `url` once ready."""

    def __init__(self, endpoint: str, workdir: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.log = workdir / f"http-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edged", "http", "--listen", "127.0.0.1:0",
                 "--endpoint", endpoint, "--timeout", "60", *args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.url = self._wait_ready()
        self.host, self.port = urlsplit(self.url).hostname, urlsplit(self.url).port

    def _wait_ready(self, timeout_s: float = 60.0) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = re.search(r"listening on (http://\S+)", self.log.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"edged http exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"edged http never got ready:\n{self.log.read_text()}")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"),
                             max_retries=0, timeout=60, **kwargs)

    def raw(self, method: str, path: str, body: dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"content-type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, \
                response.read()
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def demo_config(state: Path) -> str:
    return "\n".join([
        "[server]", f'state_dir = "{state}"', "queue_size = 4", "save_interval_s = 5",
        "[energy]", 'backend = "estimate"',
        "[router]", "alpha = 0.8", "seed = 1", "margin_decay = 0.25",
        "[models]", f'manifest = "{DEMO}"', ""])


@pytest.fixture(scope="module")
def demo_daemon(tmp_path_factory) -> Iterator[Daemon]:
    if not DEMO.is_file():
        pytest.skip("demo zoo not trained")
    work = tmp_path_factory.mktemp("http-demo")
    d = Daemon(work, demo_config(work / "state"))
    try:
        d.wait_note("READY=1")
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def front(demo_daemon, tmp_path_factory) -> Iterator[Front]:
    f = Front(demo_daemon.endpoint, tmp_path_factory.mktemp("http-front"))
    try:
        yield f
    finally:
        assert f.stop() == 0, f.log.read_text()


@pytest.fixture(scope="module")
def rule_front(daemon, tmp_path_factory) -> Iterator[Front]:  # noqa: F811
    f = Front(daemon.endpoint, tmp_path_factory.mktemp("http-rule"))
    try:
        yield f
    finally:
        f.stop()


def extras(obj) -> dict:
    return (obj.model_extra or {}).get("edged") or {}


# -- the official openai client ------------------------------------------------------------------


def test_openai_chat_auto_routes_and_reports_energy(front):
    client = front.client()
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "12+34="}], max_tokens=7,
        extra_body={"edged": {"reference": "46"}})
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.model in ("small", "medium", "large")
    assert reply.usage.completion_tokens >= 1 and reply.usage.total_tokens == \
        reply.usage.prompt_tokens + reply.usage.completion_tokens
    edged = extras(reply)
    assert edged["routed"] is True and edged["model"] == reply.model
    assert edged["joules"] > 0 and edged["method"] == "estimate" and edged["approximate"]
    assert set(edged["route"]["predicted_satisfaction"]) == {"small", "medium", "large"}
    assert edged["labels"] == {reply.model: reply.choices[0].message.content.strip() == "46"}
    assert raw.headers["x-edged-model"] == reply.model
    assert raw.headers["x-edged-routed"] == "true"
    assert float(raw.headers["x-edged-joules"]) == pytest.approx(edged["joules"])
    assert raw.headers["x-edged-energy-method"] == "estimate"
    assert reply.id == f"chatcmpl-{raw.headers['x-edged-request-id']}"


def test_openai_named_model_bypasses_routing(front):
    client = front.client()
    for name in ("small", "large"):
        reply = client.completions.create(model=name, prompt="21+21=", max_tokens=7, seed=3,
                                          temperature=0, stop=["\n"])
        assert reply.object == "text_completion" and reply.model == name
        assert extras(reply)["routed"] is False and extras(reply)["route"] == {"routed": False}
    assert client.completions.create(model="large", prompt="21+21=").choices[0].text == "42"
    listed = [m.id for m in client.models.list()]
    assert listed == ["auto", "edged", "small", "medium", "large"]
    assert client.models.retrieve("medium").id == "medium"
    # "edged" is the other name of the routed model
    assert extras(client.completions.create(model="edged", prompt="1+2="))["routed"] is True


def test_openai_streaming_chat(front):
    client = front.client()
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "40+27="}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason in ("stop", "length")
    edged = extras(finish[0])
    assert finish[0].model == edged["model"] and edged["routed"] is True
    assert edged["joules"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(text) > 0
    assert len({c.id for c in chunks}) == 1


def test_openai_errors_map_to_statuses(front):
    client = front.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "1+1="}])
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="auto", prompt="1+1=", n=2)
    assert info.value.status_code == 400 and info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:  # the daemon's own validation
        client.completions.create(model="auto", prompt="1+1=", temperature=-1)
    assert info.value.code == "bad_request" and "temperature" in info.value.message
    with pytest.raises(openai.NotFoundError):  # a stream's error before its first byte
        client.chat.completions.create(model="nope", stream=True,
                                       messages=[{"role": "user", "content": "1+1="}])


def test_busy_is_429_with_retry_after_and_a_dropped_stream_is_cancelled(daemon, rule_front):  # noqa: F811
    """queue_size 2: one endless generation running, two queued, the next is busy."""
    sock = daemon.socket()
    try:
        send(sock, {"id": "long0", "op": "generate", "prompt": "t2", "max_new_tokens": LONG,
                    "model": "small", "stream": True})
        assert sock.poll(30_000)  # its first delta: it runs, the queue is empty
        for i in (1, 2):
            send(sock, {"id": f"long{i}", "op": "generate", "prompt": "t2",
                        "max_new_tokens": LONG, "model": "small"})
        wait_health(daemon, in_flight=3, queue=2)
        client = rule_front.client()
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="small", prompt="t3", max_tokens=2)
        assert info.value.status_code == 429 and info.value.code == "busy"
        assert info.value.response.headers["retry-after"] == "1"
        status, headers, body = rule_front.raw("POST", "/v1/completions", {
            "prompt": "t3", "stream": True})
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "busy"
    finally:
        for i in range(3):
            daemon.call({"id": f"c{i}", "op": "cancel", "request_id": f"long{i}"})
        sock.close()
    wait_idle(daemon)
    # an HTTP client that goes away mid-stream cancels its generation
    conn = http.client.HTTPConnection(rule_front.host, rule_front.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": "small", "prompt": "t2", "max_tokens": LONG, "stream": True}))
    response = conn.getresponse()
    assert response.status == 200 and response.read(64).startswith(b"data: ")
    wait_health(daemon, in_flight=1, queue=0)
    conn.close()
    wait_idle(daemon)


# -- raw HTTP: SSE framing, health, feedback, keys -----------------------------------------------


def sse_events(body: bytes) -> list[str]:
    text = body.decode()
    assert text.endswith("\n\n") and "\r" not in text
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_sse_framing_raw(front):
    status, headers, body = front.raw("POST", "/v1/completions", {
        "model": "large", "prompt": "12+34=", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "46"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["edged"]["request_id"] == headers["x-edged-request-id"]


def test_sse_framing_with_curl(front):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is absent")
    out = subprocess.run(
        [curl, "-sN", "--max-time", "60", "-H", "content-type: application/json", "-d",
         json.dumps({"model": "auto", "stream": True,
                     "messages": [{"role": "user", "content": "5+8="}]}),
         f"{front.url}/v1/chat/completions"], capture_output=True, check=True, timeout=90)
    events = sse_events(out.stdout)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_health_feedback_and_unknown_paths(front):
    status, _, body = front.raw("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "serving"
    status, _, body = front.raw("POST", "/v1/completions", {"prompt": "3+4="})
    reply = json.loads(body)
    status, _, body = front.raw("POST", "/v1/feedback", {"id": reply["id"], "satisfied": True})
    assert status == 200, body
    assert json.loads(body)["labels"] == {reply["model"]: True}
    status, _, body = front.raw("POST", "/v1/feedback", {"id": reply["id"], "satisfied": True})
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    status, _, body = front.raw("POST", "/v1/feedback", {"id": "chatcmpl-never", "satisfied": 1})
    assert status == 400
    status, _, body = front.raw("POST", "/v1/feedback", {"id": "never", "satisfied": False})
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_request"
    status, _, body = front.raw("GET", "/v2/nothing")
    assert status == 404 and "error" in json.loads(body)


def test_api_key_and_exposure_rule(demo_daemon, tmp_path):
    refused = subprocess.run(
        [sys.executable, "-m", "edged", "http", "--listen", "0.0.0.0:0", "--endpoint",
         demo_daemon.endpoint], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "EDGED_HTTP_API_KEY"})
    assert refused.returncode == 2 and "API key" in refused.stderr
    keyed = Front(demo_daemon.endpoint, tmp_path, env={"EDGED_HTTP_API_KEY": KEY})
    try:
        with pytest.raises(openai.AuthenticationError):
            keyed.client(api_key="wrong").models.list()
        assert next(m.id for m in keyed.client(api_key=KEY).models.list()) == "auto"
        assert keyed.raw("GET", "/metrics")[0] == 401
        assert keyed.raw("GET", "/")[0] == 401
        assert keyed.raw("GET", "/health")[0] == 200  # probes need no key
    finally:
        keyed.stop()


# -- metrics, dashboard, status page -------------------------------------------------------------


def demo_requests(front: Front, n: int) -> None:
    rows = [json.loads(line) for line in (DEMO.parent / "eval.jsonl").read_text().splitlines()
            if line.strip()]
    client = front.client()
    for i in range(n):
        row = rows[i % len(rows)]
        client.completions.create(model="auto", prompt=row["prompt"],
                                  extra_body={"edged": {"reference": row["answer"]}})


def scrape(front: Front) -> dict[str, list]:
    status, headers, body = front.raw("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in prometheus_parser.text_string_to_metric_families(
        body.decode())}


def test_prometheus_scrape_parses_and_dashboard_uses_it(front):
    demo_requests(front, 10)
    families = scrape(front)
    for name in ("edged_up", "edged_router_alpha", "edged_router_satisfaction", "edged_router_q",
                 "edged_queue_depth", "edged_busy", "edged_errors", "edged_in_flight",
                 "edged_model_energy_joules", "edged_model_served", "edged_energy_info",
                 "edged_http_requests", "edged_http_energy_joules", "edged_http_queue_seconds",
                 "edged_http_ttft_seconds", "edged_http_request_seconds"):
        assert name in families, sorted(families)
    assert families["edged_up"][0].value == 1.0
    assert families["edged_router_alpha"][0].value == 0.8
    ok = [s for s in families["edged_http_requests"]
          if s.name == "edged_http_requests_total" and s.labels["outcome"] == "ok"]
    assert sum(s.value for s in ok) >= 10
    counts = [s for s in families["edged_http_ttft_seconds"]
              if s.name == "edged_http_ttft_seconds_count"]
    assert sum(s.value for s in counts) >= 10
    assert families["edged_energy_info"][0].labels == {"backend": "estimate", "method": "estimate"}
    names = {s.name for samples in families.values() for s in samples}
    dashboard = json.loads((REPO / "docs" / "grafana-edged.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    for expr in exprs:  # every series a panel queries is one the front exports
        for metric in set(re.findall(r"\b(edged_[a-z_]+)", expr)):
            assert metric in names, (metric, expr)


def test_status_page_in_headless_chromium(front, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    status, _headers, page = front.raw("GET", "/")
    assert status == 200 and b"<svg" in page
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page)  # nothing off-device
    demo_requests(front, 50)
    snapshot = json.loads(front.raw("GET", "/status.json")[2])
    assert snapshot["relayed"] >= 50 and len(snapshot["decisions"]) == 20
    assert snapshot["front_satisfaction"] and snapshot["q_series"]
    if chromium is None:
        pytest.skip("chromium is absent (apt-get install chromium)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-dev-shm-usage", "--window-size=1280,1100",
             "--virtual-time-budget=3000", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = Path(os.environ.get("EDGED_STATUS_SCREENSHOT", tmp_path / "status.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*flags, f"--screenshot={shot}", f"{front.url}/"], capture_output=True,
                   timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = subprocess.run([*flags, "--dump-dom", f"{front.url}/"], capture_output=True,
                         timeout=120, check=True, text=True).stdout
    for panel in ("panel-satisfaction", "panel-energy", "panel-mix", "panel-q",
                  "panel-decisions"):
        assert f'id="{panel}"' in dom
    number = r"-?\d+\.\d+"
    assert re.search(rf'id="sat"[^>]*>{number}<', dom), "no live satisfaction"
    assert re.search(rf'id="q"[^>]*>{number}<', dom), "no live Q"
    assert re.search(r'id="alpha"[^>]*>0\.80<', dom)
    assert len(re.findall(rf'class="val">{number} J<', dom)) == 3, "energy bars"
    assert len(re.findall(rf'class="val">{number}% \(\d+\)<', dom)) == 3, "mix bars"
    assert dom.count("<polyline") == 2, "satisfaction and Q charts"
    rows = re.findall(r"<tr><td>", dom)
    assert len(rows) == 20, "decision rows"
