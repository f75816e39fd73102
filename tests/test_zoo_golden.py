"""stories260K (a real pretrained tiny Llama in ../shared): greedy ids equal golden.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edged.cli import main
from edged.zoo import GenerationParams, load_model

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def golden(stories260k: Path) -> dict:
    return json.loads((stories260k / "golden.json").read_text())


@pytest.fixture(scope="module")
def model(stories260k: Path):
    return load_model(stories260k / "onnx")


def test_prompt_tokenises_to_the_golden_prefix(model, golden) -> None:
    ids = model.encode_prompt(PROMPT)
    assert ids[0] == golden["prompt_ids"][0] == model.bos_token_id
    assert golden["greedy_ids"][: len(ids)] == ids


def test_greedy_from_bos_reproduces_all_golden_ids(model, golden) -> None:
    result = model.generate("", params=GenerationParams(max_new_tokens=golden["max_new_tokens"]))
    assert result.prompt_tokens == 1
    assert [1, *result.token_ids] == golden["greedy_ids"]
    assert result.text.strip() == golden["text"]
    assert result.finish_reason == "length"


def test_cli_json_reproduces_golden_continuation(stories260k: Path, golden, capsys) -> None:
    rc = main(["generate", "--model", str(stories260k / "onnx"), "--max-new-tokens", "59",
               "--json", PROMPT])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    n = out["prompt_tokens"]
    assert n == 5 and out["completion_tokens"] == 59 == len(out["token_ids"])
    assert golden["greedy_ids"][n : n + 59] == out["token_ids"]
    assert golden["text"].startswith(PROMPT + out["text"])
    assert out["provider"] == "CPUExecutionProvider"
    assert out["ttft_ms"] > 0 and out["tokens_per_s"] > 0
    assert out["finish_reason"] == "length"


def test_streamed_deltas_concatenate_to_the_text(model) -> None:
    deltas: list[str] = []
    result = model.generate(PROMPT, params=GenerationParams(max_new_tokens=40),
                            on_delta=deltas.append)
    assert deltas and all(deltas)
    assert "".join(deltas) == result.text
