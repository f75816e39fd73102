"""NVML backend against an autospec'd pynvml patched in at the import boundary."""

from __future__ import annotations

import itertools
import math
import sys
from unittest import mock

import pytest
from test_energy_sampler import FakeClock, wait_samples

pynvml = pytest.importorskip("pynvml")

from edged.energy import (  # noqa: E402
    BackendUnavailable,
    EnergyConfigError,
    EnergyReadError,
    NvmlConfig,
    NvmlMeter,
    create_meter,
)

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED


def fake_pynvml(monkeypatch, count: int = 1):
    """`create_autospec(pynvml)` with the real exception classes and constants on it."""
    fake = mock.create_autospec(pynvml)
    for name in dir(pynvml):
        if name.startswith(("NVMLError", "NVML_ERROR")):
            setattr(fake, name, getattr(pynvml, name))
    fake.nvmlDeviceGetCount.return_value = count
    fake.nvmlDeviceGetHandleByIndex.side_effect = lambda i: f"handle{i}"
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def counter_every_100ms(clock: FakeClock, watts: float, base_mj: float = 5e6):
    """A counter that moves only on 100 ms boundaries, like real boards do."""

    def read(handle):
        return int(base_mj + watts * 1000 * math.floor(clock.t / 0.1 + 1e-9) * 0.1)

    return read


def sweep(meter: NvmlMeter, clock: FakeClock, seconds: float, period: float = 0.05) -> None:
    for _ in range(round(seconds / period)):
        clock.t += period
        meter.sampler.poll()


def test_counter_difference_and_observed_update_period(monkeypatch):
    fake = fake_pynvml(monkeypatch)
    clock = FakeClock(100.0)
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = counter_every_100ms(clock, 50.0)
    fake.nvmlDeviceGetPowerUsage.return_value = 50_000
    meter = NvmlMeter(NvmlConfig(), clock=clock, start=False)
    try:
        sweep(meter, clock, 1.0)  # the sampler learns the update period
        assert meter.update_period_s == pytest.approx(0.1)
        with meter.window() as w:
            sweep(meter, clock, 2.0)
        rec = w.record
        assert rec.method == "nvml" and not rec.approximate
        assert rec.joules == pytest.approx(100.0, abs=5.0)  # 50 W x 2 s, +- one update
        assert rec.per_rail_j.keys() == {"gpu0"}

        clock.t += 0.01
        with meter.window() as short:  # 30 ms < update period: the counter may not move
            clock.t += 0.03
        rec = short.record
        assert rec.approximate and rec.method == "nvml-recent-power"
        assert rec.joules == pytest.approx(50.0 * 0.03, rel=0.05)  # not 0 J

        with meter.window() as mid:  # 3 periods: counter difference, but approximate
            sweep(meter, clock, 0.3)
        assert mid.record.approximate and mid.record.method == "nvml"
    finally:
        meter.close()
    fake.nvmlShutdown.assert_called_once()


def test_several_gpus_are_summed(monkeypatch):
    fake = fake_pynvml(monkeypatch, count=2)
    clock = FakeClock(100.0)
    power = {"handle0": 100.0, "handle1": 300.0}
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = lambda h: int(power[h] * 1000 * clock.t)
    meter = NvmlMeter(NvmlConfig(gpu_indices="all"), clock=clock, start=False)
    try:
        with meter.window() as w:
            sweep(meter, clock, 1.0)
    finally:
        meter.close()
    assert w.record.per_rail_j == pytest.approx({"gpu0": 100.0, "gpu1": 300.0}, rel=1e-4)
    assert w.record.joules == pytest.approx(400.0, rel=1e-4)


