"""sd_notify over a real AF_UNIX datagram socket, path and abstract namespace."""

from __future__ import annotations

import os
import socket
import threading
import uuid

import pytest

from edged.server.sdnotify import Notifier

pytestmark = pytest.mark.timeout(30)


def listen(tmp_path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"edged-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(5)
    return sock, address


@pytest.mark.parametrize("abstract", [False, True])
def test_messages_arrive_in_order(tmp_path, abstract):
    sock, address = listen(tmp_path, abstract)
    notifier = Notifier(address)
    assert notifier.enabled
    assert notifier.status("loading models")
    assert notifier.ready("serving 2 models")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.stopping("draining 1 requests")
    got = [sock.recv(4096).decode() for _ in range(5)]
    assert got[0] == "STATUS=loading models"
    assert got[1].split("\n") == ["READY=1", "STATUS=serving 2 models", f"MAINPID={os.getpid()}"]
    assert got[2] == "WATCHDOG=1"
    lines = got[3].split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    assert got[4] == "STOPPING=1\nSTATUS=draining 1 requests"
    notifier.close()
    sock.close()


def test_disabled_without_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and not notifier.ready("x")


def test_vanished_listener_is_not_an_error(tmp_path):
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.notify("STATUS=x") is False


def test_a_listener_that_does_not_read_never_blocks_the_sender(tmp_path):
    sock, address = listen(tmp_path, abstract=False)  # never read: its queue fills up
    notifier = Notifier(address)
    sent: list[bool] = []
    sender = threading.Thread(target=lambda: sent.extend(notifier.watchdog() for _ in range(100)),
                              daemon=True)
    sender.start()
    sender.join(20)
    assert not sender.is_alive(), "notify blocked on a full listener queue"
    assert sent[0] is True and sent.count(False) > 0  # the overflow is dropped, not waited on
    notifier.close()
    sock.close()


@pytest.mark.parametrize("usec, pid, expected", [
    ("4000000", None, 2.0), ("4000000", "self", 2.0), ("4000000", "1", None),
    ("0", None, None), ("junk", None, None), (None, None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(os.getpid()) if value == "self" else value)
    assert Notifier("").watchdog_interval_s == expected


def test_keepalive_pings_while_the_loop_is_busy(tmp_path, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    sock, address = listen(tmp_path, abstract=False)
    notifier = Notifier(address)
    sock.settimeout(20)  # a busy machine may delay the pings, not stop them
    with notifier.keepalive():  # the caller blocks meanwhile: the pings come from a thread
        pings = [sock.recv(64) for _ in range(3)]
    assert set(pings) == {b"WATCHDOG=1"}
    sock.settimeout(0.5)  # and they stop with the block
    try:
        while sock.recv(64):
            pass
    except TimeoutError:
        pass
    with pytest.raises(TimeoutError):
        sock.recv(64)
    notifier.close()
    sock.close()
