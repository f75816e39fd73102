"""tools/bench/generate.py runs both engines and writes comparable JSON (no timing asserts)."""

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
        [sys.executable, str(TOOL), "--model", str(stories260k / "onnx"), "--max-new-tokens",
         "8", "--repeats", "1", "--rounds", "1", "--out", str(out), "--plot",
         str(tmp_path / "bench.png")],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio" in proc.stdout and (tmp_path / "bench.png").stat().st_size > 0
    data = json.loads(out.read_text())
    assert data["baseline"].startswith("optimum")
    (row,) = data["results"]
    assert row["same_ids"] is True
    for engine in ("edged", "optimum"):
        assert row[engine]["completion_tokens"] == 8 and row[engine]["peak_rss_mb"] > 0
    assert row["ratio_tokens_per_s"] > 0
