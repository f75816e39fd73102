"""What the live status page shows: the last decisions and running series the front relayed,
plus the daemon's `stats` (the whole daemon's mix, energy per model, satisfaction, Q).

The page itself (`status.html`) is one self-contained file, no CDN (the device may be offline):
it polls `/status.json` and draws with inline SVG.
"""

from __future__ import annotations

import time
from collections import deque
from functools import cache
from importlib import resources
from typing import Any

MAX_DECISIONS = 20
MAX_POINTS = 500


@cache
def page() -> bytes:
    """The status page's HTML, read once from the package."""
    return resources.files("edged.http").joinpath("status.html").read_bytes()


class StatusLog:
    """Bounded in-memory log of relayed generations: decisions and running series."""

    def __init__(self) -> None:
        self.decisions: deque[dict[str, Any]] = deque(maxlen=MAX_DECISIONS)
        self.q_series: deque[tuple[int, float]] = deque(maxlen=MAX_POINTS)
        self.sat_series: deque[tuple[int, float]] = deque(maxlen=MAX_POINTS)
        self._by_id: dict[str, dict[str, Any]] = {}
        self._labelled = 0
        self._satisfied = 0
        self.relayed = 0

    def record(self, reply: dict[str, Any]) -> None:
        """One finished generation: a decision row, a Q point, a satisfaction point if labelled."""
        self.relayed += 1
        route = reply.get("route") or {}
        energy = reply.get("energy") or {}
        model = reply.get("model")
        row = {
            "time": time.time(), "id": reply.get("id"), "model": model,
            "routed": bool(route.get("routed")), "explored": bool(route.get("explored")),
            "predicted_satisfaction": (route.get("predicted_satisfaction") or {}).get(model),
            "predicted_joules": (route.get("predicted_energy_j") or {}).get(model),
            "joules": energy.get("joules"), "method": energy.get("method"),
            "q": route.get("q"), "label": (reply.get("labels") or {}).get(model),
            "text": str(reply.get("text", ""))[:80],
        }
        if len(self.decisions) == self.decisions.maxlen:
            self._by_id.pop(str(self.decisions[0]["id"]), None)
        self.decisions.append(row)
        self._by_id[str(row["id"])] = row
        if route.get("routed") and isinstance(route.get("q"), (int, float)):
            self.q_series.append((int(route.get("t", self.relayed)), float(route["q"])))
        if row["label"] is not None:
            self._label(bool(row["label"]))

    def feedback(self, request_id: str, labels: dict[str, Any]) -> None:
        """A label that came later through `/v1/feedback`."""
        row = self._by_id.get(request_id)
        if row is not None and row["label"] is None and row["model"] in labels:
            row["label"] = bool(labels[row["model"]])
            self._label(row["label"])

    def _label(self, satisfied: bool) -> None:
        self._labelled += 1
        self._satisfied += int(satisfied)
        self.sat_series.append((self._labelled, self._satisfied / self._labelled))

    def snapshot(self, stats: dict[str, Any] | None) -> dict[str, Any]:
        """`/status.json`: the daemon's numbers (None when it did not answer) and the log."""
        router = (stats or {}).get("router") or {}
        served = (stats or {}).get("models") or {}
        rmodels = router.get("models") or {}
        models = [{
            "name": name,
            "served": (rmodels.get(name) or {}).get("served", 0),
            "calls": (served.get(name) or {}).get("calls", 0),
            "mean_joules": (served.get(name) or {}).get("mean_joules"),
            "satisfaction": (served.get(name) or {}).get("satisfaction"),
        } for name in (rmodels or served)]
        return {
            "daemon_up": stats is not None,
            "alpha": router.get("alpha"), "satisfaction": router.get("mean_satisfaction"),
            "q": router.get("q"), "t": router.get("t"), "labels": router.get("labels"),
            "queue": (stats or {}).get("queue"), "queue_size": (stats or {}).get("queue_size"),
            "in_flight": (stats or {}).get("in_flight"),
            "energy_backend": (stats or {}).get("energy_backend"),
            "busy": ((stats or {}).get("errors") or {}).get("busy", 0),
            "models": models,
            "relayed": self.relayed,
            "front_satisfaction": [list(p) for p in self.sat_series],
            "q_series": [list(p) for p in self.q_series],
            "decisions": list(reversed(self.decisions)),
        }
