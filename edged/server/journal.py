"""Durable labels: a write-ahead journal (SQLite in WAL mode) beside the router's state snapshot.

The router state is a snapshot written every `save_interval_s`; a SIGKILL or a power loss
between two snapshots used to lose every label learned since the last one. Each label is now
appended to this journal (committed with `synchronous=FULL`: fsync'ed before the client is told)
before the router learns it, and replayed on the snapshot at start, through the router's public
API only (`Router.observe_labels` on a `Decision` rebuilt from the stored text: its features,
its served model and its satisfaction target are all the router reads).

SQLite from the standard library rather than a hand-rolled log: it gives atomic, checksummed
appends, crash recovery of a torn write and transactions for the compaction below.

Snapshot and journal stay consistent through two markers in the `meta` table. Before a snapshot
is written, `pending_seq` records the last journal row it contains; after the rename, one
transaction deletes the rows up to it and records `snapshot_seq` and the snapshot file's SHA-256
(`snapshot_digest`). At start, a snapshot whose digest matches is followed by rows after
`snapshot_seq`; one that does not (a crash between the rename and that transaction) is the
pending one, followed by rows after `pending_seq`: no label is learned twice or lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("edged.server")

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,          -- the request text the router featurized
    model TEXT NOT NULL,         -- the served model (decision.model)
    target REAL,                 -- decision.target (None: no satisfaction target)
    labels TEXT NOT NULL,        -- JSON {model: label}
    source TEXT NOT NULL DEFAULT 'reference',  -- reference, feedback, agreement or judge
    replaces TEXT NOT NULL DEFAULT '{}',       -- JSON {model: pseudo-label this one overrides}
    weight REAL NOT NULL DEFAULT 1.0,          -- served requests the served label stands for
    replaced_reference TEXT NOT NULL DEFAULT '[]'  -- JSON [model]: replaces its served agreement
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class JournalError(RuntimeError):
    """The journal cannot be opened or written; the message says which file and why."""


@dataclass(frozen=True)
class Entry:
    seq: int
    text: str
    model: str
    target: float | None
    labels: dict[str, float]
    source: str = "reference"
    replaces: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0
    #: models in `replaces` whose value was the served top model's agreement (a queue entry,
    #: not a label: the label counters do not take it back)
    replaced_reference: tuple[str, ...] = ()


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file; None when it does not exist."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


class Journal:
    """One zoo's label journal; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=5.0)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            self._db.execute("PRAGMA synchronous=FULL")  # fsync each commit: power-loss safe
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(labels)")}
            for name, spec in (("source", "TEXT NOT NULL DEFAULT 'reference'"),
                               ("replaces", "TEXT NOT NULL DEFAULT '{}'"),
                               ("weight", "REAL NOT NULL DEFAULT 1.0"),
                               ("replaced_reference", "TEXT NOT NULL DEFAULT '[]'")):
                if name not in columns:  # a journal from before label sources
                    self._db.execute(f"ALTER TABLE labels ADD COLUMN {name} {spec}")
        except sqlite3.Error as exc:
            raise JournalError(f"label journal {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    def append(self, text: str, model: str, target: float | None,
               labels: Mapping[str, float], source: str = "reference",
               replaces: Mapping[str, float] | None = None, weight: float = 1.0,
               replaced_reference: Sequence[str] = ()) -> int:
        """Commit one decision's labels (from `source`, overriding `replaces`) durably; the
        row's sequence number."""
        row = (text, model, target, json.dumps({k: float(v) for k, v in labels.items()}),
               source, json.dumps({k: float(v) for k, v in (replaces or {}).items()}),
               float(weight), json.dumps([str(m) for m in replaced_reference]))
        try:
            with self._lock:
                cur = self._db.execute(
                    "INSERT INTO labels (text, model, target, labels, source, replaces, weight, "
                    "replaced_reference) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                return int(cur.lastrowid or 0)
        except sqlite3.Error as exc:
            raise JournalError(f"label journal {self.path}: {exc}") from None

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM labels").fetchone()
        return int(row[0] or 0) if row else 0

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta(key)

    def begin_snapshot(self, seq: int) -> None:
        """A snapshot holding rows up to `seq` is about to replace the state file."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('pending_seq', ?)", (str(seq),))

    def commit_snapshot(self, seq: int, digest: str | None, extra: Mapping[str, str]) -> None:
        """The snapshot with rows up to `seq` is in place: drop them, remember the snapshot."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM labels WHERE seq <= ?", (seq,))
                items = {"snapshot_seq": str(seq), "snapshot_digest": digest or "", **extra}
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", items.items())
                self._db.execute("DELETE FROM meta WHERE key = 'pending_seq'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        with self._lock, contextlib.suppress(sqlite3.Error):  # keep the WAL file small
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def replay_start(self, digest: str | None) -> int:
        """The last row already in the snapshot whose digest is `digest` (None: no file)."""
        with self._lock:
            committed = int(self._meta("snapshot_seq") or 0)
            pending = self._meta("pending_seq")
            if digest is None or digest == (self._meta("snapshot_digest") or None):
                return committed
            if pending is not None:  # killed between the rename and the commit
                return int(pending)
            if committed:
                log.warning("router state does not match the label journal %s: replaying "
                            "labels after row %d only", self.path, committed)
            return committed

    def entries(self, after: int) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, text, model, target, labels, source, replaces, weight, "
                "replaced_reference FROM labels WHERE seq > ? ORDER BY seq", (after,)).fetchall()
        out = []
        for seq, text, model, target, labels, source, replaces, weight, reference in rows:
            try:
                parsed = {str(k): float(v) for k, v in json.loads(labels).items()}
                replaced = {str(k): float(v) for k, v in json.loads(replaces).items()}
                from_reference = tuple(str(m) for m in json.loads(reference))
            except (ValueError, TypeError, AttributeError):
                log.warning("label journal %s: row %d is unreadable; skipped", self.path, seq)
                continue
            out.append(Entry(int(seq), str(text), str(model),
                             None if target is None else float(target), parsed, str(source),
                             replaced, float(weight), from_reference))
        return out

    def load_json(self, key: str) -> Any:
        value = self.meta(key)
        try:
            return None if value is None else json.loads(value)
        except ValueError:
            return None
