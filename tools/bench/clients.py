"""Closed-loop client threads for the benchmarks: every thread opens its own connection, all
start together behind a barrier, and each times its calls. Shared by tools/bench/daemon.py and
tools/bench/http_front.py."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any


def run_clients(n_clients: int, n_requests: int, call: Callable[[Any], None],
                setup: Callable[[], Any], teardown: Callable[[Any], None]
                ) -> tuple[list[float], float]:
    """`n_requests` calls spread over `n_clients` threads: latencies (ms) and wall time (s).
    A client that fails stops; the first failure is raised after every thread has ended."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    per_client = max(1, n_requests // n_clients)
    barrier = threading.Barrier(n_clients + 1)

    def client() -> None:
        mine: list[float] = []
        state = None
        try:
            state = setup()
            barrier.wait()
            for _ in range(per_client):
                t0 = time.perf_counter()
                call(state)
                mine.append((time.perf_counter() - t0) * 1000.0)
        except BaseException as exc:  # reported after the run
            errors.append(exc)
            barrier.abort()  # a failed setup must not leave the others waiting
        finally:
            if state is not None:
                teardown(state)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: see below
        barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:  # the cause first, not the broken barrier it left the others
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                     errors[0])
        raise RuntimeError(f"{len(errors)} client(s) failed: {cause!r}")
    return latencies, wall
