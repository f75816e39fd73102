"""Hindsight and naive baselines, vectorised: single models, random, static mix, LP oracle."""

from __future__ import annotations

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
    i, j, x = plan
    t = np.arange(1, len(trace) + 1)
    use_j = np.floor(t * x + 1e-9) > np.floor((t - 1) * x + 1e-9)
    return _from_choice(trace, np.where(use_j, j, i))


def oracle(trace: Trace, alpha: float) -> Outcome:
    """Fractional LP lower bound: min sum_i,m x_im E_im s.t. mean_i sum_m x_im s_im >= alpha,
    sum_m x_im = 1, x >= 0; exact via bisection on the single multiplier and a fractional mix of
    the two integral choices either side of it."""
    energy, labels = trace.energy_j, trace.labels
    rows = np.arange(len(trace))
    scale = float(energy.max())

    def choose(lam: float) -> np.ndarray:
        return np.argmin(energy - lam * labels, axis=1)

    def sat(choice: np.ndarray) -> float:
        return float(labels[rows, choice].mean())

    low_choice = choose(0.0)
    if sat(low_choice) >= alpha:
        return _from_choice(trace, low_choice)
    low, high = 0.0, 2.0 * scale + 1.0
    if sat(choose(high)) < alpha:
        return _from_choice(trace, choose(high))
    for _ in range(60):
        mid = 0.5 * (low + high)
        if sat(choose(mid)) >= alpha:
            high = mid
        else:
            low = mid
    a, b = choose(low), choose(high)
    sa, sb = sat(a), sat(b)
    theta = 1.0 if sb == sa else (alpha - sa) / (sb - sa)
    ran = np.zeros(labels.shape)
    ran[rows, a] += 1.0 - theta
    ran[rows, b] += theta
    return Outcome(
        (ran * labels).sum(1), (ran * energy).sum(1), ran, np.zeros(len(trace), bool)
    )


__all__ = [
    "constrained_probs", "oracle", "random_mix", "single", "static_mix",
    "static_mix_plan",
]
