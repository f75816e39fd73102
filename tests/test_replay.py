"""Replay: trace loading errors, LP oracle exactness, baselines, and one real benchmark."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edged.cli import main
from edged.replay import (
    TraceError,
    baselines,
    load_trace,
    mix_traces,
    run_benchmark,
    stream_order,
)
from edged.replay.runner import shortfall_requests
from edged.replay.trace import Trace

HEADER = (
    "doc_id,input_text,benchmark_name,"
    + ",".join(f"label_{m},acc_{m},energy_consumption_{m},inference_time_{m}" for m in "abc")
)


def synthetic(n: int = 400, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    hard = rng.random(n)
    labels = np.stack([hard < p for p in (0.5, 0.7, 0.8)], axis=1).astype(float)
    energy = np.array([1.0, 5.0, 25.0]) * rng.uniform(0.8, 1.2, (n, 3))
    texts = tuple(f"question {i} {'hard' if h > 0.6 else 'easy'}" for i, h in enumerate(hard))
    return Trace("synthetic", ("a", "b", "c"), texts, labels, energy, energy / 100.0)


def test_load_trace_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "t.csv"
    good.write_text(HEADER + "\n0,hi,t,1,1,2.0,0.1,0,0,3.0,0.2,1,1,9.0,0.3\n")
    trace = load_trace(good)
    assert trace.models == ("a", "b", "c") and trace.labels.tolist() == [[1.0, 0.0, 1.0]]
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\n0,hi,t,1,1,oops,0.1,0,0,3.0,0.2,1,1,9.0,0.3\n")
    with pytest.raises(TraceError, match="row 2 column energy_consumption_a"):
        load_trace(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("doc_id,input_text,label_a\n0,x,1\n")
    with pytest.raises(TraceError, match="missing column"):
        load_trace(missing)


def test_fixed_multiplier_replays_forecasts_with_one_hindsight_multiplier() -> None:
    """Perfect forecasts under one constant multiplier: the small model where it is right, the
    large one elsewhere, at the smallest multiplier meeting alpha on the true labels."""
    from edged.replay import Outcome

    n = 40
    right = np.arange(n) % 2 == 0
    labels = np.stack([right, np.ones(n, bool)], axis=1).astype(float)
    energy = np.tile([1.0, 10.0], (n, 1))
    trace = Trace("two", ("s", "l"), tuple(str(i) for i in range(n)), labels, energy,
                  energy / 100.0)
    nothing = np.zeros(n)
    routed = Outcome(nothing, nothing, np.zeros((n, 2)), nothing.astype(bool),
                     predicted_satisfaction=labels, predicted_energy_j=energy)
    best = baselines.fixed_multiplier(trace, routed, alpha=1.0)
    assert best.satisfaction.mean() == 1.0
    assert best.ran[:, 0].tolist() == right.astype(float).tolist()
    assert best.energy_j.mean() == pytest.approx(5.5) and not best.explored.any()
    cheap = baselines.fixed_multiplier(trace, routed, alpha=0.5)  # met with no multiplier
    assert cheap.ran[:, 0].all() and cheap.satisfaction.mean() == 0.5
    with pytest.raises(ValueError, match="forecasts"):
        baselines.fixed_multiplier(trace, Outcome(nothing, nothing, routed.ran, routed.explored),
                                   alpha=0.5)


def test_oracle_is_the_lp_optimum() -> None:
    trace = synthetic(300)
    out = baselines.oracle(trace, 0.7)
    assert out.satisfaction.mean() == pytest.approx(0.7)
    assert np.allclose(out.ran.sum(1), 1.0)
    assert out.energy_j.mean() <= trace.energy_j[:, 2].mean()


def test_oracle_not_above_any_feasible_integral_assignment() -> None:
    import itertools

    small = synthetic(7, seed=3)
    alpha = 0.6
    lp = baselines.oracle(small, alpha).energy_j.sum()
    rows = np.arange(7)
    best = min(
        small.energy_j[rows, list(c)].sum()
        for c in itertools.product(range(3), repeat=7)
        if small.labels[rows, list(c)].mean() >= alpha
    )
    assert lp <= best + 1e-9


def test_static_mix_plan_meets_alpha_in_expectation() -> None:
    trace = synthetic(1000)
    i, j, x = baselines.static_mix_plan(trace, 0.6)
    acc = trace.labels.mean(0)
    assert (1 - x) * acc[i] + x * acc[j] == pytest.approx(0.6)


def test_smallest_safe_margin_makes_every_shuffle_meet_alpha() -> None:
    """A static mix aimed at alpha misses it on some shuffles; the margin found is the first
    grid step at which none misses, and a step less leaves a miss."""
    trace = synthetic(1000)
    alpha = 0.6
    shuffles = [trace.subset(np.random.default_rng(s).permutation(len(trace)))
                for s in range(20)]
    runs = [lambda target, t=t: baselines.static_mix(t, baselines.static_mix_plan(trace, target))
            for t in shuffles]
    plain = [run(alpha) for run in runs]
    assert min(o.satisfaction.mean() for o in plain) < alpha  # aimed at alpha: some miss
    found = baselines.smallest_safe_margin(runs, alpha, step=0.002)
    assert found is not None
    margin, outcomes = found
    assert margin > 0 and all(o.satisfaction.mean() >= alpha for o in outcomes)
    below = [run(alpha + margin - 0.002) for run in runs]
    assert min(o.satisfaction.mean() for o in below) < alpha
    assert baselines.smallest_safe_margin(runs, alpha, step=0.002, limit=0.0) is None


def test_stream_order_in_runs_of_one_benchmark() -> None:
    """Block 0 is the plain per-seed shuffle; a block size serves every request once, in runs
    of at most that many requests of one benchmark, a different order per seed."""
    mixed = replace(synthetic(200), kinds=("x",) * 130 + ("y",) * 70)
    assert np.array_equal(stream_order(mixed, 3), np.random.default_rng(3).permutation(200))
    def runs(order: np.ndarray) -> list[int]:  # lengths of the maximal one-kind runs
        kinds = np.array(mixed.kinds)[order]
        return [r.size for r in np.split(kinds, np.flatnonzero(kinds[1:] != kinds[:-1]) + 1)]

    order = stream_order(mixed, 3, block=25)
    assert sorted(order.tolist()) == list(range(200))
    assert len(runs(order)) > 2  # 6 + 3 runs of at most 25, shuffled (adjacent ones merge)
    assert len(runs(stream_order(mixed, 3, block=200))) == 2  # one run per benchmark
    assert not np.array_equal(order, stream_order(mixed, 4, block=25))
    with pytest.raises(ValueError, match="block"):
        stream_order(mixed, 0, block=-1)


def test_run_benchmark_synthetic_shape() -> None:
    result = run_benchmark(synthetic(300), 0.7, seeds=2)
    s = result.summary
    assert set(s) >= {"benchmark", "alpha", "requests", "policies"}
    for name in ("messplus", "edged", "random", "random_constrained", "a", "b", "c",
                 "static_mix", "oracle"):
        p = s["policies"][name]
        assert set(p) >= {"energy_j_per_request", "satisfaction", "min_satisfaction",
                          "explore_ratio", "call_ratio"}
        assert len(p["call_ratio"]) == 3
        # every seed either met alpha or fell short by a whole number of requests
        assert 0 <= p["seeds_met"] <= 2
        assert (p["seeds_met"] == 2) == p["sla_met"] == (p["shortfall_requests"] == 0)
    assert s["policies"]["messplus"]["explore_ratio"] > 0
    # exploration energy is counted: messplus runs every model when exploring
    assert s["policies"]["messplus"]["call_ratio"][2] >= s["policies"]["messplus"]["explore_ratio"]
    assert 0.0 <= s["calibration"]["edged"]["brier"] <= 1.0
    for name in ("messplus", "edged"):  # each router's forecasts under one fixed multiplier
        assert s["policies"][f"{name}@fixed"]["explore_ratio"] == 0.0
    assert s["policies"]["edged@fixed"]["min_satisfaction"] >= 0.7
    per_model = s["calibration"]["edged"]["models"]
    assert set(per_model) <= set(s["models"]) and per_model
    assert all(0.0 <= v["auc"] <= 1.0 or np.isnan(v["auc"]) for v in per_model.values())


def test_shortfall_counts_the_missing_satisfied_requests() -> None:
    # alpha 0.78 on 1838 requests needs 1433.64 satisfied ones: 1431 is three short
    assert shortfall_requests(1431 / 1838, 0.78, 1838) == 3
    assert shortfall_requests(1434 / 1838, 0.78, 1838) == 0
    assert shortfall_requests(0.78, 0.78, 1838) == 0  # exactly alpha meets it
    assert shortfall_requests(0.78 - 1e-7, 0.78, 1838) == 1  # a hair below is one request


def write_csv(trace: Trace, path: Path, name: str | None = None) -> Path:
    """`trace` as a MESS+ CSV (benchmark_name `name`, default the trace's)."""
    rows = [HEADER]
    for k in range(len(trace)):
        cols = [str(k), trace.texts[k], name or trace.benchmark]
        for m in range(3):
            lab = trace.labels[k, m]
            cols += [str(lab), str(lab), str(trace.energy_j[k, m]), str(trace.latency_s[k, m])]
        rows.append(",".join(cols))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_cli_replay_writes_json(tmp_path: Path) -> None:
    trace = synthetic(200)
    csv = write_csv(trace, tmp_path / "synthetic.csv")
    out = tmp_path / "r.json"
    assert main(["replay", str(csv), "--alpha", "0.7", "--seeds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "synthetic" and data["requests"] == 200
    assert main(["replay", str(tmp_path / "nope.csv")]) == 2
    png = tmp_path / "r.png"
    assert main(["replay", str(csv), "--alpha", "0.7", "--seeds", "1", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_edged_meets_alpha_on_real_benchmark(messplus_dir: Path) -> None:
    trace = load_trace(messplus_dir / "boolq.csv")
    result = run_benchmark(trace, 0.80, seeds=2)
    edged = result.summary["policies"]["edged"]
    assert edged["min_satisfaction"] >= 0.80
    assert edged["energy_j_per_request"] < result.summary["policies"]["random"][
        "energy_j_per_request"]


def test_run_benchmark_first_seed_gives_other_shuffles() -> None:
    trace = synthetic(200)
    first = run_benchmark(trace, 0.7, seeds=2).summary["policies"]["edged"]
    again = run_benchmark(trace, 0.7, seeds=2, first_seed=0).summary["policies"]["edged"]
    later = run_benchmark(trace, 0.7, seeds=2, first_seed=5).summary["policies"]["edged"]
    assert first == again
    assert later["energy_j_per_request"] != first["energy_j_per_request"]


def test_model_without_label_column_is_an_error(tmp_path: Path) -> None:
    """Energy and time of model b but no label_b: an error naming it, not a 1-model replay."""
    path = tmp_path / "nolabel.csv"
    path.write_text(
        "input_text,label_a,energy_consumption_a,inference_time_a,"
        "energy_consumption_b,inference_time_b\nhi,1,2.0,0.1,4.0,0.2\n"
    )
    with pytest.raises(TraceError, match=r"nolabel\.csv: missing column\(s\) label_b"):
        load_trace(path)


def two_benchmarks(seed: int = 1) -> Trace:
    """Benchmark `easy` gains little from the dear models, `hard` a lot: per benchmark mixing
    should spend the upgrades on `hard`, which one static mix for both cannot."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, n, rates in (("easy", 300, (0.80, 0.84, 0.86)), ("hard", 200, (0.30, 0.60, 0.75))):
        labels = (rng.random((n, 1)) < np.array(rates)).astype(float)
        energy = np.array([1.0, 4.0, 20.0]) * rng.uniform(0.8, 1.2, (n, 3))
        texts = tuple(f"{name} {i}" for i in range(n))
        parts.append(Trace(name, ("a", "b", "c"), texts, labels, energy, energy / 100.0))
    return mix_traces(parts)


def test_task_mix_equals_static_mix_on_one_benchmark() -> None:
    trace = synthetic(500)
    for alpha in (0.4, 0.55, 0.65, 0.72, 0.79, 0.95):
        plan = baselines.static_mix_plan(trace, alpha)
        task = baselines.task_mix_plan(trace, alpha)
        assert task == {"synthetic": plan}
        assert baselines.task_mix(trace, task).energy_j.mean() == pytest.approx(
            baselines.static_mix(trace, plan).energy_j.mean(), rel=1e-12)


def test_task_mix_is_the_lp_optimum_on_two_benchmarks() -> None:
    trace = two_benchmarks()
    kinds = np.array(trace.kinds)
    w = [(kinds == k).mean() for k in ("easy", "hard")]
    acc = [trace.labels[kinds == k].mean(0) for k in ("easy", "hard")]
    energy = [trace.energy_j[kinds == k].mean(0) for k in ("easy", "hard")]
    step = 0.01
    grid = np.array([(p, q, 1.0 - p - q) for p in np.arange(0, 1 + 1e-9, step)
                     for q in np.arange(0, 1 - p + 1e-9, step)]).clip(0.0)
    sat = w[0] * (grid @ acc[0])[:, None] + w[1] * (grid @ acc[1])[None, :]
    cost = w[0] * (grid @ energy[0])[:, None] + w[1] * (grid @ energy[1])[None, :]
    for alpha in (0.62, 0.70, 0.78):
        plan = baselines.task_mix_plan(trace, alpha)
        lp_sat, lp_cost = baselines.task_mix_expected(trace, plan)
        brute = cost[sat >= alpha].min()
        assert lp_sat == pytest.approx(alpha)
        assert lp_cost <= brute + 1e-9  # no mixture on the grid is cheaper
        assert lp_cost >= brute - 5.0 * step  # and the grid gets within its resolution
        static = baselines.static_mix_plan(trace, alpha)
        i, j, x = static
        static_cost = (1 - x) * trace.energy_j[:, i].mean() + x * trace.energy_j[:, j].mean()
        assert lp_cost <= static_cost + 1e-9
        served = baselines.task_mix(trace, plan)
        assert served.energy_j.mean() <= baselines.static_mix(trace, static).energy_j.mean()
        assert served.satisfaction.mean() == pytest.approx(alpha, abs=0.02)  # labels of the rows
    # the upgrades go to the benchmark that gains most per joule
    plan = baselines.task_mix_plan(trace, 0.70)
    assert plan["easy"][0] == 0 and plan["hard"][1] >= 1


def test_cli_mix_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two benchmark CSVs interleaved into one `mixed` stream; an alpha list gives a list."""
    mixed = two_benchmarks()
    kinds = np.array(mixed.kinds)
    paths = [write_csv(mixed.subset(np.flatnonzero(kinds == k)), tmp_path / f"{k}.csv", k)
             for k in ("easy", "hard")]
    out = tmp_path / "mix.json"
    args = ["replay", "--mix", *map(str, paths), "--seeds", "1", "--json", str(out)]
    assert main([*args, "--alpha", "0.7"]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "mixed" and data["requests"] == 500 and data["alpha"] == 0.7
    assert data["benchmarks"] == {"easy": 300, "hard": 200}
    pol = data["policies"]
    assert {"edged", "messplus", "static_mix", "task_mix", "oracle"} <= set(pol)
    assert pol["task_mix"]["energy_j_per_request"] < pol["static_mix"]["energy_j_per_request"]
    assert set(data["task_mix_plan"]) == {"easy", "hard"}
    assert data["task_mix_ratio"]["task_mix"] == 1.0
    table = capsys.readouterr().out
    assert "xstatic" in table and "xtask" in table and " SLA " in table
    header = next(line for line in table.splitlines() if line.strip().startswith("policy"))
    assert header.split()[-3:] == ["a", "b", "c"]  # the calls columns, headed by model
    assert "min sat" in header and "mean sat" in header
    assert main([*args, "--alpha", "0.65,0.75", "--first-seed", "3"]) == 0
    data = json.loads(out.read_text())
    assert isinstance(data, list) and [d["alpha"] for d in data] == [0.65, 0.75]
    assert all(d["benchmark"] == "mixed" and d["first_seed"] == 3 for d in data)
    assert all(d["block"] == 0 for d in data)
    capsys.readouterr()
    assert main([*args, "--alpha", "0.7", "--blocks", "50"]) == 0  # runs of one benchmark
    data = json.loads(out.read_text())
    assert data["block"] == 50 and data["requests"] == 500
    assert "in runs of 50 of one benchmark" in capsys.readouterr().out
    assert main([*args, "--alpha", "0.7", "--blocks", "-1"]) == 2
    assert "--blocks must be >= 0" in capsys.readouterr().err
    assert main(["replay", "--mix", str(paths[0])]) == 2  # no default alpha for a mix
    assert "needs --alpha" in capsys.readouterr().err
    assert main(["replay", str(paths[0]), "--alpha", "0.7,x"]) == 2
    assert "'x'" in capsys.readouterr().err


def test_cli_warns_unreachable_alpha(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_csv(synthetic(150), tmp_path / "synthetic.csv")
    assert main(["replay", str(csv), "--alpha", "1", "--seeds", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning: alpha 1.0 is unreachable on synthetic" in captured.err
    assert "most accurate model (c)" in captured.err
    assert "MISS" in captured.out and "unreachable" in captured.out
    assert main(["replay", str(csv), "--alpha", "0.6", "--seeds", "1"]) == 0
    assert "unreachable" not in capsys.readouterr().err


def test_cli_default_traces_beside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default does not depend on the working directory; absent, it says to pass paths."""
    from edged.commands.replay import default_traces

    monkeypatch.delenv("EDGED_SHARED", raising=False)
    import edged

    checkout = Path(edged.__file__).resolve().parent.parent
    assert default_traces() == checkout.parent / "shared" / "data" / "messplus"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGED_SHARED", str(tmp_path / "nowhere"))
    assert main(["replay", "--alpha", "0.7"]) == 2
    assert "pass trace CSVs or directories" in capsys.readouterr().err


def test_task_mix_equals_static_mix_on_each_real_benchmark(messplus_dir: Path) -> None:
    """Baselines only (no router), so fast: same plan, same served joules on every trace."""
    for path in sorted(messplus_dir.glob("*.csv")):
        trace = load_trace(path)
        for alpha in (0.4, 0.6, 0.8, 0.96):
            plan = baselines.static_mix_plan(trace, alpha)
            task = baselines.task_mix_plan(trace, alpha)
            assert task == {trace.benchmark: plan}, (path.name, alpha)
            assert (baselines.task_mix(trace, task).energy_j
                    == baselines.static_mix(trace, plan).energy_j).all()


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    from edged.replay.runner import auc

    assert auc(np.array([0.1, 0.9]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == 0.5
    assert auc(np.array([0.2, 0.6, 0.8]), np.array([1.0, 0.0, 1.0])) == 0.5
    assert np.isnan(auc(np.array([0.2, 0.3]), np.array([1.0, 1.0])))
