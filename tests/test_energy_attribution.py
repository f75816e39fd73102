"""Issue 16.3: windows of two devices, on two scopes (NVML GPUs) and on one shared rail (Jetson
INA3221, RAPL), opened and closed at interleaved instants on fake counters and fake trees."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_energy_ina3221 import agx_orin, meter_for, orin_nano
from test_energy_nvml import fake_pynvml
from test_energy_rapl import zone
from test_energy_sampler import FakeClock

from edged.energy import NvmlConfig, NvmlMeter, RaplConfig, RaplMeter, WindowError

pytestmark = pytest.mark.timeout(60)


def interleaved(meter, clock: FakeClock, a: str, b: str, step=None):
    """Device `a` runs over [0, 2] s and `b` over [1, 3] s; the sampler polls every 50 ms."""
    poll = step or meter.sampler.poll
    wa = meter.window(device=a).open()
    for _ in range(20):
        clock.t += 0.05
        poll()
    wb = meter.window(device=b).open()
    for _ in range(20):
        clock.t += 0.05
        poll()
    wa.close()
    for _ in range(20):
        clock.t += 0.05
        poll()
    wb.close()
    return wa.record, wb.record


def test_two_gpus_each_window_gets_its_own_gpu(monkeypatch):
    fake = fake_pynvml(monkeypatch, count=2)
    clock = FakeClock(100.0)
    watts = {"handle0": 100.0, "handle1": 300.0}
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = (
        lambda h: int(watts[h] * 1000 * clock.t))
    meter = NvmlMeter(NvmlConfig(gpu_indices="all"), clock=clock, start=False)
    try:
        assert meter.device_channels("cuda") == ("gpu0",)
        assert meter.device_channels("cuda:1") == ("gpu1",)
        assert not meter.covers("cpu")
        with pytest.raises(WindowError, match="does not measure device 'cpu'"):
            meter.window(device="cpu")
        ra, rb = interleaved(meter, clock, "cuda:0", "cuda:1")
    finally:
        meter.close()
    assert ra.joules == pytest.approx(200.0, rel=1e-3)  # 100 W x 2 s, none of gpu1's 300 W
    assert rb.joules == pytest.approx(600.0, rel=1e-3)
    assert ra.attribution == rb.attribution == "exclusive"
    assert ra.scope_channels == ("gpu0",) and not ra.approximate
    assert ra.to_dict()["attribution"] == "exclusive"


def test_shared_rail_is_split_by_active_time(tmp_path):
    orin_nano(tmp_path)  # VDD_IN 7 W, VDD_CPU_GPU_CV 2.5 W, VDD_SOC 1.5 W, constant
    meter, clock = meter_for(tmp_path)
    try:
        assert meter.device_channels("cpu") == ("VDD_CPU_GPU_CV", "VDD_SOC")
        assert meter.device_channels("cuda") == ("VDD_CPU_GPU_CV", "VDD_SOC")
        meter.sampler.poll()
        ra, rb = interleaved(meter, clock, "cpu", "cuda")
    finally:
        meter.close()
    # 4 W on the shared rails: 1 s alone + 1 s halved = 6 J each, 12 J = all of [0, 3] s
    assert ra.joules == pytest.approx(6.0, rel=1e-6)
    assert rb.joules == pytest.approx(6.0, rel=1e-6)
    assert ra.approximate and ra.attribution == "split-active-time"
    assert ra.per_rail_j["VDD_IN"] == pytest.approx(14.0)  # the raw rails stay unsplit


def test_gpu_and_cpu_rails_apart_soc_split(tmp_path):
    agx_orin(tmp_path)  # VDD_GPU_SOC 3 W, VDD_CPU_CV 2 W, VIN_SYS_5V0 4 W, VDDQ 1 W
    meter, clock = meter_for(tmp_path)
    try:
        assert meter.device_channels("cuda") == ("VDD_GPU_SOC", "VIN_SYS_5V0",
                                                 "VDDQ_VDD2_1V8AO")
        assert meter.device_channels("cpu") == ("VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")
        meter.sampler.poll()
        ra, rb = interleaved(meter, clock, "cpu", "cuda")
    finally:
        meter.close()
    # cpu: its own 2 W for 2 s, shared 5 W for 1 s alone + 1 s halved
    assert ra.joules == pytest.approx(2 * 2 + 5 * 1.5, rel=1e-6)
    assert rb.joules == pytest.approx(3 * 2 + 5 * 1.5, rel=1e-6)


def test_rapl_host_energy_is_shared_by_cpu_and_cuda_windows(tmp_path: Path):
    path = zone(tmp_path, "intel-rapl:0", "package-0", 0, max_uj=2**40) / "energy_uj"
    clock = FakeClock()
    meter = RaplMeter(RaplConfig(sysfs_root=str(tmp_path)), clock=clock, start=False)

    def step() -> None:
        path.write_text(f"{int(10e6 * clock.t)}\n")  # 10 W
        meter.sampler.poll()

    try:
        step()
        ra, rb = interleaved(meter, clock, "cpu", "cuda", step)
        with meter.window(device="cpu") as alone:
            for _ in range(10):
                clock.t += 0.05
                step()
    finally:
        meter.close()
    assert ra.joules == pytest.approx(15.0, rel=1e-6) and rb.joules == pytest.approx(15.0)
    assert ra.attribution == "split-active-time" and ra.approximate
    assert alone.record.attribution == "exclusive"
    assert alone.record.joules == pytest.approx(5.0, rel=1e-6)


def test_plain_windows_are_never_split(tmp_path: Path):
    orin_nano(tmp_path)
    meter, clock = meter_for(tmp_path)
    try:
        meter.sampler.poll()
        outer = meter.window().open()
        ra, _ = interleaved(meter, clock, "cpu", "cuda")
        outer.close()
    finally:
        meter.close()
    assert outer.record.joules == pytest.approx(21.0)  # VDD_IN 7 W x 3 s, whole
    assert outer.record.attribution == "exclusive"
    assert ra.joules == pytest.approx(6.0, rel=1e-6)  # the enclosing window takes no share
