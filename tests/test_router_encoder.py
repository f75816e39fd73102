"""Sentence encoder (edged.router.encoder), its export tool and the replay embedding cache.

Fast tests use a hand-built ONNX graph (token embeddings = a lookup table) whose mean-pooled
output numpy computes exactly; slow tests build a tiny random BertModel, export it with
tools/export_encoder.py and compare with sentence-transformers' computation done in torch.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

from edged.replay.embeddings import cache_path, default_cache_dir, embed_texts, texts_digest
from edged.router.encoder import EncoderError, SentenceEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "what", "is", "which", "how", "do", "i", "of", "to", "and", "in", "capital",
    "city", "france", "paris", "bread", "bake", "energy", "light", "plant", "fox", "dog", "quick",
    "brown", "lazy", "jumps", "over", "why", "when",
]
TEXTS = [
    "What is the capital of France?",
    "which city",
    "",
    "how do I bake bread",
    "the quick brown fox jumps over the lazy dog " * 6,  # longer than max_length: truncated
    "Unknown wörds café 🙂",
]
DIM = 8


def at(path: Path, message: str) -> str:
    """pytest.raises pattern: the path, literally, then `message` (a regex)."""
    return re.escape(f"{path}: ") + message


# -- a lookup-table "model": fast, and its mean pooling is exact in numpy --------------------
def _word_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(length=64)  # like all-MiniLM's file: the encoder must ignore it
    tok.save(str(path))
    return path


def _lookup_model(path: Path, table: np.ndarray, *, inputs: Sequence[str] = (
        "input_ids", "attention_mask", "token_type_ids"), rank: int = 3) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["b", "s"])
                    for name in inputs]
    nodes = [helper.make_node("Gather", ["table", inputs[0]], ["tokens"])]
    if rank == 3:
        nodes.append(helper.make_node("Identity", ["tokens"], ["last_hidden_state"]))
        shape: list = ["b", "s", table.shape[1]]
    else:
        nodes.append(helper.make_node("ReduceMean", ["tokens"], ["last_hidden_state"], axes=[1],
                                      keepdims=0))  # opset 17: axes is an attribute
        shape = ["b", table.shape[1]]
    graph = helper.make_graph(
        nodes, "lookup", graph_inputs,
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _encoder_json(path: Path, **fields) -> Path:
    info = {"pooling": "mean", "normalize": True, "max_length": 12, "dim": DIM,
            "source": "test-lookup", **fields}
    path.write_text(json.dumps(info), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(len(SPECIALS) + len(WORDS), DIM)) \
        .astype(np.float32)


@pytest.fixture()
def lookup_dir(tmp_path: Path, table: np.ndarray) -> Path:
    d = tmp_path / "enc"
    d.mkdir()
    _lookup_model(d / "model.onnx", table)
    _word_tokenizer(d / "tokenizer.json")
    _encoder_json(d / "encoder.json")
    return d


def _numpy_reference(directory: Path, table: np.ndarray, texts: Sequence[str],
                     max_length: int) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    rows = [table[tok.encode(t).ids].mean(axis=0) for t in texts]
    return np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)


def test_mean_pooling_truncation_and_batching(lookup_dir: Path, table: np.ndarray) -> None:
    enc = SentenceEncoder(lookup_dir)
    assert (enc.dim, enc.max_length, enc.source) == (DIM, 12, "test-lookup")
    got = enc.encode(TEXTS)
    assert got.shape == (len(TEXTS), DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, _numpy_reference(lookup_dir, table, TEXTS, 12), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # a text's embedding does not depend on its batch mates (pad tokens are masked out)
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=1), got, atol=1e-6)
    np.testing.assert_allclose(enc.encode([TEXTS[3]])[0], got[3], atol=1e-6)
    assert enc.encode([]).shape == (0, DIM)


def test_without_normalize_and_without_token_type_ids(tmp_path: Path, table: np.ndarray) -> None:
    d = tmp_path / "enc"
    d.mkdir()
    _lookup_model(d / "model.onnx", table, inputs=("input_ids", "attention_mask"))
    _word_tokenizer(d / "tokenizer.json")
    _encoder_json(d / "encoder.json", normalize=False, max_length=40)
    got = SentenceEncoder(d, threads=0).encode(["the dog", "paris"])
    ids = [[2, 5 + WORDS.index("the"), 5 + WORDS.index("dog"), 3], [2, 5 + WORDS.index("paris"), 3]]
    np.testing.assert_allclose(got, [table[i].mean(axis=0) for i in ids], atol=1e-6)


def test_fingerprint_tracks_every_file(lookup_dir: Path) -> None:
    first = SentenceEncoder(lookup_dir).fingerprint
    assert len(first) == 64 and first == SentenceEncoder(lookup_dir).fingerprint
    _encoder_json(lookup_dir / "encoder.json", max_length=11)
    assert SentenceEncoder(lookup_dir).fingerprint != first


def test_encode_refuses_non_texts(lookup_dir: Path) -> None:
    enc = SentenceEncoder(lookup_dir)
    with pytest.raises(EncoderError, match="not one str"):
        enc.encode("a text")
    with pytest.raises(EncoderError, match=r"texts\[1\] is int"):
        enc.encode(["a", 3])  # type: ignore[list-item]


# -- a broken encoder directory is an EncoderError naming the path --------------------------
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=at(tmp_path / "nope", "encoder directory does not")):
        SentenceEncoder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EncoderError, match="not a directory"):
        SentenceEncoder(tmp_path / "file")


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "encoder.json"])
def test_missing_file(lookup_dir: Path, name: str) -> None:
    (lookup_dir / name).unlink()
    with pytest.raises(EncoderError, match=at(lookup_dir, f"missing {name}")):
        SentenceEncoder(lookup_dir)


def test_garbage_model(lookup_dir: Path) -> None:
    (lookup_dir / "model.onnx").write_bytes(b"this is not protobuf\x00\xff" * 10)
    with pytest.raises(EncoderError, match=at(lookup_dir / "model.onnx", "not a loadable ONNX")):
        SentenceEncoder(lookup_dir)


def test_garbage_tokenizer(lookup_dir: Path) -> None:
    (lookup_dir / "tokenizer.json").write_text("{]")
    with pytest.raises(EncoderError, match=at(lookup_dir / "tokenizer.json", "not a loadable")):
        SentenceEncoder(lookup_dir)


def test_wrong_model_inputs_and_outputs(lookup_dir: Path, table: np.ndarray) -> None:
    model = lookup_dir / "model.onnx"
    _lookup_model(model, table, inputs=("input_ids", "pixel_values"))
    with pytest.raises(EncoderError, match=at(model, "model inputs are .*pixel_values")):
        SentenceEncoder(lookup_dir)
    _lookup_model(model, table, rank=2)
    with pytest.raises(EncoderError, match=at(model, "first output .* expected token embeddings")):
        SentenceEncoder(lookup_dir)
    _lookup_model(model, table[:, :4])
    with pytest.raises(EncoderError, match=r"output dim 4 differs from .*encoder\.json dim 8"):
        SentenceEncoder(lookup_dir)


@pytest.mark.parametrize(("text", "message"), [
    ("not json", "not readable JSON"),
    ("[1]", "expected a JSON object"),
    ('{"pooling": "cls", "normalize": true, "max_length": 8, "dim": 8}', "pooling must be"),
    ('{"pooling": "mean", "normalize": 1, "max_length": 8, "dim": 8}', "normalize must be"),
    ('{"pooling": "mean", "normalize": true, "max_length": 8}', "dim must be a positive"),
    ('{"pooling": "mean", "normalize": true, "max_length": 0, "dim": 8}', "max_length must"),
])
def test_bad_encoder_json(lookup_dir: Path, text: str, message: str) -> None:
    (lookup_dir / "encoder.json").write_text(text)
    with pytest.raises(EncoderError, match=at(lookup_dir / "encoder.json", message)):
        SentenceEncoder(lookup_dir)


def test_bad_threads(lookup_dir: Path) -> None:
    with pytest.raises(EncoderError, match="threads must be"):
        SentenceEncoder(lookup_dir, threads=-1)


# -- embedding cache -------------------------------------------------------------------------
class CountingEncoder:
    """Deterministic fake: embedding = hash-seeded vector; counts the texts it encoded."""

    def __init__(self, fingerprint: str = "f" * 64, dim: int = 4) -> None:
        self.fingerprint, self.dim, self.encoded = fingerprint, dim, 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.encoded += len(texts)
        return np.stack([np.random.default_rng(len(t) * 7919 + sum(map(ord, t)))
                         .normal(size=self.dim) for t in texts]).astype(np.float32)


def test_cache_round_trip(tmp_path: Path) -> None:
    enc, texts = CountingEncoder(), ["a", "bb", "a", "ccc"]
    seen: list[tuple[int, int]] = []
    first = embed_texts(enc, texts, cache_dir=tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert first.shape == (4, 4) and first.dtype == np.float32
    assert enc.encoded == 3 and seen[-1] == (3, 3)  # the duplicate "a" is encoded once
    np.testing.assert_array_equal(first[0], first[2])
    path = cache_path(enc, texts, tmp_path)
    assert path.is_file() and path.name.startswith("f" * 16 + "-")
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind
    again = embed_texts(enc, texts, cache_dir=tmp_path)
    assert enc.encoded == 3
    np.testing.assert_array_equal(again, first)
    assert embed_texts(enc, [], cache_dir=tmp_path).shape == (0, 4)


def test_cache_invalidation(tmp_path: Path) -> None:
    texts = ["x", "y"]
    embed_texts(CountingEncoder(), texts, cache_dir=tmp_path)
    other = CountingEncoder(fingerprint="0" * 64)  # new weights / tokenizer / pooling
    embed_texts(other, texts, cache_dir=tmp_path)
    assert other.encoded == 2
    same = CountingEncoder()
    embed_texts(same, ["x", "y", "z"], cache_dir=tmp_path)
    embed_texts(same, ["y", "x"], cache_dir=tmp_path)  # order is part of the key
    assert same.encoded == 5
    assert len(list(tmp_path.glob("*.npy"))) == 4
    assert texts_digest(["ab"]) != texts_digest(["a", "b"])


@pytest.mark.parametrize("content", [b"garbage", None])
def test_corrupt_cache_is_recomputed(tmp_path: Path, content: bytes | None) -> None:
    enc, texts = CountingEncoder(), ["p", "q"]
    good = embed_texts(enc, texts, cache_dir=tmp_path)
    path = cache_path(enc, texts, tmp_path)
    if content is None:
        np.save(path, np.zeros((3, 4), dtype=np.float32))  # loads, but the shape is wrong
    else:
        path.write_bytes(content)
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        again = embed_texts(enc, texts, cache_dir=tmp_path)
    assert enc.encoded == 4
    np.testing.assert_array_equal(again, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embed_texts(enc, texts, cache_dir=tmp_path)  # rewritten: a clean hit
    assert enc.encoded == 4


def test_embed_traces_tool(lookup_dir: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    tool = load_tool("embed_traces")
    trace = tmp_path / "t.csv"
    trace.write_text("input_text,label_s,energy_consumption_s,inference_time_s\n"
                     "what is the capital,1,2.0,0.1\nhow do i bake bread,0,3.0,0.2\n")
    cache = tmp_path / "cache"
    assert tool.main([str(lookup_dir), str(trace), "--cache-dir", str(cache)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fingerprint"] == SentenceEncoder(lookup_dir).fingerprint
    (entry,) = report["traces"]
    assert entry["rows"] == 2 and np.load(entry["cache"]).shape == (2, DIM)
    assert Path(entry["cache"]).parent == cache
    assert tool.main([str(tmp_path / "nope"), str(trace)]) == 1


def test_replay_runs_edged_with_the_encoder_beside_edged(
        lookup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`edged replay --mix --encoder DIR`: the embeddings follow the requests through the mix
    and the shuffles, `edged+encoder` runs beside `edged`; a broken directory is exit 2."""
    from edged.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    paths = []
    for name, hard in (("easy", 0.2), ("hard", 0.8)):
        rows = ["input_text,label_s,energy_consumption_s,inference_time_s,"
                "label_l,energy_consumption_l,inference_time_l"]
        for i in range(60):
            text = " ".join(rng.choice(WORDS, 4))
            rows.append(f"{text} {i},{int(rng.random() > hard)},1.0,0.1,1,5.0,0.3")
        path = tmp_path / f"{name}.csv"
        path.write_text("\n".join(rows) + "\n")
        paths.append(str(path))
    out = tmp_path / "mix.json"
    args = ["replay", "--mix", *paths, "--alpha", "0.7", "--seeds", "2", "--json", str(out)]
    assert main([*args, "--encoder", str(lookup_dir)]) == 0
    policies = json.loads(out.read_text())["policies"]
    assert {"edged", "edged+encoder", "messplus"} <= set(policies)
    assert "edged+encoder" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "edged" / "embeddings").glob("*.npy"))) == 2
    (lookup_dir / "model.onnx").write_bytes(b"not a model")
    assert main([*args, "--encoder", str(lookup_dir)]) == 2
    assert "--encoder: " in capsys.readouterr().err


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "edged" / "embeddings"
    embed_texts(CountingEncoder(), ["t"])
    assert len(list((tmp_path / "edged" / "embeddings").glob("*.npy"))) == 1
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "edged" / "embeddings"


