"""Background sampling: a ring of timestamped samples, each channel's running energy, idle power.

Every sample carries the cumulative energy of each channel since the sampler started: built from
trapezoids for power sensors (mW), or the counter itself for energy counters (mJ). A window is two
points on that curve, so windows of any length, nested or overlapping, cost O(1) to close and do
not depend on the ring's size; the ring serves integration over arbitrary recent spans, live power
and the idle baseline. Sources that can be read on demand are read at each window edge, so edges
are exact; push-only sources (jtop) get edges interpolated from the next sample or held from the
last one.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import ClassVar

from edged.energy.base import (
    EnergyConfigError,
    EnergyError,
    EnergyMeter,
    EnergyReadError,
    EnergyRecord,
    Span,
    check_number,
)

log = logging.getLogger("edged.energy")

Clock = Callable[[], float]
#: windows whose extrapolated edges exceed this fraction of their length are approximate
HELD_FRACTION = 0.1


@dataclass(frozen=True)
class SamplerConfig:
    """Options shared by every sampled backend.

    period_s: sampling period (default 50 ms = 20 Hz). ring_s: seconds of samples kept for live
    power and span integration. idle_w: a fixed idle power in W; None tracks it as the lowest
    1-second mean of the total over the last idle_horizon_s. min_intervals: windows with fewer
    sample intervals than this are marked approximate.
    """

    period_s: float = 0.05
    ring_s: float = 120.0
    idle_w: float | None = None
    idle_horizon_s: float = 600.0
    min_intervals: int = 4

    def __post_init__(self) -> None:
        check_number("period_s", self.period_s, low=0.001, high=60.0)
        check_number("ring_s", self.ring_s, low=2 * self.period_s, high=86400.0)
        if self.idle_w is not None:
            check_number("idle_w", self.idle_w, low=0.0, high=1e6)
        check_number("idle_horizon_s", self.idle_horizon_s, low=1.0, high=30 * 86400.0)
        check_number("min_intervals", self.min_intervals, low=1, high=1e6, integer=True)


@dataclass(frozen=True)
class SysfsConfig(SamplerConfig):
    """sysfs_root: where sysfs is mounted (tests point it at a fake tree)."""

    sysfs_root: str = "/sys"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sysfs_root, (str, os.PathLike)):
            raise EnergyConfigError(
                f"energy option sysfs_root must be a path, got {self.sysfs_root!r}"
            )


class Source(ABC):
    """A sensor family's reader. `read()` is never called from two threads at once.

    kind "power": read() returns instantaneous power per channel in mW.
    kind "energy": read() returns cumulative energy per channel in mJ, monotonic (wraparound
    already unfolded by the source).
    """

    kind: ClassVar[str] = "power"
    #: False for push-only sources (samples arrive through `Sampler.push`)
    on_demand: ClassVar[bool] = True

    def __init__(self, channels: Sequence[str], total: str | None) -> None:
        if not channels:
            raise EnergyConfigError("an energy source needs at least one channel")
        if total is not None and total not in channels:
            raise EnergyConfigError(f"total channel {total!r} is not among {list(channels)}")
        self.channels = tuple(channels)
        self.total = total

    @abstractmethod
    def read(self) -> tuple[float, ...]:
        """One reading per channel (mW or cumulative mJ, see `kind`)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free file descriptors or library handles."""


@dataclass
class Anchor:
    """A point on the cumulative-energy curve: a window edge."""

    t: float
    seq: int
    errors: int
    energy_mj: tuple[float, ...] | None
    #: zero-order-hold extrapolation from the last sample (push-only sources), and its span
    held_mj: tuple[float, ...] | None = None
    held_s: float = 0.0


class IdleTracker:
    """Idle power: the lowest 1-second mean of the total over the last `horizon_s` seconds.

    Each bin's mean is weighted by time (energy over seconds covered), not by sample: a window
    edge takes a reading a millisecond after the last one, and a coarse counter (RAPL, NVML)
    usually shows no change over that millisecond; counted per sample, such zero-power slivers
    dragged the baseline towards 0 W whenever windows opened and closed often. A bin that covers
    less than `min_cover` of its second does not count. A minimum of short means, not of single
    intervals, so one noisy reading does not set it; a trailing horizon, so it follows slow
    drifts (temperature, DVFS policy). A fixed value wins.
    """

    def __init__(
        self,
        horizon_s: float = 600.0,
        *,
        fixed_w: float | None = None,
        bin_s: float = 1.0,
        min_cover: float = 0.5,
    ) -> None:
        self._horizon_s = horizon_s
        self._fixed_w = fixed_w
        self._bin_s = bin_s
        self._min_span_s = min_cover * bin_s
        self._bins: deque[tuple[float, float]] = deque()
        self._bin: int | None = None
        self._energy_j = 0.0
        self._span_s = 0.0

    def add(self, t: float, mean_w: float, dt_s: float) -> None:
        """One interval of `dt_s` seconds ending at `t`, at mean power `mean_w`."""
        if dt_s <= 0:
            return
        index = math.floor(t / self._bin_s)
        if self._bin is not None and index != self._bin and self._span_s > 0:
            if self._span_s >= self._min_span_s:
                self._bins.append((self._bin * self._bin_s, self._energy_j / self._span_s))
            self._energy_j, self._span_s = 0.0, 0.0
            while self._bins and self._bins[0][0] < t - self._horizon_s:
                self._bins.popleft()
        self._bin = index
        self._energy_j += mean_w * dt_s
        self._span_s += dt_s

    def idle_w(self) -> float | None:
        """The baseline in W, or None before the first interval."""
        if self._fixed_w is not None:
            return self._fixed_w
        if self._bins:
            return min(mean for _, mean in self._bins)
        return self._energy_j / self._span_s if self._span_s > 0 else None


class Sampler:
    """Samples one source in a daemon thread (or takes pushed samples) into a ring buffer."""

    def __init__(
        self,
        source: Source,
        config: SamplerConfig,
        *,
        clock: Clock = time.monotonic,
        name: str = "edged-energy-sampler",
    ) -> None:
        self._source = source
        self._config = config
        self._clock = clock
        self._name = name
        self._n = len(source.channels)
        self._total = source.channels.index(source.total) if source.total is not None else None
        self._cap = max(16, math.ceil(config.ring_s / config.period_s) + 1)
        self._t: list[float] = [0.0] * self._cap
        self._p: list[tuple[float, ...]] = [()] * self._cap
        self._e: list[tuple[float, ...]] = [()] * self._cap
        self._head = 0  # next slot to write
        self._count = 0
        self._seq = 0
        self._errors = 0
        self.last_error: BaseException | None = None
        self._pending: list[Anchor] = []
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._idle = IdleTracker(config.idle_horizon_s, fixed_w=config.idle_w)
        #: per-channel baselines, for windows scoped to some channels (several devices)
        self._idle_ch = [IdleTracker(config.idle_horizon_s) for _ in range(self._n)]
        #: added to an energy counter's raw values since it was re-based after a reset
        self._offset_mj = (0.0,) * self._n
        self.resets = 0
        self._stop = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the polling thread (push-only sources need none)."""
        if self._thread is not None or not self._source.on_demand:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then close the source under the read lock (no read in flight)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._read_lock:
            if not self._stopped:
                self._stopped = True
                self._source.close()

    def _run(self) -> None:
        period = self._config.period_s
        next_t = time.monotonic()
        while True:
            next_t += period
            delay = next_t - time.monotonic()
            if delay < 0:  # fell behind (suspend, long read): restart the grid, no burst
                next_t, delay = time.monotonic(), 0.0
            if self._stop.wait(delay):
                return
            with contextlib.suppress(EnergyError):  # counted; spanning windows turn approximate
                self.poll()

    # --- taking samples --------------------------------------------------------------------

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def sample_count(self) -> int:
        """Samples taken since start (the ring keeps the most recent ones)."""
        return self._seq

    def poll(self) -> Anchor:
        """Read the source now, store the sample and return it as an anchor."""
        with self._read_lock:
            if self._stopped:
                raise EnergyReadError(f"{self._name} is stopped: the meter was closed")
            try:
                values = self._source.read()
            except Exception as exc:
                raise self.record_error(exc) from exc
            t = self._clock()
            with self._lock:
                try:
                    self._insert(t, values)
                except EnergyReadError as exc:
                    raise self.record_error(exc, locked=True) from exc
                last = (self._head - 1) % self._cap
                return Anchor(self._t[last], self._seq, self._errors, self._e[last])

    def push(self, t: float, values: Sequence[float]) -> None:
        """Store a sample taken elsewhere (push-only sources); stale timestamps are dropped."""
        with self._lock:
            try:
                self._insert(t, values)
            except EnergyReadError as exc:
                raise self.record_error(exc, locked=True) from exc

    def record_error(self, exc: BaseException, *, locked: bool = False) -> EnergyReadError:
        """Count a failed reading (windows spanning it turn approximate); return it typed."""
        if locked:
            self._errors += 1
            self.last_error = exc
        else:
            with self._lock:
                self._errors += 1
                self.last_error = exc
        if isinstance(exc, EnergyReadError):
            return exc
        return EnergyReadError(f"reading {self._name} failed: {type(exc).__name__}: {exc}")

    def _insert(self, t: float, values: Sequence[float]) -> None:
        if len(values) != self._n:
            raise EnergyReadError(
                f"source gave {len(values)} values for {self._n} channels {self._source.channels}"
            )
        vals = tuple(float(v) for v in values)
        if any(not math.isfinite(v) for v in vals):
            raise EnergyReadError(f"source gave a non-finite value: {vals}")
        power = self._source.kind == "power"
        if self._count:
            prev = (self._head - 1) % self._cap
            t0, p0, e0 = self._t[prev], self._p[prev], self._e[prev]
            if t <= t0:
                return
            dt = t - t0
            if power:
                p = vals
                e = tuple(a + (x + y) * 0.5 * dt for a, x, y in zip(e0, p0, p, strict=True))
            else:
                vals = tuple(v + o for v, o in zip(vals, self._offset_mj, strict=True))
                if any(b < a for a, b in zip(e0, vals, strict=True)):
                    vals = self._rebase(e0, p0, vals, dt)
                e = vals
                p = tuple((b - a) / dt for a, b in zip(e0, vals, strict=True))
        else:
            t0 = p0 = e0 = None
            if not power:
                vals = tuple(v + o for v, o in zip(vals, self._offset_mj, strict=True))
            p = vals if power else (0.0,) * self._n
            e = (0.0,) * self._n if power else vals
        slot = self._head
        self._t[slot], self._p[slot], self._e[slot] = t, p, e
        self._head = (slot + 1) % self._cap
        self._count = min(self._count + 1, self._cap)
        self._seq += 1
        if t0 is not None and e0 is not None:  # time-weighted: the interval's mean power
            dt = t - t0
            mean = tuple((b - a) / dt for a, b in zip(e0, e, strict=True))
            total = mean[self._total] if self._total is not None else sum(mean)
            self._idle.add(t, total / 1000.0, dt)
            for tracker, mw in zip(self._idle_ch, mean, strict=True):
                tracker.add(t, mw / 1000.0, dt)
        if self._pending:
            still: list[Anchor] = []
            for anchor in self._pending:
                if t0 is not None and t0 <= anchor.t <= t:
                    anchor.energy_mj = self._between(t0, p0, e0, t, p, e, anchor.t)
                elif anchor.t > t:
                    still.append(anchor)
                # an anchor before the first sample, or older than the segment, stays held
            self._pending = still

    def _rebase(
        self,
        e0: tuple[float, ...],
        p0: tuple[float, ...],
        vals: tuple[float, ...],
        dt: float,
    ) -> tuple[float, ...]:
        """A counter went backwards (GPU reset, driver reload): continue the curve from the last
        good value, guessing the lost interval at the last power, and count it as an error so
        the windows spanning it are approximate. Later readings follow the new counter."""
        fixed = []
        offsets = list(self._offset_mj)
        for i, (a, b) in enumerate(zip(e0, vals, strict=True)):
            if b < a:
                guess = a + max(0.0, p0[i]) * dt
                offsets[i] += guess - b
                b = guess
            fixed.append(b)
        self._offset_mj = tuple(offsets)
        self.resets += 1
        self._errors += 1
        self.last_error = EnergyReadError(
            f"{self._name}: energy counter went backwards ({e0} -> {vals} mJ), re-based"
        )
        log.warning("%s: energy counter reset (%s -> %s mJ): re-based; windows spanning it "
                    "are approximate", self._name, e0, vals)
        return tuple(fixed)

    def _between(
        self,
        ta: float,
        pa: tuple[float, ...] | None,
        ea: tuple[float, ...] | None,
        tb: float,
        pb: tuple[float, ...],
        eb: tuple[float, ...],
        t: float,
    ) -> tuple[float, ...]:
        """Cumulative energy at `t` inside the segment [ta, tb] (power linear in between)."""
        assert pa is not None and ea is not None
        span = tb - ta
        tau = t - ta
        if self._source.kind == "power":
            return tuple(
                a + x * tau + (y - x) * tau * tau / (2.0 * span)
                for a, x, y in zip(ea, pa, pb, strict=True)
            )
        return tuple(a + (b - a) * tau / span for a, b in zip(ea, eb, strict=True))

    # --- window edges ----------------------------------------------------------------------

    def mark(self) -> Anchor:
        """A window edge at now: a fresh reading, or (push-only) a pending, held anchor."""
        if self._source.on_demand:
            return self.poll()
        with self._lock:
            t = self._clock()
            held, held_s = None, 0.0
            if self._count:
                last = (self._head - 1) % self._cap
                held_s = max(0.0, t - self._t[last])
                held = tuple(
                    e + p * held_s for e, p in zip(self._e[last], self._p[last], strict=True)
                )
            anchor = Anchor(t, self._seq, self._errors, None, held, held_s)
            # a source that stopped pushing must not make every window edge pile up here:
            # edges older than the ring keep their held value
            horizon = t - self._config.ring_s
            self._pending = [a for a in self._pending if a.t >= horizon]
            self._pending.append(anchor)
            return anchor

    def resolve(self, anchor: Anchor) -> tuple[tuple[float, ...] | None, float]:
        """(cumulative mJ at the anchor, seconds of it extrapolated rather than measured)."""
        with self._lock:
            if anchor.energy_mj is not None:
                return anchor.energy_mj, 0.0
            return anchor.held_mj, anchor.held_s

    def idle_w(self) -> float | None:
        with self._lock:
            return self._idle.idle_w()

    def idle_channels_w(self) -> tuple[float | None, ...]:
        """Idle baseline of each channel (None before its first interval)."""
        with self._lock:
            return tuple(tracker.idle_w() for tracker in self._idle_ch)

    # --- spans over the ring ---------------------------------------------------------------

    def _index(self, i: int) -> int:
        return (self._head - self._count + i) % self._cap

    def _cum_at_locked(self, t: float) -> tuple[float, ...]:
        n = self._count
        first, last = self._index(0), self._index(n - 1)
        if t < self._t[first] or t > self._t[last]:
            raise EnergyReadError(
                f"t={t:.3f} is outside the samples kept [{self._t[first]:.3f}, {self._t[last]:.3f}]"
            )
        times = _RingView(self._t, self._head, self._count, self._cap)
        i = bisect.bisect_right(times, t) - 1
        a = self._index(i)
        if self._t[a] == t or i == n - 1:
            return self._e[a]
        b = self._index(i + 1)
        return self._between(
            self._t[a], self._p[a], self._e[a], self._t[b], self._p[b], self._e[b], t
        )

    def integrate(self, t0: float, t1: float) -> tuple[tuple[float, ...], int]:
        """Energy per channel in mJ over [t0, t1] (trapezoids, linear power between samples)
        and the number of samples inside; the span must lie within the samples kept."""
        if t1 < t0:
            raise EnergyReadError(f"span ends before it starts ({t0} > {t1})")
        with self._lock:
            if self._count < 2:
                raise EnergyReadError("fewer than two samples: nothing to integrate")
            e0 = self._cum_at_locked(t0)
            e1 = self._cum_at_locked(t1)
            times = _RingView(self._t, self._head, self._count, self._cap)
            inside = bisect.bisect_right(times, t1) - bisect.bisect_left(times, t0)
        return tuple(b - a for a, b in zip(e0, e1, strict=True)), inside

    def recent_power_mw(self, span_s: float) -> tuple[float, ...] | None:
        """Mean power per channel over the last `span_s` seconds of samples (None if < 2)."""
        with self._lock:
            if self._count < 2:
                return None
            last = self._index(self._count - 1)
            t1 = self._t[last]
            t0 = max(self._t[self._index(0)], t1 - span_s)
            if t1 <= t0:
                return None
            e0 = self._cum_at_locked(t0)
            e1 = self._e[last]
        return tuple((b - a) / (t1 - t0) for a, b in zip(e0, e1, strict=True))


