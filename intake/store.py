"""Storage: SQLAlchemy models, migrations and the transactions of the flow.

The only module that imports SQLAlchemy. SQLite (WAL, durable commits) by default;
PostgreSQL for several processes. The schema is created and changed by the Alembic
migrations in ``intake/migrations``; ``upgrade()`` applies them.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker, joinedload
from sqlalchemy.types import TypeDecorator

from intake.db import spool
from intake.flowstore import (  # noqa: F401 - the store's public names
    DROPPED,
    DUPLICATE,
    INBOUND_STATES,
    PROCESSED,
    QUARANTINED,
    RECEIVED,
    CaseRec,
    ContactRef,
    Dialect,
    FlowTx,
    InboundWork,
    StoreBusy,
    StoreUnavailable,
    insert_inbound,
    utcnow,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps are stored in UTC and always come back time-zone aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class InboundRecord(Base):
    """One received message, committed before anything is decided about it."""

    __tablename__ = "inbound"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    channel: Mapped[str] = mapped_column(String(20))
    mailbox: Mapped[str] = mapped_column(String(320))
    envelope_from: Mapped[str | None] = mapped_column(String(998))
    envelope_to: Mapped[list[Any]] = mapped_column(default=list)
    source: Mapped[dict[str, Any]] = mapped_column(default=dict)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    raw_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), default=RECEIVED)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    from_address: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(Text)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("inbound.id"))
    processed_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    log: Mapped[list[Any]] = mapped_column(default=list)

    __table_args__ = (Index("ix_inbound_state", "state", "id"),)


class MessageKey(Base):
    """The first inbound record of each Message-ID: the duplicate rule's single source."""

    __tablename__ = "message_keys"
    key: Mapped[str] = mapped_column(String(998), primary_key=True)
    inbound_id: Mapped[int] = mapped_column(ForeignKey("inbound.id"))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))


class Organization(Base):
    __tablename__ = "organizations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    organization_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"))
    language: Mapped[str | None] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    organization: Mapped[Organization | None] = relationship()


class Case(Base):
    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(BigInteger, unique=True)
    prefix: Mapped[str] = mapped_column(String(20), default="CASE")
    subject: Mapped[str] = mapped_column(Text, default="")
    requester_id: Mapped[int | None] = mapped_column(ForeignKey("contacts.id"))
    organization_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"))
    status: Mapped[str] = mapped_column(String(20), default="new", index=True)
    priority: Mapped[str] = mapped_column(String(10), default="medium")
    queue: Mapped[str | None] = mapped_column(String(100), index=True)
    assignee: Mapped[str | None] = mapped_column(String(320))
    category: Mapped[str | None] = mapped_column(String(100))
    channel: Mapped[str] = mapped_column(String(20), default="email")
    mailbox: Mapped[str | None] = mapped_column(String(320))
    brand: Mapped[str | None] = mapped_column(String(100))
    language: Mapped[str | None] = mapped_column(String(10))
    resolution: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    first_response_due: Mapped[datetime | None]
    resolution_due: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    first_response_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    linked_case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"))
    requester: Mapped[Contact | None] = relationship(foreign_keys=[requester_id])
    organization: Mapped[Organization | None] = relationship(foreign_keys=[organization_id])

    @property
    def label(self) -> str:
        return f"{self.prefix}-{self.number}"


class Participant(Base):
    __tablename__ = "participants"
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(20))  # requester | cc | agent
    contact: Mapped[Contact] = relationship(lazy="joined")


