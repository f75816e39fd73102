"""Measure the demo zoo's quality gradient through `edged.zoo`, the runtime the daemon uses.

For every model of `models/demo/zoo.toml` and every prompt of `eval.jsonl`: generate with the
manifest's defaults, label the reply with the manifest's checker, and record latency and energy
(an `edged.energy` window around each request). Prints accuracy per difficulty bucket, latency
and joules per request, writes the table into `models/demo/README.md` and, with `--json`, a JSON.

    python tools/eval_demo_zoo.py                       # all models, estimate/auto energy
    python tools/eval_demo_zoo.py --energy rapl --json /tmp/eval.json --no-readme
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from edged.checkers import get_checker  # noqa: E402
from edged.demo import DemoConfig, DemoError, format_table, load_eval_set, run_demo  # noqa: E402
from edged.energy import create_meter  # noqa: E402
from edged.paths import demo_zoo_dir  # noqa: E402
from edged.zoo import Zoo  # noqa: E402

BEGIN, END = "<!-- eval:begin -->", "<!-- eval:end -->"
DEMO_BEGIN, DEMO_END = "<!-- demo:begin -->", "<!-- demo:end -->"


def evaluate(zoo: Zoo, rows: list[dict[str, str]], energy: str) -> dict[str, object]:
    """Per model: accuracy per bucket and overall, mean latency and joules per request."""
    checker = get_checker(zoo.manifest.checker)
    meter = create_meter(energy)
    buckets = sorted({r["bucket"] for r in rows}, key=[r["bucket"] for r in rows].index)
    models: dict[str, dict[str, object]] = {}
    method = ""
    try:
        for name in zoo.names:
            model = zoo.get(name)
            hits: dict[str, list[bool]] = {b: [] for b in buckets}
            latency_ms: list[float] = []
            joules: list[float] = []
            failures: list[dict[str, str]] = []
            start = time.monotonic()
            for i, row in enumerate(rows, 1):
                with meter.window() as window:
                    result = model.generate(row["prompt"])
                record = window.record
                method = record.method
                ok = checker(result.text, row["answer"])
                hits[row["bucket"]].append(ok)
                latency_ms.append(result.total_ms)
                joules.append(record.joules)
                if not ok and len(failures) < 5:
                    failures.append({**row, "reply": result.text})
                if i % 20 == 0 or i == len(rows):
                    done = sum(sum(h) for h in hits.values())
                    print(f"\r[{name}] {i}/{len(rows)} correct {done / i:.0%} "
                          f"{time.monotonic() - start:.0f}s", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            models[name] = {
                "params": _params(model.config),
                "accuracy": {b: sum(h) / len(h) for b, h in hits.items()},
                "overall": sum(sum(h) for h in hits.values()) / len(rows),
                "latency_ms": sum(latency_ms) / len(latency_ms),
                "energy_j": sum(joules) / len(joules),
                "examples_wrong": failures,
            }
    finally:
        meter.close()
    return {"buckets": buckets, "requests": len(rows), "energy_method": method,
            "models": models}


def _params(config: dict[str, object]) -> int:
    """Parameter count of a tied-embedding Llama from its config (what the README reports)."""
    d, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])  # type: ignore[arg-type]
    ff, vocab = int(config["intermediate_size"]), int(config["vocab_size"])  # type: ignore[arg-type]
    return vocab * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + d


def table(report: dict[str, object]) -> str:
    buckets: list[str] = report["buckets"]  # type: ignore[assignment]
    models: dict[str, dict] = report["models"]  # type: ignore[assignment]
    head = ["model", "params", *buckets, "overall", "latency ms/request", "energy J/request"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, m in models.items():
        cells = [name, f"{m['params']:,}", *(f"{m['accuracy'][b]:.0%}" for b in buckets),
                 f"**{m['overall']:.0%}**", f"{m['latency_ms']:.1f}", f"{m['energy_j']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(readme: Path, begin: str, end: str, content: str) -> None:
    """Replace what lies between two markers; the rest of the README is the trainer's."""
    body = readme.read_text()
    if begin not in body or end not in body:
        raise SystemExit(f"{readme} lacks the {begin} ... {end} markers")
    head, rest = body.split(begin, 1)
    readme.write_text(f"{head}{begin}\n{content}\n{end}{rest.split(end, 1)[1]}")


def eval_block(report: dict[str, object], text_table: str) -> str:
    return (
        "Measured by `python tools/eval_demo_zoo.py` through `edged.zoo` (greedy, the manifest's "
        f"defaults, one request at a time, {report['requests']} held-out prompts; energy method "
        f"`{report['energy_method']}`):\n\n{text_table}"
    )


def demo_block(config: DemoConfig) -> str:
    """Run `edged demo` with its defaults and render its table for the README."""
    result = run_demo(config, lambda line: print(f"\r\033[K{line}", end="", file=sys.stderr))
    print(file=sys.stderr)
    table_text = format_table(result)
    router = ", ".join(f"`{k}={v}`" for k, v in config.router.items())
    print(table_text)
    return (
        f"`edged demo` with its defaults ({config.requests} requests, alpha {config.alpha}, seed "
        f"{config.seed}, router {router}, energy backend `{config.energy}` -> "
        f"`{result.energy_method}`), "
        f"recorded by `python tools/eval_demo_zoo.py --demo`; {result.elapsed_s:.0f} s on this "
        "machine:"
        f"\n\n```\n{table_text}\n```"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=demo_zoo_dir() / "zoo.toml")
    parser.add_argument("--eval", type=Path, help="eval set (default: eval.jsonl beside the zoo)")
    parser.add_argument("--energy", default="auto", help="energy backend for create_meter")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    parser.add_argument("--demo", action="store_true",
                        help="also run `edged demo` with its defaults and record its table")
    args = parser.parse_args(argv)

    zoo = Zoo.from_manifest(args.zoo)
    try:
        rows = load_eval_set(args.eval or args.zoo.parent / "eval.jsonl")
    except DemoError as exc:
        raise SystemExit(str(exc)) from None
    if any(not isinstance(row.get("bucket"), str) for row in rows):
        raise SystemExit("every eval row needs a string 'bucket'")
    report = evaluate(zoo, rows, args.energy)
    text_table = table(report)
    print(text_table)
    print(f"energy method: {report['energy_method']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    readme = args.zoo.parent / "README.md"
    if not args.no_readme:
        replace_block(readme, BEGIN, END, eval_block(report, text_table))
    if args.demo:
        shipped = args.zoo.resolve() == (demo_zoo_dir() / "zoo.toml").resolve()
        config = DemoConfig(manifest=None if shipped else args.zoo, energy=args.energy)
        content = demo_block(config)
        if not args.no_readme:
            replace_block(readme, DEMO_BEGIN, DEMO_END, content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
