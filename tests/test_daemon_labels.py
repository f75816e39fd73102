"""Label sources (issue 10): a daemon that never gets a reference learns from agreement with its
top model, keeps those pseudo-labels across a restart, lets a real label override one, and
refuses a [labels] setting that cannot work."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import zmq
from test_daemon import REPO, Daemon, finals, send

from edged.config import ConfigError, parse_config
from edged.server.labels import (
    LabelConfigError,
    build_label_sources,
    parse_judge,
    similarity,
    similarity_checker,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEMO = REPO / "models" / "demo"


def demo_config(state: Path, *, sources: list[str], router: str = "", alpha: float = 0.8) -> str:
    return "\n".join([
        "[server]", f'state_dir = "{state}"', "queue_size = 64", "save_interval_s = 600",
        "[energy]", 'backend = "estimate"',
        "[router]", f"alpha = {alpha}", "seed = 3", router,
        "[models]", f'manifest = "{DEMO / "zoo.toml"}"',
        "[labels]", f"sources = {json.dumps(sources)}",
    ]) + "\n"


def prompts(bucket: str) -> list[str]:
    rows = [json.loads(line) for line in (DEMO / "eval.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows if r["bucket"] == bucket]


def run_stream(d: Daemon, texts: list[str], tag: str) -> dict[str, dict]:
    """Send every prompt (no reference), 16 in flight; the final replies by id."""
    sock = d.socket(zmq.DEALER)
    replies: dict[str, dict] = {}
    try:
        for start in range(0, len(texts), 16):
            batch = texts[start:start + 16]
            for i, text in enumerate(batch):
                send(sock, {"id": f"{tag}{start + i}", "op": "generate", "prompt": text})
            finals(sock, start + len(batch), replies)
    finally:
        sock.close()
    return replies


def wait_explored(d: Daemon, timeout_s: float = 120.0) -> dict:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        stats = d.call({"id": "s", "op": "stats"})
        if stats["exploration"]["queued"] == 0 and stats["exploration"]["running"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"explorations never finished: {stats['exploration']}")


def killed_and_restarted(d: Daemon, tmp_path: Path, config: str) -> Daemon:
    """SIGKILL `d` (no final save: the label journal must carry what it learned), then a
    daemon on the same state, once READY."""
    try:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
    finally:
        d.close()
    d = Daemon(tmp_path, config)
    d.wait_note("READY=1")
    return d


def test_agreement_labels_change_routing_and_survive_a_kill(tmp_path):
    easy, hard = prompts("1d"), prompts("3d")
    stream = [p for pair in zip(easy * 4, hard * 4, strict=True) for p in pair]  # 320 requests
    # alpha 0.7: the target, with its margin for the requests no label covers, stays clear of the
    # medium model's agreement on 1-digit sums (~0.9), so which model a kind goes to is settled
    config = demo_config(tmp_path / "state", sources=["agreement"], alpha=0.7)
    d = Daemon(tmp_path, config)
    try:
        d.wait_note("READY=1")
        first = run_stream(d, stream[:160], "a")
        stats = wait_explored(d)
        later = run_stream(d, stream[160:], "b")
        stats = wait_explored(d)
        agreed = stats["labels_by_source"]["agreement"]
        assert agreed > 0 and stats["labels_by_source"]["reference"] == 0
        assert stats["models"]["large"]["labels"] == 0  # the reference gets no invented label
        assert stats["label_sources"] == ["agreement"]
        served = Counter(r["model"] for r in later.values())
        assert len(served) >= 2, served  # it does not serve one model forever
        by_kind = {kind: Counter(later[f"b{i}"]["model"] for i in range(160) if (i % 2) == k)
                   for k, kind in enumerate(("easy", "hard"))}
        # 3-digit sums only the large model gets right: they go to it more than 1-digit ones
        assert by_kind["hard"]["large"] > by_kind["easy"]["large"], by_kind
        assert all(r["ok"] for r in [*first.values(), *later.values()])
        router = stats["router"]
        d.proc.send_signal(signal.SIGKILL)  # no final save: the journal must carry them
        d.proc.wait(30)
    finally:
        d.close()
    d = Daemon(tmp_path, config)
    try:
        d.wait_note("READY=1")
        again = d.call({"id": "s", "op": "stats"})
        assert again["labels_by_source"]["agreement"] == agreed
        for name in ("small", "medium"):
            assert again["router"]["models"][name]["labels"] == router["models"][name]["labels"]
    finally:
        assert d.stop() == 0


def test_agreement_labels_arrive_during_a_back_to_back_stream(tmp_path):
    """Explorations wait for idle time only up to a backlog: under a stream that never lets the
    daemon idle, the router still gets its agreement labels while the stream lasts."""
    stream = (prompts("1d") + prompts("3d")) * 2  # 160 requests, all sent at once
    config = demo_config(tmp_path / "state", sources=["agreement"]).replace(
        "queue_size = 64", "queue_size = 256\nexploration_backlog = 2")
    d = Daemon(tmp_path, config)
    try:
        d.wait_note("READY=1")
        sock = d.socket(zmq.DEALER)
        for i, text in enumerate(stream):
            send(sock, {"id": f"r{i}", "op": "generate", "prompt": text})
        replies = finals(sock, len(stream), timeout_s=120.0)
        stats = d.call({"id": "s", "op": "stats"})  # right after the last reply: no idle yet
        sock.close()
        assert len(replies) == len(stream) and all(r["ok"] for r in replies.values())
        explored = stats["exploration"]
        assert explored["queued"] <= 2 + 1, explored  # the backlog, and one being announced
        assert stats["labels_by_source"]["agreement"] >= 20, stats["labels_by_source"]
    finally:
        assert d.stop() == 0


def test_real_feedback_overrides_a_pseudo_label(tmp_path):
    # explore on every request, so each one runs the top model and gets agreement labels
    router = 'c = 1.0\nexplore_runs = "all"'
    d = Daemon(tmp_path, demo_config(tmp_path / "state", sources=["agreement", "feedback"],
                                     router=router))
    try:
        d.wait_note("READY=1")
        reply = d.call({"id": "r1", "op": "generate", "prompt": "123+456="})
        assert reply["ok"] and reply["route"]["explored"]
        wait_explored(d)
        before = d.call({"id": "s", "op": "stats"})
        pseudo = before["labels_by_source"]["agreement"]
        assert pseudo == 2  # small and medium against large
        fb = d.call({"id": "f", "op": "feedback", "request_id": "r1",
                     "labels": {"small": True}})
        assert fb["ok"] and fb["replaced"] == ["small"] and fb["source"] == "feedback"
        after = d.call({"id": "s", "op": "stats"})
        assert after["labels_by_source"]["feedback"] == 1
        assert after["models"]["small"]["labels"] == before["models"]["small"]["labels"]
        again = d.call({"id": "f2", "op": "feedback", "request_id": "r1",
                        "labels": {"small": False}})
        assert not again["ok"] and again["error"]["code"] == "bad_request"
    finally:
        assert d.stop() == 0


def test_queue_on_real_labels_only(tmp_path):
    """[router] queue_labels = "real": agreement labels teach the predictor but the queue and
    the labelled count move only with real feedback, also after a journal replay."""
    router = 'c = 1.0\nexplore_runs = "all"\nqueue_labels = "real"'
    config = demo_config(tmp_path / "state", sources=["agreement", "feedback"], router=router)
    d = Daemon(tmp_path, config)
    try:
        d.wait_note("READY=1")
        reply = d.call({"id": "r1", "op": "generate", "prompt": "12+34="})
        assert reply["ok"] and reply["route"]["explored"]
        stats = wait_explored(d)
        assert stats["labels_by_source"]["agreement"] == 2
        assert stats["router"]["labels"] == 0 and stats["router"]["debt"] == 0.0
        assert stats["router"]["models"]["small"]["labels"] == 1  # learned all the same
        fb = d.call({"id": "f", "op": "feedback", "request_id": "r1",
                     "labels": {reply["model"]: False}})
        assert fb["ok"]
        after = d.call({"id": "s", "op": "stats"})["router"]
        assert after["labels"] == 1 and after["debt"] > 0.0
        d = killed_and_restarted(d, tmp_path, config)  # the journal replays both, with sources
        again = d.call({"id": "s", "op": "stats"})["router"]
        assert again["labels"] == 1 and again["debt"] == pytest.approx(after["debt"])
    finally:
        assert d.stop() == 0


def test_a_top_served_request_with_a_reference_counts_once(tmp_path):
    """With agreement and reference labels, a request the top model served and that carries a
    reference moves the queue once (its reference label), not also as agreeing."""
    rows = [json.loads(line) for line in (DEMO / "eval.jsonl").read_text().splitlines()]
    hard = [r for r in rows if r["bucket"] == "3d"]
    config = demo_config(tmp_path / "state", sources=["agreement", "reference"]).replace(
        "alpha = 0.8", "alpha = 0.99")
    d = Daemon(tmp_path, config)
    try:
        d.wait_note("READY=1")
        served = []
        for i, row in enumerate(hard[:40]):
            before = wait_explored(d)["router"]["labels"]
            reply = d.call({"id": f"r{i}", "op": "generate", "prompt": row["prompt"],
                            "reference": row["answer"]})
            after = wait_explored(d)["router"]["labels"]
            assert reply["ok"] and after - before == 1, (reply["model"], before, after)
            served.append(reply["model"])
            if reply["model"] == "large":
                break
        assert served[-1] == "large", served  # the deficit escalated to the top model
    finally:
        assert d.stop() == 0


def test_feedback_on_a_top_served_reply_takes_the_agreement_entrys_place(tmp_path):
    """A reply of the top model counted in the queue as agreeing; feedback on it later replaces
    that entry (no second count), is a label in the counters, and survives a restart."""
    config = demo_config(tmp_path / "state", sources=["agreement", "feedback"]).replace(
        "alpha = 0.8", "alpha = 0.99")
    d = Daemon(tmp_path, config)
    try:
        d.wait_note("READY=1")
        for i, prompt in enumerate(prompts("3d")[:40]):  # wrong answers build the deficit
            reply = d.call({"id": f"r{i}", "op": "generate", "prompt": prompt})
            assert reply["ok"]
            if reply["model"] == "large":
                break
            wait_explored(d)
            if reply["model"] not in reply.get("labels", {}):
                d.call({"id": f"f{i}", "op": "feedback", "request_id": f"r{i}",
                        "labels": {reply["model"]: False}})
        assert reply["model"] == "large", reply["model"]
        before = wait_explored(d)
        fb = d.call({"id": "f", "op": "feedback", "request_id": reply["id"],
                     "labels": {"large": False}})
        assert fb["ok"] and fb["replaced"] == []  # no pseudo-label was replaced
        after = wait_explored(d)
        assert after["router"]["labels"] == before["router"]["labels"]  # in its place
        assert after["router"]["debt"] == pytest.approx(before["router"]["debt"] + 1.0)
        large = after["models"]["large"]
        assert large["labels"] == before["models"]["large"]["labels"] + 1
        d = killed_and_restarted(d, tmp_path, config)  # the journal replays it the same way
        again = d.call({"id": "s", "op": "stats"})
        assert again["router"]["labels"] == after["router"]["labels"]
        assert again["router"]["debt"] == pytest.approx(after["router"]["debt"])
        assert again["models"]["large"]["labels"] == large["labels"]
        assert again["models"]["large"]["satisfied"] == large["satisfied"]
    finally:
        assert d.stop() == 0


def test_feedback_refused_when_not_a_source(tmp_path):
    d = Daemon(tmp_path, demo_config(tmp_path / "state", sources=["reference"]))
    try:
        d.wait_note("READY=1")
        reply = d.call({"id": "r1", "op": "generate", "prompt": "1+2="})
        fb = d.call({"id": "f", "op": "feedback", "request_id": "r1", "satisfied": True})
        assert reply["ok"] and not fb["ok"]
        assert "[labels] sources" in fb["error"]["message"]
    finally:
        assert d.stop() == 0


def test_bad_label_settings_are_refused_at_start(tmp_path):
    text = demo_config(tmp_path / "state", sources=["judge"])
    d = Daemon(tmp_path, text)
    try:
        assert d.proc.wait(60) != 0
        assert "judge_model" in d.log.read_text()
    finally:
        d.close()


def test_label_settings_and_scorers():
    with pytest.raises(ConfigError, match="sources"):
        parse_config({"labels": {"sources": []}})
    with pytest.raises(ConfigError, match="similarity"):
        parse_config({"labels": {"similarity": 2}})
    cfg = parse_config({"labels": {"sources": ["agreement", "feedback"], "similarity": 0.5}})
    assert cfg.labels.sources == ("agreement", "feedback") and cfg.labels.similarity == 0.5
    names = ["s", "l"]
    kwargs = dict(agreement_checker=None, similarity_threshold=0.8, judge_model=None,
                  judge_template=None, zoo_names=names)
    with pytest.raises(LabelConfigError, match="unknown nope"):
        build_label_sources(["nope"], checker_name="exact", **kwargs)
    with pytest.raises(LabelConfigError, match="two models"):
        build_label_sources(["agreement"], checker_name="exact",
                            **{**kwargs, "zoo_names": ["s"]})
    with pytest.raises(LabelConfigError, match="not in the zoo"):
        build_label_sources(["judge"], checker_name="exact", **{**kwargs, "judge_model": "x"})
    with pytest.raises(LabelConfigError, match="judge_template"):
        build_label_sources(["judge"], checker_name="exact",
                            **{**kwargs, "judge_model": "l", "judge_template": "{answer}"})
    numeric = build_label_sources(["agreement"], checker_name="number", **kwargs)
    assert numeric.agreement({"s": "the sum is 42", "l": "42"}, "l") == {"s": True}
    free = build_label_sources(["agreement"], checker_name="exact", **kwargs)
    texts = {"s": "Paris is the capital.", "l": "paris is the capital", "x": "Lyon"}
    assert free.agreement(texts, "l", skip={"x"}) == {"s": True}
    assert similarity("Paris.", "paris") == 1.0 and not similarity_checker(0.9)("Lyon", "Paris")
    assert parse_judge(" Yes, it is") is True and parse_judge("no.") is False
    assert parse_judge("maybe") is None and parse_judge("") is None


def test_judge_runs_after_the_reply_and_counts_its_joules(tmp_path):
    """The judge source: a judge run follows each routed reply (listed as queued), its joules
    are counted in stats; a verdict that is neither yes nor no (the demo models only add) gives
    no label."""
    text = demo_config(tmp_path / "state", sources=["judge"]).replace(
        'sources = ["judge"]',
        'sources = ["judge"]\njudge_model = "large"\njudge_template = "{prompt}"')
    d = Daemon(tmp_path, text)
    try:
        d.wait_note("READY=1")
        reply = d.call({"id": "j1", "op": "generate", "prompt": "12+34="})
        assert reply["ok"] and reply["judge"] == {"model": "large", "status": "queued"}
        stats = wait_explored(d)
        assert stats["models"]["large"]["judge_calls"] == 1
        assert stats["models"]["large"]["judge_joules"] >= 0
        assert stats["labels_by_source"]["judge"] == 0  # "46" is no verdict
        named = d.call({"id": "j2", "op": "generate", "prompt": "1+2=", "model": "small"})
        assert named["ok"] and "judge" not in named  # bypassed routing: nothing to label
    finally:
        assert d.stop() == 0


def test_journal_from_before_replaced_reference_is_migrated(tmp_path):
    """A label journal written before the `replaced_reference` column opens, gains it (old
    rows read as replacing nothing) and stores it for new rows."""
    import sqlite3

    from edged.server.journal import Journal

    path = tmp_path / "labels.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE labels (seq INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL, "
        "model TEXT NOT NULL, target REAL, labels TEXT NOT NULL, source TEXT NOT NULL DEFAULT "
        "'reference', replaces TEXT NOT NULL DEFAULT '{}', weight REAL NOT NULL DEFAULT 1.0);"
        "INSERT INTO labels (text, model, target, labels) VALUES ('1+1=', 'small', 0.8, "
        "'{\"small\": 1.0}');")
    db.close()
    journal = Journal(path)
    try:
        journal.append("9+9=", "large", 0.8, {"large": 0.0}, "feedback", {"large": 1.0}, 1.0,
                       ("large",))
        old, new = journal.entries(0)
        assert old.replaced_reference == () and old.labels == {"small": 1.0}
        assert new.replaced_reference == ("large",) and new.replaces == {"large": 1.0}
    finally:
        journal.close()
