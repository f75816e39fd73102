"""Hindsight and naive baselines, vectorised: single models, random, static mix, per-benchmark
(task) mix, LP oracle; and the margin a hindsight plan needs to meet alpha on every shuffle."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from edged.replay.simulate import Outcome
from edged.replay.trace import Trace


def _from_choice(trace: Trace, choice: np.ndarray) -> Outcome:
    rows = np.arange(len(trace))
    ran = np.zeros(trace.labels.shape)
    ran[rows, choice] = 1.0
    return Outcome(
        trace.labels[rows, choice], trace.energy_j[rows, choice], ran, np.zeros(len(trace), bool)
    )


def single(trace: Trace, model: int) -> Outcome:
    return _from_choice(trace, np.full(len(trace), model))


def random_mix(trace: Trace, probs: np.ndarray, seed: int) -> Outcome:
    """Each request goes to a model drawn from `probs`."""
    rng = np.random.default_rng(seed)
    return _from_choice(trace, rng.choice(len(probs), size=len(trace), p=probs))


def constrained_probs(trace: Trace, alpha: float) -> np.ndarray:
    """Uniform random routing, shifted towards the most accurate model just enough to meet alpha
    in expectation (hindsight accuracies); the naive "random but SLA-aware" router."""
    acc = trace.labels.mean(axis=0)
    m = acc.size
    uniform = np.full(m, 1.0 / m)
    best = int(np.argmax(acc))
    base = float(uniform @ acc)
    if base >= alpha or acc[best] <= base:
        return uniform
    w = min(1.0, (alpha - base) / (acc[best] - base))
    probs = (1.0 - w) * uniform
    probs[best] += w
    return probs


def static_mix_plan(trace: Trace, alpha: float) -> tuple[int, int, float]:
    """Cheapest hindsight mix of two models (i, j, share of j) whose mean accuracy meets alpha.

    A single model that meets alpha is the pair (i, i, 0); if none can, the most accurate one.
    """
    acc = trace.labels.mean(axis=0)
    energy = trace.energy_j.mean(axis=0)
    best = (int(np.argmax(acc)), int(np.argmax(acc)), 0.0)
    best_e = np.inf
    for i in range(acc.size):
        if acc[i] >= alpha and energy[i] < best_e:
            best, best_e = (i, i, 0.0), energy[i]
        for j in range(acc.size):
            if acc[i] < alpha <= acc[j]:
                x = (alpha - acc[i]) / (acc[j] - acc[i])
                e = (1.0 - x) * energy[i] + x * energy[j]
                if e < best_e:
                    best, best_e = (i, j, float(x)), e
    return best


def static_mix(trace: Trace, plan: tuple[int, int, float]) -> Outcome:
    """Serve model j on an exact share x of the requests, spread evenly (low discrepancy)."""
    return _from_choice(trace, _spread(len(trace), plan))


def _spread(n: int, plan: tuple[int, int, float]) -> np.ndarray:
    """Model per position 1..n serving j on an exact share x, spread evenly (low discrepancy)."""
    i, j, x = plan
    t = np.arange(1, n + 1)
    use_j = np.floor(t * x + 1e-9) > np.floor((t - 1) * x + 1e-9)
    return np.where(use_j, j, i)


TaskPlan = dict[str, tuple[int, int, float]]


def task_mix_plan(trace: Trace, alpha: float) -> TaskPlan:
    """Cheapest hindsight mixture per benchmark meeting alpha over the whole stream.

    For benchmark k (weight w_k: its share of requests) a distribution x_k over models, with
    sum_k w_k x_k . acc_k >= alpha at least cost sum_k w_k x_k . E_k (acc, E: per-benchmark mean
    accuracy and joules). One coupling constraint, so the LP optimum is the Lagrangian choice
    argmin_m E_km - lam acc_km at the optimal multiplier, mixed between the two choices either
    side of it (found by bisection, as `oracle` does): each benchmark gets (a, b, share of b).
    Benchmarks that know more per joule get the upgrades first; a static mix cannot do that.
    If alpha is out of reach, every benchmark gets its most accurate model.
    """
    kinds = np.array(trace.kind_of_rows())
    names = sorted(set(kinds.tolist()))
    acc = np.array([trace.labels[kinds == k].mean(axis=0) for k in names])
    energy = np.array([trace.energy_j[kinds == k].mean(axis=0) for k in names])
    weight = np.array([(kinds == k).mean() for k in names])
    a, b, theta = _lagrangian_split(energy, acc, weight, alpha)
    return {k: (int(a[n]), int(b[n]), theta if a[n] != b[n] else 0.0)
            for n, k in enumerate(names)}


def _lagrangian_split(
    energy: np.ndarray, acc: np.ndarray, weight: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact solution of `min sum_i w_i x_i . E_i  s.t.  sum_i w_i x_i . acc_i >= alpha` (rows i,
    x_i a distribution over the columns): one coupling constraint, so the optimum is the
    per-row Lagrangian choice argmin_m E_im - lam acc_im at the optimal multiplier (bisection),
    mixed between the choices either side of it. Returns (a, b, share of b); when alpha is met
    at lam = 0 or out of reach, a single choice (share 0)."""
    rows = np.arange(len(energy))

    def choose(lam: float) -> np.ndarray:
        return np.argmin(energy - lam * acc, axis=1)

    def sat(choice: np.ndarray) -> float:
        return float(weight @ acc[rows, choice])

    low_choice = choose(0.0)
    if sat(low_choice) >= alpha:
        return low_choice, low_choice, 0.0
    # past this multiplier every row takes its most accurate column (cheapest among ties)
    gap = max(float(np.diff(np.unique(acc)).min(initial=1.0)), 1e-12)
    low, high = 0.0, 2.0 * float(energy.max()) / gap
    top = choose(high)
    if sat(top) < alpha:
        return top, top, 0.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if sat(choose(mid)) >= alpha:
            high = mid
        else:
            low = mid
        if high - low <= 1e-12 * high:
            break
    a, b = choose(low), choose(high)
    sa, sb = sat(a), sat(b)
    return a, b, float(1.0 if sb == sa else (alpha - sa) / (sb - sa))


