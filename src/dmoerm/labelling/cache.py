"""A SQLite cache of judge answers: one row per request, committed as each answer arrives.

Rows are keyed by ``sha256(judge identity, full prompt)``. The judge identity is the backend, model and every
answer-changing parameter, never a credential; the stored payload is the answer (raw text, parsed
probabilities, token usage), never the request headers. WAL mode lets a reader (a report) run beside a
labelling run, and a ``kill -9`` loses only the answers that were still in flight.

Several processes may share one cache file: each write is one short transaction, a writer that finds the
file locked waits up to :data:`BUSY_TIMEOUT_S` (SQLite's busy timeout) instead of failing, and rows are only
ever inserted or replaced by an answer to the same prompt, so any interleaving leaves a consistent file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
"""How long a read or write waits for another process's write lock before it fails (a write holds it for
one row, or one local batch: milliseconds)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    created REAL NOT NULL,
    payload TEXT NOT NULL
)
"""


def request_key(identity: str, prompt: object) -> str:
    """The cache key of one request: a hash of the judge identity and the canonical JSON of the prompt."""
    blob = json.dumps([identity, prompt], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """A persistent key -> JSON payload store (thread-safe; one connection guarded by a lock).

    ``path=None`` or ``":memory:"`` keeps the cache in memory (nothing survives the process).
    """

    def __init__(self, path: str | Path | None):
        self.path = None if path in (None, ":memory:") else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(self.path) if self.path else ":memory:",
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_S,
        )
        try:
            if self.path is not None:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
            self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise self._damaged(e) from None

    def _damaged(self, e: sqlite3.DatabaseError) -> Exception:
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
            return TimeoutError(
                f"{self.path}: the judge cache stayed locked for more than {BUSY_TIMEOUT_S:g} s (SQLite: {e}); "
                "another process is writing to it: rerun when it is done (nothing was lost)"
            )
        return ValueError(
            f"{self.path}: not a readable judge cache (SQLite: {e}); delete it (with its -wal and -shm files) and "
            "rerun: its answers are asked again, labels already written are kept"
        )

    @contextlib.contextmanager
    def _locked(self):
        """The connection under the lock; a damaged database file raises an error naming it."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.DatabaseError as e:
                raise self._damaged(e) from None

    def get(self, key: str) -> dict | None:
        with self._locked():
            row = self._conn.execute("SELECT payload FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self._locked():
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                q = f"SELECT key, payload FROM answers WHERE key IN ({','.join('?' * len(chunk))})"
                for k, p in self._conn.execute(q, chunk):
                    out[k] = json.loads(p)
        return out

    def put(self, key: str, judge: str, payload: dict) -> None:
        """Store one answer and commit at once (autocommit mode)."""
        data = json.dumps(payload, ensure_ascii=False)
        with self._locked():
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (key, judge, created, payload) VALUES (?, ?, ?, ?)",
                (key, judge, time.time(), data),
            )

    def put_many(self, rows: list[tuple[str, str, dict]]) -> None:
        """Store several answers in one transaction (a local judge's batch)."""
        with self._locked():
            self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now (waits up to the busy timeout)
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO answers (key, judge, created, payload) VALUES (?, ?, ?, ?)",
                    [(k, j, time.time(), json.dumps(p, ensure_ascii=False)) for k, j, p in rows],
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
