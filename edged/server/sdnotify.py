"""systemd's notify protocol, written directly: one datagram per message to `$NOTIFY_SOCKET`.

Twenty lines of stdlib beat a dependency: the protocol is newline-separated `KEY=VALUE` text sent
to an AF_UNIX datagram socket, whose name starts with `@` for the abstract namespace. Outside
systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING/RELOADING to systemd; silent when not under it."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address: str | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self.watchdog_interval_s = _watchdog_interval_s()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; returns False (never raises, never blocks) when systemd is not
        listening or its queue is full (a blocking send would wedge the serving loop)."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            data = "\n".join(lines).encode("utf-8")
            self._sock.sendto(data, socket.MSG_DONTWAIT, self._address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading config")

    def stopping(self, status: str = "draining") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    @contextlib.contextmanager
    def keepalive(self) -> Iterator[None]:
        """Ping the watchdog from a helper thread while the serving loop is busy (a reload)."""
        interval = self.watchdog_interval_s
        if interval is None or self._address is None:
            yield
            return
        done = threading.Event()

        def ping() -> None:
            while not done.wait(interval):
                self.notify("WATCHDOG=1")

        thread = threading.Thread(target=ping, name="edged-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval_s() -> float | None:
    """Half of `$WATCHDOG_USEC` when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None