def task_mix_expected(trace: Trace, plan: TaskPlan) -> tuple[float, float]:
    """(mean accuracy, mean joules per request) the plan gives in expectation on `trace`."""
    kinds = np.array(trace.kind_of_rows())
    acc_sum = energy_sum = 0.0
    for k, (i, j, x) in plan.items():
        sel = kinds == k
        share = np.zeros(trace.labels.shape[1])
        share[i] += 1.0 - x
        share[j] += x
        acc_sum += float(trace.labels[sel].sum(axis=0) @ share)
        energy_sum += float(trace.energy_j[sel].sum(axis=0) @ share)
    return acc_sum / len(trace), energy_sum / len(trace)


def task_mix(trace: Trace, plan: TaskPlan) -> Outcome:
    """Serve each benchmark's plan like `static_mix`: its share spread evenly over that
    benchmark's requests in stream order."""
    kinds = np.array(trace.kind_of_rows())
    choice = np.zeros(len(trace), dtype=int)
    for k, pair in plan.items():
        sel = np.flatnonzero(kinds == k)
        choice[sel] = _spread(sel.size, pair)
    return _from_choice(trace, choice)


def fixed_multiplier(trace: Trace, routed: Outcome, alpha: float) -> Outcome:
    """A router's own forecasts with one multiplier for the whole stream, chosen in hindsight:
    each request gets `argmin_m E_m - lam s_m` on the forecasts the router had for it, with
    the smallest `lam` (bisection) whose choices meet alpha on the true labels (if none does,
    the forecasts' most satisfying model per request, which then misses). No exploration
    is run. Against the router itself it separates what its forecasts know from what its
    controller (queue, margin, ladder, exploration) spends: a perfect constant multiplier."""
    sat, joules = routed.predicted_satisfaction, routed.predicted_energy_j
    if sat is None or joules is None:
        raise ValueError("fixed_multiplier needs a router's outcome with its forecasts")
    rows = np.arange(len(trace))

    def choose(lam: float) -> np.ndarray:
        return np.argmin(joules - lam * sat, axis=1)

    def meets(lam: float) -> bool:
        return bool(trace.labels[rows, choose(lam)].mean() >= alpha)

    if meets(0.0):
        return _from_choice(trace, choose(0.0))
    low, high = 0.0, 1.0
    while not meets(high):
        if high > 1e15:  # every choice is already the most satisfying forecast: out of reach
            return _from_choice(trace, choose(high))
        low, high = high, 4.0 * high
    for _ in range(100):
        if high - low <= 1e-9 * high:
            break
        mid = 0.5 * (low + high)
        low, high = (low, mid) if meets(mid) else (mid, high)
    return _from_choice(trace, choose(high))


def smallest_safe_margin(
    runs: Sequence[Callable[[float], Outcome]], alpha: float, *, step: float = 0.001,
    limit: float = 0.05,
) -> tuple[float, list[Outcome]] | None:
    """The smallest margin (a multiple of `step`, at most `limit`) by which a hindsight plan
    must aim above alpha so that every run (one per shuffle of the stream, each aiming at the
    target it is given) ends at or above alpha, with those runs; None if `limit` is not enough.

    A plan that meets alpha in expectation misses it on about half of the shuffles; what
    meeting it on every shuffle costs such a plan is the least any policy without per-request
    knowledge of the outcomes pays for the same guarantee."""
    for k in range(round(limit / step) + 1):
        margin = k * step
        outcomes = [run(alpha + margin) for run in runs]
        if all(o.satisfaction.mean() >= alpha - 1e-9 for o in outcomes):
            return margin, outcomes
    return None


def oracle(trace: Trace, alpha: float) -> Outcome:
    """Fractional LP lower bound: min sum_i,m x_im E_im s.t. mean_i sum_m x_im s_im >= alpha,
    sum_m x_im = 1, x >= 0; exact via bisection on the single multiplier and a fractional mix of
    the two integral choices either side of it."""
    energy, labels = trace.energy_j, trace.labels
    rows = np.arange(len(trace))
    a, b, theta = _lagrangian_split(energy, labels, np.full(len(trace), 1.0 / len(trace)), alpha)
    ran = np.zeros(labels.shape)
    ran[rows, a] += 1.0 - theta
    ran[rows, b] += theta
    return Outcome(
        (ran * labels).sum(1), (ran * energy).sum(1), ran, np.zeros(len(trace), bool)
    )


__all__ = [
    "TaskPlan", "constrained_probs", "fixed_multiplier", "oracle", "random_mix", "single",
    "smallest_safe_margin", "static_mix", "static_mix_plan", "task_mix", "task_mix_expected",
    "task_mix_plan",
]
