"""The on-disk layer of the trunk cache: trunk states kept between runs and training sizes (issue 13).

One SQLite file (``trunk_states.sqlite``) in a folder, one row per (trunk, token ids). The key is content-addressed:
``sha256(trunk identity, token ids)``, where the identity (:meth:`dmoerm.backbone.SplitBackbone.trunk_identity`
plus the device type) hashes the trunk's weights, config, split and dtype, so another backbone, dtype or split
never reads these states, and one backbone in two folders shares them. SQLite because each batch's rows go in
one transaction (a ``kill -9`` leaves whole rows or none), WAL lets several processes read and write, and one file
is easy to move or delete. Each row carries a digest of its bytes: a corrupted row is recomputed with a warning.
The cache never stops a run: an unreadable database is moved aside, a failed write is a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DB_NAME = "trunk_states.sqlite"
"""The database file inside the cache folder."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    key TEXT PRIMARY KEY,
    trunk TEXT NOT NULL,
    dtype TEXT NOT NULL,
    length INTEGER NOT NULL,
    hidden INTEGER NOT NULL,
    digest TEXT NOT NULL,
    data BLOB NOT NULL
)
"""
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
_CHUNK = 500  # keys per SELECT (SQLite's default limit on bound parameters is 999 or more)


def entry_key(trunk: str, input_ids: Sequence[int]) -> str:
    """The row key of one token sequence's states under one trunk identity."""
    digest = hashlib.sha256(trunk.encode())
    digest.update(b"\0")
    digest.update(torch.tensor(list(input_ids), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class TrunkStore:
    """Trunk states [T, H] on disk under ``directory`` (created on first use), keyed by trunk and token ids."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self.path = self.directory / DB_NAME
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._writable = True

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._open()
        except sqlite3.OperationalError:
            raise  # locked or unopenable, not damaged: the caller warns and goes on from memory
        except sqlite3.DatabaseError as e:
            # Not a database or malformed. Only a cache: keep the bad file for inspection, start an empty one.
            aside = self.path.with_name(f"{DB_NAME}.corrupt-{int(time.time())}")
            logger.warning(
                "%s: unreadable trunk cache (%s); moved to %s, starting empty", self.path, e, aside
            )
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):  # its journal belongs to the bad file, not to a new one
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            conn = self._open()
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=60)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def __len__(self) -> int:
        with self._lock:
            return self._connect().execute("SELECT COUNT(*) FROM states").fetchone()[0]

    def load(
        self, trunk: str, sequences: Sequence[tuple[int, ...]], dtype: torch.dtype, hidden: int
    ) -> dict[tuple[int, ...], torch.Tensor]:
        """The stored states of those ``sequences`` that have a sound row: {token ids: [T, H] tensor}."""
        keys = {entry_key(trunk, ids): ids for ids in sequences}
        rows = []
        try:
            with self._lock:
                conn = self._connect()
                names = list(keys)
                for start in range(0, len(names), _CHUNK):
                    part = names[start : start + _CHUNK]
                    rows += conn.execute(
                        "SELECT key, trunk, dtype, length, hidden, digest, data FROM states "
                        f"WHERE key IN ({','.join('?' * len(part))})",
                        part,
                    ).fetchall()
        except sqlite3.DatabaseError as e:
            logger.warning("%s: trunk cache read failed (%s); computing these states", self.path, e)
            return {}
        out = {}
        for key, row_trunk, row_dtype, length, row_hidden, digest, data in rows:
            ids = keys[key]
            shape_ok = (length, row_hidden) == (len(ids), hidden) and row_dtype == str(dtype)
            size_ok = len(data) == length * row_hidden * dtype.itemsize
            if row_trunk != trunk or not shape_ok or not size_ok or _digest(data) != digest:
                logger.warning(
                    "%s: trunk cache entry %s is corrupted (its bytes or shape do not match); recomputing it",
                    self.path,
                    key[:16],
                )
                continue
            out[ids] = torch.frombuffer(bytearray(data), dtype=_DTYPES[row_dtype]).view(length, row_hidden)
        return out

    def save(self, trunk: str, states: Mapping[tuple[int, ...], torch.Tensor]) -> None:
        """Write the states [T, H] of these token sequences in one transaction (a killed run keeps all or none)."""
        if not self._writable or not states:
            return
        rows = []
        for ids, state in states.items():
            data = state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            rows.append(
                (
                    entry_key(trunk, ids),
                    trunk,
                    str(state.dtype),
                    *state.shape,
                    _digest(data),
                    sqlite3.Binary(data),
                )
            )
        try:
            with self._lock:
                conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany("INSERT OR REPLACE INTO states VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as e:  # full disk, read-only folder, ...: keep running from memory
            self._writable = False
            logger.warning(
                "%s: trunk cache write failed (%s); not writing to it for the rest of this run", self.path, e
            )
