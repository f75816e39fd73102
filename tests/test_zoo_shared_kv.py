"""SharedRunner on a hand-built GroupQueryAttention decoder (the layout onnxruntime-genai's model
builder writes: packed QKV, rotary inside the op, seqlens_k / total_sequence_length computed from
attention_mask, past and present one buffer). Built with onnx.helper, so CI needs no builder.

The shared-buffer loop must give the ids of the plain loop (past fed, present returned, growing),
chunked prefill included; a model directory with `genai_config.json` says which one edged uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edged.zoo import GenerationParams, load_model

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD, LAYERS, CONTEXT = 48, 32, 4, 2, 16, 2, 64


def build(out: Path, *, share_buffer: bool) -> Path:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper, save

    rng = np.random.default_rng(0)

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    inits: list = []
    nodes = []
    inputs = [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"])]
    outputs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", VOCAB])]
    init("embed", rng.normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32))
    init("one", np.array([1], np.int64))
    init("axis1", np.array([1], np.int64))
    inv = 1.0 / (10000 ** (np.arange(0, HEAD, 2) / HEAD))
    freqs = np.outer(np.arange(CONTEXT), inv)
    init("cos_cache", np.cos(freqs).astype(np.float32))
    init("sin_cache", np.sin(freqs).astype(np.float32))
    nodes += [
        h.make_node("Gather", ["embed", "input_ids"], ["x0"]),
        h.make_node("ReduceSum", ["attention_mask", "axis1"], ["msum"], keepdims=0),
        h.make_node("Sub", ["msum", "one"], ["msum1"]),
        h.make_node("Cast", ["msum1"], ["seqlens_k"], to=T.INT32),
        h.make_node("Shape", ["attention_mask"], ["mshape"]),
        h.make_node("Gather", ["mshape", "one"], ["total64"], axis=0),
        h.make_node("Squeeze", ["total64"], ["total64s"]),
        h.make_node("Cast", ["total64s"], ["total_len"], to=T.INT32),
    ]
    x = "x0"
    qkv = HEADS * HEAD + 2 * KV_HEADS * HEAD
    for i in range(LAYERS):
        w = init(f"wqkv{i}", rng.normal(0, 0.4, (HIDDEN, qkv)).astype(np.float32))
        wo = init(f"wo{i}", rng.normal(0, 0.4, (HEADS * HEAD, HIDDEN)).astype(np.float32))
        for kind in ("key", "value"):
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kind}", T.FLOAT,
                                                   ["batch", KV_HEADS, "past", HEAD]))
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kind}", T.FLOAT,
                                                    ["batch", KV_HEADS, "total", HEAD]))
        nodes += [
            h.make_node("MatMul", [x, w], [f"qkv{i}"]),
            h.make_node("GroupQueryAttention",
                        [f"qkv{i}", "", "", f"past_key_values.{i}.key",
                         f"past_key_values.{i}.value", "seqlens_k", "total_len", "cos_cache",
                         "sin_cache"],
                        [f"attn{i}", f"present.{i}.key", f"present.{i}.value"],
                        domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS,
                        do_rotary=1),
            h.make_node("MatMul", [f"attn{i}", wo], [f"o{i}"]),
            h.make_node("Add", [x, f"o{i}"], [f"x{i + 1}"]),
        ]
        x = f"x{i + 1}"
    init("lm_head", rng.normal(0, 1, (HIDDEN, VOCAB)).astype(np.float32))
    nodes.append(h.make_node("MatMul", [x, "lm_head"], ["logits"]))
    graph = h.make_graph(nodes, "gqa", inputs, outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17),
                                               h.make_opsetid("com.microsoft", 1)])
    out.mkdir(parents=True)
    save(model, str(out / "model.onnx"))
    _tokenizer(out)
    (out / "genai_config.json").write_text(json.dumps({
        "model": {"bos_token_id": 0, "eos_token_id": 1, "context_length": CONTEXT,
                  "vocab_size": VOCAB, "decoder": {"num_attention_heads": HEADS,
                                                   "num_key_value_heads": KV_HEADS,
                                                   "head_size": HEAD, "hidden_size": HIDDEN}},
        "search": {"past_present_share_buffer": share_buffer}}))
    return out


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("onnx")
    base = tmp_path_factory.mktemp("gqa")
    return (load_model(build(base / "shared", share_buffer=True)),
            load_model(build(base / "plain", share_buffer=False)))


PROMPT = "t5 t9 t13 t2 t40 t7 t11"


def test_genai_config_turns_the_shared_buffer_on(models) -> None:
    shared, plain = models
    assert shared.spec.shared_kv and not plain.spec.shared_kv
    assert shared.context == CONTEXT and shared.spec.vocab_size == VOCAB
    assert {s.shape for s in shared.spec.kv} == {(1, KV_HEADS, 0, HEAD)}


def test_shared_buffer_gives_the_ids_of_the_plain_loop(models, monkeypatch) -> None:
    import edged.zoo.generate as gen

    shared, plain = models
    params = GenerationParams(max_new_tokens=24)
    expected = plain.generate(PROMPT, params=params).token_ids
    assert len(set(expected)) > 3  # not a degenerate model
    assert shared.generate(PROMPT, params=params).token_ids == expected
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 3)
    assert shared.generate(PROMPT, params=params).token_ids == expected
    assert plain.generate(PROMPT, params=params).token_ids == expected


def test_shared_runner_allocates_the_cache_once(models) -> None:
    import edged.zoo.generate as gen

    shared, _ = models
    runner = gen.make_runner(shared, shared.session, 20)
    assert isinstance(runner, gen.SharedRunner)
    cache = [v.data_ptr() for v in runner.cache]
    logits = runner.prefill(shared.encode_prompt(PROMPT))
    for _ in range(5):
        logits = runner.step(int(np.argmax(logits)))
    assert [v.data_ptr() for v in runner.cache] == cache
    assert runner.cache[0].shape() == [1, KV_HEADS, 20, HEAD]
    assert runner.length == len(shared.encode_prompt(PROMPT)) + 5


def test_last_token_logits_graph_gives_the_same_ids(models, tmp_path: Path) -> None:
    """export_zoo's default: the lm_head sees the last position only; same ids, (1, 1, V)."""
    from edged.zoo.quantize import last_token_logits

    shared, _ = models
    out = tmp_path / "last"
    import shutil

    shutil.copytree(shared.directory, out)
    assert last_token_logits(out / "model.onnx", out / "model.onnx")
    last = load_model(out)
    assert last.spec.logits_last_only and not shared.spec.logits_last_only
    params = GenerationParams(max_new_tokens=24)
    assert last.generate(PROMPT, params=params).token_ids == \
        shared.generate(PROMPT, params=params).token_ids
