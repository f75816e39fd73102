"""The wire protocol: decoding limits, validation with stable codes, reply shapes."""

from __future__ import annotations

import msgpack
import pytest

from edged.protocol import (
    ERROR_CODES,
    VERSION,
    CancelRequest,
    ErrorCode,
    FeedbackRequest,
    GenerateRequest,
    ProtocolError,
    Request,
    delta_message,
    error_reply,
    ok_reply,
    pack,
    parse_reply,
    parse_request,
    unpack,
)

pytestmark = pytest.mark.timeout(30)


def req(**fields):
    return {"v": VERSION, "id": "r1", **fields}


def code_of(obj) -> tuple[str, str | None]:
    with pytest.raises(ProtocolError) as info:
        parse_request(obj)
    return info.value.code.value, info.value.request_id


def test_error_codes_are_stable():
    assert {
        "bad_request", "unsupported_version", "unknown_op", "too_large", "busy", "shutting_down",
        "deadline_exceeded", "cancelled", "unknown_request", "model_not_found", "model_error",
        "internal",
    } == ERROR_CODES


def test_generate_roundtrip_through_msgpack():
    obj = unpack(pack(req(op="generate", prompt="hi", max_new_tokens=4, temperature=0,
                          stop="\n", stream=True, reference="4", deadline_ms=500)))
    r = parse_request(obj)
    assert isinstance(r, GenerateRequest)
    assert (r.prompt, r.max_new_tokens, r.temperature, r.stop, r.stream) == (
        "hi", 4, 0.0, ("\n",), True)
    assert r.reference == "4" and r.deadline_ms == 500 and r.text() == "hi"


def test_generate_messages():
    r = parse_request(req(op="generate", messages=[{"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]))
    assert isinstance(r, GenerateRequest) and r.text() == "a\nb"


@pytest.mark.parametrize("fields, code", [
    ({"op": "generate"}, "bad_request"),                                   # neither
    ({"op": "generate", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
     "bad_request"),                                                       # both
    ({"op": "generate", "prompt": 3}, "bad_request"),
    ({"op": "generate", "prompt": "a", "max_new_tokens": 0}, "bad_request"),
    ({"op": "generate", "prompt": "a", "max_new_tokens": True}, "bad_request"),
    ({"op": "generate", "prompt": "a", "temperature": float("nan")}, "bad_request"),
    ({"op": "generate", "prompt": "a", "stop": [""]}, "bad_request"),
    ({"op": "generate", "prompt": "a", "stream": "yes"}, "bad_request"),
    ({"op": "generate", "prompt": "a", "bogus": 1}, "bad_request"),
    ({"op": "generate", "messages": [{"role": "robot", "content": "x"}]}, "bad_request"),
    ({"op": "generate", "messages": []}, "bad_request"),
    ({"op": "feedback", "request_id": "x"}, "bad_request"),
    ({"op": "feedback", "request_id": "x", "satisfied": True, "labels": {"a": True}},
     "bad_request"),
    ({"op": "feedback", "request_id": "x", "labels": {"a": 1}}, "bad_request"),
    ({"op": "cancel"}, "bad_request"),
    ({"op": "health", "extra": 1}, "bad_request"),
    ({"op": "launch"}, "unknown_op"),
    ({"op": 7}, "bad_request"),
])
def test_bad_requests_get_typed_errors_with_the_id(fields, code):
    assert code_of(req(**fields)) == (code, "r1")


def test_version_and_id_problems():
    assert code_of({"v": 2, "id": "a", "op": "health"}) == ("unsupported_version", "a")
    assert code_of({"v": "1", "id": "a", "op": "health"}) == ("bad_request", "a")
    assert code_of({"v": 1, "op": "health"}) == ("bad_request", None)
    assert code_of({"v": 1, "id": "x" * 1000, "op": "health"}) == ("bad_request", None)
    assert code_of([1, 2, 3]) == ("bad_request", None)


@pytest.mark.parametrize("op", ["health", "generate", "feedback", "cancel"])
def test_bin_field_names_beside_str_ones_are_bad_requests(op):
    obj = unpack(pack({**req(op=op, prompt="t1", request_id="g1", satisfied=True),
                       b"bin": 1, "zz": 2}))
    with pytest.raises(ProtocolError, match="unknown field") as info:
        parse_request(obj)
    assert info.value.code is ErrorCode.BAD_REQUEST and info.value.request_id == "r1"


def test_simple_ops_and_feedback_and_cancel():
    assert parse_request(req(op="health")) == Request(id="r1", op="health")
    fb = parse_request(req(op="feedback", request_id="g1", satisfied=False, model="small"))
    assert fb == FeedbackRequest(id="r1", op="feedback", request_id="g1", satisfied=False,
                                 model="small")
    fb = parse_request(req(op="feedback", request_id="g1", labels={"a": True, "b": False}))
    assert isinstance(fb, FeedbackRequest) and fb.labels == {"a": True, "b": False}
    assert parse_request(req(op="cancel", request_id="g1")) == CancelRequest(
        id="r1", op="cancel", request_id="g1")


def test_unpack_limits():
    with pytest.raises(ProtocolError) as info:
        unpack(b"\x00" * 2000, max_bytes=1024)
    assert info.value.code is ErrorCode.TOO_LARGE
    for bad in (b"\xc1", b"\x92\x01", b"\xa2\xff\xfe", pack({1: 2}), pack(1) + pack(2)):
        with pytest.raises(ProtocolError) as info:
            unpack(bad)
        assert info.value.code is ErrorCode.BAD_REQUEST, bad
    deep = b"\x91" * 5000 + b"\x00"  # nesting deeper than msgpack's stack
    with pytest.raises(ProtocolError):
        unpack(deep)
    # a declared length far beyond the payload is refused without allocating it
    with pytest.raises(ProtocolError):
        unpack(b"\xdd\xff\xff\xff\xff", max_bytes=1024)


def test_replies():
    ok = parse_reply(pack(ok_reply("a", text="t")))
    assert ok.ok and ok.id == "a" and ok.body["text"] == "t" and not ok.is_delta
    err = parse_reply(pack(error_reply(None, ErrorCode.BUSY, "full")))
    assert not err.ok and err.id is None and err.body["error"] == {"code": "busy",
                                                                   "message": "full"}
    assert parse_reply(pack(delta_message("a", "x"))).is_delta
    with pytest.raises(ProtocolError):
        parse_reply(msgpack.packb([1]))
