"""Versioned router state file: numpy arrays plus JSON metadata in one `.npz`, written atomically.

Writes go to a temporary file in the same directory, are fsync'ed and renamed over the target, so
a crash leaves either the old or the new state. A file that cannot be read, or that belongs to
another format version or zoo, is renamed aside (`<name>.corrupt-<UTC time>`) and reported with a
`StateError` whose `aside` attribute says where it went: never silently lost.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "edged-router-state"
VERSION = 3  # 3: energy head, per-request energies in the LP window, predictor evidence


class StateError(RuntimeError):
    """The state file could not be used; `aside` is where it was moved (None if not moved)."""

    def __init__(self, message: str, aside: Path | None = None) -> None:
        super().__init__(message)
        self.aside = aside


def write_state(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Atomically replace `path` with `meta` (JSON-able) and `arrays`."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, **meta}
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, meta=blob, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_aside(path: Path) -> Path:
    """Rename a bad state file to `<name>.corrupt-<UTC time>` and return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    os.replace(path, aside)
    return aside


def _fail(path: Path, why: str) -> StateError:
    aside = set_aside(path)
    return StateError(f"router state {path}: {why}; moved aside to {aside}", aside)


def read_state(
    path: Path, expect: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load `path`; metadata keys in `expect` must match. Bad files are set aside (StateError)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise _fail(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise _fail(path, f"format version {meta.get('version')!r}, this edged reads {VERSION}")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise _fail(path, f"incompatible {key}: file has {meta.get(key)!r}, need {want!r}")
    return meta, arrays


def resize_ring(ring: np.ndarray, t: int, rows: int, columns: int) -> np.ndarray:
    """A ring of per-step rows (row `s % len` holds step s, the last step being `t`) resized to
    `rows`, keeping the newest steps at their new places; a config change (`lp_window`) then
    migrates the state instead of discarding it. Rows the old ring never had repeat its newest
    ones in order, so the window holds no made-up zeros. Another column count is a ValueError."""
    if ring.ndim != 2 or ring.shape[1] != columns or len(ring) == 0:
        raise ValueError(f"recent has shape {ring.shape}, need (*, {columns})")
    old = len(ring)
    if old == rows:
        return ring.copy()
    out = np.zeros((rows, columns), dtype=ring.dtype)
    have = min(t, old)  # steps t-have+1 .. t are in the old ring
    if have <= 0:
        return out
    newest = [ring[s % old] for s in range(t - have + 1, t + 1)]
    for i in range(min(rows, t)):  # step t - i takes the i-th newest row (cycling when short)
        out[(t - i) % rows] = newest[-1 - (i % len(newest))]
    return out
