"""`edged generate` end to end through edged.cli.main (JSON, streaming, exit codes)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from test_zoo_graph import expected, make_dir

from edged.cli import main

FIELDS = {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_ms",
          "total_ms", "tokens_per_s", "provider", "model"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_dir(tmp_path_factory.mktemp("cli"), "rule", mask=True)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["generate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_output(model_dir: Path, capsys) -> None:
    rc, out, _ = run(capsys, "--model", str(model_dir), "--max-new-tokens", "7", "--json",
                     "t3 t5 t9")
    assert rc == 0
    data = json.loads(out)
    assert set(data) == FIELDS
    assert data["token_ids"] == expected([3, 5, 9], 7) and data["prompt_tokens"] == 3
    assert data["completion_tokens"] == 7 and data["finish_reason"] == "length"
    assert data["text"] == " " + " ".join(f"t{i}" for i in data["token_ids"])
    assert data["provider"] == "CPUExecutionProvider" and data["model"] == "rule"


def test_stream_plain_and_json(model_dir: Path, capsys) -> None:
    rc, out, _ = run(capsys, "--model", str(model_dir), "--max-new-tokens", "5", "--stream",
                     "t3 t5 t9")
    assert rc == 0
    assert out == " " + " ".join(f"t{i}" for i in expected([3, 5, 9], 5)) + "\n"
    rc, out, _ = run(capsys, "--model", str(model_dir), "--max-new-tokens", "5", "--stream",
                     "--json", "--stop", "t9999", "t3 t5 t9")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and len(lines) >= 2
    assert "".join(d["delta"] for d in lines[:-1]) == lines[-1]["text"]


def test_sampling_flags_are_reproducible(model_dir: Path, capsys) -> None:
    args = ["--model", str(model_dir), "--max-new-tokens", "8", "--temperature", "2",
            "--top-k", "10", "--top-p", "0.9", "--seed", "3", "--json", "t1"]
    first = json.loads(run(capsys, *args)[1])["token_ids"]
    assert json.loads(run(capsys, *args)[1])["token_ids"] == first


@pytest.mark.parametrize(("argv", "code", "needle"), [
    (["--max-new-tokens", "-4", "t1"], 2, "max_new_tokens=-4"),
    (["--temperature", "nan", "t1"], 2, "temperature=nan"),
    (["--max-new-tokens", "500", "t1"], 2, "exceeds the model's context of 64"),
])
def test_bad_requests_exit_2(model_dir: Path, capsys, argv: list[str], code: int,
                             needle: str) -> None:
    rc, out, err = run(capsys, "--model", str(model_dir), *argv)
    assert rc == code and out == "" and needle in err and "Traceback" not in err


def test_missing_model_exits_3(tmp_path: Path, capsys) -> None:
    rc, _, err = run(capsys, "--model", str(tmp_path / "nope"), "hi")
    assert rc == 3 and "does not exist" in err


def test_prompt_from_stdin_and_invalid_utf8(model_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"t3 t5 t9")))
    rc, out, _ = run(capsys, "--model", str(model_dir), "--max-new-tokens", "2", "--json", "-")
    assert rc == 0 and json.loads(out)["prompt_tokens"] == 3
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"t3 \xc3\x28")))
    rc, _, err = run(capsys, "--model", str(model_dir), "-")
    assert rc == 2 and "not valid UTF-8: byte 3" in err
    rc, _, err = run(capsys, "--model", str(model_dir), "t3 \udcff")  # undecodable argv byte
    assert rc == 2 and "not valid UTF-8" in err
