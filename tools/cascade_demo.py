"""A confidence cascade on the demo zoo, measured live, beside edged's router (issue 9).

Every eval prompt runs once on every demo model through `edged.zoo` inside an `edged.energy`
window: its answer is checked against the reference and the model's own confidence is read
(`GenerationResult.min_token_prob`, the probability of its least certain token). Then request
streams are replayed (400 requests, the demo's order, several seeds):

- cascade: run the models cheapest first and serve the first whose confidence clears the bar
  (the top model always serves); every model run costs its joules. The bar is learned online
  by a virtual queue, as edged learns its multiplier: `bar = clip(bar0 + kappa * D)`, with the
  signed deficit `D <- D + alpha - label` after each served label, so a deficit raises the bar
  and a surplus lowers it (spent on cheaper answers).
- edged: the MESS+ router (`edged.replay.run_router`) on the same outcomes and joules.
- largest, and the oracle (the cheapest model that is right; the largest when none is: no SLA,
  a floor on the energy any router could reach).

Prints a table and writes JSON (default out/bench/cascade_demo.json). FrugalGPT and AutoMix use
the cheap model's own answer this way; the MESS+ traces hold no confidences, hence the demo.

    python tools/cascade_demo.py [--seeds 5] [--requests 400] [--alpha 0.8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.checkers import get_checker
from edged.demo import load_eval_set, request_stream
from edged.energy import create_meter
from edged.paths import demo_zoo_dir
from edged.replay import Trace
from edged.replay.simulate import run_router
from edged.router import RouterConfig
from edged.zoo import Zoo


def measure(zoo: Zoo, rows: list[dict[str, str]], energy: str) -> dict[str, np.ndarray]:
    """Per prompt and model: correct (0/1), confidence, joules (one run each)."""
    check = get_checker(zoo.manifest.checker)
    meter = create_meter(energy)
    n, m = len(rows), len(zoo.names)
    out = {k: np.zeros((n, m)) for k in ("correct", "confidence", "joules")}
    try:
        for j, name in enumerate(zoo.names):
            model = zoo.get(name)
            params = dataclasses.replace(model.defaults, logprobs=True)  # the confidence
            # first run allocates: keep it out of the tally
            model.generate(rows[0]["prompt"], params=params)
            for i, row in enumerate(rows):
                with meter.window() as window:
                    result = model.generate(row["prompt"], params=params)
                out["correct"][i, j] = float(check(result.text, row["answer"]))
                out["confidence"][i, j] = result.min_token_prob
                out["joules"][i, j] = window.record.joules
                if sys.stderr.isatty():
                    print(f"\r{name}: {i + 1}/{n}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    finally:
        meter.close()
    return out


def cascade(correct: np.ndarray, confidence: np.ndarray, joules: np.ndarray, alpha: float,
            bar0: float = 0.5, kappa: float = 0.05) -> tuple[float, float, np.ndarray]:
    """Replay the queue-learned cascade over one stream: satisfaction, J/request, served."""
    debt, sat, spent = 0.0, [], []
    served = np.zeros(correct.shape[1])
    for ok, conf, cost in zip(correct, confidence, joules, strict=True):
        bar = min(0.999, max(0.0, bar0 + kappa * debt))
        pick = len(ok) - 1
        for j in range(len(ok) - 1):
            if conf[j] >= bar:
                pick = j
                break
        spent.append(cost[: pick + 1].sum())
        sat.append(ok[pick])
        served[pick] += 1
        debt += alpha - ok[pick]
    return float(np.mean(sat)), float(np.mean(spent)), served / len(sat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--energy", default="estimate", help="energy backend (default estimate)")
    ap.add_argument("--json", type=Path, default=Path("out/bench/cascade_demo.json"))
    args = ap.parse_args()
    zoo_dir = demo_zoo_dir()
    zoo = Zoo.from_manifest(zoo_dir / "zoo.toml")
    evals = load_eval_set(zoo_dir / "eval.jsonl")
    data = measure(zoo, evals, args.energy)
    index = {row["prompt"]: i for i, row in enumerate(evals)}
    names = list(zoo.names)
    rows: dict[str, list[tuple[float, float, list[float]]]] = {}
    for seed in range(args.seeds):
        order = np.array([index[r["prompt"]] for r in request_stream(evals, args.requests, seed)])
        c, f, e = data["correct"][order], data["confidence"][order], data["joules"][order]
        largest = e[:, -1].mean()
        sat, joules, mix = cascade(c, f, e, args.alpha)
        rows.setdefault("cascade", []).append((sat, joules / largest, mix.tolist()))
        trace = Trace("demo", tuple(names), tuple(evals[i]["prompt"] for i in order), c, e,
                      np.ones_like(e))
        out = run_router(trace, RouterConfig(alpha=args.alpha, seed=seed))
        rows.setdefault("edged", []).append((float(out.satisfaction.mean()),
                                             float(out.energy_j.mean()) / largest,
                                             out.ran.mean(axis=0).tolist()))
        right = c > 0.5
        pick = np.where(right.any(axis=1), right.argmax(axis=1), len(names) - 1)
        rows.setdefault("oracle", []).append((float(c[np.arange(len(c)), pick].mean()),
                                              float(e[np.arange(len(e)), pick].mean()) / largest,
                                              np.bincount(pick, minlength=len(names)).tolist()))
        rows.setdefault("largest", []).append((float(c[:, -1].mean()), 1.0, [0.0, 0.0, 1.0]))
    summary = {
        policy: {"min_satisfaction": min(r[0] for r in runs),
                 "mean_satisfaction": float(np.mean([r[0] for r in runs])),
                 "energy_vs_largest": float(np.mean([r[1] for r in runs])),
                 "sla_met_every_seed": bool(min(r[0] for r in runs) >= args.alpha)}
        for policy, runs in rows.items()
    }
    conf = data["confidence"]
    print(f"\nconfidence of right vs wrong answers (mean min-token prob), alpha {args.alpha}, "
          f"{args.requests} requests x {args.seeds} seeds")
    for j, name in enumerate(names):
        ok = data["correct"][:, j] > 0.5
        print(f"  {name:8s} right {conf[ok, j].mean() if ok.any() else float('nan'):.3f}   "
              f"wrong {conf[~ok, j].mean() if (~ok).any() else float('nan'):.3f}")
    print(f"\n{'policy':10s} {'min sat':>8s} {'mean sat':>9s} {'SLA':>5s} {'x largest':>10s}")
    for policy, s in summary.items():
        print(f"{policy:10s} {s['min_satisfaction']:8.3f} {s['mean_satisfaction']:9.3f} "
              f"{'met' if s['sla_met_every_seed'] else 'MISS':>5s} {s['energy_vs_largest']:10.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"alpha": args.alpha, "requests": args.requests,
                                     "seeds": args.seeds, "policies": summary}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
