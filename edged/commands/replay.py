"""`edged replay`: replay MESS+ trace CSVs through the router and baselines, print a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="replay MESS+ traces: router vs baselines (energy, satisfaction)",
        description="Replay trace CSVs (MESS+ simulator format) with shuffles per seed.",
    )
    p.add_argument("paths", nargs="*", type=Path, default=[Path("../shared/data/messplus")],
                   help="trace CSV files or directories (default: ../shared/data/messplus)")
    p.add_argument("--alpha", type=float, default=None,
                   help="SLA for every trace (default: the per-benchmark defaults)")
    p.add_argument("--seeds", type=int, default=5, help="shuffles per trace (default 5)")
    p.add_argument("--c", type=float, default=0.1, help="messplus exploration constant")
    p.add_argument("--V", type=float, default=0.001, help="messplus V per joule")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edged.replay import DEFAULT_ALPHA, TraceError, find_traces, load_trace, run_benchmark
    from edged.replay.runner import edged_factory, paper_factory

    if args.seeds < 1:
        print("edged replay: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        print("edged replay: --alpha must be in [0, 1]", file=sys.stderr)
        return 2
    try:
        traces = [load_trace(p) for p in find_traces(args.paths)]
    except TraceError as exc:
        print(f"edged replay: {exc}", file=sys.stderr)
        return 2
    routers = {"messplus": paper_factory(c=args.c, V=args.V), "edged": edged_factory()}
    results = []
    for trace in traces:
        alpha = args.alpha if args.alpha is not None else DEFAULT_ALPHA.get(trace.benchmark)
        if alpha is None:
            print(f"edged replay: no default alpha for {trace.benchmark}; pass --alpha",
                  file=sys.stderr)
            return 2

        def progress(line: str) -> None:
            if sys.stderr.isatty():
                print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

        results.append(run_benchmark(trace, alpha, args.seeds, routers, progress))
        if sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr)
        print_table(results[-1].summary)
    if args.json is not None:
        data = [r.summary for r in results]
        args.json.write_text(json.dumps(data[0] if len(data) == 1 else data, indent=1) + "\n")
    if args.plot is not None:
        try:
            from edged.replay.plot import plot
        except ImportError:
            print("edged replay: --plot needs matplotlib (extra `plot`)", file=sys.stderr)
            return 2
        plot(results, args.plot)
    return 0


def print_table(summary: dict) -> None:
    """One block per benchmark: a row per policy."""
    random_e = summary["policies"]["random"]["energy_j_per_request"]
    print(f"\n{summary['benchmark']}  alpha={summary['alpha']}  requests={summary['requests']}"
          f"  seeds={summary['seeds']}")
    print(f"  {'policy':20s} {'J/request':>10s} {'sat':>7s} {'min sat':>7s} {'explore':>7s}"
          f" {'xrandom':>7s} {'xoracle':>7s}  calls")
    for name, p in summary["policies"].items():
        e = p["energy_j_per_request"]
        calls = " ".join(f"{c:.2f}" for c in p["call_ratio"])
        print(f"  {name:20s} {e:10.1f} {p['satisfaction']:7.4f} {p['min_satisfaction']:7.4f}"
              f" {p['explore_ratio']:7.3f} {random_e / e:7.2f} {summary['oracle_ratio'][name]:7.2f}"
              f"  {calls}")
