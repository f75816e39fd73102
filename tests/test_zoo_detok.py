"""Incremental detokenisation and stop strings, without a model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from edged.zoo.detok import ByteTable, Detokenizer, StopFilter, byte_table

TEXTS = ["Café naïve déjà vu", "日本語のテキスト", "emoji 🙂🚀 mixed", "plain ascii, words."]


def _byte_fallback_tokenizer() -> Tokenizer:
    """SentencePiece-style: ▁-words, <0xNN> byte-fallback tokens, Llama's decoder chain."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "e", "i", "o", "u", "n", "t", "s", "▁the", "é"]:
        vocab.setdefault(piece, len(vocab))
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, c in enumerate(["<unk>", "<s>", "</s>"])],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    return Tokenizer.from_str(json.dumps(spec))


def _byte_level_tokenizer() -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["some text", "more words"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


TOKENIZERS = {"byte_fallback": _byte_fallback_tokenizer, "byte_level": _byte_level_tokenizer}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_concatenate(kind: str, text: str) -> None:
    tok = TOKENIZERS[kind]()
    prompt = tok.encode("Say:").ids
    ids = tok.encode(" " + text).ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = Detokenizer(tok, prompt)
    deltas = [detok.push(i) for i in ids]
    tail = detok.flush()
    assert "\ufffd" not in "".join(deltas)
    full = tok.decode(prompt + ids)
    assert "".join(deltas) + tail == full[len(tok.decode(prompt)):]
    assert ("".join(deltas) + tail).strip() == text


def test_unfinished_character_is_held_then_flushed_as_replacement() -> None:
    tok = _byte_fallback_tokenizer()
    first_byte = tok.token_to_id("<0xE6>")  # first byte of a 3-byte character
    detok = Detokenizer(tok, [1])
    assert detok.push(first_byte) == ""
    assert detok.flush() == "\ufffd"


def test_special_tokens_are_skipped() -> None:
    tok = _byte_fallback_tokenizer()
    detok = Detokenizer(tok, [1])
    assert detok.push(2) == ""
    assert detok.push(tok.token_to_id("▁the")) == "the"


@pytest.mark.parametrize(("chunks", "stops", "out"), [
    (["Hello", " wor", "ld\nmore"], ("\n",), "Hello world"),
    (["a", "b", "c", "STO", "P", "x"], ("STOP",), "abc"),
    (["ST", "ay"], ("STOP",), "STay"),
    (["xyz"], (), "xyz"),
    (["12", "34"], ("3", "23"), "1"),
])
def test_stop_filter(chunks: list[str], stops: tuple[str, ...], out: str) -> None:
    f = StopFilter(stops)
    got = "".join(f.feed(c) for c in chunks)
    if not f.stopped:
        got += f.flush()
    assert got == out


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc\n", max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
       stops=st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3))
def test_stop_filter_cuts_at_first_completed_stop(text: str, cuts: list[int],
                                                  stops: list) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    f = StopFilter(tuple(stops))
    emitted = ""
    for a, b in pairwise(bounds):
        emitted += f.feed(text[a:b])
        # what was emitted can never be taken back by a later stop match
        assert not any(s in emitted for s in stops)
    if not f.stopped:
        emitted += f.flush()
    # the reference: generation stops at the first chunk after which some stop string has
    # appeared, and the text is cut at the earliest stop found in what had arrived by then
    expected = text
    for end in bounds[1:]:
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            expected = text[: min(hits)]
            break
    assert emitted == expected


# -- the byte-table fast path -------------------------------------------------------------------


def _smollm2_chain_tokenizer() -> Tokenizer:
    """Byte-level BPE with the decoder chain SmolLM2's tokenizer.json has, plus a non-special
    added token outside the byte-level alphabet (the fast path must fall back around it)."""
    tok = _byte_level_tokenizer()
    spec = json.loads(tok.to_str())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens(["日本", "\u2581x"])
    tok.add_special_tokens(["<|end|>"])
    return tok


