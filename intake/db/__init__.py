"""Storage: the only package that imports SQLAlchemy.

SQLite (WAL, durable commits) by default; PostgreSQL for several processes. The schema is
:mod:`intake.db.schema`, built and changed by the Alembic migrations of
``intake/db/migrations``. A :class:`Store` opens the database and hands out transactions;
a :class:`Tx` composes one repository per aggregate, all on one connection:
``tx.inbound`` (inbound records), ``tx.cases`` (cases with contacts, participants,
messages, attachments and the timeline), ``tx.outbox`` (outgoing mail, suppressions) and
``tx.ops`` (settings, component status, IMAP positions, rule statistics, rotation).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from intake.db import spool
from intake.db.base import NoDatabase, StoreBusy, StoreUnavailable, read_time, utcnow
from intake.db.cases import CaseRepo
from intake.db.engine import make_engine, revision, revision_problem, upgrade
from intake.db.ops import DATABASE_ID_KEY, SECRET_KEY, ImapMark, OpsRepo
from intake.db.sql import Kit, Sql

if TYPE_CHECKING:
    from intake.db.inbound import InboundRepo, Received
    from intake.db.outbox import OutboxRepo

__all__ = ["Store", "Tx", "StoreUnavailable", "StoreBusy", "NoDatabase", "utcnow", "ImapMark"]


class Tx:
    """One transaction: the repositories of every aggregate, on one connection."""

    def __init__(self, conn: Connection, cursor: Any, kit: Kit) -> None:
        self.conn = conn
        self.sql = Sql(cursor, kit)
        self.cases = CaseRepo(self.sql, conn)
        self.ops = OpsRepo(self.sql, conn)
        self._savepoints = 0

    # Made when first used: a read command imports only the repositories it reads.
    @cached_property
    def inbound(self) -> InboundRepo:
        from intake.db.inbound import InboundRepo

        return InboundRepo(self.sql, self.conn)

    @cached_property
    def outbox(self) -> OutboxRepo:
        from intake.db.outbox import OutboxRepo

        return OutboxRepo(self.sql, self.conn)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: on an exception only its own writes are undone."""
        self._savepoints += 1
        name = f"m{self._savepoints}"
        cur = self.sql.cur
        cur.execute(f"SAVEPOINT {name}")
        pending = len(self.cases._events)
        try:
            yield
            self.cases.flush_events()
        except BaseException:
            del self.cases._events[pending:]
            cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
            cur.execute(f"RELEASE SAVEPOINT {name}")
            raise
        cur.execute(f"RELEASE SAVEPOINT {name}")


