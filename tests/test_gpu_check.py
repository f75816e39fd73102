"""tools/gpu_check.py passes its own CPU dry run (CPU provider, simulated NVML counter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    return load_tool("gpu_check")


def test_dry_run_passes(gpu_check, tmp_path: Path, capsys) -> None:
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--dry-run", "--model", str(ROOT / "models" / "demo" / "large"),
                         "--new-tokens", "8", "--repeats", "1", "--energy-s", "1.5",
                         "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report
    steps = {r["step"]: r for r in report["rows"]}
    assert report["provider"] == "CPUExecutionProvider" and report["dry_run"]
    assert steps["runtime"]["status"] == "ok"
    assert steps["stories260k"]["status"] in ("ok", "skip")
    assert steps["model:large"]["status"] == "ok"
    assert steps["bench:large"]["tokens_per_s"] >= 0
    energy = steps["energy"]
    assert energy["status"] == "ok" and energy["simulated"]
    assert abs(energy["ratio"] - 1) <= gpu_check.ENERGY_TOLERANCE
    assert "passed in" in capsys.readouterr().out


def test_a_wrong_energy_reading_fails(gpu_check, monkeypatch) -> None:
    """The energy comparison is a real check: a meter that reads 20% high fails it."""
    import edged.energy as energy

    real = energy.NvmlMeter

    class High(real):
        def _measure(self, start, end):
            record = super()._measure(start, end)
            object.__setattr__(record, "joules", record.joules * 1.2)
            return record

    monkeypatch.setattr(energy, "NvmlMeter", High)
    status, _, extra = gpu_check.check_energy(None, 1.0, 0, True)
    assert status == "FAIL" and extra["ratio"] == pytest.approx(1.2, rel=0.05)


def test_gpu_mode_without_cuda_fails_clearly(gpu_check) -> None:
    status, detail, _ = gpu_check.check_runtime("CUDAExecutionProvider")
    assert status == "FAIL" and "CUDAExecutionProvider not in" in detail
