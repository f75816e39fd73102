"""Sampler maths on synthetic power traces with known integrals, windows, idle, threads."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.energy import (
    EnergyReadError,
    EnergyRecord,
    MeterClosedError,
    NullMeter,
    SampledMeter,
    Sampler,
    SamplerConfig,
    WindowError,
)
from edged.energy.base import EnergyConfigError
from edged.energy.sampler import IdleTracker, Source

pytestmark = pytest.mark.timeout(120)  # a hung sampler thread fails, never hangs CI


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def wait_samples(sampler: Sampler, count: int, timeout_s: float = 30.0) -> None:
    """Until the sampler has taken `count` samples: a busy machine delays its thread."""
    end = time.monotonic() + timeout_s
    while sampler.sample_count < count and time.monotonic() < end:
        time.sleep(0.01)


class TraceSource(Source):
    """Power (mW) or cumulative energy (mJ) as functions of the fake clock's time."""

    def __init__(
        self,
        clock: FakeClock,
        fns: dict[str, Callable[[float], float]],
        kind: str = "power",
        total: str | None = None,
    ) -> None:
        super().__init__(list(fns), total)
        self.kind = kind  # type: ignore[misc]
        self._clock = clock
        self._fns = list(fns.values())
        self.fail_next = False

    def read(self) -> tuple[float, ...]:
        if self.fail_next:
            self.fail_next = False
            raise OSError(5, "Input/output error")
        return tuple(fn(self._clock.t) for fn in self._fns)


class TraceMeter(SampledMeter):
    backend = "synthetic"
    method = "synthetic"


def sweep(clock: FakeClock, sampler: Sampler, t0: float, t1: float, period: float) -> None:
    """Poll at every grid point in (t0, t1]."""
    n = round((t1 - t0) / period)
    for i in range(1, n + 1):
        clock.t = t0 + i * period
        sampler.poll()


def make(fns, *, kind="power", total=None, **cfg):
    clock = FakeClock()
    source = TraceSource(clock, fns, kind=kind, total=total)
    meter = TraceMeter(source, SamplerConfig(**cfg), clock=clock, start=False)
    return clock, source, meter


def test_constant_trace_integrates_exactly():
    clock, _, meter = make({"a": lambda t: 2000.0})
    meter.sampler.poll()
    sweep(clock, meter.sampler, 0.0, 10.0, 0.05)
    mj, inside = meter.sampler.integrate(0.0, 10.0)
    assert mj[0] == pytest.approx(20_000.0)
    assert inside == 201
    off_grid, _ = meter.sampler.integrate(1.234, 7.891)
    assert off_grid[0] == pytest.approx(2000.0 * (7.891 - 1.234))


def test_ramp_trace_is_exact_even_between_samples():
    # p = 1000 t mW -> energy over [a, b] = 500 (b^2 - a^2) mJ; trapezoids are exact for lines
    clock, _, meter = make({"ramp": lambda t: 1000.0 * t})
    meter.sampler.poll()
    sweep(clock, meter.sampler, 0.0, 4.0, 0.1)
    for a, b in [(0.0, 4.0), (0.125, 3.33), (1.01, 1.02)]:
        mj, _ = meter.sampler.integrate(a, b)
        assert mj[0] == pytest.approx(500.0 * (b * b - a * a), rel=1e-9)


def test_step_trace_error_is_bounded_by_one_sample_interval():
    step = 2.05  # between samples
    clock, _, meter = make({"step": lambda t: 1000.0 if t < step else 3000.0})
    meter.sampler.poll()
    sweep(clock, meter.sampler, 0.0, 4.0, 0.1)
    mj, _ = meter.sampler.integrate(0.0, 4.0)
    exact = 1000.0 * step + 3000.0 * (4.0 - step)
    assert abs(mj[0] - exact) <= (3000.0 - 1000.0) * 0.1 / 2 + 1e-6
    assert mj[0] != pytest.approx(4000.0)  # the step shows


