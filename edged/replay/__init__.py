"""Trace replay: run the router and baselines over MESS+ trace CSVs and compare them."""

from edged.replay.runner import DEFAULT_ALPHA, EDGED, BenchmarkResult, run_benchmark
from edged.replay.simulate import Outcome, run_router
from edged.replay.trace import (
    Trace,
    TraceError,
    find_traces,
    load_trace,
    mix_traces,
    stream_order,
)

__all__ = [
    "DEFAULT_ALPHA",
    "EDGED",
    "BenchmarkResult",
    "Outcome",
    "Trace",
    "TraceError",
    "find_traces",
    "load_trace",
    "mix_traces",
    "run_benchmark",
    "run_router",
    "stream_order",
]
