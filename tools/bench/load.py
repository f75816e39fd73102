"""Daemon under load and beside hostile local clients (issue 11): a table and JSON under out/bench/.

Starts the real daemon (`python -m edged serve`, demo zoo, `estimate` meter, queue 16) on a
temporary ipc endpoint and measures, each client load in processes of its own (one event loop
over at most 32 DEALER sockets each, so client threads do not fight over one GIL):

  - closed loop, 1 / 8 / 32 / 128 clients: each keeps one routed generate in flight and retries
    `busy` after 10-30 ms; ok req/s, ok p50/p99, `busy` p50/p99 as the load generator sees them;
    from 32 clients on, also `probe_busy_*`: a separate probe client (one socket, a generate
    every 2 ms, blocking poll) whose `busy` round trips measure the daemon rather than the load
    generator's own loop (all of it runs on the same CPUs as the daemon); `daemon_cpu_pct` and
    `clients_cpu_pct`: the CPU the daemon and the load generator used over the phase (100 =
    one core), to tell a starved daemon from a slow one;
  - a normal sequential client alone, then beside a client that sends generates (or `health`)
    and never reads a reply, then beside one that floods `health` and reads: the normal client's
    share of its alone throughput;
  - the daemon's CPU while idle after the hostile client stopped sending (still connected,
    replies unread), from /proc/<pid>/stat.

Bounded: every phase has a time limit and the hostile clients a message cap; loopback/ipc only.

    python tools/bench/load.py [--seconds 4] [--tree DIR] [--worker-nice N]
                               [--out out/bench/load.json]

`--tree DIR` runs the daemon from another source tree (e.g. `git archive` of an older commit),
to compare before and after on one machine in one run.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
from serve_proc import start_serve, stop_serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
CLIENTS = (1, 8, 32, 128)
HOSTILE_CAP = 14_000     # messages a hostile client sends at most
DRAIN_S = 5.0            # time to collect in-flight replies after a phase
PER_PROCESS = 32         # closed-loop clients per generator process
PROBE_GAP_S = 0.002      # the probe's pause between requests


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def prompts() -> list[str]:
    lines = (REPO / "models" / "demo" / "eval.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:200] if line.strip()]


class Daemon:
    """The daemon as a subprocess, ready when its notify socket says READY=1."""

    def __init__(self, tree: Path, work: Path, queue_size: int = 16,
                 worker_nice: int | None = None) -> None:
        self.work = work
        self.endpoint = f"ipc://{work}/edged.sock"
        config = work / "edged.toml"
        nice = "" if worker_nice is None else f"worker_nice = {worker_nice}\n"
        config.write_text(
            f'[server]\nstate_dir = "{work / "state"}"\nqueue_size = {queue_size}\n{nice}'
            '[energy]\nbackend = "estimate"\n'
        )
        self.proc, self.log = start_serve(config, work, self.endpoint, cwd=tree, log_mode="wb",
                                          env={"PYTHONPATH": str(tree)})

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        try:
            return stop_serve(self.proc)
        finally:
            self.log.close()


def _request(rid: str, op: str, text: str | None = None) -> bytes:
    msg: dict[str, Any] = {"v": 1, "id": rid, "op": op}
    if text is not None:
        msg["prompt"] = text
    return msgpack.packb(msg)


def closed_loop(endpoint: str, n_clients: int, seconds: float, texts: list[str],
                results: Any, seed: int = 0, prefix: str = "c") -> None:
    """`n_clients` DEALERs, each one generate in flight, `busy` retried after 10-30 ms.

    Clients due to send are kept in a heap, so an iteration costs the replies it reads and the
    sends that are due, not a pass over every socket (with 128 sockets in one process that pass
    delayed reading replies and inflated the latencies measured)."""
    rng = random.Random(seed or n_clients)
    ctx = zmq.Context()
    socks = []
    poller = zmq.Poller()
    for _ in range(n_clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    sent_at = [0.0] * n_clients
    due: list[tuple[float, int]] = [(0.0, i) for i in range(n_clients)]
    waiting = 0
    index = {s: i for i, s in enumerate(socks)}
    ok_ms: list[float] = []
    busy_ms: list[float] = []
    errors: dict[str, int] = {}
    seq = 0
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if (now >= end and not waiting) or now >= end + DRAIN_S:
            break
        while due and due[0][0] <= now < end:
            _, i = heapq.heappop(due)
            seq += 1
            socks[i].send_multipart([b"", _request(f"{prefix}{i}-{seq}", "generate",
                                                   texts[seq % len(texts)])])
            sent_at[i] = time.monotonic()
            waiting += 1
        # sleep until the next send is due (rounded up: a 0 ms poll while one is <1 ms away
        # spun the loop, ~300 us of CPU per message, on the CPUs the daemon runs on); a
        # reply wakes it earlier
        wake = min(due[0][0] if due and now < end else end, end) if now < end else end + DRAIN_S
        timeout = min(50, max(1, math.ceil((wake - time.monotonic()) * 1000)))
        ready = poller.poll(timeout)
        got = time.monotonic()  # when the replies were seen ready (not our own loop's work)
        for s, _ in ready:
            i = index[s]
            reply = msgpack.unpackb(s.recv_multipart()[-1])
            if reply.get("done") is False:
                continue
            ms = (got - sent_at[i]) * 1000.0
            waiting -= 1
            if got > end:
                continue  # drained after the phase: not counted
            if reply.get("ok"):
                ok_ms.append(ms)
                heapq.heappush(due, (got, i))
            else:
                code = reply["error"]["code"]
                errors[code] = errors.get(code, 0) + 1
                if code == "busy":
                    busy_ms.append(ms)
                heapq.heappush(due, (got + rng.uniform(0.010, 0.030), i))
    results.put({"ok_ms": ok_ms, "busy_ms": busy_ms, "errors": errors, "seconds": seconds})
    ctx.destroy(linger=0)


def probe(endpoint: str, seconds: float, results: Any) -> None:
    """One client that does nothing else: a generate every PROBE_GAP_S, one at a time, timed
    with a blocking poll, so its `busy` round trips measure the daemon, not a busy generator."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    busy: list[float] = []
    ok = 0
    end = time.monotonic() + seconds
    time.sleep(min(0.5, seconds / 4))  # let the load reach its steady state
    seq = 0
    while time.monotonic() < end:
        seq += 1
        t0 = time.monotonic()
        s.send_multipart([b"", _request(f"p{seq}", "generate", "1+1=")])
        while True:
            if not s.poll(int((DRAIN_S + seconds) * 1000)):
                results.put({"busy_ms": busy, "ok": ok, "lost": 1})
                ctx.destroy(linger=0)
                return
            reply = msgpack.unpackb(s.recv_multipart()[-1])
            if reply.get("done") is not False:
                break
        ms = (time.monotonic() - t0) * 1000.0
        if not reply.get("ok") and reply["error"]["code"] == "busy":
            busy.append(ms)
        else:
            ok += 1
        time.sleep(PROBE_GAP_S)
    results.put({"busy_ms": busy, "ok": ok, "lost": 0})
    ctx.destroy(linger=0)


