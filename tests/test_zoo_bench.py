"""tools/bench/generate.py runs the engines and writes comparable JSON (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench" / "generate.py"


@pytest.mark.slow
def test_bench_compares_engines_on_stories260k(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--model", str(stories260k / "onnx"),
         "--llamacpp", "q4=/nonexistent.gguf", "--max-new-tokens", "8", "--repeats", "1",
         "--rounds", "1", "--out", str(out), "--plot", str(tmp_path / "bench.png")],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode tok/s" in proc.stdout and (tmp_path / "bench.png").stat().st_size > 0
    data = json.loads(out.read_text())
    rows = {r["engine"]: r for r in data["results"]}
    assert set(rows) == {"edged", "optimum"}
    for row in rows.values():
        assert row["completion_tokens"] == 8 and row["peak_rss_mb"] > 0 and row["size_mb"] > 0
        assert row["deterministic"]
    # same prompt ids, greedy: optimum agrees with edged (the reference row) on every id
    assert rows["optimum"]["agreement"] == 1.0 and rows["optimum"]["same_prefix"] == 8
    # an engine that is not installed (or a model that fails) is a note, not a crash
    assert any(n.startswith("llamacpp") for n in data["notes"])
