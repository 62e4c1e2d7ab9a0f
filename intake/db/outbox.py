"""The outbox: rendered outgoing mail and its delivery state, and suppressed addresses.

States: queued → sending → sent | failed | bounced. A row is claimed (committed as
``sending`` with its holder) before anything is sent, and its result committed after, so
that it is sent by one process only. A claim is a lease: its holder renews ``claimed_at``
while it sends, and a claim not renewed in time belonged to a process that stopped
(``docs/outbox.md``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy import bindparam, func, select, update

from intake.db import schema as s
from intake.db.base import utcnow
from intake.db.cases import parse_case_label
from intake.db.sql import Sql, Statement
from intake.states import OutboxState


o = s.outbox


@dataclass(frozen=True)
class OutboxFile:
    """A file sent with an outgoing mail; its content is a stored blob (by SHA-256)."""

    sha256: str
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class NewMail:
    """One rendered mail to queue (every column of a new outbox row, by name, and its files)."""

    case_id: int | None
    message_row_id: int | None
    inbound_id: int | None
    at: datetime
    template: str
    audience: str
    auto_submitted: str
    language: str
    mail_from: str
    recipient: str
    recipients: list[str]
    message_id: str
    headers: list[list[str]]
    subject: str
    text: str
    html: str | None
    give_up_at: datetime
    files: tuple[OutboxFile, ...] = ()


@dataclass(frozen=True)
class OutboxMail:
    """One outbox row as delivery, bounces and ``intake outbox list`` see it."""

    id: int
    case_id: int | None
    case: str | None  # its label, CASE-12
    message_row_id: int | None
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
    files: tuple[OutboxFile, ...] = ()
    requeued: int = 0  # times an expired claim put it back (at most once)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "case": self.case, "template": self.template, "audience": self.audience,
            "to": self.recipient, "recipients": list(self.recipients), "subject": self.subject,
            "message_id": self.message_id, "state": self.state, "attempts": self.attempts,
            "created_at": self.created_at.isoformat(), "next_attempt_at": self.next_attempt_at.isoformat(),
            "sent_at": self.sent_at.isoformat() if self.sent_at else None, "last_error": self.last_error,
            "requeued": self.requeued,
            "files": [{"filename": f.filename, "content_type": f.content_type, "size": f.size} for f in self.files],
        }


@dataclass(frozen=True)
class Suppression:
    """An address our automated mail is not sent to (it bounced), and until when."""

    address: str
    until: datetime
    reason: str


_COLUMNS = (o.c.id, o.c.case_id, s.cases.c.prefix, s.cases.c.number, o.c.message_row_id, o.c.template, o.c.audience,
            o.c.auto_submitted, o.c.mail_from, o.c.recipient, o.c.recipients, o.c.message_id, o.c.headers,
            o.c.subject, o.c.text, o.c.html, o.c.state, o.c.attempts, o.c.created_at, o.c.next_attempt_at,
            o.c.give_up_at, o.c.sent_at, o.c.last_error, o.c.requeued)


def _select() -> Any:
    return select(*_COLUMNS).select_from(o.outerjoin(s.cases, s.cases.c.id == o.c.case_id))


def _mail(r: Sequence[Any], files: tuple[OutboxFile, ...] = ()) -> OutboxMail:
    (rid, case_id, prefix, number, message_row_id, template, audience, auto, mail_from, recipient, recipients,
     message_id, headers, subject, text, html, state, attempts, created, next_at, give_up, sent, error, requeued) = r
    return OutboxMail(rid, case_id, f"{prefix}-{number}" if number is not None else None, message_row_id, template,
                      audience, auto, mail_from, recipient, list(recipients or []), message_id,
                      [list(h) for h in headers or []], subject, text, html, state, attempts or 0, created, next_at,
                      give_up, sent, error, files, requeued or 0)


_ADD = Statement(lambda k: k.insert(o).values(
    **{n: bindparam(n) for n in ("case_id", "message_row_id", "inbound_id", "template", "audience", "auto_submitted",
                                 "language", "mail_from", "recipient", "recipients", "message_id", "headers",
                                 "subject", "text", "html", "give_up_at")},
    created_at=bindparam("at"), updated_at=bindparam("at"), next_attempt_at=bindparam("at"),
    state=OutboxState.QUEUED, attempts=0, requeued=0, permanent=False).returning(o.c.id))
_BY_ID = Statement(lambda k: _select().where(o.c.id == bindparam("rid")))
_FILE = Statement(lambda k: k.insert(s.outbox_attachments).values(
    outbox_id=bindparam("outbox_id"), sha256=bindparam("sha256"), filename=bindparam("filename"),
    content_type=bindparam("content_type"), size=bindparam("size")))
_FILES = Statement(lambda k: select(s.outbox_attachments.c.sha256, s.outbox_attachments.c.filename,
                                    s.outbox_attachments.c.content_type, s.outbox_attachments.c.size)
                   .where(s.outbox_attachments.c.outbox_id == bindparam("outbox_id"))
                   .order_by(s.outbox_attachments.c.id))
_BLOB = Statement(lambda k: select(s.blobs.c.data).where(s.blobs.c.sha256 == bindparam("sha256")))
def _claim_of(k: Any) -> Any:
    q = select(o.c.state, o.c.claimed_by).where(o.c.id == bindparam("rid"))
    return q.with_for_update() if k.pg else q


_CLAIM_OF = Statement(_claim_of)
# The delivery results, one statement each (the sender commits them as the relay answers).
_MARK_SENT = Statement(lambda k: update(o).where(o.c.id == bindparam("rid")).values(
    state=OutboxState.SENT, attempts=bindparam("attempts"), sent_at=bindparam("at"), finished_at=bindparam("at"),
    updated_at=bindparam("at"), last_error=bindparam("note")))
_MARK_RETRY = Statement(lambda k: update(o).where(o.c.id == bindparam("rid")).values(
    state=OutboxState.QUEUED, attempts=bindparam("attempts"), next_attempt_at=bindparam("next_at"),
    updated_at=bindparam("at"), last_error=bindparam("error")))
_BY_MESSAGE_ID = Statement(lambda k: _select().where(o.c.message_id == bindparam("mid")))
_SUPPRESSION = Statement(lambda k: select(s.suppressions.c.address, s.suppressions.c.until, s.suppressions.c.reason)
                         .where(s.suppressions.c.address == bindparam("address")))


def _suppress(k: Any) -> Any:
    ins = k.insert(s.suppressions).values(address=bindparam("address"), until=bindparam("until"),
                                          reason=bindparam("reason"), created_at=bindparam("at"))
    # An existing later date stays.
    return ins.on_conflict_do_update(index_elements=["address"],
                                     set_={"until": ins.excluded.until, "reason": ins.excluded.reason},
                                     where=s.suppressions.c.until < ins.excluded.until)


_SUPPRESS = Statement(_suppress)


@functools.lru_cache(maxsize=32)
def _count(filters: tuple[str, ...]) -> Statement:
    # One compiled statement per combination of filters (few combinations exist).
    return Statement(lambda k: select(func.count(o.c.id)).where(
        o.c.created_at >= bindparam("since"), *(o.c[f] == bindparam(f) for f in filters)))


class OutboxRepo:
    """Outbox rows and suppressions inside one transaction."""

    def __init__(self, sql: Sql, conn: Connection) -> None:
        self.sql = sql
        self.conn = conn

    # -- queueing ------------------------------------------------------------------------

    def add(self, mail: NewMail) -> int:
        """Queue one rendered mail (and its files); the row's id."""
        values = {k: getattr(mail, k) for k in mail.__dataclass_fields__ if k != "files"}
        row_id = int(self.sql.one(_ADD, values)[0])
        for f in mail.files:
            self.sql.run(_FILE, {"outbox_id": row_id, "sha256": f.sha256, "filename": f.filename,
                                 "content_type": f.content_type, "size": f.size})
        return row_id

    def files(self, outbox_id: int) -> tuple[OutboxFile, ...]:
        """The files sent with an outbox row."""
        return tuple(OutboxFile(*r) for r in self.sql.all(_FILES, {"outbox_id": outbox_id}))

    def file_data(self, sha256: str) -> bytes:
        """The content of a file (a stored blob)."""
        return bytes(self.sql.scalar(_BLOB, {"sha256": sha256}))

    def count(self, *, since: datetime, template: str | None = None, recipient: str | None = None,
              case_id: int | None = None, audience: str | None = None) -> int:
        """How many mails were queued since ``since`` (any state), by template/recipient/case/audience."""
        given = {k: v for k, v in (("template", template), ("recipient", recipient.lower() if recipient else None),
                                   ("case_id", case_id), ("audience", audience)) if v is not None}
        return int(self.sql.scalar(_count(tuple(given)), {"since": since, **given}))

    # -- reading -------------------------------------------------------------------------

    def get(self, outbox_id: int) -> OutboxMail | None:
        row = self.sql.one(_BY_ID, {"rid": outbox_id})
        return _mail(row, self.files(outbox_id)) if row else None

    def by_ids(self, ids: Sequence[int]) -> dict[int, OutboxMail]:
        return {m.id: m for m in (self.get(i) for i in dict.fromkeys(ids)) if m is not None}

    def by_message_ids(self, ids: Sequence[str]) -> list[OutboxMail]:
        """Rows whose Message-ID is one of ``ids`` (bounces name them)."""
        return [_mail(r) for mid in dict.fromkeys(ids) for r in self.sql.all(_BY_MESSAGE_ID, {"mid": mid})]

    def for_case(self, case_id: int, *, states: Sequence[str]) -> list[OutboxMail]:
        """A case's rows in the given states, newest first."""
        q = _select().where(o.c.case_id == case_id, o.c.state.in_(list(states))).order_by(o.c.id.desc())
        return [_mail(r) for r in self.conn.execute(q)]

    def list(self, *, state: str | None = None, case: str | None = None, limit: int | None = None) -> list[OutboxMail]:
        """Rows, newest first (``intake outbox list``)."""
        q = _select().order_by(o.c.id.desc())
        if state:
            q = q.where(o.c.state == state)
        if case:
            q = q.where(s.cases.c.number == (parse_case_label(case) or -1))
        if limit:
            q = q.limit(limit)
        rows = self.conn.execute(q).all()
        files = self._files_of([r[0] for r in rows])
        return [_mail(r, files.get(r[0], ())) for r in rows]

    def _files_of(self, ids: Sequence[int]) -> dict[int, tuple[OutboxFile, ...]]:
        """The files of many rows in one query (most rows have none)."""
        a = s.outbox_attachments
        out: dict[int, list[OutboxFile]] = {}
        for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
            q = select(a.c.outbox_id, a.c.sha256, a.c.filename, a.c.content_type, a.c.size).where(
                a.c.outbox_id.in_(chunk)).order_by(a.c.id)
            for oid, *f in self.conn.execute(q):
                out.setdefault(oid, []).append(OutboxFile(*f))
        return {k: tuple(v) for k, v in out.items()}

    # -- delivery ------------------------------------------------------------------------

    def claim(self, now: datetime, limit: int, holder: str | None = None) -> list[OutboxMail]:
        """Claim up to ``limit`` due rows for ``holder`` (state ``sending``), oldest first; on
        PostgreSQL rows another process holds are skipped.

        A row put back after an interrupted delivery is claimed alone: if it stops the
        sender again, it alone is failed, not the mails that happened to share its batch."""
        q = (select(o.c.id, o.c.requeued).where(o.c.state == OutboxState.QUEUED, o.c.next_attempt_at <= now)
             .order_by(o.c.next_attempt_at, o.c.id).limit(limit))
        if self.sql.kit.pg:
            q = q.with_for_update(skip_locked=True)
        due = self.conn.execute(q).all()
        if not due:
            return []
        if due[0][1]:
            ids = [due[0][0]]
        else:
            ids = [rid for rid, requeued in itertools.takewhile(lambda r: not r[1], due)]
        wall = utcnow()
        self.conn.execute(update(o).where(o.c.id.in_(ids)).values(state=OutboxState.SENDING, claimed_at=wall,
                                                                       claimed_by=holder, updated_at=wall))
        rows = self.conn.execute(_select().where(o.c.id.in_(ids)).order_by(o.c.next_attempt_at, o.c.id)).all()
        return [_mail(r, self.files(r[0])) for r in rows]

    def renew(self, holder: str, at: datetime) -> int:
        """Renew the claims ``holder`` still has (its heartbeat); how many."""
        res = self.conn.execute(update(o).where(o.c.claimed_by == holder, o.c.state == OutboxState.SENDING)
                                .values(claimed_at=at))
        return int(res.rowcount or 0)

    def claim_of(self, outbox_id: int) -> tuple[str, str | None] | None:
        """(state, holder) of a row, locked on PostgreSQL until the commit (a result is
        recorded only by the holder of the claim)."""
        return self.sql.one(_CLAIM_OF, {"rid": outbox_id})  # type: ignore[return-value]

    def expired(self, claimed_before: datetime) -> list[tuple[OutboxMail, str | None]]:
        """Rows ``sending`` whose claim was last renewed before ``claimed_before`` (their
        holder stopped), with the holder; on PostgreSQL rows being renewed are skipped."""
        ids = select(o.c.id).where(o.c.state == OutboxState.SENDING, o.c.claimed_at < claimed_before)
        if self.sql.kit.pg:
            ids = ids.with_for_update(skip_locked=True)
        found = list(self.conn.scalars(ids))
        if not found:
            return []
        holders = dict(self.conn.execute(select(o.c.id, o.c.claimed_by).where(o.c.id.in_(found))).all())
        rows = self.conn.execute(_select().where(o.c.id.in_(found)).order_by(o.c.id)).all()
        return [(_mail(r), holders.get(r[0])) for r in rows]

    def requeue_interrupted(self, outbox_id: int, at: datetime, note: str) -> None:
        """Put a row whose claim expired back to ``queued``, due now, counted in ``requeued``.
        The holder stays recorded, so that a late result of its send is still taken."""
        self.conn.execute(update(o).where(o.c.id == outbox_id).values(
            state=OutboxState.QUEUED, requeued=o.c.requeued + 1, next_attempt_at=at, updated_at=at,
            last_error=note))

    def _set(self, outbox_id: int, **values: Any) -> None:
        self.conn.execute(update(o).where(o.c.id == outbox_id).values(**values))

    def mark_sent(self, outbox_id: int, at: datetime, attempts: int, note: str | None = None) -> None:
        self.sql.run(_MARK_SENT, {"rid": outbox_id, "attempts": attempts, "at": at, "note": note})

    def mark_retry(self, outbox_id: int, at: datetime, attempts: int, next_attempt_at: datetime, error: str) -> None:
        self.sql.run(_MARK_RETRY, {"rid": outbox_id, "attempts": attempts, "next_at": next_attempt_at, "at": at,
                                   "error": error})

    def mark_failed(self, outbox_id: int, at: datetime, error: str, *, attempts: int | None = None,
                    permanent: bool = False) -> None:
        values: dict[str, Any] = {"state": OutboxState.FAILED, "finished_at": at, "updated_at": at,
                                  "last_error": error, "permanent": permanent}
        if attempts is not None:
            values["attempts"] = attempts
        self._set(outbox_id, **values)

    def mark_bounced(self, outbox_id: int, at: datetime, error: str) -> None:
        self._set(outbox_id, state=OutboxState.BOUNCED, finished_at=at, updated_at=at, permanent=True,
                  last_error=error)

    def requeue(self, outbox_id: int, now: datetime, give_up_at: datetime) -> None:
        """Queue a row for delivery now (an operator's retry)."""
        self._set(outbox_id, state=OutboxState.QUEUED, next_attempt_at=now, give_up_at=give_up_at, permanent=False,
                  finished_at=None, updated_at=now)

    # -- suppressions --------------------------------------------------------------------

    def suppression(self, address: str, now: datetime) -> Suppression | None:
        """The active suppression of an address, if any."""
        row = self.sql.one(_SUPPRESSION, {"address": address.lower()})
        if row is None or row[1] <= now:
            return None
        return Suppression(row[0], row[1], row[2])

    def suppress(self, address: str, until: datetime, reason: str, at: datetime) -> None:
        """No automated mail to ``address`` until ``until`` (an existing later date stays)."""
        self.sql.run(_SUPPRESS, {"address": address.lower(), "until": until, "reason": reason, "at": at})
