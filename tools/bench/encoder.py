"""Sentence-encoder latency per request: one text at a time, as the router sees it (p50/p99 ms).

For each encoder directory (e.g. the fp32 and int8 exports of tools/export_encoder.py), encodes
--requests questions taken evenly from the MESS+ trace CSVs, one `encode([text])` call each, after
a short warm-up, with --threads onnxruntime threads; also reports batched throughput (texts/s at
batch 32). Prints a table and writes JSON.

    python tools/bench/encoder.py ~/encoders/minilm ~/encoders/minilm-int8 \
        --traces ../shared/data/messplus --threads 1 [--json out/bench/encoder.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_REPO_ROOT = Path(__file__).resolve().parents[2]  # this checkout's edged, not an installed one
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from edged.router.encoder import SentenceEncoder  # noqa: E402


def questions(traces: Path, n: int) -> list[str]:
    """`n` input_text values spread over the trace CSVs (every k-th row of each file)."""
    files = sorted(traces.glob("*.csv"))
    if not files:
        raise SystemExit(f"{traces}: no trace CSVs")
    per = -(-n // len(files))
    out: list[str] = []
    for file in files:
        with file.open(newline="", encoding="utf-8") as f:
            texts = [row["input_text"] for row in csv.DictReader(f)]
        step = max(1, len(texts) // per)
        out.extend(texts[::step][:per])
    return out[:n]


def measure(path: Path, texts: list[str], threads: int) -> dict:
    t = time.perf_counter()
    encoder = SentenceEncoder(path, threads=threads)
    load_s = time.perf_counter() - t
    for text in texts[:10]:
        encoder.encode([text])
    ms = []
    for text in texts:
        t0 = time.perf_counter_ns()
        encoder.encode([text])
        ms.append((time.perf_counter_ns() - t0) / 1e6)
    t0 = time.perf_counter()
    encoder.encode(texts, batch_size=32)
    batch_s = time.perf_counter() - t0
    return {"dir": str(path), "variant": encoder.config.get("variant", "?"),
            "threads": threads, "requests": len(texts), "load_s": round(load_s, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(np.mean(ms)), 2),
            "batch32_texts_per_s": round(len(texts) / batch_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("encoders", nargs="+", type=Path, help="encoder directories")
    p.add_argument("--traces", type=Path, required=True, help="folder of MESS+ trace CSVs")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    texts = questions(args.traces, args.requests)
    rows = [measure(path, texts, args.threads) for path in args.encoders]
    print(f"{'variant':8} {'threads':>7} {'p50 ms':>7} {'p99 ms':>7} {'mean ms':>7} "
          f"{'batch32/s':>9}  dir")
    for r in rows:
        print(f"{r['variant']:8} {r['threads']:7d} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
              f"{r['mean_ms']:7.2f} {r['batch32_texts_per_s']:9.1f}  {r['dir']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