class MessageRow(Base):
    """A message on a case's timeline, incoming or outgoing."""

    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound.id"))
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    visibility: Mapped[str] = mapped_column(String(10), default="public")
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    from_address: Mapped[str | None] = mapped_column(String(320))
    from_name: Mapped[str | None] = mapped_column(String(255))
    to: Mapped[list[Any]] = mapped_column(default=list)
    cc: Mapped[list[Any]] = mapped_column(default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    thread_index: Mapped[str | None] = mapped_column(String(64))


class Blob(Base):
    """Attachment content, stored once per SHA-256."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class AttachmentRow(Base):
    __tablename__ = "attachments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_row_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    filename: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    inline: Mapped[bool] = mapped_column(Boolean, default=False)
    content_id: Mapped[str | None] = mapped_column(String(998))


class Event(Base):
    """One entry of a case's timeline (audit trail)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[str] = mapped_column(String(30))
    actor: Mapped[str | None] = mapped_column(String(320))
    message_row_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound.id"))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


# Outbox states: queued → sending → sent | failed | bounced (a sent mail that came back).
OUT_QUEUED = "queued"
OUT_SENDING = "sending"
OUT_SENT = "sent"
OUT_FAILED = "failed"
OUT_BOUNCED = "bounced"
OUTBOX_STATES = (OUT_QUEUED, OUT_SENDING, OUT_SENT, OUT_FAILED, OUT_BOUNCED)


class OutboxRow(Base):
    """One rendered outgoing mail, stored in the transaction of the change that caused it.

    The MIME bytes are built at delivery time from these fields, because the transfer
    encoding depends on whether the relay announces 8BITMIME.
    """

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), index=True)
    message_row_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    template: Mapped[str] = mapped_column(String(50))
    audience: Mapped[str] = mapped_column(String(10))  # customer | agent
    auto_submitted: Mapped[str] = mapped_column(String(20))
    language: Mapped[str] = mapped_column(String(10))
    mail_from: Mapped[str] = mapped_column(String(320))  # envelope sender (signed case address)
    recipient: Mapped[str] = mapped_column(String(320))  # primary recipient, lower case
    recipients: Mapped[list[Any]] = mapped_column(default=list)  # envelope RCPT TO
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    headers: Mapped[list[Any]] = mapped_column(default=list)  # [[name, value], ...] in order
    subject: Mapped[str] = mapped_column(Text, default="")
    text: Mapped[str] = mapped_column(Text, default="")
    html: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(10), default=OUT_QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    give_up_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    permanent: Mapped[bool] = mapped_column(Boolean, default=False)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_outbox_due", "state", "next_attempt_at"),
        Index("ix_outbox_recipient", "recipient", "created_at"),
    )


class Suppression(Base):
    """An address that gets no automated mail until ``until`` (after a bounce or a 5xx)."""

    __tablename__ = "suppressions"
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    until: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """Named sequences that work alike on SQLite and PostgreSQL (row-locked increment)."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RuleStat(Base):
    """How often each routing rule matched (``intake rules stats``), by rule name."""

    __tablename__ = "rule_stats"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    first_hit_at: Mapped[datetime | None]
    last_hit_at: Mapped[datetime | None]


class QueueRotation(Base):
    """Round-robin position of a queue: the agent assigned last."""

    __tablename__ = "queue_rotation"
    queue: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_agent: Mapped[str | None] = mapped_column(String(320))
    updated_at: Mapped[datetime | None]


class ComponentStatus(Base):
    """What each running part (listener, poller, processor) last reported: ``intake status``."""

    __tablename__ = "component_status"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(40))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_success_at: Mapped[datetime | None]
    backlog: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ImapFolderState(Base):
    """Where an IMAP poller stands in one folder: every UID up to ``last_uid`` is stored."""

    __tablename__ = "imap_state"
    account: Mapped[str] = mapped_column(String(200), primary_key=True)
    folder: Mapped[str] = mapped_column(String(500), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------------------------------
# Engine and migrations


def sqlite_pragmas(dbapi_conn: Any, busy_timeout_ms: int = 30000) -> None:
    """The settings every SQLite connection of intake runs with."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns; `250` depends on that.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine with the connection settings intake relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            sqlite_pragmas(dbapi_conn)

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # Writers take the lock at BEGIN so that they queue (busy_timeout) instead of
            # failing on lock upgrade; readers begin deferred and never block a writer.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")

        # pysqlite's own transaction handling would defer BEGIN; we issue it ourselves.
        @event.listens_for(engine, "connect", insert=True)
        def _sqlite_autocommit(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied (``intake db upgrade``)."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "db" / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")


def current_revision(engine: Engine) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


# ---------------------------------------------------------------------------------------
# Plain views of stored rows (what the CLI and notifications see; never ORM objects)


@dataclass(frozen=True)
class CaseView:
    id: int
    number: str
    subject: str
    status: str
    priority: str
    queue: str | None
    category: str | None
    assignee: str | None
    requester: str | None
    requester_name: str | None
    organization: str | None
    channel: str
    mailbox: str | None
    brand: str | None
    language: str | None
    tags: list[str]
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        d = {
            "number": self.number,
            "subject": self.subject,
            "status": self.status,
            "priority": self.priority,
            "queue": self.queue,
            "category": self.category,
            "assignee": self.assignee,
            "requester": self.requester,
            "requester_name": self.requester_name,
            "organization": self.organization,
            "channel": self.channel,
            "mailbox": self.mailbox,
            "tags": list(self.tags),
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }
        return d


@dataclass(frozen=True)
class StatusView:
    """One line of ``intake status``."""

    name: str
    state: str
    updated_at: datetime
    last_success_at: datetime | None
    backlog: int | None
    last_error: str | None
    last_error_at: datetime | None
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImapMark:
    """An IMAP folder position committed together with the messages that reach it."""

    account: str
    folder: str
    uidvalidity: int
    last_uid: int


