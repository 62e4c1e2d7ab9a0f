"""The schema, written once: SQLAlchemy table metadata.

The Alembic migrations build exactly this (``tests/test_migrations.py`` compares them), the
command line's queries are Core statements over these tables, and the hot path compiles
its statements from them once per dialect (``intake.db.sql``). ``REVISION`` is the
migration this code expects, so that a read command can check a database with one query
and without importing Alembic.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

from intake.db.base import db_text, read_time, sqlite_time

#: The newest migration (``intake/db/migrations/versions``); a test keeps the two equal.
REVISION = "0009"


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

    # On SQLite a timestamp is text. SQLAlchemy's generic conversion of it costs ~9 µs a
    # value, and the processing transaction writes a dozen per message: these write and
    # read the very same text ("2026-11-20 01:00:00.000000", UTC) directly.
    def bind_processor(self, dialect: Any) -> Any:
        if dialect.name == "sqlite":
            return _sqlite_text
        return super().bind_processor(dialect)

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        if dialect.name == "sqlite":
            return _sqlite_time
        return super().result_processor(dialect, coltype)


class MailText(TypeDecorator[str]):
    """Text that came from outside (a subject, a body, an error quoting them): NUL and lone
    surrogates become U+FFFD (``db_text``), on every database alike, so that PostgreSQL
    stores what SQLite stores. The raw message keeps the original bytes."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return db_text(value)


