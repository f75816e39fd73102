"""HTTP front overhead: the same 1-token generations through `edged http` and through the raw
ZeroMQ client, in the same run, against the same daemon.

Starts `python -m edged serve` on the demo zoo (`estimate` meter, temporary ipc endpoint and
state) and `python -m edged http` on a free loopback port, then:
  - 1 client, sequential, interleaved request by request: `Client.generate` (REQ socket) vs
    `POST /v1/completions` over one keep-alive `http.client` connection. Added latency is the
    HTTP p50 minus the ZeroMQ p50 (target: < 1 ms);
  - 8 clients (threads, one connection / one client each): requests/s and p50 through each.
Requests name the model (`small`) by default so routing and exploration runs do not add noise
to a difference of two small numbers; `--routed` sends them to the router instead.
Also reported: the front's RSS after the run and the import time of `edged.http`.

    python tools/bench/http_front.py [--requests 400] [--clients 8] [--routed]
        [--out out/bench/http.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from clients import run_clients  # noqa: E402

from edged.client import Client  # noqa: E402

PROMPT = "12+34="


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(latencies_ms: list[float]) -> dict[str, float]:
    return {"n": len(latencies_ms), "p50_ms": percentile(latencies_ms, 50),
            "p90_ms": percentile(latencies_ms, 90), "p99_ms": percentile(latencies_ms, 99),
            "mean_ms": statistics.fmean(latencies_ms)}


class Http:
    """One keep-alive connection; `complete()` is one 1-token completion."""

    def __init__(self, host: str, port: int, body: dict[str, Any]) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.payload = json.dumps(body).encode()

    def complete(self) -> None:
        self.conn.request("POST", "/v1/completions", body=self.payload,
                          headers={"content-type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")

    def close(self) -> None:
        self.conn.close()


class Zmq:
    def __init__(self, endpoint: str, fields: dict[str, Any]) -> None:
        self.client = Client(endpoint, timeout_s=60)
        self.fields = fields

    def complete(self) -> None:
        self.client.generate(PROMPT, **self.fields)

    def close(self) -> None:
        self.client.close()


def timed(call: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000.0


def concurrent(make: Callable[[], Any], clients: int, per_client: int) -> dict[str, float]:
    """`clients` threads, each with its own connection, `per_client` requests each."""
    latencies, wall = run_clients(clients, clients * per_client, lambda conn: conn.complete(),
                                  make, lambda conn: conn.close())
    return {**summary(latencies), "requests_per_s": len(latencies) / wall}


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def import_ms() -> float:
    code = ("import time; t = time.perf_counter(); import edged.http.app, uvicorn; "
            "print((time.perf_counter() - t) * 1000)")
    runs = [float(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout) for _ in range(3)]
    return min(runs)


def start(work: Path) -> tuple[subprocess.Popen, subprocess.Popen, str, tuple[str, int]]:
    endpoint = f"ipc://{work}/edged.sock"
    config = work / "edged.toml"
    config.write_text("\n".join([
        "[server]", f'state_dir = "{work / "state"}"', "queue_size = 64",
        "[energy]", 'backend = "estimate"', "[router]", "alpha = 0.8",
        "[models]", f'manifest = "{REPO / "models" / "demo" / "zoo.toml"}"', ""]))
    env = {**os.environ, "EDGED_ENDPOINT": endpoint, "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    dlog, hlog = work / "daemon.log", work / "http.log"
    daemon = subprocess.Popen([sys.executable, "-m", "edged", "serve", "--config", str(config)],
                              cwd=REPO, env=env, stdout=dlog.open("wb"),
                              stderr=subprocess.STDOUT)
    with Client(endpoint, timeout_s=2, retries=0) as probe:
        for _ in range(120):
            try:
                probe.health()
                break
            except Exception:  # not up yet
                if daemon.poll() is not None:
                    raise SystemExit(f"daemon exited:\n{dlog.read_text()}") from None
                time.sleep(0.5)
    front = subprocess.Popen([sys.executable, "-m", "edged", "http", "--listen", "127.0.0.1:0",
                              "--endpoint", endpoint], cwd=REPO, env=env,
                             stdout=hlog.open("wb"), stderr=subprocess.STDOUT)
    for _ in range(600):
        found = re.search(r"listening on http://([\d.]+):(\d+)", hlog.read_text())
        if found:
            return daemon, front, endpoint, (found.group(1), int(found.group(2)))
        if front.poll() is not None:
            raise SystemExit(f"edged http exited:\n{hlog.read_text()}")
        time.sleep(0.1)
    raise SystemExit("edged http never got ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="sequential, per path")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--routed", action="store_true", help="let the router pick the model")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench" / "http.json")
    args = parser.parse_args()

    fields: dict[str, Any] = {"max_new_tokens": 1}
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 1,
                            "model": "auto" if args.routed else "small"}
    if not args.routed:
        fields["model"] = "small"
    work = Path(tempfile.mkdtemp(prefix="edged-bench-http-", dir="/tmp"))
    daemon, front, endpoint, (host, port) = start(work)
    try:
        zmq_conn, http_conn = Zmq(endpoint, fields), Http(host, port, body)
        for _ in range(30):  # warm-up: sessions, sockets, first-call paths
            zmq_conn.complete()
            http_conn.complete()
        zmq_ms, http_ms = [], []
        for _ in range(args.requests):  # interleaved: both see the same machine state
            zmq_ms.append(timed(zmq_conn.complete))
            http_ms.append(timed(http_conn.complete))
        zmq_conn.close()
        http_conn.close()
        seq = {"zmq": summary(zmq_ms), "http": summary(http_ms)}
        added = {k: seq["http"][k] - seq["zmq"][k] for k in ("p50_ms", "p90_ms", "mean_ms")}
        many = {
            "zmq": concurrent(lambda: Zmq(endpoint, fields), args.clients, args.per_client),
            "http": concurrent(lambda: Http(host, port, body), args.clients, args.per_client),
        }
        front_rss = rss_mib(front.pid)
    finally:
        for proc in (front, daemon):
            proc.send_signal(signal.SIGTERM)
        for proc in (front, daemon):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "prompt": PROMPT, "max_new_tokens": 1, "routed": args.routed,
        "sequential": seq, "added_ms": added, "clients": args.clients,
        "concurrent": many, "front_rss_mib": front_rss, "import_ms": import_ms(),
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
    }
    print(f"1-token generations, model {'routed' if args.routed else 'small'}, "
          f"{args.requests} sequential per path (interleaved), then {args.clients} clients x "
          f"{args.per_client}")
    print(f"{'path':<6} {'clients':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'mean ms':>8} {'req/s':>8}")
    for path in ("zmq", "http"):
        s = seq[path]
        print(f"{path:<6} {1:>7} {s['p50_ms']:>8.3f} {s['p90_ms']:>8.3f} {s['p99_ms']:>8.3f} "
              f"{s['mean_ms']:>8.3f} {1000 / s['mean_ms']:>8.0f}")
    for path in ("zmq", "http"):
        s = many[path]
        print(f"{path:<6} {args.clients:>7} {s['p50_ms']:>8.3f} {s['p90_ms']:>8.3f} "
              f"{s['p99_ms']:>8.3f} {s['mean_ms']:>8.3f} {s['requests_per_s']:>8.0f}")
    print(f"added by HTTP (1 client): p50 {added['p50_ms']:+.3f} ms, p90 {added['p90_ms']:+.3f} "
          f"ms, mean {added['mean_ms']:+.3f} ms; front RSS {front_rss:.1f} MiB; import "
          f"edged.http + uvicorn {result['import_ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
