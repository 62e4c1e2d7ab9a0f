"""The store's hot paths in plain SQL: the edges' commit and the processing transaction.

``store.py`` owns the schema (SQLAlchemy models, Alembic migrations), the engine and
everything read or written now and then. Two paths run for every message: the edges'
commit of the raw bytes and the processing transaction (about twenty statements a
message). Through SQLAlchemy a statement costs ~50 µs of Python; on the driver's own
cursor ~3 µs. So these two paths run on the DBAPI connection that SQLAlchemy's pool hands
out (same PRAGMAs, same transaction handling), in SQL written once for SQLite and
PostgreSQL (``INSERT … RETURNING``, ``ON CONFLICT``), with the conversions SQLAlchemy would
make: UTC timestamps (text on SQLite, in SQLAlchemy's format), JSON as text.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# Inbound record states (DESIGN 4): received → processed | duplicate | dropped | quarantined
RECEIVED = "received"
PROCESSED = "processed"
DUPLICATE = "duplicate"
DROPPED = "dropped"
QUARANTINED = "quarantined"
INBOUND_STATES = (RECEIVED, PROCESSED, DUPLICATE, DROPPED, QUARANTINED)
UTC = timezone.utc


class StoreUnavailable(Exception):
    """The database cannot commit right now (locked, full, unreachable): retry later."""


class StoreBusy(StoreUnavailable):
    """Another writer holds SQLite's write lock right now (only from non-waiting attempts)."""


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def db_text(value: str | None) -> str | None:
    """Text the database can store. The SMTP edge keeps undecodable bytes of a command as
    lone surrogates (aiosmtpd's ``surrogateescape``: an 8-bit MAIL FROM or EHLO name);
    neither SQLite's driver nor PostgreSQL's takes them, so each becomes U+FFFD."""
    if value is None or value.isascii():
        return value
    return _LONE_SURROGATE.sub("\ufffd", value)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


class Dialect:
    """What differs between SQLite and PostgreSQL for plain SQL: placeholders and values."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pg = name == "postgresql"
        self._texts: dict[str, str] = {}

    def sql(self, text: str) -> str:
        """The statement in the driver's placeholder style (written with ``?``)."""
        out = self._texts.get(text)
        if out is None:
            out = self._texts[text] = text.replace("%", "%%").replace("?", "%s") if self.pg else text
        return out

    def ts(self, value: datetime | None) -> Any:
        """A timestamp for a bind: UTC; on SQLite the text SQLAlchemy writes (so both read alike)."""
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value if self.pg else value.replace(tzinfo=None).isoformat(" ", "microseconds")

    @staticmethod
    def read_ts(value: Any) -> datetime | None:
        """A timestamp as the driver returns it (text on SQLite), aware in UTC."""
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @staticmethod
    def read_json(value: Any) -> Any:
        """A JSON column's value (text on SQLite, already decoded on PostgreSQL)."""
        return json.loads(value) if isinstance(value, (str, bytes)) else value


# ---------------------------------------------------------------------------------------
# Committing received messages (every edge)

_INSERT_INBOUND = (
    "INSERT INTO inbound (received_at, channel, mailbox, envelope_from, envelope_to, source, raw, raw_sha256, size, "
    "state, attempts, log) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, '[]') RETURNING id"
)


def insert_inbound(cur: Any, d: Dialect, items: Sequence[tuple[bytes, dict[str, Any]]], now: datetime) -> list[int]:
    """Insert received messages (raw bytes, channel/mailbox/envelope/source, and
    ``received_at`` when it is not ``now``); their ids, in order.

    The processing log starts empty: its ``received`` entry is read from these columns.
    """
    sql = d.sql(_INSERT_INBOUND)
    at = d.ts(now)
    ids = []
    for raw, meta in items:
        received = meta.get("received_at")
        cur.execute(sql, (d.ts(received) if received else at, meta["channel"], meta["mailbox"],
                          db_text(meta.get("envelope_from")), db_text(_dumps(list(meta.get("envelope_to") or []))),
                          db_text(_dumps(dict(meta.get("source") or {}))),
                          raw, hashlib.sha256(raw).hexdigest(), len(raw), RECEIVED))
        ids.append(cur.fetchone()[0])
    return ids


