"""Request behaviour: sampling, stop strings, cancellation, context, bad inputs, providers."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
from test_zoo_graph import expected, make_dir
from test_zoo_tiny import tiny_model

import edged.zoo.model as zoo_model
from edged.zoo import (
    ContextOverflowError,
    GenerationParams,
    InvalidRequestError,
    ProviderError,
    ProviderFallbackWarning,
    load_model,
)

PROMPT = "t3 t5 t9"


@pytest.fixture(scope="module")
def rule_dir(tmp_path_factory) -> Path:
    return make_dir(tmp_path_factory.mktemp("rule"), "rule", mask=True)


@pytest.fixture(scope="module")
def rule(rule_dir: Path):
    return load_model(rule_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.getbasetemp())[1]


@pytest.fixture(scope="module")
def llama(llama_dir: Path):
    return load_model(llama_dir, intra_op_threads=1, inter_op_threads=1)


def sampled(model, seed: int | None, **kw) -> list[int]:
    params = GenerationParams(max_new_tokens=24, temperature=0.9, seed=seed, **kw)
    return model.generate("Once upon", params=params).token_ids


@pytest.mark.parametrize("kw", [{}, {"top_k": 20}, {"top_p": 0.8},
                                {"top_k": 50, "top_p": 0.9, "repetition_penalty": 1.3}])
def test_same_seed_same_ids(llama, kw: dict) -> None:
    first = sampled(llama, 7, **kw)
    assert sampled(llama, 7, **kw) == first
    assert any(sampled(llama, s, **kw) != first for s in (8, 9, 10))


def test_degenerate_sampling_equals_greedy(llama) -> None:
    greedy = llama.generate("Once upon", params=GenerationParams(max_new_tokens=24)).token_ids
    assert sampled(llama, 1, top_k=1) == greedy
    assert sampled(llama, 2, top_p=1e-9) == greedy


def test_repetition_penalty_discourages_repeats(llama) -> None:
    def distinct(penalty: float) -> int:
        params = GenerationParams(max_new_tokens=40, repetition_penalty=penalty)
        return len(set(llama.generate("Once upon", params=params).token_ids))

    assert distinct(5.0) > distinct(1.0)


def test_streaming_deltas_concatenate(llama) -> None:
    deltas: list[str] = []
    result = llama.generate("日本語 🙂", params=GenerationParams(max_new_tokens=40),
                            on_delta=deltas.append)
    assert all(deltas) and "".join(deltas) == result.text
    assert result.completion_tokens == 40 == len(result.token_ids)
    assert result.ttft_ms > 0 and result.total_ms >= result.ttft_ms and result.tokens_per_s > 0


def test_stop_string_cuts_text_and_stream(rule) -> None:
    ids = expected([3, 5, 9], 12)
    stop = f" t{ids[4]} "
    deltas: list[str] = []
    params = GenerationParams(max_new_tokens=12, stop=("never", stop))
    result = rule.generate(PROMPT, params=params, on_delta=deltas.append)
    assert result.finish_reason == "stop"
    assert result.text == " " + " ".join(f"t{i}" for i in ids[:4])
    assert "".join(deltas) == result.text
    assert result.token_ids == ids[: len(result.token_ids)] and len(result.token_ids) >= 5


def test_cancel_between_tokens(rule) -> None:
    cancel = threading.Event()
    seen: list[str] = []

    def on_delta(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            cancel.set()

    result = rule.generate(PROMPT, params=GenerationParams(max_new_tokens=30),
                           on_delta=on_delta, cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens == 3 and result.text == "".join(seen)
    cancel.set()
    early = rule.generate(PROMPT, params=GenerationParams(max_new_tokens=30), cancel=cancel)
    assert early.finish_reason == "cancelled" and early.token_ids == [] and early.text == ""


def test_context_is_enforced(rule) -> None:
    assert rule.context == 64
    ok = rule.generate(PROMPT, params=GenerationParams(max_new_tokens=61))
    assert ok.completion_tokens == 61
    with pytest.raises(ContextOverflowError, match="3 tokens \\+ max_new_tokens 62 exceeds"):
        rule.generate(PROMPT, params=GenerationParams(max_new_tokens=62))
    with pytest.raises(ContextOverflowError) as info:
        rule.generate(" ".join(["t4"] * 80), params=GenerationParams(max_new_tokens=1))
    assert info.value.prompt_tokens == 80 and info.value.context == 64


def test_empty_prompt_starts_from_bos(rule, rule_dir: Path, tmp_path: Path) -> None:
    result = rule.generate("", params=GenerationParams(max_new_tokens=3))
    assert result.prompt_ids == [0] and result.token_ids == expected([0], 3)
    no_bos = tmp_path / "no_bos"
    shutil.copytree(rule_dir, no_bos)
    cfg = json.loads((no_bos / "config.json").read_text())
    del cfg["bos_token_id"]
    (no_bos / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequestError, match=r"empty prompt.*no BOS"):
        load_model(no_bos).generate("   ", params=GenerationParams(max_new_tokens=3))


@pytest.mark.parametrize(("prompt", "needle"), [
    (b"t3 \xff\xfe t4", "not valid UTF-8: byte 3"),
    ("t3 \udcff", "lone surrogate"),
    (42, "must be str or UTF-8 bytes"),
])
def test_bad_prompts(rule, prompt: object, needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        rule.generate(prompt, params=GenerationParams(max_new_tokens=2))


def test_utf8_bytes_prompt_is_accepted(rule) -> None:
    result = rule.generate(PROMPT.encode(), params=GenerationParams(max_new_tokens=2))
    assert result.prompt_ids == [3, 5, 9]


@pytest.mark.parametrize("kw", [
    {"max_new_tokens": -1}, {"max_new_tokens": 0}, {"max_new_tokens": 2.5},
    {"max_new_tokens": True}, {"temperature": math.nan}, {"temperature": -0.1},
    {"temperature": math.inf}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_p": math.nan},
    {"top_k": -3}, {"repetition_penalty": 0.0}, {"seed": -1}, {"stop": ("",)},
    {"stop": (3,)},
])
def test_absurd_parameters_are_rejected(kw: dict) -> None:
    name = next(iter(kw))
    with pytest.raises(InvalidRequestError, match=name):
        GenerationParams(**kw)


def test_chat_messages_use_the_template(rule_dir: Path, tmp_path: Path) -> None:
    plain = load_model(rule_dir)
    msgs = [{"role": "system", "content": "t1"}, {"role": "user", "content": "t2 t3"}]
    assert plain.encode_prompt(messages=msgs) == [1, 2, 3]  # no template: contents joined
    d = tmp_path / "chat"
    shutil.copytree(rule_dir, d)
    template = ("{{ bos_token }} {% for m in messages %}{% if m.role == 'user' %}t7 {% endif %}"
                "{{ m.content }} {% endfor %}{% if add_generation_prompt %}t8{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "t0", "eos_token": "t31"}))
    chat = load_model(d)
    assert chat.encode_prompt(messages=msgs) == [0, 1, 7, 2, 3, 8]
    result = chat.generate(messages=msgs, params=GenerationParams(max_new_tokens=4))
    assert result.prompt_tokens == 6
    for bad in ([], "hi", [{"role": "user"}], [{"role": 3, "content": "x"}], [["user", "x"]]):
        with pytest.raises(InvalidRequestError, match="messages"):
            chat.encode_prompt(messages=bad)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        chat.generate("t1", messages=msgs)


def test_missing_provider_falls_back_loudly_or_fails(rule_dir: Path) -> None:
    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.warns(ProviderFallbackWarning, match="CUDAExecutionProvider"):
        model = load_model(rule_dir, asked)
    assert model.provider == "CPUExecutionProvider"
    assert model.generate(PROMPT, params=GenerationParams(max_new_tokens=2)).provider \
        == "CPUExecutionProvider"
    with pytest.raises(ProviderError, match="not in this onnxruntime build"):
        load_model(rule_dir, asked, allow_fallback=False)


def test_silent_onnxruntime_fallback_is_caught(rule_dir: Path, monkeypatch) -> None:
    """onnxruntime-gpu lists CUDA but quietly runs on CPU when the CUDA libraries are missing."""
    real = zoo_model.ort.get_available_providers()
    monkeypatch.setattr(zoo_model.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", *real])
    monkeypatch.setattr(zoo_model.ort, "preload_dlls", lambda: None, raising=False)
    asked = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="asked for CUDAExecutionProvider but onnxruntime"):
        load_model(rule_dir, asked, allow_fallback=False)
    with pytest.warns(ProviderFallbackWarning, match="asked for CUDAExecutionProvider"):
        assert load_model(rule_dir, asked).provider == "CPUExecutionProvider"


@pytest.mark.parametrize("which", ["rule", "llama"])
def test_iobinding_path_gives_the_same_ids(which: str, rule, llama, monkeypatch) -> None:
    """The CUDA path (IOBinding, cache kept as OrtValues) run here with device "cpu"."""
    import edged.zoo.generate as gen

    model = rule if which == "rule" else llama
    params = GenerationParams(max_new_tokens=30)
    plain = model.generate("t3 t5 t9", params=params).token_ids
    used: list[str] = []
    real = gen.BoundRunner

    def spy(*args, **kw):
        used.append(args[-1])
        return real(*args, **kw)

    monkeypatch.setattr(gen, "GPU_PROVIDERS", {"CPUExecutionProvider": "cpu"})
    monkeypatch.setattr(gen, "BoundRunner", spy)
    bound = model.generate("t3 t5 t9", params=params).token_ids
    assert used == ["cpu"] and bound == plain


@pytest.mark.parametrize("bound", [False, True])
def test_chunked_prefill_gives_the_same_ids(bound: bool, rule, llama, monkeypatch) -> None:
    import edged.zoo.generate as gen

    prompt = "t3 t5 t9 t1 t2 t8 t4 t4 t7 t30 t2"
    params = GenerationParams(max_new_tokens=20)
    whole = {m.name: m.generate(prompt, params=params).token_ids for m in (rule, llama)}
    assert whole["rule"] == expected([3, 5, 9, 1, 2, 8, 4, 4, 7, 30, 2], 20)
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 3)
    if bound:
        monkeypatch.setattr(gen, "GPU_PROVIDERS", {"CPUExecutionProvider": "cpu"})
    for m in (rule, llama):
        result = m.generate(prompt, params=params)
        assert result.prompt_tokens > 3 and result.token_ids == whole[m.name]


def test_cancel_is_checked_between_prefill_chunks(rule, monkeypatch) -> None:
    import threading

    import edged.zoo.generate as gen

    monkeypatch.setattr(gen, "PREFILL_CHUNK", 2)
    cancel = threading.Event()
    real = gen.NumpyRunner._run
    runs = []

    def run(self, n):
        runs.append(n)
        cancel.set()  # set while the first chunk runs
        return real(self, n)

    monkeypatch.setattr(gen.NumpyRunner, "_run", run)
    result = rule.generate("t3 t5 t9 t1 t2 t8", params=GenerationParams(max_new_tokens=5),
                           cancel=cancel)
    assert result.finish_reason == "cancelled" and result.token_ids == [] and runs == [2]
