"""Backend choice: probing, auto order, forced backends never falling back, option checks."""

from __future__ import annotations

import math
import sys

import pytest
from test_energy_ina3221 import orin_nano

from edged.energy import (
    BackendUnavailable,
    EnergyConfigError,
    EstimateMeter,
    Ina3221Meter,
    NullMeter,
    auto_choice,
    create_meter,
    probe,
)

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)


def test_probe_without_sensors_reports_estimate_and_why_not(tmp_path, no_nvml):
    results = probe(sysfs_root=str(tmp_path))
    assert list(results) == ["nvml", "ina3221", "jtop", "rapl", "estimate"]
    assert not results["nvml"].available and "pynvml" in results["nvml"].reason
    assert not results["ina3221"].available and "i2c" in results["ina3221"].reason
    assert not results["rapl"].available and "powercap" in results["rapl"].reason
    assert results["estimate"].available
    assert auto_choice(results) == "estimate"
    assert results["rapl"].to_dict()["available"] is False
    meter = create_meter("auto", sysfs_root=str(tmp_path), watts_per_core=3.0)
    try:
        assert isinstance(meter, EstimateMeter)
    finally:
        meter.close()


def test_auto_prefers_the_jetson_rails_when_present(tmp_path, no_nvml):
    orin_nano(tmp_path)
    results = probe(sysfs_root=str(tmp_path))
    assert results["ina3221"].available
    assert results["ina3221"].channels == ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC")
    assert auto_choice(results) == "ina3221"
    meter = create_meter("auto", sysfs_root=str(tmp_path), period_s=0.02, watts_per_core=3.0)
    try:
        assert isinstance(meter, Ina3221Meter)
        with meter.window() as w:
            pass
        assert w.record.method == "ina3221"
    finally:
        meter.close()


def test_forced_backend_never_falls_back(tmp_path, no_nvml):
    for name in ("nvml", "ina3221", "rapl"):
        opts = {} if name == "nvml" else {"sysfs_root": str(tmp_path)}
        with pytest.raises(BackendUnavailable) as info:
            create_meter(name, **opts)
        assert info.value.backend == name and info.value.reason


def test_unknown_backend_and_options_are_config_errors():
    with pytest.raises(EnergyConfigError, match="unknown energy backend 'gpu'"):
        create_meter("gpu")
    with pytest.raises(EnergyConfigError, match="unknown energy option"):
        create_meter("auto", perod_s=0.1)
    with pytest.raises(EnergyConfigError, match="has no option"):
        create_meter("estimate", period_s=0.1)
    with pytest.raises(EnergyConfigError, match="period_s"):
        create_meter("auto", period_s=-1)
    with pytest.raises(EnergyConfigError, match="takes no options"):
        create_meter("none", period_s=1)


def test_none_backend_is_the_null_meter():
    meter = create_meter("none")
    assert isinstance(meter, NullMeter)
    with meter.window() as w:
        pass
    assert math.isnan(w.record.to_dict()["joules"])


def test_this_machine_probes_without_crashing():
    results = probe()
    assert results["estimate"].available
    for result in results.values():
        assert result.available or result.reason
