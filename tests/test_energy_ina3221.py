"""INA3221 / INA238 rails on fake sysfs trees (JetPack 4 IIO and JetPack 5+ hwmon layouts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_energy_sampler import FakeClock, wait_samples

from edged.energy import (
    BackendUnavailable,
    EnergyReadError,
    Ina3221Config,
    Ina3221Meter,
    PermissionDenied,
    create_meter,
)
from edged.energy.ina3221 import discover_rails

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI


def hwmon_chip(
    root: Path, device: str, channels: list[tuple[str, int, int]], driver: str = "ina3221"
) -> Path:
    """A JetPack 5+ hwmon dir; channels are (label, mV, mA) for in1..in3 plus the sum channel."""
    index = len(list(root.rglob("hwmon*")))
    hw = root / "bus/i2c/drivers" / driver / device / "hwmon" / f"hwmon{index}"
    hw.mkdir(parents=True)
    (hw / "name").write_text("ina3221\n")
    for n, (label, mv, ma) in enumerate(channels, start=1):
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
        (hw / f"in{n}_enable").write_text("1\n")
        (hw / f"in{n + 3}_input").write_text("1234\n")  # shunt uV: never a rail
    (hw / "in7_label").write_text("sum of shunt voltages\n")
    (hw / "in7_input").write_text("4000\n")
    (hw / "curr4_input").write_text("900\n")
    return hw


def orin_nano(root: Path) -> Path:
    return hwmon_chip(
        root,
        "1-0040",
        [("VDD_IN", 5000, 1400), ("VDD_CPU_GPU_CV", 5000, 500), ("VDD_SOC", 5000, 300)],
    )


def agx_orin(root: Path) -> tuple[Path, Path]:
    a = hwmon_chip(
        root,
        "1-0040",
        [("VDD_GPU_SOC", 5000, 600), ("VDD_CPU_CV", 5000, 400), ("VIN_SYS_5V0", 5000, 800)],
    )
    b = hwmon_chip(root, "1-0041", [("NC", 0, 0), ("VDDQ_VDD2_1V8AO", 5000, 200), ("NC", 0, 0)])
    return a, b


def jetpack4_nano(root: Path) -> Path:
    iio = root / "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    iio.mkdir(parents=True)
    for n, (label, mw) in enumerate(
        [("POM_5V_IN", 4000), ("POM_5V_GPU", 1000), ("POM_5V_CPU", 1500)]
    ):
        (iio / f"rail_name_{n}").write_text(label + "\n")
        (iio / f"in_power{n}_input").write_text(f"{mw}\n")
        (iio / f"in_current{n}_input").write_text("800\n")
        (iio / f"in_voltage{n}_input").write_text("5000\n")
    return iio


def run_window(
    meter: Ina3221Meter, clock: FakeClock, seconds: float, period: float = 0.05, between=None
):
    with meter.window() as w:
        for _ in range(round(seconds / period)):
            clock.t += period
            if between:
                between(clock.t)
            meter.sampler.poll()
    return w.record


def meter_for(root: Path, **cfg) -> tuple[Ina3221Meter, FakeClock]:
    clock = FakeClock()
    return Ina3221Meter(Ina3221Config(sysfs_root=str(root), **cfg), clock=clock, start=False), clock


def test_orin_nano_total_is_vdd_in_and_rails_are_kept(tmp_path):
    orin_nano(tmp_path)
    meter, clock = meter_for(tmp_path)
    try:
        assert meter.channels == ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC")
        assert meter.total_channel == "VDD_IN"
        rec = run_window(meter, clock, 2.0)
    finally:
        meter.close()
    assert rec.joules == pytest.approx(7.0 * 2.0)  # 5 V x 1.4 A, not the sum of rails
    assert rec.per_rail_j == pytest.approx({"VDD_IN": 14.0, "VDD_CPU_GPU_CV": 5.0, "VDD_SOC": 3.0})
    assert rec.method == "ina3221" and not rec.approximate
    assert "VDD_IN" in meter.scope


def test_agx_orin_sums_rails_and_skips_nc_and_sum_channels(tmp_path):
    agx_orin(tmp_path)
    meter, clock = meter_for(tmp_path)
    try:
        assert set(meter.channels) == {
            "VDD_GPU_SOC",
            "VDD_CPU_CV",
            "VIN_SYS_5V0",
            "VDDQ_VDD2_1V8AO",
        }
        assert meter.total_channel is None
        rec = run_window(meter, clock, 1.0)
    finally:
        meter.close()
    assert rec.joules == pytest.approx(5.0 * (0.6 + 0.4 + 0.8 + 0.2))


def test_jetpack4_iio_layout_reads_power_in_mw(tmp_path):
    jetpack4_nano(tmp_path)
    meter, clock = meter_for(tmp_path)
    try:
        assert meter.total_channel == "POM_5V_IN"
        rec = run_window(meter, clock, 1.0)
    finally:
        meter.close()
    assert rec.joules == pytest.approx(4.0)
    assert rec.per_rail_j["POM_5V_GPU"] == pytest.approx(1.0)


def test_changing_values_follow_the_trace(tmp_path):
    hw = orin_nano(tmp_path)
    meter, clock = meter_for(tmp_path)
    curr = hw / "curr1_input"

    def ramp(t: float) -> None:  # VDD_IN current ramps 1000 -> 3000 mA over 2 s
        curr.write_text(f"{round(1000 + 1000 * t)}\n")

    try:
        ramp(0.0)
        meter.sampler.poll()
        rec = run_window(meter, clock, 2.0, between=ramp)
    finally:
        meter.close()
    assert rec.joules == pytest.approx(5.0 * (1.0 * 2 + 0.5 * 4), rel=1e-3)  # 5 V x mean 2 A x 2 s


def test_disabled_channel_is_skipped_and_ina238_power_is_read(tmp_path):
    hw = orin_nano(tmp_path)
    (hw / "in3_enable").write_text("0\n")
    ina238 = tmp_path / "bus/i2c/drivers/ina238/2-0044/hwmon/hwmon9"
    ina238.mkdir(parents=True)
    (ina238 / "power1_input").write_text("2500000\n")  # uW
    (ina238 / "label").write_text("VDD_GPU\n")
    rails = {r.name for r in discover_rails(tmp_path)}
    assert rails == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_GPU:1"}
    meter, clock = meter_for(tmp_path)
    try:
        rec = run_window(meter, clock, 1.0)
    finally:
        meter.close()
    assert rec.per_rail_j["VDD_GPU:1"] == pytest.approx(2.5)


def test_no_sensors_says_why(tmp_path):
    with pytest.raises(BackendUnavailable, match="not a Jetson"):
        discover_rails(tmp_path)
    (tmp_path / "bus/i2c/drivers/ina3221/1-0040").mkdir(parents=True)
    with pytest.raises(BackendUnavailable, match="no INA3221"):
        create_meter("ina3221", sysfs_root=str(tmp_path))


def test_garbage_value_is_a_read_error_naming_the_file(tmp_path):
    hw = orin_nano(tmp_path)
    meter, clock = meter_for(tmp_path)
    try:
        w = meter.window().open()
        clock.t = 0.5
        (hw / "curr2_input").write_text("not-a-number\n")
        w.close()
        with pytest.raises(EnergyReadError, match="curr2_input"):
            _ = w.record
    finally:
        meter.close()


def test_permission_denied_explains_the_fix(tmp_path, monkeypatch):
    orin_nano(tmp_path)
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path).endswith("curr1_input"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("edged.energy.ina3221.os.open", deny)
    with pytest.raises(PermissionDenied, match="CAP_DAC_READ_SEARCH"):
        meter_for(tmp_path)


def test_live_sampler_thread_on_fake_tree(tmp_path):
    orin_nano(tmp_path)
    meter = create_meter("ina3221", sysfs_root=str(tmp_path), period_s=0.01)

    try:
        wait_samples(meter.sampler, 3)
        with meter.window() as w:
            wait_samples(meter.sampler, meter.sampler.sample_count + 3)
        assert meter.power_w()["total"] == pytest.approx(7.0)
    finally:
        meter.close()
    assert w.record.joules == pytest.approx(7.0 * w.record.window_s)
    assert w.record.samples >= 4  # three from the thread, one at the closing edge


def test_garbled_value_at_start_is_unavailable_not_a_crash(tmp_path):
    hw = orin_nano(tmp_path)
    (hw / "curr1_input").write_text("x\n")
    with pytest.raises(BackendUnavailable, match=r"first reading failed.*curr1_input"):
        create_meter("ina3221", sysfs_root=str(tmp_path))


def test_closed_meter_reads_nothing_more(tmp_path):
    orin_nano(tmp_path)
    meter, _ = meter_for(tmp_path)
    meter.close()
    with pytest.raises(EnergyReadError, match="closed"):
        meter.sampler.poll()