def case_view(case: Case) -> CaseView:
    return CaseView(
        id=case.id,
        number=case.label,
        subject=case.subject,
        status=case.status,
        priority=case.priority,
        queue=case.queue,
        category=case.category,
        assignee=case.assignee,
        requester=case.requester.address if case.requester else None,
        requester_name=(case.requester.name or None) if case.requester else None,
        organization=case.organization.domain if case.organization else None,
        channel=case.channel,
        mailbox=case.mailbox,
        brand=case.brand,
        language=case.language,
        tags=list(case.tags or []),
        created_at=case.created_at,
        updated_at=case.updated_at,
    )


# ---------------------------------------------------------------------------------------
# The store


class Store:
    """Opens the database and hands out transactions; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = Dialect(self.engine.dialect.name)
        dbapi = self.engine.dialect.dbapi
        # Errors of the driver's own cursor (the hot paths) that mean "not now", not "bad data".
        self._unavailable: tuple[type[BaseException], ...] = (OperationalError,) + (
            (dbapi.OperationalError,) if dbapi is not None else ())
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writers = sessionmaker(self.engine.execution_options(writer=True), expire_on_commit=False)
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
        return isinstance(exc, (StoreUnavailable, *self._unavailable))

    def upgrade(self) -> None:
        try:
            upgrade(self.engine)
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed on success, rolled back on any exception."""
        if self.before_write is not None:
            self.before_write()
        with self._write_turn, self._writers() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    @contextmanager
    def flow(self, *, write: bool = True) -> Iterator[FlowTx]:
        """A transaction of the processing flow on the driver's cursor (``intake.flowstore``).

        Committed on success and rolled back on any exception; ``write=False`` reads only
        and is always rolled back. A database that cannot be used right now raises
        ``StoreUnavailable``.
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
                    tx = FlowTx(cur, self.dialect)
                    yield tx
                    tx.flush_events()
                    if write:
                        conn.commit()
                    else:
                        conn.rollback()
                finally:
                    cur.close()
        except self._unavailable as exc:
            raise StoreUnavailable(_error_text(exc)) from exc

    # -- durable intake -------------------------------------------------------------

    def receive(
        self,
        raw: bytes,
        *,
        channel: str,
        mailbox: str,
        envelope_from: str | None = None,
        envelope_to: Sequence[str] = (),
        source: dict[str, Any] | None = None,
    ) -> int:
        """Commit the raw bytes and envelope of one message; returns the record id.

        This commit is what makes a message accepted: only after it returns may an edge
        answer ``250`` or move the message on the IMAP server.
        """
        ids = self.receive_many([(raw, dict(channel=channel, mailbox=mailbox, envelope_from=envelope_from,
                                            envelope_to=list(envelope_to), source=source or {}))])
        return ids[0]

    def receive_many(self, items: Sequence[tuple[bytes, dict[str, Any]]], *, imap_mark: ImapMark | None = None) -> list[int]:
        """Commit several received messages in one transaction (group commit).

        ``imap_mark`` moves an IMAP poller's folder position in the same transaction, so
        that after a crash the poller knows exactly which messages are already stored.
        """
        with self.flow() as tx:
            if imap_mark is not None:
                tx.set_imap_state(imap_mark.account, imap_mark.folder, imap_mark.uidvalidity, imap_mark.last_uid)
            return insert_inbound(tx.cur, self.dialect, items, utcnow())

    # -- the SMTP listener's spool (SQLite) ------------------------------------------

    @property
    def spool_path(self) -> Path | None:
        """The spool file beside a SQLite database file (``intake.spool-ID.db``); None on
        PostgreSQL, and while the database has no identity yet (then it has no spool either).
        A read: it never writes the database."""
        path = self._database_file()
        ident = (self._database_id or self.setting(DATABASE_ID_KEY)) if path else None
        return spool.spool_path(path, ident) if path and ident else None

    def spool_writer(self) -> "spool.SpoolWriter | None":
        """The SMTP listener's writer to its spool; None where the listener commits directly.
        Its ids continue above the last one imported."""
        if self._database_file() is None:
            return None
        self.database_id()  # the spool is named after it: made now if needed
        path = self.spool_path
        assert path is not None
        spool.open_spool(path)
        mark = self._spool_mark()
        return spool.SpoolWriter(path, last_imported=mark[1] if mark else 0)

    def _database_file(self) -> str | None:
        """The SQLite database file; None on PostgreSQL and in memory (no spool there)."""
        path = self.engine.url.database if self.is_sqlite else None
        return path if path and path != ":memory:" else None

    def database_id(self) -> str:
        """This database's identity (made at first use): a spool belongs to one database."""
        if self._database_id is None:
            value = self.setting(DATABASE_ID_KEY)
            if value is None:
                with self.flow() as tx:
                    tx.set_setting(DATABASE_ID_KEY, secrets.token_hex(16), replace=False)
                    value = tx.setting(DATABASE_ID_KEY)
            self._database_id = value
        assert self._database_id is not None
        return self._database_id

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
        with self.flow() as tx:
            done = int(tx.setting(key) or 0)  # another worker may have been first
            rows = [r for r in rows if r.id > done]
            if rows:
                items = [(r.raw, {"channel": r.channel, "mailbox": r.mailbox, "envelope_from": r.envelope_from,
                                  "envelope_to": r.envelope_to, "source": {**r.source, "spool": r.id},
                                  "received_at": Dialect.read_ts(r.received_at)}) for r in rows]
                insert_inbound(tx.cur, self.dialect, items, utcnow())
                tx.set_setting(key, str(rows[-1].id))
        return len(rows)

    def spool_backlog(self) -> int:
        """Spooled messages not yet imported."""
        mark = self._spool_mark()
        return spool.count_after(self.spool_path, mark[1]) if mark else 0  # type: ignore[arg-type]

    def purge_spool(self) -> int:
        """Delete imported messages from the spool (they are in ``inbound`` now)."""
        mark = self._spool_mark()
        return spool.purge(self.spool_path, mark[1]) if mark else 0  # type: ignore[arg-type]

    def load_inbound(self, inbound_ids: Sequence[int]) -> dict[int, InboundWork]:
        """Records to process, with their raw bytes, read without locking (outside the write
        transaction, so that parsing never holds SQLite's one writer slot)."""
        t = InboundRecord.__table__
        cols = ("id", "raw", "state", "channel", "mailbox", "envelope_to", "source", "log", "attempts", "received_at")
        out: dict[int, InboundWork] = {}
        try:
            with self.engine.connect() as conn:
                for row in conn.execute(select(*(t.c[c] for c in cols)).where(t.c.id.in_(list(inbound_ids)))):
                    m = row._mapping
                    out[m["id"]] = InboundWork(
                        id=m["id"], raw=m["raw"], state=m["state"], channel=m["channel"], mailbox=m["mailbox"],
                        envelope_to=list(m["envelope_to"] or []), source=dict(m["source"] or {}),
                        log=list(m["log"] or []), attempts=m["attempts"] or 0, received_at=m["received_at"])
        except OperationalError as exc:
            raise StoreUnavailable(_error_text(exc)) from exc
        return out

    def pending_inbound(self, limit: int = 1000, after_id: int = 0, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Ids of records still ``received`` (not yet processed), oldest first.

        ``shard`` (index, count): only ids with ``id % count == index``, so that several
        processors of one serve never prepare the same record.
        """
        index, count = shard
        q = select(InboundRecord.id).where(InboundRecord.state == RECEIVED, InboundRecord.id > after_id)
        if count > 1:
            q = q.where(InboundRecord.id % count == index)
        with self._sessions() as s:
            return list(s.scalars(q.order_by(InboundRecord.id).limit(limit)))

    def count_inbound(self, state: str | None = None) -> int:
        with self._sessions() as s:
            q = select(func.count(InboundRecord.id))
            if state:
                q = q.where(InboundRecord.state == state)
            return int(s.scalar(q) or 0)

    def list_inbound(
        self,
        *,
        state: str | None = None,
        since: datetime | None = None,
        from_address: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Inbound records, newest last, with their case number (``intake messages list``)."""
        with self._sessions() as s:
            q = (
                select(InboundRecord.id, InboundRecord.received_at, InboundRecord.channel, InboundRecord.mailbox,
                       InboundRecord.envelope_from, InboundRecord.from_address, InboundRecord.subject,
                       InboundRecord.state, InboundRecord.message_id, InboundRecord.size, InboundRecord.error,
                       Case.prefix, Case.number)
                .outerjoin(Case, Case.id == InboundRecord.case_id)
                .order_by(InboundRecord.id)
            )
            if state:
                q = q.where(InboundRecord.state == state)
            if since:
                q = q.where(InboundRecord.received_at >= since)
            if from_address:
                q = q.where(func.lower(InboundRecord.from_address) == from_address.lower())
            if limit:
                q = q.limit(limit)
            return [
                {"id": r.id, "received_at": r.received_at, "channel": r.channel, "mailbox": r.mailbox,
                 "envelope_from": r.envelope_from, "from": r.from_address, "subject": r.subject, "state": r.state,
                 "message_id": r.message_id, "size": r.size, "error": r.error,
                 "case": f"{r.prefix}-{r.number}" if r.number is not None else None}
                for r in s.execute(q)
            ]

    def inbound_detail(self, ref: str) -> dict[str, Any] | None:
        """One inbound record by id, spool id (``S12``, as the SMTP reply named it) or Message-ID,
        with its processing log (``intake messages show``)."""
        with self._sessions() as s:
            q = select(InboundRecord)
            if ref.isdigit():
                q = q.where(InboundRecord.id == int(ref))
            elif ref[:1] in "Ss" and ref[1:].isdigit():
                q = q.where(InboundRecord.source["spool"].as_integer() == int(ref[1:])).order_by(InboundRecord.id.desc())
            else:
                q = q.where(InboundRecord.message_id == ref.strip().strip("<>")).order_by(InboundRecord.id)
            rec = s.scalars(q.limit(1)).first()
            if rec is None:
                return None
            case = s.get(Case, rec.case_id) if rec.case_id else None
            caused = s.execute(
                select(OutboxRow.id, OutboxRow.template, OutboxRow.recipient, OutboxRow.state, OutboxRow.attempts,
                       OutboxRow.message_id, OutboxRow.last_error).where(OutboxRow.inbound_id == rec.id)
                .order_by(OutboxRow.id)
            )
            return {
                "outbox": [{"id": o.id, "template": o.template, "to": o.recipient, "state": o.state,
                            "attempts": o.attempts, "message_id": o.message_id, "last_error": o.last_error}
                           for o in caused],
                "id": rec.id, "received_at": rec.received_at.isoformat(), "channel": rec.channel,
                "mailbox": rec.mailbox, "envelope_from": rec.envelope_from, "envelope_to": list(rec.envelope_to or []),
                "source": dict(rec.source or {}), "size": rec.size, "raw_sha256": rec.raw_sha256,
                "raw_kept": s.scalar(select(InboundRecord.raw.isnot(None)).where(InboundRecord.id == rec.id)),
                "state": rec.state, "message_id": rec.message_id, "from": rec.from_address, "subject": rec.subject,
                "case": case.label if case else None, "duplicate_of": rec.duplicate_of, "attempts": rec.attempts,
                "processed_at": rec.processed_at.isoformat() if rec.processed_at else None,
                "error": rec.error, "traceback": rec.traceback, "log": _with_received(rec),
            }

    def purge_raw(self, before: datetime) -> int:
        """Retention: forget raw bytes and processing logs of records received before ``before``.

        Case data (cases, messages, attachments, timeline) is kept. Records still waiting
        or quarantined keep their bytes: they are not finished with.
        """
        with self.session() as s:
            res = s.execute(
                update(InboundRecord)
                .where(InboundRecord.received_at < before, InboundRecord.raw.isnot(None),
                       InboundRecord.state.notin_([RECEIVED, QUARANTINED]))
                .values(raw=None, log=[{"at": utcnow().isoformat(), "step": "purged",
                                        "reason": "retention: raw bytes and log removed"}])
            )
            return int(res.rowcount or 0)

    def inbound_raw(self, inbound_id: int) -> bytes | None:
        with self._sessions() as s:
            return s.scalar(select(InboundRecord.raw).where(InboundRecord.id == inbound_id))

    def quarantine(self, inbound_id: int, error: str, tb: str) -> None:
        """Mark a record quarantined with its error, in a transaction of its own."""
        with self.flow() as tx:
            tx.quarantine(inbound_id, error, tb, utcnow())

    def quarantined(self) -> list[InboundRecord]:
        with self._sessions() as s:
            return list(s.scalars(select(InboundRecord).where(InboundRecord.state == QUARANTINED).order_by(InboundRecord.id)))

    def requeue(self, inbound_id: int) -> bool:
        """Put a quarantined record back to ``received`` so it is processed again."""
        with self.session() as s:
            res = s.execute(
                update(InboundRecord)
                .where(InboundRecord.id == inbound_id, InboundRecord.state == QUARANTINED)
                .values(state=RECEIVED)
            )
            return bool(res.rowcount)

    # -- component status and IMAP positions --------------------------------------------

    def report_status(self, name: str, state: str, *, backlog: int | None = None, error: str | None = None,
                      success: bool = False, details: dict[str, Any] | None = None) -> None:
        """Record what a running component is doing (``intake status``).

        ``backlog`` and ``error`` are kept until reported again (None leaves them as they
        are); ``success`` stamps the time of the last successful round.
        """
        now = utcnow()
        try:
            with self.session() as s:
                row = s.get(ComponentStatus, name)
                if row is None:
                    row = ComponentStatus(name=name, state=state)
                    s.add(row)
                row.state = state
                row.updated_at = now
                if backlog is not None:
                    row.backlog = backlog
                if error is not None:
                    row.last_error = error[:2000]
                    row.last_error_at = now
                if success:
                    row.last_success_at = now
                if details is not None:
                    row.details = details
        except IntegrityError:
            # Another process inserted the same name at once: ours is the newer report.
            self.report_status(name, state, backlog=backlog, error=error, success=success, details=details)
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc

    def statuses(self) -> list[StatusView]:
        """Every component's last report, by name."""
        with self._sessions() as s:
            return [StatusView(r.name, r.state, r.updated_at, r.last_success_at, r.backlog, r.last_error,
                               r.last_error_at, r.details)
                    for r in s.scalars(select(ComponentStatus).order_by(ComponentStatus.name))]

    def imap_state(self, account: str, folder: str) -> ImapMark | None:
        """The stored position of a poller in a folder, if it has one."""
        with self._sessions() as s:
            row = s.get(ImapFolderState, (account, folder))
            return ImapMark(account, folder, row.uidvalidity, row.last_uid) if row else None

    def set_imap_state(self, mark: ImapMark) -> None:
        """Store a poller's folder position (e.g. a new UIDVALIDITY with ``last_uid = 0``)."""
        with self.flow() as tx:
            tx.set_imap_state(mark.account, mark.folder, mark.uidvalidity, mark.last_uid)

    # -- settings ---------------------------------------------------------------------

    def secret(self) -> str:
        """The installation secret kept in the database (made at first use)."""
        with self.session() as s:
            row = s.get(Setting, "secret")
            if row is not None:
                return row.value
            value = secrets.token_hex(32)
            s.add(Setting(key="secret", value=value))
            try:
                s.flush()
            except IntegrityError:
                s.rollback()
                return s.get(Setting, "secret").value  # type: ignore[union-attr]
            return value

    # -- routing rules ----------------------------------------------------------------

    def setting(self, key: str) -> str | None:
        """A stored setting, read without creating anything."""
        with self._sessions() as s:
            row = s.get(Setting, key)
            return row.value if row is not None else None

    def rule_stats(self) -> dict[str, tuple[int, datetime | None]]:
        """Hit count and last hit of every rule that ever matched, by rule name."""
        with self._sessions() as s:
            return {r.name: (int(r.hits), r.last_hit_at) for r in s.scalars(select(RuleStat))}

    def set_rules_state(self, state: dict[str, Any]) -> None:
        """Record the outcome of the last rule (re)load of ``serve`` (for ``intake status``)."""
        import json

        with self.session() as s:
            row = s.get(Setting, RULES_STATE_KEY)
            text = json.dumps(state, ensure_ascii=False, default=str)
            if row is None:
                s.add(Setting(key=RULES_STATE_KEY, value=text))
            else:
                row.value = text

    def rules_state(self) -> dict[str, Any] | None:
        """The last rule (re)load of ``serve``: ``state`` ok|refused, ``error``, times, summary."""
        import json

        with self._sessions() as s:
            row = s.get(Setting, RULES_STATE_KEY)
            return json.loads(row.value) if row is not None else None

    # -- reading cases ----------------------------------------------------------------

    def list_cases(self, *, queue: str | None = None, status: str | None = None, limit: int | None = None) -> list[CaseView]:
        with self._sessions() as s:
            q = select(Case).options(joinedload(Case.requester), joinedload(Case.organization)).order_by(Case.number)
            if queue:
                q = q.where(Case.queue == queue)
            if status:
                q = q.where(Case.status == status)
            if limit:
                q = q.limit(limit)
            return [case_view(c) for c in s.scalars(q).unique()]

    def case_detail(self, label: str) -> dict[str, Any] | None:
        """One case as the JSON of ``intake cases show --json`` (DESIGN 6)."""
        number = parse_case_label(label)
        if number is None:
            return None
        with self._sessions() as s:
            case = s.scalars(select(Case).options(joinedload(Case.requester), joinedload(Case.organization))
                             .where(Case.number == number)).unique().first()
            if case is None:
                return None
            out = case_view(case).as_json()
            parts = s.scalars(select(Participant).where(Participant.case_id == case.id)).unique().all()
            out["participants"] = sorted({p.contact.address for p in parts})
            out["priority"] = case.priority
            out["resolution"] = case.resolution
            out["language"] = case.language
            out["brand"] = case.brand
            out["timeline"] = self._timeline(s, case.id)
            return out

    def _timeline(self, s: Session, case_id: int) -> list[dict[str, Any]]:
        events = s.scalars(select(Event).where(Event.case_id == case_id).order_by(Event.at, Event.id)).all()
        msg_ids = [e.message_row_id for e in events if e.message_row_id]
        messages = {m.id: m for m in s.scalars(select(MessageRow).where(MessageRow.id.in_(msg_ids)))} if msg_ids else {}
        atts: dict[int, list[AttachmentRow]] = {}
        if msg_ids:
            for a in s.scalars(select(AttachmentRow).where(AttachmentRow.message_row_id.in_(msg_ids)).order_by(AttachmentRow.id)):
                atts.setdefault(a.message_row_id, []).append(a)
        out = []
        for e in events:
            entry: dict[str, Any] = {"at": e.at.isoformat(), "type": e.type}
            m = messages.get(e.message_row_id) if e.message_row_id else None
            if m is not None:
                entry.update(
                    direction=m.direction,
                    visibility=m.visibility,
                    **{"from": m.from_address},
                    from_name=m.from_name,
                    to=list(m.to or []),
                    cc=list(m.cc or []),
                    subject=m.subject,
                    message_id=m.message_id,
                    text=m.text,
                    attachments=[
                        {"filename": a.filename, "size": a.size, "content_type": a.content_type,
                         "inline": a.inline, "sha256": a.sha256}
                        for a in atts.get(m.id, [])
                    ],
                )
            for k, v in (e.data or {}).items():
                entry.setdefault(k, v)
            out.append(entry)
        return out


RULES_STATE_KEY = "rules.state"
DATABASE_ID_KEY = "database.id"


def received_entry(rec: InboundRecord) -> dict[str, Any]:
    """The first entry of a processing log, read from the record's own columns."""
    entry: dict[str, Any] = {"at": rec.received_at.isoformat(), "step": "received", "channel": rec.channel,
                             "mailbox": rec.mailbox}
    if rec.source:
        entry["source"] = dict(rec.source)
    return entry


def _with_received(rec: InboundRecord) -> list[Any]:
    """The processing log with its ``received`` entry (records stored before this entry was
    read from the columns have it in the log already)."""
    log = list(rec.log or [])
    return log if log and log[0].get("step") == "received" else [received_entry(rec), *log]


def _error_text(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig if orig is not None else exc)


def parse_case_label(label: str) -> int | None:
    """``CASE-1042`` (any prefix) or ``1042`` → 1042."""
    tail = label.strip().rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


# ---------------------------------------------------------------------------------------
# The outbox


@dataclass(frozen=True)
class OutboxItem:
    """A plain view of one outbox row: what delivery and ``intake outbox list`` see."""

    id: int
    case: str | None
    template: str
    audience: str
    auto_submitted: str
    mail_from: str
    recipient: str
    recipients: list[str]
    message_id: str
    headers: list[list[str]]
    subject: str
    text: str
    html: str | None
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    give_up_at: datetime
    sent_at: datetime | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "case": self.case, "template": self.template, "audience": self.audience,
            "to": self.recipient, "recipients": list(self.recipients), "subject": self.subject,
            "message_id": self.message_id, "state": self.state, "attempts": self.attempts,
            "created_at": self.created_at.isoformat(), "next_attempt_at": self.next_attempt_at.isoformat(),
            "sent_at": self.sent_at.isoformat() if self.sent_at else None, "last_error": self.last_error,
        }


