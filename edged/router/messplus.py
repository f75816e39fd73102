"""MESS+ math as pure functions: exploration coin, model choice, virtual queues.

Everything here is a function of numbers (no state, no I/O), so the guarantee of the paper
(mean satisfaction >= alpha - Q_T / T) can be property-tested directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def explore_probability(t: int, c: float, exponent: float = 0.25) -> float:
    """The exploration coin `p_t = min(1, c / t**exponent)`; t counts from 1 (paper: 1/4)."""
    if t < 1:
        raise ValueError(f"t counts from 1, got {t}")
    return min(1.0, c / t**exponent)


def expected_explorations(horizon: int, c: float, exponent: float = 0.25) -> float:
    """Expected number of explorations in `horizon` requests: the exact sum of the coins.

    For exponent 1/4 and c <= 1 this is close to the paper's `(4c/3) T^(3/4)`.
    """
    t = np.arange(1, horizon + 1, dtype=np.float64)
    return float(np.minimum(1.0, c / t**exponent).sum())


def update_queue(q: float, alpha: float, satisfaction: float) -> float:
    """Satisfaction queue: `Q <- max(0, Q + alpha - s)`, moved only when a label arrives."""
    return max(0.0, q + alpha - satisfaction)


def update_budget_queue(z: float, energy_j: float, budget_j: float) -> float:
    """Energy queue in units of the budget: `Z <- max(0, Z + E / B - 1)`."""
    return max(0.0, z + energy_j / budget_j - 1.0)


def objective(
    energy: np.ndarray,
    satisfaction: np.ndarray,
    *,
    q: float,
    v: float,
    alpha: float | None,
    z: float = 0.0,
    energy_j: np.ndarray | None = None,
    budget_j: float | None = None,
) -> np.ndarray:
    """Drift-plus-penalty cost per model (lower is better).

    With an SLA: `V * E_m + Q * (alpha - s_m)` (the paper). Without one (budget only) the
    penalty becomes `-V * s_m`. An energy budget adds `Z * (E_m / B - 1)` with `energy_j` in
    joules, so `energy` itself may be normalised.
    """
    cost = v * energy + q * (alpha - satisfaction) if alpha is not None else -v * satisfaction
    if budget_j is not None and z > 0.0:
        joules = energy if energy_j is None else energy_j
        cost = cost + z * (joules / budget_j - 1.0)
    return cost


def choose(
    cost: Sequence[float] | np.ndarray, allowed: Sequence[bool] | np.ndarray | None = None
) -> int:
    """Index of the cheapest-cost model; ties go to the cheaper model (lower index).

    Models outside `allowed` are skipped; if none is allowed the cheapest model is returned.
    Plain Python (`min` keeps the first of equal costs, as argmin does): a handful of models
    cost less than numpy's per-call overhead.
    """
    models = range(len(cost))
    if allowed is not None:
        models = [m for m in models if allowed[m]]
        if not models:
            return 0
    return min(models, key=cost.__getitem__)


def lagrangian_choice(energy: np.ndarray, satisfaction: np.ndarray, lam: float) -> np.ndarray:
    """Per-request argmin of `E_im - lam * s_im` (rows: requests; `energy` may be one row for
    all requests); ties to the cheaper model."""
    return np.argmin(np.atleast_2d(energy) - lam * satisfaction, axis=1)


def multiplier_for_target(
    energy: np.ndarray, satisfaction: np.ndarray, target: float, iterations: int = 24
) -> float:
    """Smallest multiplier whose per-request Lagrangian choice meets `target` on average.

    Bisection on `lam` (mean chosen satisfaction is non-decreasing in it); this is the dual of
    the single-constraint LP "min energy s.t. mean satisfaction >= target". Returns the upper
    bound when even the most satisfying choice misses the target.
    """
    rows = np.arange(satisfaction.shape[0])
    scale = float(energy.max() - energy.min()) or 1.0
    if satisfaction[rows, lagrangian_choice(energy, satisfaction, 0.0)].mean() >= target:
        return 0.0
    low, high = np.log(1e-4 * scale), np.log(1e4 * scale)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        chosen = lagrangian_choice(energy, satisfaction, float(np.exp(mid)))
        if satisfaction[rows, chosen].mean() >= target:
            high = mid
        else:
            low = mid
    return float(np.exp(high))


def first_upgrade_slope(energy: np.ndarray, satisfaction: np.ndarray) -> float:
    """Smallest `(E_m - E_0) / (s_m - s_0)` over models better than the cheapest one: the
    multiplier at which the cheapest model first loses (inf when no model is better)."""
    gain = satisfaction[1:] - satisfaction[0]
    cost = energy[1:] - energy[0]
    better = gain > 0
    if not better.any():
        return float("inf")
    return float((np.maximum(cost[better], 0.0) / gain[better]).min())
