"""Replay one policy over one shuffled trace: per-request served satisfaction and joules.

Every policy yields an `Outcome`: what was served (satisfaction of the served answer), the joules
of every model run for the request (exploration included), and which models ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edged.replay.trace import Trace
from edged.router import Router, RouterConfig


@dataclass(frozen=True)
class Outcome:
    """Per-request arrays of one policy on one ordering of a trace."""

    satisfaction: np.ndarray  # (N,) label of the served answer (fractional for the LP oracle)
    energy_j: np.ndarray  # (N,) joules of everything run for the request
    ran: np.ndarray  # (N, M) fraction of each model run per request
    explored: np.ndarray  # (N,) bool
    predictions: np.ndarray | None = None  # (K, 2) predicted probability, label (calibration)


def run_router(
    trace: Trace,
    config: RouterConfig,
    label_rate: float = 1.0,
    embeddings: np.ndarray | None = None,
) -> Outcome:
    """Drive a real `Router` through the trace in order; labels arrive with `label_rate`.
    `embeddings` (one row per request, in the trace's order) feed a router built for them."""
    dim = 0 if embeddings is None else embeddings.shape[1]
    router = Router(trace.models, config, embedding_dim=dim)
    n, m = trace.labels.shape
    sat = np.empty(n)
    energy = np.empty(n)
    ran = np.zeros((n, m))
    explored = np.zeros(n, dtype=bool)
    preds: list[tuple[float, float]] = []
    names = trace.models
    label_coin = np.random.default_rng(config.seed + 7919)
    for i, text in enumerate(trace.texts):
        decision = router.decide(text, embedding=None if embeddings is None else embeddings[i])
        idx = [names.index(name) for name in decision.run]
        served = names.index(decision.model)
        router.observe_energy(
            decision,
            {names[j]: trace.energy_j[i, j] for j in idx},
            {names[j]: trace.latency_s[i, j] for j in idx},
        )
        sat[i] = trace.labels[i, served]
        energy[i] = trace.energy_j[i, idx].sum()
        ran[i, idx] = 1.0
        explored[i] = decision.explored
        if label_rate >= 1.0 or label_coin.random() < label_rate:
            labels = {names[j]: trace.labels[i, j] for j in idx}
            for j in idx:
                preds.append((decision.predicted_satisfaction[names[j]], trace.labels[i, j]))
            router.observe_labels(decision, labels)
    return Outcome(sat, energy, ran, explored, np.array(preds).reshape(-1, 2))
