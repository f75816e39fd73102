"""SIGKILL the daemon at random moments under labelled load; count the labels that survive.

Each round starts the real daemon (demo zoo, `estimate` meter) on one state directory, runs a
client that sends generates with a `reference` (the reply's `labels` are acknowledged labels),
kills the daemon with SIGKILL after a random 0.3-2.5 s, and restarts it: the restored router
must hold at least every label acknowledged before the kill (exploration labels, learned after
the reply, may add more), no temp file may be left, and the restart must reach READY.
`save_interval_s` is short (0.5 s) so that kills also land inside snapshot writes.

    python tools/bench/crash.py [--kills 20] [--seed 0] [--out out/bench/crash.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
from serve_proc import start_serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(self, work: Path) -> None:
        self.endpoint = f"ipc://{work}/edged.sock"
        config = work / "edged.toml"
        config.write_text(f'[server]\nstate_dir = "{work / "state"}"\nsave_interval_s = 0.5\n'
                          '[energy]\nbackend = "estimate"\n')
        self.proc, self.log = start_serve(config, work, self.endpoint, cwd=REPO)

    def call(self, ctx: zmq.Context, message: dict[str, Any], timeout_ms: int = 10_000
             ) -> dict[str, Any] | None:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            sock.send(msgpack.packb({"v": 1, **message}))
            if not sock.poll(timeout_ms):
                return None
            return msgpack.unpackb(sock.recv())
        finally:
            sock.close()

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.log.close()


def restored_labels(d: Daemon, ctx: zmq.Context) -> int:
    stats = d.call(ctx, {"id": "s", "op": "stats"})
    assert stats is not None and stats["ok"], stats
    return sum(m["labels"] for m in stats["router"]["models"].values())


def load(d: Daemon, ctx: zmq.Context, prompts: list[dict[str, str]], stop: threading.Event,
         acked: list[int], seq: list[int]) -> None:
    """Sequential labelled generates until the daemon dies; acked[0] counts reply labels."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    try:
        while not stop.is_set():
            seq[0] += 1
            item = prompts[seq[0] % len(prompts)]
            sock.send_multipart([b"", msgpack.packb({
                "v": 1, "id": f"r{seq[0]}", "op": "generate", "prompt": item["prompt"],
                "reference": item["answer"]})])
            if not sock.poll(2000):
                return  # killed
            reply = msgpack.unpackb(sock.recv_multipart()[-1])
            if reply.get("ok"):
                acked[0] += len(reply.get("labels") or {})
    finally:
        sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="rounds (1..100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "crash.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    prompts = [json.loads(line) for line in
               (REPO / "models" / "demo" / "eval.jsonl").read_text().splitlines() if line]
    work = Path(tempfile.mkdtemp(prefix="edged-crash-", dir="/tmp"))
    ctx = zmq.Context()
    rounds: list[dict[str, Any]] = []
    acked_total = 0
    seq = [0]
    try:
        d = Daemon(work)
        for k in range(max(1, min(100, args.kills))):
            base = restored_labels(d, ctx)
            acked, stop = [0], threading.Event()
            worker = threading.Thread(target=load, args=(d, ctx, prompts, stop, acked, seq))
            worker.start()
            delay = rng.uniform(0.3, 2.5)
            time.sleep(delay)
            d.proc.send_signal(signal.SIGKILL)
            d.wait()
            stop.set()
            worker.join(10)
            acked_total += acked[0]
            temps = sorted(p.name for p in (work / "state").glob(".*.tmp-*"))
            start = time.monotonic()
            d = Daemon(work)  # restart must always work
            restart_s = time.monotonic() - start
            after = restored_labels(d, ctx)
            leftover = sorted(p.name for p in (work / "state").glob(".*.tmp-*"))
            rounds.append({
                "kill": k, "after_s": round(delay, 2), "labels_before_round": base,
                "acked_in_round": acked[0], "restored": after,
                "acked_lost": max(0, base + acked[0] - after),
                "temps_at_kill": len(temps), "temps_after_restart": len(leftover),
                "restart_s": round(restart_s, 2),
            })
            print(rounds[-1], file=sys.stderr)
        d.proc.send_signal(signal.SIGTERM)
        code = d.wait()
    finally:
        ctx.destroy(linger=0)
    result = {
        "kills": len(rounds), "acked_total": acked_total,
        "acked_lost_total": sum(r["acked_lost"] for r in rounds),
        "max_acked_lost_per_kill": max(r["acked_lost"] for r in rounds),
        "kills_inside_a_save": sum(1 for r in rounds if r["temps_at_kill"]),
        "orphans_after_restart": sum(r["temps_after_restart"] for r in rounds),
        "restarts_ok": len(rounds), "final_exit": code, "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| kill | after s | acked | restored | acked lost | temp at kill | temp after |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rounds:
        print(f"| {r['kill']} | {r['after_s']} | {r['acked_in_round']} | {r['restored']} | "
              f"{r['acked_lost']} | {r['temps_at_kill']} | {r['temps_after_restart']} |")
    print({k: v for k, v in result.items() if k != "rounds"})
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["acked_lost_total"] == 0 and result["orphans_after_restart"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