# -- export: a tiny random BertModel, compared with torch ------------------------------------
@pytest.fixture(scope="module")
def export_encoder():
    return load_tool("export_encoder")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random-init 2-layer BertModel + WordPiece tokenizer saved as an HF model directory."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 4 + TEXTS, trainer=trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=SPECIALS, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    out = tmp_path_factory.mktemp("hf") / "tiny-bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(out)
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                      sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]") \
        .save_pretrained(out)
    return out


def _torch_reference(hf_dir: Path, texts: Sequence[str], max_length: int) -> np.ndarray:
    """sentence-transformers' Transformer -> Pooling(mean) -> Normalize, written out in torch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModel.from_pretrained(hf_dir).eval()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


@pytest.mark.slow
def test_export_matches_torch(export_encoder, tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    info = export_encoder.export_encoder(tiny_bert, out, max_length=10, log=lambda _: None)
    assert info["dim"] == 32 and info["max_length"] == 10
    assert sorted(p.name for p in out.iterdir()) == \
        ["config.json", "encoder.json", "model.onnx", "tokenizer.json"]
    assert not list(tmp_path.glob(".enc.*"))  # the build directory is gone
    enc = SentenceEncoder(out)
    assert enc.source == "tiny-bert"
    reference = _torch_reference(tiny_bert, TEXTS, max_length=10)
    np.testing.assert_allclose(enc.encode(TEXTS), reference, atol=1e-4)
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=1), reference, atol=1e-4)
    with pytest.raises(export_encoder.ExportError, match="exists and is not an empty"):
        export_encoder.export_encoder(tiny_bert, out)


@pytest.mark.slow
def test_cli_int8_kept_or_refused(export_encoder, tiny_bert: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = export_encoder.main(["--src", str(tiny_bert), "--out", str(tmp_path / "q"),
                              "--int8", "--min-cosine", "0.5"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["kept"] == "int8" and report["variant"] == "int8"
    assert report["max_abs_diff_vs_torch"] < 1e-4 and 0.5 <= report["int8_mean_cosine"] <= 1.0
    info = json.loads((tmp_path / "q" / "encoder.json").read_text())
    assert info["variant"] == "int8"
    assert SentenceEncoder(tmp_path / "q").encode(["the dog"]).shape == (1, 32)
    refused = tmp_path / "r"
    assert export_encoder.main(["--src", str(tiny_bert), "--out", str(refused), "--int8",
                                "--min-cosine", "1.01", "--no-validate"]) == 0
    assert json.loads((refused / "encoder.json").read_text())["variant"] == "fp32"
    assert not (refused / "model.int8.onnx").exists()


def test_export_refuses_a_dir_without_tokenizer(export_encoder, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(export_encoder.ExportError, match=at(tmp_path, "no tokenizer.json")):
        export_encoder.export_encoder(tmp_path, tmp_path / "out")
    assert export_encoder.main(["--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
