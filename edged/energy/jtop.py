"""Jetson rails through jtop (jetson-stats), for boards where the jtop service reads the sensors.

jetson-stats is AGPL, so it is imported only when this backend is named explicitly (never by
"auto"; the ina3221 backend reads the same sensors without it). Each jtop update pushes one
sample stamped on arrival; the integrator uses the instantaneous `power` of each rail, never
`avg` (jtop's running average, which would smear the window).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.energy.base import BackendUnavailable, EnergyReadError, check_number
from edged.energy.sampler import Clock, SampledMeter, SamplerConfig, Source

BACKEND = "jtop"
JTOP_SOCKET = Path("/run/jtop.sock")


@dataclass(frozen=True)
class JtopConfig(SamplerConfig):
    """interval_s: how often the jtop service pushes an update (its own rate, not ours)."""

    interval_s: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("interval_s", self.interval_s, low=0.01, high=60.0)


def jtop_present() -> tuple[bool, str]:
    """Whether jtop could work here, found without importing it."""
    if importlib.util.find_spec("jtop") is None:
        return False, "jetson-stats is not installed (pip install 'edged[jetson]')"
    if not JTOP_SOCKET.exists():
        return False, f"{JTOP_SOCKET} is absent: the jtop service is not running"
    return True, "jetson-stats installed and its service is running"


def _import_jtop() -> Callable[..., Any]:
    try:
        from jtop import jtop
    except ImportError as exc:
        raise BackendUnavailable(
            BACKEND, "jetson-stats is not installed (pip install 'edged[jetson]')"
        ) from exc
    return jtop


def _rails(power: Mapping[str, Any]) -> tuple[list[str], str | None]:
    rails = sorted(power.get("rail", {}))
    total = power.get("tot", {}).get("name")
    return rails + ([total] if total else []), total


class JtopSource(Source):
    """Push-only: samples arrive from jtop's thread."""

    on_demand = False

    def __init__(self, power: Mapping[str, Any]) -> None:
        channels, total = _rails(power)
        if not channels:
            raise BackendUnavailable(BACKEND, "jtop reports no power rails on this board")
        super().__init__(channels, total)

    def parse(self, power: Mapping[str, Any]) -> tuple[float, ...]:
        """Instantaneous mW per channel from jtop's `power` dict."""
        out = []
        for name in self.channels:
            entry = power.get("tot") if name == self.total else power.get("rail", {}).get(name)
            if not isinstance(entry, Mapping) or "power" not in entry:
                raise EnergyReadError(f"jtop update lacks the power of rail {name!r}")
            out.append(float(entry["power"]))
        return tuple(out)

    def read(self) -> tuple[float, ...]:
        raise EnergyReadError("jtop pushes its samples; it cannot be read on demand")


class JtopMeter(SampledMeter):
    """Jetson rails as jtop sees them; windows integrate jtop's pushed samples."""

    backend = BACKEND
    method = BACKEND

    def __init__(
        self,
        config: JtopConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        start: bool = True,
        jtop_factory: Callable[..., Any] | None = None,
    ) -> None:
        config = config or JtopConfig()
        factory = jtop_factory or _import_jtop()
        self._clock = clock
        self._jetson = factory(interval=config.interval_s)
        try:
            self._jetson.start()
        except Exception as exc:  # jtop raises its own JtopException, not importable here
            raise BackendUnavailable(BACKEND, f"cannot start jtop: {exc}") from exc
        try:
            source = JtopSource(self._jetson.power)
        except BaseException:
            self._jetson.close()
            raise
        self.scope = (
            f"whole module ({source.total} input rail)"
            if source.total
            else "sum of the rails jtop reports"
        )
        super().__init__(source, config, clock=clock, start=start)
        self._jetson.attach(self._on_update)

    def _on_update(self, jetson: Any) -> None:
        """jtop's observer: one sample per update, stamped now (jtop gives no timestamp)."""
        assert isinstance(self._source, JtopSource)
        t = self._clock()
        try:
            values = self._source.parse(jetson.power)
        except EnergyReadError as exc:
            self.sampler.record_error(exc)  # windows spanning it are marked approximate
            return
        with contextlib.suppress(EnergyReadError):  # counted by the sampler
            self.sampler.push(t, values)

    def _release(self) -> None:
        self._jetson.detach(self._on_update)
        super()._release()
        self._jetson.close()
