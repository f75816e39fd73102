"""Trace CSVs in the MESS+ simulator format, read as they are.

Columns: `input_text`, and for each model m (in column order, cheapest first) `label_<m>`,
`energy_consumption_<m>` and `inference_time_<m>`; `doc_id`, `benchmark_name` and
`acc[_norm]_<m>` are optional.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """A trace file is missing, malformed or inconsistent; the message says where."""


@dataclass(frozen=True)
class Trace:
    """One benchmark: per-request outcomes of every model (rows: requests, columns: models)."""

    benchmark: str
    models: tuple[str, ...]
    texts: tuple[str, ...]
    labels: np.ndarray
    energy_j: np.ndarray
    latency_s: np.ndarray
    path: Path | None = None
    kinds: tuple[str, ...] | None = None  # per-request source benchmark (mixed streams)

    def __len__(self) -> int:
        return len(self.texts)

    def kind_of_rows(self) -> tuple[str, ...]:
        """Each request's benchmark: `kinds` for a mixed stream, else `benchmark` throughout."""
        return self.kinds if self.kinds is not None else (self.benchmark,) * len(self)

    def subset(self, rows: np.ndarray) -> Trace:
        """The requests at `rows`, in that order."""
        kinds = None if self.kinds is None else tuple(self.kinds[i] for i in rows)
        return Trace(
            self.benchmark, self.models, tuple(self.texts[i] for i in rows), self.labels[rows],
            self.energy_j[rows], self.latency_s[rows], self.path, kinds,
        )


def mix_traces(traces: Sequence[Trace], name: str = "mixed") -> Trace:
    """One stream of every request of `traces` (in file order; shuffle with `subset`), each
    row tagged with its benchmark in `kinds`. All traces must have the same models."""
    if not traces:
        raise TraceError("mix_traces needs at least one trace")
    models = traces[0].models
    for trace in traces[1:]:
        if trace.models != models:
            raise TraceError(
                f"{trace.path or trace.benchmark}: models {list(trace.models)} differ from "
                f"{list(models)} of {traces[0].path or traces[0].benchmark}; a mixed stream "
                "needs one zoo"
            )
    return Trace(
        name, models, tuple(text for t in traces for text in t.texts),
        np.concatenate([t.labels for t in traces]), np.concatenate([t.energy_j for t in traces]),
        np.concatenate([t.latency_s for t in traces]), None,
        tuple(kind for t in traces for kind in t.kind_of_rows()),
    )


def stream_order(trace: Trace, seed: int, block: int = 0) -> np.ndarray:
    """The request order of one replay: a shuffle (`block` 0), or runs of up to `block`
    requests of one kind (benchmark) each, the runs shuffled; as a user who asks one kind of
    thing for a while, then another. Each kind's requests are shuffled before they are cut.
    The whole trace is served either way, so hindsight plans cost the same in every order."""
    if block < 0:
        raise ValueError(f"block must be >= 0, got {block}")
    rng = np.random.default_rng(seed)
    if block == 0:
        return rng.permutation(len(trace))
    kinds = np.array(trace.kind_of_rows())
    runs = []
    for kind in dict.fromkeys(kinds.tolist()):  # first-seen order: reproducible
        rows = rng.permutation(np.flatnonzero(kinds == kind))
        runs += [rows[i:i + block] for i in range(0, rows.size, block)]
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))])


_PER_MODEL = ("label", "energy_consumption", "inference_time")


def _models(header: Sequence[str]) -> tuple[str, ...]:
    """Every model any per-model column names, in column order: a model with energy and time
    but no label must be reported missing, not dropped (that silently shrinks the zoo)."""
    models: dict[str, None] = {}
    for col in header:
        for kind in _PER_MODEL:
            if col.startswith(f"{kind}_") and len(col) > len(kind) + 1:
                models.setdefault(col[len(kind) + 1 :], None)
    return tuple(models)


def load_trace(path: str | Path) -> Trace:
    """Read one CSV; raises TraceError naming the file, row and column of any problem."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from exc
    models = _models(header)
    if not models:
        raise TraceError(f"{path}: no label_<model> columns in header {header}")
    needed = ["input_text"] + [
        f"{kind}_{m}" for m in models for kind in _PER_MODEL
    ]
    missing = [col for col in needed if col not in header]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
    if not rows:
        raise TraceError(f"{path}: no requests")
    out = np.empty((3, len(rows), len(models)))
    for r, row in enumerate(rows):
        for k, kind in enumerate(_PER_MODEL):
            for j, m in enumerate(models):
                col = f"{kind}_{m}"
                try:
                    value = float(row[col])
                except (TypeError, ValueError):
                    raise TraceError(
                        f"{path}: row {r + 2} column {col}: not a number: {row[col]!r}"
                    ) from None
                if not math.isfinite(value) or value < 0 or (k == 0 and value > 1):
                    raise TraceError(f"{path}: row {r + 2} column {col}: out of range: {value}")
                out[k, r, j] = value
    benchmark = rows[0].get("benchmark_name") or path.stem
    texts = tuple(row["input_text"] or "" for row in rows)
    return Trace(benchmark, models, texts, out[0], out[1], out[2], path)


def find_traces(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to their `*.csv` files (sorted); files are kept as given."""
    found: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(p.glob("*.csv")))
        elif p.is_file():
            found.append(p)
        else:
            raise TraceError(f"{p}: no such file or directory")
    if not found:
        raise TraceError(f"no trace CSVs in {[str(p) for p in paths]}")
    return found
