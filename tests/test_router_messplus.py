"""Property tests of the MESS+ math and the Router's queue behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.router import Router, RouterConfig, RouterConfigError, RouterError, messplus

labels_st = st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=300)


@given(labels_st, st.floats(0.0, 1.0))
def test_queue_nonnegative_and_bounds_deficit(labels: list[float], alpha: float) -> None:
    q = 0.0
    for s in labels:
        q = messplus.update_queue(q, alpha, s)
        assert q >= 0.0
    # mean satisfaction >= alpha - Q_T / T on any label sequence
    assert np.mean(labels) >= alpha - q / len(labels) - 1e-9


@given(
    st.lists(st.floats(0.1, 1e4), min_size=2, max_size=6).map(sorted),
    st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
    st.floats(0.0, 10.0),
)
def test_zero_queue_picks_cheapest(energy: list[float], sats: list[float], v: float) -> None:
    e = np.array(energy)
    s = np.array(sats[: len(energy)])
    cost = messplus.objective(e, s, q=0.0, v=v, alpha=0.8)
    assert messplus.choose(cost) == 0


def test_ties_go_to_cheaper_and_allowed_mask() -> None:
    assert messplus.choose(np.array([1.0, 1.0, 2.0])) == 0
    assert messplus.choose(np.array([1.0, 1.0, 0.5]), allowed=[True, True, False]) == 0
    assert messplus.choose(np.array([1.0, 2.0]), allowed=[False, False]) == 0


def test_explore_probability_and_expected_count() -> None:
    assert messplus.explore_probability(1, 0.1) == pytest.approx(0.1)
    assert messplus.explore_probability(16, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        messplus.explore_probability(0, 0.1)
    t = 10_000
    assert messplus.expected_explorations(t, 0.1) == pytest.approx(4 * 0.1 / 3 * t**0.75, rel=0.01)


@settings(deadline=None, max_examples=5)
@given(st.integers(0, 10_000))
def test_router_exploration_frequency_matches_paper(seed: int) -> None:
    horizon, c = 3000, 0.5
    router = Router(["a", "b"], RouterConfig.paper(alpha=0.5, c=c, seed=seed))
    for _ in range(horizon):
        d = router.decide("x")
        router.observe_energy(d, {name: 1.0 + i for i, name in enumerate(d.run)})
    expected = messplus.expected_explorations(horizon, c)  # ~ (4c/3) T^(3/4)
    assert abs(router.explorations - expected) < 4 * np.sqrt(expected) + 1


@settings(deadline=None, max_examples=20)
@given(labels_st, st.floats(0.05, 0.95))
def test_router_queue_guarantee_on_any_labels(labels: list[float], alpha: float) -> None:
    router = Router(["s", "l"], RouterConfig.paper(alpha=alpha, c=0.1))
    served = []
    for y in labels:
        d = router.decide("q")
        router.observe_energy(d, dict.fromkeys(d.run, 1.0))
        router.observe_labels(d, {d.model: y})
        served.append(y)
        assert router.q >= 0.0
    assert np.mean(served) >= alpha - router.q / len(served) - 1e-9


def test_queue_moves_only_when_label_arrives() -> None:
    router = Router(["s", "l"], RouterConfig.paper(alpha=0.9))
    d = router.decide("q")
    router.observe_energy(d, dict.fromkeys(d.run, 1.0))
    assert router.q == 0.0
    router.observe_labels(d, {d.model: 0.0})
    assert router.q == pytest.approx(0.9)


def test_cheapest_chosen_when_queue_empty() -> None:
    router = Router(["s", "m", "l"], RouterConfig.paper(alpha=0.5, c=0.0))
    d = router.decide("warm")  # cold start explores everything
    assert d.explored and d.run == ("s", "m", "l") and d.model == "l"
    router.observe_energy(d, {"s": 1.0, "m": 5.0, "l": 25.0})
    d = router.decide("next")
    assert not d.explored and d.model == "s" and d.q == 0.0


def test_latency_deadline_skips_slow_models() -> None:
    router = Router(["s", "l"], RouterConfig(alpha=0.99, c=0.0))
    d = router.decide("a")
    router.observe_energy(d, {"s": 1.0, "l": 2.0}, {"s": 0.01, "l": 5.0})
    router.observe_labels(d, {"s": 0.0, "l": 1.0})
    router.debt = 100.0  # a large deficit: the SLA wants the large model
    assert router.decide("b").model == "l"
    assert router.decide("b", deadline_ms=100).model == "s"


def test_energy_budget_queue_pushes_to_cheaper() -> None:
    cfg = RouterConfig(alpha=None, energy_budget_j=2.0, c=0.0, V=1.0)
    router = Router(["s", "l"], cfg)
    d = router.decide("a")
    router.observe_energy(d, {"s": 1.0, "l": 10.0})
    router.observe_labels(d, {"s": 0.0, "l": 1.0})
    assert router.z > 0.0
    chosen = []
    for _ in range(200):
        d = router.decide("a")
        router.observe_energy(d, {m: {"s": 1.0, "l": 10.0}[m] for m in d.run})
        chosen.append(d.model)
    mean_j = np.mean([{"s": 1.0, "l": 10.0}[m] for m in chosen])
    assert mean_j < 3.0 and "l" in chosen


def test_bad_input_is_typed() -> None:
    with pytest.raises(RouterConfigError, match="alpha"):
        RouterConfig(alpha=1.5)
    with pytest.raises(RouterConfigError, match="V"):
        RouterConfig(V="fast")
    router = Router(["s", "l"])
    d = router.decide("x")
    with pytest.raises(RouterError, match="unknown model"):
        router.observe_energy(d, {"xl": 1.0})
    with pytest.raises(RouterError, match="finite"):
        router.observe_energy(d, {"s": float("nan")})
    with pytest.raises(RouterError, match=r"\[0, 1\]"):
        router.observe_labels(d, {"s": 2.0})
    with pytest.raises(RouterError):
        Router([])


def test_margin_scales_with_label_spread() -> None:
    for alpha in (0.5, 0.9):
        d = Router(["s", "l"], RouterConfig(alpha=alpha, margin=0.1)).decide("a")
        assert d.target == pytest.approx(alpha + 0.1 * 2.0 * np.sqrt(alpha * (1.0 - alpha)))
    flat = Router(["s", "l"], RouterConfig(alpha=0.9, margin=0.05, margin_scaled=False))
    assert flat.decide("a").target == pytest.approx(0.95)


def _primed(config: RouterConfig, labels: dict[str, list[float]]) -> Router:
    """Router whose energies are known (s: 1 J, l: 2 J) and whose models saw `labels`."""
    router = Router(["s", "l"], config)
    d = router.decide("cold start")
    router.observe_energy(d, {"s": 1.0, "l": 2.0})
    features = router.predictor.featurize("x")
    for name, values in labels.items():
        for label in values:
            router.predictor.update(features, router.names.index(name), label)
    return router


@pytest.mark.parametrize("upward", [True, False])
def test_optimism_upward_never_pulls_down_to_a_cheaper_model(upward: bool) -> None:
    cfg = RouterConfig(alpha=0.8, c=0.0, lp_prior=False, optimism=1.0, optimism_upward=upward)
    # s barely known (rate 0.5), l well known (0.9): with a deficit the plain choice is l; a
    # bonus on s would undercut it.
    router = _primed(cfg, {"s": [1.0, 0.0], "l": [1.0] * 180 + [0.0] * 20})
    router.debt = 5.0
    assert router.decide("q").model == ("l" if upward else "s")


def test_optimism_upward_still_lifts_a_starved_dearer_model() -> None:
    cfg = RouterConfig(alpha=0.8, c=0.0, lp_prior=False, optimism=1.0, prior_step=0.0)
    # l unlucky on its two labels (rate 0.25 < s's 0.7): only the bonus gets it tried again
    router = _primed(cfg, {"s": [1.0] * 140 + [0.0] * 60, "l": [0.0, 0.0]})
    router.debt = 50.0
    assert router.decide("q").model == "l"
    plain = _primed(cfg.with_(optimism=0.0), {"s": [1.0] * 140 + [0.0] * 60, "l": [0.0, 0.0]})
    plain.debt = 50.0
    assert plain.decide("q").model == "s"


def test_ladder_serves_the_next_model_not_the_dearest() -> None:
    cfg = RouterConfig(alpha=0.8, c=0.0, lp_prior=False, optimism=1.0)
    names = ["s", "m", "l"]
    labels = {"s": [1.0] * 70 + [0.0] * 30, "m": [1.0] * 90 + [0.0] * 10, "l": [1.0] * 3}
    for ladder, expect in ((True, "m"), (False, "l")):
        router = Router(names, cfg.with_(ladder=ladder))
        d = router.decide("cold start")
        router.observe_energy(d, {"s": 1.0, "m": 5.0, "l": 25.0})
        features = router.predictor.featurize("x")
        for name, values in labels.items():
            for label in values:
                router.predictor.update(features, names.index(name), label)
        router.debt = 40.0  # deficit up; the rarely labelled l carries a big optimism bonus
        assert router.decide("q").model == expect


def test_ladder_passes_a_model_confidently_below_target() -> None:
    cfg = RouterConfig(alpha=0.8, c=0.0, lp_prior=False, optimism=0.0)
    names = ["s", "m", "l"]
    router = Router(names, cfg)
    d = router.decide("cold start")
    router.observe_energy(d, {"s": 1.0, "m": 5.0, "l": 25.0})
    features = router.predictor.featurize("x")
    for name, values in {"s": [0.0] * 400, "m": [1.0] * 200 + [0.0] * 200,
                         "l": [1.0] * 400}.items():
        for label in values:
            router.predictor.update(features, names.index(name), label)
    assert router._ladder_cap(router.predictor.predict(features), 0.8, router.t) == 2
    router.debt = 40.0
    assert router.decide("q").model == "l"


def test_lp_prior_follows_current_rates() -> None:
    """The LP multiplier is solved on today's running rates, not the ones stored back then."""
    names = ["s", "l"]
    for current, expect_zero in ((True, False), (False, True)):
        cfg = RouterConfig(alpha=0.8, c=0.0, optimism=0.0, lp_current_rates=current)
        router = Router(names, cfg)
        features = router.predictor.featurize("x")
        for _ in range(100):  # s looks good enough while the window fills ...
            router.predictor.update(features, 0, 1.0)
        for i in range(40):
            d = router.decide(f"q{i}")
            router.observe_energy(d, {n: 1.0 if n == "s" else 10.0 for n in d.run})
        for _ in range(300):  # ... then turns out far below alpha
            router.predictor.update(features, 0, 0.0)
        router.lam_t = 0
        router._refresh_lp_prior()
        assert (router.lam == 0.0) == expect_zero


