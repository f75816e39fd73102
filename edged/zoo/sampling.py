"""Next-token choice from one row of logits: repetition penalty, temperature, top-k, top-p.

The order follows transformers' logits processors, so a seeded run is reproducible and greedy
matches `generate(do_sample=False)`. Work stays on a short candidate list where possible: a
full sort of a 150k vocabulary per token would cost more than a small model's forward pass.
"""

from __future__ import annotations

import numpy as np

from edged.zoo.params import GenerationParams

_TOP_P_PREFILTER = 1024  # candidates kept before an exact top-p check; widened when too few


class Sampler:
    """Picks tokens for one generation; owns the seeded generator and the seen-token set."""

    def __init__(self, params: GenerationParams, vocab_size: int, usable_vocab: int) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.usable_vocab = usable_vocab
        self._penalise = params.repetition_penalty != 1.0
        self._seen = np.zeros(vocab_size, dtype=bool)
        self._seen_ids: list[int] = []

    def observe(self, token_ids: list[int] | np.ndarray) -> None:
        """Remember tokens for the repetition penalty (prompt and generated ones)."""
        if not self._penalise:
            return
        for t in np.asarray(token_ids, dtype=np.int64).ravel().tolist():
            if 0 <= t < self._seen.size and not self._seen[t]:
                self._seen[t] = True
                self._seen_ids.append(t)

    def __call__(self, logits: np.ndarray) -> int:
        """Choose the next token from a 1-D row of logits (not modified)."""
        p = self.params
        row = logits[: self.usable_vocab]
        if self._penalise and self._seen_ids:
            row = row.astype(np.float32, copy=True)
            idx = np.fromiter(self._seen_ids, dtype=np.int64)
            vals = row[idx]
            row[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(row))
        return sample(row, p.temperature, p.top_k, p.top_p, self.rng)


def sample(row: np.ndarray, temperature: float, top_k: int, top_p: float,
           rng: np.random.Generator) -> int:
    """Seeded draw from softmax(row / temperature) restricted by top-k, then top-p."""
    scaled = row.astype(np.float64) / temperature
    n = scaled.size
    best = scaled.max()
    weights = np.exp(scaled - best)
    if 0 < top_k < n:
        cand = np.argpartition(-scaled, top_k - 1)[:top_k]
        total = float(weights[cand].sum())  # top-p then acts on the top-k distribution
    else:
        total = float(weights.sum())
        cand = None
        if top_p < 1.0 and n > _TOP_P_PREFILTER:
            cand = np.argpartition(-scaled, _TOP_P_PREFILTER - 1)[:_TOP_P_PREFILTER]
            if weights[cand].sum() / total < top_p:  # the prefilter cut mass top-p needs
                cand = None
        if cand is None:
            cand = np.arange(n)
    cand = cand[np.argsort(-scaled[cand], kind="stable")]
    probs = weights[cand] / total
    if top_p < 1.0:
        # the smallest prefix whose mass reaches top_p (always at least one token)
        keep = min(int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1, cand.size)
        cand, probs = cand[:keep], probs[:keep]
    probs = probs / probs.sum()
    return int(cand[rng.choice(probs.size, p=probs)])
