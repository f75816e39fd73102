"""The estimate backend: CPU time x watts per core, always labelled as an estimate."""

from __future__ import annotations

import threading
import time

import pytest
from test_energy_sampler import FakeClock

from edged.energy import EnergyConfigError, EnergyReadError, EstimateConfig, EstimateMeter

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI


def test_formula_with_injected_clocks():
    wall, cpu = FakeClock(10.0), FakeClock(3.0)
    meter = EstimateMeter(EstimateConfig(watts_per_core=5.0, idle_w=1.5), clock=wall, cpu_clock=cpu)
    with meter.window() as w:
        wall.t += 4.0
        cpu.t += 2.0  # two core-seconds in four seconds
    rec = w.record
    assert rec.joules == pytest.approx(2.0 * 5.0 + 1.5 * 4.0)
    assert rec.dynamic_joules == pytest.approx(10.0)
    assert rec.window_s == pytest.approx(4.0)
    assert rec.method == "estimate" and rec.approximate is True
    assert rec.per_rail_j == {} and rec.samples == 0


@pytest.mark.parametrize("scope", ["process", "thread"])
def test_real_cpu_work_costs_joules(scope):
    meter = EstimateMeter(EstimateConfig(watts_per_core=10.0, scope=scope))
    with meter.window() as busy:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:
            pass
    assert busy.record.joules >= 10.0 * 0.05
    assert meter.power_w()["total"] >= 0.0


def test_a_sleeping_thread_costs_nothing():
    # thread scope: other threads of the test process (samplers left by other tests) may run
    meter = EstimateMeter(EstimateConfig(watts_per_core=10.0, scope="thread"))
    with meter.window() as idle:
        time.sleep(0.05)
    assert idle.record.joules < 10.0 * 0.01


def test_thread_scope_must_close_in_the_opening_thread():
    meter = EstimateMeter(EstimateConfig(scope="thread"))
    w = meter.window().open()
    closer = threading.Thread(target=w.close)
    closer.start()
    closer.join()
    with pytest.raises(EnergyReadError, match="same thread"):
        _ = w.record


@pytest.mark.parametrize("cfg", [{"watts_per_core": -1}, {"idle_w": "lots"}, {"scope": "machine"}])
def test_bad_options(cfg):
    with pytest.raises(EnergyConfigError, match="energy option"):
        EstimateConfig(**cfg)
