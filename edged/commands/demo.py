"""`edged demo`: the shipped demo zoo behind a real daemon, routed per request, vs baselines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the daemon on the demo zoo and compare routing with fixed policies",
        description="Start `edged serve` on the demo zoo (temporary endpoint and state), stream "
        "the held-out arithmetic prompts through it with reference answers, then compare edged "
        "with always-largest, always-smallest and random on the same requests.",
    )
    parser.add_argument("--alpha", type=float, default=0.8,
                        help="SLA: target mean satisfaction (default 0.8)")
    parser.add_argument("--requests", type=int, default=400,
                        help="requests to stream (default 400; the eval set repeats, reshuffled)")
    parser.add_argument("--seed", type=int, default=0, help="request order, router, random")
    parser.add_argument("--energy", default="auto",
                        help="energy backend for the daemon (default auto)")
    parser.add_argument("--zoo", type=Path, metavar="ZOO.TOML",
                        help="zoo manifest with eval.jsonl beside it (default: the demo zoo)")
    parser.add_argument("--labels", choices=("reference", "agreement"), default="reference",
                        help="reference: every request carries its answer (default); agreement: "
                        "the daemon gets no answers and learns from agreement with the top "
                        "model, while the demo still scores every policy against the answers")
    parser.add_argument("--router", action="append", default=[], metavar="KEY=VALUE",
                        help="RouterConfig field for the daemon, e.g. margin=0.1 (repeat; "
                        "default margin_decay=0.25)")
    parser.add_argument("--remote", action="store_true",
                        help="serve the zoo's dearest model from a second `edged serve` on a "
                        "tcp loopback endpoint with CURVE (a remote zoo entry, kind = \"edged\")")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, default=Path("edged-demo.png"), metavar="FILE.png",
                        help="write the comparison plot (default edged-demo.png; needs matplotlib)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edged.client import ClientError
    from edged.demo import DemoConfig, DemoError, format_table, run_demo, write_plot

    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        if tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    try:
        config = DemoConfig(alpha=args.alpha, requests=args.requests, seed=args.seed,
                            energy=args.energy, manifest=args.zoo, labels=args.labels,
                            remote=args.remote,
                            router={**DemoConfig().router, **parse_router_options(args.router)})
        router = " ".join(f"{k}={v}" for k, v in config.router.items())
        # the report goes to stdout, in order; stderr carries only progress (on a terminal)
        # and errors, so `edged demo > out.txt` and `2>&1 | less` read the same
        print(f"edged demo: {config.requests} requests, alpha {config.alpha}, router {router}, "
              f"labels {config.labels}, zoo {config.zoo_manifest}"
              + (", dearest model remote (second edged, tcp loopback + CURVE)"
                 if config.remote else ""), flush=True)
        result = run_demo(config, progress)
    except (DemoError, ClientError) as exc:
        if tty:
            print(file=sys.stderr)
        print(f"edged demo: {exc}", file=sys.stderr)
        return 1
    if tty:
        print(file=sys.stderr)
    print(format_table(result))
    print(f"energy method: {result.energy_method}")
    print(f"took {result.timing_line()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", flush=True)
    if not args.no_plot:
        try:
            write_plot(result, args.plot)
            print(f"wrote {args.plot}", flush=True)
        except ImportError:
            print("no plot: matplotlib is missing (pip install 'edged[plot]')", file=sys.stderr)
    return 0


def parse_router_options(items: list[str]) -> dict[str, float | int | bool | str]:
    """`KEY=VALUE` strings as TOML-typed values (number, true/false, else string)."""
    from edged.demo import DemoError

    out: dict[str, float | int | bool | str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DemoError(f"--router wants KEY=VALUE, got {item!r}")
        value: float | int | bool | str = raw
        if raw in ("true", "false"):
            value = raw == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        out[key.strip()] = value
    return out
