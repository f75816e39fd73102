"""Router micro-benchmark: decide() latency (p50/p90/p99 us) and label-update time, 3 and 8 models.

Compares edged's default RouterConfig with the faithful MESS+ configuration (the named
baseline) in the same run: the routers take turns request by request, so a busy machine slows
both alike. Wall-clock percentiles include time the process waited for a CPU (other jobs on a
shared machine: a preempted request waits a whole time slice, milliseconds); `cpu` percentiles
are the thread's CPU time for the same calls, which that wait does not count.
Prints a table and writes JSON (ratios edged / baseline). Texts: short synthetic
questions, or (`--texts messplus`) the MESS+ trace questions, shuffled.

    python tools/bench/router.py [--requests 5000] [--texts bench|messplus]
                                 [--json out/bench/router.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edged.router import Router, RouterConfig

WORDS = [
    "which", "planet", "rotates", "faster", "after", "an", "impact", "the", "most", "likely",
    "effect", "of", "increase", "in", "rotation", "energy", "cells", "photosynthesis", "mold",
    "spores", "safety", "equipment", "field", "extension", "degree", "index",
]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) + "?" for _ in range(n)]


def messplus_texts(n: int, seed: int = 0) -> list[str]:
    """`n` questions of the MESS+ traces (all benchmarks mixed, shuffled)."""
    from edged.replay.trace import find_traces, load_trace, mix_traces

    root = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "messplus"
    mixed = mix_traces([load_trace(p) for p in find_traces([root])])
    rows = np.random.default_rng(seed).permutation(len(mixed))
    return [mixed.texts[i] for i in np.resize(rows, n)]


def measure(
    names: list[str], configs: dict[str, RouterConfig], prompts: list[str]
) -> dict[str, dict[str, float]]:
    """Per config: decide and update (observe_energy + observe_labels) latency percentiles.
    The routers take turns on each request, so machine noise hits them alike."""
    routers = {label: Router(names, config) for label, config in configs.items()}
    rngs = {label: np.random.default_rng(1) for label in configs}
    energy = {n: 10.0 * 3**i for i, n in enumerate(names)}
    decide_ns: dict[str, list[int]] = {label: [] for label in configs}
    decide_cpu_ns: dict[str, list[int]] = {label: [] for label in configs}
    update_ns: dict[str, list[int]] = {label: [] for label in configs}
    for text in prompts:
        for label, router in routers.items():
            rng = rngs[label]
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            d = router.decide(text)
            t1 = time.perf_counter_ns()
            c1 = time.thread_time_ns()
            router.observe_energy(d, {m: energy[m] for m in d.run})
            router.observe_labels(d, {m: float(rng.random() < 0.7) for m in d.run})
            t2 = time.perf_counter_ns()
            decide_ns[label].append(t1 - t0)
            decide_cpu_ns[label].append(c1 - c0)
            update_ns[label].append(t2 - t1)
    warm = len(prompts) // 10  # skip the cold start
    out = {}
    for label in configs:
        dec = np.array(decide_ns[label][warm:]) / 1000.0
        cpu = np.array(decide_cpu_ns[label][warm:]) / 1000.0
        upd = np.array(update_ns[label][warm:]) / 1000.0
        out[label] = {
            "decide_p50_us": float(np.percentile(dec, 50)),
            "decide_p90_us": float(np.percentile(dec, 90)),
            "decide_p99_us": float(np.percentile(dec, 99)),
            "decide_cpu_p50_us": float(np.percentile(cpu, 50)),
            "decide_cpu_p99_us": float(np.percentile(cpu, 99)),
            "update_p50_us": float(np.percentile(upd, 50)),
            "update_p99_us": float(np.percentile(upd, 99)),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--texts", choices=("bench", "messplus"), default="bench")
    parser.add_argument("--json", default="out/bench/router.json")
    args = parser.parse_args()
    prompts = texts(args.requests) if args.texts == "bench" else messplus_texts(args.requests)
    configs = {
        "messplus (baseline)": RouterConfig.paper(alpha=0.7),
        "edged": RouterConfig(alpha=0.7),
    }
    rows = []
    for n_models in (3, 8):
        names = [f"m{i}" for i in range(n_models)]
        print(f"\r{n_models} models ...", end="", file=sys.stderr, flush=True)
        for label, result in measure(names, configs, prompts).items():
            rows.append({"models": n_models, "config": label, **result})
    print("\r\033[K", end="", file=sys.stderr, flush=True)
    print(f"{'models':>6} {'config':20} {'decide p50':>10} {'decide p90':>10} {'decide p99':>10} "
          f"{'cpu p50':>8} {'cpu p99':>8} {'update p50':>10} {'update p99':>10}"
          f"  (us, {args.texts} texts)")
    for r in rows:
        print(f"{r['models']:>6} {r['config']:20} {r['decide_p50_us']:10.1f} "
              f"{r['decide_p90_us']:10.1f} {r['decide_p99_us']:10.1f} "
              f"{r['decide_cpu_p50_us']:8.1f} {r['decide_cpu_p99_us']:8.1f} "
              f"{r['update_p50_us']:10.1f} {r['update_p99_us']:10.1f}")
    ratios = {}
    for n_models in (3, 8):
        base = next(r for r in rows if r["models"] == n_models and r["config"].startswith("mess"))
        ours = next(r for r in rows if r["models"] == n_models and r["config"] == "edged")
        ratios[str(n_models)] = {k: ours[k] / base[k] for k in base if k.endswith("_us")}
        print(f"edged / messplus, {n_models} models: "
              + ", ".join(f"{k} x{v:.2f}" for k, v in ratios[str(n_models)].items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump({"baseline": "messplus (RouterConfig.paper)", "requests": args.requests,
                   "texts": args.texts, "interleaved": True, "rows": rows,
                   "ratio_edged_over_baseline": ratios}, handle, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