# ---------------------------------------------------------------------------------------
# Plain rows of the flow


@dataclass
class InboundWork:
    """An inbound record being processed, as plain data; saved back by ``FlowTx.save_inbound``."""

    id: int
    raw: bytes | None
    state: str
    channel: str
    mailbox: str
    envelope_to: list[str]
    source: dict[str, Any]
    log: list[Any]
    attempts: int
    received_at: datetime | None = None
    message_id: str | None = None
    from_address: str | None = None
    subject: str | None = None
    case_id: int | None = None
    duplicate_of: int | None = None
    processed_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True)
class ContactRef:
    """A contact as the flow needs it: address, name, organization and language."""

    id: int
    address: str
    name: str
    organization_id: int | None
    language: str | None
    organization: str | None = None  # the organization's mail domain


@dataclass
class CaseRec:
    """A case as the flow reads and changes it (changes go through ``FlowTx.update_case``)."""

    id: int
    number: int
    prefix: str
    subject: str
    status: str
    priority: str
    queue: str | None
    assignee: str | None
    category: str | None
    channel: str
    mailbox: str | None
    brand: str | None
    language: str | None
    resolution: str | None
    tags: list[str]
    escalation_level: int
    first_response_due: datetime | None
    resolution_due: datetime | None
    created_at: datetime
    updated_at: datetime
    first_response_at: datetime | None
    resolved_at: datetime | None
    closed_at: datetime | None
    linked_case_id: int | None
    organization_id: int | None
    organization: str | None  # the organization's mail domain
    requester: ContactRef | None

    @property
    def label(self) -> str:
        """The case number as people write it (``CASE-12``)."""
        return f"{self.prefix}-{self.number}"


@dataclass(frozen=True)
class OutboxRef:
    """An outbox row as bounces and delivery results see it."""

    id: int
    state: str
    case_id: int | None
    message_row_id: int | None
    message_id: str
    recipient: str
    recipients: list[str]
    template: str
    attempts: int
    sent_at: datetime | None


@dataclass(frozen=True)
class SuppressionView:
    """An address our automated mail is not sent to (it bounced), and until when."""

    address: str
    until: datetime
    reason: str


# Columns of ``cases`` in CaseRec order (timestamps and JSON converted on read).
_CASE_COLUMNS = ("id", "number", "prefix", "subject", "status", "priority", "queue", "assignee", "category", "channel",
                 "mailbox", "brand", "language", "resolution", "tags", "escalation_level", "first_response_due",
                 "resolution_due", "created_at", "updated_at", "first_response_at", "resolved_at", "closed_at",
                 "linked_case_id", "organization_id")
_CASE_TS = frozenset({"first_response_due", "resolution_due", "created_at", "updated_at", "first_response_at",
                      "resolved_at", "closed_at"})
_CASE_SELECT = (
    "SELECT " + ", ".join(f"c.{c}" for c in _CASE_COLUMNS)
    + ", o.domain, r.id, r.address, r.name, r.organization_id, r.language, ro.domain FROM cases c"
    " LEFT JOIN organizations o ON o.id = c.organization_id LEFT JOIN contacts r ON r.id = c.requester_id"
    " LEFT JOIN organizations ro ON ro.id = r.organization_id"
)
_INBOUND_SAVED = ("state", "log", "attempts", "message_id", "from_address", "subject", "case_id", "duplicate_of",
                  "processed_at", "error")
_OUTBOX_REF = ("SELECT id, state, case_id, message_row_id, message_id, recipient, recipients, template, attempts, "
               "sent_at FROM outbox")
_OUTBOX_TS = frozenset({"created_at", "updated_at", "next_attempt_at", "give_up_at", "claimed_at", "sent_at",
                        "finished_at"})
_EVENT_INSERT = ("INSERT INTO events (case_id, at, type, message_row_id, inbound_id, data) VALUES (?, ?, ?, ?, ?, ?)")


