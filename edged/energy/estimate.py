"""An honest estimate where no sensor exists: CPU time spent in the window times watts per core.

joules = cpu_seconds * watts_per_core + idle_w * window_s, dynamic = the CPU part. Every record
says method="estimate" and approximate=True: it is a model of the machine, not a measurement.
scope="process" counts every thread of this process (onnxruntime's pool included), so two
concurrent windows both see each other's work; scope="thread" counts only the calling thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edged.energy.base import (
    EnergyConfigError,
    EnergyMeter,
    EnergyReadError,
    EnergyRecord,
    check_number,
)

BACKEND = "estimate"


@dataclass(frozen=True)
class EstimateConfig:
    """watts_per_core: power of one fully busy core above idle (a guess: set it for your CPU).
    idle_w: power drawn anyway, charged per second of window. scope: "process" or "thread"."""

    watts_per_core: float = 5.0
    idle_w: float = 0.0
    scope: str = "process"

    def __post_init__(self) -> None:
        check_number("watts_per_core", self.watts_per_core, low=0.0, high=1000.0)
        check_number("idle_w", self.idle_w, low=0.0, high=1e6)
        if self.scope not in ("process", "thread"):
            raise EnergyConfigError(
                f'energy option scope must be "process" or "thread", got {self.scope!r}'
            )


@dataclass(frozen=True)
class _Mark:
    t: float
    cpu_s: float
    thread: int


class EstimateMeter(EnergyMeter):
    """CPU-time x watts-per-core model; needs no hardware, never claims to measure."""

    backend = BACKEND

    def __init__(
        self,
        config: EstimateConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__()
        self._config = config or EstimateConfig()
        self._clock = clock
        thread_scope = self._config.scope == "thread"
        self._cpu = cpu_clock or (time.thread_time if thread_scope else time.process_time)
        self.scope = (
            f"model: CPU time of the {self._config.scope} x {self._config.watts_per_core} W/core"
            f" + {self._config.idle_w} W idle"
        )
        self._lock = threading.Lock()
        self._last = self._mark()

    @property
    def channels(self) -> tuple[str, ...]:
        return ("cpu",)

    def _mark(self) -> _Mark:
        return _Mark(self._clock(), self._cpu(), threading.get_ident())

    def _measure(self, start: _Mark, end: _Mark) -> EnergyRecord:
        if self._config.scope == "thread" and start.thread != end.thread:
            raise EnergyReadError(
                "a thread-scope estimate window must open and close in the same thread"
            )
        window_s = max(0.0, end.t - start.t)
        cpu_s = max(0.0, end.cpu_s - start.cpu_s)
        dynamic = cpu_s * self._config.watts_per_core
        return EnergyRecord(
            joules=dynamic + self._config.idle_w * window_s,
            dynamic_joules=dynamic,
            per_rail_j={},
            window_s=window_s,
            method=BACKEND,
            approximate=True,
            samples=0,
        )

    def power_w(self) -> dict[str, float]:
        """Modelled power since the previous call (CPU share of this process x W/core)."""
        now = self._mark()
        with self._lock:
            last, self._last = self._last, now
        dt = now.t - last.t
        if dt <= 0:
            return {}
        cpu_w = max(0.0, now.cpu_s - last.cpu_s) / dt * self._config.watts_per_core
        return {"cpu": cpu_w, "total": cpu_w + self._config.idle_w}
