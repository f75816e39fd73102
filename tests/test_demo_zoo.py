"""The shipped demo zoo: eval set, manifest, models through edged.zoo, and its quality gradient."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edged.checkers import get_checker, number
from edged.paths import demo_zoo_dir
from edged.zoo import Zoo

ZOO = demo_zoo_dir()
NAMES = ["small", "medium", "large"]
_PROBLEM = re.compile(r"^(\d+)\+(\d+)=$")

pytestmark = pytest.mark.skipif(
    not (ZOO / "zoo.toml").is_file(), reason=f"demo zoo not trained ({ZOO})"
)


def _eval_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in (ZOO / "eval.jsonl").read_text().splitlines() if line]


def _solve(prompt: str) -> int:
    match = _PROBLEM.match(prompt)
    assert match, f"eval prompt {prompt!r} is not a plain sum"
    return int(match.group(1)) + int(match.group(2))


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo.from_manifest(ZOO / "zoo.toml")


def test_eval_set_is_well_formed_and_gold_answers_are_right() -> None:
    rows = _eval_rows()
    buckets = {r["bucket"] for r in rows}
    assert buckets == {"1d", "2d", "3d", "4d"}
    per_bucket = {b: sum(r["bucket"] == b for r in rows) for b in buckets}
    assert len(set(per_bucket.values())) == 1, per_bucket
    assert len({r["prompt"] for r in rows}) == len(rows), "duplicate eval prompts"
    for row in rows:
        assert int(row["answer"]) == _solve(row["prompt"]), row
        digits = int(row["bucket"][0])
        assert all(len(x) == digits for x in row["prompt"][:-1].split("+")), row


def test_training_stream_never_yields_a_held_out_prompt() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import train_demo_zoo
    finally:
        sys.path.pop(0)
    rows = train_demo_zoo.make_eval_set(0)
    assert rows == _eval_rows(), "eval.jsonl is not the trainer's held-out set for seed 0"
    held_out = {r["prompt"] for r in rows}
    stream = train_demo_zoo.training_stream(0, held_out)
    seen = {next(stream)[0] for _ in range(20_000)}
    assert not seen & held_out
    one_digit = {p for p in seen if _PROBLEM.match(p) and len(p) == 4}
    assert len(one_digit) == 100 - sum(r["bucket"] == "1d" for r in rows)


def test_manifest_names_three_models_cheapest_first_with_number_checker(zoo: Zoo) -> None:
    assert list(zoo.names) == NAMES
    assert zoo.manifest.checker == "number"
    sizes = [zoo.get(n).size_bytes for n in NAMES]
    assert sizes == sorted(sizes) and sizes[-1] > 10 * sizes[0], sizes
    total = sum(f.stat().st_size for f in ZOO.rglob("*") if f.is_file())
    assert total < 30e6, f"demo zoo is {total / 1e6:.1f} MB"


def test_defaults_are_greedy_short_and_stop_at_newline(zoo: Zoo) -> None:
    for name in NAMES:
        defaults = zoo.get(name).defaults
        assert defaults.greedy and defaults.max_new_tokens <= 8 and "\n" in defaults.stop


@pytest.mark.parametrize(
    ("reply", "gold", "ok"),
    [("-5", "-5", True), ("5", "-5", False), ("-05", "-5", True), (" 68", "68", True),
     ("068\n", "68", True), ("+1001", "1001", True), ("1001 0", "1001", True),
     ("100", "1001", False), ("", "0", False), ("0", "0", True)],
)
def test_number_checker_on_demo_answer_shapes(reply: str, gold: str, ok: bool) -> None:
    assert number(reply, gold) is ok


def test_every_model_answers_and_the_gradient_is_real(zoo: Zoo) -> None:
    rows = _eval_rows()[::4]  # a quarter of every bucket: fast, still every bucket
    checker = get_checker(zoo.manifest.checker)
    accuracy = {}
    for name in NAMES:
        model = zoo.get(name)
        hits = 0
        for row in rows:
            result = model.generate(row["prompt"])
            assert result.finish_reason in ("eos", "stop")
            hits += checker(result.text, row["answer"])
        accuracy[name] = hits / len(rows)
    assert accuracy["small"] < accuracy["medium"] < accuracy["large"], accuracy
    assert accuracy["large"] >= 0.85, accuracy
    assert accuracy["small"] <= 0.6, accuracy
    easy = [r for r in _eval_rows() if r["bucket"] == "1d"]
    small = zoo.get("small")
    easy_hits = sum(checker(small.generate(r["prompt"]).text, r["answer"]) for r in easy)
    assert easy_hits / len(easy) >= 0.85, "the small model must be reliable on 1-digit problems"


def test_chat_messages_reach_the_same_answer(zoo: Zoo) -> None:
    model = zoo.get("large")
    plain = model.generate("23+45=")
    chat = model.generate(messages=[{"role": "user", "content": "23+45="}])
    assert plain.text == chat.text
    assert number(plain.text, "68")


def test_token_logprobs_say_how_sure_the_model_was(zoo: Zoo) -> None:
    """The large model is sure of a sum it gets right; the small one is not sure of a 3-digit
    sum it gets wrong (what a confidence cascade reads)."""
    large, small = zoo.get("large"), zoo.get("small")
    right = large.generate("123+456=", params=replace(large.defaults, logprobs=True))
    wrong = small.generate("123+456=", params=replace(small.defaults, logprobs=True))
    assert not zoo.get("large").generate("123+456=").token_logprobs  # only when asked
    assert right.text.startswith("579") and not wrong.text.startswith("579")
    for result in (right, wrong):
        assert len(result.token_logprobs) == result.completion_tokens
        assert all(lp <= 0.0 for lp in result.token_logprobs)
    assert right.min_token_prob > 0.9 > 0.5 > wrong.min_token_prob
