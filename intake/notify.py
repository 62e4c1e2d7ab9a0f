"""Which mails a change causes, rendered, for the change's transaction.

The case operations (``intake.cases``) call a :class:`Notifier` inside the transaction that
makes the change. Each mail goes through the loop-protection rule (``intake.loops``, pure,
over facts the store gathered) and is rendered from plain data by :mod:`intake.templates`.
The operation then stores it twice in the same transaction: as an outgoing message on the
case timeline (so that replies thread by References) and as an outbox row that
:mod:`intake.edges.outbox_sender` delivers. Nothing is sent here and nothing about a case
is written here: what the notifier decides (mails, skipped mails, a mail loop) is handed
back to the operation (:class:`Notified`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address as HeaderAddress
from email.utils import format_datetime, make_msgid
from typing import TYPE_CHECKING, Any

from intake.config import Config, MailboxConfig, parse_duration, parse_size
from intake.db.cases import CaseRec
from intake.db.outbox import NewMail, OutboxFile
from intake.loops import ANSWER_TEMPLATES, HUMAN_TEMPLATES, LOOP_TAG, LoopFacts, LoopLimits, loop_protection
from intake.mail.addresses import base_address, is_noreply
from intake.mail.classify import AGENT, MESSAGE
from intake.mail.parse import detect_language, is_synthesised_id
from intake.mail.subjects import clean_header, subject_with_token
from intake.states import Audience, Direction, Status
from intake.team import Team
from intake.templates import TemplateError, TemplateSet, TemplateTimeout
from intake.threads import reply_address

if TYPE_CHECKING:
    from intake.db import Tx

log = logging.getLogger("intake.notify")

AUTO_REPLIED = "auto-replied"
AUTO_GENERATED = "auto-generated"
LOOP_HEADER = "X-Intake-Loop"

#: Templates sent to the customer, and whether they answer the customer's mail.
CUSTOMER_TEMPLATES = {"ack": AUTO_REPLIED, "agent_reply": AUTO_REPLIED, "status_changed": AUTO_GENERATED,
                      "auto_close_warning": AUTO_GENERATED, "auto_closed": AUTO_GENERATED}
AGENT_TEMPLATES = {"new_case_agent": AUTO_GENERATED, "customer_reply_agent": AUTO_GENERATED,
                   "escalated": AUTO_GENERATED, "internal_note": AUTO_GENERATED, "agent_notice": AUTO_REPLIED}
#: Agent mails whose replies must stay internal: Reply-To is the case's note address.
INTERNAL_TEMPLATES = frozenset({"internal_note", "agent_notice"})

#: Set by the processor while it applies a message: a template that runs away with no good
#: version to use instead quarantines that message (retried once the template is fixed).
#: Elsewhere (a command line or scheduled change) the mail is skipped like any broken template's.
QUARANTINE_RUNAWAYS: ContextVar[bool] = ContextVar("intake_quarantine_runaways", default=False)


# ---------------------------------------------------------------------------------------
# Language of a case


def choose_language(*, rule: str | None, contact: str | None, message_text: str | None, mailbox: str | None,
                    default: str) -> tuple[str, str]:
    """(language, where it came from): rule → contact → message → mailbox → default."""
    if rule:
        return rule, "rule"
    if contact:
        return contact, "contact"
    if message_text and any(ch.isalpha() for ch in message_text):
        return detect_language(message_text), "message"
    if mailbox:
        return mailbox, "mailbox"
    return default, "default"


def _addr(name: str | None, address: str) -> str:
    """``Name <addr>`` correctly quoted; the name is cleaned of control characters."""
    local, _, domain = address.partition("@")
    return str(HeaderAddress(display_name=clean_header(name or ""), username=local, domain=domain))


# ---------------------------------------------------------------------------------------
# Context: plain data only


def _duration_text(text: str | int | None, lang: str) -> str | None:
    if not text:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError:
        return str(text)
    for unit, (ja, en) in ((86400, ("日", "day")), (3600, ("時間", "hour")), (60, ("分", "minute"))):
        if seconds >= unit and seconds % unit == 0:
            n = int(seconds // unit)
            return f"{n}{ja}" if lang == "ja" else f"{n} {en}{'s' if n != 1 else ''}"
    n = int(seconds // 60) or 1
    return f"{n}分" if lang == "ja" else f"{n} minutes"


def format_time(value: datetime | None, lang: str, cfg: Config) -> str | None:
    if value is None:
        return None
    local = value.astimezone(cfg.tz)
    return local.strftime("%Y年%m月%d日 %H:%M") if lang == "ja" else local.strftime("%Y-%m-%d %H:%M %Z")


def build_context(*, language: str, case: dict[str, Any], brand: dict[str, Any], customer: dict[str, Any],
                  recipient: dict[str, Any], message: dict[str, Any] | None = None,
                  reply: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
                  escalation: dict[str, Any] | None = None, auto_close: dict[str, Any] | None = None,
                  note: dict[str, Any] | None = None, notice: dict[str, Any] | None = None,
                  reply_address: str = "", note_address: str = "") -> dict[str, Any]:
    """The one shape every template sees; every key is present (``None`` when not relevant)."""
    return {"language": language, "case": case, "brand": brand, "customer": customer, "recipient": recipient,
            "message": message, "reply": reply, "status": status, "escalation": escalation,
            "auto_close": auto_close, "note": note, "notice": notice, "reply_address": reply_address,
            "note_address": note_address}


def sample_context(name: str, language: str) -> dict[str, Any]:
    """Sample data for ``intake templates check``: the real shape, with every optional part filled."""
    ja = language == "ja"
    case = {"number": "CASE-1042", "subject": "プリンターが印刷できません" if ja else "Printer does not print",
            "status": "resolved", "priority": "high", "queue": "support", "queue_name": "Support",
            "category": "technical", "assignee": "hanako@example.com", "assignee_name": "山田 花子",
            "requester": "taro@bigcorp.co.jp", "requester_name": "山田 太郎", "organization": "bigcorp.co.jp",
            "created_at": "2026年11月20日 10:00" if ja else "2026-11-20 10:00 JST", "language": language,
            "resolution": "ドライバーを更新しました。" if ja else "We updated the driver.", "tags": ["vip"],
            "escalation_level": 1, "first_response_time": "4時間" if ja else "4 hours",
            "first_response_due": "2026年11月20日 14:00" if ja else "2026-11-20 14:00 JST"}
    return build_context(
        language=language, case=case, brand={"name": "Acme", "mailbox": "support@example.com"},
        customer={"name": "山田 太郎", "address": "taro@bigcorp.co.jp"},
        recipient={"name": "山田 太郎", "address": "taro@bigcorp.co.jp"},
        message={"from": "taro@bigcorp.co.jp", "from_name": "山田 太郎", "subject": case["subject"],
                 "text": "昨日から印刷できません。\n<よろしくお願いします>" if ja else "It stopped printing yesterday.\n<thanks>",
                 "date": case["created_at"],
                 "attachments": [{"filename": "エラー画面.png" if ja else "error.png", "size": 48213,
                                  "content_type": "image/png", "attached": True},
                                 {"filename": "ログ.zip" if ja else "logs.zip", "size": 31457280,
                                  "content_type": "application/zip", "attached": False}]},
        reply={"text": "ドライバーを更新してください。" if ja else "Please update the driver.", "agent_name": "山田 花子",
               "agent_address": "hanako@example.com"},
        status=({"old": "resolved", "new": "open", "reason": "customer replied"} if name == "customer_reply_agent"
                else {"old": "open", "new": "resolved", "reason": ""}),
        escalation={"level": 1, "reason": "SLA first response breached"},
        auto_close={"days": 7, "at": "2026年11月27日 10:00" if ja else "2026-11-27 10:00 JST"},
        note={"text": "お客様には明日電話します。" if ja else "I will call the customer tomorrow.",
              "author": "hanako@example.com", "author_name": "山田 花子"},
        notice=({"kind": "refused", "lines": [{"line": "#statsu resolved",
                                               "reason": "unknown command #statsu (did you mean #status?)"}]}
                if name == "agent_notice" else None),
        reply_address="support+c1042-abcdefghij@example.com", note_address="support+n1042-abcdefghij@example.com",
    )


def templates_for(cfg: Config) -> TemplateSet:
    """The templates of an installation as mail is rendered from them: each new version is
    tried with :func:`sample_context` before it is used, each rendering has ``[templates] budget``."""
    return TemplateSet(cfg.templates_path, cfg.templates.default_language, parse_size(cfg.notify.max_output),
                       budget=cfg.templates_budget, sample=sample_context)


# ---------------------------------------------------------------------------------------
# The notifier


@dataclass(frozen=True)
class Trigger:
    """The change that causes mail: the message that came in (if any) and who acted."""

    at: datetime
    inbound_id: int | None = None
    message_id: str | None = None
    references: tuple[str, ...] = ()
    sender: str | None = None
    sender_name: str = ""
    sender_class: str = "customer"
    kind: str = MESSAGE
    subject: str = ""
    text: str = ""


@dataclass(frozen=True)
class OutgoingMail:
    """One rendered mail: the case's message row and timeline entry it makes, and its outbox
    row (``mail``, whose ``message_row_id`` the operation fills in)."""

    mail: NewMail
    public: bool
    from_address: str
    from_name: str
    cc: list[str]
    actor: str
    event: dict[str, Any]


@dataclass
class Notified:
    """What the notifier decided for one change, for the case operation to record (it owns
    every write to a case): ``pending`` mails to store and queue, ``skipped`` ones (as of
    ``at``), and ``loop`` when loop protection says the case must be flagged. ``queued``
    is filled in as the operation queues them (for the processing log)."""

    pending: list[OutgoingMail] = field(default_factory=list)
    queued: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    at: datetime | None = None
    loop: str | None = None

    def as_log(self) -> dict[str, Any]:
        return {"queued": self.queued, "skipped": self.skipped}


class Notifier:
    """Decides and renders the mails a change causes, reading the caller's transaction."""

    def __init__(self, cfg: Config, templates: TemplateSet, team: Callable[[], Team],
                 secret: Callable[[], str]) -> None:
        self.cfg = cfg
        self.templates = templates
        self.team = team
        self.secret = secret
        n = cfg.notify
        self.limits = LoopLimits(n.ack_per_sender_per_hour, n.ack_per_case_per_hour, n.loop_max,
                                 n.notices_per_agent_per_hour)
        self.loop_window = timedelta(seconds=parse_duration(n.loop_window))
        self.give_up_after = timedelta(seconds=parse_duration(cfg.outbound.give_up_after))
        self.attach_max = parse_size(n.attach_max)

    @classmethod
    def for_config(cls, cfg: Config, team: Callable[[], Team], secret: Callable[[], str]) -> "Notifier":
        return cls(cfg, templates_for(cfg), team, secret)

    # -- the changes ----------------------------------------------------------------------

    def new_case(self, tx: "Tx", case: CaseRec, trigger: Trigger, ack: str | bool | None = None,
                 files: Sequence[OutboxFile] = ()) -> Notified:
        """A new case: the acknowledgement to the customer and the notice to its agents (with
        the customer's files, up to ``[notify] attach_max``)."""
        done = Notified()
        if ack is not False and self.cfg.notify.ack and case.requester is not None:
            template = ack if isinstance(ack, str) else "ack"
            self._send(tx, done, case, template, trigger, to=(case.requester.address, case.requester.name), fresh=True)
        elif case.requester is not None:
            why = "rule says ack: false" if ack is False else "[notify] ack = false"
            self._skip(tx, done, case, "ack", case.requester.address, "config", why, trigger.at)
        if self.cfg.notify.notify_agents:
            for addr, name in self.team().notified_of(case.assignee, case.queue):
                self._send(tx, done, case, "new_case_agent", trigger, to=(addr, name), fresh=True, files=files)
        return done

    def customer_comment(self, tx: "Tx", case: CaseRec, trigger: Trigger, status: tuple[str, str] | None = None,
                         files: Sequence[OutboxFile] = ()) -> Notified:
        """A customer wrote on a case: its agents hear of it; reopening a resolved or closed case
        is confirmed to the customer (an answer to a pending case is the expected next step)."""
        done = Notified()
        status_data = {"old": status[0], "new": status[1], "reason": "customer replied"} if status else None
        if self.cfg.notify.notify_agents:
            for addr, name in self.team().notified_of(case.assignee, case.queue):
                self._send(tx, done, case, "customer_reply_agent", trigger, to=(addr, name), status=status_data,
                           files=files)
        if status and status[0] in (Status.RESOLVED, Status.CLOSED) and case.requester is not None:
            self._send(tx, done, case, "status_changed", trigger, to=(case.requester.address, case.requester.name),
                       status=status_data)
        return done

    def agent_reply(self, tx: "Tx", case: CaseRec, trigger: Trigger, text: str, cc: Sequence[tuple[str, str]],
                    files: Sequence[OutboxFile] = ()) -> Notified:
        """An agent's public reply (``text``: without its quoted history) to the requester, with
        ``cc`` in Cc and the agent's files attached."""
        done = Notified()
        if case.requester is None:
            return done
        reply = {"text": text, "agent_name": self.team().name_of(trigger.sender) or trigger.sender_name,
                 "agent_address": trigger.sender}
        self._send(tx, done, case, "agent_reply", trigger, to=(case.requester.address, case.requester.name),
                   cc=cc, reply=reply, files=files, attach_all=True)
        return done

    def internal_note(self, tx: "Tx", case: CaseRec, trigger: Trigger, text: str, to: Sequence[tuple[str, str]],
                      files: Sequence[OutboxFile] = ()) -> Notified:
        """An internal note, to the agents of the case (never to a customer)."""
        done = Notified()
        note = {"text": text, "author": trigger.sender, "author_name": self.team().name_of(trigger.sender)
                or trigger.sender_name}
        for addr, name in to:
            self._send(tx, done, case, "internal_note", trigger, to=(addr, name), note=note, files=files)
        return done

    def agent_notice(self, tx: "Tx", case: CaseRec, trigger: Trigger, to: tuple[str, str], kind: str,
                     lines: Sequence[dict[str, str]]) -> Notified:
        """Tell an agent what became of their mail: ``kind`` ``refused`` (commands not applied,
        ``lines`` [{line, reason}]) or ``unauthenticated`` (``lines`` [{reason}])."""
        done = Notified()
        self._send(tx, done, case, "agent_notice", trigger, to=to, notice={"kind": kind, "lines": list(lines)})
        return done

    def status_changed(self, tx: "Tx", case: CaseRec, old: str, new: str, trigger: Trigger,
                       reason: str = "") -> Notified:
        """Tell the customer about a status change (resolution notes when resolved)."""
        done = Notified()
        if case.requester is not None:
            self._send(tx, done, case, "status_changed", trigger, to=(case.requester.address, case.requester.name),
                       status={"old": old, "new": new, "reason": reason})
        return done

    # -- one mail -------------------------------------------------------------------------

    def _send(self, tx: "Tx", done: Notified, case: CaseRec, template: str, trigger: Trigger, *,
              to: tuple[str, str], cc: Sequence[tuple[str, str]] = (), fresh: bool = False,
              files: Sequence[OutboxFile] = (), attach_all: bool = False, **extra: Any) -> None:
        """Queue one mail unless loop protection says no; ``fresh``: the case was opened by this trigger."""
        address, name = to[0].lower(), to[1] or ""
        audience = Audience.AGENT if template in AGENT_TEMPLATES else Audience.CUSTOMER
        verdict = loop_protection(self._facts(tx, case, template, address, trigger, fresh), self.limits)
        if not verdict.send:
            if verdict.flag_loop and LOOP_TAG not in case.tags:
                done.loop = verdict.reason
            self._skip(tx, done, case, template, address, verdict.check, verdict.reason, trigger.at)
            return
        if audience == Audience.AGENT:
            agent = self.team().agent(address)
            language = (agent.language if agent else "") or self.cfg.templates.default_language
        else:
            language = case.language or self.cfg.templates.default_language
        mailbox = self._mailbox(case)
        brand_name = self._brand_name(mailbox)
        attached, listed = (tuple(files), []) if attach_all else self._attachable(files)
        context = self._context(case, language, brand_name, mailbox, (address, name), trigger, listed, **extra)
        try:
            rendered = self.templates.render(template, context, language=language, brand=case.brand)
        except (TemplateError, TypeError) as exc:
            if isinstance(exc, TemplateTimeout) and QUARANTINE_RUNAWAYS.get():
                # A runaway with no good version to use instead: the message is quarantined,
                # naming the template (that version is not rendered again: later mail skips it).
                raise
            # A broken template must not block intake: the case is stored, the error is shown.
            log.error("template failed case=%s template=%s: %s", case.label, template, exc)
            self._skip(tx, done, case, template, address, "template-error", str(exc), trigger.at)
            return
        for failed in rendered.fallbacks:
            log.error("template failed case=%s template=%s: %s; sent with the last good version", case.label,
                      template, failed)
        self._enqueue(tx, done, case, template, audience, language, mailbox, brand_name, (address, name), cc,
                             rendered, trigger, attached)

    def _attachable(self, files: Sequence[OutboxFile]) -> tuple[tuple[OutboxFile, ...], list[dict[str, Any]]]:
        """The files an agent notice attaches (within ``attach_max`` in all), and every file
        listed with whether it is attached."""
        budget, attached, listed = self.attach_max, [], []
        for f in files:
            fits = f.size <= budget
            if fits:
                budget -= f.size
                attached.append(f)
            listed.append({"filename": f.filename, "size": f.size, "content_type": f.content_type, "attached": fits})
        return tuple(attached), listed

    def _enqueue(self, tx: "Tx", done: Notified, case: CaseRec, template: str, audience: str, language: str,
                 mailbox: MailboxConfig, brand_name: str, to: tuple[str, str], cc: Sequence[tuple[str, str]],
                 rendered: Any, trigger: Trigger, files: tuple[OutboxFile, ...] = ()) -> None:
        secret = self.secret()
        domain = mailbox.address.rpartition("@")[2]
        message_id = make_msgid(idstring=case.label.lower(), domain=domain)[1:-1]
        signed = reply_address(mailbox.address, case.number, secret, "c")
        # Replies to an internal notification stay internal: they go to the note address.
        reply_to = reply_address(mailbox.address, case.number, secret, "n") if template in INTERNAL_TEMPLATES \
            else signed
        in_reply_to, references = self._thread(tx, case, template, trigger)
        subject = subject_with_token(rendered.subject, case.label)
        auto = CUSTOMER_TEMPLATES.get(template) or AGENT_TEMPLATES.get(template) or AUTO_GENERATED
        headers: list[list[str]] = [
            ["From", _addr(brand_name, mailbox.address)],
            ["To", _addr(to[1], to[0])],
        ]
        if cc:
            headers.append(["Cc", ", ".join(_addr(n, a) for a, n in cc)])
        headers += [
            ["Reply-To", _addr(brand_name, reply_to)],
            ["Subject", subject],
            ["Date", format_datetime(trigger.at)],
            ["Message-ID", f"<{message_id}>"],
        ]
        if in_reply_to:
            headers.append(["In-Reply-To", f"<{in_reply_to}>"])
        if references:
            headers.append(["References", " ".join(f"<{r}>" for r in references)])
        headers += [
            ["Auto-Submitted", auto],
            ["X-Auto-Response-Suppress", "All"],
            [LOOP_HEADER, clean_header(self.cfg.installation)],
            ["X-Intake-Case", case.label],
        ]
        headers = [[k, clean_header(v)] for k, v in headers]
        actor = (trigger.sender or "system") if template in HUMAN_TEMPLATES else "system"
        event: dict[str, Any] = {"template": template, "audience": str(audience)}
        if rendered.fallbacks:
            # The template's current version failed: the timeline says why this mail is the last good version's.
            event["template_fallback"] = list(rendered.fallbacks)
        done.pending.append(OutgoingMail(
            NewMail(case_id=case.id, message_row_id=None, inbound_id=trigger.inbound_id, at=trigger.at,
                    template=template, audience=str(audience), auto_submitted=auto, language=language,
                    mail_from=signed, recipient=to[0], recipients=[to[0], *(a for a, _ in cc)],
                    message_id=message_id, headers=headers, subject=subject, text=rendered.text, html=rendered.html,
                    give_up_at=trigger.at + self.give_up_after, files=files),
            public=audience == Audience.CUSTOMER, from_address=mailbox.address, from_name=brand_name,
            cc=[a for a, _ in cc], actor=actor, event=event))

    # -- helpers --------------------------------------------------------------------------

    def _facts(self, tx: "Tx", case: CaseRec, template: str, address: str, trigger: Trigger,
               fresh: bool = False) -> LoopFacts:
        hour_ago = trigger.at - timedelta(hours=1)
        window_start = trigger.at - self.loop_window
        sup = tx.outbox.suppression(address, trigger.at)
        is_ack = template == "ack"
        return LoopFacts(
            template=template,
            recipient=address,
            trigger_kind=trigger.kind,
            actor=trigger.sender if trigger.sender_class == AGENT else None,
            own_address=base_address(address) in self.cfg.own_addresses or self.cfg.mailbox_for(address) is not None,
            noreply=is_noreply(address),
            suppressed=sup.reason if sup else None,
            case_flagged=LOOP_TAG in (case.tags or []),
            acks_to_recipient_last_hour=tx.outbox.count(since=hour_ago, template="ack", recipient=address)
            if is_ack else 0,
            # A case opened by this very message has no history yet: no need to count it.
            acks_on_case_last_hour=tx.outbox.count(since=hour_ago, template="ack", case_id=case.id)
            if is_ack and not fresh else 0,
            notices_to_recipient_last_hour=tx.outbox.count(since=hour_ago, template=template, recipient=address)
            if template in ANSWER_TEMPLATES else 0,
            case_traffic_in_window=1 if fresh else
            tx.outbox.count(since=window_start, case_id=case.id, audience=Audience.CUSTOMER)
            # Our agents' own mail is not traffic with the outside.
            + tx.cases.count_inbound_messages(case.id, window_start, excluding=self.team().addresses),
        )

    def _skip(self, tx: "Tx", done: Notified, case: CaseRec, template: str, to: str, check: str, reason: str,
              at: datetime) -> None:
        done.skipped.append({"template": template, "to": to, "check": check, "reason": reason})
        done.at = at
        log.info("outbox skipped case=%s template=%s to=%s check=%s: %s", case.label, template, to, check, reason)

    def _mailbox(self, case: CaseRec) -> MailboxConfig:
        return (self.cfg.mailbox_for(case.mailbox or "") if case.mailbox else None) or self.cfg.mailbox[0]

    def _brand_name(self, mailbox: MailboxConfig) -> str:
        return mailbox.name or mailbox.brand or mailbox.address.rpartition("@")[2]

    def _thread(self, tx: "Tx", case: CaseRec, template: str, trigger: Trigger) -> tuple[str | None, list[str]]:
        """In-Reply-To and References: continue the customer's thread (never our made-up ids)."""
        in_reply_to, refs = self._thread_ids(tx, case, template, trigger)
        refs = [r for r in refs if not is_synthesised_id(r)]
        return (None if in_reply_to and is_synthesised_id(in_reply_to) else in_reply_to), refs

    def _thread_ids(self, tx: "Tx", case: CaseRec, template: str, trigger: Trigger) -> tuple[str | None, list[str]]:
        if template == "agent_reply" or not trigger.message_id:
            # The customer never saw the agent's own mail nor our notices to agents: continue
            # from the case's public messages, answering the customer's latest one.
            agents = self.team().addresses
            msgs = [(m, d, f) for m, d, f in tx.cases.public_messages(case.id)
                    if m != trigger.message_id and not (d == Direction.IN and f in agents)]
            ids = list(dict.fromkeys(m for m, _, _ in msgs))
            refs = ids[:1] + ids[-9:] if len(ids) > 10 else ids
            from_customer = [m for m, d, _ in msgs if d == Direction.IN]
            return (from_customer[-1] if from_customer else (refs[-1] if refs else None)), refs
        refs = list(dict.fromkeys([*trigger.references[-9:], trigger.message_id]))
        return trigger.message_id, refs

    def _context(self, case: CaseRec, language: str, brand_name: str, mailbox: MailboxConfig,
                 to: tuple[str, str], trigger: Trigger, files: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        team = self.team()
        queue = team.queue(case.queue)
        secret = self.secret()
        case_data = {
            "number": case.label, "subject": case.subject, "status": case.status, "priority": case.priority,
            "queue": case.queue, "queue_name": (queue.name if queue else "") or case.queue or "",
            "category": case.category, "assignee": case.assignee,
            "assignee_name": team.name_of(case.assignee) if team.agent(case.assignee) else None,
            "requester": case.requester.address if case.requester else None,
            "requester_name": case.requester.name if case.requester else None,
            "organization": case.organization,
            "created_at": format_time(case.created_at, language, self.cfg), "language": case.language,
            "resolution": case.resolution, "tags": list(case.tags or []), "escalation_level": case.escalation_level,
            "first_response_time": _duration_text((queue.sla or {}).get("first_response") if queue else None, language),
            "first_response_due": format_time(case.first_response_due, language, self.cfg),
        }
        message = None
        if trigger.message_id:
            message = {"from": trigger.sender, "from_name": trigger.sender_name, "subject": trigger.subject,
                       "text": trigger.text.strip()[:20000], "date": format_time(trigger.at, language, self.cfg),
                       "attachments": files}
        customer = {"name": case.requester.name if case.requester else "",
                    "address": case.requester.address if case.requester else ""}
        return build_context(
            language=language, case=case_data, brand={"name": brand_name, "mailbox": mailbox.address},
            customer=customer, recipient={"name": to[1], "address": to[0]}, message=message,
            reply_address=reply_address(mailbox.address, case.number, secret, "c"),
            note_address=reply_address(mailbox.address, case.number, secret, "n"), **extra,
        )
