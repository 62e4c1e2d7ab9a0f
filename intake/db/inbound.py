"""Inbound records: every received message, committed before anything is decided about it.

Also the Message-ID registry (the duplicate rule's one source) and what the command line
reads of the records (``intake messages``, ``intake quarantine``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy import bindparam, func, select, update

from intake.db import schema as s
from intake.db.base import db_json, db_text
from intake.db.sql import Sql, Statement
from intake.states import InboundState


#: What an edge commits for one message: its raw bytes and the receive metadata
#: (``channel``, ``mailbox``, ``envelope_from``, ``envelope_to``, ``source``, and
#: ``received_at`` when it is not now).
Received = tuple[bytes, Mapping[str, Any]]

t = s.inbound


@dataclass
class InboundWork:
    """An inbound record being processed, as plain data; saved back by ``InboundRepo.save``."""

    id: int
    raw: bytes | None
    state: str
    channel: str
    mailbox: str
    envelope_from: str | None
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
class QuarantinedView:
    """A quarantined record as ``intake quarantine list`` shows it."""

    id: int
    received_at: datetime
    mailbox: str
    channel: str
    message_id: str | None
    from_address: str | None
    subject: str | None
    attempts: int
    error: str | None


_INSERT = Statement(lambda k: k.insert(t).values(
    received_at=bindparam("received_at"), channel=bindparam("channel"), mailbox=bindparam("mailbox"),
    envelope_from=bindparam("envelope_from"), envelope_to=bindparam("envelope_to"), source=bindparam("source"),
    raw=bindparam("raw"), raw_sha256=bindparam("raw_sha256"), size=bindparam("size"), state=InboundState.RECEIVED,
    attempts=0, log=bindparam("log")).returning(t.c.id))
_SAVED = ("state", "log", "attempts", "message_id", "from_address", "subject", "case_id", "duplicate_of",
          "processed_at", "error")
_SAVE = Statement(lambda k: update(t).where(t.c.id == bindparam("rid")).values(
    **{c: bindparam(c) for c in _SAVED}))
_LOG = Statement(lambda k: select(t.c.log, t.c.attempts).where(t.c.id == bindparam("rid")))
_QUARANTINE = Statement(lambda k: update(t).where(t.c.id == bindparam("rid")).values(
    state=InboundState.QUARANTINED, error=bindparam("error"), traceback=bindparam("traceback"),
    attempts=bindparam("attempts"), processed_at=bindparam("at"), log=bindparam("log")))
# What parsing read before processing failed, so that the quarantine list says which mail it is.
_QUARANTINE_SEEN = Statement(lambda k: update(t).where(t.c.id == bindparam("rid")).values(
    state=InboundState.QUARANTINED, error=bindparam("error"), traceback=bindparam("traceback"),
    attempts=bindparam("attempts"), processed_at=bindparam("at"), log=bindparam("log"),
    message_id=bindparam("message_id"), from_address=bindparam("from_address"), subject=bindparam("subject")))
_CLAIM_KEY = Statement(lambda k: k.insert(s.message_keys).values(
    key=bindparam("key"), inbound_id=bindparam("inbound_id")).on_conflict_do_nothing()
    .returning(s.message_keys.c.key))
_KEY_OWNER = Statement(lambda k: select(s.message_keys.c.inbound_id, s.message_keys.c.case_id)
                       .where(s.message_keys.c.key == bindparam("key")))
_KEY_CASE = Statement(lambda k: update(s.message_keys).where(s.message_keys.c.key == bindparam("key"))
                      .values(case_id=bindparam("case_id")))


class InboundRepo:
    """Inbound records inside one transaction."""

    def __init__(self, sql: Sql, conn: Connection) -> None:
        self.sql = sql
        self.conn = conn

    # -- the edges' commit -------------------------------------------------------------

    def insert(self, items: Sequence[Received], now: datetime) -> list[int]:
        """Store received messages in state ``received``; their ids, in order.

        The processing log starts empty: its ``received`` entry is read from these columns.
        """
        ids = []
        for raw, meta in items:
            ids.append(self.sql.one(_INSERT, {
                "received_at": meta.get("received_at") or now, "channel": meta["channel"],
                "mailbox": meta["mailbox"], "envelope_from": db_text(meta.get("envelope_from")),
                "envelope_to": [db_text(a) for a in meta.get("envelope_to") or ()],
                "source": db_json(dict(meta.get("source") or {})), "raw": raw,
                "raw_sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "log": []})[0])
        return ids

    # -- processing --------------------------------------------------------------------

    def lock_states(self, ids: Sequence[int]) -> dict[int, tuple[str, list[Any], int]]:
        """(state, log, attempts) of the records, locked for this transaction.

        On PostgreSQL rows another process holds are skipped: that process works on them.
        """
        if not ids:
            return {}
        q = select(t.c.id, t.c.state, t.c.log, t.c.attempts).where(t.c.id.in_(list(ids)))
        if self.sql.kit.pg:
            q = q.with_for_update(skip_locked=True)
        return {r.id: (r.state, list(r.log or []), r.attempts or 0) for r in self.conn.execute(q)}

    def save(self, works: Sequence[InboundWork]) -> None:
        """Write the outcome of processed records back."""
        self.sql.many(_SAVE, [{"rid": w.id, **{c: getattr(w, c) for c in _SAVED}} for w in works])

    def quarantine(self, inbound_id: int, error: str, tb: str, at: datetime,
                   seen: Mapping[str, str | None] | None = None) -> None:
        """Quarantine a record with its error; its raw bytes stay for ``quarantine retry``.
        ``seen``: the ``message_id``, ``from_address`` and ``subject`` parsing read, if it did."""
        row = self.sql.one(_LOG, {"rid": inbound_id})
        if row is None:
            return
        log = [*(row[0] or []), {"at": at.isoformat(), "step": "quarantined", "error": error}]
        values = {"rid": inbound_id, "error": error, "traceback": tb, "attempts": (row[1] or 0) + 1, "at": at,
                  "log": log}
        if seen:
            self.sql.run(_QUARANTINE_SEEN, {**values, "message_id": seen.get("message_id"),
                                            "from_address": seen.get("from_address"), "subject": seen.get("subject")})
        else:
            self.sql.run(_QUARANTINE, values)

    def requeue(self, inbound_id: int) -> bool:
        """Put a quarantined record back to ``received`` so it is processed again."""
        res = self.conn.execute(update(t).where(t.c.id == inbound_id, t.c.state == InboundState.QUARANTINED)
                                   .values(state=InboundState.RECEIVED))
        return bool(res.rowcount)

    # -- the Message-ID registry (the duplicate rule) ------------------------------------

    def claim_key(self, key: str, inbound_id: int) -> bool:
        """Register the first arrival of a Message-ID; False when another record has it."""
        return self.sql.one(_CLAIM_KEY, {"key": key, "inbound_id": inbound_id}) is not None

    def key_owner(self, key: str) -> tuple[int, int | None] | None:
        """(first inbound id, its case id) of a registered Message-ID."""
        row = self.sql.one(_KEY_OWNER, {"key": key})
        return (row[0], row[1]) if row else None

    def set_key_case(self, key: str, case_id: int) -> None:
        """Point a Message-ID (or content) key at the case its message went to."""
        self.sql.run(_KEY_CASE, {"key": key, "case_id": case_id})

    # -- reading (the processor and the command line) ------------------------------------

    def pending(self, limit: int = 1000, after_id: int = 0, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Ids of records still ``received`` (not yet processed), oldest first.

        ``shard`` (index, count): only ids with ``id % count == index``, so that several
        processors of one serve never prepare the same record.
        """
        index, count = shard
        q = select(t.c.id).where(t.c.state == InboundState.RECEIVED, t.c.id > after_id)
        if count > 1:
            q = q.where(t.c.id % count == index)
        return list(self.conn.scalars(q.order_by(t.c.id).limit(limit)))

    def load(self, ids: Sequence[int]) -> dict[int, InboundWork]:
        """Records to process, with their raw bytes."""
        q = select(t.c.id, t.c.raw, t.c.state, t.c.channel, t.c.mailbox, t.c.envelope_from, t.c.envelope_to,
                   t.c.source, t.c.log, t.c.attempts, t.c.received_at).where(t.c.id.in_(list(ids)))
        return {r.id: InboundWork(id=r.id, raw=r.raw, state=r.state, channel=r.channel, mailbox=r.mailbox,
                                  envelope_from=r.envelope_from, envelope_to=list(r.envelope_to or []),
                                  source=dict(r.source or {}), log=list(r.log or []), attempts=r.attempts or 0,
                                  received_at=r.received_at)
                for r in self.conn.execute(q)}

    def count(self, state: str | None = None) -> int:
        q = select(func.count(t.c.id))
        if state:
            q = q.where(t.c.state == state)
        return int(self.conn.scalar(q) or 0)

    def quarantined(self) -> list[QuarantinedView]:
        q = (select(t.c.id, t.c.received_at, t.c.mailbox, t.c.channel, t.c.message_id, t.c.from_address,
                    t.c.subject, t.c.attempts, t.c.error)
             .where(t.c.state == InboundState.QUARANTINED).order_by(t.c.id))
        return [QuarantinedView(*r) for r in self.conn.execute(q)]

    def list(self, *, state: str | None = None, since: datetime | None = None, from_address: str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Inbound records, newest last, with their case number (``intake messages list``)."""
        c = s.cases
        q = (select(t.c.id, t.c.received_at, t.c.channel, t.c.mailbox, t.c.envelope_from, t.c.from_address,
                    t.c.subject, t.c.state, t.c.message_id, t.c.size, t.c.error, c.c.prefix, c.c.number)
             .outerjoin(c, c.c.id == t.c.case_id).order_by(t.c.id))
        if state:
            q = q.where(t.c.state == state)
        if since:
            q = q.where(t.c.received_at >= since)
        if from_address:
            q = q.where(func.lower(t.c.from_address) == from_address.lower())
        if limit:
            q = q.limit(limit)
        return [{"id": r.id, "received_at": r.received_at, "channel": r.channel, "mailbox": r.mailbox,
                 "envelope_from": r.envelope_from, "from": r.from_address, "subject": r.subject, "state": r.state,
                 "message_id": r.message_id, "size": r.size, "error": r.error,
                 "case": f"{r.prefix}-{r.number}" if r.number is not None else None}
                for r in self.conn.execute(q)]

    def detail(self, ref: str) -> dict[str, Any] | None:
        """One record by id, spool id (``S12``, as the SMTP reply named it) or Message-ID,
        with its processing log and the mails it caused (``intake messages show``)."""
        cols = [c for c in t.c if c.name != "raw"]
        q = select(*cols, t.c.raw.isnot(None).label("raw_kept"))
        if ref.isdigit():
            q = q.where(t.c.id == int(ref))
        elif ref[:1] in "Ss" and ref[1:].isdigit():
            q = q.where(t.c.source["spool"].as_integer() == int(ref[1:])).order_by(t.c.id.desc())
        else:
            q = q.where(t.c.message_id == ref.strip().strip("<>")).order_by(t.c.id)
        rec = self.conn.execute(q.limit(1)).first()
        if rec is None:
            return None
        label = None
        if rec.case_id:
            row = self.conn.execute(select(s.cases.c.prefix, s.cases.c.number)
                                       .where(s.cases.c.id == rec.case_id)).first()
            label = f"{row.prefix}-{row.number}" if row else None
        o = s.outbox
        caused = self.conn.execute(
            select(o.c.id, o.c.template, o.c.recipient, o.c.state, o.c.attempts, o.c.message_id, o.c.last_error)
            .where(o.c.inbound_id == rec.id).order_by(o.c.id))
        return {
            "outbox": [{"id": x.id, "template": x.template, "to": x.recipient, "state": x.state,
                        "attempts": x.attempts, "message_id": x.message_id, "last_error": x.last_error}
                       for x in caused],
            "id": rec.id, "received_at": rec.received_at.isoformat(), "channel": rec.channel,
            "mailbox": rec.mailbox, "envelope_from": rec.envelope_from, "envelope_to": list(rec.envelope_to or []),
            "source": dict(rec.source or {}), "size": rec.size, "raw_sha256": rec.raw_sha256,
            "raw_kept": bool(rec.raw_kept), "state": rec.state, "message_id": rec.message_id,
            "from": rec.from_address, "subject": rec.subject, "case": label, "duplicate_of": rec.duplicate_of,
            "attempts": rec.attempts, "processed_at": rec.processed_at.isoformat() if rec.processed_at else None,
            "error": rec.error, "traceback": rec.traceback, "log": with_received(rec),
        }

    def raw(self, inbound_id: int) -> bytes | None:
        return self.conn.scalar(select(t.c.raw).where(t.c.id == inbound_id))

    def purge_raw(self, before: datetime, now: datetime) -> int:
        """Retention: forget raw bytes and processing logs of records received before ``before``.

        Case data (cases, messages, attachments, timeline) is kept. Records still waiting
        or quarantined keep their bytes: they are not finished with.
        """
        res = self.conn.execute(
            update(t).where(t.c.received_at < before, t.c.raw.isnot(None),
                            t.c.state.notin_([InboundState.RECEIVED, InboundState.QUARANTINED]))
            .values(raw=None, log=[{"at": now.isoformat(), "step": "purged",
                                    "reason": "retention: raw bytes and log removed"}]))
        return int(res.rowcount or 0)


def received_entry(rec: Any) -> dict[str, Any]:
    """The first entry of a processing log, read from the record's own columns."""
    entry: dict[str, Any] = {"at": rec.received_at.isoformat(), "step": "received", "channel": rec.channel,
                             "mailbox": rec.mailbox}
    if rec.source:
        entry["source"] = dict(rec.source)
    return entry


def with_received(rec: Any) -> list[Any]:
    """The processing log with its ``received`` entry (records stored before that entry was
    read from the columns have it in the log already)."""
    log = list(rec.log or [])
    return log if log and log[0].get("step") == "received" else [received_entry(rec), *log]
