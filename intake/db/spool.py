"""The SMTP listener's spool on SQLite: where a ``250`` is earned, before the processor runs.

SQLite has one writer. Sharing the database's write lock with the processor made every
SMTP delivery wait for a processing transaction, and the fsync of each commit stalled the
event loop. So on SQLite the listener commits to a spool of its own, a second SQLite file
beside the database, named after the database's identity (``intake.db`` →
``intake.spool-0123456789ab.db``), that only the listener writes:

- a commit never waits for the processor, and runs in the event loop (a few inserts);
- durability: the spool connection commits without syncing (``synchronous=NORMAL``) and
  the listener then ``fdatasync``\\ s the spool's write-ahead log in a thread, once for
  every commit made meanwhile; ``250`` follows that sync. In WAL mode a commit is a
  frame appended to the log, so a synced log holds every commit made before the sync —
  what ``synchronous=FULL`` does at each commit, without holding the loop;
- the processor moves spooled messages into the database's ``inbound`` table
  (:meth:`intake.db.Store.import_spool`), recording how far it got in the same
  transaction, so a crash at any moment neither loses nor repeats a message. It first
  syncs the spool's log itself (:func:`sync_log`): what it read may have been committed
  but not yet synced, and an id it records must never be given again after a power loss;
- imported rows are deleted later (:func:`purge`), in small transactions.

The spool is part of the database: back it up and move it together with ``intake.db``. A
spool of another database (``intake.db`` deleted and made anew) has another name and is
never read. PostgreSQL needs none (it has no single write lock): the listener commits
there directly.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from intake.db.base import StoreBusy, StoreUnavailable, db_text, sqlite_time


class SpoolBroken(StoreUnavailable):
    """The spool's log could not be synced: after a failed fsync the kernel may have
    dropped the pages, so no later commit can be trusted until the spool is opened again."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at TEXT NOT NULL, "
    "channel TEXT NOT NULL, mailbox TEXT NOT NULL, envelope_from TEXT, envelope_to TEXT NOT NULL, "
    "source TEXT NOT NULL, raw BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
log = logging.getLogger("intake.spool")


def spool_path(database: str | Path, database_id: str) -> Path:
    """The spool file of a SQLite database file and its identity: ``intake.spool-ID.db``."""
    p = Path(database)
    return p.with_name(f"{p.stem}.spool-{database_id[:12]}{p.suffix or '.db'}")


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode=WAL")
    # Commits are made durable by syncing the log (SpoolWriter.sync), not by SQLite.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def open_spool(path: Path) -> None:
    """Create the spool file if needed; move what its log holds into the file (synced).

    The listener opens its spool at start: should the last run have ended with a failed
    sync, the checkpoint writes every commit in the log to the database file and syncs it.
    """
    conn = _connect(path, 30000)
    try:
        for stmt in _SCHEMA:
            conn.execute(stmt)
        # A new file is a new spool: its ids start again, so the import's mark is per file.
        conn.execute("INSERT INTO meta (key, value) VALUES ('id', ?) ON CONFLICT DO NOTHING", (uuid.uuid4().hex,))
        # Another connection's checkpoint (serve's purge runs one as it starts, and after a
        # kill the log is long) makes this one return busy at once, without the busy handler.
        deadline = time.monotonic() + 30
        while conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"the spool {path} is busy: its log could not be checkpointed")
            time.sleep(0.05)
    finally:
        conn.close()


