"""Prometheus metrics of the HTTP front, with `prometheus_client` (one registry per app).

Two sources: what the front sees in the replies it relays (requests by model and outcome,
joules, queue/TTFT/total latency histograms: only a relay can histogram per request), and the
daemon's `stats` reply fetched at scrape time (satisfaction vs alpha, Q, queue depth, busy and
other errors, per-model energy and mix: the whole daemon, whichever client sent the request).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class DaemonCollector(Collector):
    """Families built from the last `stats` reply (set by the /metrics handler before each
    scrape); `edged_up` is 0 when the daemon did not answer."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None
        self.last_method: str | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edged_up", "1 when the daemon answered the scrape's stats call.")
        up.add_metric([], 1.0 if self.stats is not None else 0.0)
        yield up
        stats = self.stats
        if stats is None:
            return
        router = stats.get("router") or {}

        def gauge(name: str, help_: str, value: Any) -> Iterator[Metric]:
            if (number := _number(value)) is not None:
                family = GaugeMetricFamily(name, help_)
                family.add_metric([], number)
                yield family

        def counter(name: str, help_: str, value: Any) -> Iterator[Metric]:
            if (number := _number(value)) is not None:
                family = CounterMetricFamily(name, help_)
                family.add_metric([], number)
                yield family

        yield from gauge("edged_router_alpha", "Satisfaction target (SLA).", router.get("alpha"))
        yield from gauge("edged_router_satisfaction",
                         "Mean satisfaction of the routed requests labelled so far.",
                         router.get("mean_satisfaction"))
        yield from gauge("edged_router_q", "MESS+ virtual queue Q.", router.get("q"))
        yield from counter("edged_router_decisions", "Routing decisions (router t).",
                           router.get("t"))
        yield from counter("edged_router_explorations", "Decisions that explored.",
                           router.get("explorations"))
        yield from counter("edged_router_labels", "Labels learned for served models.",
                           router.get("labels"))
        yield from gauge("edged_queue_depth", "Generations waiting in the daemon's queue.",
                         stats.get("queue"))
        yield from gauge("edged_queue_size", "Queue capacity ([server] queue_size).",
                         stats.get("queue_size"))
        yield from gauge("edged_in_flight", "Generations queued or running.",
                         stats.get("in_flight"))
        yield from counter("edged_completed", "Generations answered by the daemon.",
                           stats.get("completed"))
        yield from gauge("edged_uptime_seconds", "Seconds since the daemon started.",
                         stats.get("uptime_s"))
        errors = stats.get("errors") or {}
        busy = CounterMetricFamily("edged_busy", "Requests the daemon refused as busy.")
        busy.add_metric([], float(errors.get("busy", 0)))
        yield busy
        family = CounterMetricFamily("edged_errors", "Error replies of the daemon by code.",
                                     labels=["code"])
        for code, n in sorted(errors.items()):
            if (number := _number(n)) is not None:
                family.add_metric([str(code)], number)
        yield family

        served = stats.get("models") or {}
        rmodels = router.get("models") or {}
        names = list(rmodels or served)
        per_model = (
            ("edged_model_calls", "counter", "Generations run per model (exploration included).",
             served, "calls"),
            ("edged_model_served", "counter", "Routed requests served per model.", rmodels,
             "served"),
            ("edged_model_energy_joules", "counter",
             "Joules measured per model, every run (served and exploration).", served,
             "joules"),
            ("edged_model_exploration_energy_joules", "counter",
             "Joules of exploration runs per model (part of the above).", served,
             "exploration_joules"),
            ("edged_model_mean_joules", "gauge", "Mean joules per measured run.", served,
             "mean_joules"),
            ("edged_model_satisfaction", "gauge", "Satisfied share of the model's labels.",
             served, "satisfaction"),
            ("edged_model_labels", "counter", "Labels received per model.", served, "labels"),
        )
        for name, kind, help_, source, key in per_model:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_, labels=["model"])
            for model in names:
                if (number := _number((source.get(model) or {}).get(key))) is not None:
                    family.add_metric([model], number)
            yield family
        info = InfoMetricFamily("edged_energy", "Energy meter: the daemon's backend and the "
                                "method of the last reply the front relayed.")
        info.add_metric([], {"backend": str(stats.get("energy_backend")),
                             "method": str(self.last_method or "unknown")})
        yield info


class Metrics:
    """The front's registry: relay observations plus the daemon's stats at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.daemon = DaemonCollector()
        self.registry.register(self.daemon)
        self.requests = Counter(
            "edged_http_requests", "Generations relayed by the HTTP front, by served model "
            "(the requested one on errors) and outcome (ok or the protocol's error code).",
            ["endpoint", "model", "outcome"], registry=self.registry)
        self.joules = Counter("edged_http_energy_joules",
                              "Joules of the replies relayed, by served model.", ["model"],
                              registry=self.registry)
        self.queue = Histogram("edged_http_queue_seconds", "Time queued in the daemon.",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("edged_http_ttft_seconds", "Daemon time to first token.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.total = Histogram("edged_http_request_seconds",
                               "Whole request as the front sees it (HTTP in to last byte).",
                               ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, endpoint: str, reply: dict[str, Any], seconds: float) -> None:
        """A successful generation relayed in `seconds`."""
        model = str(reply.get("model"))
        self.requests.labels(endpoint, model, "ok").inc()
        energy = reply.get("energy") or {}
        if (joules := _number(energy.get("joules"))) is not None and joules >= 0:
            self.joules.labels(model).inc(joules)
        if energy.get("method"):
            self.daemon.last_method = str(energy["method"])
        timing = reply.get("timing") or {}
        if (queue_ms := _number(timing.get("queue_ms"))) is not None:
            self.queue.labels(model).observe(queue_ms / 1000.0)
        if (ttft_ms := _number(timing.get("ttft_ms"))) is not None:
            self.ttft.labels(model).observe(ttft_ms / 1000.0)
        self.total.labels(model).observe(seconds)

    def failed(self, endpoint: str, model: str, code: str) -> None:
        self.requests.labels(endpoint, model, code).inc()

    def render(self, stats: dict[str, Any] | None) -> bytes:
        self.daemon.stats = stats
        return generate_latest(self.registry)
