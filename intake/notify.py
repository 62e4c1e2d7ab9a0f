"""Which mails a change causes; rendering them into the outbox in the change's transaction.

The pipeline calls a :class:`Notifier` inside the transaction that stores a new case, a
comment or a status change. Each mail goes through the named rule :func:`loop_protection`
(pure, over :class:`LoopFacts` the store gathered), is rendered from plain data by
:mod:`intake.templates`, and is stored twice in the same transaction: as an outgoing
message on the case timeline (so that replies thread by References) and as an outbox row
that :mod:`intake.edges.outbox_sender` delivers. Nothing is sent here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address as HeaderAddress
from email.utils import format_datetime, make_msgid
from typing import Any

from intake import store as st
from intake.mail.classify import AGENT, MESSAGE
from intake.flowstore import CaseRec, FlowTx
from intake.config import Config, MailboxConfig, parse_duration, parse_size
from intake.threads import reply_address
from intake.mail.parse import detect_language, is_synthesised_id
from intake.mail.quotes import strip_reply
from intake.rules import RuleSet
from intake.templates import TemplateError, TemplateSet

log = logging.getLogger("intake.notify")

AUTO_REPLIED = "auto-replied"
AUTO_GENERATED = "auto-generated"
CUSTOMER, AGENT_AUDIENCE = "customer", "agent"
LOOP_TAG = "mail-loop"
LOOP_HEADER = "X-Intake-Loop"

#: Templates sent to the customer, and whether they answer the customer's mail.
CUSTOMER_TEMPLATES = {"ack": AUTO_REPLIED, "agent_reply": AUTO_REPLIED, "status_changed": AUTO_GENERATED,
                      "auto_close_warning": AUTO_GENERATED, "auto_closed": AUTO_GENERATED}
AGENT_TEMPLATES = {"new_case_agent": AUTO_GENERATED, "customer_reply_agent": AUTO_GENERATED,
                   "escalated": AUTO_GENERATED}
#: Written by a person (an agent), not by intake: sent even on a case flagged as a loop.
HUMAN_TEMPLATES = frozenset({"agent_reply"})


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


# ---------------------------------------------------------------------------------------
# Loop protection: one named rule, pure


@dataclass(frozen=True)
class LoopLimits:
    ack_per_sender_per_hour: int = 5
    ack_per_case_per_hour: int = 2
    loop_max: int = 10


@dataclass(frozen=True)
class LoopFacts:
    """What the store knows when a mail is about to be queued."""

    template: str
    recipient: str
    trigger_kind: str = MESSAGE  # kind of the mail that caused it (message/automated/bounce)
    actor: str | None = None  # who caused it (an agent's or customer's address)
    own_address: bool = False  # the recipient is one of our mailboxes
    noreply: bool = False
    suppressed: str | None = None  # why the recipient gets no automated mail
    case_flagged: bool = False  # the case is tagged mail-loop
    acks_to_recipient_last_hour: int = 0
    acks_on_case_last_hour: int = 0
    case_traffic_in_window: int = 0  # mails in and out of the case with the outside, recently


@dataclass(frozen=True)
class Verdict:
    send: bool
    check: str = ""
    reason: str = ""
    flag_loop: bool = False  # the case must be flagged now


def _own_action(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.actor and f.actor.lower() == f.recipient.lower():
        return "agents are not notified of their own actions"
    return None


def _own_address(f: LoopFacts, _: LoopLimits) -> str | None:
    return f"{f.recipient} is one of our own addresses" if f.own_address else None


def _noreply(f: LoopFacts, _: LoopLimits) -> str | None:
    return f"{f.recipient} is a no-reply address" if f.noreply else None


def _automated_trigger(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.template not in HUMAN_TEMPLATES and f.trigger_kind != MESSAGE:
        return f"caused by {f.trigger_kind} mail (auto-reply, bounce or mailing list): never answered"
    return None


def _suppressed(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.suppressed and f.template not in HUMAN_TEMPLATES:
        return f"{f.recipient} failed permanently: {f.suppressed}"
    return None


def _flagged(f: LoopFacts, _: LoopLimits) -> str | None:
    if f.case_flagged and f.template not in HUMAN_TEMPLATES:
        return f"the case is flagged as a mail loop (tag {LOOP_TAG})"
    return None


def _ack_rate(f: LoopFacts, lim: LoopLimits) -> str | None:
    if f.template != "ack":
        return None
    if f.acks_to_recipient_last_hour >= lim.ack_per_sender_per_hour:
        return f"{f.recipient} already got {f.acks_to_recipient_last_hour} acknowledgements this hour"
    if f.acks_on_case_last_hour >= lim.ack_per_case_per_hour:
        return f"the case already sent {f.acks_on_case_last_hour} acknowledgements this hour"
    return None


def _loop_threshold(f: LoopFacts, lim: LoopLimits) -> str | None:
    if f.template not in HUMAN_TEMPLATES and f.case_traffic_in_window + 1 > lim.loop_max:
        return f"the case exchanged {f.case_traffic_in_window} mails recently (limit {lim.loop_max}): mail loop"
    return None


#: The checks of the loop-protection rule, in the order they are reported.
LOOP_CHECKS: tuple[tuple[str, Callable[[LoopFacts, LoopLimits], str | None]], ...] = (
    ("own-action", _own_action),
    ("own-address", _own_address),
    ("noreply", _noreply),
    ("automated-trigger", _automated_trigger),
    ("suppressed", _suppressed),
    ("flagged", _flagged),
    ("ack-rate", _ack_rate),
    ("loop-threshold", _loop_threshold),
)


def loop_protection(facts: LoopFacts, limits: LoopLimits) -> Verdict:
    """The loop-protection rule: may this mail be queued? The first check that says no wins."""
    for name, check in LOOP_CHECKS:
        reason = check(facts, limits)
        if reason:
            return Verdict(False, name, reason, flag_loop=name == "loop-threshold")
    return Verdict(True)


_NOREPLY_LOCAL = re.compile(r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]daemon|postmaster|bounces?)([+\-_.].*)?$",
                            re.I)


def is_noreply(address: str) -> bool:
    return bool(_NOREPLY_LOCAL.match(address.partition("@")[0]))


# ---------------------------------------------------------------------------------------
# Headers


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_DOUBLE_SPACES = re.compile(r" {2,}")


def clean_header(value: str) -> str:
    """A header value without control characters (a newline would inject headers)."""
    return _DOUBLE_SPACES.sub(" ", _CONTROL.sub(" ", value)).strip()


_REPLY_PREFIX = re.compile(r"^(?:\s*(?:re|fwd?|aw|sv|vs|wg|返信|転送)\s*[:：]\s*)+", re.I)
# Any bracketed word: compared with the case label in code (one compiled pattern for all cases).
_BRACKETED = re.compile(r"\s*\[\s*([^\[\]\s]+)\s*\]\s*")
_SPACES = re.compile(r"\s+")


def subject_with_token(subject: str, label: str) -> str:
    """The subject with the case token ``[CASE-1042]`` exactly once (after any ``Re:``)."""
    subject = clean_header(subject)
    token = f"[{label}]"
    wanted = label.casefold()
    bare = _BRACKETED.sub(lambda m: " " if m.group(1).casefold() == wanted else m.group(0), subject)
    bare = _SPACES.sub(" ", bare).strip()
    m = _REPLY_PREFIX.match(bare)
    prefix = m.group(0) if m else ""
    rest = bare[len(prefix):].strip()
    return f"{prefix}{token} {rest}".strip()


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
                  reply_address: str = "", note_address: str = "") -> dict[str, Any]:
    """The one shape every template sees; every key is present (``None`` when not relevant)."""
    return {"language": language, "case": case, "brand": brand, "customer": customer, "recipient": recipient,
            "message": message, "reply": reply, "status": status, "escalation": escalation,
            "auto_close": auto_close, "reply_address": reply_address, "note_address": note_address}


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
                 "date": case["created_at"]},
        reply={"text": "ドライバーを更新してください。" if ja else "Please update the driver.", "agent_name": "山田 花子",
               "agent_address": "hanako@example.com"},
        status=({"old": "resolved", "new": "open", "reason": "customer replied"} if name == "customer_reply_agent"
                else {"old": "open", "new": "resolved", "reason": ""}),
        escalation={"level": 1, "reason": "SLA first response breached"},
        auto_close={"days": 7, "at": "2026年11月27日 10:00" if ja else "2026-11-27 10:00 JST"},
        reply_address="support+c1042-abcdefghij@example.com", note_address="support+n1042-abcdefghij@example.com",
    )


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


@dataclass
class Notified:
    """What the notifier did for one change: for the processing log."""

    queued: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def as_log(self) -> dict[str, Any]:
        return {"queued": self.queued, "skipped": self.skipped}


class Notifier:
    """Renders the mails a change causes into the outbox, inside the caller's transaction."""

    def __init__(self, cfg: Config, templates: TemplateSet, rules: Callable[[], RuleSet],
                 secret: Callable[[], str]) -> None:
        self.cfg = cfg
        self.templates = templates
        self.rules = rules
        self.secret = secret
        n = cfg.notify
        self.limits = LoopLimits(n.ack_per_sender_per_hour, n.ack_per_case_per_hour, n.loop_max)
        self.loop_window = timedelta(seconds=parse_duration(n.loop_window))
        self.suppress_for = timedelta(seconds=parse_duration(n.suppress_after_failure))
        self.give_up_after = timedelta(seconds=parse_duration(cfg.outbound.give_up_after))

    @classmethod
    def for_config(cls, cfg: Config, rules: Callable[[], RuleSet], secret: Callable[[], str]) -> "Notifier":
        templates = TemplateSet(cfg.path(cfg.templates.path), cfg.templates.default_language,
                                parse_size(cfg.notify.max_output))
        return cls(cfg, templates, rules, secret)

    # -- the changes ----------------------------------------------------------------------

    def new_case(self, tx: FlowTx, case: CaseRec, trigger: Trigger, ack: str | bool | None = None) -> Notified:
        """A new case: the acknowledgement to the customer and the notice to its agents."""
        done = Notified()
        if ack is not False and self.cfg.notify.ack and case.requester is not None:
            template = ack if isinstance(ack, str) else "ack"
            self._send(tx, done, case, template, trigger, to=(case.requester.address, case.requester.name), fresh=True)
        elif case.requester is not None:
            why = "rule says ack: false" if ack is False else "[notify] ack = false"
            self._skip(tx, done, case, "ack", case.requester.address, "config", why, trigger.at)
        if self.cfg.notify.notify_agents:
            for addr, name in self._agents(case):
                self._send(tx, done, case, "new_case_agent", trigger, to=(addr, name), fresh=True)
        return done

    def customer_comment(self, tx: FlowTx, case: CaseRec, trigger: Trigger,
                         status: tuple[str, str] | None = None) -> Notified:
        """A customer wrote on a case: its agents hear of it; a reopen is confirmed to the customer."""
        done = Notified()
        status_data = {"old": status[0], "new": status[1], "reason": "customer replied"} if status else None
        if self.cfg.notify.notify_agents:
            for addr, name in self._agents(case):
                self._send(tx, done, case, "customer_reply_agent", trigger, to=(addr, name), status=status_data)
        if status and case.requester is not None:
            self._send(tx, done, case, "status_changed", trigger, to=(case.requester.address, case.requester.name),
                       status=status_data)
        return done

    def agent_reply(self, tx: FlowTx, case: CaseRec, trigger: Trigger) -> Notified:
        """An agent replied by mail: the reply, without its quoted history, to the customer (and CCs)."""
        done = Notified()
        if case.requester is None:
            return done
        agent = self.rules().agents.get((trigger.sender or "").lower())
        reply = {"text": strip_reply(trigger.text), "agent_name": (agent.name if agent else "") or trigger.sender_name,
                 "agent_address": trigger.sender}
        cc = [(a, n) for a, n, role in tx.participant_rows(case.id) if role == "cc" and a != (trigger.sender or "")]
        self._send(tx, done, case, "agent_reply", trigger, to=(case.requester.address, case.requester.name),
                   cc=cc, reply=reply)
        return done

    def status_changed(self, tx: FlowTx, case: CaseRec, old: str, new: str, trigger: Trigger, reason: str = "") -> Notified:
        """Tell the customer about a status change (resolution notes when resolved)."""
        done = Notified()
        if case.requester is not None:
            self._send(tx, done, case, "status_changed", trigger, to=(case.requester.address, case.requester.name),
                       status={"old": old, "new": new, "reason": reason})
        return done

    def send(self, tx: FlowTx, case: CaseRec, template: str, trigger: Trigger, **extra: Any) -> Notified:
        """Queue ``template`` to its natural audience (escalated → agents; auto_close_* → customer)."""
        done = Notified()
        if template in AGENT_TEMPLATES:
            for addr, name in self._agents(case):
                self._send(tx, done, case, template, trigger, to=(addr, name), **extra)
        elif case.requester is not None:
            self._send(tx, done, case, template, trigger, to=(case.requester.address, case.requester.name), **extra)
        return done

    def bounce(self, tx: FlowTx, case: CaseRec, trigger: Trigger, message_ids: Sequence[str],
               failed: Sequence[str], permanent: bool) -> list[int]:
        """A bounce of our mail: its outbox rows are marked bounced; the addresses suppressed."""
        rows = tx.outbox_by_message_ids(list(message_ids))
        if not rows and failed:
            wanted = {a.lower() for a in failed}
            rows = [r for r in tx.outbox_for_case(case.id, states=(st.OUT_SENT, st.OUT_SENDING, st.OUT_QUEUED))
                    if r.recipient in wanted][:1]
        if not permanent:
            return []
        until = trigger.at + self.suppress_for
        marked = []
        for row in rows:
            if row.state in (st.OUT_SENT, st.OUT_QUEUED, st.OUT_SENDING):
                tx.update_outbox(row.id, state=st.OUT_BOUNCED, finished_at=trigger.at, updated_at=trigger.at,
                                 permanent=True, last_error=f"bounced (inbound #{trigger.inbound_id})")
                marked.append(row.id)
            for addr in failed or [row.recipient]:
                tx.suppress(addr, until, f"bounce of <{row.message_id}>")
        if not rows:
            for addr in failed:
                tx.suppress(addr, until, "bounce")
        return marked

    # -- one mail -------------------------------------------------------------------------

    def _send(self, tx: FlowTx, done: Notified, case: CaseRec, template: str, trigger: Trigger, *,
              to: tuple[str, str], cc: Sequence[tuple[str, str]] = (), fresh: bool = False,
              **extra: Any) -> int | None:
        """Queue one mail unless loop protection says no; ``fresh``: the case was opened by this trigger."""
        address, name = to[0].lower(), to[1] or ""
        audience = AGENT_AUDIENCE if template in AGENT_TEMPLATES else CUSTOMER
        verdict = loop_protection(self._facts(tx, case, template, address, trigger, fresh), self.limits)
        if not verdict.send:
            if verdict.flag_loop:
                self._flag_loop(tx, case, verdict.reason, trigger.at)
            self._skip(tx, done, case, template, address, verdict.check, verdict.reason, trigger.at)
            return None
        ruleset = self.rules()
        if audience == AGENT_AUDIENCE:
            agent = ruleset.agents.get(address)
            language = (agent.language if agent else "") or self.cfg.templates.default_language
        else:
            language = case.language or self.cfg.templates.default_language
        mailbox = self._mailbox(case)
        brand_name = self._brand_name(mailbox)
        context = self._context(tx, case, language, brand_name, mailbox, (address, name), trigger, **extra)
        try:
            rendered = self.templates.render(template, context, language=language, brand=case.brand)
        except (TemplateError, TypeError) as exc:
            # A broken template must not block intake: the case is stored, the error is shown.
            log.error("template failed case=%s template=%s: %s", case.label, template, exc)
            self._skip(tx, done, case, template, address, "template-error", str(exc), trigger.at)
            return None
        return self._enqueue(tx, done, case, template, audience, language, mailbox, brand_name, (address, name), cc,
                             rendered, trigger)

    def _enqueue(self, tx: FlowTx, done: Notified, case: CaseRec, template: str, audience: str, language: str,
                 mailbox: MailboxConfig, brand_name: str, to: tuple[str, str], cc: Sequence[tuple[str, str]],
                 rendered: Any, trigger: Trigger) -> int:
        secret = self.secret()
        domain = mailbox.address.rpartition("@")[2]
        message_id = make_msgid(idstring=case.label.lower(), domain=domain)[1:-1]
        signed = reply_address(mailbox.address, case.number, secret, "c")
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
            ["Reply-To", _addr(brand_name, signed)],
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
        msg_id = tx.add_message(
            case.id, direction="out", visibility="public" if audience == CUSTOMER else "internal",
            message_id=message_id, from_address=mailbox.address, from_name=brand_name, to=[to[0]],
            cc=[a for a, _ in cc], subject=subject, text=rendered.text, html=rendered.html, sent_at=None,
        )
        tx.add_event(case.id, "message", {"template": template, "audience": audience}, message_row=msg_id,
                     at=trigger.at)
        row_id = tx.add_outbox(
            case_id=case.id, message_row_id=msg_id, inbound_id=trigger.inbound_id, created_at=trigger.at,
            updated_at=trigger.at, template=template, audience=audience, auto_submitted=auto, language=language,
            mail_from=signed, recipient=to[0], recipients=[to[0], *(a for a, _ in cc)], message_id=message_id,
            headers=headers, subject=subject, text=rendered.text, html=rendered.html, state=st.OUT_QUEUED,
            attempts=0, next_attempt_at=trigger.at, give_up_at=trigger.at + self.give_up_after,
        )
        if template == "agent_reply" and case.first_response_at is None:
            tx.update_case(case, first_response_at=trigger.at)
        done.queued.append({"outbox": row_id, "template": template, "to": to[0], "message_id": message_id})
        log.info("outbox queued #%d case=%s template=%s to=%s message_id=<%s>", row_id, case.label, template, to[0],
                 message_id)
        return row_id

    # -- helpers --------------------------------------------------------------------------

    def _facts(self, tx: FlowTx, case: CaseRec, template: str, address: str, trigger: Trigger,
               fresh: bool = False) -> LoopFacts:
        hour_ago = trigger.at - timedelta(hours=1)
        window_start = trigger.at - self.loop_window
        sup = tx.suppression(address, trigger.at)
        base = _base_address(address)
        is_ack = template == "ack"
        return LoopFacts(
            template=template,
            recipient=address,
            trigger_kind=trigger.kind,
            actor=trigger.sender if trigger.sender_class == AGENT else None,
            own_address=base in self.cfg.own_addresses or self.cfg.mailbox_for(address) is not None,
            noreply=is_noreply(address),
            suppressed=sup.reason if sup else None,
            case_flagged=LOOP_TAG in (case.tags or []),
            acks_to_recipient_last_hour=tx.count_outbox(since=hour_ago, template="ack", recipient=address)
            if is_ack else 0,
            # A case opened by this very message has no history yet: no need to count it.
            acks_on_case_last_hour=tx.count_outbox(since=hour_ago, template="ack", case_id=case.id)
            if is_ack and not fresh else 0,
            case_traffic_in_window=1 if fresh else
            tx.count_outbox(since=window_start, case_id=case.id, audience=CUSTOMER)
            + tx.count_inbound_messages(case.id, window_start),
        )

    def _flag_loop(self, tx: FlowTx, case: CaseRec, reason: str, at: datetime) -> None:
        if LOOP_TAG in (case.tags or []):
            return
        tx.update_case(case, tags=[*(case.tags or []), LOOP_TAG])
        tx.add_event(case.id, "loop", {"text": f"automated mail stopped: {reason}; remove the tag "
                                               f"'{LOOP_TAG}' to send automated mail again"}, at=at)
        log.warning("mail loop case=%s: %s", case.label, reason)

    def _skip(self, tx: FlowTx, done: Notified, case: CaseRec, template: str, to: str, check: str, reason: str,
              at: datetime) -> None:
        done.skipped.append({"template": template, "to": to, "check": check, "reason": reason})
        tx.add_event(case.id, "mail_skipped", {"template": template, "to": to, "check": check, "reason": reason}, at=at)
        log.info("outbox skipped case=%s template=%s to=%s check=%s: %s", case.label, template, to, check, reason)

    def _mailbox(self, case: CaseRec) -> MailboxConfig:
        return (self.cfg.mailbox_for(case.mailbox or "") if case.mailbox else None) or self.cfg.mailbox[0]

    def _brand_name(self, mailbox: MailboxConfig) -> str:
        return mailbox.name or mailbox.brand or mailbox.address.rpartition("@")[2]

    def _agents(self, case: CaseRec) -> list[tuple[str, str]]:
        """Who hears of a case: its assignee, else the agents of its queue (not those away)."""
        ruleset = self.rules()
        if case.assignee:
            addrs = [case.assignee.lower()]
        else:
            queue = ruleset.queues.get(case.queue or "")
            addrs = list(queue.agents) if queue else []
        out = []
        for a in dict.fromkeys(addrs):
            agent = ruleset.agents.get(a)
            if agent is not None and agent.away:
                continue
            out.append((a, agent.name if agent else ""))
        return out

    def _thread(self, tx: FlowTx, case: CaseRec, template: str, trigger: Trigger) -> tuple[str | None, list[str]]:
        """In-Reply-To and References: continue the customer's thread (never our made-up ids)."""
        in_reply_to, refs = self._thread_ids(tx, case, template, trigger)
        refs = [r for r in refs if not is_synthesised_id(r)]
        return (None if in_reply_to and is_synthesised_id(in_reply_to) else in_reply_to), refs

    def _thread_ids(self, tx: FlowTx, case: CaseRec, template: str, trigger: Trigger) -> tuple[str | None, list[str]]:
        if template == "agent_reply" or not trigger.message_id:
            # The customer never saw the agent's own mail nor our notices to agents: continue
            # from the case's public messages, answering the customer's latest one.
            agents = self.rules().agent_addresses
            msgs = [(m, d, f) for m, d, f in tx.case_public_messages(case.id)
                    if m != trigger.message_id and not (d == "in" and f in agents)]
            ids = list(dict.fromkeys(m for m, _, _ in msgs))
            refs = ids[:1] + ids[-9:] if len(ids) > 10 else ids
            from_customer = [m for m, d, _ in msgs if d == "in"]
            return (from_customer[-1] if from_customer else (refs[-1] if refs else None)), refs
        refs = list(dict.fromkeys([*trigger.references[-9:], trigger.message_id]))
        return trigger.message_id, refs

    def _context(self, tx: FlowTx, case: CaseRec, language: str, brand_name: str, mailbox: MailboxConfig,
                 to: tuple[str, str], trigger: Trigger, **extra: Any) -> dict[str, Any]:
        ruleset = self.rules()
        queue = ruleset.queues.get(case.queue or "")
        assignee = ruleset.agents.get((case.assignee or "").lower())
        secret = self.secret()
        case_data = {
            "number": case.label, "subject": case.subject, "status": case.status, "priority": case.priority,
            "queue": case.queue, "queue_name": (queue.name if queue else "") or case.queue or "",
            "category": case.category, "assignee": case.assignee, "assignee_name": assignee.name if assignee else None,
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
                       "text": trigger.text.strip()[:20000], "date": format_time(trigger.at, language, self.cfg)}
        customer = {"name": case.requester.name if case.requester else "",
                    "address": case.requester.address if case.requester else ""}
        return build_context(
            language=language, case=case_data, brand={"name": brand_name, "mailbox": mailbox.address},
            customer=customer, recipient={"name": to[1], "address": to[0]}, message=message,
            reply_address=reply_address(mailbox.address, case.number, secret, "c"),
            note_address=reply_address(mailbox.address, case.number, secret, "n"), **extra,
        )


def _base_address(address: str) -> str:
    local, at, domain = address.lower().partition("@")
    return local.split("+", 1)[0] + at + domain


def dsn_report(raw: bytes) -> tuple[bool, list[str]]:
    """(permanent, failed recipients) of a delivery-status report, read from the raw bytes.

    Not permanent when every ``Action:`` is something other than ``failed`` (delayed,
    relayed…); a bounce without a machine-readable report counts as permanent. Read from
    the raw bytes because the report's header blocks are not kept as an attachment.
    """
    from email import message_from_bytes, message_from_string
    from email.policy import compat32

    actions: list[str] = []
    failed: list[str] = []
    for part in message_from_bytes(raw, policy=compat32).walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        blocks = payload if isinstance(payload, list) else [message_from_string(str(payload), policy=compat32)]
        for block in blocks:
            action = str(block.get("Action", "")).strip().lower()
            if action:
                actions.append(action)
            rcpt = str(block.get("Final-Recipient", "") or block.get("Original-Recipient", "")).split(";", 1)[-1].strip()
            if rcpt and action == "failed":
                failed.append(rcpt.lower())
    return (not actions or "failed" in actions), failed
