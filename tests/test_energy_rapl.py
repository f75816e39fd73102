"""RAPL counters on a fake powercap tree, wraparound and permission errors included."""

from __future__ import annotations

import math
import pathlib
from pathlib import Path

import pytest
from test_energy_sampler import FakeClock

from edged.energy import BackendUnavailable, PermissionDenied, RaplConfig, RaplMeter, create_meter
from edged.energy.rapl import discover_zones

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI

MAX_UJ = 1_000_000  # a tiny range (1 J) so the test can wrap it: the counter counts modulo this


def zone(root: Path, name: str, zone_name: str, uj: int, max_uj: int = MAX_UJ - 1) -> Path:
    path = root / "class/powercap" / name
    path.mkdir(parents=True)
    (path / "name").write_text(zone_name + "\n")
    (path / "energy_uj").write_text(f"{uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def intel_tree(root: Path) -> dict[str, Path]:
    (root / "class/powercap/intel-rapl").mkdir(parents=True)  # the control type: no counter
    (root / "class/powercap/intel-rapl/enabled").write_text("1\n")
    return {
        "package-0": zone(root, "intel-rapl:0", "package-0", 900_000),
        "core": zone(root, "intel-rapl:0:0", "core", 5),
        "uncore": zone(root, "intel-rapl:0:1", "uncore", 5),
        "dram-0": zone(root, "intel-rapl:0:2", "dram", 100_000),
        "mmio": zone(root, "intel-rapl-mmio:0", "package-0", 42),
        "psys": zone(root, "intel-rapl:1", "psys", 7),
    }


def test_discovers_package_and_dram_only(tmp_path):
    intel_tree(tmp_path)
    assert [z.name for z in discover_zones(tmp_path)] == ["package-0", "dram-0"]


def test_counter_differences_with_a_wraparound(tmp_path):
    zones = intel_tree(tmp_path)
    clock = FakeClock()
    meter = RaplMeter(RaplConfig(sysfs_root=str(tmp_path)), clock=clock, start=False)
    pkg = zones["package-0"] / "energy_uj"
    dram = zones["dram-0"] / "energy_uj"
    try:
        # package draws 2 W: +100_000 uJ per 50 ms, wrapping past 1_000_000 on the way
        with meter.window() as w:
            uj, d = 900_000, 100_000
            for _ in range(20):
                clock.t += 0.05
                uj = (uj + 100_000) % MAX_UJ
                d += 5_000
                pkg.write_text(f"{uj}\n")
                dram.write_text(f"{d}\n")
                meter.sampler.poll()
        rec = w.record
    finally:
        meter.close()
    assert rec.per_rail_j["package-0"] == pytest.approx(2.0)  # 20 x 0.1 J across two wraps
    assert rec.per_rail_j["dram-0"] == pytest.approx(0.1)
    assert rec.joules == pytest.approx(2.1)
    assert rec.window_s == pytest.approx(1.0)
    assert rec.method == "rapl" and not rec.approximate


def test_wrap_modulus_is_max_range_plus_one(tmp_path):
    # the kernel's counter takes every value 0..max_energy_range_uj, then wraps to 0
    path = zone(tmp_path, "intel-rapl:0", "package-0", 900, max_uj=999) / "energy_uj"
    clock = FakeClock()
    meter = RaplMeter(RaplConfig(sysfs_root=str(tmp_path)), clock=clock, start=False)
    try:
        with meter.window() as w:
            for uj in (950, 999, 0, 100):  # 900 -> 999 -> wrap -> 100: 200 uJ
                clock.t += 0.05
                path.write_text(f"{uj}\n")
                meter.sampler.poll()
    finally:
        meter.close()
    assert w.record.per_rail_j["package-0"] * 1e6 == pytest.approx(200.0, abs=1e-6)


def counter_tree(root: Path) -> Path:
    """One package zone whose counter moves only every 50 ms, like real RAPL firmware."""
    return zone(root, "intel-rapl:0", "package-0", 0, max_uj=2**40) / "energy_uj"


def at(clock: FakeClock, path: Path, t: float, watts: float = 1.0) -> None:
    """Move the fake clock to `t` and the counter to the energy of 50 ms updates up to it."""
    clock.t = t
    path.write_text(f"{int(watts * 1e6 * 0.05 * math.floor(t / 0.05 + 1e-9))}\n")


def test_idle_baseline_survives_window_churn(tmp_path):
    """Issue 16.1: constant 1 W, no load. Back-to-back windows (each edge a reading 1 ms after
    the last, the counter mostly unchanged) must not drag the baseline down."""
    path = counter_tree(tmp_path)
    clock = FakeClock()
    meter = RaplMeter(RaplConfig(sysfs_root=str(tmp_path)), clock=clock, start=False)
    try:
        t = 0.0
        for _ in range(60):  # 3 s of regular polling
            t += 0.05
            at(clock, path, t)
            meter.sampler.poll()
        for _ in range(30):  # 1.5 s of churn: a poll, then a 1 ms window right after it
            t += 0.05
            at(clock, path, t)
            meter.sampler.poll()
            window = meter.window().open()
            at(clock, path, t + 0.001)
            window.close()
        assert meter.sampler.idle_w() == pytest.approx(1.0, rel=0.06)
        with meter.window() as idle:  # a 1 s idle window
            for _ in range(20):
                t += 0.05
                at(clock, path, t)
                meter.sampler.poll()
        rec = idle.record
    finally:
        meter.close()
    assert rec.joules == pytest.approx(1.0, rel=0.06)
    assert rec.dynamic_joules / rec.joules < 0.1


def test_amd_zone_names_are_accepted(tmp_path):
    zone(tmp_path, "amd-rapl:0", "package-0", 10)
    assert [z.name for z in discover_zones(tmp_path)] == ["package-0"]


def test_absent_powercap_says_so(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"no .*class/powercap"):
        create_meter("rapl", sysfs_root=str(tmp_path))
    (tmp_path / "class/powercap/intel-rapl").mkdir(parents=True)
    with pytest.raises(BackendUnavailable, match="no RAPL package or dram zone"):
        discover_zones(tmp_path)


def test_root_only_counter_explains_root_or_capability(tmp_path, monkeypatch):
    intel_tree(tmp_path)
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":  # what Linux >= 5.10 does to non-root readers
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    with pytest.raises(PermissionDenied, match=r"root.*CAP_DAC_READ_SEARCH") as info:
        create_meter("rapl", sysfs_root=str(tmp_path))
    assert info.value.path.endswith("energy_uj")


def test_probe_reports_whether_this_machine_has_powercap():
    from edged.energy import probe

    result = probe()["rapl"]
    if Path("/sys/class/powercap").is_dir():
        assert result.available or "powercap" in result.reason or "denied" in result.reason
    else:
        assert not result.available and "/sys/class/powercap" in result.reason
