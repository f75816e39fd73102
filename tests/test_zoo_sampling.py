"""The sampler alone: top-k / top-p sets, the top-p prefilter, repetition penalty, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from edged.zoo import GenerationParams
from edged.zoo.sampling import Sampler, sample


def reference(row: np.ndarray, temperature: float, top_k: int, top_p: float,
              rng: np.random.Generator) -> int:
    """Full-sort top-k then top-p, written plainly."""
    scaled = row.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    if top_k:
        order = np.sort(order[:top_k], kind="stable")
        order = order[np.argsort(-scaled[order], kind="stable")]
    w = np.exp(scaled[order] - scaled[order[0]])
    p = w / w.sum()
    if top_p < 1:
        keep = min(int(np.searchsorted(np.cumsum(p), top_p)) + 1, p.size)
        order, p = order[:keep], p[:keep]
    p = p / p.sum()
    return int(order[rng.choice(p.size, p=p)])


@pytest.mark.parametrize(("vocab", "top_k", "top_p"), [
    (50, 0, 1.0), (50, 5, 1.0), (50, 0, 0.5), (50, 10, 0.7),
    (40_000, 0, 0.9), (40_000, 0, 0.999), (40_000, 40, 0.95),
])
def test_sample_equals_full_sort_reference(vocab: int, top_k: int, top_p: float) -> None:
    logits = np.random.default_rng(0).normal(scale=3.0, size=vocab).astype(np.float32)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    n = 200 if vocab < 1000 else 40
    got = [sample(logits, 0.8, top_k, top_p, a) for _ in range(n)]
    want = [reference(logits, 0.8, top_k, top_p, b) for _ in range(n)]
    assert got == want


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = np.array([5.0, 4.0, 3.0, 0.0, -1.0, -2.0], dtype=np.float32)
    rng = np.random.default_rng(1)
    assert {sample(logits, 1.0, 2, 1.0, rng) for _ in range(300)} == {0, 1}
    # softmax mass of the first token is ~0.66: top_p 0.6 keeps it alone
    assert {sample(logits, 1.0, 0, 0.6, rng) for _ in range(100)} == {0}
    # a flat distribution at high temperature reaches every token
    assert {sample(logits, 50.0, 0, 1.0, rng) for _ in range(600)} == set(range(6))


def test_frequencies_follow_softmax() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    rng = np.random.default_rng(2)
    draws = np.bincount([sample(logits, 1.0, 0, 1.0, rng) for _ in range(6000)], minlength=3)
    assert np.allclose(draws / 6000, [0.5, 0.3, 0.2], atol=0.03)


def test_repetition_penalty_follows_transformers_rule() -> None:
    sampler = Sampler(GenerationParams(repetition_penalty=2.0), vocab_size=4, usable_vocab=4)
    logits = np.array([3.0, 2.5, -1.0, -1.5], dtype=np.float32)
    assert sampler(logits) == 0
    sampler.observe([0])  # 3.0 -> 1.5 < 2.5
    assert sampler(logits) == 1
    sampler.observe([1, 1])  # 2.5 -> 1.25 < 1.5
    assert sampler(logits) == 0
    assert logits.tolist() == [3.0, 2.5, -1.0, -1.5]  # the caller's row is not modified


def test_padding_ids_beyond_the_tokenizer_are_never_chosen() -> None:
    logits = np.array([0.0, 1.0, 9.0], dtype=np.float32)
    assert Sampler(GenerationParams(), vocab_size=3, usable_vocab=2)(logits) == 1
    hot = Sampler(GenerationParams(temperature=5.0, seed=0), vocab_size=3, usable_vocab=2)
    assert {hot(logits) for _ in range(100)} <= {0, 1}


def test_seed_reproduces_and_none_varies() -> None:
    logits = np.random.default_rng(3).normal(size=300).astype(np.float32)

    def run(seed: int | None) -> list[int]:
        s = Sampler(GenerationParams(temperature=1.0, seed=seed), 300, 300)
        return [s(logits) for _ in range(30)]

    assert run(11) == run(11)
    assert run(None) != run(None)