def test_counter_reset_re_bases_instead_of_failing_forever(monkeypatch, caplog):
    """Issue 16.2: after a GPU reset the counter restarts near 0; later windows measure again."""
    fake = fake_pynvml(monkeypatch)
    clock = FakeClock(100.0)
    base = {"mj": 5e6}
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = (
        lambda h: int(base["mj"] + 50.0 * 1000 * clock.t))
    meter = NvmlMeter(NvmlConfig(), clock=clock, start=False)
    try:
        sweep(meter, clock, 1.0)
        with meter.window() as spanning:
            sweep(meter, clock, 1.0)
            base["mj"] = -50.0 * 1000 * clock.t + 1000  # driver reload: counter back to 1 J
            sweep(meter, clock, 1.0)
        assert spanning.record.approximate
        assert spanning.record.joules == pytest.approx(100.0, rel=0.05)
        for _ in range(3):
            with meter.window() as w:
                sweep(meter, clock, 1.0)
            assert w.record.joules == pytest.approx(50.0, rel=1e-3) and not w.record.approximate
    finally:
        meter.close()
    assert sum("re-based" in r.getMessage() for r in caplog.records) == 1


def test_old_gpu_without_counter_integrates_power(monkeypatch):
    fake = fake_pynvml(monkeypatch)
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError(NOT_SUPPORTED)
    fake.nvmlDeviceGetPowerUsage.return_value = 75_000  # mW
    clock = FakeClock(100.0)
    meter = NvmlMeter(clock=clock, start=False)
    try:
        assert meter.method == "nvml-power"
        with meter.window() as w:
            sweep(meter, clock, 2.0)
    finally:
        meter.close()
    assert w.record.joules == pytest.approx(150.0)
    assert w.record.method == "nvml-power"


def test_jetson_not_supported_is_unavailable_never_zero(monkeypatch):
    fake = fake_pynvml(monkeypatch)
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported(
        NOT_SUPPORTED
    )
    fake.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError(NOT_SUPPORTED)
    with pytest.raises(BackendUnavailable, match=r"NOT_SUPPORTED.*ina3221"):
        create_meter("nvml")
    fake.nvmlShutdown.assert_called_once()


def test_not_supported_mid_run_spoils_the_window(monkeypatch):
    fake = fake_pynvml(monkeypatch)
    clock = FakeClock(100.0)
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = counter_every_100ms(clock, 10.0)
    meter = NvmlMeter(clock=clock, start=False)
    try:
        w = meter.window().open()
        sweep(meter, clock, 0.5)
        fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError(NOT_SUPPORTED)
        w.close()
        with pytest.raises(EnergyReadError, match="NOT_SUPPORTED"):
            _ = w.record
    finally:
        meter.close()


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "libnvidia-ml.so.1 not found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "permission denied"),
    ],
)
def test_init_failures_say_why(monkeypatch, code, reason):
    fake = fake_pynvml(monkeypatch)
    fake.nvmlInit.side_effect = pynvml.NVMLError(code)
    with pytest.raises(BackendUnavailable, match=reason):
        create_meter("nvml")


def test_pynvml_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(BackendUnavailable, match=r"pynvml is not installed.*edged\[nvml\]"):
        create_meter("nvml")


def test_gpu_index_out_of_range_is_a_config_error(monkeypatch):
    fake = fake_pynvml(monkeypatch, count=1)
    with pytest.raises(EnergyConfigError, match=r"GPU 3.*1 GPU"):
        create_meter("nvml", gpu_indices=[3])
    fake.nvmlShutdown.assert_called_once()
    with pytest.raises(EnergyConfigError, match="gpu_indices"):
        create_meter("nvml", gpu_indices="first")


def test_sampler_thread_runs_against_fake(monkeypatch):
    fake = fake_pynvml(monkeypatch)
    reads = itertools.count()
    # 20 mJ more at each read: a window holds 20 mJ per sample, however the threads are timed
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = lambda h: 20 * next(reads)
    meter = create_meter("nvml", period_s=0.01)

    try:
        wait_samples(meter.sampler, 5)
        with meter.window() as w:
            # taken by the background thread
            wait_samples(meter.sampler, meter.sampler.sample_count + 30)
    finally:
        meter.close()
    assert w.record.samples >= 31 and w.record.method == "nvml"
    assert w.record.joules == pytest.approx(0.020 * w.record.samples)
