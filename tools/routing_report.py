"""Replay all MESS+ benchmarks (5 seeds) and write docs/routing.md and docs/routing.png.

Runs the faithful `messplus`, edged's one default configuration, every baseline, and an
ablation of each beyond-paper feature (switched off in edged, or on where it is off by default).

    python tools/routing_report.py [--data ../shared/data/messplus] [--seeds 5] [--json out.json]
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

from edged.replay import DEFAULT_ALPHA, EDGED, find_traces, load_trace, run_benchmark
from edged.replay.plot import plot
from edged.replay.runner import edged_factory, paper_factory

ROOT = Path(__file__).resolve().parent.parent

ABLATIONS = {
    "edged -signed_queue": {"signed_queue": False},
    "edged -lp_prior": {"lp_prior": False},
    "edged -lean_explore": {"explore_runs": "all", "explore_exponent": 0.25},
    "edged -margin": {"margin": 0.0},
    "edged -V_auto": {"V": 0.001},
    "edged -calibration": {"calibration": False},
    "edged +shared_head": {"shared_head": True},
    "edged -optimism": {"optimism": 0.0},
    "edged -chained_prior": {"prior_step": 0.0, "prior_strength": 2.0},
    "edged -optimism_upward": {"optimism_upward": False},
    "edged -margin_scaled": {"margin_scaled": False},
    "edged -ladder": {"ladder": False},
    "edged -prior_floor": {"prior_floor": False},
    "edged -lp_current_rates": {"lp_current_rates": False},
    "edged v2 (previous default)": {
        "ladder": False, "prior_floor": False, "lp_current_rates": False,
    },
    "edged v1": {
        "optimism_upward": False, "margin_scaled": False, "margin": 0.1,
        "ladder": False, "prior_floor": False, "lp_current_rates": False,
    },
}
HELD_OUT = ["messplus", "edged", "edged v2 (previous default)"]
MAIN = ["messplus", "edged", "random", "random_constrained", "static_mix", "oracle"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "messplus")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--held-out", type=int, default=5,
                        help="two more seed ranges of this size after --seeds (0: none)")
    args = parser.parse_args()
    routers = {"messplus": paper_factory(), "edged": edged_factory()}
    routers.update({k: edged_factory(EDGED.with_(**v)) for k, v in ABLATIONS.items()})
    results = []
    held_out: list[list] = [[], []] if args.held_out else []  # tuning seeds, then fresh ones
    start = time.monotonic()
    for path in find_traces([args.data]):
        trace = load_trace(path)

        def progress(line: str) -> None:
            print(f"\r\033[K[{time.monotonic() - start:5.0f}s] {line}", end="", file=sys.stderr,
                  flush=True)

        alpha = DEFAULT_ALPHA[trace.benchmark]
        results.append(run_benchmark(trace, alpha, args.seeds, routers, progress))
        held = {k: routers[k] for k in HELD_OUT}
        for k, runs in enumerate(held_out):
            first = args.seeds + k * args.held_out
            runs.append(run_benchmark(trace, alpha, args.held_out, held, progress, first))
    print("\r\033[K", end="", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "routing.png")
    summaries = [r.summary for r in results]
    if args.json is not None:
        args.json.write_text(json.dumps(summaries, indent=1) + "\n")
    held = [[r.summary for r in runs] for runs in held_out]
    text = render(summaries, held, args.seeds, time.monotonic() - start)
    (args.out / "routing.md").write_text(text)
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
            met += p[name]["min_satisfaction"] >= s["alpha"] - 1e-12
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


def render(summaries: list[dict], held: list[list[dict]], seeds: int, seconds: float) -> str:
    out = [
        "# Routing results (MESS+ traces)",
        "",
        "Generated by `python tools/routing_report.py` from `../shared/data/messplus` "
        f"({len(summaries)} benchmarks, {seeds} seeds, one edged configuration for all; "
        f"{seconds:.0f} s on this machine). Energy is joules per request, counting every model "
        "run (exploration included); satisfaction is the final mean over the run, "
        "`min` the worst seed. `xrand` is random's energy over the policy's.",
        "",
        "![routing](routing.png)",
        "",
        "## What edged does beyond the paper",
        "",
        "All switchable in `RouterConfig` (ablated below); `RouterConfig.paper()` is plain MESS+ "
        "(clipped queue, raw-joule V = 0.001, full-zoo exploration at c / t^(1/4), c = 0.1).",
        "",
        "- `V = \"auto\"`: energies are divided by the dearest model's running mean, so one V "
        "(3.0) serves every zoo and benchmark.",
        "- `signed_queue` + `lp_prior`: decisions are weighted by `V * lam + D`, where `lam` is "
        "the multiplier that meets alpha on the last 512 predictions (bisection on the "
        "single-constraint LP, refreshed every 16 requests off the hot path, capped at the first "
        "upgrade from the cheapest model) and `D` the unclipped deficit sum(target - s). The "
        "paper's queue must first build up to the whole multiplier, and that backlog Q_T / T is "
        "exactly what makes it miss alpha; here `D` only corrects the estimate's error. The "
        "paper's Q is still kept and reported.",
        "- `margin` + `margin_scaled`: the deficit aims at "
        "`alpha + 0.13 * 2 sqrt(alpha (1 - alpha)) / sqrt(t)` (at alpha 0.5 and t = 1000 about "
        "+0.004; at alpha 0.96 a third of that), so the final mean clears alpha despite the "
        "last labels: the deficit's noise, hence the surplus needed, grows with the label "
        "spread. What the margin must cover is the deficit left at the end (a tail of unlucky "
        "labels of the model served; nothing cheaper can repay it), so the summed margin "
        "(0.26 sqrt(alpha (1 - alpha) T) labels) must exceed it.",
        "- lean exploration: each other model k runs beside the choice with probability "
        "`p_t * E_choice / E_k` with `p_t = c / sqrt(t)`: cheap models are checked often, the "
        "70B rarely; the paper runs all three (~2,500 J) on 2-3% of requests.",
        "- predictor: per-model running success rates with a chained prior (model m starts at "
        "model m-1's rate + 0.03, worth 20 labels), plus a hashed word/char n-gram logistic head "
        "whose weight is learned online from prequential predictions (calibration) and starts "
        "at 0; a UCB bonus `0.2 sqrt(ln t / n_m)` keeps a model with a few unlucky labels from "
        "being starved.",
        "- `optimism_upward`: the bonus goes only to models dearer than the choice made without "
        "it. A bonus on the cheaper model (fewer labels than the one it competes with) moved "
        "the point where the deficit flips the choice, so the deficit settled a few labels "
        "above zero and ate the margin (sciq missed alpha on some seeds, arc_challenge on held-out "
        "ones).",
        "- `ladder`: the choice may go at most to the second cheapest model, or past a model "
        "only while its running rate's upper bound (rate + 0.2 sqrt(ln t / n)) is below the "
        "target. Without it a deficit of 8-15 labels plus the optimism bonus of the rarely "
        "labelled 70B (~0.1) made the 70B look worth 5x the joules of the medium model, which "
        "meets alpha on its own; the 70B still gets labels through lean exploration, and is "
        "served where the medium model is confidently short (mmlu_abstract_algebra).",
        "- `prior_floor`: the chained prior is a floor (model m's rate is the larger of its own "
        "Beta(1, 1) estimate and model m-1's rate + 0.03), not a pull worth 20 labels that kept "
        "the medium model's early rate just below alpha + margin.",
        "- `lp_current_rates`: the LP prior is solved on the last 512 requests' text-head "
        "deviations added to today's running rates, not on the probabilities stored back then: "
        "an early lucky rate of the small model kept the multiplier at 0 for a whole window "
        "after that rate had dropped below alpha (sciq).",
        "- not measured here (no data for them in these traces; covered by tests): the energy "
        "budget queue (`energy_budget_j`), latency deadlines (`deadline_ms`), warm start.",
        "",
        "Finding: on these traces the question text carries no usable signal about which model "
        "answers correctly (the text head's Brier score is no better than the running rate), so "
        "no online router can do much better than the hindsight static mix; the oracle needs "
        "per-request outcomes that nothing observable predicts. edged therefore aims to track "
        "static_mix with little exploration and without missing alpha.",
        "",
        "Where the energy above static_mix went (instrumented replay, v2 default, seeds "
        "0-4; `ladder` and `prior_floor` remove most of it): exploration costs only 1-3 J "
        "per request; the gap was the 70B model served "
        "outside exploration (piqa 58 of a 64 J gap, sciq 32 of 45, social_iqa 13 of 37). It "
        "is chosen when the deficit is up (8-15 labels around t = 300-600 on piqa, because the "
        "medium model's early running rate sits just below alpha + margin) and the UCB bonus of "
        "the rarely labelled 70B (~0.1) makes its gain look worth 5x the joules. The rest is "
        "the safety surplus: static_mix meets alpha only in expectation (it misses on most "
        "benchmarks' worst seed), edged must meet it on every seed. On mmlu_abstract_algebra "
        "(100 requests, the medium model below alpha) meeting alpha needs the 70B on about 40% "
        "of requests, so edged stays near random's energy there, which pulls the mean ratio "
        "down. Tried, and either missed alpha on some seed or used more energy (seeds 0-4 "
        "or 0-9): "
        "constant-margin and cost-scaled optimism, a UCB cap on escalation, a deficit gate on "
        "the bonus, exploration floors, no text head, an LP multiplier snapped to the hull "
        "slope, forced 'rescue' exploration of the next model, other V / c / prior settings.",
        "",
        "## Per benchmark",
        "",
    ]
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
            ok = "" if q["min_satisfaction"] >= s["alpha"] else " (miss)"
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
        "at or below static_mix.",
        "",
    ]
    out += target_rows(summaries, ["messplus", "edged", *ABLATIONS, "static_mix",
                                   "random_constrained"])
    for k, runs in enumerate(held):
        n = runs[0]["seeds"]
        first = seeds + k * n
        why = ("also used while tuning the default (margin 0.13 was picked on seeds 0 to 9)"
               if k == 0 else "never used to tune settings; candidate defaults that missed alpha "
               "here were dropped")
        out += [
            "",
            f"Other shuffles, seeds {first} to {first + n - 1} ({why}):",
            "",
        ]
        out += target_rows(runs, [*HELD_OUT, "static_mix", "random_constrained"])
    out += [
        "",
        "## Predictor calibration",
        "",
        "Prequential (predicted before the label trained it) over every label the router saw.",
        "",
        "| benchmark | messplus Brier | messplus ECE | edged Brier | edged ECE | "
        "edged -calibration Brier | ECE |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        c = s["calibration"]
        out.append(
            f"| {s['benchmark']} | {c['messplus']['brier']:.4f} | {c['messplus']['ece']:.4f} | "
            f"{c['edged']['brier']:.4f} | {c['edged']['ece']:.4f} | "
            f"{c['edged -calibration']['brier']:.4f} | {c['edged -calibration']['ece']:.4f} |"
        )
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