class MailString(TypeDecorator[str]):
    """A header field or address of a length-limited column (a Message-ID, a From): made
    storable like :class:`MailText`, and a longer value shortened the same way every time
    (``db_text`` with the length), so that lookups by it still match. Applies to the values
    compared with the column too (``WHERE message_id = ?``)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return db_text(value, self.impl.length)


def _sqlite_text(value: datetime | None) -> str | None:
    return sqlite_time(value) if value is not None else None


def _sqlite_time(value: str | None) -> datetime | None:
    return read_time(value) if value is not None else None


metadata = MetaData()


def _ts(name: str, nullable: bool = False, **kw: Any) -> Column[Any]:
    return Column(name, UTCDateTime(), nullable=nullable, **kw)


# -- inbound records (DESIGN 4: committed before anything is decided about them) ----------

inbound = Table(
    "inbound", metadata,
    Column("id", Integer, primary_key=True),
    _ts("received_at", index=True),
    Column("channel", String(20), nullable=False),
    Column("mailbox", String(320), nullable=False),
    Column("envelope_from", MailString(998)),
    Column("envelope_to", JSON, nullable=False),
    Column("source", JSON, nullable=False),
    Column("raw", LargeBinary),
    Column("raw_sha256", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("state", String(20), nullable=False),
    Column("message_id", MailString(998), index=True),
    Column("from_address", MailString(320)),
    Column("subject", MailText),
    Column("case_id", Integer, ForeignKey("cases.id")),
    Column("duplicate_of", Integer, ForeignKey("inbound.id")),
    _ts("processed_at", nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("error", MailText),
    Column("traceback", MailText),
    Column("log", JSON, nullable=False),
    Index("ix_inbound_state", "state", "id"),
)

#: The first inbound record of each Message-ID: the duplicate rule's single source.
message_keys = Table(
    "message_keys", metadata,
    Column("key", MailString(998), primary_key=True),
    Column("inbound_id", Integer, ForeignKey("inbound.id"), nullable=False),
    Column("case_id", Integer, ForeignKey("cases.id")),
)

# -- cases and what belongs to them ------------------------------------------------------

organizations = Table(
    "organizations", metadata,
    Column("id", Integer, primary_key=True),
    Column("domain", MailString(255), nullable=False, unique=True),
    Column("name", MailString(255), nullable=False),
    _ts("created_at"),
)

contacts = Table(
    "contacts", metadata,
    Column("id", Integer, primary_key=True),
    Column("address", MailString(320), nullable=False, unique=True),
    Column("name", MailString(255), nullable=False),
    Column("organization_id", Integer, ForeignKey("organizations.id")),
    Column("language", String(10)),
    _ts("created_at"),
)

cases = Table(
    "cases", metadata,
    Column("id", Integer, primary_key=True),
    Column("number", BigInteger, nullable=False, unique=True),
    Column("prefix", String(20), nullable=False),
    Column("subject", MailText, nullable=False),
    Column("requester_id", Integer, ForeignKey("contacts.id")),
    Column("organization_id", Integer, ForeignKey("organizations.id")),
    Column("status", String(20), nullable=False, index=True),
    Column("priority", String(10), nullable=False),
    Column("queue", String(100), index=True),
    Column("assignee", MailString(320)),
    Column("category", MailString(100)),  # an agent may set it by a mail command
    Column("channel", String(20), nullable=False),
    Column("mailbox", String(320)),
    Column("brand", String(100)),
    Column("language", String(10)),
    Column("resolution", MailText),
    Column("tags", JSON, nullable=False),
    Column("escalation_level", Integer, nullable=False),
    _ts("first_response_due", nullable=True),
    _ts("resolution_due", nullable=True),
    _ts("created_at"),
    _ts("updated_at"),
    _ts("first_response_at", nullable=True),
    _ts("resolved_at", nullable=True),
    _ts("closed_at", nullable=True),
    Column("linked_case_id", Integer, ForeignKey("cases.id")),
    # Merged into another case: later mail to this one's threads lands there (DESIGN 5).
    Column("merged_into_id", Integer),  # a case id (no foreign key: see migration 0007)
    # least_open assignment counts each agent's open cases for every new case.
    Index("ix_cases_assignee_status", "assignee", "status"),
)

#: Cases that belong together: ``related`` (linked by a person), ``follow-up`` (a reply to a
#: case closed too long ago), ``mentioned`` (a stranger named it), ``merged``.
case_links = Table(
    "case_links", metadata,
    Column("id", Integer, primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    Column("other_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    Column("kind", String(20), nullable=False),
    Column("actor", MailString(320)),
    _ts("created_at"),
    UniqueConstraint("case_id", "other_id", "kind", name="uq_case_links"),
)

participants = Table(
    "participants", metadata,
    Column("case_id", Integer, ForeignKey("cases.id"), primary_key=True),
    Column("contact_id", Integer, ForeignKey("contacts.id"), primary_key=True),
    Column("role", String(20), nullable=False),  # requester | cc | agent
)

#: A message on a case's timeline, incoming or outgoing.
messages = Table(
    "messages", metadata,
    Column("id", Integer, primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    Column("inbound_id", Integer, ForeignKey("inbound.id")),
    Column("direction", String(3), nullable=False),
    Column("visibility", String(10), nullable=False),
    Column("message_id", MailString(998), nullable=False, index=True),
    Column("from_address", MailString(320)),
    Column("from_name", MailString(255)),
    Column("to", JSON, nullable=False),
    Column("cc", JSON, nullable=False),
    Column("subject", MailText, nullable=False),
    Column("text", MailText, nullable=False),
    Column("html", MailText),
    _ts("sent_at", nullable=True),
    _ts("created_at"),
    Column("thread_index", MailString(64)),
)

#: Attachment content, stored once per SHA-256.
blobs = Table(
    "blobs", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

attachments = Table(
    "attachments", metadata,
    Column("id", Integer, primary_key=True),
    Column("message_row_id", Integer, ForeignKey("messages.id"), nullable=False, index=True),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False),
    Column("filename", MailText),
    Column("content_type", MailString(255), nullable=False),
    Column("size", Integer, nullable=False),
    Column("inline", Boolean, nullable=False),
    Column("content_id", MailString(998)),
)

#: One entry of a case's timeline (the audit trail), with who caused it.
events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), nullable=False, index=True),
    _ts("at"),
    Column("type", String(30), nullable=False),
    Column("actor", MailString(320)),
    Column("message_row_id", Integer, ForeignKey("messages.id")),
    Column("inbound_id", Integer, ForeignKey("inbound.id")),
    Column("data", JSON, nullable=False),
)

# -- the outbox ------------------------------------------------------------------------

#: One rendered outgoing mail, stored in the transaction of the change that caused it. The
#: MIME bytes are built at delivery, because the transfer encoding depends on the relay.
outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), index=True),
    Column("message_row_id", Integer, ForeignKey("messages.id")),
    Column("inbound_id", Integer, ForeignKey("inbound.id")),
    _ts("created_at"),
    _ts("updated_at"),
    Column("template", String(50), nullable=False),
    Column("audience", String(10), nullable=False),
    Column("auto_submitted", String(20), nullable=False),
    Column("language", String(10), nullable=False),
    Column("mail_from", MailString(320), nullable=False),  # envelope sender (the signed case address)
    Column("recipient", MailString(320), nullable=False),  # primary recipient, lower case
    Column("recipients", JSON, nullable=False),  # envelope RCPT TO
    Column("message_id", MailString(998), nullable=False, index=True),
    Column("headers", JSON, nullable=False),  # [[name, value], ...] in order
    Column("subject", MailText, nullable=False),
    Column("text", MailText, nullable=False),
    Column("html", MailText),
    Column("state", String(10), nullable=False),
    Column("attempts", Integer, nullable=False),
    _ts("next_attempt_at"),
    _ts("give_up_at"),
    # The claim of a sending process (a lease): who holds it, renewed while it sends.
    _ts("claimed_at", nullable=True),
    Column("claimed_by", String(200)),
    # How often an expired claim put the row back to queued (at most once: then failed).
    Column("requeued", Integer, nullable=False, server_default="0"),
    _ts("sent_at", nullable=True),
    _ts("finished_at", nullable=True),
    Column("permanent", Boolean, nullable=False),
    Column("last_error", MailText),
    Index("ix_outbox_due", "state", "next_attempt_at"),
    Index("ix_outbox_recipient", "recipient", "created_at"),
)

#: Files sent with an outgoing mail (an agent's reply, the customer's files in an agent notice).
outbox_attachments = Table(
    "outbox_attachments", metadata,
    Column("id", Integer, primary_key=True),
    Column("outbox_id", Integer, ForeignKey("outbox.id"), nullable=False, index=True),
    Column("sha256", String(64), ForeignKey("blobs.sha256"), nullable=False),
    Column("filename", MailText, nullable=False),
    Column("content_type", MailString(255), nullable=False),
    Column("size", Integer, nullable=False),
)

#: An address that gets no automated mail until ``until`` (after a bounce or a 5xx).
suppressions = Table(
    "suppressions", metadata,
    Column("address", MailString(320), primary_key=True),
    _ts("until"),
    Column("reason", MailText, nullable=False),
    _ts("created_at"),
)

# -- operations state ------------------------------------------------------------------

#: Named sequences that work alike everywhere (PostgreSQL numbers cases from a sequence).
counters = Table(
    "counters", metadata,
    Column("name", String(50), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

settings = Table(
    "settings", metadata,
    Column("key", String(100), primary_key=True),
    Column("value", MailText, nullable=False),
)

#: How often each routing rule matched (``intake rules stats``).
rule_stats = Table(
    "rule_stats", metadata,
    Column("name", String(200), primary_key=True),
    Column("hits", BigInteger, nullable=False),
    _ts("first_hit_at", nullable=True),
    _ts("last_hit_at", nullable=True),
)

#: Round-robin position of a queue: the agent assigned last.
queue_rotation = Table(
    "queue_rotation", metadata,
    Column("queue", String(100), primary_key=True),
    Column("last_agent", String(320)),
    _ts("updated_at", nullable=True),
)

#: What each running part (listener, poller, processor) last reported: ``intake status``.
component_status = Table(
    "component_status", metadata,
    Column("name", String(200), primary_key=True),
    Column("state", String(40), nullable=False),
    _ts("updated_at"),
    _ts("last_success_at", nullable=True),
    Column("backlog", Integer),
    Column("last_error", MailText),
    _ts("last_error_at", nullable=True),
    Column("details", JSON),  # e.g. the SMTP listener's refusals by reason
)

#: Where an IMAP poller stands in one folder: every UID up to ``last_uid`` is stored.
imap_state = Table(
    "imap_state", metadata,
    Column("account", String(200), primary_key=True),
    Column("folder", String(500), primary_key=True),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("last_uid", BigInteger, nullable=False),
    _ts("updated_at"),
)
