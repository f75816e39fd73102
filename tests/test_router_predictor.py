"""Predictor: stable hashing, shape features, learning a real signal, expert mixture, chained
gains, per-request energy, warm start, and a router that routes by kind of request."""

from __future__ import annotations

import numpy as np
import pytest

from edged.router import Predictor, Router, RouterConfig, RouterError
from edged.router.estimates import EnergyHead
from edged.router.predictor import EXPERTS, featurize, shape_tokens


def test_features_are_stable_and_normalised() -> None:
    a = featurize("What is the capital of France?", 12)
    b = featurize("What is the capital of France?", 12)
    assert np.array_equal(a.idx, b.idx) and np.array_equal(a.val, b.val)
    assert np.all(np.diff(a.idx) > 0) and a.idx.max() < 4096
    assert np.isclose(np.linalg.norm(a.val), 1.0)
    empty = featurize("", 12)
    assert empty.idx.size == len(shape_tokens(""))  # only the shape tokens
    assert np.isclose(np.linalg.norm(empty.val), 1.0)


def test_shape_tokens_see_digit_counts_not_the_digits() -> None:
    one, same, two = shape_tokens("3+5="), shape_tokens("7+2="), shape_tokens("31+52=")
    assert one == same  # the digits themselves are folded away
    assert "\x00maxdigits:1" in one and "\x00maxdigits:2" in two
    assert "\x00first:is" in shape_tokens("is barq's root beer a pepsi product")
    assert "\x00end:?" in shape_tokens("Which is heavier?")


def test_running_rate_without_text_signal() -> None:
    p = Predictor(2, dim_bits=10, calibration=True)
    rng = np.random.default_rng(0)
    for i in range(400):
        f = p.featurize(f"question number {i}")
        p.update(f, 0, float(rng.random() < 0.3))
        p.update(f, 1, float(rng.random() < 0.8))
    probs = p.predict(p.featurize("question number 5000"))
    assert abs(probs[0] - 0.3) < 0.07 and abs(probs[1] - 0.8) < 0.07


def test_text_head_learns_a_real_signal_and_is_weighted_in() -> None:
    p = Predictor(1, dim_bits=12, calibration=True, learning_rate=0.2)
    rng = np.random.default_rng(1)
    for i in range(1500):
        hard = rng.random() < 0.5
        text = f"{'integrate the differential equation' if hard else 'say hello'} {i}"
        p.update(p.featurize(text), 0, float(not hard))
    easy = p.predict(p.featurize("say hello 99999"))[0]
    hard = p.predict(p.featurize("integrate the differential equation 99999"))[0]
    assert easy > 0.8 and hard < 0.2
    assert p.expert_weights()[EXPERTS.index("head"), 0] > 0.9


def test_experts_left_out_get_no_weight() -> None:
    """`RouterConfig.experts` (ablations): with the head and the neighbours out a real text
    signal is not used and the prediction is the running rate; an unknown expert is a typed
    error."""
    rng = np.random.default_rng(1)
    texts = [(f"{'integrate the equation' if h else 'say hello'} {i}", h)
             for i, h in enumerate(rng.random(600) < 0.5)]
    router = Router(["m"], RouterConfig(experts=("rate", "chain")))
    p = router.predictor
    for text, hard in texts:
        p.update(p.featurize(text), 0, float(not hard))
    off = [EXPERTS.index("head"), EXPERTS.index("neighbours")]
    assert (p.expert_weights()[off, 0] == 0.0).all()
    assert abs(p.predict(p.featurize("say hello 9999"))[0] - p.rates[0]) < 1e-9
    with pytest.raises(ValueError, match="experts"):
        RouterConfig(experts=("rate", "oracle"))
    with pytest.raises(ValueError, match="experts"):
        Predictor(1, experts=())


def test_noise_in_the_text_keeps_the_head_out() -> None:
    p = Predictor(1, dim_bits=12, calibration=True, learning_rate=0.2)
    rng = np.random.default_rng(2)
    for i in range(1500):  # labels independent of the (unique) texts
        p.update(p.featurize(f"request {rng.integers(1 << 30)} {i}"), 0, float(rng.random() < 0.6))
    assert p.expert_weights()[EXPERTS.index("head"), 0] < 0.5
    assert abs(p.predict(p.featurize("request 7 7"))[0] - 0.6) < 0.06


def test_chain_carries_the_cheaper_models_knowledge_to_a_rarely_run_one() -> None:
    p = Predictor(2, dim_bits=12, calibration=True, learning_rate=0.2, prior_strength=20.0,
                  prior_step=0.03)
    rng = np.random.default_rng(3)
    for i in range(3000):
        hard = rng.random() < 0.5
        text = f"{'prove the theorem' if hard else 'add two and two'} {i}"
        f = p.featurize(text)
        small = float(not hard and rng.random() < 0.9)
        p.update(f, 0, small)
        if hard or i % 20 == 0:  # the dear model runs on hard requests, and sometimes on both
            large = float(rng.random() < (0.5 if hard else 0.95))
            p.update(f, 1, large)
            p.observe_pair(1, large, small)
    easy = p.predict(p.featurize("add two and two 99999"))
    assert easy[1] > 0.8  # not the ~0.5 rate of the hard requests it mostly ran on


