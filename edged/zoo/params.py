"""Generation parameters (validated on construction) and the result of one generation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from edged.zoo.errors import InvalidRequestError

FinishReason = Literal["eos", "length", "stop", "cancelled"]


@dataclass(frozen=True)
class GenerationParams:
    """How to generate. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable.

    `logprobs` asks for `GenerationResult.token_logprobs` (and so `min_token_prob`): a float32
    log-softmax over the whole vocabulary per token (~70 us a token on SmolLM2's 49k vocab as a
    decode step leaves the caches, ~1 % of an int4 step). Off by default because nothing on the
    daemon's path reads it (the router, the protocol and the HTTP API carry no log-probabilities;
    OpenAI `logprobs` is refused); a confidence cascade (`tools/cascade_demo.py`) turns it on.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be an integer >= 1")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables)")
        if not _is_finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a number in (0, 1]")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a finite number > 0")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise bad("seed", "must be an integer >= 0 or None")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "must be a sequence of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GenerationResult:
    """What one generation produced; `text` and `token_ids` hold the completion only."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    ttft_ms: float
    total_ms: float
    tokens_per_s: float
    provider: str
    model: str = ""
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    #: log-probability the model gave each generated token (its own confidence, before
    #: sampling settings): a cascade can serve a cheap model's answer when it is sure of it.
    #: Filled only when `GenerationParams.logprobs` is set; empty otherwise
    token_logprobs: list[float] = field(default_factory=list, repr=False)

    @property
    def min_token_prob(self) -> float:
        """The probability of the least certain generated token (1.0 when none, or when the
        generation did not ask for `logprobs`)."""
        return math.exp(min(self.token_logprobs)) if self.token_logprobs else 1.0

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able dict (what `edged generate --json` prints)."""
        return {
            "model": self.model,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "ttft_ms": round(self.ttft_ms, 3),
            "total_ms": round(self.total_ms, 3),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "provider": self.provider,
        }
