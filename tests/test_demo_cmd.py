"""`edged demo`: request stream, eval-set errors, and a short run end to end over the socket."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edged.demo import DemoConfig, DemoError, load_eval_set, request_stream
from edged.paths import demo_zoo_dir

ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(5)]


def test_request_stream_covers_the_set_then_reshuffles() -> None:
    stream = request_stream(ROWS, 12, seed=3)
    assert len(stream) == 12
    assert sorted(r["prompt"] for r in stream[:5]) == sorted(r["prompt"] for r in ROWS)
    assert sorted(r["prompt"] for r in stream[5:10]) == sorted(r["prompt"] for r in ROWS)
    assert stream == request_stream(ROWS, 12, seed=3)
    assert stream != request_stream(ROWS, 12, seed=4)


def test_bad_eval_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    with pytest.raises(DemoError, match=r"eval.jsonl:2: needs"):
        load_eval_set(path)
    path.write_text("not json\n")
    with pytest.raises(DemoError, match=r"eval.jsonl:1: not JSON"):
        load_eval_set(path)
    path.write_text("\n")
    with pytest.raises(DemoError, match="empty"):
        load_eval_set(path)
    with pytest.raises(DemoError, match="cannot read"):
        load_eval_set(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("alpha", "requests"), [(1.5, 10), (-0.1, 10), (0.8, 0)])
def test_config_rejects_bad_values(alpha: float, requests: int) -> None:
    with pytest.raises(DemoError):
        DemoConfig(alpha=alpha, requests=requests)


def test_missing_zoo_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edged", "demo", "--zoo", str(tmp_path / "zoo.toml"),
         "--requests", "2", "--no-plot"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "no zoo manifest" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (demo_zoo_dir() / "zoo.toml").is_file(), reason="demo zoo not trained")
def test_short_demo_end_to_end_over_the_socket(tmp_path: Path) -> None:
    out, plot = tmp_path / "demo.json", tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-m", "edged", "demo", "--requests", "20", "--alpha", "0.7",
         "--json", str(out), "--plot", str(plot), "--energy", "estimate"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc) == {"alpha", "requests", "policies", "energy_method", "elapsed_s", "phases_s"}
    assert set(doc["phases_s"]) == {"daemon_start", "routed", "baseline"}
    # item 21: the whole report on stdout, in order (header, table, timing); stderr only errors
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("edged demo: 20 requests")
    assert lines[1].startswith("policy") and any(ln.startswith("took ") for ln in lines)
    assert "daemon start" in proc.stdout and "routed requests" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr
    assert doc["alpha"] == 0.7 and doc["requests"] == 20
    assert doc["energy_method"]
    policies = doc["policies"]
    assert set(policies) == {"edged", "largest", "smallest", "random", "static_mix", "task_mix"}
    names = ["small", "medium", "large"]
    for policy in policies.values():
        assert 0.0 <= policy["satisfaction"] <= 1.0
        assert policy["energy_j_per_request"] > 0
        assert list(policy["call_ratio"]) == names
        assert sum(policy["call_ratio"].values()) == pytest.approx(1.0)
    assert policies["largest"]["call_ratio"]["large"] == 1.0
    assert policies["smallest"]["call_ratio"]["small"] == 1.0
    assert policies["largest"]["satisfaction"] > policies["smallest"]["satisfaction"]
    assert policies["largest"]["energy_j_per_request"] > policies["smallest"][
        "energy_j_per_request"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "edged" in proc.stdout and "largest" in proc.stdout
    assert policies["edged"]["paired_energy_j_per_request"] > 0
    assert "paired with the baselines" in proc.stdout and "x task_mix" in proc.stdout
    for policy in ("edged", "task_mix"):  # where each kind of prompt went
        buckets = policies[policy]["by_bucket"]
        assert set(buckets) <= {"1d", "2d", "3d", "4d"}
        assert sum(b["requests"] for b in buckets.values()) == 20
        for b in buckets.values():
            assert sum(b["call_ratio"].values()) == pytest.approx(1.0)


def test_paired_joules_price_every_run_at_the_baseline_pass() -> None:
    from edged.demo import PolicyResult, paired_joules

    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9+9=", "answer": "18"}]
    per_model = {("1+1=", "s"): (True, 1.0), ("1+1=", "l"): (True, 10.0),
                 ("9+9=", "s"): (False, 2.0), ("9+9=", "l"): (True, 20.0)}
    routed = PolicyResult(served=["s", "l"], explored=[["l"], []])
    assert paired_joules(rows, routed, per_model) == 1.0 + 10.0 + 20.0


def test_hindsight_baselines_plan_per_bucket_on_the_baseline_pass() -> None:
    """static_mix mixes two models over the whole stream; task_mix knows each bucket: the
    small model where it is right, the large one where only it is."""
    from edged.demo import PolicyResult, by_bucket, hindsight

    rows = [{"prompt": f"{i}+1=", "answer": "x", "bucket": "easy" if i % 2 else "hard"}
            for i in range(8)]
    per_model = {}
    for row in rows:
        easy = row["bucket"] == "easy"
        per_model[(row["prompt"], "s")] = (easy, 1.0)
        per_model[(row["prompt"], "l")] = (True, 10.0)
    plans = hindsight(rows, ["s", "l"], per_model, alpha=1.0)
    task, static = plans["task_mix"], plans["static_mix"]
    assert task.served == ["l", "s"] * 4 and all(task.labels)
    assert sum(task.joules) == 4 * 1.0 + 4 * 10.0
    assert static.served == ["l"] * 8  # only the large model meets alpha 1 on the whole stream
    buckets = by_bucket([r["bucket"] for r in rows], task, ["s", "l"])
    assert buckets == {
        "easy": {"requests": 4, "satisfaction": 1.0, "call_ratio": {"s": 1.0, "l": 0.0}},
        "hard": {"requests": 4, "satisfaction": 1.0, "call_ratio": {"s": 0.0, "l": 1.0}},
    }
    half = hindsight(rows, ["s", "l"], per_model, alpha=0.5)["static_mix"]
    assert half.served.count("s") == 8 and sum(half.labels) == 4  # small alone meets 0.5
    assert isinstance(half, PolicyResult)


def test_router_options_are_typed_and_bad_ones_named() -> None:
    from edged.commands.demo import parse_router_options

    assert parse_router_options(["margin=0.1", "lp_prior=false", "lp_window=64", "V=auto"]) == {
        "margin": 0.1, "lp_prior": False, "lp_window": 64, "V": "auto"}
    with pytest.raises(DemoError, match="KEY=VALUE"):
        parse_router_options(["margin"])


@pytest.mark.slow
@pytest.mark.skipif(not (demo_zoo_dir() / "zoo.toml").is_file(), reason="demo zoo not trained")
def test_demo_with_agreement_labels_scores_against_the_answers(tmp_path: Path) -> None:
    """--labels agreement: the daemon gets no answers, the demo still scores every policy
    against them, and edged's energy includes the exploration run after the replies."""
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edged", "demo", "--requests", "30", "--labels", "agreement",
         "--json", str(out), "--no-plot", "--energy", "estimate"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    policies = json.loads(out.read_text())["policies"]
    assert policies["largest"]["satisfaction"] > 0.9  # scored here, not by the daemon
    assert policies["edged"]["after_reply_j_per_request"] > 0  # cold start explores the zoo
    assert policies["edged"]["energy_j_per_request"] > policies["edged"][
        "after_reply_j_per_request"]
    assert "labels agreement" in proc.stdout
