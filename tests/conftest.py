"""Shared fixtures: where ../shared is (tests that need it skip cleanly when it is absent)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGED_SHARED", REPO_ROOT.parent / "shared"))


def load_tool(name: str) -> ModuleType:
    """A script of tools/ (`tools/NAME.py`) imported as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def stories260k(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "stories260K"
    if not (path / "onnx" / "model.onnx").is_file():
        pytest.skip(f"stories260K is absent ({path})")
    return path


@pytest.fixture(scope="session")
def messplus_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "messplus"
    if not path.is_dir():
        pytest.skip(f"MESS+ traces are absent ({path})")
    return path
