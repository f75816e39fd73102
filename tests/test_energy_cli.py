"""`edged energy probe` and `edged energy watch` through the real CLI entry point."""

from __future__ import annotations

import json
import sys

import pytest
from test_energy_ina3221 import orin_nano

from edged.cli import main

pytestmark = pytest.mark.timeout(60)  # a hung sampler thread fails, never hangs CI


def test_probe_on_this_machine_names_estimate_and_reasons(capsys):
    assert main(["energy", "probe"]) == 0
    out = capsys.readouterr().out
    assert "estimate  yes" in out
    for name in ("nvml", "ina3221", "jtop", "rapl"):
        assert name in out
    assert "auto picks:" in out


def test_probe_json_with_fake_tree(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    orin_nano(tmp_path)
    assert main(["energy", "probe", "--json", "-o", f"sysfs_root={tmp_path}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["auto"] == "ina3221"
    assert data["backends"]["ina3221"]["channels"] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert "pynvml" in data["backends"]["nvml"]["reason"]


def test_watch_prints_rails_and_final_record(tmp_path, capsys):
    orin_nano(tmp_path)
    argv = [
        "energy",
        "watch",
        "--backend",
        "ina3221",
        "--seconds",
        "0.5",
        "--interval",
        "0.2",
        "-o",
        f"sysfs_root={tmp_path}",
        "-o",
        "period_s=0.02",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "VDD_CPU_GPU_CV" in out and "7.000" in out
    final = json.loads(out.strip().splitlines()[-1])
    assert final["backend"] == "ina3221"
    assert final["joules"] == pytest.approx(7.0 * final["window_s"])


def test_watch_forced_unavailable_backend_is_a_clear_error(tmp_path, capsys):
    code = main(["energy", "watch", "--backend", "rapl", "-o", f"sysfs_root={tmp_path}"])
    assert code == 3
    assert "rapl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["energy", "probe", "-o", "nonsense"],
        ["energy", "probe", "-o", "colour=red"],
        ["energy", "watch", "--backend", "estimate", "-o", "watts_per_core=-3"],
        ["energy", "watch", "--interval", "0"],
    ],
)
def test_bad_options_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "edged energy: error:" in capsys.readouterr().err
