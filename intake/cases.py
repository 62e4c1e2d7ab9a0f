"""Case operations: every change to a case, for every caller (DESIGN 3).

The mail flow, the command line, the scheduler and the HTTP edge change cases only through
:class:`CaseOps`. Each operation runs inside the caller's transaction, records a timeline
entry naming its actor (``hanako@example.com``, ``customer@…``, ``system:rules``, ``cli``,
``api:NAME``) and queues the mails it causes (through ``intake.notify``) in the same
transaction. No other module writes case rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from intake.assignment import Assignment
from intake.config import Config, MailboxConfig, parse_duration
from intake.db.cases import CaseRec, ContactRef, StoredAttachment
from intake.loops import LOOP_TAG
from intake.mail.addresses import base_address, organization_domain
from intake.mail.dsn import DeliveryReport
from intake.mail.subjects import clean_subject
from intake.notify import Notified, Notifier, Trigger
from intake.states import Direction, OutboxState, Status, Visibility
from intake.team import Team

if TYPE_CHECKING:
    from intake.db import Tx

log = logging.getLogger("intake.cases")

SYSTEM = "system"
RULES = "system:rules"
LOOP = "system:loop"
BOUNCES = "system:bounce"
OUTBOX = "system:outbox"


@dataclass(frozen=True)
class Incoming:
    """A message that came in, as a case keeps it."""

    message_id: str
    from_address: str | None
    from_name: str
    to: Sequence[tuple[str, str]]  # (address, name)
    cc: Sequence[tuple[str, str]]
    subject: str
    text: str
    html: str | None = None
    sent_at: datetime | None = None
    thread_index: str | None = None
    attachments: Sequence[StoredAttachment] = ()
    inbound_id: int | None = None


@dataclass
class CaseEnv:
    """What the operations need besides the transaction: the configuration, the team (read
    at each use, so that a rule reload applies) and the notifier (None: no mail is queued)."""

    cfg: Config
    team: Callable[[], Team] = Team
    notifier: Notifier | None = None


@dataclass
class CaseOps:
    """The case operations inside one transaction, as of ``at``.

    ``on_step(step, **data)`` hears what an operation decided (the processing log of an
    inbound message records it).
    """

    tx: "Tx"
    env: CaseEnv
    at: datetime
    on_step: Callable[..., None] | None = None
    notified: list[Notified] = field(default_factory=list)

    # -- contacts ------------------------------------------------------------------------

    def contact(self, address: str, name: str = "") -> ContactRef:
        """The contact of an address, made on first sight, with its organization by domain."""
        return self.tx.cases.contact(address, name,
                                     organization_domain(address, self.env.cfg.cases.free_mail_domains))

    def set_contact_language(self, address: str, language: str | None) -> ContactRef:
        """The language of a contact's mail from now on (``ja``, ``en``…; None: detect it)."""
        contact = self.contact(address)
        self.tx.cases.set_contact_language(contact.id, language)
        return contact

    # -- opening -------------------------------------------------------------------------

    def open(self, *, actor: str, message: Incoming, requester: ContactRef | None, queue: str, priority: str,
             category: str | None, channel: str, mailbox: MailboxConfig, language: str, tags: Sequence[str] = (),
             rules: Sequence[dict[str, Any]] = (), assignment: Assignment | None = None,
             ack: str | bool | None = None, mentions: Sequence[int] = (), trigger: Trigger | None = None,
             language_from: str | None = None) -> CaseRec:
        """A new case from an incoming message: numbered, its requester and CC participants,
        the message, the rules that decided it, its assignee; then its mails (acknowledgement,
        agent notice)."""
        cfg = self.env.cfg
        case = self.tx.cases.create(
            prefix=cfg.cases.prefix, subject=clean_subject(message.subject), requester=requester, status=Status.NEW,
            priority=priority, queue=queue, category=category, channel=channel, mailbox=mailbox.address,
            brand=mailbox.brand or None, language=language, tags=list(tags), created_at=self.at)
        self._event(case, "created", {"queue": case.queue, "priority": case.priority, "mailbox": case.mailbox,
                                      "channel": case.channel}, actor=actor, inbound_id=message.inbound_id)
        if requester:
            self.tx.cases.add_participant(case.id, requester, "requester")
        self._add_cc(case, message)
        self._store(case, message, Visibility.PUBLIC, actor)
        for entry in rules:
            self._event(case, "rule", dict(entry), actor=RULES, inbound_id=message.inbound_id)
        if assignment is not None:
            self._assigned(case, assignment, message.inbound_id)
        for number in mentions:
            self.note(case, f"subject names {cfg.cases.prefix}-{number}, but the sender is not its participant",
                      actor=SYSTEM)
        self._step("stored", case=case.label, created=True, language=language, language_from=language_from)
        if self.env.notifier is not None and trigger is not None:
            self._notified(case, self.env.notifier.new_case(self.tx, case, trigger, ack))
        return case

    def follow_up(self, old: CaseRec, **opening: Any) -> CaseRec:
        """A new case for a reply to a case closed too long ago (DESIGN 5), linked to it."""
        case = self.open(**opening)
        self.tx.cases.update(case, linked_case_id=old.id)
        days = self.env.cfg.cases.reopen_days
        self.note(case, f"follow-up of {old.label}, closed more than {days} days ago", actor=SYSTEM,
                  linked=old.label)
        self.note(old, f"customer wrote again: follow-up {case.label}", actor=SYSTEM, linked=case.label)
        return case

    def needs_follow_up(self, case: CaseRec) -> bool:
        """A reply to this case opens a new one: it was closed more than ``reopen_days`` ago."""
        if case.status != Status.CLOSED:
            return False
        closed_at = case.closed_at or case.updated_at
        return self.at - closed_at > timedelta(days=self.env.cfg.cases.reopen_days)

    # -- messages ------------------------------------------------------------------------

    def customer_comment(self, case: CaseRec, message: Incoming, *, actor: str, person: bool, threading: str,
                         trigger: Trigger | None = None) -> None:
        """A customer's message on a case, or an automated one (``person`` False: an
        auto-reply, our own mail coming back). A person's message adds its sender and CCs as
        participants and reopens a pending, resolved or closed case; its agents hear of it."""
        self._store(case, message, Visibility.PUBLIC, actor, threading=threading)
        status_change: tuple[str, str] | None = None
        if person:
            if message.from_address:
                self.tx.cases.add_participant(case.id, self.contact(message.from_address, message.from_name), "cc")
            self._add_cc(case, message)
            if case.status in (Status.RESOLVED, Status.CLOSED, Status.PENDING):
                status_change = (case.status, Status.OPEN)
                self.set_status(case, Status.OPEN, actor=actor, reason="customer replied")
        self.tx.cases.update(case, updated_at=self.at)
        self._step("stored", case=case.label, created=False, visibility=Visibility.PUBLIC)
        if self.env.notifier is not None and trigger is not None and person:
            self._notified(case, self.env.notifier.customer_comment(self.tx, case, trigger, status_change))

    def agent_reply(self, case: CaseRec, message: Incoming, *, actor: str, threading: str, text: str,
                    trigger: Trigger | None = None) -> None:
        """An agent's public reply: stored, mailed to the requester with the case's CCs (``text``:
        the reply without its quoted history); the first one sets ``first_response_at``."""
        self._store(case, message, Visibility.PUBLIC, actor, threading=threading)
        changes: dict[str, Any] = {"updated_at": self.at}
        if case.first_response_at is None:
            changes["first_response_at"] = self.at
        self.tx.cases.update(case, **changes)
        self._step("stored", case=case.label, created=False, visibility=Visibility.PUBLIC)
        if self.env.notifier is not None and trigger is not None:
            cc = [(a, n) for a, n, role in self.tx.cases.participants(case.id)
                  if role == "cc" and a != (message.from_address or "").lower()]
            self._notified(case, self.env.notifier.agent_reply(self.tx, case, trigger, text, cc))

    def internal_message(self, case: CaseRec, message: Incoming, *, actor: str, threading: str) -> None:
        """A message for agents only (sent to the case's note address): on the timeline, never
        to customers."""
        self._store(case, message, Visibility.INTERNAL, actor, threading=threading)
        self.tx.cases.update(case, updated_at=self.at)
        self._step("stored", case=case.label, created=False, visibility=Visibility.INTERNAL)

    def note(self, case: CaseRec, text: str, *, actor: str, **data: Any) -> None:
        """A note on the timeline (no mail)."""
        self._event(case, "note", {"text": text, **data}, actor=actor)

    def record_duplicate(self, case: CaseRec, *, message_id: str, mailbox: str, channel: str,
                         inbound_id: int) -> None:
        """The same message arrived again (another mailbox, an SMTP retry, an IMAP re-poll)."""
        self._event(case, "duplicate", {"message_id": message_id, "mailbox": mailbox, "channel": channel,
                                        "inbound_id": inbound_id}, actor=SYSTEM, inbound_id=inbound_id)

    def record_bounce(self, case: CaseRec, message: Incoming, report: DeliveryReport, ref: str | None) -> list[int]:
        """A bounce of our mail (DESIGN 4): on the timeline, internal. It acts only on what it
        proves: the outbox rows it names (by Message-ID, else by a recipient of this case's
        mail when it came to the case's signed return path) are marked bounced and those
        rows' failed recipients get no automated mail for a while; every other address it
        names is recorded, not acted on. Returns the outbox rows marked."""
        row = self._store(case, message, Visibility.INTERNAL, BOUNCES, event=False)
        outbox = self.tx.outbox
        failed = {a.lower() for a in report.recipients}
        rows = outbox.by_message_ids([ref]) if ref else []
        rows = [r for r in rows if r.case_id == case.id or r.case_id is None]
        if not rows and failed:
            live = (OutboxState.SENT, OutboxState.SENDING, OutboxState.QUEUED)
            rows = [r for r in outbox.for_case(case.id, states=live) if r.recipient in failed][:1]
        marked: list[int] = []
        suppressed: list[str] = []
        if report.permanent:
            until = self.at + timedelta(seconds=parse_duration(self.env.cfg.notify.suppress_after_failure))
            for r in rows:
                if r.state in (OutboxState.SENT, OutboxState.QUEUED, OutboxState.SENDING):
                    outbox.mark_bounced(r.id, self.at, f"bounced (inbound #{message.inbound_id})")
                    marked.append(r.id)
                ours = {a.lower() for a in r.recipients}
                for addr in (failed & ours) or ({r.recipient} if not failed else set()):
                    outbox.suppress(addr, until, f"bounce of <{r.message_id}>", self.at)
                    suppressed.append(addr)
        ignored = sorted(failed - set(suppressed))
        data: dict[str, Any] = {"bounced_message_id": ref or None, "recipients": sorted(failed),
                                "permanent": report.permanent, "outbox": marked, "suppressed": sorted(set(suppressed))}
        if ignored:
            data["not_acted_on"] = ignored
        self._event(case, "bounce", data, actor=BOUNCES, message_row=row, inbound_id=message.inbound_id)
        return marked

    def record_mail_failure(self, case_id: int, *, message_id: str, to: str, template: str, reply: str | None,
                            permanent: bool) -> None:
        """A mail of the case could not be delivered (the outbox sender's result)."""
        self.tx.cases.add_event(case_id, "mail_failed", {"message_id": message_id, "to": to, "template": template,
                                                         "reply": reply, "permanent": permanent},
                                actor=OUTBOX, at=self.at)

    # -- fields --------------------------------------------------------------------------

    def set_status(self, case: CaseRec, status: str, *, actor: str, reason: str = "") -> bool:
        """Change the status (``resolved_at``/``closed_at`` follow it); False when unchanged."""
        status = Status(status)
        old = case.status
        if old == status:
            return False
        changes: dict[str, Any] = {"status": status, "updated_at": self.at}
        if status == Status.RESOLVED:
            changes["resolved_at"] = self.at
        elif status == Status.CLOSED:
            changes["closed_at"] = self.at
        self.tx.cases.update(case, **changes)
        self._event(case, "status", {"from": old, "to": str(status), "reason": reason}, actor=actor)
        self._step("status", case=case.label, **{"from": old, "to": str(status)})
        return True

    def tag(self, case: CaseRec, tag: str, *, actor: str) -> bool:
        """Add a tag; False when the case has it already."""
        if tag in case.tags:
            return False
        self.tx.cases.update(case, tags=[*case.tags, tag], updated_at=self.at)
        self._event(case, "tags", {"added": [tag], "tags": list(case.tags)}, actor=actor)
        return True

    def assign(self, case: CaseRec, agent: str | None, *, actor: str, reason: str = "",
               **data: Any) -> bool:
        """Give the case to an agent (None: nobody); False when unchanged."""
        agent = agent.lower() if agent else None
        old = case.assignee
        if old == agent:
            return False
        self.tx.cases.update(case, assignee=agent, updated_at=self.at)
        self._event(case, "assignee", {"from": old, "to": agent, "reason": reason, **data}, actor=actor)
        return True

    # -- inside --------------------------------------------------------------------------

    def _assigned(self, case: CaseRec, a: Assignment, inbound_id: int | None) -> None:
        if a.agent is None:
            self.note(case, f"not assigned: {a.reason}", actor=RULES, rule=a.rule)
            self._step("assigned", assignee=None, method=a.method, rule=a.rule, reason=a.reason)
            return
        data: dict[str, Any] = {"method": a.method, "rule": a.rule, "queue": case.queue}
        if a.away:
            data["away"] = True
        self.tx.cases.update(case, assignee=a.agent)
        self._event(case, "assignee", {"from": None, "to": a.agent, **data, "reason": a.reason}, actor=RULES,
                    inbound_id=inbound_id)
        self._step("assigned", assignee=a.agent, method=a.method, rule=a.rule, reason=a.reason)

    def _add_cc(self, case: CaseRec, message: Incoming) -> None:
        """The To/Cc of a message become participants, except our own addresses and the sender."""
        cfg = self.env.cfg
        own = cfg.own_addresses
        sender = (message.from_address or "").lower()
        for address, name in [*message.to, *message.cc]:
            key = address.lower()
            if base_address(key) in own or key == sender or cfg.mailbox_for(key) is not None:
                continue
            self.tx.cases.add_participant(case.id, self.contact(address, name), "cc")

    def _store(self, case: CaseRec, message: Incoming, visibility: str, actor: str, *, threading: str | None = None,
               event: bool = True) -> int:
        row = self.tx.cases.add_message(
            case.id, direction=Direction.IN, visibility=visibility, message_id=message.message_id,
            from_address=message.from_address, from_name=message.from_name or None,
            to=[a for a, _ in message.to], cc=[a for a, _ in message.cc], subject=message.subject, text=message.text,
            html=message.html, sent_at=message.sent_at, inbound_id=message.inbound_id,
            thread_index=message.thread_index, attachments=message.attachments)
        if event:
            self._event(case, "message", {"threading": threading} if threading else None, actor=actor,
                        message_row=row, inbound_id=message.inbound_id)
        return row

    def _event(self, case: CaseRec, type_: str, data: dict[str, Any] | None, *, actor: str,
               message_row: int | None = None, inbound_id: int | None = None) -> None:
        self.tx.cases.add_event(case.id, type_, data, actor=actor, message_row=message_row, inbound_id=inbound_id,
                                at=self.at)

    def _notified(self, case: CaseRec, done: Notified) -> None:
        self.notified.append(done)
        if done.queued or done.skipped:
            self._step("notify", **done.as_log())
        if done.loop is not None and LOOP_TAG not in case.tags:
            self.tx.cases.update(case, tags=[*case.tags, LOOP_TAG])
            self._event(case, "loop", {"text": f"automated mail stopped: {done.loop}; remove the tag "
                                               f"'{LOOP_TAG}' to send automated mail again"}, actor=LOOP)
            log.warning("mail loop case=%s: %s", case.label, done.loop)

    def _step(self, step: str, **data: Any) -> None:
        if self.on_step is not None:
            self.on_step(step, **data)