class Store:
    """Opens the database and hands out transactions; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.kit = Kit(self.engine.dialect)
        dbapi = self.engine.dialect.dbapi
        # Errors of the driver's own cursor that mean "not now", not "bad data".
        self._unavailable: tuple[type[BaseException], ...] = (OperationalError,) + (
            (dbapi.OperationalError,) if dbapi is not None else ())
        # Called before every write transaction: serve's workers let waiting edges go first.
        self.before_write: Callable[[], None] | None = None
        self._database_id: str | None = None
        # Writers of this process queue here: SQLite's busy handler would have them sleep
        # and poll instead (1, 2, 5 … ms), which is most of the wait between two threads.
        self._write_turn = threading.RLock() if self.is_sqlite else nullcontext()

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def is_unavailable(self, exc: BaseException) -> bool:
        """True for an error that means "the database cannot be used now", not "bad data"."""
        if not isinstance(exc, (StoreUnavailable, *self._unavailable)):
            return False
        # PostgreSQL files a value its index cannot hold (SQLSTATE 54000) and bad data
        # (class 22) under OperationalError too: those are the message's fault, and
        # retrying it for ever would hold up every message behind it.
        cause: BaseException | None = exc
        while cause is not None:
            code = getattr(getattr(cause, "orig", None) or cause, "sqlstate", None)
            if code:
                return str(code)[:2] not in ("22", "54")
            cause = cause.__cause__
        return True

    def close(self) -> None:
        self.engine.dispose()

    # -- the schema ----------------------------------------------------------------------

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file; None on PostgreSQL and in memory."""
        path = self.engine.url.database if self.is_sqlite else None
        return Path(path) if path and path != ":memory:" else None

    def upgrade(self) -> str:
        """Apply the migrations not yet applied; the revision now."""
        try:
            return upgrade(self.engine)
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc

    def check(self) -> None:
        """Raise ``NoDatabase`` unless the database exists at this code's schema revision
        (one query; nothing is created or migrated)."""
        path = self.sqlite_file
        if self.is_sqlite and path is not None and not path.exists():
            raise NoDatabase(f"no database at {_shown(path)}: run intake serve, intake ingest or intake db upgrade "
                             "first, or pass --config")
        try:
            problem = revision_problem(revision(self.engine))
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc
        if problem:
            raise NoDatabase(problem)

    # -- transactions --------------------------------------------------------------------

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        """A transaction: committed on success, rolled back on any exception.

        ``write=False`` reads only and is always rolled back. A database that cannot be
        used right now raises ``StoreUnavailable``.
        """
        if write and self.before_write is not None:
            self.before_write()
        try:
            with self._write_turn if write else nullcontext(), self.engine.connect() as conn:
                if write:
                    conn.execution_options(writer=True)  # BEGIN IMMEDIATE on SQLite
                conn.begin()
                cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    tx = Tx(conn, cur, self.kit)
                    yield tx
                    tx.cases.flush_events()
                    if write:
                        conn.commit()
                    else:
                        conn.rollback()
                finally:
                    cur.close()
        except self._unavailable as exc:
            raise StoreUnavailable(_error_text(exc)) from exc

    def read(self) -> Any:
        """A read-only transaction (rolled back at the end)."""
        return self.transaction(write=False)

    # -- durable intake ------------------------------------------------------------------

    def receive(self, raw: bytes, *, channel: str, mailbox: str, envelope_from: str | None = None,
                envelope_to: Sequence[str] = (), source: dict[str, Any] | None = None) -> int:
        """Commit the raw bytes and envelope of one message; the record id.

        This commit is what makes a message accepted: only after it returns may an edge
        answer ``250`` or move the message on the IMAP server.
        """
        return self.receive_many([(raw, dict(channel=channel, mailbox=mailbox, envelope_from=envelope_from,
                                             envelope_to=list(envelope_to), source=source or {}))])[0]

    def receive_many(self, items: Sequence[Received], *, imap_mark: ImapMark | None = None) -> list[int]:
        """Commit several received messages in one transaction (group commit).

        ``imap_mark`` moves an IMAP poller's folder position in the same transaction, so
        that after a crash the poller knows exactly which messages are already stored.
        """
        now = utcnow()
        with self.transaction() as tx:
            if imap_mark is not None:
                tx.ops.set_imap_state(imap_mark, now)
            return tx.inbound.insert(items, now)

    def quarantine(self, inbound_id: int, error: str, tb: str) -> None:
        """Mark a record quarantined with its error, in a transaction of its own."""
        with self.transaction() as tx:
            tx.inbound.quarantine(inbound_id, error, tb, utcnow())

    # -- small reads and writes of their own ------------------------------------------------

    def setting(self, key: str) -> str | None:
        """A stored setting, read without creating anything."""
        with self.read() as tx:
            return tx.ops.setting(key)

    def secret(self) -> str:
        """The installation secret kept in the database (made at first use)."""
        with self.transaction() as tx:
            tx.ops.set_setting(SECRET_KEY, secrets.token_hex(32), replace=False)
            value = tx.ops.setting(SECRET_KEY)
        assert value is not None
        return value

    def report_status(self, name: str, state: str, *, backlog: int | None = None, error: str | None = None,
                      success: bool = False, details: dict[str, Any] | None = None) -> None:
        """Record what a running component is doing (``intake status``).

        ``backlog``, ``error`` and ``details`` are kept until reported again (None leaves
        them as they are); ``success`` stamps the time of the last successful round.
        """
        with self.transaction() as tx:
            tx.ops.report_status(name, state, utcnow(), backlog=backlog, error=error, success=success,
                                 details=details)

    def imap_state(self, account: str, folder: str) -> ImapMark | None:
        """The stored position of a poller in a folder, if it has one."""
        with self.read() as tx:
            return tx.ops.imap_state(account, folder)

    def set_imap_state(self, mark: ImapMark) -> None:
        """Store a poller's folder position (e.g. a new UIDVALIDITY with ``last_uid = 0``)."""
        with self.transaction() as tx:
            tx.ops.set_imap_state(mark, utcnow())

    # -- the SMTP listener's spool (SQLite) ------------------------------------------------

    def database_id(self) -> str:
        """This database's identity (made at first use): a spool belongs to one database."""
        if self._database_id is None:
            value = self.setting(DATABASE_ID_KEY)
            if value is None:
                with self.transaction() as tx:
                    tx.ops.set_setting(DATABASE_ID_KEY, secrets.token_hex(16), replace=False)
                    value = tx.ops.setting(DATABASE_ID_KEY)
            self._database_id = value
        assert self._database_id is not None
        return self._database_id

    @property
    def spool_path(self) -> Path | None:
        """The spool file beside a SQLite database file (``intake.spool-ID.db``); None on
        PostgreSQL, and while the database has no identity yet (then it has no spool either).
        A read: it never writes the database."""
        path = self.sqlite_file
        ident = (self._database_id or self.setting(DATABASE_ID_KEY)) if path else None
        return spool.spool_path(path, ident) if path and ident else None

    def spool_writer(self) -> spool.SpoolWriter | None:
        """The SMTP listener's writer to its spool; None where the listener commits directly.
        Its ids continue above the last one imported."""
        if self.sqlite_file is None:
            return None
        self.database_id()  # the spool is named after it: made now if needed
        path = self.spool_path
        assert path is not None
        spool.open_spool(path)
        mark = self._spool_mark()
        return spool.SpoolWriter(path, last_imported=mark[1] if mark else 0)

    def _spool_mark(self) -> tuple[str, int] | None:
        """(settings key, last imported id) of the current spool file, None without one."""
        path = self.spool_path
        ident = spool.spool_identity(path) if path is not None and path.exists() else None
        if ident is None:
            return None
        key = f"spool.{ident}.imported"  # a new spool file starts from 0
        return key, int(self.setting(key) or 0)

    def import_spool(self, limit: int = 500) -> int:
        """Move spooled messages into ``inbound`` (state ``received``); how many.

        The last imported spool id is written in the same transaction as the records, so
        that a crash neither loses nor repeats one.
        """
        mark = self._spool_mark()
        if mark is None:
            return 0
        key, after = mark
        path = self.spool_path
        assert path is not None
        rows = spool.read_after(path, after, limit=limit)
        if not rows:
            return 0
        # Durable before recorded as imported: after a power loss the spool must not give
        # these ids to other messages (a commit is readable before the listener's sync).
        spool.sync_log(path)
        with self.transaction() as tx:
            done = int(tx.ops.setting(key) or 0)  # another worker may have been first
            rows = [r for r in rows if r.id > done]
            if rows:
                items = [(r.raw, {"channel": r.channel, "mailbox": r.mailbox, "envelope_from": r.envelope_from,
                                  "envelope_to": r.envelope_to, "source": {**r.source, "spool": r.id},
                                  "received_at": read_time(r.received_at)}) for r in rows]
                tx.inbound.insert(items, utcnow())
                tx.ops.set_setting(key, str(rows[-1].id))
        return len(rows)

    def spool_backlog(self) -> int:
        """Spooled messages not yet imported."""
        mark = self._spool_mark()
        return spool.count_after(self.spool_path, mark[1]) if mark else 0  # type: ignore[arg-type]

    def purge_spool(self) -> int:
        """Delete imported messages from the spool (they are in ``inbound`` now)."""
        mark = self._spool_mark()
        return spool.purge(self.spool_path, mark[1]) if mark else 0  # type: ignore[arg-type]


def _error_text(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc)


def _shown(path: Path) -> str:
    """A path as the user typed it: ``./intake.db`` for a file in the working folder."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return f"./{rel}"
