"""Storage: SQLAlchemy models, migrations and the transactions of the flow.

The only module that imports SQLAlchemy. SQLite (WAL, durable commits) by default;
PostgreSQL for several processes. The schema is created and changed by the Alembic
migrations in ``intake/migrations``; ``upgrade()`` applies them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
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
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

# Inbound record states (DESIGN 4): received → processed | duplicate | dropped | quarantined
RECEIVED = "received"
PROCESSED = "processed"
DUPLICATE = "duplicate"
DROPPED = "dropped"
QUARANTINED = "quarantined"
INBOUND_STATES = (RECEIVED, PROCESSED, DUPLICATE, DROPPED, QUARANTINED)


class StoreUnavailable(Exception):
    """The database cannot commit right now (locked, full, unreachable): retry later."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    organization: Mapped[Organization | None] = relationship(lazy="joined")


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
    requester: Mapped[Contact | None] = relationship(lazy="joined", foreign_keys=[requester_id])
    organization: Mapped[Organization | None] = relationship(lazy="joined", foreign_keys=[organization_id])

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
    message_row_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    inbound_id: Mapped[int | None] = mapped_column(ForeignKey("inbound.id"))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Counter(Base):
    """Named sequences that work alike on SQLite and PostgreSQL (row-locked increment)."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


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


def make_engine(url: str) -> Engine:
    """An engine with the connection settings intake relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns; `250` depends on that.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

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
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
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
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writers = sessionmaker(self.engine.execution_options(writer=True), expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

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
        with self._writers() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

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
        try:
            with self.session() as s:
                if imap_mark is not None:
                    _set_imap_state(s, imap_mark)
                rows = [
                    InboundRecord(
                        raw=raw,
                        raw_sha256=hashlib.sha256(raw).hexdigest(),
                        size=len(raw),
                        state=RECEIVED,
                        channel=meta["channel"],
                        mailbox=meta["mailbox"],
                        envelope_from=meta.get("envelope_from"),
                        envelope_to=list(meta.get("envelope_to") or []),
                        source=dict(meta.get("source") or {}),
                        log=[{"at": utcnow().isoformat(), "step": "received", "channel": meta["channel"],
                              "mailbox": meta["mailbox"], **({"source": meta["source"]} if meta.get("source") else {})}],
                    )
                    for raw, meta in items
                ]
                s.add_all(rows)
                s.flush()
                return [r.id for r in rows]
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc

    def pending_inbound(self, limit: int = 1000, after_id: int = 0) -> list[int]:
        """Ids of records still ``received`` (not yet processed), oldest first."""
        with self._sessions() as s:
            return list(
                s.scalars(
                    select(InboundRecord.id)
                    .where(InboundRecord.state == RECEIVED, InboundRecord.id > after_id)
                    .order_by(InboundRecord.id)
                    .limit(limit)
                )
            )

    def count_inbound(self, state: str | None = None) -> int:
        with self._sessions() as s:
            q = select(func.count(InboundRecord.id))
            if state:
                q = q.where(InboundRecord.state == state)
            return int(s.scalar(q) or 0)

    def inbound_raw(self, inbound_id: int) -> bytes | None:
        with self._sessions() as s:
            return s.scalar(select(InboundRecord.raw).where(InboundRecord.id == inbound_id))

    def quarantine(self, inbound_id: int, error: str, tb: str) -> None:
        """Mark a record quarantined with its error (outside the failed transaction)."""
        with self.session() as s:
            rec = s.get(InboundRecord, inbound_id)
            if rec is None:
                return
            rec.state = QUARANTINED
            rec.error = error
            rec.traceback = tb
            rec.attempts = (rec.attempts or 0) + 1
            rec.processed_at = utcnow()
            rec.log = [*(rec.log or []), {"at": utcnow().isoformat(), "step": "quarantined", "error": error}]

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
                      success: bool = False) -> None:
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
        except IntegrityError:
            # Another process inserted the same name at once: ours is the newer report.
            self.report_status(name, state, backlog=backlog, error=error, success=success)
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc

    def statuses(self) -> list[StatusView]:
        """Every component's last report, by name."""
        with self._sessions() as s:
            return [StatusView(r.name, r.state, r.updated_at, r.last_success_at, r.backlog, r.last_error,
                               r.last_error_at)
                    for r in s.scalars(select(ComponentStatus).order_by(ComponentStatus.name))]

    def imap_state(self, account: str, folder: str) -> ImapMark | None:
        """The stored position of a poller in a folder, if it has one."""
        with self._sessions() as s:
            row = s.get(ImapFolderState, (account, folder))
            return ImapMark(account, folder, row.uidvalidity, row.last_uid) if row else None

    def set_imap_state(self, mark: ImapMark) -> None:
        """Store a poller's folder position (e.g. a new UIDVALIDITY with ``last_uid = 0``)."""
        try:
            with self.session() as s:
                _set_imap_state(s, mark)
        except OperationalError as exc:
            raise StoreUnavailable(str(exc.orig) if exc.orig else str(exc)) from exc

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

    # -- reading cases ----------------------------------------------------------------

    def list_cases(self, *, queue: str | None = None, status: str | None = None, limit: int | None = None) -> list[CaseView]:
        with self._sessions() as s:
            q = select(Case).order_by(Case.number)
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
            case = s.scalars(select(Case).where(Case.number == number)).unique().first()
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


def _set_imap_state(s: Session, mark: ImapMark) -> None:
    row = s.get(ImapFolderState, (mark.account, mark.folder))
    if row is None:
        s.add(ImapFolderState(account=mark.account, folder=mark.folder, uidvalidity=mark.uidvalidity,
                              last_uid=mark.last_uid, updated_at=utcnow()))
    else:
        row.uidvalidity = mark.uidvalidity
        row.last_uid = mark.last_uid
        row.updated_at = utcnow()


