"""`Router`: MESS+ decisions with a learned predictor, energy/latency estimates and two queues.

The router does no I/O apart from its own state file. The daemon calls `decide`, runs
`decision.run`, reports joules with `observe_energy`, and whenever (if ever) labels arrive,
`observe_labels`; the satisfaction queue moves only then.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.router import messplus
from edged.router.config import RouterConfig
from edged.router.estimates import EnergyHead, RunningStats
from edged.router.predictor import Features, Predictor
from edged.router.state import StateError, read_state, resize_ring, set_aside, write_state


class RouterError(ValueError):
    """Bad input to the router (unknown model, non-finite joules, label out of range)."""


@dataclass(frozen=True)
class Decision:
    """One routing decision and what the router needs to learn from it later.

    `run` lists the models to execute (several when exploring); `model` is the one to serve.
    `target` is the satisfaction target the queue uses for this request's label.
    """

    t: int
    model: str
    explored: bool
    run: tuple[str, ...]
    q: float
    z: float
    target: float | None
    predicted_satisfaction: dict[str, float]
    predicted_energy_j: dict[str, float]
    predicted_latency_s: dict[str, float]
    features: Features = field(repr=False, compare=False)
    #: chance that the top model ran beside the served one: agreement labels of the served
    #: model come only then, so the queue weighs them by its inverse (unbiased deficit)
    top_chance: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (msgpack/JSON), without the feature vector: the route explanation."""
        return {
            "t": self.t, "model": self.model, "explored": self.explored, "run": list(self.run),
            "q": self.q, "z": self.z, "target": self.target,
            "predicted_satisfaction": self.predicted_satisfaction,
            "predicted_energy_j": self.predicted_energy_j,
            "predicted_latency_s": self.predicted_latency_s,
        }


