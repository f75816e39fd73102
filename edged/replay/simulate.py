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
    predictions: np.ndarray | None = None  # (K, 3) predicted probability, label, model index
    #: a router's forecasts at decision time, (N, M) each: satisfaction and joules per model
    predicted_satisfaction: np.ndarray | None = None
    predicted_energy_j: np.ndarray | None = None


#: Answer options per benchmark of the MESS+ traces: two wrong answers of a multiple-choice
#: question agree with probability 1 / (choices - 1) in the agreement model.
CHOICES = {
    "arc_challenge": 4, "arc_easy": 4, "boolq": 2, "mmlu_abstract_algebra": 4, "piqa": 2,
    "sciq": 4, "social_iqa": 3,
}


@dataclass(frozen=True)
class LabelModel:
    """Which labels the simulated router gets.

    source "reference": every model that ran is labelled with its true label, on a request
    with probability `sparsity` (1: always; the paper's feedback sparsity).
    source "agreement": the traces hold correctness, not answers, so agreement is simulated:
    when the top model ran, each other model that ran is labelled 1 if both were right, 0 if
    exactly one was, and, if both were wrong, 1 with probability 1 / (choices - 1) (two wrong
    answers of a `choices`-way question picked the same option). The top model gets no label.
    Real labels of the served model then also come with probability `sparsity` (0: none) and
    replace its pseudo-label.
    """

    source: str = "reference"
    sparsity: float = 1.0
    choices: int = 4  # for benchmarks missing from CHOICES

    def __post_init__(self) -> None:
        if self.source not in ("reference", "agreement"):
            raise ValueError(f"label source {self.source!r}: must be reference or agreement")
        if not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"label sparsity {self.sparsity!r} must be in [0, 1]")
        if self.choices < 2:
            raise ValueError(f"choices {self.choices!r} must be >= 2")


def run_router(
    trace: Trace,
    config: RouterConfig,
    labels: LabelModel | None = None,
    embeddings: np.ndarray | None = None,
) -> Outcome:
    """Drive a real `Router` through the trace in order, labelled as `labels` says (default:
    every run labelled). Satisfaction is always scored with the trace's true labels.
    `embeddings` (one row per request, in the trace's order) feed a router built for them."""
    labels = labels or LabelModel()
    dim = 0 if embeddings is None else embeddings.shape[1]
    router = Router(trace.models, config, embedding_dim=dim)
    n, m = trace.labels.shape
    sat = np.empty(n)
    energy = np.empty(n)
    ran = np.zeros((n, m))
    explored = np.zeros(n, dtype=bool)
    forecast_sat = np.empty((n, m))
    forecast_j = np.empty((n, m))
    preds: list[tuple[float, float, int]] = []
    names = trace.models
    kinds = trace.kind_of_rows()
    coin = np.random.default_rng(config.seed + 7919)
    for i, text in enumerate(trace.texts):
        decision = router.decide(text, embedding=None if embeddings is None else embeddings[i])
        idx = [names.index(name) for name in decision.run]
        served = names.index(decision.model)
        forecast_sat[i] = [decision.predicted_satisfaction[name] for name in names]
        forecast_j[i] = [decision.predicted_energy_j[name] for name in names]
        router.observe_energy(
            decision,
            {names[j]: trace.energy_j[i, j] for j in idx},
            {names[j]: trace.latency_s[i, j] for j in idx},
        )
        truth = trace.labels[i]
        sat[i] = truth[served]
        energy[i] = trace.energy_j[i, idx].sum()
        ran[i, idx] = 1.0
        explored[i] = decision.explored
        real = labels.sparsity >= 1.0 or coin.random() < labels.sparsity
        if labels.source == "reference":
            if real:
                for j in idx:
                    preds.append((decision.predicted_satisfaction[names[j]], truth[j], j))
                router.observe_labels(decision, {names[j]: truth[j] for j in idx})
            continue
        pseudo: dict[str, float] = {}
        top = m - 1
        labelled = labels.sparsity > 0.0 and real
        if served == top and not labelled:  # the served reply's own label counts instead
            router.observe_reference(decision)
        if top in idx:
            chance = 1.0 / (CHOICES.get(kinds[i], labels.choices) - 1)
            for j in idx:
                if j == top:
                    continue
                both_wrong = truth[j] < 0.5 and truth[top] < 0.5
                pseudo[names[j]] = float(
                    (truth[j] >= 0.5) == (truth[top] >= 0.5)
                    and (not both_wrong or coin.random() < chance))
            if pseudo:
                router.observe_labels(decision, pseudo, weight=1.0 / decision.top_chance,
                                      pseudo=True)
        if labelled:
            name = names[served]
            preds.append((decision.predicted_satisfaction[name], truth[served], served))
            old = pseudo.get(name)
            router.observe_labels(decision, {name: truth[served]},
                                  replaces=None if old is None else {name: old},
                                  weight=1.0 if old is None else 1.0 / decision.top_chance)
    return Outcome(sat, energy, ran, explored, np.array(preds).reshape(-1, 3), forecast_sat,
                   forecast_j)
