"""Replay the MESS+ traces and write docs/routing-report.md and docs/routing.png.

Per benchmark (default alpha each, 5 seeds): the faithful `messplus`, edged's one default
configuration, every baseline, and an ablation of each beyond-paper feature and predictor expert
(switched off in edged, or on where it is off by default); edged and messplus again on two
later seed ranges. Then the mixed stream (the traces interleaved, alpha 0.65 / 0.70 / 0.75,
5 seeds from 10) with the expert and energy-head ablations beside edged. Prints progress on
stderr; the narrative around these tables lives in docs/routing.md.

    python tools/routing_report.py [--data ../shared/data/messplus] [--seeds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edged.replay import DEFAULT_ALPHA, EDGED, find_traces, load_trace, mix_traces, run_benchmark
from edged.replay.plot import plot
from edged.replay.runner import edged_factory, paper_factory
from edged.router.predictor import EXPERTS

ROOT = Path(__file__).resolve().parent.parent


def _without(expert: str) -> dict:
    return {"experts": tuple(e for e in EXPERTS if e != expert)}


#: one switch each, from edged's default
ABLATIONS = {
    "edged -signed_queue": {"signed_queue": False},
    "edged -lp_prior": {"lp_prior": False},
    "edged -lean_explore": {"explore_runs": "all", "explore_exponent": 0.25},
    "edged -margin": {"margin": 0.0},
    "edged -margin_scaled": {"margin_scaled": False},
    "edged -V_auto": {"V": 0.001},
    "edged -optimism": {"optimism": 0.0},
    "edged -optimism_upward": {"optimism_upward": False},
    "edged -ladder": {"ladder": False},
    "edged -ladder_per_request": {"ladder_per_request": False},
    "edged -chained_prior": {"prior_step": 0.0, "prior_strength": 2.0},
    "edged -prior_floor": {"prior_floor": False},
    "edged -lp_current_rates": {"lp_current_rates": False},
    "edged -energy_head": {"energy_head": False},
    "edged -calibration (text head alone)": {"calibration": False},
    "edged -head": _without("head"),
    "edged -chain": _without("chain"),
    "edged -neighbours": _without("neighbours"),
    "edged rate only": {"experts": ("rate",)},
    "edged +shared_head": {"shared_head": True},
}
#: what the mixed stream ablates (the predictor is what reads the request)
MIXED_ABLATIONS = ["edged -head", "edged -chain", "edged -neighbours", "edged rate only",
                   "edged -energy_head", "edged -ladder_per_request"]
MIXED_ALPHAS = (0.65, 0.70, 0.75)
MIXED_FIRST_SEED = 10
HELD_OUT = ["messplus", "edged"]
MAIN = ["messplus", "edged", "edged@fixed", "random", "random_constrained", "static_mix",
        "oracle"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "messplus")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--held-out", type=int, default=5,
                        help="two more seed ranges of this size after --seeds (0: none)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed stream")
    args = parser.parse_args()
    routers = {"messplus": paper_factory(), "edged": edged_factory()}
    routers.update({k: edged_factory(EDGED.with_(**v)) for k, v in ABLATIONS.items()})
    results = []
    held_out: list[list] = [[], []] if args.held_out else []  # tuning seeds, then fresh ones
    start = time.monotonic()

    def progress(line: str) -> None:
        print(f"\r\033[K[{time.monotonic() - start:5.0f}s] {line}", end="", file=sys.stderr,
              flush=True)

    traces = [load_trace(path) for path in find_traces([args.data])]
    for trace in traces:
        alpha = DEFAULT_ALPHA[trace.benchmark]
        results.append(run_benchmark(trace, alpha, args.seeds, routers, progress))
        held = {k: routers[k] for k in HELD_OUT}
        for k, runs in enumerate(held_out):
            first = args.seeds + k * args.held_out
            runs.append(run_benchmark(trace, alpha, args.held_out, held, progress, first))
    mixed = []
    if not args.no_mixed:
        stream = mix_traces(traces)
        mixed_routers = {k: routers[k] for k in ["messplus", "edged", *MIXED_ABLATIONS]}
        for alpha in MIXED_ALPHAS:
            mixed.append(run_benchmark(stream, alpha, args.seeds, mixed_routers, progress,
                                       MIXED_FIRST_SEED))
    print("\r\033[K", end="", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "routing.png")
    if mixed:
        plot(mixed, args.out / "routing-mixed.png")
    summaries = [r.summary for r in results]
    mixed_summaries = [r.summary for r in mixed]
    if args.json is not None:
        args.json.write_text(json.dumps({"benchmarks": summaries, "mixed": mixed_summaries},
                                        indent=1) + "\n")
    held = [[r.summary for r in runs] for runs in held_out]
    text = render(summaries, held, mixed_summaries, args.seeds, time.monotonic() - start)
    (args.out / "routing-report.md").write_text(text)
    print(text)
    return 0


def targets(summaries: list[dict], name: str) -> dict[str, float]:
    """Scores of one policy: alpha met where required, x random, x static_mix, x oracle."""
    met, required, vs_random, vs_mix, vs_oracle = 0, 0, [], [], []
    for s in summaries:
        p = s["policies"]
        e = p[name]["energy_j_per_request"]
        if s["requests"] >= 1000:
            required += 1
            met += p[name]["sla_met"]
        vs_random.append(p["random"]["energy_j_per_request"] / e)
        vs_mix.append(e / p["static_mix"]["energy_j_per_request"])
        vs_oracle.append(e / p["oracle"]["energy_j_per_request"])
    return {
        "met": met, "required": required, "x_random": float(np.mean(vs_random)),
        "vs_static_mix": float(np.mean(vs_mix)), "vs_oracle": float(np.mean(vs_oracle)),
        "at_or_below_mix": sum(v <= 1.0 for v in vs_mix),
    }


def target_rows(summaries: list[dict], names: list[str]) -> list[str]:
    rows = [
        "| configuration | alpha met | x random | / static_mix | / oracle | <= static_mix |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        t = targets(summaries, name)
        rows.append(
            f"| {name} | {t['met']}/{t['required']} | {t['x_random']:.2f} | "
            f"{t['vs_static_mix']:.2f} | {t['vs_oracle']:.2f} | {t['at_or_below_mix']}/"
            f"{len(summaries)} |"
        )
    return rows


def _cal(c: dict, model: str | None = None) -> str:
    c = c if model is None else c["models"].get(model, {})
    if not c.get("n"):
        return "-"
    return f"{c['brier']:.3f} / {c['ece']:.3f} / {c['auc']:.2f}"


def _calibration_rows(
    summaries: list[dict], key: str, label: Callable[[dict], str]
) -> list[str]:
    """Brier / ECE / AUC per model of messplus, edged and the running rate, a row each."""
    models = summaries[0]["models"]
    rows = [f"| {key} | policy | " + " | ".join(models) + " | all |",
            "|---|---|" + "---|" * (len(models) + 1)]
    for s in summaries:
        for name in ["messplus", "edged", "edged rate only"]:
            c = s["calibration"][name]
            rows.append(f"| {label(s)} | {name} | "
                        + " | ".join(_cal(c, model) for model in s["models"])
                        + f" | {_cal(c)} |")
    return rows


def render(summaries: list[dict], held: list[list[dict]], mixed: list[dict], seeds: int,
           seconds: float) -> str:
    out = [
        "# Routing report (generated)",
        "",
        "Written by `python tools/routing_report.py` from `../shared/data/messplus` "
        f"({len(summaries)} benchmarks, {seeds} seeds per benchmark, one edged configuration "
        f"for all; {seconds:.0f} s on this machine); what the numbers mean and what was tried "
        "is in [routing.md](routing.md). Energy is joules per request, counting every model "
        "run (exploration included); satisfaction is the final mean over the run, `min` the "
        "worst seed. `xrand` is random's energy over the policy's.",
        "",
        "![routing](routing.png)",
        "",
    ]
    if mixed:
        out += [
            f"## Mixed stream ({mixed[0]['requests']} requests, seeds {MIXED_FIRST_SEED} to "
            f"{MIXED_FIRST_SEED + mixed[0]['seeds'] - 1})",
            "",
            "![mixed stream](routing-mixed.png)",
            "",
            "| policy | " + " | ".join(f"alpha {m['alpha']:.2f}: J/req, min sat, x static_mix, "
                                       "x task_mix" for m in mixed) + " |",
            "|---|" + "---|" * len(mixed),
        ]
        for name in ["messplus", "edged", "edged@fixed", *MIXED_ABLATIONS, "static_mix",
                     "task_mix", "oracle"]:
            cells = []
            for m in mixed:
                q = m["policies"][name]
                miss = "" if q["sla_met"] else " MISS"
                cells.append(f"{q['energy_j_per_request']:.1f}, {q['min_satisfaction']:.4f}"
                             f"{miss}, {m['static_mix_ratio'][name]:.2f}, "
                             f"{m['task_mix_ratio'][name]:.2f}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += ["", "Predictor calibration on the mixed stream, every label the router saw, "
                "prequential (Brier / ECE / AUC per model):", ""]
        out += _calibration_rows(mixed, "alpha", lambda m: f"{m['alpha']:.2f}")
        out.append("")
    out += ["## Per benchmark", ""]
    for s in summaries:
        p = s["policies"]
        out.append(f"### {s['benchmark']} (alpha {s['alpha']}, {s['requests']} requests)")
        out.append("")
        out.append("| policy | J/request | satisfaction | min | explore | xrand | x oracle "
                   "| calls |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---|")
        names = MAIN + list(s["models"])
        rand = p["random"]["energy_j_per_request"]
        for name in names:
            q = p[name]
            e = q["energy_j_per_request"]
            ok = ("" if q["sla_met"] else
                  f" (miss: {q['seeds_met']}/{s['seeds']} seeds met, -{q['shortfall_requests']})")
            calls = " / ".join(f"{c:.2f}" for c in q["call_ratio"])
            out.append(
                f"| {name} | {e:.1f} | {q['satisfaction']:.4f} | {q['min_satisfaction']:.4f}{ok} "
                f"| {q['explore_ratio']:.3f} | {rand / e:.2f} | {s['oracle_ratio'][name]:.2f} "
                f"| {calls} |"
            )
        out.append("")
    out += [
        "## Targets and ablation",
        "",
        "Each row is one configuration over all benchmarks: alpha met on every seed (benchmarks "
        "with >= 1000 requests), `x random`: the mean over the 7 benchmarks of the per-benchmark "
        "ratio random J / policy J (each benchmark weighs the same, mmlu's 100 requests too), "
        "mean ratios policy / static_mix and policy / oracle, and on how many benchmarks it is "
        "at or below static_mix. Ablations switch one thing off edged's default (or on: "
        "`+shared_head`); `-head`, `-chain`, `-neighbours` drop that expert from the "
        "predictor's mixture, `rate only` keeps just the running rate.",
        "",
    ]
    out += target_rows(summaries, ["messplus", "edged", *ABLATIONS, "static_mix",
                                   "random_constrained"])
    for k, runs in enumerate(held):
        n = runs[0]["seeds"]
        first = seeds + k * n
        why = ("also used while tuning earlier defaults" if k == 0 else
               "never used to tune settings")
        out += ["", f"Other shuffles, seeds {first} to {first + n - 1} ({why}):", ""]
        out += target_rows(runs, [*HELD_OUT, "static_mix", "random_constrained"])
    out += [
        "",
        "## Predictor calibration per benchmark",
        "",
        "Prequential (predicted before the label trained it) over every label the router saw, "
        "Brier / ECE / AUC per model. Within one benchmark an AUC near 0.5 means the text says "
        "nothing about which requests a model gets right.",
        "",
    ]
    out += _calibration_rows(summaries, "benchmark", lambda s: s["benchmark"])
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
