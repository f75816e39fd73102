"""Incremental detokenisation and stop strings for streaming.

Decoding one token at a time is wrong for byte-level BPE and SentencePiece byte-fallback tokens
(one character may span several tokens) and for tokenizers whose decoders strip or join across
token boundaries. `Detokenizer` decodes a short sliding window of ids twice (with and without the
newest tokens) and releases only the new text, holding it back while it ends in U+FFFD (an
unfinished UTF-8 sequence). The window starts inside the prompt, so a completion's leading space
survives. `StopFilter` then holds back any tail that could still grow into a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_WINDOW = 6  # ids of context kept before the unread ones; enough for decoder rules such as Strip
_REPLACEMENT = "\ufffd"


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never half a character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_WINDOW:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith(_REPLACEMENT) and not final):
            return ""
        delta = after[len(before) :]
        # slide the window: keep a few ids of context, drop the rest
        self.read = len(self.ids)
        self.prefix = max(0, self.read - _WINDOW)
        if self.prefix > 0:
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
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