class FlowTx:
    """One transaction of the processing flow, on the driver's cursor.

    Reads see this transaction's own writes at once (there is no unit of work to flush),
    except timeline entries, which are buffered and written in one statement per message
    (``flush_events``) since nothing in the flow reads them back.
    """

    def __init__(self, cur: Any, dialect: Dialect) -> None:
        self.cur = cur
        self.d = dialect
        self._events: list[tuple[Any, ...]] = []
        self._savepoints = 0

    # -- plumbing ------------------------------------------------------------------------

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self.cur.execute(self.d.sql(sql), params)
        return self.cur

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._exec(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._exec(sql, params).fetchall()

    @staticmethod
    def _marks(n: int) -> str:
        return ", ".join("?" * n)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: on an exception only its own writes are undone."""
        self._savepoints += 1
        name = f"m{self._savepoints}"
        self._exec(f"SAVEPOINT {name}")
        pending = len(self._events)
        try:
            yield
            self.flush_events()
        except BaseException:
            del self._events[pending:]
            self._exec(f"ROLLBACK TO SAVEPOINT {name}")
            self._exec(f"RELEASE SAVEPOINT {name}")
            raise
        self._exec(f"RELEASE SAVEPOINT {name}")

    # -- inbound records -----------------------------------------------------------------

    def inbound_states(self, ids: Sequence[int]) -> dict[int, tuple[str, list[Any], int]]:
        """(state, log, attempts) of the records, locked for this transaction.

        On PostgreSQL rows another process holds are skipped: that process works on them.
        """
        if not ids:
            return {}
        sql = f"SELECT id, state, log, attempts FROM inbound WHERE id IN ({self._marks(len(ids))})"
        if self.d.pg:
            sql += " FOR UPDATE SKIP LOCKED"
        return {r[0]: (r[1], list(self.d.read_json(r[2]) or []), r[3] or 0) for r in self._all(sql, list(ids))}

    def save_inbound(self, works: Sequence[InboundWork]) -> None:
        """Write the outcome of processed records back."""
        if not works:
            return
        sql = self.d.sql("UPDATE inbound SET " + ", ".join(f"{c} = ?" for c in _INBOUND_SAVED) + " WHERE id = ?")
        ts, js = self.d.ts, _dumps
        self.cur.executemany(sql, [(w.state, js(w.log), w.attempts, w.message_id, w.from_address, w.subject, w.case_id,
                                    w.duplicate_of, ts(w.processed_at), w.error, w.id) for w in works])

    def quarantine(self, inbound_id: int, error: str, tb: str, at: datetime) -> None:
        """Quarantine a record with its error; its raw bytes stay for ``quarantine retry``."""
        row = self._one("SELECT log, attempts FROM inbound WHERE id = ?", (inbound_id,))
        if row is None:
            return
        log = [*(self.d.read_json(row[0]) or []), {"at": at.isoformat(), "step": "quarantined", "error": error}]
        self._exec("UPDATE inbound SET state = ?, error = ?, traceback = ?, attempts = ?, processed_at = ?, log = ? "
                   "WHERE id = ?", (QUARANTINED, error, tb, (row[1] or 0) + 1, self.d.ts(at), _dumps(log), inbound_id))

    def setting(self, key: str) -> str | None:
        """A value of the settings table, None when unset."""
        row = self._one("SELECT value FROM settings WHERE key = ?", (key,))
        return row[0] if row else None

    def set_setting(self, key: str, value: str, *, replace: bool = True) -> None:
        """Store a setting; with ``replace=False`` an existing value stays."""
        self._exec("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO "
                   + ("UPDATE SET value = excluded.value" if replace else "NOTHING"), (key, value))

    # -- Message-ID registry (the duplicate rule) ------------------------------------------

    def claim_message_key(self, key: str, inbound_id: int) -> bool:
        """Register the first arrival of a Message-ID; False when another record has it."""
        row = self._one("INSERT INTO message_keys (key, inbound_id) VALUES (?, ?) ON CONFLICT DO NOTHING RETURNING key",
                        (key, inbound_id))
        return row is not None

    def message_key_owner(self, key: str) -> tuple[int, int | None] | None:
        """(first inbound id, its case id) of a registered Message-ID."""
        row = self._one("SELECT inbound_id, case_id FROM message_keys WHERE key = ?", (key,))
        return (row[0], row[1]) if row else None

    def set_message_key_case(self, key: str, case_id: int) -> None:
        """Point a Message-ID (or content) key at the case its message went to."""
        self._exec("UPDATE message_keys SET case_id = ? WHERE key = ?", (case_id, key))

    # -- cases ------------------------------------------------------------------------------

    def _case(self, where: str, value: Any) -> CaseRec | None:
        row = self._one(f"{_CASE_SELECT} WHERE {where}", (value,))
        if row is None:
            return None
        n = len(_CASE_COLUMNS)
        vals = dict(zip(_CASE_COLUMNS, row[:n]))
        for c in _CASE_TS:
            vals[c] = self.d.read_ts(vals[c])
        vals["tags"] = list(self.d.read_json(vals["tags"]) or [])
        rid, raddr, rname, rorg, rlang, rdomain = row[n + 1:n + 7]
        requester = ContactRef(rid, raddr, rname or "", rorg, rlang, rdomain) if rid is not None else None
        return CaseRec(**vals, organization=row[n], requester=requester)

    def case_by_number(self, number: int) -> CaseRec | None:
        """The case of a number, None when there is none."""
        return self._case("c.number = ?", number)

    def case_by_id(self, case_id: int) -> CaseRec | None:
        """The case of a row id, None when there is none."""
        return self._case("c.id = ?", case_id)

    def case_by_message_ids(self, ids: Sequence[str]) -> tuple[CaseRec, str] | None:
        """The case of the newest stored or sent message among ``ids``, and that id."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return None
        row = self._one(f"SELECT case_id, message_id FROM messages WHERE message_id IN ({self._marks(len(ids))}) "
                        "ORDER BY id DESC LIMIT 1", ids)
        if row is None:
            return None
        case = self.case_by_id(row[0])
        return (case, row[1]) if case else None

    def case_by_thread_index(self, prefix: str) -> CaseRec | None:
        """The case of the newest message with this Outlook Thread-Index prefix."""
        row = self._one("SELECT case_id FROM messages WHERE thread_index = ? ORDER BY id DESC LIMIT 1", (prefix,))
        return self.case_by_id(row[0]) if row else None

    def next_number(self, name: str = "case_number") -> int:
        """Next value of a named counter: a PostgreSQL sequence, or a counter row on SQLite."""
        if name == "case_number" and self.d.pg:
            # Not rolled back with the transaction, so other processes never wait on it.
            return int(self._one("SELECT nextval('case_number_seq')")[0])
        row = self._one("UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value", (name,))
        if row is None:
            self._exec("INSERT INTO counters (name, value) VALUES (?, 1)", (name,))
            return 1
        return int(row[0])

    def create_case(self, *, prefix: str, subject: str, requester: ContactRef | None, status: str, priority: str, queue: str | None, category: str | None, channel: str,
                    mailbox: str | None, brand: str | None, language: str | None, tags: list[str],
                    created_at: datetime) -> CaseRec:
        """A new case numbered from the installation's one sequence."""
        number = self.next_number()
        org_id = requester.organization_id if requester else None
        at = self.d.ts(created_at)
        case_id = self._one(
            "INSERT INTO cases (number, prefix, subject, requester_id, organization_id, status, priority, queue, "
            "category, channel, mailbox, brand, language, tags, escalation_level, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?) RETURNING id",
            (number, prefix, subject, requester.id if requester else None, org_id, status, priority, queue, category,
             channel, mailbox, brand, language, _dumps(list(tags)), at, at))[0]
        return CaseRec(id=case_id, number=number, prefix=prefix, subject=subject, status=status, priority=priority,
                       queue=queue, assignee=None, category=category, channel=channel, mailbox=mailbox, brand=brand,
                       language=language, resolution=None, tags=list(tags), escalation_level=0,
                       first_response_due=None, resolution_due=None, created_at=created_at, updated_at=created_at,
                       first_response_at=None, resolved_at=None, closed_at=None, linked_case_id=None,
                       organization_id=org_id, organization=requester.organization if requester else None,
                       requester=requester)

    def update_case(self, case: CaseRec, **changes: Any) -> None:
        """Change fields of a case, in the database and on ``case``."""
        if not changes:
            return
        params = []
        for k, v in changes.items():
            if k not in _CASE_COLUMNS or k in ("id", "number"):
                raise ValueError(f"not a changeable case field: {k}")
            params.append(self.d.ts(v) if k in _CASE_TS else _dumps(list(v)) if k == "tags" else v)
            setattr(case, k, list(v) if k == "tags" else v)
        self._exec(f"UPDATE cases SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?", (*params, case.id))

    def open_case_counts(self, agents: Sequence[str]) -> dict[str, int]:
        """Open (not resolved or closed) cases per assignee, across all queues."""
        if not agents:
            return {}
        rows = self._all(f"SELECT assignee, COUNT(id) FROM cases WHERE assignee IN ({self._marks(len(agents))}) "
                         "AND status IN ('new', 'open', 'pending') GROUP BY assignee", list(agents))
        return {a: int(n) for a, n in rows}

    # -- contacts and participants -------------------------------------------------------------

    def _organization_id(self, domain: str) -> int:
        row = self._one("SELECT id FROM organizations WHERE domain = ?", (domain,))
        if row is None:
            # Another process may make the same one at once: then its row is the one.
            row = self._one("INSERT INTO organizations (domain, name, created_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (domain) DO NOTHING RETURNING id", (domain, domain, self.d.ts(utcnow())))
            row = row or self._one("SELECT id FROM organizations WHERE domain = ?", (domain,))
        return int(row[0])

    def contact(self, address: str, name: str, organization_domain: str | None) -> ContactRef:
        """The contact of an address (lower-cased), made on first sight; its name filled in when first known."""
        address = address.lower()
        select = ("SELECT c.id, c.name, c.organization_id, c.language, o.domain FROM contacts c "
                  "LEFT JOIN organizations o ON o.id = c.organization_id WHERE c.address = ?")
        row = self._one(select, (address,))
        if row is None:
            org_id = self._organization_id(organization_domain) if organization_domain else None
            made = self._one("INSERT INTO contacts (address, name, organization_id, created_at) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT (address) DO NOTHING RETURNING id",
                             (address, name or "", org_id, self.d.ts(utcnow())))
            if made is not None:
                return ContactRef(int(made[0]), address, name or "", org_id, None,
                                  organization_domain if org_id else None)
            row = self._one(select, (address,))  # another process made it at once
        if name and not row[1]:
            self._exec("UPDATE contacts SET name = ? WHERE id = ? AND name = ''", (name, row[0]))
        return ContactRef(int(row[0]), address, row[1] or name or "", row[2], row[3], row[4])

    def add_participant(self, case_id: int, contact: ContactRef, role: str) -> None:
        """Add a contact to a case's participants (once; the first role stays)."""
        self._exec("INSERT INTO participants (case_id, contact_id, role) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                   (case_id, contact.id, role))

    def participant_addresses(self, case_id: int) -> set[str]:
        """The addresses of a case's participants."""
        return {r[0] for r in self._all("SELECT c.address FROM participants p JOIN contacts c ON c.id = p.contact_id "
                                        "WHERE p.case_id = ?", (case_id,))}

    def participant_rows(self, case_id: int) -> list[tuple[str, str, str]]:
        """(address, name, role) of a case's participants."""
        return [(a, n or "", r) for a, n, r in self._all(
            "SELECT c.address, c.name, p.role FROM participants p JOIN contacts c ON c.id = p.contact_id "
            "WHERE p.case_id = ? ORDER BY c.id", (case_id,))]

    # -- messages, attachments and the timeline ------------------------------------------------

    def add_message(self, case_id: int, *, direction: str, visibility: str, message_id: str,
                    from_address: str | None, from_name: str | None, to: list[str], cc: list[str], subject: str,
                    text: str, html: str | None, sent_at: datetime | None, inbound_id: int | None = None,
                    thread_index: str | None = None, attachments: Sequence[Any] = ()) -> int:
        """Store a message on a case; attachment content is stored once per SHA-256. Returns its id."""
        ts = self.d.ts
        row_id = int(self._one(
            'INSERT INTO messages (case_id, inbound_id, direction, visibility, message_id, from_address, from_name, '
            '"to", cc, subject, text, html, sent_at, created_at, thread_index) '
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (case_id, inbound_id, direction, visibility, message_id, from_address, from_name, _dumps(to), _dumps(cc),
             subject, text, html, ts(sent_at), ts(utcnow()), thread_index))[0])
        for a in attachments:
            if self._one("SELECT 1 FROM blobs WHERE sha256 = ?", (a.sha256,)) is None:
                self._exec("INSERT INTO blobs (sha256, size, data) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                           (a.sha256, a.size, a.payload))
            self._exec("INSERT INTO attachments (message_row_id, sha256, filename, content_type, size, inline, "
                       "content_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (row_id, a.sha256, a.display_name, a.content_type, a.size, bool(a.inline), a.content_id))
        return row_id

    def case_public_messages(self, case_id: int, limit: int = 50) -> list[tuple[str, str, str | None]]:
        """(Message-ID, direction, from address) of a case's public messages, oldest first (for References)."""
        rows = self._all("SELECT message_id, direction, from_address FROM messages WHERE case_id = ? AND "
                         "visibility = 'public' ORDER BY id DESC LIMIT ?", (case_id, limit))
        return [(m, d, f.lower() if f else None) for m, d, f in reversed(rows)]

    def count_inbound_messages(self, case_id: int, since: datetime) -> int:
        """Messages that came in on a case since ``since``."""
        return int(self._one("SELECT COUNT(id) FROM messages WHERE case_id = ? AND direction = 'in' AND "
                             "created_at >= ?", (case_id, self.d.ts(since)))[0])

    def add_event(self, case_id: int, type_: str, data: dict[str, Any] | None = None, *,
                  message_row: int | None = None, inbound_id: int | None = None, at: datetime | None = None) -> None:
        """Append an entry to a case's timeline (written at the next ``flush_events``)."""
        self._events.append((case_id, self.d.ts(at or utcnow()), type_, message_row, inbound_id, _dumps(data or {})))

    def flush_events(self) -> None:
        """Write the buffered timeline entries in one statement."""
        if self._events:
            self.cur.executemany(self.d.sql(_EVENT_INSERT), self._events)
            self._events.clear()

    # -- routing records -----------------------------------------------------------------------

    def record_rule_hits(self, names: Sequence[str], at: datetime) -> None:
        """Count one hit for each rule name."""
        ts = self.d.ts(at)
        for name in dict.fromkeys(names):
            self._exec("INSERT INTO rule_stats (name, hits, first_hit_at, last_hit_at) VALUES (?, 1, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET hits = rule_stats.hits + 1, "
                       "last_hit_at = excluded.last_hit_at", (name, ts, ts))

    def rotation_last(self, queue: str) -> str | None:
        """The agent a queue's round robin assigned last; the row is locked on PostgreSQL."""
        self._exec("INSERT INTO queue_rotation (queue) VALUES (?) ON CONFLICT DO NOTHING", (queue,))
        row = self._one("SELECT last_agent FROM queue_rotation WHERE queue = ?" + (" FOR UPDATE" if self.d.pg else ""),
                        (queue,))
        return row[0] if row else None

    def set_rotation_last(self, queue: str, agent: str, at: datetime) -> None:
        """Record the agent a queue's round robin gave the last case to."""
        self._exec("UPDATE queue_rotation SET last_agent = ?, updated_at = ? WHERE queue = ?",
                   (agent, self.d.ts(at), queue))

    # -- IMAP folder positions ---------------------------------------------------------------

    def set_imap_state(self, account: str, folder: str, uidvalidity: int, last_uid: int) -> None:
        """Where a poller stands in a folder: every UID up to ``last_uid`` is stored."""
        self._exec("INSERT INTO imap_state (account, folder, uidvalidity, last_uid, updated_at) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT (account, folder) DO UPDATE SET uidvalidity = excluded.uidvalidity, "
                   "last_uid = excluded.last_uid, updated_at = excluded.updated_at",
                   (account, folder, uidvalidity, last_uid, self.d.ts(utcnow())))

    # -- the outbox and suppressions --------------------------------------------------------------

    def add_outbox(self, **fields: Any) -> int:
        """Queue one rendered mail; returns the outbox row's id."""
        ts, js = self.d.ts, _dumps
        values = {k: ts(v) if isinstance(v, datetime) else js(v) if isinstance(v, (list, dict)) else v
                  for k, v in fields.items()}
        values.setdefault("permanent", False)
        cols = list(values)
        return int(self._one(f"INSERT INTO outbox ({', '.join(cols)}) VALUES ({self._marks(len(cols))}) RETURNING id",
                             list(values.values()))[0])

    def count_outbox(self, *, since: datetime, template: str | None = None, recipient: str | None = None,
                     case_id: int | None = None, audience: str | None = None) -> int:
        """How many mails were queued since ``since`` (any state), by template/recipient/case."""
        where, params = ["created_at >= ?"], [self.d.ts(since)]
        for col, value in (("template", template), ("recipient", recipient.lower() if recipient else None),
                           ("case_id", case_id), ("audience", audience)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        return int(self._one(f"SELECT COUNT(id) FROM outbox WHERE {' AND '.join(where)}", params)[0])

    def _outbox_refs(self, where: str, params: Sequence[Any]) -> list[OutboxRef]:
        return [OutboxRef(r[0], r[1], r[2], r[3], r[4], r[5], list(self.d.read_json(r[6]) or []), r[7], r[8] or 0,
                          self.d.read_ts(r[9]))
                for r in self._all(f"{_OUTBOX_REF} WHERE {where}", params)]

    def outbox_rows(self, ids: Sequence[int]) -> dict[int, OutboxRef]:
        """Outbox rows by id."""
        if not ids:
            return {}
        return {r.id: r for r in self._outbox_refs(f"id IN ({self._marks(len(ids))})", list(ids))}

    def outbox_by_message_ids(self, ids: Sequence[str]) -> list[OutboxRef]:
        """Outbox rows whose Message-ID is one of ``ids`` (bounces name them)."""
        if not ids:
            return []
        return self._outbox_refs(f"message_id IN ({self._marks(len(ids))})", list(ids))

    def outbox_for_case(self, case_id: int, *, states: Sequence[str]) -> list[OutboxRef]:
        """A case's outbox rows in the given states, newest first."""
        return self._outbox_refs(f"case_id = ? AND state IN ({self._marks(len(states))}) ORDER BY id DESC",
                                 (case_id, *states))

    def interrupted_outbox(self, claimed_before: datetime) -> list[OutboxRef]:
        """Rows left ``sending`` by a process that stopped before ``claimed_before``."""
        return self._outbox_refs("state = 'sending' AND claimed_at < ?", (self.d.ts(claimed_before),))

    def update_outbox(self, outbox_id: int, **changes: Any) -> None:
        """Change columns of an outbox row (timestamps converted for the driver)."""
        params = [self.d.ts(v) if k in _OUTBOX_TS else v for k, v in changes.items()]
        self._exec(f"UPDATE outbox SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?", (*params, outbox_id))

    def set_message_sent(self, message_row_id: int, at: datetime) -> None:
        """Record when an outgoing message was handed to the relay."""
        self._exec("UPDATE messages SET sent_at = ? WHERE id = ?", (self.d.ts(at), message_row_id))

    def suppression(self, address: str, now: datetime) -> SuppressionView | None:
        """The active suppression of an address, if any."""
        row = self._one("SELECT address, until, reason FROM suppressions WHERE address = ?", (address.lower(),))
        if row is None:
            return None
        until = self.d.read_ts(row[1])
        assert until is not None
        return SuppressionView(row[0], until, row[2]) if until > now else None

    def suppress(self, address: str, until: datetime, reason: str) -> None:
        """No automated mail to ``address`` until ``until`` (an existing later date stays)."""
        self._exec("INSERT INTO suppressions (address, until, reason, created_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (address) DO UPDATE SET until = excluded.until, reason = excluded.reason "
                   "WHERE suppressions.until < excluded.until",
                   (address.lower(), self.d.ts(until), reason, self.d.ts(utcnow())))
