"""Who may talk to the daemon: ipc file permissions, the tcp loopback rule, CURVE allow-lists."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edged.config import ServerConfig

log = logging.getLogger("edged.server")


class SecurityError(RuntimeError):
    """The endpoint or the keys do not allow serving safely."""


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an `ipc://` endpoint; None for tcp and abstract (`ipc://@name`) ones."""
    if not endpoint.startswith("ipc://"):
        return None
    rest = endpoint[len("ipc://"):]
    return None if rest.startswith("@") else Path(rest)


def is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: could be anything


def check_endpoint(endpoint: str, server: ServerConfig) -> None:
    """Refuse tcp on a non-loopback address without CURVE, unless the config allows it."""
    if not endpoint.startswith("tcp://") or is_loopback(endpoint):
        return
    if server.curve_secret_key is not None:
        return
    if not server.allow_insecure_tcp:
        raise SecurityError(
            f"refusing to serve {endpoint} without CURVE: anyone on the network could use it; "
            "set [server] curve_secret_key and curve_client_keys, or allow_insecure_tcp = true"
        )
    log.warning("serving %s without encryption or authentication", endpoint)


def prepare_ipc(path: Path) -> None:
    """Create the socket's directory and remove a stale socket file; refuse a live one."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # left behind by a daemon that died
        return
    except OSError as exc:
        raise SecurityError(f"{path} exists and is not a usable socket: {exc}") from None
    finally:
        probe.close()
    raise SecurityError(f"another process is serving {path}")


def bind(sock: zmq.Socket, endpoint: str, server: ServerConfig) -> None:
    """Bind with the socket file created owner-only, then widened to `ipc_mode` (group access)."""
    path = ipc_path(endpoint)
    if path is None:
        if endpoint.startswith("ipc://@"):
            log.warning("abstract ipc socket %s has no file permissions", endpoint)
        sock.bind(endpoint)
        return
    prepare_ipc(path)
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    os.chmod(path, server.ipc_mode)


def setup_curve(ctx: zmq.Context, sock: zmq.Socket, server: ServerConfig) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that admits only the public keys in `curve_client_keys`."""
    assert server.curve_secret_key is not None and server.curve_client_keys is not None
    try:
        public, secret = zmq.auth.load_certificate(server.curve_secret_key)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read {server.curve_secret_key}: {exc}") from None
    if not secret:
        raise SecurityError(f"{server.curve_secret_key} holds no secret key")
    clients = server.curve_client_keys
    if not clients.is_dir() or not any(clients.glob("*.key")):
        raise SecurityError(f"{clients} holds no client public keys (*.key)")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth
