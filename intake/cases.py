"""Case operations: every change to a case, for every caller (DESIGN 3, 5).

The mail flow (agent commands), the command line, the scheduler and the HTTP edge change
cases only through :class:`CaseOps`. Each operation runs inside the caller's transaction,
records a timeline entry naming its actor (``hanako@example.com``, ``customer@…``,
``system:rules``, ``cli``, ``api:NAME``) and queues the mails it causes (through
``intake.notify``) in the same transaction. No other module writes case rows.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email.utils import make_msgid
from typing import TYPE_CHECKING, Any

from intake.assignment import Assignment
from intake.commands import Command
from intake.config import Config, MailboxConfig, parse_duration
from intake.db.cases import CaseRec, ContactRef, StoredAttachment, parse_case_label
from intake.db.outbox import OutboxFile
from intake.loops import LOOP_TAG
from intake.mail.addresses import base_address, organization_domain
from intake.mail.classify import AGENT
from intake.mail.dsn import DeliveryReport
from intake.mail.subjects import clean_subject
from intake.notify import Notified, Notifier, Trigger
from intake.states import Audience, Direction, OutboxState, Priority, Status, Visibility
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
    """A message that came in (a mail, or what an agent typed on the command line), as a case keeps it."""

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

    def with_text(self, text: str) -> "Incoming":
        """The same message with its new text only (quoted history or commands removed)."""
        return replace(self, text=text)


@dataclass(frozen=True)
class FileAttachment:
    """A file an agent sends from the command line (or any caller that is not a mail)."""

    display_name: str
    content_type: str
    payload: bytes = field(repr=False)
    inline: bool = False
    content_id: str | None = None

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    @classmethod
    def of(cls, filename: str, data: bytes, content_type: str | None = None) -> "FileAttachment":
        guessed = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return cls(filename, guessed, data)


@dataclass
class CaseEnv:
    """What the operations need besides the transaction: the configuration, the team (read
    at each use, so that a rule reload applies) and the notifier (None: no mail is queued)."""

    cfg: Config
    team: Callable[[], Team] = Team
    notifier: Notifier | None = None


class Refused(Exception):
    """An operation that cannot be done as asked; the message says why (to a person)."""


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

    # -- finding -------------------------------------------------------------------------

    def case(self, label: str) -> CaseRec:
        """The case of a label (``CASE-12``); ``Refused`` when there is none."""
        number = parse_case_label(label)
        case = self.tx.cases.by_number(number) if number is not None else None
        if case is None:
            raise Refused(f"no case {label}")
        return case

    def surviving(self, case: CaseRec) -> CaseRec:
        """The case that carries on a merged one's conversation (itself when not merged)."""
        seen = {case.id}
        while case.merged_into_id is not None:
            nxt = self.tx.cases.by_id(case.merged_into_id)
            if nxt is None or nxt.id in seen:
                break
            seen.add(nxt.id)
            case = nxt
        return case

    # -- opening -------------------------------------------------------------------------

    def open(self, *, actor: str, message: Incoming, requester: ContactRef | None, queue: str, priority: str,
             category: str | None, channel: str, mailbox: MailboxConfig, language: str, tags: Sequence[str] = (),
             rules: Sequence[dict[str, Any]] = (), assignment: Assignment | None = None,
             ack: str | bool | None = None, mentions: Sequence[int] = (), trigger: Trigger | None = None,
             language_from: str | None = None) -> CaseRec:
        """A new case from an incoming message: numbered, its requester and the people of its
        To/Cc, the message, the rules that decided it, its assignee; then its mails
        (acknowledgement, agent notice with the customer's files)."""
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
        row = self._store(case, message, Visibility.PUBLIC, actor)
        for entry in rules:
            self._event(case, "rule", dict(entry), actor=RULES, inbound_id=message.inbound_id)
        if assignment is not None:
            self._assigned(case, assignment, message.inbound_id)
        for number in mentions:
            old = self.tx.cases.by_number(number)
            if old is None:
                continue
            self.remark(case, f"subject names {old.label}, but the sender is not its participant", actor=SYSTEM,
                        linked=old.label)
            if self.tx.cases.add_link(case.id, old.id, "mentioned", SYSTEM, self.at):
                self.remark(old, f"{case.label} names this case in its subject; its sender is not a participant, so "
                                 "it became a case of its own", actor=SYSTEM, linked=case.label)
        self._step("stored", case=case.label, created=True, language=language, language_from=language_from)
        if self.env.notifier is not None and trigger is not None:
            self._notified(case, self.env.notifier.new_case(self.tx, case, trigger, ack,
                                                            files=self._files(row, message)))
        return case

    def follow_up(self, old: CaseRec, **opening: Any) -> CaseRec:
        """A new case for a reply to a case closed too long ago (DESIGN 5), linked to it."""
        case = self.open(**opening)
        self.tx.cases.update(case, linked_case_id=old.id)
        self.tx.cases.add_link(case.id, old.id, "follow-up", SYSTEM, self.at)
        policy = self._queue(old)
        why = ("its queue opens a new case for any reply to a closed one" if policy and
               policy.on_reply_to_closed == "new_case" else f"closed more than {self._reopen_days(old)} days ago")
        self.remark(case, f"follow-up of {old.label}: {why}", actor=SYSTEM, linked=old.label)
        self.remark(old, f"customer wrote again: follow-up {case.label}", actor=SYSTEM, linked=case.label)
        return case

    def needs_follow_up(self, case: CaseRec) -> bool:
        """A reply to this case opens a new one: it is closed, and its queue says so
        (``on_reply_to_closed: new_case``) or it was closed more than ``reopen_days`` ago."""
        if case.status != Status.CLOSED:
            return False
        queue = self._queue(case)
        if queue is not None and queue.on_reply_to_closed == "new_case":
            return True
        closed_at = case.closed_at or case.updated_at
        return self.at - closed_at > timedelta(days=self._reopen_days(case))

    # -- messages ------------------------------------------------------------------------

    def customer_comment(self, case: CaseRec, message: Incoming, *, actor: str, person: bool, threading: str,
                         trigger: Trigger | None = None, unauthenticated: str | None = None,
                         internal_route: bool = False) -> None:
        """A customer's message on a case, or an automated one (``person`` False: an auto-reply,
        our own mail coming back). A person's message reopens a pending, resolved or closed
        case and its agents hear of it (with the customer's files). The requester's To/Cc
        become participants; anyone else who writes joins as a contributor (in Cc of agent
        replies only while in the To/Cc of the mail being answered). ``unauthenticated`` is
        why mail from an agent's address was not taken as the agent's (kept on the timeline).
        ``internal_route``: it came to the note address or answers an internal mail (a note
        forwarded out of the team): kept internal, and its writer joins nobody."""
        data: dict[str, Any] = {}
        if unauthenticated:
            data["unauthenticated"] = unauthenticated
        if internal_route:
            data["internal_route"] = True
        visibility = Visibility.INTERNAL if internal_route else Visibility.PUBLIC
        row = self._store(case, message, visibility, actor, threading=threading, data=data or None)
        status_change: tuple[str, str] | None = None
        if person:
            sender = (message.from_address or "").lower()
            # An internal address reached from outside: nobody joins by it.
            if not internal_route and case.requester is not None and sender == case.requester.address:
                self._add_cc(case, message)
            elif not internal_route and message.from_address:
                self.tx.cases.add_participant(case.id, self.contact(message.from_address, message.from_name),
                                              "contributor")
            if case.status in (Status.RESOLVED, Status.CLOSED, Status.PENDING):
                status_change = (case.status, Status.OPEN)
                self.set_status(case, Status.OPEN, actor=actor, reason="customer replied", notify=False)
        self.tx.cases.update(case, updated_at=self.at)
        self._step("stored", case=case.label, created=False, visibility=visibility)
        if self.env.notifier is not None and trigger is not None and person:
            self._notified(case, self.env.notifier.customer_comment(self.tx, case, trigger, status_change,
                                                                    files=self._files(row, message)))

    def reply(self, case: CaseRec, message: Incoming, *, actor: str, text: str, threading: str | None = None,
              trigger: Trigger | None = None, keep_status: bool = False) -> None:
        """An agent's public reply: stored, mailed by ``agent_reply`` to the requester with the
        case's participants in Cc and the agent's files. ``text`` is the reply without its
        quoted history and commands. The first one sets ``first_response_at``; a reply moves
        a new or open case to its queue's ``reply_status`` (pending) unless ``keep_status``
        (a ``#status`` command said otherwise)."""
        row = self._store(case, message, Visibility.PUBLIC, actor, threading=threading, text=text)
        changes: dict[str, Any] = {"updated_at": self.at}
        if case.first_response_at is None:
            changes["first_response_at"] = self.at
        self.tx.cases.update(case, **changes)
        self._step("stored", case=case.label, created=False, visibility=Visibility.PUBLIC)
        if not keep_status and case.status in (Status.NEW, Status.OPEN):
            queue = self._queue(case)
            wanted = Status(queue.reply_status if queue else Status.PENDING)
            if wanted != case.status:
                self.set_status(case, wanted, actor=actor, reason="agent replied", notify=False)
        if self.env.notifier is not None:
            trigger = trigger or self._trigger(actor, message)
            self._notified(case, self.env.notifier.agent_reply(self.tx, case, trigger, text, self._cc(case, actor),
                                                               files=self._files(row, message)))

    def note(self, case: CaseRec, message: Incoming, *, actor: str, text: str, threading: str | None = None,
             trigger: Trigger | None = None) -> None:
        """An internal note: on the timeline and mailed to the case's other agents (its
        assignee and its queue's agents, not the author), never to a customer."""
        row = self._store(case, message, Visibility.INTERNAL, actor, threading=threading, text=text)
        self.tx.cases.update(case, updated_at=self.at)
        self._step("stored", case=case.label, created=False, visibility=Visibility.INTERNAL)
        if self.env.notifier is not None:
            team = self.env.team()
            me = actor.lower()
            to = [(a, n) for a, n in [*team.notified_of(case.assignee, case.queue), *team.colleagues(case.queue, me)]
                  if a != me]
            trigger = trigger or self._trigger(actor, message)
            self._notified(case, self.env.notifier.internal_note(self.tx, case, trigger, text, list(dict.fromkeys(to)),
                                                                 files=self._files(row, message)))

    def agent_acted(self, case: CaseRec, *, actor: str) -> bool:
        """An agent worked on a new case without answering the customer (a note, a command, a
        change): it is ``open`` now (DESIGN 5 "Lifecycle": new → open when an agent acts).
        False when it was not new."""
        if case.status != Status.NEW:
            return False
        return self.set_status(case, Status.OPEN, actor=actor, reason="agent acted", notify=False)

    def internal_message(self, case: CaseRec, message: Incoming, *, actor: str, threading: str,
                         **data: Any) -> int:
        """A message kept for agents only, mailed to nobody (our own mail coming back, an
        agent's auto-reply); its row id."""
        row = self._store(case, message, Visibility.INTERNAL, actor, threading=threading, event=False)
        self._event(case, "message", {"threading": threading, **data}, actor=actor, message_row=row,
                    inbound_id=message.inbound_id)
        self.tx.cases.update(case, updated_at=self.at)
        self._step("stored", case=case.label, created=False, visibility=Visibility.INTERNAL)
        return row

    def unauthenticated(self, case: CaseRec, message: Incoming, *, agent: str, reason: str, threading: str,
                        trigger: Trigger) -> None:
        """Mail from an agent's address that could not be shown to be the agent's (DESIGN 5):
        a customer comment, never relayed to customers, its commands not applied; the agent
        is told why by mail. Anyone can write such a mail, so it changes nothing else: no
        reopening, nobody joins, no other notice."""
        self.customer_comment(case, message, actor=agent, person=False, threading=threading, trigger=trigger,
                              unauthenticated=reason)
        self.agent_refused(case, agent, reason, trigger)

    def agent_refused(self, case: CaseRec, agent: str, reason: str, trigger: Trigger) -> None:
        """Tell an agent their mail was not accepted as theirs (it opened or joined ``case`` as a
        customer's), and why."""
        self.remark(case, f"mail from {agent} not accepted as the agent's: {reason}", actor=SYSTEM)
        if self.env.notifier is not None:
            self._notified(case, self.env.notifier.agent_notice(
                self.tx, case, trigger, (agent, self.env.team().name_of(agent)), "unauthenticated", [{"reason": reason}]))

    def refused_commands(self, case: CaseRec, agent: str, refusals: Sequence[dict[str, str]],
                         trigger: Trigger | None = None) -> None:
        """Tell an agent which of their commands were not applied, and why."""
        if not refusals:
            return
        self._event(case, "commands_refused", {"refused": list(refusals)}, actor=agent)
        if self.env.notifier is not None:
            trigger = trigger or self._trigger(agent, None)
            self._notified(case, self.env.notifier.agent_notice(
                self.tx, case, trigger, (agent, self.env.team().name_of(agent)), "refused", refusals))

    def remark(self, case: CaseRec, text: str, *, actor: str, **data: Any) -> None:
        """A remark on the timeline (no mail): what intake or an operator wants kept."""
        self._event(case, "note", {"text": text, **data}, actor=actor)

    def record_duplicate(self, case: CaseRec, *, message_id: str, mailbox: str, channel: str,
                         inbound_id: int) -> None:
        """The same message arrived again (another mailbox, an SMTP retry, an IMAP re-poll)."""
        self._event(case, "duplicate", {"message_id": message_id, "mailbox": mailbox, "channel": channel,
                                        "inbound_id": inbound_id}, actor=SYSTEM, inbound_id=inbound_id)

    def record_bounce(self, case: CaseRec, message: Incoming, report: DeliveryReport, ref: str | None) -> list[int]:
        """A bounce of our mail (DESIGN 4): on the timeline, internal. It acts only on what it
        proves: the outbox rows it names (by Message-ID, else by a recipient of this case's
        mail to the customer side when it came to the case's signed return path) are marked
        bounced and those rows' failed recipients get no automated mail for a while; every
        other address it names is recorded, not acted on. Returns the outbox rows marked."""
        row = self._store(case, message, Visibility.INTERNAL, BOUNCES, event=False)
        outbox = self.tx.outbox
        failed = {a.lower() for a in report.recipients}
        # A Message-ID that is none of our mails (the customer's own, which everyone on the
        # mail knows) proves nothing; the signed address alone is known to everyone who got
        # mail of the case, agents included, so it stands only for the customer side's mail.
        rows = outbox.by_message_ids([ref]) if ref else []
        rows = [r for r in rows if r.case_id == case.id or r.case_id is None]
        if not ref and failed:
            live = (OutboxState.SENT, OutboxState.SENDING, OutboxState.QUEUED)
            rows = [r for r in outbox.for_case(case.id, states=live)
                    if r.recipient in failed and r.audience == Audience.CUSTOMER][:1]
        marked: list[int] = []
        suppressed: list[str] = []
        if report.permanent:
            until = self.at + timedelta(seconds=parse_duration(self.env.cfg.notify.suppress_after_failure))
            for r in rows:
                if failed and not failed & {a.lower() for a in r.recipients}:
                    continue  # names our mail, but none of its recipients
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

    def set_status(self, case: CaseRec, status: str, *, actor: str, reason: str = "", notify: bool = True) -> bool:
        """Change the status (``resolved_at``/``closed_at`` follow it); False when unchanged.

        Resolving tells the customer (``status_changed``, with the resolution notes) when the
        queue says so (``resolved_notice``, on by default)."""
        status = Status(status)
        old = case.status
        if old == status:
            return False
        changes: dict[str, Any] = {"status": status, "updated_at": self.at}
        if status == Status.RESOLVED:
            changes["resolved_at"] = self.at
        elif status == Status.CLOSED:
            changes["closed_at"] = self.at
        elif case.resolved_at is not None or case.closed_at is not None:
            # Reopened: no longer resolved or closed (the timeline keeps when it was).
            changes.update(resolved_at=None, closed_at=None)
        self.tx.cases.update(case, **changes)
        self._event(case, "status", {"from": old, "to": str(status), "reason": reason}, actor=actor)
        self._step("status", case=case.label, **{"from": old, "to": str(status)})
        queue = self._queue(case)
        if notify and status == Status.RESOLVED and (queue is None or queue.resolved_notice) \
                and self.env.notifier is not None:
            self._notified(case, self.env.notifier.status_changed(self.tx, case, old, status,
                                                                  self._trigger(actor, None), reason))
        return True

    def set_priority(self, case: CaseRec, priority: str, *, actor: str) -> bool:
        return self._set(case, "priority", str(Priority(priority)), actor)

    def set_category(self, case: CaseRec, category: str | None, *, actor: str) -> bool:
        return self._set(case, "category", category or None, actor)

    def set_resolution(self, case: CaseRec, text: str | None, *, actor: str) -> bool:
        return self._set(case, "resolution", text or None, actor)

    def set_queue(self, case: CaseRec, queue: str, *, actor: str) -> bool:
        """Move the case to another queue (one the rules define)."""
        team = self.env.team()
        if team.queue(queue) is None:
            known = ", ".join(sorted(team.queues)) or "none are defined"
            raise Refused(f"no queue {queue!r} (queues: {known})")
        return self._set(case, "queue", queue, actor)

    def assign(self, case: CaseRec, agent: str | None, *, actor: str, reason: str = "", **data: Any) -> bool:
        """Give the case to an agent (None: nobody); False when unchanged. An address that is
        not an agent of the rules is refused."""
        agent = agent.lower() if agent else None
        if agent is not None and self.env.team().agent(agent) is None:
            raise Refused(f"{agent} is not an agent (list agents under agents: in the rules)")
        old = case.assignee
        if old == agent:
            return False
        self.tx.cases.update(case, assignee=agent, updated_at=self.at)
        self._event(case, "assignee", {"from": old, "to": agent, "reason": reason, **data}, actor=actor)
        return True

    def tag(self, case: CaseRec, tag: str, *, actor: str) -> bool:
        """Add a tag; False when the case has it already."""
        if tag in case.tags:
            return False
        self.tx.cases.update(case, tags=[*case.tags, tag], updated_at=self.at)
        self._event(case, "tags", {"added": [tag], "tags": list(case.tags)}, actor=actor)
        return True

    def untag(self, case: CaseRec, tag: str, *, actor: str) -> bool:
        """Remove a tag; False when the case does not have it."""
        if tag not in case.tags:
            return False
        self.tx.cases.update(case, tags=[t for t in case.tags if t != tag], updated_at=self.at)
        self._event(case, "tags", {"removed": [tag], "tags": list(case.tags)}, actor=actor)
        return True

    def apply(self, case: CaseRec, command: Command, *, actor: str) -> CaseRec:
        """One mail command, with the agent as actor; the case the mail goes on with (another
        one after ``#merge``). ``Refused`` says why it cannot be applied."""
        name, value = command.name, command.value
        if name == "status":
            self.set_status(case, value, actor=actor, reason="#status")
        elif name == "priority":
            self.set_priority(case, value, actor=actor)
        elif name == "assign":
            self.assign(case, {"me": actor, "none": None}.get(value, value), actor=actor, reason="#assign")
        elif name == "queue":
            self.set_queue(case, value, actor=actor)
        elif name == "category":
            self.set_category(case, value, actor=actor)
        elif name == "tag":
            self.tag(case, value, actor=actor)
        elif name == "untag":
            if not self.untag(case, value, actor=actor):
                raise Refused(f"{case.label} has no tag {value!r}")
        elif name == "resolution":
            self.set_resolution(case, value, actor=actor)
        elif name == "merge":
            prefix = self.env.cfg.cases.prefix
            if value.rsplit("-", 1)[0] != prefix.upper():
                raise Refused(f"no case {value} (case numbers here read {prefix}-N)")
            return self.merge(case, self.case(value), actor=actor)
        return case

    # -- links and merges ----------------------------------------------------------------

    def link(self, case: CaseRec, other: CaseRec, *, actor: str) -> bool:
        """Two cases belong together; both timelines show it. False when they were linked."""
        if case.id == other.id:
            raise Refused("a case cannot be linked to itself")
        # A link has no direction: B-A is the A-B link already made.
        if (other.label, "related") in {(label, kind) for label, kind, _ in self.tx.cases.links(case.id)}:
            return False
        if not self.tx.cases.add_link(case.id, other.id, "related", actor, self.at):
            return False
        self._event(case, "link", {"case": other.label}, actor=actor)
        self._event(other, "link", {"case": case.label}, actor=actor)
        return True

    def merge(self, case: CaseRec, into: CaseRec, *, actor: str) -> CaseRec:
        """Merge a duplicate ``case`` into ``into`` (DESIGN 5): its messages, participants and
        thread evidence move there, it is closed as merged, and later mail to its threads
        lands on ``into``. Returns ``into``."""
        into = self.surviving(into)
        if case.id == into.id:
            raise Refused(f"{case.label} cannot be merged into itself")
        if case.merged_into_id is not None:
            raise Refused(f"{case.label} is already merged")
        moved = self.tx.cases.move_thread(case.id, into.id)
        for contact, role in self.tx.cases.participants_with_ids(case.id):
            self.tx.cases.add_participant(into.id, contact, "cc" if role == "requester" else role)
        self.tx.cases.add_link(case.id, into.id, "merged", actor, self.at)
        self.tx.cases.update(case, merged_into_id=into.id, resolution=f"merged into {into.label}")
        self.set_status(case, Status.CLOSED, actor=actor, reason=f"merged into {into.label}", notify=False)
        self._event(case, "merged", {"into": into.label, "messages": moved}, actor=actor)
        self._event(into, "merged", {"from": case.label, "messages": moved}, actor=actor)
        self.tx.cases.update(into, updated_at=self.at)
        return into

    # -- inside --------------------------------------------------------------------------

    def _set(self, case: CaseRec, field_name: str, value: Any, actor: str) -> bool:
        old = getattr(case, field_name)
        if old == value:
            return False
        self.tx.cases.update(case, **{field_name: value, "updated_at": self.at})
        self._event(case, field_name, {"from": old, "to": value}, actor=actor)
        return True

    def _queue(self, case: CaseRec) -> Any:
        return self.env.team().queue(case.queue)

    def _reopen_days(self, case: CaseRec) -> int:
        queue = self._queue(case)
        return queue.reopen_days if queue is not None and queue.reopen_days is not None \
            else self.env.cfg.cases.reopen_days

    def _assigned(self, case: CaseRec, a: Assignment, inbound_id: int | None) -> None:
        if a.agent is None:
            self.remark(case, f"not assigned: {a.reason}", actor=RULES, rule=a.rule)
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
        """The To/Cc of the requester's mail become participants (up to ``max_participants``),
        except our own addresses and the sender."""
        cfg = self.env.cfg
        own = cfg.own_addresses
        sender = (message.from_address or "").lower()
        room: int | None = None  # counted at the first candidate: most mail names only us
        for address, name in [*message.to, *message.cc]:
            key = address.lower()
            if base_address(key) in own or key == sender or cfg.mailbox_for(key) is not None:
                continue
            if room is None:
                room = cfg.cases.max_participants - len(self.tx.cases.participants(case.id))
            if room <= 0:
                self.remark(case, f"not a participant: {key} (a case keeps at most {cfg.cases.max_participants})",
                            actor=SYSTEM)
                break
            self.tx.cases.add_participant(case.id, self.contact(address, name), "cc")
            room -= 1

    def _cc(self, case: CaseRec, agent: str) -> list[tuple[str, str]]:
        """Who is in Cc of an agent reply: the participants from the requester's To/Cc, and a
        contributor only while in the To/Cc (or the From) of the mail being answered."""
        team = self.env.team()
        present = set(self.tx.cases.last_customer_message(case.id, team.addresses))
        requester = case.requester.address if case.requester else ""
        out = []
        for a, n, role in self.tx.cases.participants(case.id):
            if a in (requester, agent.lower()) or team.agent(a) is not None:
                continue
            if role == "cc" or (role == "contributor" and a in present):
                out.append((a, n))
        return out

    def _files(self, message_row: int, message: Incoming) -> list[OutboxFile]:
        """The files of a stored message as mail attachments (inline images of an HTML body
        are not files anybody sent)."""
        if not message.attachments:  # most mail: no query
            return []
        return [OutboxFile(sha, name or "attachment", ctype, size)
                for sha, name, ctype, size, inline in self.tx.cases.message_files(message_row) if not inline]

    def _trigger(self, actor: str, message: Incoming | None) -> Trigger:
        """The change as notify sees it when no inbound mail caused it (the command line, a job)."""
        is_agent = self.env.team().agent(actor) is not None
        return Trigger(at=self.at, inbound_id=message.inbound_id if message else None,
                       message_id=message.message_id if message else None, sender=actor.lower(),
                       sender_name=self.env.team().name_of(actor), sender_class=AGENT if is_agent else SYSTEM,
                       subject=message.subject if message else "", text=message.text if message else "")

    def _store(self, case: CaseRec, message: Incoming, visibility: str, actor: str, *, threading: str | None = None,
               event: bool = True, text: str | None = None, data: dict[str, Any] | None = None) -> int:
        row = self.tx.cases.add_message(
            case.id, direction=Direction.IN, visibility=visibility, message_id=message.message_id,
            from_address=message.from_address, from_name=message.from_name or None,
            to=[a for a, _ in message.to], cc=[a for a, _ in message.cc], subject=message.subject,
            text=message.text if text is None else text, html=message.html, sent_at=message.sent_at,
            inbound_id=message.inbound_id, thread_index=message.thread_index, attachments=message.attachments)
        if event:
            data = {**({"threading": threading} if threading else {}), **(data or {})}
            self._event(case, "message", data or None, actor=actor, message_row=row, inbound_id=message.inbound_id)
        return row

    def _event(self, case: CaseRec, type_: str, data: dict[str, Any] | None, *, actor: str,
               message_row: int | None = None, inbound_id: int | None = None) -> None:
        self.tx.cases.add_event(case.id, type_, data, actor=actor, message_row=message_row, inbound_id=inbound_id,
                                at=self.at)

    def mail_sent(self, message_row: int, at: datetime) -> None:
        """An outgoing message of a case was accepted by the relay (or written out) at ``at``."""
        self.tx.cases.set_message_sent(message_row, at)

    def _notified(self, case: CaseRec, done: Notified) -> None:
        """Record what the notifier decided: each mail's message row and timeline entry, then
        its outbox row; each skipped mail on the timeline; the loop flag."""
        for out in done.pending:
            mail = out.mail
            row = self.tx.cases.add_message(
                case.id, direction=Direction.OUT, visibility=Visibility.PUBLIC if out.public else Visibility.INTERNAL,
                message_id=mail.message_id, from_address=out.from_address, from_name=out.from_name,
                to=[mail.recipient], cc=out.cc, subject=mail.subject, text=mail.text, html=mail.html, sent_at=None)
            self.tx.cases.add_event(case.id, "message", out.event, actor=out.actor, message_row=row, at=mail.at)
            outbox_id = self.tx.outbox.add(replace(mail, message_row_id=row))
            done.queued.append({"outbox": outbox_id, "template": mail.template, "to": mail.recipient,
                                "message_id": mail.message_id})
            log.info("outbox queued #%d case=%s template=%s to=%s message_id=<%s>", outbox_id, case.label,
                     mail.template, mail.recipient, mail.message_id)
        for skip in done.skipped:
            self.tx.cases.add_event(case.id, "mail_skipped", dict(skip), actor="system", at=done.at or self.at)
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


def typed(case: CaseRec, actor: str, text: str, *, mailbox: str,
          attachments: Sequence[FileAttachment] = ()) -> Incoming:
    """What an agent typed outside mail (the command line, the API), as a message of the case."""
    domain = mailbox.rpartition("@")[2] or "intake.invalid"
    return Incoming(message_id=make_msgid(idstring=f"{case.label.lower()}.typed", domain=domain)[1:-1],
                    from_address=actor, from_name="", to=[], cc=[], subject=f"Re: {case.subject}", text=text,
                    attachments=attachments)