def test_energy_head_learns_per_request_joules() -> None:
    head = EnergyHead(2, 1 << 12, learning_rate=0.1)
    short, long = featurize("is it raining", 12), featurize("explain the history of rome " * 5, 12)
    for _ in range(300):
        head.update(short.idx, short.val, 1, 0.5)
        head.update(long.idx, long.val, 1, 2.0)
    assert 0.4 < head.factors(short.idx, short.val)[1] < 0.65
    assert 1.6 < head.factors(long.idx, long.val)[1] < 2.5
    assert head.factors(short.idx, short.val)[0] == 1.0  # untouched model: the mean


def test_router_routes_by_kind_of_request() -> None:
    """Two kinds in one stream: the cheap model is right on one (60 %) and wrong on the other.
    The optimum serves every easy request on small and 3/4 of the hard ones on large
    (0.6 + 0.4 * 0.75 = alpha): the router gets there after a few hundred labels."""
    router = Router(["small", "large"], RouterConfig(alpha=0.9, seed=0))
    rng = np.random.default_rng(4)
    served: dict[str, list[str]] = {"easy": [], "hard": []}
    hits = []
    for i in range(3000):
        kind = "hard" if rng.random() < 0.4 else "easy"
        text = f"{i} + {i + 1} =" if kind == "easy" else f"Prove that {i} is not a perfect square."
        d = router.decide(text)
        router.observe_energy(d, {m: {"small": 1.0, "large": 10.0}[m] for m in d.run})
        truth = {"small": float(kind == "easy"), "large": 1.0}
        router.observe_labels(d, {m: truth[m] for m in d.run})
        hits.append(truth[d.model])
        if i >= 1000:
            served[kind].append(d.model)
    assert served["easy"].count("small") / len(served["easy"]) > 0.9
    assert 0.65 < served["hard"].count("large") / len(served["hard"]) < 0.9
    assert np.mean(hits) >= 0.9 - 0.01


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


def test_router_with_embeddings_round_trips_and_checks_them(tmp_path) -> None:
    rng = np.random.default_rng(5)
    router = Router(["small", "large"], RouterConfig(alpha=0.8, seed=0), embedding_dim=8)
    for i in range(50):
        d = router.decide(f"q{i}", embedding=rng.normal(size=8))
        router.observe_energy(d, {m: 1.0 for m in d.run})
        router.observe_labels(d, {m: float(i % 2) for m in d.run})
    router.save(tmp_path / "s.npz")
    again = Router.restore(tmp_path / "s.npz", ["small", "large"], router.config, embedding_dim=8)
    probe = rng.normal(size=8)
    assert again.decide("x", embedding=probe).to_dict() == router.decide(
        "x", embedding=probe).to_dict()
    for bad in (None, np.ones(3), np.full(8, np.nan)):
        with pytest.raises(RouterError, match="embedding"):
            router.decide("x", embedding=bad)
    with pytest.raises(RouterError, match="without embeddings"):
        Router(["a"], RouterConfig()).decide("x", embedding=np.ones(8))


def test_neighbours_learn_a_kind_from_a_few_labels() -> None:
    """A dozen labels of 3-digit sums (wrong) and 1-digit sums (right): the neighbours expert
    separates the kinds at once, and the mixture follows it."""
    p = Predictor(1, dim_bits=12, calibration=True, learning_rate=0.1)
    rng = np.random.default_rng(6)
    for _ in range(12):
        a, b = rng.integers(1, 10, size=2)
        p.update(p.featurize(f"{a}+{b}="), 0, 1.0)
        a, b = rng.integers(100, 1000, size=2)
        p.update(p.featurize(f"{a}+{b}="), 0, 0.0)
    experts = p.experts(p.featurize("481+529="))
    near = experts[EXPERTS.index("neighbours"), 0]
    assert near < 0.2 < 0.8 < p.experts(p.featurize("4+7="))[EXPERTS.index("neighbours"), 0]
    assert p.predict(p.featurize("481+529="))[0] < p.predict(p.featurize("4+7="))[0]


def test_neighbour_memory_is_a_bounded_ring() -> None:
    p = Predictor(1, dim_bits=8, calibration=True)
    for i in range(Predictor.MEMORY + 10):
        p.update(p.featurize(f"q{i}"), 0, float(i % 2))
    assert p.memory_n[0] == Predictor.MEMORY + 10
    assert p.memory_shape.shape == (1, Predictor.MEMORY, 64)


def test_prior_floor_keeps_the_chain_gain_from_going_negative() -> None:
    """A dozen pairs where the dearer model lost (one run of hard requests) would put it below
    the cheaper one through the chain for good; with prior_floor its gain stops at 0."""
    floored = Predictor(3, dim_bits=8, prior_strength=20.0, prior_step=0.03, prior_floor=True)
    plain = Predictor(3, dim_bits=8, prior_strength=20.0, prior_step=0.03, prior_floor=False)
    for p in (floored, plain):
        for i in range(12):
            p.observe_pair(1, 0.0, 1.0 if i < 10 else 0.0)  # medium wrong, small mostly right
            p.observe_pair(2, 1.0, 0.0)  # large right where medium was wrong
    assert plain.gains()[1] < 0.0 and floored.gains()[1] == 0.0
    assert floored.gains()[2] == plain.gains()[2] > 0.0  # a positive gain is left alone
    assert floored.gains()[0] == plain.gains()[0] == 0.0
