"""Issue 12, the first hour: no daemon, default endpoints, startup messages, CLI help.

Subprocesses run `python -m edged ...` from this tree; loopback/ipc only. Times are bounded
generously: the point is "well before the old 60 s / 180 s", not a benchmark.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"


def edged(*args: str, env: dict[str, str] | None = None,
          timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    base = {k: v for k, v in os.environ.items() if k != "EDGED_ENDPOINT"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edged", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={**base, "HF_HUB_OFFLINE": "1", **(env or {})})
    return proc, time.monotonic() - t0


@pytest.fixture
def sockdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="edged-fh-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.mark.parametrize("command", [["ask", "12+34="], ["health"], ["stats"]])
def test_no_daemon_fails_fast_with_a_clear_message(command, sockdir):
    """No socket file: exit 3 at once (it was 60 s for ask, 180 s for health/stats)."""
    proc, took = edged(*command, env={"EDGED_ENDPOINT": f"ipc://{sockdir}/edged.sock"})
    assert proc.returncode == 3, proc.stderr
    assert "no daemon at" in proc.stderr and "does not exist" in proc.stderr
    assert "edged serve" in proc.stderr
    assert took < 5, took


@pytest.mark.parametrize("command", [["ask", "12+34="], ["health"], ["stats"]])
def test_a_dead_daemons_socket_file_fails_fast(command, sockdir):
    path = sockdir / "edged.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
    try:
        proc, took = edged(*command, "--endpoint", f"ipc://{path}")
    finally:
        left.close()
    assert proc.returncode == 3 and "left over" in proc.stderr, proc.stderr
    assert took < 5, took


def test_health_of_a_daemon_that_does_not_answer_takes_about_2_s(sockdir):
    ctx = zmq.Context()
    mute = ctx.socket(zmq.ROUTER)  # accepts connections, never replies
    mute.bind(f"ipc://{sockdir}/edged.sock")
    try:
        proc, took = edged("health", "--endpoint", f"ipc://{sockdir}/edged.sock")
    finally:
        ctx.destroy(linger=0)
    assert proc.returncode == 3
    assert "no reply" in proc.stderr and "in 2 s (1 attempt)" in proc.stderr, proc.stderr
    assert took < 8, took  # 2 s + the interpreter's start; it was 180 s


def test_one_default_endpoint_for_client_cli_and_daemon(tmp_path, monkeypatch):
    from edged.client import Client, default_endpoint
    from edged.commands.client_cmds import endpoint_of
    from edged.server.app import default_endpoint as daemon_default

    for var in ("EDGED_ENDPOINT", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    expected = f"ipc://{tmp_path / 'edged' / 'edged.sock'}"
    assert default_endpoint() == expected == daemon_default()
    import argparse

    assert endpoint_of(argparse.Namespace(endpoint=None)) == expected
    client = Client()
    try:
        assert client.endpoint == expected
    finally:
        client.close()
    monkeypatch.setenv("EDGED_ENDPOINT", "tcp://127.0.0.1:5555")
    assert default_endpoint() == "tcp://127.0.0.1:5555"


def test_serve_with_a_missing_model_dir_says_so_once(tmp_path):
    proc, _ = edged("serve", "--model", str(tmp_path / "nope"), "--endpoint",
                    f"ipc://{tmp_path}/s.sock", "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 2
    assert "RuntimeWarning" not in proc.stderr and "<defaults>" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "does not exist" in ln]
    assert len(lines) == 1 and "--model" in lines[0], proc.stderr


@pytest.mark.skipif(not (DEMO / "zoo.toml").is_file(), reason="demo zoo not trained")
def test_generate_on_a_zoo_dir_says_what_to_point_at(tmp_path):
    proc, _ = edged("generate", "--model", str(DEMO), "1+1=")
    assert proc.returncode == 3
    assert "is a zoo" in proc.stderr and str(DEMO / "small") in proc.stderr.replace(
        "large", "small").replace("medium", "small")
    export = tmp_path / "exported"
    (export / "onnx").mkdir(parents=True)
    (export / "onnx" / "config.json").write_text("{}")
    proc, _ = edged("generate", "--model", str(export), "1+1=")
    assert proc.returncode == 3 and f"--model {export / 'onnx'}" in proc.stderr


def test_exit_codes_are_in_the_help():
    gen, _ = edged("generate", "--help")
    assert "exit status: 0" in gen.stdout and "3 the model directory" in gen.stdout
    health, _ = edged("health", "--help")
    assert "exit status: 0 serving, 1 draining" in health.stdout and "3 no daemon" in health.stdout


def test_energy_watch_with_the_estimate_meter_says_what_it_measures():
    proc, _ = edged("energy", "watch", "--backend", "estimate", "--seconds", "0.6",
                    "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "this `edged energy watch` process alone" in proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cpu" in proc.stdout.split("{", 1)[0]  # the table shows the cpu rail ...
    assert set(doc["per_rail_j"]) == {"cpu"}     # ... and the JSON has its joules
    assert doc["per_rail_j"]["cpu"] == doc["joules"] and doc["scope"]


@pytest.mark.skipif(not (DEMO / "zoo.toml").is_file(), reason="demo zoo not trained")
@pytest.mark.slow
def test_startup_says_whether_router_state_was_restored(tmp_path):
    state = tmp_path / "state"
    endpoint = f"ipc://{tmp_path}/s.sock"
    logs = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "edged", "serve", "--endpoint", endpoint, "--state-dir",
             str(state)], cwd=REPO, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        from edged.client import Client, ClientError

        end = time.monotonic() + 120
        while True:
            try:
                with Client(endpoint, timeout_s=2, retries=0) as client:
                    client.generate("12+34=", reference="46")
                    break
            except ClientError:
                assert time.monotonic() < end and proc.poll() is None
                time.sleep(0.2)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        logs.append(err)
    assert "no saved state at" in logs[0] and "starting fresh" in logs[0]
    restored = [ln for ln in logs[1].splitlines() if "router state restored from" in ln]
    assert restored and str(state) in restored[0], logs[1]
    assert "t=1 requests" in restored[0] and "1 labels" in restored[0]