class Router:
    """MESS+ router over `names` (cheapest first)."""

    def __init__(
        self, names: Sequence[str], config: RouterConfig | None = None, *, embedding_dim: int = 0
    ) -> None:
        """`embedding_dim` > 0: every `decide` takes a dense embedding of the request (a
        sentence encoder's output, computed by the caller) beside its text."""
        names = tuple(names)
        if not names:
            raise RouterError("the router needs at least one model name")
        if len(set(names)) != len(names):
            raise RouterError(f"duplicate model names in {list(names)}")
        self.names = names
        self.config = config or RouterConfig()
        self._index = {name: i for i, name in enumerate(names)}
        if embedding_dim < 0:
            raise RouterError(f"embedding_dim must be >= 0, got {embedding_dim}")
        self.embedding_dim = embedding_dim
        cfg = self.config
        self.predictor = Predictor(
            len(names), dim_bits=cfg.dim_bits, extra_dim=embedding_dim,
            learning_rate=cfg.learning_rate,
            shared=cfg.shared_head, calibration=cfg.calibration,
            prior_strength=cfg.prior_strength, prior_step=cfg.prior_step,
            prior_floor=cfg.prior_floor, top_prior=cfg.top_prior, experts=cfg.experts,
        )
        self.energy = RunningStats(len(names))
        self.energy_head = EnergyHead(
            len(names), (1 << cfg.dim_bits) + embedding_dim, cfg.energy_learning_rate)
        self.latency = RunningStats(len(names))
        self.rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.t = 0
        self.q = 0.0
        self.debt = 0.0  # signed running deficit sum(target - s): the queue without the clip
        self.z = 0.0
        self.explorations = 0
        self.calls = np.zeros(len(names), dtype=np.int64)
        self.served = np.zeros(len(names), dtype=np.int64)
        self.served_labels = 0
        self.served_satisfaction = 0.0
        self.lam = 0.0  # LP prior multiplier (per normalised joule)
        self.recent = np.zeros((self.config.lp_window, len(names)))
        self.recent_energy = np.zeros((self.config.lp_window, len(names)))
        self.lam_t = 0

    # -- decisions ---------------------------------------------------------------------------

    def _energy_estimate(self, features: Features | None = None) -> np.ndarray:
        """Running means, times the energy head's per-request factor when `features` are given
        (and `energy_head` is on); models never measured get a placeholder rising with rank."""
        if features is not None and self.config.energy_head:
            est = self.energy_head.factors(features.idx, features.val)
            est *= self.energy.mean  # a fresh array: the product in place
        else:
            est = self.energy.mean.copy()
        if not self.energy.known():
            unknown = self.energy.count == 0
            scale = est[~unknown].max() if (~unknown).any() else 1.0
            ranks = np.arange(1, len(self.names) + 1) / len(self.names)
            est[unknown] = scale * ranks[unknown]
        return est

    def decide(
        self, text: str, deadline_ms: float | None = None, *, embedding: np.ndarray | None = None,
        exclude: Collection[str] = (),
    ) -> Decision:
        """Choose the model(s) for one request (`embedding`: see `__init__`). `exclude`: models
        that cannot run now (a remote tier in an outage): neither served nor explored, and
        nothing is learned about them; ignored when it would leave no model."""
        if not isinstance(text, str):
            raise RouterError(f"request text must be str, got {type(text).__name__}")
        if self.embedding_dim:
            if embedding is None:
                raise RouterError(f"this router needs a {self.embedding_dim}-dim embedding")
            embedding = np.asarray(embedding, dtype=np.float64)
            if embedding.shape != (self.embedding_dim,) or not np.isfinite(embedding).all():
                raise RouterError(
                    f"embedding must be {self.embedding_dim} finite numbers, got shape "
                    f"{embedding.shape}")
        elif embedding is not None:
            raise RouterError("this router was built without embeddings (embedding_dim=0)")
        if deadline_ms is not None and not (math.isfinite(deadline_ms) and deadline_ms > 0):
            raise RouterError(f"deadline_ms must be a positive number, got {deadline_ms!r}")
        unknown = set(exclude) - set(self.names) if exclude else None
        if unknown:
            raise RouterError(f"exclude names unknown models {sorted(unknown)}")
        cfg = self.config
        self.t += 1
        t = self.t
        features = self.predictor.featurize(text, embedding)
        sat = self.predictor.predict(features)
        energy_j = self._energy_estimate(features)
        latency_s = self.latency.mean + cfg.latency_sigma * self.latency.std()
        allowed = None
        if deadline_ms is not None:
            allowed = (self.latency.count == 0) | (latency_s * 1000.0 <= deadline_ms)
        if exclude:
            up = np.array([name not in exclude for name in self.names])
            if up.any():  # within the deadline if possible, else any model that is up
                allowed = up if allowed is None or not (allowed & up).any() else allowed & up
        target = None
        if cfg.alpha is not None:
            margin = cfg.margin * t**-cfg.margin_decay
            if cfg.margin_scaled:
                margin *= 2.0 * math.sqrt(cfg.alpha * (1.0 - cfg.alpha))
            target = min(1.0, cfg.alpha + margin + self._unlabelled_margin(cfg.alpha, t))
        row = t % len(self.recent)
        if cfg.V == "auto":  # one scale for every request, so per-request joules compare
            v = cfg.v_auto * t**cfg.v_growth
            scale = self._energy_estimate().max()
            energy = energy_j / scale if scale > 0 else energy_j
        else:
            v = float(cfg.V)
            energy = energy_j
        self.recent_energy[row] = energy
        if cfg.lp_current_rates:  # the text head's part only; rates are added when solving
            logit = self.recent[row]  # log(sat / (1 - sat)) - base, in place
            np.subtract(1.0, sat, out=logit)
            np.divide(sat, logit, out=logit)
            np.log(logit, out=logit)
            logit -= self.predictor._base
        else:
            self.recent[row] = sat
        # The rest is scalar work on a handful of models: plain floats and lists, whose
        # arithmetic rounds as numpy's does (no exp or log below).
        n = len(self.names)
        sat_list = sat.tolist()
        limit = n  # the choice takes one of the first `limit` (exploration: any)
        if cfg.ladder and target is not None:
            limit = self._ladder_cap(sat_list, target, t) + 1
            if allowed is not None and not allowed[:limit].any():
                limit = n
        pick = None if allowed is None else allowed[:limit]
        multiplier = self._multiplier(v)
        cost = messplus.objective(
            energy, sat, q=multiplier, v=v, alpha=target, z=self.z,
            energy_j=energy_j, budget_j=cfg.energy_budget_j,
        ).tolist()[:limit]
        choice = messplus.choose(cost, pick)
        # upward: no bonus below the choice, so none can move a choice at the last allowed rank
        if cfg.optimism and not (cfg.optimism_upward and choice + 1 >= limit):
            bonus = [cfg.optimism * u for u in self.predictor.uncertainty(t)[:limit]]
            if cfg.optimism_upward:
                bonus[: choice + 1] = [0.0] * (choice + 1)
            if any(bonus):  # the cost is linear in s: -multiplier per unit (-V without alpha)
                weight = multiplier if target is not None else v
                cost = [c - weight * b for c, b in zip(cost, bonus, strict=True)]
                choice = messplus.choose(cost, pick)
        ok = [True] * n if allowed is None else allowed.tolist()
        ok[choice] = True
        p_t = messplus.explore_probability(t, cfg.c, cfg.explore_exponent)
        top = n - 1
        top_chance = 1.0
        energy_list = energy_j.tolist()
        if not self.energy.known():  # cold start: measure every model once
            run_idx = [m for m in range(n) if ok[m]]
        elif cfg.explore_runs == "all":
            run_idx = [m for m in range(n) if ok[m]] if self.rng.random() < p_t else [choice]
            top_chance = 1.0 if choice == top else p_t
        else:
            chance = self._lean_probability(choice, energy_list, p_t)
            if cfg.label_need > 0.0:
                need = cfg.label_need / math.sqrt(1.0 + self.predictor.labels[choice])
                chance[-1] = max(chance[-1], min(1.0, need))
            draws = self.rng.random(n).tolist()
            run_idx = [m for m in range(n) if m == choice or (ok[m] and draws[m] < chance[m])]
            top_chance = 1.0 if choice == top else float(chance[top] if ok[top] else 0.0)
        explored = len(run_idx) > 1
        if explored:
            if cfg.explore_serves == "dearest":
                choice = run_idx[-1]  # serve the dearest model that ran, as the paper does
            self.explorations += 1
        for m in run_idx:
            self.calls[m] += 1
        self.served[choice] += 1
        names = self.names
        return Decision(
            t=t, model=names[choice], explored=explored,
            run=tuple(names[i] for i in run_idx), q=self.q, z=self.z, target=target,
            predicted_satisfaction=dict(zip(names, sat_list, strict=True)),
            predicted_energy_j=dict(zip(names, energy_list, strict=True)),
            predicted_latency_s=dict(zip(names, latency_s.tolist(), strict=True)),
            features=features, top_chance=top_chance,
        )

    def _unlabelled_margin(self, alpha: float, t: int) -> float:
        """Surplus for what no label shows: with a share rho of served requests labelled, the
        true mean of the unlabelled rest is only known to sqrt(alpha (1 - alpha) (1 - rho) /
        (rho T)); aiming `z / 2 * sqrt(alpha (1 - alpha) (1 - rho) / rho) / sqrt(t)` above
        alpha puts z of those standard errors between the final mean and alpha. 0 when every
        request is labelled (the deficit then corrects what it sees); at most halfway from
        alpha to 1 (with no labels at all nothing can be guaranteed; edged leans safe)."""
        z = self.config.unlabelled_z
        if not z or t < 2:
            return 0.0
        rho = min(1.0, max(self.served_labels, 1) / (t - 1))
        margin = 0.5 * z * math.sqrt(alpha * (1.0 - alpha) * (1.0 - rho) / rho / t)
        return min(margin, 0.5 * (1.0 - alpha))  # with next to no labels: halfway to 1

    def _ladder_cap(self, sat: list[float], target: float, t: int) -> int:
        """The dearest model the deficit may escalate to: the second cheapest, or past a model
        only while its predicted satisfaction for this request, plus a UCB width, is below the
        target (scalar math: hot path)."""
        rates = sat if self.config.ladder_per_request else self.predictor.rates.tolist()
        labels = self.predictor.labels.tolist()
        width = self.config.ladder_ucb * math.sqrt(math.log1p(t))
        cap = min(1, len(rates) - 1)
        while cap < len(rates) - 1:
            if rates[cap] + width / math.sqrt(labels[cap] + 2.0) >= target:
                break
            cap += 1
        return cap

    @staticmethod
    def _lean_probability(choice: int, energy_j: list[float], p_t: float) -> list[float]:
        """Cost-proportional exploration: run model k beside the choice with probability
        `min(1, p_t * E_choice / E_k)`, so each extra model costs about p_t of the request:
        cheaper models are checked often, dearer ones rarely."""
        spend = p_t * energy_j[choice]
        return [min(1.0, spend / max(e, 1e-12)) for e in energy_j]

    # -- feedback ----------------------------------------------------------------------------

    def _model(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise RouterError(f"unknown model {name!r}; the zoo is {list(self.names)}") from None

    @staticmethod
    def _number(what: str, name: str, value: float) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RouterError(f"{what} for {name!r} is not a number: {value!r}") from None
        if not (math.isfinite(number) and number >= 0.0):
            raise RouterError(f"{what} for {name!r} must be finite and >= 0, got {value!r}")
        return number

    def observe_energy(
        self,
        decision: Decision,
        energy_j: Mapping[str, float],
        latency_s: Mapping[str, float] | None = None,
    ) -> None:
        """Joules (and seconds) each model of `decision.run` took; updates running means."""
        checked = [(self._model(n), self._number("energy_j", n, v)) for n, v in energy_j.items()]
        timed = [
            (self._model(n), self._number("latency_s", n, v)) for n, v in (latency_s or {}).items()
        ]
        for m, joules in checked:
            if self.energy.count[m] and self.energy.mean[m] > 0:
                ratio = joules / self.energy.mean[m]
                self.energy_head.update(decision.features.idx, decision.features.val, m, ratio)
            self.energy.add(m, joules)
        for m, seconds in timed:
            self.latency.add(m, seconds)
        self._refresh_lp_prior()
        budget = self.config.energy_budget_j
        if budget is not None and checked:
            total = sum(joules for _, joules in checked)
            self.z = messplus.update_budget_queue(self.z, total, budget)

    _LP_EVERY = 16

    def _multiplier(self, v: float) -> float:
        """What weighs `alpha - s_m` against `V * E_m`: the paper's Q, or (edged) the LP prior
        plus the signed deficit, which may go negative so surplus satisfaction is spent."""
        if self.config.signed_queue:
            return max(0.0, v * self.lam + self.debt)
        return self.q + v * self.lam

    def _refresh_lp_prior(self) -> None:
        """Re-solve the LP prior on recent predictions every few requests (off the hot path)."""
        cfg = self.config
        if not cfg.lp_prior or cfg.alpha is None or self.t - self.lam_t < self._LP_EVERY:
            return
        self.lam_t = self.t
        # The decaying margin goes into the deficit only. The surplus for unlabelled requests
        # is planned here as well: with a share rho of requests labelled, the deficit moves
        # rho times as fast as with every label, too slowly to build that surplus by itself.
        target = min(1.0, cfg.alpha + self._unlabelled_margin(cfg.alpha, self.t))
        steps = np.arange(max(1, self.t - len(self.recent) + 1), self.t + 1) % len(self.recent)
        recent = self.recent[steps]  # plain predictions, no bonus
        energy = self.recent_energy[steps]
        if cfg.lp_current_rates:
            recent = 1.0 / (1.0 + np.exp(-(recent + self.predictor._base)))
        lam = messplus.multiplier_for_target(energy, recent, target)
        # Never let the prior alone go past the first upgrade from the cheapest model: when the
        # estimates say only a dear model meets alpha, the deficit has to show it first (an
        # early unlucky estimate would otherwise switch the whole stream to the dearest model).
        lam = min(lam, messplus.first_upgrade_slope(energy.mean(axis=0), recent.mean(axis=0)))
        self.lam = lam

    def observe_labels(
        self,
        decision: Decision,
        labels: Mapping[str, bool | float],
        replaces: Mapping[str, float] | None = None,
        weight: float = 1.0,
        pseudo: bool = False,
    ) -> None:
        """Satisfaction labels (True/False or in [0, 1]) for models that ran `decision`.

        Trains the predictor on every label; moves the queue with the served model's label (the
        queue moves only on labels: with sparse labels, see `_unlabelled_margin`). `replaces`:
        earlier labels of this request that these override (a real label after a pseudo-label):
        the queue and the served statistics take the new value instead of the old one.
        `weight`: how many served requests the served model's label stands for in the queue
        (1 / the chance it was labelled, for labels that come only with some exploration).
        `pseudo`: agreement or judge labels; with `queue_labels="real"` they teach the
        predictor only, and a real label counts with weight 1, as the request's first even
        where it replaces a pseudo-label.
        """
        if not (math.isfinite(weight) and weight > 0.0):
            raise RouterError(f"label weight must be finite and > 0, got {weight!r}")
        checked = []
        for name, value in labels.items():
            label = self._number("label", name, value)
            if label > 1.0:
                raise RouterError(f"label for {name!r} must be in [0, 1], got {value!r}")
            checked.append((self._model(name), label))
        experts = self.predictor.experts(decision.features) if self.config.calibration else None
        for m, label in checked:
            self.predictor.update(decision.features, m, label, experts)
        given = dict(checked)
        for m, label in checked:
            if m > 0 and m - 1 in given:
                self.predictor.observe_pair(m, label, given[m - 1])
        real_only = self.config.queue_labels == "real"
        if real_only:  # real labels come whether or not the request explored: no reweighting
            if pseudo:
                return
            weight = 1.0
        served = self._index[decision.model]
        for m, label in checked:
            if m != served:
                continue
            old = None if real_only else (replaces or {}).get(decision.model)
            if old is not None:  # the served statistics and the queue take the new value
                self.served_satisfaction += label - old
                self.debt += weight * (old - label)
                self.q = max(0.0, self.q + weight * (old - label))
                continue
            self._served_outcome(decision, label, weight)

    def observe_reference(self, decision: Decision) -> None:
        """The served model is the reference of the labels (the top model, with agreement as
        the source): its answer satisfies the agreement SLA by definition, so the request
        counts in the queue and the served satisfaction as a 1. Nothing is learned: it is not
        a label of the model's quality. A pseudo-label: ignored with `queue_labels="real"`."""
        if self.config.queue_labels == "real":
            return
        self._served_outcome(decision, 1.0, 1.0)

    def _served_outcome(self, decision: Decision, label: float, weight: float) -> None:
        self.served_labels += 1
        self.served_satisfaction += label
        if decision.target is not None:
            self.q = max(0.0, self.q + weight * (decision.target - label))
            self.debt += weight * (decision.target - label)

    def warm_start(
        self,
        texts: Sequence[str],
        labels: np.ndarray,
        energy_j: np.ndarray | None = None,
        latency_s: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
    ) -> None:
        """Pre-train predictor and estimates from a trace (rows: requests, columns: models;
        `embeddings`: one row per request when the router takes them)."""
        n = len(texts)
        shape = (n, len(self.names))
        for what, arr in (("labels", labels), ("energy_j", energy_j), ("latency_s", latency_s)):
            if arr is not None and np.shape(arr) != shape:
                raise RouterError(f"warm_start {what} has shape {np.shape(arr)}, need {shape}")
        for i, text in enumerate(texts):
            features = self.predictor.featurize(
                text, None if embeddings is None else embeddings[i])
            for m in range(len(self.names)):
                self.predictor.update(features, m, float(labels[i, m]))
                if energy_j is not None:
                    self.energy.add(m, float(energy_j[i, m]))
                if latency_s is not None:
                    self.latency.add(m, float(latency_s[i, m]))

    # -- state -------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "names": list(self.names), "dim_bits": self.config.dim_bits,
            "embedding_dim": self.embedding_dim, "t": self.t,
            "q": self.q, "z": self.z, "debt": self.debt, "lam": self.lam,
            "lam_t": self.lam_t,
            "explorations": self.explorations,
            "served_labels": self.served_labels, "served_satisfaction": self.served_satisfaction,
            "rng": self.rng.bit_generator.state, "config": self.config.to_dict(),
        }

    def save(self, path: str | Path) -> None:
        """Write the whole learning state atomically (temp file, fsync, rename)."""
        arrays = {
            **self.predictor.arrays(), **self.energy.arrays("energy"),
            **self.latency.arrays("latency"), "calls": self.calls, "served": self.served,
            "recent": self.recent, "recent_energy": self.recent_energy,
            **self.energy_head.arrays(),
        }
        write_state(Path(path), self._meta(), arrays)

    @classmethod
    def restore(
        cls,
        path: str | Path,
        names: Sequence[str],
        config: RouterConfig | None = None,
        *,
        embedding_dim: int = 0,
    ) -> Router:
        """Router from a state file, with `config` for its settings (learned state from the file).

        A missing file gives a fresh router. A corrupt or incompatible one (another zoo, another
        feature size, another format version) is moved aside and StateError is raised.
        """
        router = cls(names, config, embedding_dim=embedding_dim)
        path = Path(path)
        if not path.exists():
            return router
        expect = {"names": list(router.names), "dim_bits": router.config.dim_bits,
                  "embedding_dim": embedding_dim}
        meta, arrays = read_state(path, expect)
        try:
            router.predictor.load_arrays(arrays)
            router.energy.load_arrays("energy", arrays)
            router.latency.load_arrays("latency", arrays)
            for name in ("calls", "served"):
                if arrays[name].shape != (len(router.names),):
                    raise ValueError(f"{name} has shape {arrays[name].shape}")
            router.energy_head.load_arrays(arrays)
            # another lp_window migrates the rings instead of discarding the state
            router.recent = resize_ring(
                arrays["recent"], int(meta["t"]), len(router.recent), len(router.names))
            router.recent_energy = resize_ring(
                arrays["recent_energy"], int(meta["t"]), len(router.recent), len(router.names))
            router.calls = arrays["calls"].copy()
            router.served = arrays["served"].copy()
            router.t = int(meta["t"])
            router.q = float(meta["q"])
            router.z = float(meta["z"])
            router.debt = float(meta["debt"])
            router.lam = float(meta["lam"])
            router.lam_t = int(meta["lam_t"])
            router.explorations = int(meta["explorations"])
            router.served_labels = int(meta["served_labels"])
            router.served_satisfaction = float(meta["served_satisfaction"])
            router.rng.bit_generator.state = meta["rng"]
        except (KeyError, ValueError, TypeError) as exc:
            aside = set_aside(path)
            raise StateError(
                f"router state {path}: inconsistent ({type(exc).__name__}: {exc}); "
                f"moved aside to {aside}", aside,
            ) from exc
        return router

    def stats(self) -> dict[str, Any]:
        """Plain dict for `edged stats`."""
        labels = self.served_labels
        return {
            "t": self.t, "q": self.q, "debt": self.debt, "lam": self.lam, "z": self.z,
            "alpha": self.config.alpha,
            "energy_budget_j": self.config.energy_budget_j,
            "explorations": self.explorations,
            "explore_ratio": self.explorations / self.t if self.t else 0.0,
            "labels": labels,
            "mean_satisfaction": self.served_satisfaction / labels if labels else None,
            "models": {
                name: {
                    "calls": int(self.calls[m]), "served": int(self.served[m]),
                    "labels": int(self.predictor.labels[m]),
                    "energy_j": float(self.energy.mean[m]) if self.energy.count[m] else None,
                    "latency_s": float(self.latency.mean[m]) if self.latency.count[m] else None,
                }
                for m, name in enumerate(self.names)
            },
            "config": json.loads(json.dumps(self.config.to_dict())),
        }
