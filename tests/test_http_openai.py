"""edged.http's OpenAI mapping, without a server: request translation, SSE chunks, errors,
the listen/API-key rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from edged.http.openai import (
    ChunkWriter,
    HttpError,
    chat_request,
    completion_body,
    completion_request,
    daemon_id,
    model_list,
    parse_json,
)
from edged.http.server import (
    HttpConfigError,
    check_exposure,
    is_loopback,
    load_api_key,
    parse_listen,
)

REPLY = {
    "id": "r1", "text": "46", "model": "small", "finish_reason": "eos",
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    "timing": {"queue_ms": 0.2, "ttft_ms": 1.0, "total_ms": 2.0, "tokens_per_s": 900.0},
    "energy": {"joules": 0.5, "method": "rapl", "approximate": False},
    "route": {"routed": True, "t": 3, "q": 0.1, "predicted_satisfaction": {"small": 0.9}},
}


def test_chat_request_maps_openai_names_onto_the_protocol():
    call = chat_request({
        "model": "auto", "max_tokens": 4, "temperature": 0, "top_p": 0.5, "seed": 7,
        "stop": ["\n"], "n": 1, "user": "u", "frequency_penalty": 0,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "12+"},
                                                  {"type": "text", "text": "34="}]}],
        "edged": {"reference": "46", "deadline_ms": 500},
    })
    assert call.routed and call.kind == "chat" and not call.stream
    assert call.fields == {"max_new_tokens": 4, "temperature": 0, "top_p": 0.5, "seed": 7,
                           "stop": ["\n"], "reference": "46", "deadline_ms": 500}
    assert call.messages == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "12+34="}]
    named = chat_request({"model": "large", "messages": [{"role": "user", "content": "x"}],
                          "max_completion_tokens": 2, "stream": True,
                          "stream_options": {"include_usage": True}})
    assert named.fields == {"model": "large", "max_new_tokens": 2} and not named.routed
    assert named.stream and named.include_usage
    assert chat_request({"messages": [{"role": "user", "content": "x"}]}).requested == "auto"


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"bogus": 1}, "bogus"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"edged": {"nope": 1}}, "edged.nope"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": []}, "messages"),
])
def test_chat_request_refuses_what_edged_cannot_honour(body, param):
    full = {"messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(HttpError) as info:
        chat_request(full)
    assert info.value.status == 400 and info.value.code == "bad_request"
    assert info.value.param == param


def test_completion_request_and_bodies():
    call = completion_request({"model": "small", "prompt": ["12+34="], "max_tokens": 3})
    assert call.prompt == "12+34=" and call.fields == {"model": "small", "max_new_tokens": 3}
    with pytest.raises(HttpError):
        completion_request({"prompt": [1, 2, 3]})
    with pytest.raises(HttpError):
        parse_json(b"[1]")
    body = completion_body(call, REPLY, created=5)
    assert body["id"] == "cmpl-r1" and daemon_id(body["id"]) == "r1"
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "46"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert body["edged"]["joules"] == 0.5 and body["edged"]["method"] == "rapl"
    assert body["edged"]["routed"] is True and body["edged"]["model"] == "small"
    chat = completion_body(chat_request({"messages": [{"role": "user", "content": "x"}]}),
                           {**REPLY, "finish_reason": "length"})
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "46"}
    assert chat["choices"][0]["finish_reason"] == "length" and chat["id"] == "chatcmpl-r1"


def test_sse_chunks_follow_openais_order():
    call = chat_request({"model": "auto", "stream": True, "stream_options":
                         {"include_usage": True}, "messages": [{"role": "user", "content": "x"}]})
    writer = ChunkWriter(call, "r1", created=1)
    raw = writer.start() + writer.delta("4") + writer.delta("6") + writer.finish(REPLY)
    events = raw.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["4", "6"]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop" and chunks[3]["model"] == "small"
    assert chunks[3]["edged"]["joules"] == 0.5 and chunks[3]["usage"] is None
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 10
    assert {c["id"] for c in chunks} == {"chatcmpl-r1"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_protocol_codes_map_to_http_statuses():
    expected = {"busy": 429, "model_not_found": 404, "bad_request": 400,
                "deadline_exceeded": 504, "shutting_down": 503, "too_large": 413,
                "model_error": 502, "internal": 500, "unknown_request": 404}
    for code, status in expected.items():
        error = HttpError.from_code(code, "m")
        assert error.status == status
        assert error.body() == {"error": {"message": "m", "type": error.body()["error"]["type"],
                                          "param": None, "code": code}}
    busy = HttpError.from_code("busy", "queue full")
    assert busy.headers["retry-after"] == "1" and busy.body()["error"]["type"] == \
        "rate_limit_error"


def test_model_list_puts_the_routed_models_first():
    listed = model_list([{"name": "small", "rank": 0, "device": "cpu"},
                         {"name": "auto", "rank": 1, "device": "cpu"}])
    assert [m["id"] for m in listed["data"]] == ["auto", "edged", "small"]
    assert listed["data"][2]["edged"] == {"routed": False, "rank": 0, "device": "cpu"}


def test_listen_and_api_key_rule(tmp_path: Path):
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":9000") == ("0.0.0.0", 9000)
    for bad in ("8080", "host:http", "h:70000"):
        with pytest.raises(HttpConfigError):
            parse_listen(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None)
    check_exposure("0.0.0.0", "k" * 16)
    with pytest.raises(HttpConfigError, match="API key"):
        check_exposure("0.0.0.0", None)
    key = tmp_path / "key"
    key.write_text("s3cret-s3cret-s3cret\n")
    key.chmod(0o644)
    with pytest.raises(HttpConfigError, match="chmod 600"):
        load_api_key(key)
    key.chmod(0o600)
    assert load_api_key(key) == "s3cret-s3cret-s3cret"
    key.write_text("short")
    with pytest.raises(HttpConfigError, match="16"):
        load_api_key(key)


HTTP_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edged-http.service"


def test_http_unit_runs_the_front_after_the_daemon(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    text = HTTP_UNIT.read_text()
    assert "\nExecStart=/usr/local/bin/edged http --listen 127.0.0.1:8080 " in text
    assert "\nType=notify\n" in text and "\nRestartPreventExitStatus=2\n" in text
    assert "\nAfter=edged.service\n" in text and "\nUser=edged\n" in text
    edged = Path(sys.executable).parent / "edged"
    if shutil.which("systemd-analyze") is None or not edged.exists():
        pytest.skip("systemd-analyze or the edged console script is absent")
    unit = tmp_path / "edged-http.service"
    unit.write_text(text.replace("/usr/local/bin/edged", str(edged)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "edged-http.service" not in proc.stderr, proc.stderr
