"""Shared fixtures: where ../shared is (tests that need it skip cleanly when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGED_SHARED", REPO_ROOT.parent / "shared"))


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
