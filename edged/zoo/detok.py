"""Incremental detokenisation and stop strings for streaming.

Decoding one token at a time is wrong for byte-level BPE and SentencePiece byte-fallback tokens
(one character may span several tokens) and for tokenizers whose decoders strip or join across
token boundaries. `Detokenizer` decodes a short sliding window of ids twice (with and without the
newest tokens) and releases only the new text, holding it back while it ends in U+FFFD (an
unfinished UTF-8 sequence). The window starts inside the prompt, so a completion's leading space
survives. `StopFilter` then holds back any tail that could still grow into a stop string.

Fast path: for decoders that turn each token into bytes on its own and then just concatenate them
(byte-level BPE such as GPT-2/SmolLM2, and `Fuse`), `byte_table` maps every id to its bytes once
per model, and `Detokenizer` then appends the new token's bytes and releases their UTF-8 text:
no decode call per token (two `tokenizer.decode` calls were ~75 us a token on SmolLM2). The text
is the same as the window decode's: the table is built only for decoder chains whose output is
the lossy UTF-8 of the concatenated per-token bytes, each entry is checked against a one-token
decode, and any token the table cannot express (`<0xNN>` byte-fallback pieces, text outside the
byte-level alphabet, which would flip the whole ByteLevel decode to raw UTF-8) sends the
detokeniser back to the window decode while that token is in its window. SentencePiece-style
decoders (Metaspace, Strip, ByteFallback on real pieces) always use the window decode.
"""

from __future__ import annotations

import json
import re
from array import array

from tokenizers import Tokenizer

_WINDOW = 6  # ids of context kept before the unread ones; enough for decoder rules such as Strip
_REPLACEMENT = "\ufffd"


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte <-> printable character map (what the ByteLevel decoder inverts)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kind(spec: dict | None) -> str | None:
    """'byte_level' / 'fuse' where decode(ids) is the lossy UTF-8 of per-token bytes, else None.

    Accepted chains: ByteLevel alone; Fuse alone; and the chain Hugging Face writes for some
    byte-level BPE models (SmolLM2): ByteFallback, Fuse, Replace(U+2581 -> ' '), ByteLevel. In
    that chain ByteFallback only touches `<0xNN>` pieces, Fuse joins everything into one string
    and ByteLevel maps it byte by byte unless any character lies outside its alphabet (then the
    whole string goes out as raw UTF-8), so tokens free of both are per-token bytes."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel":
        return "byte_level"
    if kind == "Fuse":
        return "fuse"
    if kind == "Sequence":
        steps = spec.get("decoders") or []
        names = [d.get("type") for d in steps]
        if names == ["ByteLevel"]:
            return "byte_level"
        if names == ["Fuse"]:
            return "fuse"
        if names == ["ByteFallback", "Fuse", "Replace", "ByteLevel"]:
            rep = steps[2]
            if rep.get("pattern") == {"String": "\u2581"} and rep.get("content") == " ":
                return "byte_level"
    return None


class ByteTable:
    """Per id, the bytes its token adds to a decode (b'' for skipped special tokens), packed in
    one buffer (~0.7 MB for 49k ids rather than ~2.3 MB of bytes objects); `bad` holds the ids
    the table cannot express."""

    def __init__(self, entries: list[bytes | None]) -> None:
        self.blob = b"".join(e or b"" for e in entries)
        self.offsets = array("L", [0])
        for e in entries:
            self.offsets.append(self.offsets[-1] + len(e or b""))
        self.bad = frozenset(i for i, e in enumerate(entries) if e is None)
        self.size = len(entries)

    def get(self, token_id: int) -> bytes | None:
        if token_id in self.bad or not 0 <= token_id < self.size:
            return None
        return self.blob[self.offsets[token_id] : self.offsets[token_id + 1]]


def byte_table(tokenizer: Tokenizer) -> ByteTable | None:
    """The fast path's table for this tokenizer (None for a token the table cannot express), or
    None when the decoder is not one the fast path covers. Built once per model (~0.2 s for a
    49k vocabulary)."""
    decoder = tokenizer.decoder
    if decoder is None:
        return None
    try:  # the decoder's own JSON (the whole tokenizer's would parse every merge)
        kind = _decoder_kind(json.loads(decoder.__getstate__()))
    except Exception:  # tokenizers raises plain Exception
        return None
    if kind is None:
        return None
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    chars = _byte_level_chars()
    table: list[bytes | None] = []
    for i in range(n):
        token = tokenizer.id_to_token(i)
        if i in special:
            table.append(b"")
        elif token is None:
            table.append(None)
        elif kind == "fuse":
            table.append(token.encode())
        elif _BYTE_FALLBACK.fullmatch(token) or any(c not in chars for c in token):
            table.append(None)
        else:
            table.append(bytes(chars[c] for c in token))
    # every entry must decode, alone, to what the tokenizer says; else no fast path at all
    for start in range(0, n, 4096):  # in slices: bounded peak memory
        ids = range(start, min(n, start + 4096))
        singles = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=True)
        for i, text in zip(ids, singles, strict=True):
            entry = table[i]
            if entry is not None and entry.decode("utf-8", "replace") != text:
                return None
    return ByteTable(table)


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never half a character.

    With `table` (from `byte_table`) each token appends its bytes and the text they complete is
    released without calling the tokenizer; the id window of the decode path is kept in step, so
    a token outside the table (or a prompt ending inside a character) falls back to it exactly."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 table: ByteTable | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_WINDOW:])
        self.read = len(self.ids)
        self.table = table
        self.pending = bytearray()  # bytes of ids[read:] on the fast path
        self.slow = table is None or not self._clean_boundary()

    def _clean_boundary(self) -> bool:
        """The window holds only table tokens and its text ends on a whole character, so the
        next delta is exactly the new tokens' bytes decoded."""
        table = self.table
        if table is None:
            return False
        parts = [table.get(i) for i in self.ids]
        if any(p is None for p in parts):
            return False
        text = b"".join(parts).decode("utf-8", "replace")  # type: ignore[arg-type]
        return not text.endswith(_REPLACEMENT)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(token_id)
        if self.slow:
            return self._release(final=False)
        entry = self.table.get(token_id)  # type: ignore[union-attr]
        if entry is None:
            self.slow = True
            self.pending.clear()
            return self._release(final=False)
        self.pending += entry
        return self._release_bytes(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD)."""
        if self.slow:
            return self._release(final=True)
        return self._release_bytes(final=True)

    def _release_bytes(self, *, final: bool) -> str:
        if not self.pending:
            return ""
        delta = self.pending.decode("utf-8", "replace")
        if delta.endswith(_REPLACEMENT) and not final:
            return ""
        self.pending.clear()
        self._slide()
        return delta

    def _slide(self) -> None:
        """Keep a few ids of context after a release, drop the rest."""
        self.read = len(self.ids)
        if self.read > _WINDOW:
            del self.ids[: self.read - _WINDOW]
            self.read = _WINDOW

    def _release(self, *, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[: self.read], skip_special_tokens=True)
        after = decode(self.ids, skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        delta = after[len(before) :]
        self._slide()
        if self.table is not None and not final:
            # back to the fast path once the window is table-only and ends on a character
            self.slow = not self._clean_boundary()
        return delta


class StopFilter:
    """Cuts the text at the first stop string; holds back tails that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add decoded text; return what is safe to emit now."""
        if not delta or self.stopped:
            return ""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        if not self.stops:
            return self._emit(len(self.text))
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(cut)
        return self._emit(len(self.text) - self._held_tail())

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_tail(self) -> int:
        text = self.text
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
