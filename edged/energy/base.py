"""The meter interface: the public record, windows that nest and overlap, and typed errors.

A meter turns "the energy spent between two instants" into an `EnergyRecord`. Windows are plain
pairs of marks on the meter's cumulative-energy curve, so any number of them may be open at once,
nested (a request inside a daemon-lifetime window) or overlapping (two workers), from any thread.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

ROOT_HINT = (
    "run edged as root, or grant the daemon CAP_DAC_READ_SEARCH "
    "(systemd: AmbientCapabilities=CAP_DAC_READ_SEARCH), or add a udev rule that makes the file "
    "readable by edged's group"
)


class EnergyError(Exception):
    """Base class of every error of the energy layer."""


class BackendUnavailable(EnergyError):
    """A backend cannot run on this machine; `reason` says why in words a user can act on."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"energy backend {backend!r} is unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class PermissionDenied(BackendUnavailable):
    """The sensor exists but this process may not read it (RAPL is root-only since Linux 5.10)."""

    def __init__(self, backend: str, path: str, hint: str = ROOT_HINT) -> None:
        super().__init__(backend, f"permission denied reading {path}: {hint}")
        self.path = path


class EnergyConfigError(EnergyError, ValueError):
    """An option given to a meter has a wrong name, type or value."""


class EnergyReadError(EnergyError):
    """A sensor read failed or returned nonsense while measuring (never reported as 0 J)."""


class WindowError(EnergyError):
    """A window was misused: read before it closed, opened or closed twice."""


class MeterClosedError(EnergyError):
    """The meter was closed before (or while) the window used it."""