def test_lp_prior_plans_the_surplus_for_unlabelled_requests() -> None:
    """With few served requests labelled the LP aims above alpha (the deficit alone would build
    that surplus only as fast as labels come); with every request labelled it aims at alpha."""
    names = ["s", "l"]
    lams = {}
    for labelled in (True, False):
        cfg = RouterConfig(alpha=0.8, c=0.0, optimism=0.0)
        router = Router(names, cfg)
        features = router.predictor.featurize("x")
        for i in range(400):  # s meets alpha on its own: 0.82
            router.predictor.update(features, 0, float(i % 50 < 41))
            router.predictor.update(features, 1, 1.0)
        for i in range(40):
            d = router.decide(f"q{i}")
            router.observe_energy(d, {n: 1.0 if n == "s" else 10.0 for n in d.run})
        router.served_labels = router.t - 1 if labelled else router.t // 10
        router.lam_t = 0
        router._refresh_lp_prior()
        lams[labelled] = router.lam
    assert lams[True] == 0.0
    assert lams[False] > 0.0


@pytest.mark.parametrize("queue_labels", ["all", "real"])
def test_queue_labels_real_keeps_pseudo_labels_out_of_the_queue(queue_labels: str) -> None:
    """With queue_labels="real" agreement/judge labels teach the predictor but move neither
    the queue nor the labelled count; a real label moves it with weight 1, also where it
    replaces a pseudo-label. With "all" the pseudo-label and its replacement move it as before."""
    cfg = RouterConfig.paper(alpha=0.8).with_(queue_labels=queue_labels)
    router = Router(["s", "l"], cfg)
    d = router.decide("q")
    router.observe_energy(d, dict.fromkeys(d.run, 1.0))
    served = d.model
    router.observe_labels(d, {served: 0.0}, weight=4.0, pseudo=True)
    assert router.predictor.labels[router.names.index(served)] == 1  # learned either way
    router.observe_reference(d)
    if queue_labels == "real":
        assert router.q == 0.0 and router.debt == 0.0 and router.served_labels == 0
    else:
        assert router.q == pytest.approx(4.0 * 0.8 + 0.8 - 1.0) and router.served_labels == 2
    router.observe_labels(d, {served: 1.0}, replaces={served: 0.0}, weight=4.0)
    if queue_labels == "real":  # the request's first real label, weight 1
        assert router.served_labels == 1 and router.debt == pytest.approx(0.8 - 1.0)
    else:  # the pseudo-label's place and weight: 4 * (0.8 - 1) plus the reference's -0.2
        assert router.served_labels == 2 and router.debt == pytest.approx(4 * -0.2 - 0.2)
    with pytest.raises(RouterConfigError, match="queue_labels"):
        RouterConfig(queue_labels="some")  # type: ignore[arg-type]
