"""Run the front: parse `--listen`, enforce the loopback/API-key rule, start uvicorn.

The rule mirrors the daemon's tcp/CURVE one: a loopback listen is open to local users (as a
loopback tcp endpoint is); any other address needs a bearer API key, else the front refuses to
start. The key file must be private (no group/other bits), like a CURVE secret key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from edged.http.app import HttpConfig, create_app


class HttpConfigError(ValueError):
    """A listen address, key file or combination the front refuses to start with."""


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (all addresses) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise HttpConfigError(f"listen {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise HttpConfigError(f"listen {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise HttpConfigError(f"listen {text!r}: port must be in [0, 65535]")
    return host or "0.0.0.0", port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def load_api_key(path: Path) -> str:
    """The first line of a private file (0600 or stricter)."""
    try:
        mode = os.stat(path).st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HttpConfigError(f"API key file {path}: {exc.strerror or exc}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise HttpConfigError(f"API key file {path} is readable by group or others "
                              f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(key) < 16:
        raise HttpConfigError(f"API key file {path}: the key must be at least 16 characters")
    return key


def check_exposure(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise HttpConfigError(
            f"listen address {host!r} is not loopback: give an API key (--api-key-file or "
            "$EDGED_HTTP_API_KEY) so that only clients with it may generate")


def sd_notify(*lines: str) -> bool:
    """systemd's notify protocol, a few lines of it (edged.server's Notifier would import the
    whole daemon: onnxruntime, numpy, ~40 MiB the front does not need)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, target)
        return True
    except OSError:
        return False


def serve(config: HttpConfig, host: str, port: int, *, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Blocking: serve until SIGTERM/SIGINT (uvicorn drains open requests first)."""
    import prometheus_client
    import uvicorn

    prometheus_client.disable_created_metrics()  # process-wide: the front is its own process
    check_exposure(host, config.api_key)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """uvicorn re-raises SIGTERM after its graceful shutdown (the process then dies
            by the signal); a drained stop is a clean one: exit 0, as `edged serve` does."""
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

        async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
            await super().startup(sockets)
            if self.started and on_ready is not None:
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
                on_ready(", ".join(f"{a[0]}:{a[1]}" for a in bound))

    uv_config = uvicorn.Config(
        create_app(config), host=host, port=port, log_level=log_level, access_log=False,
        server_header=False, proxy_headers=False, timeout_graceful_shutdown=30,
        lifespan="on")
    Server(uv_config).run()
