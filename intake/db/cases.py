"""Cases and what belongs to them: contacts, organizations, participants, messages,
attachments and the timeline. Rows only: what a change means is ``intake.cases``."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.engine import Connection
from sqlalchemy import bindparam, func, literal, or_, select, update
from sqlalchemy.sql import Select

from intake.db import schema as s
from intake.db.base import utcnow
from intake.db.sql import Sql, Statement
from intake.states import OPEN_STATUSES, Direction, Visibility


c, ct, org, p, m, ev = s.cases, s.contacts, s.organizations, s.participants, s.messages, s.events


@dataclass(frozen=True)
class ContactRef:
    """A contact: address, name, organization and language."""

    id: int
    address: str
    name: str
    organization_id: int | None
    language: str | None
    organization: str | None = None  # the organization's mail domain


@dataclass
class CaseRec:
    """A case as it is stored; changed through ``intake.cases`` only."""

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
    merged_into_id: int | None
    organization_id: int | None
    organization: str | None  # the organization's mail domain
    requester: ContactRef | None

    @property
    def label(self) -> str:
        """The case number as people write it (``CASE-12``)."""
        return f"{self.prefix}-{self.number}"

    def as_json(self) -> dict[str, Any]:
        """The public shape of ``intake cases list --json`` (DESIGN 6; add keys only)."""
        return {
            "number": self.label, "subject": self.subject, "status": self.status, "priority": self.priority,
            "queue": self.queue, "category": self.category, "assignee": self.assignee,
            "requester": self.requester.address if self.requester else None,
            "requester_name": (self.requester.name or None) if self.requester else None,
            "organization": self.organization, "channel": self.channel, "mailbox": self.mailbox,
            "tags": list(self.tags), "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            **{k: (v.isoformat() if v else None) for k, v in (
                ("first_response_at", self.first_response_at), ("resolved_at", self.resolved_at),
                ("closed_at", self.closed_at))},
        }


class StoredAttachment(Protocol):
    """What ``add_message`` needs of an attachment (a parsed one, or one an agent sends)."""

    sha256: str
    size: int
    payload: bytes
    display_name: str
    content_type: str
    inline: bool
    content_id: str | None


@dataclass(frozen=True)
class AttachmentView:
    """A stored attachment of a case (``intake attachments list``)."""

    id: int
    message_row_id: int
    filename: str | None
    content_type: str
    size: int
    inline: bool
    sha256: str
    direction: str
    from_address: str | None
    at: datetime


#: Fields of a case that change after it was opened (``CaseRepo.update``).
CHANGEABLE = frozenset({
    "subject", "status", "priority", "queue", "assignee", "category", "language", "resolution", "tags",
    "escalation_level", "first_response_due", "resolution_due", "updated_at", "first_response_at",
    "resolved_at", "closed_at", "linked_case_id", "merged_into_id",
})

ro = org.alias("ro")
_CASE_COLUMNS = [c.c[n] for n in ("id", "number", "prefix", "subject", "status", "priority", "queue", "assignee",
                                  "category", "channel", "mailbox", "brand", "language", "resolution", "tags",
                                  "escalation_level", "first_response_due", "resolution_due", "created_at",
                                  "updated_at", "first_response_at", "resolved_at", "closed_at", "linked_case_id",
                                  "merged_into_id", "organization_id")]
_N = len(_CASE_COLUMNS)


def _case_select() -> Select[Any]:
    return (select(*_CASE_COLUMNS, org.c.domain, ct.c.id, ct.c.address, ct.c.name, ct.c.organization_id,
                   ct.c.language, ro.c.domain)
            .select_from(c.outerjoin(org, org.c.id == c.c.organization_id).outerjoin(ct, ct.c.id == c.c.requester_id)
                         .outerjoin(ro, ro.c.id == ct.c.organization_id)))


_TAGS = [col.name for col in _CASE_COLUMNS].index("tags")


def case_of(row: Sequence[Any]) -> CaseRec:
    """A ``CaseRec`` from a row of :func:`_case_select` (its columns are in CaseRec's order)."""
    values = list(row[:_N])
    values[_TAGS] = list(values[_TAGS] or [])
    rid, raddr, rname, rorg, rlang, rdomain = row[_N + 1:_N + 7]
    requester = ContactRef(rid, raddr, rname or "", rorg, rlang, rdomain) if rid is not None else None
    return CaseRec(*values, row[_N], requester)


_BY_NUMBER = Statement(lambda k: _case_select().where(c.c.number == bindparam("n")))
_BY_ID = Statement(lambda k: _case_select().where(c.c.id == bindparam("cid")))
_BY_MESSAGE_ID = Statement(lambda k: select(m.c.id, m.c.case_id).where(m.c.message_id == bindparam("mid"))
                           .order_by(m.c.id.desc()).limit(1))
_BY_THREAD_INDEX = Statement(lambda k: select(m.c.case_id).where(m.c.thread_index == bindparam("ti"))
                             .order_by(m.c.id.desc()).limit(1))
_NEXTVAL = Statement(lambda k: select(func.nextval("case_number_seq")))
_COUNTER_UP = Statement(lambda k: update(s.counters).where(s.counters.c.name == bindparam("name"))
                        .values(value=s.counters.c.value + 1).returning(s.counters.c.value))
_COUNTER_NEW = Statement(lambda k: k.insert(s.counters).values(name=bindparam("name"), value=1))
_CREATE = Statement(lambda k: k.insert(c).values(
    **{n: bindparam(n) for n in ("number", "prefix", "subject", "requester_id", "organization_id", "status",
                                 "priority", "queue", "category", "channel", "mailbox", "brand", "language", "tags",
                                 "created_at", "updated_at")}, escalation_level=0).returning(c.c.id))
_ORG = Statement(lambda k: select(org.c.id).where(org.c.domain == bindparam("domain")))
_ORG_NEW = Statement(lambda k: k.insert(org).values(domain=bindparam("domain"), name=bindparam("domain"),
                                                    created_at=bindparam("at"))
                     .on_conflict_do_nothing().returning(org.c.id))
_CONTACT = Statement(lambda k: select(ct.c.id, ct.c.name, ct.c.organization_id, ct.c.language, org.c.domain)
                     .select_from(ct.outerjoin(org, org.c.id == ct.c.organization_id))
                     .where(ct.c.address == bindparam("address")))
_CONTACT_NEW = Statement(lambda k: k.insert(ct).values(
    address=bindparam("address"), name=bindparam("name"), organization_id=bindparam("org_id"),
    created_at=bindparam("at")).on_conflict_do_nothing().returning(ct.c.id))
_CONTACT_NAME = Statement(lambda k: update(ct).where(ct.c.id == bindparam("cid"), ct.c.name == "")
                          .values(name=bindparam("name")))
_PARTICIPANT = Statement(lambda k: k.insert(p).values(case_id=bindparam("case_id"), contact_id=bindparam("contact_id"),
                                                      role=bindparam("role")).on_conflict_do_nothing())
_PARTICIPANTS = Statement(lambda k: select(ct.c.address, ct.c.name, p.c.role)
                          .select_from(p.join(ct, ct.c.id == p.c.contact_id))
                          .where(p.c.case_id == bindparam("case_id")).order_by(ct.c.id))
_MESSAGE = Statement(lambda k: k.insert(m).values(
    **{n: bindparam(n) for n in ("case_id", "inbound_id", "direction", "visibility", "message_id", "from_address",
                                 "from_name", "to", "cc", "subject", "text", "html", "sent_at", "created_at",
                                 "thread_index")}).returning(m.c.id))
_BLOB_KNOWN = Statement(lambda k: select(s.blobs.c.size).where(s.blobs.c.sha256 == bindparam("sha256")))
_BLOB = Statement(lambda k: k.insert(s.blobs).values(sha256=bindparam("sha256"), size=bindparam("size"),
                                                     data=bindparam("data")).on_conflict_do_nothing())
_ATTACHMENT = Statement(lambda k: k.insert(s.attachments).values(
    **{n: bindparam(n) for n in ("message_row_id", "sha256", "filename", "content_type", "size", "inline",
                                 "content_id")}))
_PUBLIC_MESSAGES = Statement(lambda k: select(m.c.message_id, m.c.direction, m.c.from_address)
                             .where(m.c.case_id == bindparam("case_id"), m.c.visibility == Visibility.PUBLIC)
                             .order_by(m.c.id.desc()).limit(bindparam("limit")))


@functools.lru_cache(maxsize=16)
def _inbound_since(excluded: int) -> Statement:
    # One statement per number of addresses left out (the team's size: it rarely changes).
    return Statement(lambda k: select(func.count(m.c.id)).where(
        m.c.case_id == bindparam("case_id"), m.c.direction == Direction.IN, m.c.created_at >= bindparam("since"),
        *([or_(m.c.from_address.is_(None),
               func.lower(m.c.from_address).not_in([bindparam(f"x{i}") for i in range(excluded)]))]
          if excluded else [])))


_EVENT = Statement(lambda k: k.insert(ev).values(
    **{n: bindparam(n) for n in ("case_id", "at", "type", "actor", "message_row_id", "inbound_id", "data")}))


@functools.lru_cache(maxsize=16)
def _open_counts(agents: int) -> Statement:
    # One statement per number of agents (queues have a few): one query for all of them.
    return Statement(lambda k: select(c.c.assignee, func.count(c.c.id)).where(
        c.c.assignee.in_([bindparam(f"a{i}") for i in range(agents)]),
        or_(*(c.c.status == st.value for st in OPEN_STATUSES))).group_by(c.c.assignee))


_LINK = Statement(lambda k: k.insert(s.case_links).values(
    case_id=bindparam("case_id"), other_id=bindparam("other_id"), kind=bindparam("kind"), actor=bindparam("actor"),
    created_at=bindparam("at")).on_conflict_do_nothing().returning(s.case_links.c.id))
_LINKS = Statement(lambda k: select(s.case_links.c.other_id, s.case_links.c.kind, literal("to"))
                   .where(s.case_links.c.case_id == bindparam("case_id"))
                   .union_all(select(s.case_links.c.case_id, s.case_links.c.kind, literal("from"))
                              .where(s.case_links.c.other_id == bindparam("case_id"))))
_MOVE_MESSAGES = Statement(lambda k: update(m).where(m.c.case_id == bindparam("old")).values(case_id=bindparam("new")))
_MOVE_KEYS = Statement(lambda k: update(s.message_keys).where(s.message_keys.c.case_id == bindparam("old"))
                       .values(case_id=bindparam("new")))
# A message's timeline entry goes with it; the case's other events stay its history.
_MOVE_MESSAGE_EVENTS = Statement(lambda k: update(ev).where(ev.c.case_id == bindparam("old"),
                                                            ev.c.message_row_id.is_not(None))
                                 .values(case_id=bindparam("new")))
_MOVE_INBOUND = Statement(lambda k: update(s.inbound).where(s.inbound.c.case_id == bindparam("old"))
                          .values(case_id=bindparam("new")))
_PARTICIPANT_CONTACTS = Statement(lambda k: select(ct.c.id, ct.c.address, ct.c.name, ct.c.organization_id,
                                                   ct.c.language, p.c.role)
                                  .select_from(p.join(ct, ct.c.id == p.c.contact_id))
                                  .where(p.c.case_id == bindparam("case_id")).order_by(ct.c.id))
# The outbox row of the message, by its indexed Message-ID (its timeline entry would need a
# scan of the events: no index on their message row).
_TEMPLATE_OF = Statement(lambda k: select(s.outbox.c.template).where(s.outbox.c.message_id == bindparam("mid"))
                         .limit(1))
_LAST_IN = Statement(lambda k: select(m.c.from_address, m.c.to, m.c.cc).where(
    m.c.case_id == bindparam("case_id"), m.c.direction == Direction.IN, m.c.visibility == Visibility.PUBLIC)
    .order_by(m.c.id.desc()).limit(20))
_FILES = Statement(lambda k: select(s.attachments.c.sha256, s.attachments.c.filename, s.attachments.c.content_type,
                                    s.attachments.c.size, s.attachments.c.inline)
                   .where(s.attachments.c.message_row_id == bindparam("mid")).order_by(s.attachments.c.id))
_SENT = Statement(lambda k: update(m).where(m.c.id == bindparam("mid")).values(sent_at=bindparam("at")))


@functools.lru_cache(maxsize=64)
def _update(columns: frozenset[str]) -> Statement:
    # One compiled statement per set of changed fields (there are few such sets).
    return Statement(lambda k: update(c).where(c.c.id == bindparam("case_id"))
                     .values(**{n: bindparam(n) for n in sorted(columns)}))


class CaseRepo:
    """Case rows inside one transaction.

    Timeline entries are buffered and written in one statement per message
    (``flush_events``): nothing in the flow reads them back.
    """

    def __init__(self, sql: Sql, conn: Connection) -> None:
        self.sql = sql
        self.conn = conn
        self._events: list[dict[str, Any]] = []

    # -- finding cases -------------------------------------------------------------------

    def by_number(self, number: int) -> CaseRec | None:
        row = self.sql.one(_BY_NUMBER, {"n": number})
        return case_of(row) if row else None

    def by_id(self, case_id: int) -> CaseRec | None:
        row = self.sql.one(_BY_ID, {"cid": case_id})
        return case_of(row) if row else None

    def by_message_ids(self, ids: Iterable[str]) -> tuple[CaseRec, str] | None:
        """The case of the newest stored or sent message among ``ids``, and that id."""
        best: tuple[int, int, str] | None = None
        # Callers give the most relevant first (In-Reply-To, then the newest References);
        # a hostile list of thousands is cut.
        for mid in list(dict.fromkeys(ids))[:100]:
            row = self.sql.one(_BY_MESSAGE_ID, {"mid": mid})
            if row and (best is None or row[0] > best[0]):
                best = (row[0], row[1], mid)
        if best is None:
            return None
        case = self.by_id(best[1])
        return (case, best[2]) if case else None

    def by_thread_index(self, prefix: str) -> CaseRec | None:
        """The case of the newest message with this Outlook Thread-Index prefix."""
        case_id = self.sql.scalar(_BY_THREAD_INDEX, {"ti": prefix})
        return self.by_id(case_id) if case_id is not None else None

    # -- making and changing cases -------------------------------------------------------

    def next_number(self) -> int:
        """The next case number: a PostgreSQL sequence (never rolled back, so processes never
        wait on it), or a counter row on SQLite."""
        if self.sql.kit.pg:
            return int(self.sql.scalar(_NEXTVAL))
        row = self.sql.one(_COUNTER_UP, {"name": "case_number"})
        if row is None:
            self.sql.run(_COUNTER_NEW, {"name": "case_number"})
            return 1
        return int(row[0])

    def create(self, *, prefix: str, subject: str, requester: ContactRef | None, status: str, priority: str,
               queue: str | None, category: str | None, channel: str, mailbox: str | None, brand: str | None,
               language: str | None, tags: list[str], created_at: datetime) -> CaseRec:
        """A new case numbered from the installation's one sequence."""
        number = self.next_number()
        org_id = requester.organization_id if requester else None
        case_id = self.sql.one(_CREATE, {
            "number": number, "prefix": prefix, "subject": subject, "requester_id": requester.id if requester else None,
            "organization_id": org_id, "status": status, "priority": priority, "queue": queue, "category": category,
            "channel": channel, "mailbox": mailbox, "brand": brand, "language": language, "tags": list(tags),
            "created_at": created_at, "updated_at": created_at})[0]
        return CaseRec(id=case_id, number=number, prefix=prefix, subject=subject, status=status, priority=priority,
                       queue=queue, assignee=None, category=category, channel=channel, mailbox=mailbox, brand=brand,
                       language=language, resolution=None, tags=list(tags), escalation_level=0,
                       first_response_due=None, resolution_due=None, created_at=created_at, updated_at=created_at,
                       first_response_at=None, resolved_at=None, closed_at=None, linked_case_id=None,
                       merged_into_id=None, organization_id=org_id, organization=requester.organization if requester else None,
                       requester=requester)

    def update(self, case: CaseRec, **changes: Any) -> None:
        """Change fields of a case (only those of ``CHANGEABLE``), in the database and on ``case``."""
        if not changes:
            return
        unknown = set(changes) - CHANGEABLE
        if unknown:
            raise ValueError(f"not a changeable case field: {', '.join(sorted(unknown))}")
        for k, v in changes.items():
            setattr(case, k, list(v) if k == "tags" else v)
        self.sql.run(_update(frozenset(changes)), {"case_id": case.id, **changes})

    def open_counts(self, agents: Sequence[str]) -> dict[str, int]:
        """Open (not resolved or closed) cases per assignee, across all queues."""
        wanted = list(dict.fromkeys(agents))
        if not wanted:
            return {}
        found = dict(self.sql.all(_open_counts(len(wanted)), {f"a{i}": a for i, a in enumerate(wanted)}))
        return {a: int(found.get(a, 0)) for a in wanted}

    # -- contacts and participants -------------------------------------------------------

    def _organization_id(self, domain: str) -> int:
        found = self.sql.scalar(_ORG, {"domain": domain})
        if found is None:
            # Another process may make the same one at once: then its row is the one.
            made = self.sql.one(_ORG_NEW, {"domain": domain, "at": utcnow()})
            found = made[0] if made else self.sql.scalar(_ORG, {"domain": domain})
        return int(found)

    def contact(self, address: str, name: str, organization_domain: str | None) -> ContactRef:
        """The contact of an address (lower-cased), made on first sight; its name filled in when first known."""
        address = address.lower()
        row = self.sql.one(_CONTACT, {"address": address})
        if row is None:
            org_id = self._organization_id(organization_domain) if organization_domain else None
            made = self.sql.one(_CONTACT_NEW, {"address": address, "name": name or "", "org_id": org_id,
                                               "at": utcnow()})
            if made is not None:
                return ContactRef(int(made[0]), address, name or "", org_id, None,
                                  organization_domain if org_id else None)
            row = self.sql.one(_CONTACT, {"address": address})  # another process made it at once
            assert row is not None
        if name and not row[1]:
            self.sql.run(_CONTACT_NAME, {"cid": row[0], "name": name})
        return ContactRef(int(row[0]), address, row[1] or name or "", row[2], row[3], row[4])

    def set_contact_language(self, contact_id: int, language: str | None) -> None:
        """The language a contact writes in (used for the cases it opens)."""
        self.conn.execute(update(ct).where(ct.c.id == contact_id).values(language=language))

    def add_participant(self, case_id: int, contact: ContactRef, role: str) -> None:
        """Add a contact to a case's participants (once; the first role stays)."""
        self.sql.run(_PARTICIPANT, {"case_id": case_id, "contact_id": contact.id, "role": role})

    def participants(self, case_id: int) -> list[tuple[str, str, str]]:
        """(address, name, role) of a case's participants."""
        return [(a, n or "", r) for a, n, r in self.sql.all(_PARTICIPANTS, {"case_id": case_id})]

    def participant_addresses(self, case_id: int) -> set[str]:
        return {a for a, _, _ in self.participants(case_id)}

    # -- messages, attachments and the timeline --------------------------------------------

    def add_message(self, case_id: int, *, direction: str, visibility: str, message_id: str,
                    from_address: str | None, from_name: str | None, to: list[str], cc: list[str], subject: str,
                    text: str, html: str | None, sent_at: datetime | None, inbound_id: int | None = None,
                    thread_index: str | None = None, attachments: Sequence[StoredAttachment] = ()) -> int:
        """Store a message on a case; attachment content is stored once per SHA-256. Its row id."""
        row_id = int(self.sql.one(_MESSAGE, {
            "case_id": case_id, "inbound_id": inbound_id, "direction": direction, "visibility": visibility,
            "message_id": message_id, "from_address": from_address, "from_name": from_name, "to": to, "cc": cc,
            "subject": subject, "text": text, "html": html, "sent_at": sent_at, "created_at": utcnow(),
            "thread_index": thread_index})[0])
        for a in attachments:
            if self.sql.one(_BLOB_KNOWN, {"sha256": a.sha256}) is None:
                self.sql.run(_BLOB, {"sha256": a.sha256, "size": a.size, "data": a.payload})
            self.sql.run(_ATTACHMENT, {"message_row_id": row_id, "sha256": a.sha256, "filename": a.display_name,
                                       "content_type": a.content_type, "size": a.size, "inline": bool(a.inline),
                                       "content_id": a.content_id})
        return row_id

    def set_message_sent(self, message_row_id: int, at: datetime) -> None:
        """Record when an outgoing message was handed to the relay."""
        self.sql.run(_SENT, {"mid": message_row_id, "at": at})

    def public_messages(self, case_id: int, limit: int = 50) -> list[tuple[str, str, str | None]]:
        """(Message-ID, direction, from address) of a case's public messages, oldest first (for References)."""
        rows = self.sql.all(_PUBLIC_MESSAGES, {"case_id": case_id, "limit": limit})
        return [(mid, d, f.lower() if f else None) for mid, d, f in reversed(rows)]

    def count_inbound_messages(self, case_id: int, since: datetime, excluding: Collection[str] = ()) -> int:
        """Messages that came in on a case since ``since``, but those from ``excluding``
        (lower-case addresses)."""
        left_out = sorted(excluding)
        return int(self.sql.scalar(_inbound_since(len(left_out)), {
            "case_id": case_id, "since": since, **{f"x{i}": a for i, a in enumerate(left_out)}}))

    def add_event(self, case_id: int, type_: str, data: dict[str, Any] | None = None, *, actor: str | None,
                  message_row: int | None = None, inbound_id: int | None = None,
                  at: datetime | None = None) -> None:
        """Append an entry to a case's timeline (written at the next ``flush_events``)."""
        self._events.append({"case_id": case_id, "at": at or utcnow(), "type": type_, "actor": actor,
                             "message_row_id": message_row, "inbound_id": inbound_id, "data": data or {}})

    def flush_events(self) -> None:
        """Write the buffered timeline entries in one statement."""
        if self._events:
            self.sql.many(_EVENT, self._events)
            self._events.clear()

    # -- links and merges -------------------------------------------------------------------

    def add_link(self, case_id: int, other_id: int, kind: str, actor: str | None, at: datetime) -> bool:
        """Record that two cases belong together (once per pair and kind); False when known."""
        row = self.sql.one(_LINK, {"case_id": case_id, "other_id": other_id, "kind": kind, "actor": actor, "at": at})
        return row is not None

    def links(self, case_id: int) -> list[tuple[str, str, str]]:
        """(other case's label, kind, direction "to"/"from") of every link of a case."""
        out = []
        for other, kind, direction in self.sql.all(_LINKS, {"case_id": case_id}):
            case = self.by_id(other)
            if case is not None:
                out.append((case.label, kind, direction))
        return out

    def move_thread(self, from_case: int, to_case: int) -> int:
        """Move a case's messages and thread evidence (Message-IDs, inbound records) to another
        case (a merge); the number of messages moved."""
        moved = self.sql.run(_MOVE_MESSAGES, {"old": from_case, "new": to_case})
        self.sql.run(_MOVE_MESSAGE_EVENTS, {"old": from_case, "new": to_case})
        self.sql.run(_MOVE_KEYS, {"old": from_case, "new": to_case})
        self.sql.run(_MOVE_INBOUND, {"old": from_case, "new": to_case})
        return moved

    def participants_with_ids(self, case_id: int) -> list[tuple[ContactRef, str]]:
        """(contact, role) of a case's participants."""
        return [(ContactRef(cid, a, n or "", o, lang), r) for cid, a, n, o, lang, r in
                self.sql.all(_PARTICIPANT_CONTACTS, {"case_id": case_id})]

    def template_of(self, message_id: str) -> str | None:
        """The template an outgoing message of ours was rendered from (None for other mail)."""
        return self.sql.scalar(_TEMPLATE_OF, {"mid": message_id})

    def last_customer_message(self, case_id: int, agents: Iterable[str]) -> list[str]:
        """From, To and Cc (lower case) of the case's latest incoming public message not written
        by an agent: the mail an agent reply answers."""
        wanted = {a.lower() for a in agents}
        for from_address, to, cc in self.sql.all(_LAST_IN, {"case_id": case_id}):
            if (from_address or "").lower() not in wanted:
                return [a.lower() for a in [from_address or "", *(to or []), *(cc or [])] if a]
        return []

    def message_files(self, message_row_id: int) -> list[tuple[str, str, str, int, bool]]:
        """(sha256, filename, content type, size, inline) of a stored message's attachments."""
        return [tuple(r) for r in self.sql.all(_FILES, {"mid": message_row_id})]  # type: ignore[misc]

    # -- reading (the command line) ----------------------------------------------------------

    def list(self, *, limit: int | None = None, newest: bool = False, **filters: Any) -> list[CaseRec]:
        """Cases, oldest first, filtered (``intake cases list``); with ``newest`` the last
        ``limit`` of them (still oldest first)."""
        q = _filtered(_case_select(), **filters)
        if newest and limit:
            q = q.order_by(c.c.number.desc()).limit(limit)
            return [case_of(r) for r in reversed(self.sql.query(q))]
        q = q.order_by(c.c.number)
        if limit:
            q = q.limit(limit)
        return [case_of(r) for r in self.sql.query(q)]

    def count(self, **filters: Any) -> int:
        """How many cases the filters of :meth:`list` select."""
        q = _filtered(select(func.count(c.c.id)).select_from(
            c.outerjoin(org, org.c.id == c.c.organization_id).outerjoin(ct, ct.c.id == c.c.requester_id)), **filters)
        return int(self.sql.query(q)[0][0])

    def timeline(self, case_id: int) -> list[dict[str, Any]]:
        """Every timeline entry of a case with its message and attachments (DESIGN 6 JSON)."""
        conn = self.conn
        entries = conn.execute(select(ev).where(ev.c.case_id == case_id).order_by(ev.c.at, ev.c.id)).all()
        msg_ids = [e.message_row_id for e in entries if e.message_row_id]
        messages = {r.id: r for r in conn.execute(select(m).where(m.c.id.in_(msg_ids)))} if msg_ids else {}
        atts: dict[int, list[Any]] = {}
        if msg_ids:
            a = s.attachments
            for r in conn.execute(select(a).where(a.c.message_row_id.in_(msg_ids)).order_by(a.c.id)):
                atts.setdefault(r.message_row_id, []).append(r)
        out = []
        for e in entries:
            entry: dict[str, Any] = {"at": e.at.isoformat(), "type": e.type}
            msg = messages.get(e.message_row_id) if e.message_row_id else None
            if msg is not None:
                entry.update(
                    direction=msg.direction, visibility=msg.visibility, **{"from": msg.from_address},
                    from_name=msg.from_name, to=list(msg.to or []), cc=list(msg.cc or []), subject=msg.subject,
                    message_id=msg.message_id, text=msg.text,
                    attachments=[{"id": x.id, "filename": x.filename, "size": x.size, "content_type": x.content_type,
                                  "inline": x.inline, "sha256": x.sha256} for x in atts.get(msg.id, [])])
            for k, v in (e.data or {}).items():
                entry.setdefault(k, v)
            # Entries written before actors were recorded: the sender of a message, else intake.
            entry["actor"] = e.actor or (msg.from_address if msg is not None and msg.direction == Direction.IN else "system")
            out.append(entry)
        return out

    def detail(self, number: int) -> dict[str, Any] | None:
        """One case as the JSON of ``intake cases show --json`` (DESIGN 6)."""
        case = self.by_number(number)
        if case is None:
            return None
        out = case.as_json()
        parts = self.participants(case.id)
        out["participants"] = sorted({a for a, _, _ in parts})
        out.update(priority=case.priority, resolution=case.resolution, language=case.language, brand=case.brand)
        out["links"] = [{"case": label, "kind": kind, "direction": direction}
                        for label, kind, direction in self.links(case.id)]
        merged = self.by_id(case.merged_into_id) if case.merged_into_id else None
        out["merged_into"] = merged.label if merged else None
        out["timeline"] = self.timeline(case.id)
        return out

    def attachments_of(self, case_id: int) -> list[AttachmentView]:
        """The files of a case's messages, oldest first."""
        a = s.attachments
        q = (select(a.c.id, a.c.message_row_id, a.c.filename, a.c.content_type, a.c.size, a.c.inline, a.c.sha256,
                    m.c.direction, m.c.from_address, m.c.created_at)
             .select_from(a.join(m, m.c.id == a.c.message_row_id)).where(m.c.case_id == case_id).order_by(a.c.id))
        return [AttachmentView(*r) for r in self.conn.execute(q)]

    def attachment(self, attachment_id: int) -> tuple[AttachmentView, int, bytes] | None:
        """One attachment, the number of its case and its content."""
        a = s.attachments
        q = (select(a.c.id, a.c.message_row_id, a.c.filename, a.c.content_type, a.c.size, a.c.inline, a.c.sha256,
                    m.c.direction, m.c.from_address, m.c.created_at, c.c.number, s.blobs.c.data)
             .select_from(a.join(m, m.c.id == a.c.message_row_id).join(c, c.c.id == m.c.case_id)
                          .join(s.blobs, s.blobs.c.sha256 == a.c.sha256))
             .where(a.c.id == attachment_id))
        r = self.conn.execute(q).first()
        return (AttachmentView(*r[:10]), int(r[10]), bytes(r[11])) if r else None


def _filtered(q: Any, *, queue: str | None = None, status: str | None = None, assignee: str | None = None,
              requester: str | None = None, organization: str | None = None, category: str | None = None,
              channel: str | None = None, search: str | None = None, since: datetime | None = None) -> Any:
    """``q`` restricted by the filters of ``intake cases list`` (DESIGN 6)."""
    for col, value in ((c.c.queue, queue), (c.c.status, status), (c.c.category, category), (c.c.channel, channel)):
        if value:
            q = q.where(col == value)
    if assignee:
        q = q.where(c.c.assignee.is_(None)) if assignee == "none" else q.where(func.lower(c.c.assignee)
                                                                             == assignee.lower())
    if requester:
        q = q.where(ct.c.address == requester.lower())
    if organization:
        q = q.where(org.c.domain == organization.lower())
    if since:
        q = q.where(c.c.created_at >= since)
    if search:
        like = f"%{search.lower()}%"
        inside = select(m.c.case_id).where(func.lower(m.c.text).like(like))
        q = q.where(or_(func.lower(c.c.subject).like(like), c.c.id.in_(inside)))
    return q


def parse_case_label(label: str) -> int | None:
    """``CASE-1042`` (any prefix) or ``1042`` → 1042."""
    tail = label.strip().rsplit("-", 1)[-1]
    # ASCII digits only ("²" is a digit to isdigit()), and no more than a case number can have.
    return int(tail) if tail.isascii() and tail.isdigit() and len(tail) <= 18 else None