def test_energy_counter_source_gives_power_and_energy():
    clock, _, meter = make({"pkg": lambda t: 1500.0 * t + 7.0}, kind="energy")
    meter.sampler.poll()
    sweep(clock, meter.sampler, 0.0, 2.0, 0.05)
    mj, _ = meter.sampler.integrate(0.5, 1.5)
    assert mj[0] == pytest.approx(1500.0)
    assert meter.sampler.recent_power_mw(1.0)[0] == pytest.approx(1500.0)
    assert meter.power_w() == pytest.approx({"pkg": 1.5, "total": 1.5})


def test_window_record_from_edges_total_and_rails():
    clock, _, meter = make(
        {"VDD_IN": lambda t: 5000.0, "VDD_SOC": lambda t: 1000.0 + 500.0 * t}, total="VDD_IN"
    )
    clock.t = 1.0
    with meter.window() as w:
        sweep(clock, meter.sampler, 1.0, 3.0, 0.05)
    rec = w.record
    assert isinstance(rec, EnergyRecord)
    assert rec.window_s == pytest.approx(2.0)
    assert rec.joules == pytest.approx(10.0)  # the total rail, not the sum
    assert rec.per_rail_j["VDD_SOC"] == pytest.approx(1.0 * 2 + 0.25 * (9 - 1))
    assert rec.samples == 40  # sample intervals: the edge at t=3 coincides with the last poll
    assert rec.approximate is False
    assert rec.method == "synthetic"


def test_windows_nest_and_overlap():
    clock, _, meter = make({"a": lambda t: 1000.0})  # 1 W
    outer = meter.window().open()
    sweep(clock, meter.sampler, 0.0, 1.0, 0.05)
    first = meter.window().open()
    sweep(clock, meter.sampler, 1.0, 2.0, 0.05)
    second = meter.window().open()  # overlaps `first`, not nested in it
    sweep(clock, meter.sampler, 2.0, 3.0, 0.05)
    first.close()
    sweep(clock, meter.sampler, 3.0, 4.0, 0.05)
    second.close()
    outer.close()
    assert outer.record.joules == pytest.approx(4.0)
    assert first.record.joules == pytest.approx(2.0)
    assert second.record.joules == pytest.approx(2.0)


def test_windows_longer_than_the_ring_stay_exact():
    clock, _, meter = make({"a": lambda t: 250.0}, period_s=0.05, ring_s=0.5)
    with meter.window() as w:
        sweep(clock, meter.sampler, 0.0, 30.0, 0.05)
    assert w.record.joules == pytest.approx(0.25 * 30.0)
    with pytest.raises(EnergyReadError, match="outside the samples kept"):
        meter.sampler.integrate(0.0, 30.0)


def test_short_windows_are_approximate():
    clock, _, meter = make({"a": lambda t: 1000.0}, min_intervals=4)
    meter.sampler.poll()
    with meter.window() as w:
        sweep(clock, meter.sampler, 0.0, 0.1, 0.05)
    assert w.record.samples == 2
    assert w.record.approximate is True


def test_dynamic_joules_subtract_the_tracked_idle_baseline():
    level = {"w": 1000.0}
    clock, _, meter = make({"a": lambda t: level["w"]})
    meter.sampler.poll()
    sweep(clock, meter.sampler, 0.0, 4.95, 0.05)  # 5 s idle at 1 W
    level["w"] = 4000.0
    clock.t = 5.0
    with meter.window() as w:  # its opening edge reads the new level at t=5
        sweep(clock, meter.sampler, 5.0, 7.0, 0.05)
    assert meter.sampler.idle_w() == pytest.approx(1.0)
    assert w.record.joules == pytest.approx(8.0, rel=1e-3)
    assert w.record.dynamic_joules == pytest.approx(8.0 - 1.0 * 2.0, rel=1e-3)