def hostile(endpoint: str, op: str, seconds: float, read: bool, stop_after: float,
            results: Any) -> None:
    """Send `op` as fast as it goes (at most HOSTILE_CAP), reading the replies or never; then
    stay connected and silent until `stop_after` seconds have passed."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 100)
    s.connect(endpoint)
    start = time.monotonic()
    sent = 0
    text = "what is 2+2?" if op == "generate" else None
    while sent < HOSTILE_CAP and time.monotonic() - start < seconds:
        try:
            s.send_multipart([b"", _request(f"h{sent}", op, text)])
            sent += 1
        except zmq.Again:
            continue
        if read:
            while s.poll(0):
                s.recv_multipart()
    results.put({"sent": sent, "rate": sent / max(1e-9, time.monotonic() - start)})
    time.sleep(max(0.0, stop_after - (time.monotonic() - start)))
    ctx.destroy(linger=0)


def summarize(name: str, r: dict[str, Any]) -> dict[str, Any]:
    return {
        "phase": name,
        "ok": len(r["ok_ms"]),
        "ok_per_s": round(len(r["ok_ms"]) / r["seconds"], 1),
        "ok_p50_ms": _r(percentile(r["ok_ms"], 50)),
        "ok_p99_ms": _r(percentile(r["ok_ms"], 99)),
        "busy": len(r["busy_ms"]),
        "busy_p50_ms": _r(percentile(r["busy_ms"], 50)),
        "busy_p99_ms": _r(percentile(r["busy_ms"], 99)),
        "errors": r["errors"],
        **({k: r[k] for k in ("daemon_cpu_pct", "clients_cpu_pct") if k in r}),
        **({"probe_busy": len(r["probe"]["busy_ms"]),
            "probe_busy_p50_ms": _r(percentile(r["probe"]["busy_ms"], 50)),
            "probe_busy_p99_ms": _r(percentile(r["probe"]["busy_ms"], 99))}
           if r.get("probe") else {}),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def run_phase(endpoint: str, n_clients: int, seconds: float, texts: list[str],
              hostile_args: tuple[str, bool] | None = None, daemon: Daemon | None = None,
              idle_s: float = 3.0, probed: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    extra: dict[str, Any] = {}
    bad = None
    # CPU of the daemon and of the load generator over the phase: all run on the same CPUs,
    # so a generator that burns them shows up in the daemon's latencies
    cpu0, kids0, t0 = daemon.cpu_s() if daemon else 0.0, _children_cpu_s(), time.monotonic()
    if hostile_args is not None:
        hq = ctx.Queue()
        bad = ctx.Process(target=hostile, args=(endpoint, hostile_args[0], seconds,
                                                 hostile_args[1], seconds + 1 + idle_s, hq))
        bad.start()
    procs = []
    shares = [PER_PROCESS] * (n_clients // PER_PROCESS) + (
        [n_clients % PER_PROCESS] if n_clients % PER_PROCESS else [])
    for k, share in enumerate(shares):
        procs.append(ctx.Process(target=closed_loop, args=(
            endpoint, share, seconds, texts, results, n_clients * 100 + k, f"c{k}.")))
    pq = ctx.Queue()
    prober = ctx.Process(target=probe, args=(endpoint, seconds, pq)) if probed else None
    for p in procs + ([prober] if prober else []):
        p.start()
    parts = [results.get(timeout=seconds + DRAIN_S + 60) for _ in procs]
    for p in procs:
        p.join(30)
    if daemon is not None and hostile_args is None:
        wall = time.monotonic() - t0
        extra["daemon_cpu_pct"] = round(100.0 * (daemon.cpu_s() - cpu0) / wall)
        extra["clients_cpu_pct"] = round(100.0 * (_children_cpu_s() - kids0) / wall)
    out = {"ok_ms": [x for r in parts for x in r["ok_ms"]],
           "busy_ms": [x for r in parts for x in r["busy_ms"]],
           "errors": {c: sum(r["errors"].get(c, 0) for r in parts)
                      for c in {c for r in parts for c in r["errors"]}},
           "seconds": seconds, "processes": len(procs)}
    if prober is not None:
        extra["probe"] = pq.get(timeout=seconds + DRAIN_S + 60)
        prober.join(30)
    if bad is not None:
        extra["hostile"] = hq.get(timeout=60)
        if daemon is not None:  # the hostile client has stopped sending, still connected
            time.sleep(1.0)
            cpu0, t0 = daemon.cpu_s(), time.monotonic()
            time.sleep(idle_s)
            extra["idle_cpu_pct"] = round(
                100.0 * (daemon.cpu_s() - cpu0) / (time.monotonic() - t0), 2)
        bad.join(idle_s + 30)
    return {**out, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase (1..30)")
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree of the daemon")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "load.json")
    parser.add_argument("--per-process", type=int, default=PER_PROCESS,
                        help="closed-loop clients per generator process (default 32)")
    parser.add_argument("--worker-nice", type=int, default=None,
                        help="[server] worker_nice for the daemon (default: the tree's default)")
    args = parser.parse_args()
    globals()["PER_PROCESS"] = max(1, args.per_process)  # read by run_phase
    seconds = min(30.0, max(1.0, args.seconds))
    texts = prompts()
    work = Path(tempfile.mkdtemp(prefix="edged-load-", dir="/tmp"))
    rows: list[dict[str, Any]] = []
    daemon = Daemon(args.tree.resolve(), work, worker_nice=args.worker_nice)
    try:
        cpu0, t0 = daemon.cpu_s(), time.monotonic()
        time.sleep(2.0)
        baseline_idle = round(100.0 * (daemon.cpu_s() - cpu0) / (time.monotonic() - t0), 2)
        for n in CLIENTS:
            rows.append(summarize(f"{n} clients", run_phase(daemon.endpoint, n, seconds, texts,
                                                            probed=n >= 32, daemon=daemon)))
            print(rows[-1], file=sys.stderr)
        alone = summarize("normal alone", run_phase(daemon.endpoint, 1, seconds, texts))
        rows.append(alone)
        for label, op, read in (("beside non-reading generate flood", "generate", False),
                                ("beside non-reading health flood", "health", False),
                                ("beside reading health flood", "health", True)):
            r = run_phase(daemon.endpoint, 1, seconds, texts, (op, read), daemon)
            row = summarize(f"normal {label}", r)
            row["share_of_alone"] = round(row["ok_per_s"] / max(1e-9, alone["ok_per_s"]), 3)
            row["hostile_sent"] = r["hostile"]["sent"]
            row["hostile_rate"] = round(r["hostile"]["rate"], 1)
            row["idle_cpu_pct_after"] = r.get("idle_cpu_pct")
            rows.append(row)
            print(row, file=sys.stderr)
        code = daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
    result = {"tree": str(args.tree), "worker_nice": args.worker_nice, "seconds": seconds,
              "idle_cpu_pct_before": baseline_idle, "exit": code, "rows": rows,
              "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    keys = ("phase", "ok_per_s", "ok_p50_ms", "ok_p99_ms", "busy", "busy_p50_ms", "busy_p99_ms",
            "probe_busy", "probe_busy_p50_ms", "probe_busy_p99_ms", "daemon_cpu_pct",
            "clients_cpu_pct", "share_of_alone", "idle_cpu_pct_after")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    print(f"idle CPU before any load: {baseline_idle} %; exit {code}; JSON: {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