def check_number(
    name: str, value: object, *, low: float, high: float = math.inf, integer: bool = False
) -> float:
    """`value` as a float in [low, high], else an `EnergyConfigError` naming the option."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (low <= value <= high):  # type: ignore[operator]
        raise EnergyConfigError(
            f"energy option {name} must be {kind} in [{low}, {high}], got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EnergyRecord:
    """Energy spent in one window: what the daemon puts on the wire (see `to_dict`).

    `joules` is the backend's total scope (module input, GPU, CPU package...); `dynamic_joules`
    is the part above the idle baseline. `per_rail_j` is the breakdown per rail or device; it may
    hold the module-input rail beside the rails it feeds, so do not sum it. `approximate` is true
    when the window is too short for the sensor's resolution or the value is an estimate.

    `attribution` says how `joules` was assigned to this window when it was opened for a device
    (`meter.window(device=...)`): "exclusive" (no other device window overlapped it on its
    channels), "split-active-time" (energy of the intervals shared with other device windows
    divided equally among the windows open then; approximate), "overlap-unsplit" (overlapped,
    but this meter cannot split: approximate). `scope_channels` lists the channels `joules`
    covers (empty: the meter's whole scope).
    """

    joules: float
    dynamic_joules: float
    per_rail_j: dict[str, float] = field(default_factory=dict)
    window_s: float = 0.0
    method: str = ""
    approximate: bool = True
    samples: int = 0
    attribution: str = "exclusive"
    scope_channels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for msgpack/JSON."""
        return {
            "attribution": self.attribution,
            "scope_channels": list(self.scope_channels),
            "joules": float(self.joules),
            "dynamic_joules": float(self.dynamic_joules),
            "method": self.method,
            "approximate": bool(self.approximate),
            "per_rail_j": {str(k): float(v) for k, v in self.per_rail_j.items()},
            "window_s": float(self.window_s),
            "samples": int(self.samples),
        }


class EnergyWindow:
    """One measured interval. Use as a context manager, or call `open()` and `close()`.

    Read failures never escape `__exit__` (they would mask the body's own exception and lose the
    reply); they are kept and raised by `record`, so the caller decides what to do.
    """

    def __init__(self, meter: EnergyMeter, device: str | None = None) -> None:
        self._meter = meter
        self._device = device
        self._span: Span | None = None
        self._lock = threading.Lock()
        self._start: Any = None
        self._opened = False
        self._closed = False
        self._record: EnergyRecord | None = None
        self._error: EnergyError | None = None

    def open(self) -> EnergyWindow:
        with self._lock:
            if self._opened:
                raise WindowError("window opened twice: create a new window per measurement")
            self._opened = True
            try:
                self._check_meter()
                self._start = self._meter._mark()
                if self._device is not None:
                    self._span = self._meter._open_span(self._device, self._start)
            except EnergyError as exc:
                self._error = exc
        return self

    def close(self) -> None:
        with self._lock:
            if not self._opened:
                raise WindowError("window closed before it was opened")
            if self._closed:
                raise WindowError("window closed twice")
            self._closed = True
            span, meter = self._span, self._meter
            try:
                if self._error is not None:
                    return
                try:
                    self._check_meter()
                    end = meter._mark()
                    if span is None:
                        self._record = meter._measure(self._start, end)
                    else:
                        others = meter._close_span(span, meter._mark_time(end))
                        self._record = meter._measure_attributed(self._start, end, span, others)
                except EnergyError as exc:
                    self._error = exc
            finally:
                if span is not None and span.t1 is None:  # failed: stop counting it as open
                    meter._close_span(span, span.t0)

    def _check_meter(self) -> None:
        if self._meter.closed:
            raise MeterClosedError(f"{self._meter.backend} meter was closed during the window")

    def __enter__(self) -> EnergyWindow:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def error(self) -> EnergyError | None:
        """The error that spoiled this window, if any (`record` raises it)."""
        return self._error

    @property
    def record(self) -> EnergyRecord:
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._record is None:
                raise WindowError("window is still open: read `record` after the with-block")
            return self._record


@dataclass(eq=False)
class Span:
    """An open (t1 None) or closed device window, for splitting shared channels."""

    t0: float
    t1: float | None
    #: channels it claims; None: the meter's whole scope
    channels: frozenset[str] | None

    def shares(self, other: Span) -> bool:
        if self.channels is None or other.channels is None:
            return True
        return bool(self.channels & other.channels)


class EnergyMeter(ABC):
    """One family of energy sensors. Subclasses provide marks and the record between two marks.

    Windows opened for a device (`window(device=...)`) are attributed: each covers the channels
    `device_channels(device)` names, and where several device windows overlap on a channel, the
    energy of the overlap is split equally among the windows open at each instant.
    """

    #: backend name, as `create_meter` knows it
    backend: str = ""
    #: what the joules cover, in words (GPU only, whole module, CPU package...)
    scope: str = ""

    def __init__(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()
        self._spans_lock = threading.Lock()
        self._spans: list[Span] = []  # open device windows, and closed ones that overlap them

    def window(self, device: str | None = None) -> EnergyWindow:
        """A new, unopened window (`with meter.window() as w:` opens it). With `device`, its
        joules cover that device's channels and are attributed among overlapping device windows;
        without, the whole scope, unsplit (nested and enclosing windows)."""
        if self._closed:
            raise MeterClosedError(f"{self.backend} meter is closed: no new windows")
        if device is not None and not self.covers(device):
            raise WindowError(f"the {self.backend} meter does not measure device {device!r}")
        return EnergyWindow(self, device)

    def device_channels(self, device: str) -> tuple[str, ...] | None:
        """The channels that carry `device`'s energy: None for the whole scope (one scope for
        every device: whole-board or host meters), () when this meter does not see it."""
        return None

    def covers(self, device: str) -> bool:
        """Whether this meter sees `device` at all."""
        return self.device_channels(device) != ()

    def _mark_time(self, mark: Any) -> float:
        return float(getattr(mark, "t", mark))

    def _open_span(self, device: str, start: Any) -> Span:
        names = self.device_channels(device)
        span = Span(self._mark_time(start), None, None if names is None else frozenset(names))
        with self._spans_lock:
            self._spans.append(span)
        return span

    def _close_span(self, span: Span, t1: float) -> list[Span]:
        """Close `span`; return the other spans that overlapped it on a shared channel."""
        with self._spans_lock:
            span.t1 = max(t1, span.t0)
            others = [
                o for o in self._spans
                if o is not span and o.t0 < span.t1 and (o.t1 is None or o.t1 > span.t0)
                and o.shares(span)
            ]
            live = [o.t0 for o in self._spans if o.t1 is None]
            oldest = min(live) if live else math.inf
            self._spans = [o for o in self._spans if o.t1 is None or o.t1 > oldest]
        return others

    def _measure_attributed(
        self, start: Any, end: Any, span: Span, others: Sequence[Span]
    ) -> EnergyRecord:
        """A device window's record; meters that can integrate sub-intervals split overlaps."""
        record = self._measure(start, end)
        if not others:
            return record
        return replace(record, approximate=True, attribution="overlap-unsplit")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    @abstractmethod
    def channels(self) -> tuple[str, ...]:
        """Names of the rails/devices this meter reports in `per_rail_j` and `power_w`."""

    @abstractmethod
    def power_w(self) -> dict[str, float]:
        """Recent power per channel in watts (for `edged energy watch`), plus "total"."""

    @abstractmethod
    def _mark(self) -> Any:
        """A point on this meter's energy curve, taken now (thread-safe)."""

    @abstractmethod
    def _measure(self, start: Any, end: Any) -> EnergyRecord:
        """The record between two marks (thread-safe)."""

    def _release(self) -> None:  # noqa: B027 - optional hook, most meters hold nothing
        """Free sensors, threads and handles; called once by `close`."""

    def close(self) -> None:
        """Stop sampling and free the sensor; later windows fail with `MeterClosedError`."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.backend} {state} channels={list(self.channels)}>"


class NullMeter(EnergyMeter):
    """Energy disabled: every record says so with NaN joules, never a believable 0 J."""

    backend = "none"
    scope = "nothing (energy measurement disabled)"

    @property
    def channels(self) -> tuple[str, ...]:
        return ()

    def power_w(self) -> dict[str, float]:
        return {}

    def _mark(self) -> float:
        return time.monotonic()

    def _measure(self, start: float, end: float) -> EnergyRecord:
        return EnergyRecord(
            joules=math.nan,
            dynamic_joules=math.nan,
            per_rail_j={},
            window_s=end - start,
            method="none",
            approximate=True,
            samples=0,
        )