def test_fixed_idle_wins_and_dynamic_never_negative():
    clock, _, meter = make({"a": lambda t: 1000.0}, idle_w=3.0)
    with meter.window() as w:
        sweep(clock, meter.sampler, 0.0, 1.0, 0.05)
    assert w.record.joules == pytest.approx(1.0)
    assert w.record.dynamic_joules == 0.0


def test_idle_tracker_uses_lowest_second_mean_within_horizon():
    idle = IdleTracker(horizon_s=10.0)
    assert idle.idle_w() is None
    for i in range(100):  # 0..9.9 s at 2 W with one low spike
        idle.add(i * 0.1, 0.5 if i == 33 else 2.0, 0.1)
    assert idle.idle_w() == pytest.approx((0.5 + 9 * 2.0) / 10)  # a spike is diluted
    for i in range(100, 400):  # 20 s at 3 W: the old bins fall out of the horizon
        idle.add(i * 0.1, 3.0, 0.1)
    assert idle.idle_w() == pytest.approx(3.0)


def test_idle_tracker_weights_by_time_not_by_sample():
    idle = IdleTracker(horizon_s=10.0)
    for i in range(1, 40):  # 1 W in 50 ms intervals, each followed by a 1 ms edge at 0 W
        idle.add(i * 0.05, 1.0, 0.049)
        idle.add(i * 0.05 + 0.001, 0.0, 0.001)
    assert idle.idle_w() == pytest.approx(0.98, abs=0.01)  # per sample it would be 0.5


def test_failed_read_in_window_makes_it_approximate_and_failed_edge_raises():
    clock, source, meter = make({"a": lambda t: 1000.0})
    meter.sampler.poll()
    with meter.window() as w:
        sweep(clock, meter.sampler, 0.0, 0.5, 0.05)
        source.fail_next = True
        with pytest.raises(EnergyReadError, match="Input/output error"):
            meter.sampler.poll()
        sweep(clock, meter.sampler, 0.5, 1.0, 0.05)
    assert w.record.approximate is True
    assert w.record.joules == pytest.approx(1.0)
    w2 = meter.window().open()
    source.fail_next = True
    w2.close()  # the failing edge does not raise here...
    with pytest.raises(EnergyReadError):
        _ = w2.record  # ...but here, never as 0 J
    assert isinstance(w2.error, EnergyReadError)


def test_counter_going_backwards_is_re_based_once():
    """Issue 16.2: a reset counter (driver reload) continues the curve instead of failing every
    later window; the window spanning the reset is approximate, the next ones exact."""
    table = [10.0, 20.0, 5.0, 15.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0]  # mJ every 0.1 s
    clock, _, meter = make({"c": lambda t: table[round(t * 10)]}, kind="energy")
    meter.sampler.poll()
    clock.t += 0.1
    with meter.window() as spanning:  # 20, then 5 (reset: guessed at the last 100 mW), 15, 25
        for _ in range(3):
            clock.t += 0.1
            meter.sampler.poll()
    assert spanning.record.approximate and spanning.record.joules == pytest.approx(0.03)
    assert meter.sampler.resets == 1 and meter.sampler.errors == 1
    clock.t += 0.1
    with meter.window() as after:  # 35 -> 75: counted normally again
        for _ in range(4):
            clock.t += 0.1
            meter.sampler.poll()
    assert after.record.joules == pytest.approx(0.04) and not after.record.approximate


def test_window_misuse_is_typed():
    _, _, meter = make({"a": lambda t: 1.0})
    w = meter.window()
    with pytest.raises(WindowError):
        w.close()
    w.open()
    with pytest.raises(WindowError, match="opened twice"):
        w.open()
    with pytest.raises(WindowError, match="still open"):
        _ = w.record
    meter.close()
    w.close()
    with pytest.raises(MeterClosedError):
        _ = w.record
    with pytest.raises(MeterClosedError):
        meter.window()