@dataclass(frozen=True)
class OutboxOutcome:
    """The result of one delivery attempt, applied by ``Store.finish_outbox``.

    ``state`` is ``sent``, ``queued`` (temporary failure: retry at ``next_attempt_at``)
    or ``failed``; ``refused`` maps recipients the relay refused permanently to its reply.
    """

    id: int
    state: str
    at: datetime
    error: str | None = None
    next_attempt_at: datetime | None = None
    permanent: bool = False
    refused: dict[str, str] | None = None
    suppress_until: datetime | None = None


def _outbox_item(row: OutboxRow, label: str | None) -> OutboxItem:
    return OutboxItem(
        id=row.id, case=label, template=row.template, audience=row.audience, auto_submitted=row.auto_submitted,
        mail_from=row.mail_from, recipient=row.recipient, recipients=list(row.recipients or []),
        message_id=row.message_id, headers=[list(h) for h in row.headers or []], subject=row.subject, text=row.text,
        html=row.html, state=row.state, attempts=row.attempts, created_at=row.created_at,
        next_attempt_at=row.next_attempt_at, give_up_at=row.give_up_at, sent_at=row.sent_at,
        last_error=row.last_error,
    )


def _labels(s: Session, case_ids: set[int]) -> dict[int, str]:
    if not case_ids:
        return {}
    return {cid: f"{prefix}-{number}" for cid, prefix, number in
            s.execute(select(Case.id, Case.prefix, Case.number).where(Case.id.in_(case_ids)))}


