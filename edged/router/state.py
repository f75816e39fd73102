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


class StateUnreadableError(StateError):
    """The state file exists but may not be read (permissions): it is left where it is, since
    it may be perfectly good; the caller should not start over it."""


#: meta fields: (kind, lowest value); None: any finite value
_META_RULES: dict[str, tuple[type, float | None]] = {
    "t": (int, 0), "lam_t": (int, 0), "explorations": (int, 0), "served_labels": (int, 0),
    "q": (float, 0.0), "z": (float, 0.0), "served_satisfaction": (float, 0.0),
    "debt": (float, None), "lam": (float, None),
}
#: array name endings that hold counts, sums of squares or magnitudes: never negative
_NON_NEGATIVE = ("count", "calls", "served", "labels", "hits", "_n", "m2", "grad_sq", "mean",
                 "recent_energy")


def validate_state(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Reject well-formed but poisoned state (ValueError naming the field): every array numeric
    and finite, counts and magnitudes non-negative; scalar meta fields of the right kind and
    range (`t` a non-negative int, `q`/`z` finite and >= 0, `debt`/`lam` finite). Shapes
    against the zoo are checked by each part's `load_arrays`."""
    for key, (kind, lowest) in _META_RULES.items():
        if key not in meta:
            continue
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} is {value!r}, not a number")
        if kind is int and not isinstance(value, int):
            raise ValueError(f"{key} is {value!r}, not an integer")
        if not np.isfinite(value):
            raise ValueError(f"{key} is {value!r}, not finite")
        if lowest is not None and value < lowest:
            raise ValueError(f"{key} is {value!r}, must be >= {lowest}")
    if "t" in meta and "lam_t" in meta and meta["lam_t"] > meta["t"]:
        raise ValueError(f"lam_t {meta['lam_t']} is past t {meta['t']}")
    for name, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"array {name} has dtype {arr.dtype}, not numeric")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"array {name} holds {int((~np.isfinite(arr)).sum())} non-finite "
                             "values")
        if (arr.dtype.kind == "i" or name.endswith(_NON_NEGATIVE)) and arr.size \
                and arr.min() < 0:
            raise ValueError(f"array {name} holds negative values (min {arr.min()})")


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
    """Set the bad file aside; where that is impossible (a read-only directory) say so and
    leave it, so the caller can start fresh in memory instead of failing for good."""
    try:
        aside = set_aside(path)
    except OSError as exc:
        return StateError(f"router state {path}: {why}; could not move it aside "
                          f"({exc.strerror or exc}): left in place", None)
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
    except PermissionError as exc:  # a good file we may not read is not corrupt
        raise StateUnreadableError(
            f"router state {path}: cannot read it ({exc.strerror or exc}); left in place: "
            "fix its permissions or move it away") from exc
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise _fail(path, f"unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, f"not an {FORMAT} file")
    if meta.get("version") != VERSION:
        raise _fail(path, f"format version {meta.get('version')!r}, this edged reads {VERSION}")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise _fail(path, f"incompatible {key}: file has {meta.get(key)!r}, need {want!r}")
    try:
        validate_state(meta, arrays)
    except ValueError as exc:
        raise _fail(path, f"invalid ({exc})") from exc
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