def test_record_to_dict_is_plain_and_complete():
    rec = EnergyRecord(1.5, 0.5, {"VDD_IN": 1.5}, 0.2, "ina3221", False, 5)
    assert rec.to_dict() == {
        "attribution": "exclusive",
        "scope_channels": [],
        "joules": 1.5,
        "dynamic_joules": 0.5,
        "method": "ina3221",
        "approximate": False,
        "per_rail_j": {"VDD_IN": 1.5},
        "window_s": 0.2,
        "samples": 5,
    }


def test_null_meter_never_reports_a_believable_zero():
    meter = NullMeter()
    with meter.window() as w:
        pass
    assert math.isnan(w.record.joules) and w.record.method == "none"


@pytest.mark.parametrize(
    "cfg",
    [
        {"period_s": 0},
        {"period_s": "fast"},
        {"idle_w": -1.0},
        {"min_intervals": 1.5},
        {"ring_s": 0.01},
        {"period_s": float("nan")},
        {"min_intervals": True},
    ],
)
def test_bad_sampler_options_are_typed(cfg):
    with pytest.raises(EnergyConfigError, match="energy option"):
        SamplerConfig(**cfg)


def test_push_only_edges_do_not_pile_up_when_samples_stop():
    class Pushed(Source):
        on_demand = False

        def read(self) -> tuple[float, ...]:
            raise AssertionError("push-only sources are never read")

    clock = FakeClock()
    meter = TraceMeter(Pushed(["a"], None), SamplerConfig(period_s=0.1, ring_s=1.0),
                       clock=clock, start=False)
    try:
        meter.sampler.push(0.0, (2000.0,))
        for _ in range(1000):  # the pushing service died; requests keep opening windows
            with meter.window() as w:
                clock.t += 0.1
        assert len(meter.sampler._pending) <= 2 * 11  # only the edges within ring_s
        assert w.record.approximate  # held from the last sample, and said so
        assert w.record.joules == pytest.approx(2.0 * 0.1)
    finally:
        meter.close()


def test_background_thread_with_concurrent_windows():
    """Real thread at 200 Hz, four workers opening windows: every record is exact for a
    constant 2 W source, whatever the interleaving."""

    class Constant(Source):
        def read(self) -> tuple[float, ...]:
            return (2000.0,)

    meter = TraceMeter(Constant(["a"], None), SamplerConfig(period_s=0.005))
    records: list[EnergyRecord] = []
    lock = threading.Lock()
    try:
        outer = meter.window().open()

        def worker() -> None:
            for _ in range(20):
                with meter.window() as w:
                    time.sleep(0.002)
                with lock:
                    records.append(w.record)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        outer.close()
    finally:
        meter.close()
    assert len(records) == 80
    for rec in records:
        assert rec.joules == pytest.approx(2.0 * rec.window_s, rel=1e-9, abs=1e-12)
        assert rec.samples >= 1
    assert outer.record.joules == pytest.approx(2.0 * outer.record.window_s, rel=1e-9)
    assert meter.sampler.sample_count > 80 * 2
    assert meter.power_w()["a"] == pytest.approx(2.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.001, 0.5), st.floats(0.0, 50_000.0), st.booleans()),
        min_size=2,
        max_size=60,
    )
)
def test_consecutive_windows_add_up_to_the_enclosing_one(steps):
    """Whatever the trace and wherever windows are cut, the parts sum to the whole."""
    level = {"mw": 0.0}
    clock, _, meter = make({"a": lambda t: level["mw"]})
    outer = meter.window().open()
    parts = [meter.window().open()]
    for dt, mw, cut in steps:
        clock.t += dt
        level["mw"] = mw
        meter.sampler.poll()
        if cut:
            parts[-1].close()
            parts.append(meter.window().open())
    parts[-1].close()
    outer.close()
    total = sum(w.record.joules for w in parts)
    assert total == pytest.approx(outer.record.joules, rel=1e-9, abs=1e-9)
    assert sum(w.record.window_s for w in parts) == pytest.approx(outer.record.window_s)