def claim_outbox(store: Store, now: datetime, limit: int) -> list[OutboxItem]:
    """Claim up to ``limit`` due rows for delivery (state ``sending``), oldest first.

    The claim is committed before anything is sent: a row is sent by one process only,
    and a crash after sending leaves it ``sending``, never ``queued`` (no second copy).
    """
    with store.session() as s:
        q = (select(OutboxRow).where(OutboxRow.state == OUT_QUEUED, OutboxRow.next_attempt_at <= now)
             .order_by(OutboxRow.next_attempt_at, OutboxRow.id).limit(limit))
        if s.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        rows = list(s.scalars(q))
        wall = utcnow()
        for r in rows:
            r.state = OUT_SENDING
            r.claimed_at = wall
            r.updated_at = wall
        labels = _labels(s, {r.case_id for r in rows if r.case_id})
        return [_outbox_item(r, labels.get(r.case_id)) for r in rows]  # type: ignore[arg-type]


def finish_outbox(store: Store, outcomes: Sequence[OutboxOutcome]) -> None:
    """Record delivery results in one transaction; failures go on the case timeline."""
    if not outcomes:
        return
    with store.flow() as tx:
        rows = tx.outbox_rows([o.id for o in outcomes])
        for o in outcomes:
            row = rows.get(o.id)
            if row is None or row.state != OUT_SENDING:
                continue
            changes: dict[str, Any] = {"attempts": row.attempts + 1, "updated_at": o.at, "last_error": o.error,
                                       "state": o.state}
            if o.state == OUT_SENT:
                changes["sent_at"] = changes["finished_at"] = o.at
                if row.message_row_id:
                    tx.set_message_sent(row.message_row_id, o.at)
            elif o.state == OUT_QUEUED:
                changes["next_attempt_at"] = o.next_attempt_at or o.at
            else:
                changes["finished_at"] = o.at
                changes["permanent"] = o.permanent
                if row.case_id is not None:
                    tx.add_event(row.case_id, "mail_failed", {"message_id": row.message_id, "to": row.recipient,
                                                              "template": row.template, "reply": o.error,
                                                              "permanent": o.permanent}, at=o.at)
                if o.permanent and o.suppress_until:
                    for addr in row.recipients or [row.recipient]:
                        tx.suppress(addr, o.suppress_until, f"outbox #{row.id}: {o.error}")
            tx.update_outbox(row.id, **changes)
            for addr, reply in (o.refused or {}).items():
                if row.case_id is not None:
                    tx.add_event(row.case_id, "mail_failed", {"message_id": row.message_id, "to": addr,
                                                              "template": row.template, "reply": reply,
                                                              "permanent": True}, at=o.at)
                if o.suppress_until:
                    tx.suppress(addr, o.suppress_until, f"outbox #{row.id}: {reply}")


