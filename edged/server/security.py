"""Who may talk to the daemon: ipc file permissions, the tcp loopback rule, CURVE allow-lists."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edged.config import ServerConfig
from edged.paths import InsecureDirError, check_private_dir

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
    """Create the socket's directory (0750) or check that only we can change it; remove a stale
    socket file of ours; refuse a live socket, another user's, and anything that is not a
    socket (binding would replace the file)."""
    try:
        check_private_dir(path.parent, create=True)
    except InsecureDirError as exc:
        raise SecurityError(f"refusing to serve {path}: {exc}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SecurityError(
            f"{path} exists and is not a socket: refusing to replace it; choose another "
            "endpoint or remove the file")
    if st.st_uid != os.geteuid():
        raise SecurityError(f"{path} is a socket of uid {st.st_uid}, not ours: not touching it")
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


def bind(sock: zmq.Socket, endpoint: str, server: ServerConfig) -> tuple[int, int] | None:
    """Bind with the socket file created owner-only, then widened to `ipc_mode` (group access).
    Returns the socket file's (device, inode), so the daemon removes only its own file."""
    path = ipc_path(endpoint)
    if path is None:
        if endpoint.startswith("ipc://@"):
            log.warning("abstract ipc socket %s has no file permissions", endpoint)
        sock.bind(endpoint)
        return None
    prepare_ipc(path)
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    os.chmod(path, server.ipc_mode)  # the directory is private: no symlink swapped in
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_socket(path: Path, identity: tuple[int, int] | None) -> None:
    """Unlink the socket file only if it is still the one we bound (not a file put there since)."""
    if identity is None:
        return
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        path.unlink(missing_ok=True)


class _ZapLog:
    """pyzmq's authenticator logs rejections at debug level: say them as warnings (at most one
    a second, with a count), so an operator sees who is knocking."""

    def __init__(self) -> None:
        self._inner = logging.getLogger("edged.server.auth")
        self._last = 0.0
        self._quiet = 0

    def debug(self, msg: str, *args: object) -> None:
        # pyzmq passes the verdict as an argument ("%s (CURVE) ...", "DENIED", ...): look at
        # the formatted line, not at the format string
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = " ".join(map(str, (msg, *args)))
        if not text.startswith("DENIED"):
            self._inner.debug("%s", text)
            return
        now = time.monotonic()
        if now - self._last < 1.0:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last report)" if self._quiet else ""
        self._inner.warning("CURVE client rejected: %s%s", text, more)
        self._last, self._quiet = now, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def setup_curve(ctx: zmq.Context, sock: zmq.Socket, server: ServerConfig) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that admits only the public keys in `curve_client_keys`."""
    assert server.curve_secret_key is not None and server.curve_client_keys is not None
    try:
        mode = stat.S_IMODE(os.stat(server.curve_secret_key).st_mode)
    except OSError as exc:
        raise SecurityError(f"cannot read {server.curve_secret_key}: {exc}") from None
    if mode & 0o077:
        raise SecurityError(
            f"{server.curve_secret_key} is readable by others (mode {mode:04o}): anyone who "
            f"reads it can impersonate the daemon; chmod 600 {server.curve_secret_key}")
    try:
        public, secret = zmq.auth.load_certificate(server.curve_secret_key)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read {server.curve_secret_key}: {exc}") from None
    if not secret:
        raise SecurityError(f"{server.curve_secret_key} holds no secret key")
    clients = server.curve_client_keys
    if not clients.is_dir() or not any(clients.glob("*.key")):
        raise SecurityError(f"{clients} holds no client public keys (*.key)")
    auth = ThreadAuthenticator(ctx, log=_ZapLog())
    auth.start()
    auth.configure_curve(domain="*", location=str(clients))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth
