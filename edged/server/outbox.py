"""Replies the ROUTER socket could not take yet, held per client with bounded work per tick.

A client that stops reading reaches its high-water mark; ZeroMQ then refuses (EAGAIN) every send
to it. Retrying all held replies on every loop wake-up made one such client cost everyone (the
loop spent its time on sends that could not succeed). Here each client has its own queue, capped
at `per_peer` replies (older ones beyond it are dropped, counted), and a tick retries at most
`peers_per_tick` clients, round-robin, at most `burst` replies each: a slow reader costs O(1) per
tick whatever it sends. While a client has held replies, new replies to it join its queue
without a send attempt (order is kept and no time is spent on a full pipe); the socket loop
also treats such a client as paused (see `Server._serve_requests`).
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict, deque
from collections.abc import Callable

import zmq

PER_PEER = 256          # final replies held for one client before its oldest are dropped
PEERS_PER_TICK = 8      # clients retried per tick
BURST = 64              # replies sent to one client per retry, at most

log = logging.getLogger("edged.server")


class Outbox:
    """Per-client held replies; `send` and `retry` never block and never loop over all."""

    def __init__(self, sock: zmq.Socket, on_vanished: Callable[[bytes], None],
                 per_peer: int = PER_PEER, peers_per_tick: int = PEERS_PER_TICK,
                 burst: int = BURST) -> None:
        self.sock = sock
        self.on_vanished = on_vanished
        self.per_peer = per_peer
        self.peers_per_tick = peers_per_tick
        self.burst = burst
        self._held: OrderedDict[bytes, deque[list[bytes]]] = OrderedDict()
        self.held = 0           # replies held now
        self.dropped = 0        # replies never sent: parts at the HWM, overflow, gone clients
        self.attempts = 0       # sends tried for held replies (the work a slow reader costs)

    def backed_up(self, identity: bytes) -> bool:
        """True while `identity` has replies waiting: it is not reading."""
        return identity in self._held

    def full(self, identity: bytes) -> bool:
        queue = self._held.get(identity)
        return queue is not None and len(queue) >= self.per_peer

    def peers(self) -> int:
        return len(self._held)

    def send(self, frames: list[bytes], final: bool) -> None:
        """Send now, or hold a final reply for a client at its high-water mark (streamed parts
        are dropped there)."""
        identity = frames[0]
        queue = self._held.get(identity)
        if queue is not None:  # keep the order; the pipe was full at the last try
            self._hold(queue, frames, final)
            return
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._failed(exc, frames, final)

    def _hold(self, queue: deque[list[bytes]], frames: list[bytes], final: bool) -> None:
        if not final:
            self.dropped += 1
            return
        if len(queue) >= self.per_peer:
            queue.popleft()
            self.held -= 1
            self.dropped += 1
        queue.append(frames)
        self.held += 1

    def _failed(self, exc: zmq.ZMQError, frames: list[bytes], final: bool) -> None:
        if exc.errno == errno.EAGAIN:
            if final:
                self._held[frames[0]] = deque([frames])
                self.held += 1
            else:
                self.dropped += 1
            return
        self.dropped += 1
        if exc.errno == errno.EHOSTUNREACH:
            self._forget(frames[0])
            self.on_vanished(frames[0])
        else:
            log.warning("reply dropped: %s", exc)

    def _forget(self, identity: bytes) -> None:
        queue = self._held.pop(identity, None)
        if queue:
            self.held -= len(queue)
            self.dropped += len(queue)

    def retry(self) -> None:
        """One tick's bounded retry: the next `peers_per_tick` clients, `burst` replies each."""
        for _ in range(min(self.peers_per_tick, len(self._held))):
            identity, queue = next(iter(self._held.items()))
            self._held.move_to_end(identity)
            for _ in range(self.burst):
                self.attempts += 1
                try:
                    self.sock.send_multipart(queue[0], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EHOSTUNREACH:
                        self.dropped += 1
                        self._forget(identity)
                        self.on_vanished(identity)
                    elif exc.errno != errno.EAGAIN:
                        self.dropped += 1
                        queue.popleft()
                        self.held -= 1
                        if not queue:
                            del self._held[identity]
                    break
                queue.popleft()
                self.held -= 1
                if not queue:
                    del self._held[identity]
                    break

    def flush(self) -> None:
        """Retry everything once (shutdown)."""
        for _ in range(max(1, len(self._held))):
            if not self._held:
                return
            self.retry()