def fail_interrupted_outbox(store: Store, claimed_before: datetime) -> list[int]:
    """Rows left ``sending`` by a process that stopped: marked failed, never resent by themselves.

    Whether the relay took such a mail is unknown; sending it again could deliver it
    twice, so an operator decides (``intake outbox retry ID``).
    """
    with store.flow() as tx:
        rows = tx.interrupted_outbox(claimed_before)
        now = utcnow()
        for row in rows:
            error = ("delivery was interrupted (the sending process stopped); not resent automatically "
                     "so that nobody gets it twice: `intake outbox retry %d` sends it" % row.id)
            tx.update_outbox(row.id, state=OUT_FAILED, finished_at=now, updated_at=now, last_error=error)
            if row.case_id is not None:
                tx.add_event(row.case_id, "mail_failed", {"message_id": row.message_id, "to": row.recipient,
                                                          "template": row.template, "reply": error,
                                                          "permanent": False}, at=now)
        return [r.id for r in rows]


def list_outbox(store: Store, *, state: str | None = None, case: str | None = None,
                limit: int | None = None) -> list[OutboxItem]:
    """Outbox rows, newest first."""
    with store._sessions() as s:
        q = select(OutboxRow).order_by(OutboxRow.id.desc())
        if state:
            q = q.where(OutboxRow.state == state)
        if case:
            number = parse_case_label(case)
            q = q.join(Case, Case.id == OutboxRow.case_id).where(Case.number == (number or -1))
        if limit:
            q = q.limit(limit)
        rows = list(s.scalars(q))
        labels = _labels(s, {r.case_id for r in rows if r.case_id})
        return [_outbox_item(r, labels.get(r.case_id)) for r in rows]  # type: ignore[arg-type]