def parse_case_label(label: str) -> int | None:
    """``CASE-1042`` (any prefix) or ``1042`` → 1042."""
    tail = label.strip().rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def next_number(s: Session, name: str = "case_number") -> int:
    """Next value of a named counter inside the caller's transaction."""
    res = s.execute(update(Counter).where(Counter.name == name).values(value=Counter.value + 1).returning(Counter.value))
    value = res.scalar()
    if value is None:
        s.add(Counter(name=name, value=1))
        s.flush()
        return 1
    return int(value)


# ---------------------------------------------------------------------------------------
# Operations of the flow, inside the caller's transaction (``with store.session() as s``)


def load_inbound(s: Session, inbound_id: int, *, lock: bool = True) -> InboundRecord | None:
    """The record to process; on PostgreSQL locked so that one process takes it."""
    q = select(InboundRecord).where(InboundRecord.id == inbound_id).options()
    if lock and s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rec = s.scalars(q).first()
    if rec is not None:
        s.refresh(rec, ["raw"])
    return rec


def message_key_owner(s: Session, key: str) -> MessageKey | None:
    return s.get(MessageKey, key)


def claim_message_key(s: Session, key: str, inbound_id: int) -> bool:
    """Register the first arrival of a Message-ID; False when another record has it."""
    try:
        with s.begin_nested():
            s.add(MessageKey(key=key, inbound_id=inbound_id))
    except IntegrityError:
        return False
    return True


def case_by_number(s: Session, number: int) -> Case | None:
    return s.scalars(select(Case).where(Case.number == number)).unique().first()


def case_by_id(s: Session, case_id: int) -> Case | None:
    return s.get(Case, case_id)


def case_by_message_ids(s: Session, ids: Sequence[str]) -> tuple[Case, str] | None:
    """The case of the newest stored or sent message among ``ids``."""
    if not ids:
        return None
    row = s.execute(
        select(MessageRow.case_id, MessageRow.message_id)
        .where(MessageRow.message_id.in_(list(ids)))
        .order_by(MessageRow.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    case = s.get(Case, row[0])
    return (case, row[1]) if case else None


def case_by_thread_index(s: Session, prefix: str) -> Case | None:
    row = s.execute(
        select(MessageRow.case_id).where(MessageRow.thread_index == prefix).order_by(MessageRow.id.desc()).limit(1)
    ).first()
    return s.get(Case, row[0]) if row else None


def participant_addresses(s: Session, case_id: int) -> set[str]:
    rows = s.execute(
        select(Contact.address).join(Participant, Participant.contact_id == Contact.id).where(Participant.case_id == case_id)
    )
    return {r[0] for r in rows}


def get_or_create_organization(s: Session, domain: str) -> Organization:
    org = s.scalars(select(Organization).where(Organization.domain == domain)).first()
    if org is None:
        org = Organization(domain=domain, name=domain)
        s.add(org)
        s.flush()
    return org


def get_or_create_contact(s: Session, address: str, name: str, organization_domain: str | None) -> Contact:
    """The contact of an address (lower-cased); its name is filled in when first known."""
    address = address.lower()
    contact = s.scalars(select(Contact).where(Contact.address == address)).unique().first()
    if contact is None:
        org = get_or_create_organization(s, organization_domain) if organization_domain else None
        contact = Contact(address=address, name=name or "", organization=org)
        s.add(contact)
        s.flush()
    elif name and not contact.name:
        contact.name = name
    return contact


def add_participant(s: Session, case: Case, contact: Contact, role: str) -> None:
    if s.get(Participant, (case.id, contact.id)) is None:
        s.add(Participant(case_id=case.id, contact_id=contact.id, role=role))


def create_case(s: Session, *, prefix: str, **fields: Any) -> Case:
    """A new case numbered from the installation's one sequence."""
    case = Case(number=next_number(s), prefix=prefix, **fields)
    s.add(case)
    s.flush()
    return case


def add_message(
    s: Session,
    case: Case,
    *,
    direction: str,
    visibility: str,
    message_id: str,
    from_address: str | None,
    from_name: str | None,
    to: list[str],
    cc: list[str],
    subject: str,
    text: str,
    html: str | None,
    sent_at: datetime | None,
    inbound_id: int | None = None,
    thread_index: str | None = None,
    attachments: Sequence[Any] = (),
) -> MessageRow:
    """Store a message on a case; attachment content is stored once per SHA-256."""
    row = MessageRow(
        case_id=case.id, inbound_id=inbound_id, direction=direction, visibility=visibility, message_id=message_id,
        from_address=from_address, from_name=from_name, to=to, cc=cc, subject=subject, text=text, html=html,
        sent_at=sent_at, thread_index=thread_index,
    )
    s.add(row)
    s.flush()
    for a in attachments:
        if s.get(Blob, a.sha256) is None:
            s.add(Blob(sha256=a.sha256, size=a.size, data=a.payload))
            s.flush()
        s.add(AttachmentRow(message_row_id=row.id, sha256=a.sha256, filename=a.filename, content_type=a.content_type,
                            size=a.size, inline=a.inline, content_id=a.content_id))
    return row


def add_event(
    s: Session,
    case: Case,
    type_: str,
    data: dict[str, Any] | None = None,
    *,
    message_row: MessageRow | None = None,
    inbound_id: int | None = None,
    at: datetime | None = None,
) -> Event:
    ev = Event(case_id=case.id, type=type_, data=data or {}, message_row_id=message_row.id if message_row else None,
               inbound_id=inbound_id, at=at or utcnow())
    s.add(ev)
    return ev
