"""Graph handling on small hand-built ONNX decoders (onnx.helper), run by onnxruntime.

The graphs compute a known rule from what they are fed, so a wrong KV-cache feed, attention mask
or use_cache_branch shows up in the generated ids:
    next = (3 * total_length + last_token + 5 * (mask_len - total) + 7 * (branch - has_past)
            + 11 * sum(token_type_ids)) mod V
They also vary what a real export varies: int32 input_ids, fp16 cache, missing position_ids.
Broken directories (missing files, corrupt ONNX, wrong inputs, tokenizer mismatch) must give a
ModelLoadError that names the problem.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edged.zoo import GenerationParams, ModelLoadError, load_model

V = 32


def _graph(path: Path, *, mask: bool, branch: bool, token_types: bool, vocab: int = V,
           drop_present: bool = False, extra_input: bool = False, with_past: bool = True) -> None:
    from onnx import TensorProto, helper, save

    h, T = helper, TensorProto
    inputs = [h.make_tensor_value_info("input_ids", T.INT32, ["batch", "seq"])]
    nodes = [
        h.make_node("Constant", [], ["axes13"], value=h.make_tensor("a", T.INT64, [2], [1, 3])),
        h.make_node("Constant", [], ["i2"], value=h.make_tensor("i", T.INT64, [], [2])),
        h.make_node("Constant", [], ["i1"], value=h.make_tensor("j", T.INT64, [], [1])),
        h.make_node("Constant", [], ["im1"], value=h.make_tensor("k", T.INT64, [], [-1])),
        h.make_node("Constant", [], ["vocab"], value=h.make_tensor("v", T.INT64, [], [vocab])),
        h.make_node("Constant", [], ["zero"], value=h.make_tensor("z", T.INT64, [], [0])),
        h.make_node("Constant", [], ["c3"], value=h.make_tensor("c", T.INT64, [], [3])),
        h.make_node("Cast", ["input_ids"], ["ids_h"], to=T.FLOAT16),
        h.make_node("Cast", ["input_ids"], ["ids_l"], to=T.INT64),
        h.make_node("Unsqueeze", ["ids_h", "axes13"], ["x1"]),
        h.make_node("Concat", ["x1", "x1"], ["x2"], axis=3),
    ]
    outputs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab])]
    if with_past:
        for kind in ("key", "value"):
            inputs.append(h.make_tensor_value_info(f"past_key_values.0.{kind}", T.FLOAT16,
                                                   ["batch", 1, "past", 2]))
            nodes.append(h.make_node("Concat", [f"past_key_values.0.{kind}", "x2"],
                                     [f"present.0.{kind}"], axis=2))
            if not (drop_present and kind == "value"):
                outputs.append(h.make_tensor_value_info(f"present.0.{kind}", T.FLOAT16,
                                                        ["batch", 1, "total", 2]))
        nodes += [h.make_node("Shape", ["present.0.key"], ["pshape"]),
                  h.make_node("Shape", ["past_key_values.0.key"], ["qshape"]),
                  h.make_node("Gather", ["qshape", "i2"], ["past_len"])]
    else:
        nodes += [h.make_node("Shape", ["x2"], ["pshape"]),
                  h.make_node("Identity", ["zero"], ["past_len"])]
    nodes += [
        h.make_node("Gather", ["pshape", "i2"], ["total"]),
        h.make_node("Gather", ["ids_l", "im1"], ["last"], axis=1),
        h.make_node("Mul", ["total", "c3"], ["t3"]),
        h.make_node("Add", ["t3", "last"], ["acc0"]),
    ]
    acc = "acc0"

    def add_term(value: str, factor: int, tag: str) -> None:
        nonlocal acc
        nodes.extend([
            h.make_node("Constant", [], [f"f{tag}"],
                        value=h.make_tensor(f"f{tag}", T.INT64, [], [factor])),
            h.make_node("Mul", [value, f"f{tag}"], [f"m{tag}"]),
            h.make_node("Add", [acc, f"m{tag}"], [f"acc{tag}"]),
        ])
        acc = f"acc{tag}"

    if mask:
        inputs.append(h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "total"]))
        nodes += [h.make_node("Shape", ["attention_mask"], ["mshape"]),
                  h.make_node("Gather", ["mshape", "i1"], ["mlen"]),
                  h.make_node("Sub", ["mlen", "total"], ["mdiff"])]
        add_term("mdiff", 5, "m")
    if branch:
        inputs.append(h.make_tensor_value_info("use_cache_branch", T.BOOL, [1]))
        nodes += [h.make_node("Cast", ["use_cache_branch"], ["ub"], to=T.INT64),
                  h.make_node("Greater", ["past_len", "zero"], ["hp"]),
                  h.make_node("Cast", ["hp"], ["hpl"], to=T.INT64),
                  h.make_node("Sub", ["ub", "hpl"], ["bdiff"])]
        add_term("bdiff", 7, "b")
    if token_types:
        inputs.append(h.make_tensor_value_info("token_type_ids", T.INT64, ["batch", "seq"]))
        nodes.append(h.make_node("ReduceSum", ["token_type_ids"], ["tsum"], keepdims=0))
        add_term("tsum", 11, "t")
    if extra_input:
        inputs.append(h.make_tensor_value_info("pixel_values", T.FLOAT, ["batch", 3]))
        nodes.append(h.make_node("ReduceSum", ["pixel_values"], ["unused"], keepdims=0))
    nodes += [
        h.make_node("Mod", [acc, "vocab"], ["next"]),
        h.make_node("Constant", [], ["depth"], value=h.make_tensor("d", T.INT64, [1], [vocab])),
        h.make_node("Constant", [], ["onoff"], value=h.make_tensor("o", T.FLOAT, [2], [0, 1])),
        h.make_node("OneHot", ["next", "depth", "onoff"], ["oh"], axis=-1),
        h.make_node("Unsqueeze", ["oh", "i1"], ["logits"]),
    ]
    if extra_input:
        outputs.append(h.make_tensor_value_info("unused", T.FLOAT, []))
    model = h.make_model(h.make_graph(nodes, "rule", inputs, outputs),
                         opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def _tokenizer(path: Path, size: int = V) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))


def make_dir(root: Path, name: str, *, config: dict | None = None, tok_size: int = V,
             **graph) -> Path:
    d = root / name
    d.mkdir()
    _graph(d / "model.onnx", mask=graph.pop("mask", False), branch=graph.pop("branch", False),
           token_types=graph.pop("token_types", False), **graph)
    _tokenizer(d / "tokenizer.json", tok_size)
    cfg = {"vocab_size": graph.get("vocab", V), "max_position_embeddings": 64,
           "num_attention_heads": 1, "hidden_size": 2, "bos_token_id": 0}
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def expected(prompt: list[int], n: int) -> list[int]:
    out, total, last = [], len(prompt), prompt[-1]
    for _ in range(n):
        last = (3 * total + last) % V
        out.append(last)
        total += 1
    return out


VARIANTS = {
    "bare": {},
    "mask": {"mask": True},
    "merged": {"mask": True, "branch": True},
    "token_types": {"mask": True, "token_types": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cache_and_optional_inputs_are_fed_right(tmp_path: Path, variant: str) -> None:
    model = load_model(make_dir(tmp_path, variant, **VARIANTS[variant]))
    spec = model.spec
    assert spec.input_ids_dtype is np.int32 and spec.position_dtype is None
    assert spec.kv[0].dtype is np.float16 and spec.kv[0].shape == (1, 1, 0, 2)
    result = model.generate("t3 t5 t9", params=GenerationParams(max_new_tokens=20))
    assert result.prompt_ids == [3, 5, 9]
    assert result.token_ids == expected([3, 5, 9], 20)
    assert result.text.split() == [f"t{i}" for i in result.token_ids]


def test_several_eos_ids_from_config_and_generation_config(tmp_path: Path) -> None:
    ids = expected([3, 5, 9], 20)
    d = make_dir(tmp_path, "eos", config={"eos_token_id": ids[12]})
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[15], ids[6]]}))
    model = load_model(d)
    result = model.generate("t3 t5 t9", params=GenerationParams(max_new_tokens=20))
    assert result.finish_reason == "eos"
    assert result.token_ids == ids[:7]  # the EOS token is kept in the ids, not in the text
    assert result.text.split() == [f"t{i}" for i in ids[:6]]


@pytest.mark.parametrize(("graph", "config", "tok_size", "needle"), [
    ({"with_past": False}, {}, V, "no past_key_values"),
    ({"drop_present": True}, {}, V, "no output present.0.value"),
    ({"extra_input": True}, {}, V, "pixel_values"),
    ({}, {}, V + 8, "tokenizer has 40 ids"),
    ({"vocab": 2000}, {}, V, "more than 1024 padding"),
    ({}, {"vocab_size": 64}, V, "vocab_size 64 != graph logits 32"),
    ({}, {"max_position_embeddings": None}, V, "no context length"),
])
def test_bad_graphs_and_mismatches_are_typed(tmp_path: Path, graph: dict, config: dict,
                                            tok_size: int, needle: str) -> None:
    d = make_dir(tmp_path, "bad", config=config, tok_size=tok_size, **graph)
    with pytest.raises(ModelLoadError, match=needle) as info:
        load_model(d)
    assert info.value.model == "bad"


@pytest.mark.parametrize(("breakage", "needle"), [
    ("no_dir", "does not exist"),
    ("no_onnx", "no ONNX decoder"),
    ("no_tokenizer", "missing file tokenizer.json"),
    ("no_config", "missing file config.json"),
    ("corrupt_onnx", "does not load in onnxruntime"),
    ("truncated_onnx", "does not load in onnxruntime"),
    ("corrupt_tokenizer", "does not load as a tokenizer"),
    ("corrupt_config", "config.json is not valid JSON"),
])
def test_missing_or_corrupt_files_are_typed(tmp_path: Path, breakage: str, needle: str) -> None:
    d = make_dir(tmp_path, "m")
    if breakage == "no_dir":
        d = tmp_path / "absent"
    elif breakage == "no_onnx":
        (d / "model.onnx").unlink()
    elif breakage == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    elif breakage == "no_config":
        (d / "config.json").unlink()
    elif breakage == "corrupt_onnx":
        (d / "model.onnx").write_bytes(b"\x00garbage" * 100)
    elif breakage == "truncated_onnx":
        data = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(data[: len(data) // 2])
    elif breakage == "corrupt_tokenizer":
        (d / "tokenizer.json").write_text('{"model": 42}')
    elif breakage == "corrupt_config":
        (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=needle):
        load_model(d)