class SpoolWriter:
    """The listener's writer: appends in its event loop and never waits for the lock.

    ``try_append`` raises ``StoreBusy`` at once when another connection (the purge) holds
    the spool's lock; ``sync`` (called in a thread) makes every append so far durable.
    """

    def __init__(self, path: Path, last_imported: int = 0) -> None:
        """Open the spool at ``path`` (made by :func:`open_spool`); new ids continue above
        ``last_imported``, the last id the import took."""
        self.path = path
        # Set up waiting like any connection (another may be recovering the log after a
        # crash); from then on a commit never waits: try_append raises StoreBusy instead.
        self._conn = _connect(path, 30000)
        self._continue_above(last_imported)  # also: the log file exists from here on
        # A checkpoint here would stall the loop: the purge runs them, off the loop.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._conn.execute("PRAGMA busy_timeout=0")
        self._wal = os.open(f"{path}-wal", os.O_RDONLY)

    def _continue_above(self, last_imported: int) -> None:
        # Should the spool ever have lost commits (a sync that failed unnoticed, a restored
        # backup), its ids would start again below what was imported, and the import would
        # take new messages for done.
        with self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
            if row is None:
                self._conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('spool', ?)", (last_imported,))
            elif row[0] < last_imported:
                log.error("spool %s would give ids from %d, but ids up to %d were imported already: "
                          "continuing above them", self.path, row[0] + 1, last_imported)
                self._conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'spool'", (last_imported,))
        # Durable with the first delivery's sync, which covers every earlier commit.

    def try_append(self, items: Sequence[tuple[bytes, dict[str, Any]]], now: datetime) -> list[int]:
        """Commit received messages (not yet synced); their spool ids, in order."""
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise StoreBusy(str(exc)) from exc
            raise StoreUnavailable(str(exc)) from exc
        try:
            at = sqlite_time(now)
            ids = []
            for raw, meta in items:
                cur.execute("INSERT INTO spool (received_at, channel, mailbox, envelope_from, envelope_to, source, raw) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (at, meta["channel"], meta["mailbox"], db_text(meta.get("envelope_from")),
                             json.dumps(list(meta.get("envelope_to") or [])), json.dumps(dict(meta.get("source") or {})),
                             raw))
                ids.append(int(cur.lastrowid or 0))
            cur.execute("COMMIT")
            return ids
        except BaseException as exc:
            # Whatever failed (a lock, a value the driver refused), the transaction must end
            # here: left open, it would refuse every later delivery.
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailable(str(exc)) from exc
            raise

    def sync(self) -> None:
        """Make every commit so far durable (``fdatasync`` of the spool's log)."""
        try:
            os.fdatasync(self._wal)
        except OSError as exc:
            raise SpoolBroken(f"cannot sync the spool {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close the spool's connection and its log file."""
        self._conn.close()
        os.close(self._wal)


@dataclass(frozen=True)
class Spooled:
    """One spooled message, as the processor imports it."""

    id: int
    received_at: str
    channel: str
    mailbox: str
    envelope_from: str | None
    envelope_to: list[str]
    source: dict[str, Any]
    raw: bytes


def read_after(path: Path, after: int, *, limit: int = 500, max_bytes: int = 16 * 1024 * 1024) -> list[Spooled]:
    """Spooled messages with an id above ``after``, oldest first (a read: never blocks the listener)."""
    if not path.exists():
        return []
    conn = _connect(path, 30000)
    try:
        out: list[Spooled] = []
        size = 0
        rows = conn.execute("SELECT id, received_at, channel, mailbox, envelope_from, envelope_to, source, raw "
                            "FROM spool WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        for r in rows:
            out.append(Spooled(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), bytes(r[7])))
            size += len(r[7])
            if size >= max_bytes:
                break
        return out
    finally:
        conn.close()


def spool_identity(path: Path) -> str | None:
    """The identity of a spool file, None when there is none."""
    if not path.exists():
        return None
    conn = _connect(path, 30000)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def sync_log(path: Path) -> None:
    """Make every commit in the spool durable (the importer, before it records what it read)."""
    try:
        fd = os.open(f"{path}-wal", os.O_RDONLY)
    except FileNotFoundError:
        return  # no log: every commit is in the database file, synced by its checkpoint
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def count_after(path: Path, after: int) -> int:
    """How many spooled messages wait above ``after``."""
    if not path.exists():
        return 0
    conn = _connect(path, 30000)
    try:
        return int(conn.execute("SELECT count(*) FROM spool WHERE id > ?", (after,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def purge(path: Path, upto: int, *, chunk: int = 100) -> int:
    """Delete imported messages (ids up to ``upto``) in small transactions (a listener commit
    meanwhile is tried again a moment later), then checkpoint."""
    if not path.exists() or upto <= 0:
        return 0
    conn = _connect(path, 30000)
    try:
        deleted = 0
        while True:
            cur = conn.execute("DELETE FROM spool WHERE id IN (SELECT id FROM spool WHERE id <= ? ORDER BY id LIMIT ?)",
                               (upto, chunk))
            deleted += cur.rowcount
            if cur.rowcount < chunk:
                break
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return deleted
    finally:
        conn.close()