def outbox_item(store: Store, outbox_id: int) -> OutboxItem | None:
    with store._sessions() as s:
        row = s.get(OutboxRow, outbox_id)
        if row is None:
            return None
        return _outbox_item(row, _labels(s, {row.case_id} if row.case_id else set()).get(row.case_id))  # type: ignore[arg-type]


def retry_outbox(store: Store, outbox_id: int, now: datetime, give_up_after: float) -> str | None:
    """Queue a failed (or still queued) row for delivery now; returns why not, or None."""
    with store.flow() as tx:
        row = tx.outbox_rows([outbox_id]).get(outbox_id)
        if row is None:
            return "no such outbox row"
        if row.state in (OUT_SENT, OUT_BOUNCED):
            return f"already {row.state} at {row.sent_at.isoformat() if row.sent_at else '?'}; a mail is never sent twice"
        if row.state == OUT_SENDING:
            return "being sent right now"
        tx.update_outbox(row.id, state=OUT_QUEUED, next_attempt_at=now,
                         give_up_at=now + timedelta(seconds=give_up_after), permanent=False, finished_at=None,
                         updated_at=now)
        if row.case_id is not None:
            tx.add_event(row.case_id, "note", {"text": f"outbox #{row.id} queued again by an operator",
                                               "message_id": row.message_id}, at=now)
        return None
