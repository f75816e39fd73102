"""systemd/edged.service: `systemd-analyze verify` passes and the settings the daemon relies on
are there (notify + watchdog + reload, hardening that keeps GPU device nodes visible)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "edged.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_declares_what_the_daemon_relies_on():
    s = settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["ExecStart"][0].startswith("/usr/local/bin/edged serve")
    assert s["RestartPreventExitStatus"] == ["2"]
    for key in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "StateDirectory",
                "RuntimeDirectory", "ProtectHome"):
        assert key in s, key
    for key in ("PrivateDevices", "DeviceAllow", "ProtectClock", "DevicePolicy"):
        assert key not in s, f"{key} would hide /dev/nvidia* or Jetson device nodes"
    assert s["SupplementaryGroups"] == ["video"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is absent")
def test_systemd_analyze_verify(tmp_path):
    edged = Path(sys.executable).parent / "edged"
    if not edged.exists():
        pytest.skip(f"no edged console script beside {sys.executable}")
    unit = tmp_path / "edged.service"  # ExecStart must exist for verify: point it at the venv
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edged", str(edged)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "edged.service" not in proc.stderr, proc.stderr  # no warning about our unit


def test_one_worker_per_device_named_by_provider():
    from edged.server.app import device_of

    assert device_of("CPUExecutionProvider") == "cpu"
    assert device_of("CUDAExecutionProvider") == device_of("TensorrtExecutionProvider") == "cuda"
    assert device_of("CoreMLExecutionProvider") == "coreml"