class _RingView(Sequence[float]):
    """The ring's timestamps in time order, for `bisect` without copying."""

    def __init__(self, data: list[float], head: int, count: int, cap: int) -> None:
        self._data, self._head, self._count, self._cap = data, head, count, cap

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            raise TypeError("_RingView does not slice")
        if not 0 <= i < self._count:
            raise IndexError(i)
        return self._data[(self._head - self._count + i) % self._cap]


class SampledMeter(EnergyMeter):
    """A meter whose records come from a `Sampler` over one `Source`."""

    method: str = ""

    def __init__(
        self,
        source: Source,
        config: SamplerConfig,
        *,
        clock: Clock = time.monotonic,
        start: bool = True,
    ) -> None:
        super().__init__()
        self._source = source
        self._config = config
        self.sampler = Sampler(source, config, clock=clock, name=f"edged-energy-{self.backend}")
        if start:
            self.sampler.start()

    @property
    def channels(self) -> tuple[str, ...]:
        return self._source.channels

    @property
    def total_channel(self) -> str | None:
        """The channel that is the whole scope (e.g. VDD_IN), None when joules sum all."""
        return self._source.total

    def _mark(self) -> Anchor:
        return self.sampler.mark()

    def _measure(self, start: Anchor, end: Anchor) -> EnergyRecord:
        e0, held0 = self.sampler.resolve(start)
        e1, held1 = self.sampler.resolve(end)
        if e0 is None or e1 is None:
            raise EnergyReadError(f"{self.backend}: no sample arrived during the window")
        per_rail_j = {ch: (b - a) / 1000.0 for ch, a, b in zip(self.channels, e0, e1, strict=True)}
        window_s = max(0.0, end.t - start.t)
        # a held edge is a guess of the power since the last push: fine while it is a small
        # part of the window, approximate once it is not
        held = held0 + held1 > HELD_FRACTION * window_s
        return self._record(
            per_rail_j,
            window_s,
            samples=end.seq - start.seq,
            approximate=held or end.errors != start.errors,
        )

    def _record(
        self,
        per_rail_j: dict[str, float],
        window_s: float,
        *,
        samples: int,
        approximate: bool,
        method: str | None = None,
    ) -> EnergyRecord:
        total = self._source.total
        joules = per_rail_j[total] if total is not None else sum(per_rail_j.values())
        idle_w = self.sampler.idle_w()
        dynamic = joules if idle_w is None else max(0.0, joules - idle_w * window_s)
        return EnergyRecord(
            joules=joules,
            dynamic_joules=dynamic,
            per_rail_j=per_rail_j,
            window_s=window_s,
            method=method or self.method,
            approximate=approximate or samples < self._config.min_intervals,
            samples=samples,
        )

    def _measure_attributed(
        self, start: Anchor, end: Anchor, span: Span, others: Sequence[Span]
    ) -> EnergyRecord:
        """Joules of the window's channels; where other device windows overlap it on a channel,
        each instant's energy of that channel is split equally among the windows open then."""
        record = self._measure(start, end)
        if span.channels is None:
            total = self._source.total
            names = (total,) if total is not None else self.channels
        else:
            names = tuple(c for c in self.channels if c in span.channels)
        share_s = dict.fromkeys(names, 0.0)  # seconds of each channel charged to this window
        if not others:
            joules = sum(record.per_rail_j[c] for c in names)
            share_s = dict.fromkeys(names, record.window_s)
        else:
            t0, t1 = start.t, end.t
            cuts = {t0, t1}
            for o in others:
                cuts.update(x for x in (o.t0, o.t1) if x is not None and t0 < x < t1)
            parts = []
            for a, b in pairwise(sorted(cuts)):
                for c in names:
                    k = 1 + sum(
                        1 for o in others
                        if o.t0 <= a and (o.t1 is None or o.t1 >= b)
                        and (o.channels is None or c in o.channels)
                    )
                    share_s[c] += (b - a) / k
                    parts.append((a, b, c, k))
            try:
                index = {c: self.channels.index(c) for c in names}
                joules = 0.0
                for a, b, c, k in parts:
                    mj, _ = self.sampler.integrate(a, b)
                    joules += mj[index[c]] / 1000.0 / k
            except EnergyReadError:  # sub-interval not in the ring: split by time alone
                span_s = record.window_s or 1.0
                joules = sum(record.per_rail_j[c] * share_s[c] / span_s for c in names)
        if span.channels is None:
            idle_w = self.sampler.idle_w()
            idle_j = None if idle_w is None else idle_w * max(share_s.values(), default=0.0)
        else:
            per_channel = dict(zip(self.channels, self.sampler.idle_channels_w(), strict=True))
            idle_j = sum((per_channel[c] or 0.0) * share_s[c] for c in names)
        return replace(
            record,
            joules=joules,
            dynamic_joules=joules if idle_j is None else max(0.0, joules - idle_j),
            approximate=record.approximate or bool(others),
            attribution="split-active-time" if others else "exclusive",
            scope_channels=() if span.channels is None else names,
        )

    def power_w(self) -> dict[str, float]:
        mw = self.sampler.recent_power_mw(max(0.5, 2 * self._config.period_s))
        if mw is None:
            return {}
        watts = {ch: v / 1000.0 for ch, v in zip(self.channels, mw, strict=True)}
        total = self._source.total
        watts["total"] = watts[total] if total is not None else sum(watts.values())
        return watts

    def _release(self) -> None:
        self.sampler.stop()
