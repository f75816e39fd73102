"""jtop backend against a fake jtop object (jetson-stats is not installed here)."""

from __future__ import annotations

import pytest
from test_energy_sampler import FakeClock

from edged.energy import BackendUnavailable, JtopConfig, JtopMeter, create_meter, probe

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI


def power(vdd_in_mw: float, cpu_gpu_mw: float, soc_mw: float) -> dict:
    """jtop 4's `power` dict; `avg` deliberately wrong so using it would show."""
    rail = {
        "VDD_CPU_GPU_CV": {
            "online": True,
            "type": "INA3221",
            "status": "ok",
            "volt": 5000,
            "curr": cpu_gpu_mw / 5,
            "power": cpu_gpu_mw,
            "avg": 1.0,
        },
        "VDD_SOC": {
            "online": True,
            "type": "INA3221",
            "status": "ok",
            "volt": 5000,
            "curr": soc_mw / 5,
            "power": soc_mw,
            "avg": 1.0,
        },
    }
    return {"rail": rail, "tot": {"power": vdd_in_mw, "avg": 1.0, "name": "VDD_IN"}}


class FakeJtop:
    """The parts of `jtop.jtop` the backend uses: start, power, attach/detach, close."""

    def __init__(self, interval: float = 0.5, fail: str | None = None) -> None:
        self.interval = interval
        self.power = power(5000, 2000, 1000)
        self.observers: set = set()
        self.fail = fail
        self.closed = False

    def start(self) -> None:
        if self.fail:
            raise RuntimeError(self.fail)

    def attach(self, fn) -> None:
        self.observers.add(fn)

    def detach(self, fn) -> None:
        self.observers.discard(fn)

    def close(self) -> None:
        self.closed = True

    def update(self, new_power: dict) -> None:
        self.power = new_power
        for fn in list(self.observers):
            fn(self)


def build(**cfg):
    clock = FakeClock()
    jetsons: list[FakeJtop] = []

    def factory(interval: float) -> FakeJtop:
        jetsons.append(FakeJtop(interval))
        return jetsons[-1]

    meter = JtopMeter(JtopConfig(**cfg), clock=clock, jtop_factory=factory)
    return meter, clock, jetsons[0]


def tick(clock: FakeClock, jetson: FakeJtop, dt: float, mw=(5000, 2000, 1000)) -> None:
    clock.t += dt
    jetson.update(power(*mw))


def test_integrates_instantaneous_power_never_avg():
    meter, clock, jetson = build(interval_s=0.1)
    try:
        assert meter.channels == ("VDD_CPU_GPU_CV", "VDD_SOC", "VDD_IN")
        assert meter.total_channel == "VDD_IN"
        tick(clock, jetson, 0.1)
        clock.t += 0.04  # open between two jtop updates: resolved from the next one
        with meter.window() as w:
            for _ in range(20):
                tick(clock, jetson, 0.1)
            clock.t += 0.03  # close after the last update: held from it
        rec = w.record
    finally:
        meter.close()
    assert rec.window_s == pytest.approx(2.0 - 0.04 + 0.07)
    assert rec.joules == pytest.approx(5.0 * rec.window_s)
    assert rec.per_rail_j["VDD_SOC"] == pytest.approx(1.0 * rec.window_s)
    assert not rec.approximate  # the held closing edge is 30 ms of a 2 s window
    assert jetson.closed and not jetson.observers


def test_window_between_updates_falls_back_to_the_last_power():
    meter, clock, jetson = build()
    try:
        tick(clock, jetson, 0.1)
        with meter.window() as w:
            clock.t += 0.05
        assert w.record.joules == pytest.approx(5.0 * 0.05)
        assert w.record.approximate
    finally:
        meter.close()


def test_window_before_any_update_is_an_error():
    meter, clock, _ = build()
    try:
        with meter.window() as w:
            clock.t += 0.05
        with pytest.raises(Exception, match="no sample arrived"):
            _ = w.record
    finally:
        meter.close()


def test_step_in_power_is_followed():
    meter, clock, jetson = build()
    try:
        tick(clock, jetson, 0.1)
        with meter.window() as w:
            for _ in range(10):
                tick(clock, jetson, 0.1)
            for _ in range(10):
                tick(clock, jetson, 0.1, mw=(9000, 6000, 1000))
        rec = w.record
    finally:
        meter.close()
    # 1 s at 5 W, the 100 ms ramp between the two levels (7 W mean), then 0.9 s at 9 W
    assert rec.joules == pytest.approx(5.0 * 1.0 + 7.0 * 0.1 + 9.0 * 0.9)


def test_malformed_update_marks_window_approximate():
    meter, clock, jetson = build()
    try:
        tick(clock, jetson, 0.1)
        with meter.window() as w:
            for _ in range(10):
                tick(clock, jetson, 0.1)
            clock.t += 0.1
            jetson.update({"rail": {}, "tot": {"name": "VDD_IN"}})
            for _ in range(10):
                tick(clock, jetson, 0.1)
        assert w.record.approximate
        assert meter.sampler.errors == 1
    finally:
        meter.close()


def test_service_down_is_unavailable():
    with pytest.raises(BackendUnavailable, match="cannot start jtop: service is not active"):
        JtopMeter(jtop_factory=lambda interval: FakeJtop(interval, fail="service is not active"))


def test_not_installed_here_and_never_imported_by_probe():
    import sys

    result = probe()["jtop"]
    if "jtop" not in sys.modules and not result.available:
        assert "jetson-stats" in result.reason or "jtop service" in result.reason
        with pytest.raises(BackendUnavailable):
            create_meter("jtop")
    assert "jtop" not in sys.modules or result.available