def _file_tokenizer(path: Path) -> Callable[[], Tokenizer]:
    return lambda: Tokenizer.from_file(str(path))


ROOT = Path(__file__).resolve().parents[1]
ALL = {**TOKENIZERS, "smollm2_chain": _smollm2_chain_tokenizer}
for _size in ("small", "medium", "large"):
    if (ROOT / "models/demo" / _size / "tokenizer.json").is_file():
        ALL[f"demo_{_size}"] = _file_tokenizer(ROOT / "models/demo" / _size / "tokenizer.json")
# real tokenizers when present (SmolLM2's is not in the repo: EDGED_DETOK_TOKENIZERS=a.json:b.json)
for _path in filter(None, os.environ.get("EDGED_DETOK_TOKENIZERS", "").split(":")):
    ALL[Path(_path).parent.name] = _file_tokenizer(Path(_path))
_LOADED: dict[str, tuple[Tokenizer, ByteTable | None]] = {}


def _load(kind: str) -> tuple[Tokenizer, ByteTable | None]:
    if kind not in _LOADED:
        tok = ALL[kind]()
        _LOADED[kind] = (tok, byte_table(tok))
    return _LOADED[kind]


def test_table_is_built_only_for_decoders_it_covers() -> None:
    assert byte_table(_byte_fallback_tokenizer()) is None  # Metaspace-style: Strip, ByteFallback
    for kind in ("byte_level", "smollm2_chain"):
        assert byte_table(ALL[kind]()) is not None
    tok = _smollm2_chain_tokenizer()
    table = byte_table(tok)
    assert table is not None
    assert table.get(tok.token_to_id("日本")) is None  # not byte-level: falls back
    assert table.get(tok.token_to_id("<|end|>")) == b""  # special: skipped


def _run(tok: Tokenizer, table: ByteTable | None, prompt: list[int], ids: list[int],
         stops: tuple[str, ...]) -> tuple[list[str], str, str]:
    detok, stop = Detokenizer(tok, prompt, table), StopFilter(stops)
    deltas = [detok.push(i) for i in ids]
    tail = detok.flush()
    filtered = "".join(stop.feed(d) for d in [*deltas, tail])
    if not stop.stopped:
        filtered += stop.flush()
    return deltas, tail, filtered


@pytest.mark.parametrize("kind", sorted(ALL))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fast_path_equals_window_decode(kind: str, data: st.DataObject) -> None:
    tok, table = _load(kind)
    n = tok.get_vocab_size(with_added_tokens=True)
    ids_st = st.lists(st.integers(min_value=0, max_value=n - 1), max_size=30)
    if data.draw(st.booleans(), label="natural"):  # ids of real text, multi-byte characters split
        text = data.draw(st.text(alphabet="aé 日🙂\nxt", max_size=20), label="text")
        ids = tok.encode(text, add_special_tokens=False).ids
        prompt = tok.encode("Say:", add_special_tokens=False).ids
    else:
        ids, prompt = data.draw(ids_st, label="ids"), data.draw(ids_st, label="prompt")
    stops = tuple(data.draw(st.lists(st.text(alphabet="aé 日\ufffd", min_size=1, max_size=3),
                                     max_size=2), label="stops"))
    fast = _run(tok, table, prompt, ids, stops)
    assert fast == _run(tok, None, prompt, ids, stops)  # delta by delta, tail, stop cuts
    deltas, tail, _ = fast
    assert not any(d.endswith("\ufffd") for d in deltas)  # never half a character
    if table is not None and all(table.get(i) for i in prompt + ids):
        # table-only sequences: the deltas are exactly the full decode minus the prompt's
        full = tok.decode(prompt + ids, skip_special_tokens=True)
        head = tok.decode(prompt, skip_special_tokens=True)
        if not head.endswith("\ufffd"):
            assert "".join(deltas) + tail == full[len(head):]
