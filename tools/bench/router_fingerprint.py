"""Fingerprint of the router's decisions on a mixed MESS+ trace, to check that a speed-up of
`Router.decide` changes nothing: every Decision field, every feature vector, every replay
outcome and the final learned state, for several configurations, saved as one .npz.

    python tools/bench/router_fingerprint.py out/fp_new.npz [--requests 3000]
    python tools/bench/router_fingerprint.py --compare out/fp_old.npz out/fp_new.npz

Run it once with the old code on PYTHONPATH and once with the new; `--compare` demands
bit-identical arrays (np.array_equal, NaN-aware).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edged.replay.simulate import LabelModel, run_router
from edged.replay.trace import find_traces, load_trace, mix_traces
from edged.router import Router, RouterConfig

EDGED = RouterConfig(alpha=0.7)
CONFIGS = {
    "edged": (EDGED, LabelModel()),
    "paper": (RouterConfig.paper(alpha=0.7), LabelModel()),
    "edged_agree": (replace(EDGED, top_prior=0.9, label_need=0.5),
                    LabelModel("agreement", sparsity=0.1)),
    "edged_sparse": (replace(EDGED, alpha=0.85, seed=3), LabelModel(sparsity=0.3)),
    "edged_fixed_v": (replace(EDGED, V=0.002, energy_budget_j=300.0, shared_head=True,
                              ladder_per_request=False, lp_current_rates=False),
                      LabelModel()),
    "edged_no_calib": (replace(EDGED, calibration=False, energy_head=False, prior_floor=False,
                               explore_runs="all", explore_serves="choice"), LabelModel()),
    "edged_no_alpha": (replace(EDGED, alpha=None, energy_budget_j=200.0, ladder=False),
                       LabelModel()),
}


def fingerprint(requests: int, seed: int) -> dict[str, np.ndarray]:
    traces = [load_trace(p) for p in find_traces(["/work/shared/data/messplus"])]
    mixed = mix_traces(traces)
    rows = np.random.default_rng(seed).permutation(len(mixed))[:requests]
    trace = mixed.subset(rows)
    out: dict[str, np.ndarray] = {}
    for label, (config, labels) in CONFIGS.items():
        outcome = run_router(trace, config, labels)
        for name in ("satisfaction", "energy_j", "ran", "explored", "predictions"):
            out[f"{label}/{name}"] = getattr(outcome, name)
    # Decision fields, features, deadlines, exclusions, embeddings and final state, directly.
    names = trace.models
    for label, dim in (("direct", 0), ("direct_emb", 8)):
        router = Router(names, replace(EDGED, seed=5), embedding_dim=dim)
        emb_rng = np.random.default_rng(11)
        lab_rng = np.random.default_rng(12)
        rec: dict[str, list] = {k: [] for k in (
            "t", "model", "explored", "run", "q", "z", "target", "sat", "energy", "latency",
            "top_chance", "idx", "val", "shape")}
        for i, text in enumerate(trace.texts[: requests // 3]):
            kwargs = {}
            if dim:
                kwargs["embedding"] = emb_rng.normal(size=dim)
            if i % 7 == 3:
                kwargs["deadline_ms"] = 900.0
            if i % 11 == 5:
                kwargs["exclude"] = (names[-1],)
            d = router.decide(text, **kwargs)
            rec["t"].append(d.t)
            rec["model"].append(names.index(d.model))
            rec["explored"].append(d.explored)
            rec["run"].append(sum(1 << names.index(n) for n in d.run))
            rec["q"].append(d.q)
            rec["z"].append(d.z)
            rec["target"].append(np.nan if d.target is None else d.target)
            rec["sat"].append([d.predicted_satisfaction[n] for n in names])
            rec["energy"].append([d.predicted_energy_j[n] for n in names])
            rec["latency"].append([d.predicted_latency_s[n] for n in names])
            rec["top_chance"].append(d.top_chance)
            rec["idx"].append(d.features.idx)
            rec["val"].append(d.features.val)
            rec["shape"].append(d.features.shape)
            j = [names.index(n) for n in d.run]
            row = rows[i]
            router.observe_energy(d, {names[k]: mixed.energy_j[row, k] for k in j},
                                  {names[k]: mixed.latency_s[row, k] for k in j})
            if lab_rng.random() < 0.8:
                router.observe_labels(d, {names[k]: mixed.labels[row, k] for k in j})
        for key, values in rec.items():
            if key in ("idx", "val", "shape"):
                out[f"{label}/{key}_len"] = np.array([len(v) for v in values])
                out[f"{label}/{key}"] = np.concatenate(values)
            else:
                out[f"{label}/{key}"] = np.array(values)
        state = {**router.predictor.arrays(), **router.energy.arrays("energy"),
                 **router.latency.arrays("latency"), **router.energy_head.arrays(),
                 "recent": router.recent, "recent_energy": router.recent_energy,
                 "calls": router.calls, "served": router.served}
        for key, value in state.items():
            out[f"{label}/state/{key}"] = value
        out[f"{label}/scalars"] = np.array([router.q, router.z, router.debt, router.lam,
                                            router.lam_t, router.served_satisfaction])
    return out


def compare(old_path: str, new_path: str) -> int:
    old, new = np.load(old_path), np.load(new_path)
    bad = sorted(set(old.files) ^ set(new.files))
    for key in sorted(set(old.files) & set(new.files)):
        a, b = old[key], new[key]
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(
                a, b, equal_nan=a.dtype.kind == "f"):
            bad.append(key)
    print(f"{len(old.files)} arrays compared; {len(bad)} differ" + (f": {bad}" if bad else ""))
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        parser.error("give an output path or --compare OLD NEW")
    np.savez(args.out, **fingerprint(args.requests, args.seed))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
