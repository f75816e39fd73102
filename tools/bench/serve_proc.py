"""Start `edged serve` as a subprocess for the benchmarks, ready when systemd's READY=1 comes.

Shared by tools/bench/load.py and tools/bench/crash.py, which run it from different trees and
configs; waiting on the real sd_notify datagram means the benchmark never races the start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO


def start_serve(config: Path, work: Path, endpoint: str, *, cwd: Path, log_mode: str = "ab",
                env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """`python -m edged serve --config CONFIG` in `cwd`, its output in WORK/daemon.log; returns
    the process and the open log (the caller closes it after the process ends)."""
    notify_path = work / "notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "EDGED_ENDPOINT": endpoint,
                "OMP_NUM_THREADS": "1", **(env or {})}
    log = open(work / "daemon.log", log_mode)  # noqa: SIM115 - the caller closes it
    proc = subprocess.Popen([sys.executable, "-m", "edged", "serve", "--config", str(config)],
                            cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not notify.recv(4096).startswith(b"READY=1"):
            pass
    finally:
        notify.close()
    return proc, log


def stop_serve(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """SIGTERM (the daemon drains and exits), SIGKILL if it is still running after
    `timeout_s`; the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
