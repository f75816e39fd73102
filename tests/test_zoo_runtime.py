"""One onnxruntime package per machine: pyproject's extras, and edged's check at load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import edged.zoo.model as zoo_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_the_runtime_is_an_extra_and_gpu_brings_no_cpu_onnxruntime() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert not _names(project["dependencies"]) & {"onnxruntime", "onnxruntime-gpu"}
    assert "onnxruntime" in _names(extras["cpu"])
    for gpu in ("gpu", "jetson"):
        assert "onnxruntime-gpu" in _names(extras[gpu])
        assert "onnxruntime" not in _names(extras[gpu]) and "edged" not in _names(extras[gpu])
    # the README's commands (`.[plot]`, `.[test,export,plot]`) still get a runtime
    assert "edged[cpu]" in extras["plot"] and "edged[cpu]" in extras["test"]
    assert not _names(extras["export"]) & {"onnxruntime", "onnxruntime-gpu"}


def test_two_runtime_packages_are_reported(monkeypatch) -> None:
    monkeypatch.setattr(zoo_model, "runtime_packages",
                        lambda: {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"})
    message = zoo_model.runtime_conflict()
    assert message and "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    monkeypatch.setattr(zoo_model, "runtime_packages", lambda: {"onnxruntime-gpu": "1.32.0"})
    assert zoo_model.runtime_conflict() is None


def test_this_machine_has_one_runtime() -> None:
    found = zoo_model.runtime_packages()
    assert len(found) == 1, found


@pytest.mark.parametrize("asked", [["CUDAExecutionProvider", "CPUExecutionProvider"]])
def test_missing_cuda_names_the_package(asked, monkeypatch) -> None:
    cfg = zoo_model.SessionConfig(providers=tuple(asked), allow_fallback=False)
    monkeypatch.setattr(zoo_model.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(zoo_model, "runtime_packages", lambda: {"onnxruntime": "1.32.0"})
    with pytest.raises(zoo_model.ProviderError, match="onnxruntime-gpu is not installed"):
        zoo_model._resolve_providers(cfg, "m")
