"""tools/export_zoo.py: export a tiny HF model, int8-quantise, smoke-test, append to a manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_tool
from test_zoo_tiny import build_hf

from edged.zoo import GenerationParams, Zoo, ZooManifest


@pytest.fixture(scope="module")
def export_zoo():
    return load_tool("export_zoo")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return build_hf("qwen2", tmp_path_factory.mktemp("hf") / "Tiny-Qwen2")


def _nbits(path: Path, bits: int) -> int:
    """MatMulNBits nodes with `bits`-bit weights."""
    import onnx

    graph = onnx.load(str(path)).graph
    return sum(n.op_type == "MatMulNBits"
               and any(a.name == "bits" and a.i == bits for a in n.attribute)
               for n in graph.node)


@pytest.mark.slow
def test_export_two_models_into_a_zoo(export_zoo, hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    rc = export_zoo.main([str(hf_dir), "--out", str(out), "--max-new-tokens", "12",
                          "--backend", "optimum"])
    assert rc == 0
    rc = export_zoo.main([str(hf_dir), "--out", str(out), "--name", "tiny-int8", "--int8",
                          "--no-validate", "--backend", "optimum"])
    assert rc == 0
    rc = export_zoo.main([str(hf_dir), "--out", str(out), "--name", "tiny-int4",
                          "--precision", "int4", "--no-validate", "--backend", "optimum"])
    assert rc == 0
    manifest = ZooManifest.load(out / "zoo.toml")
    assert manifest.names == ["tiny-qwen2", "tiny-int8", "tiny-int4"]
    assert manifest.models[0].generation == GenerationParams(max_new_tokens=12)
    assert manifest.models[1].path == out / "tiny-int8"
    assert _nbits(out / "tiny-int8" / "model.onnx", 8) > 0
    assert _nbits(out / "tiny-int4" / "model.onnx", 4) > 0
    assert _nbits(out / "tiny-qwen2" / "model.onnx", 8) == 0
    zoo = Zoo.from_manifest(out / "zoo.toml")
    assert zoo.get("tiny-qwen2").generate("Once").completion_tokens >= 1  # manifest default
    short = GenerationParams(max_new_tokens=8)
    assert zoo.get("tiny-int8").generate("Once", params=short).completion_tokens >= 1
    assert zoo.get("tiny-int4").generate("Once", params=short).completion_tokens >= 1


@pytest.mark.slow
def test_refuses_duplicates_and_non_hf_dirs(export_zoo, hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    assert export_zoo.main([str(hf_dir), "--out", str(out), "--no-validate",
                            "--backend", "optimum"]) == 0
    before = (out / "zoo.toml").read_text()
    (out / "again").mkdir()
    rc = export_zoo.main([str(hf_dir), "--out", str(out), "--name", "tiny-qwen2",
                          "--manifest", str(out / "zoo.toml"), "--no-validate"])
    assert rc == 1  # tiny-qwen2/ exists and is not empty
    assert export_zoo.main([str(tmp_path), "--out", str(out), "--name", "x"]) == 1
    assert (out / "zoo.toml").read_text() == before
