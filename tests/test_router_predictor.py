"""Predictor: stable hashing, learning a real signal, gated text head, warm start."""

from __future__ import annotations

import numpy as np

from edged.router import Predictor, Router, RouterConfig
from edged.router.predictor import featurize


def test_features_are_stable_and_normalised() -> None:
    a = featurize("What is the capital of France?", 12)
    b = featurize("What is the capital of France?", 12)
    assert np.array_equal(a.idx, b.idx) and np.array_equal(a.val, b.val)
    assert np.all(np.diff(a.idx) > 0) and a.idx.max() < 4096
    assert np.isclose(np.linalg.norm(a.val), 1.0)
    empty = featurize("", 12)
    assert empty.idx.size == 1  # only the length bucket


def test_running_rate_without_text_signal() -> None:
    p = Predictor(2, dim_bits=10, calibration=True)
    rng = np.random.default_rng(0)
    for i in range(400):
        f = p.featurize(f"question number {i}")
        p.update(f, 0, float(rng.random() < 0.3))
        p.update(f, 1, float(rng.random() < 0.8))
    probs = p.predict(p.featurize("question number 5000"))
    assert abs(probs[0] - 0.3) < 0.07 and abs(probs[1] - 0.8) < 0.07


def test_text_head_learns_a_real_signal_and_is_gated_in() -> None:
    p = Predictor(1, dim_bits=12, calibration=True, learning_rate=0.2)
    rng = np.random.default_rng(1)
    for i in range(1500):
        hard = rng.random() < 0.5
        text = f"{'integrate the differential equation' if hard else 'say hello'} {i}"
        p.update(p.featurize(text), 0, float(not hard))
    easy = p.predict(p.featurize("say hello 99999"))[0]
    hard = p.predict(p.featurize("integrate the differential equation 99999"))[0]
    assert easy > 0.8 and hard < 0.2 and p.calib[0] > 0.5


def test_chained_prior_keeps_dearer_model_alive() -> None:
    p = Predictor(2, dim_bits=8, prior_strength=20.0, prior_step=0.03)
    f = p.featurize("x")
    for _ in range(200):
        p.update(f, 0, 1.0)
    p.update(f, 1, 0.0)  # one unlucky label for the dearer model
    assert p.rates[1] > 0.85


def test_warm_start_sets_estimates() -> None:
    router = Router(["s", "l"], RouterConfig(alpha=0.7, c=0.0))
    texts = [f"q{i}" for i in range(50)]
    labels = np.tile([0.5, 1.0], (50, 1)) * (np.arange(50)[:, None] % 2 == 0)
    energy = np.tile([2.0, 20.0], (50, 1))
    router.warm_start(texts, labels, energy, energy / 100)
    assert router.energy.known() and np.allclose(router.energy.mean, [2.0, 20.0])
    d = router.decide("fresh")
    assert not d.explored  # estimates known: no cold-start exploration
    assert d.predicted_energy_j == {"s": 2.0, "l": 20.0}


def test_prior_floor_is_a_floor_not_a_pull() -> None:
    pulled = Predictor(2, dim_bits=8, prior_strength=20.0, prior_step=0.03)
    floored = Predictor(2, dim_bits=8, prior_strength=20.0, prior_step=0.03, prior_floor=True)
    f = pulled.featurize("x")
    for p in (pulled, floored):
        for i in range(100):
            p.update(f, 0, float(i % 10 < 7))  # s: 0.7
        for i in range(20):
            p.update(f, 1, float(i % 10 < 9))  # m: 0.9 on its own labels
    assert floored.rates[1] > 0.85 > pulled.rates[1]  # own data counts in full
    for _ in range(10):
        floored.update(f, 1, 0.0)  # unlucky m never drops below s's rate + step
    assert floored.rates[1] >= floored.rates[0] + 0.03 - 1e-9
