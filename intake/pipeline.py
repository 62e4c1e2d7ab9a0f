"""The one place that runs the flow of DESIGN.md 3 over a stored inbound record.

parse → classify → thread → route → store → notify, in one transaction per message.
The steps themselves are pure (``parse``, ``classify``, ``matching``, ``rules``); this
module gathers their evidence from the store and writes their outcome. A message whose
processing raises is quarantined with the error; outcomes that are not errors
(duplicate, dropped, automated) are return values.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from intake import store as st
from intake.classify import AGENT, AUTOMATED, BOUNCE, CUSTOMER, MESSAGE, OWN, Classification, classify
from intake.config import Config, MailboxConfig, base_address
from intake.matching import Evidence, Match, case_tokens, clean_subject, decide, parse_reply_address
from intake.notify import Notified, Notifier, Trigger, choose_language, dsn_report
from intake.parse import ParsedMail, parse
from intake.rules import Decision, RuleContext, RuleSet, evaluate, pick_least_open, pick_round_robin

log = logging.getLogger("intake.pipeline")

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Outcome:
    """What processing decided for one inbound record."""

    state: str
    case_number: str | None = None
    reason: str = ""
    message_id: str | None = None


@dataclass
class _Run:
    """Working state of one message through the flow; its ``log`` becomes the processing log."""

    rec: st.InboundWork
    mail: ParsedMail
    cls: Classification
    mailbox: MailboxConfig
    now: datetime
    # One rule set for the whole message, even if a hot reload swaps it meanwhile.
    ruleset: RuleSet = field(default_factory=RuleSet)
    log: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step: str, **data: Any) -> None:
        self.log.append({"at": self.now.isoformat(), "step": step, **data})


class Processor:
    """Turns stored inbound records into cases and comments."""

    def __init__(self, cfg: Config, store: st.Store, rules: Callable[[], RuleSet], clock: Clock = st.utcnow) -> None:
        self.cfg = cfg
        self.store = store
        self.rules = rules
        self.clock = clock
        self._secret: str | None = None
        self._notifier: Notifier | None = None

    @property
    def notifier(self) -> Notifier:
        """Renders the mails a change causes into the outbox (same transaction)."""
        if self._notifier is None:
            self._notifier = Notifier.for_config(self.cfg, self.rules, lambda: self.secret)
        return self._notifier

    @property
    def secret(self) -> str:
        if self._secret is None:
            self._secret = os.environ.get("INTAKE_SECRET") or self.store.secret()
        return self._secret

    # -- entry points -------------------------------------------------------------------

    def process_pending(self, limit: int | None = None, batch: int = 50) -> int:
        """Process every ``received`` record (oldest first); returns how many were handled."""
        done = 0
        after = 0
        while limit is None or done < limit:
            size = batch if limit is None else min(batch, limit - done)
            ids = self.store.pending_inbound(limit=size, after_id=after)
            if not ids:
                break
            self.process_batch(ids)
            done += len(ids)
            after = ids[-1]
        return done

    def process(self, inbound_id: int) -> Outcome:
        """Run the flow for one record; an exception quarantines it and is not raised."""
        return self.process_batch([inbound_id])[0]

    def process_batch(self, inbound_ids: list[int]) -> list[Outcome]:
        """Run the flow for several records in one transaction (one durable commit).

        When any message raises, the whole batch is rolled back and each message runs
        again in a transaction of its own, so that only the failing one is quarantined.
        """
        _ = self.secret  # read (or made) outside the processing transaction
        try:
            with self.store.session() as s:
                records = st.load_inbound(s, inbound_ids)
                outcomes = [self._process_one(s, records.get(i)) for i in inbound_ids]
                st.save_inbound(s, [r for r in records.values() if r.processed_at is not None])
        except st.StoreUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else quarantines, never loses
            if len(inbound_ids) > 1:
                return [self.process_batch([i])[0] for i in inbound_ids]
            error = f"{type(exc).__name__}: {exc}"
            self.store.quarantine(inbound_ids[0], error, traceback.format_exc())
            log.warning("inbound quarantined id=%s error=%s", inbound_ids[0], error)
            return [Outcome(st.QUARANTINED, reason=error)]
        for outcome in outcomes:
            log.info("inbound %s case=%s message_id=<%s> %s", outcome.state, outcome.case_number or "-",
                     outcome.message_id, outcome.reason)
        return outcomes

    def _process_one(self, s: Any, rec: st.InboundWork | None) -> Outcome:
        if rec is None or rec.state != st.RECEIVED:
            return Outcome(rec.state if rec else "missing", reason="not waiting for processing")
        return self._process(s, rec)

    # -- the flow -----------------------------------------------------------------------

    def _process(self, s: Any, rec: st.InboundWork) -> Outcome:
        now = self.clock()
        if rec.raw is None:
            raise ValueError("raw bytes are no longer stored (retention) and cannot be processed")
        mail = parse(rec.raw)
        ruleset = self.rules()
        cls = classify(mail, own_addresses=self.cfg.own_addresses, agents=ruleset.agent_addresses)
        mailbox = self.cfg.mailbox_for(rec.mailbox) or self.cfg.mailbox[0]
        run = _Run(rec=rec, mail=mail, cls=cls, mailbox=mailbox, now=now, ruleset=ruleset)
        rec.message_id = mail.message_id
        rec.from_address = mail.from_.address if mail.from_ else None
        rec.subject = mail.subject
        rec.attempts += 1
        run.step("parsed", message_id=mail.message_id, synthesised=mail.message_id_synthesised,
                 subject=mail.subject, **{"from": mail.from_.address if mail.from_ else None},
                 charsets=mail.charsets, defects=mail.defects, attachments=len(mail.attachments))
        run.step("classified", sender=cls.sender, kind=cls.kind, reasons=list(cls.reasons))

        outcome = self._duplicate(s, run) or self._flow(s, run)
        rec.state = outcome.state
        rec.processed_at = now
        rec.error = None
        rec.log = [*rec.log, *run.log, {"at": now.isoformat(), "step": "done", "state": outcome.state,
                                                "case": outcome.case_number, "reason": outcome.reason}]
        return outcome

    def _duplicate(self, s: Any, run: _Run) -> Outcome | None:
        """The same message again (another mailbox, an SMTP retry, an IMAP re-poll)."""
        key = run.mail.message_id
        if st.claim_message_key(s, key, run.rec.id):
            return None
        owner = st.message_key_owner(s, key)
        assert owner is not None
        first_inbound, first_case = owner
        run.rec.duplicate_of = first_inbound
        case = st.case_by_id(s, first_case) if first_case else None
        run.rec.case_id = case.id if case else None
        label = case.label if case else None
        if case is not None:
            st.add_event(s, case, "duplicate", {"message_id": key, "mailbox": run.rec.mailbox,
                                                 "channel": run.rec.channel, "inbound_id": run.rec.id},
                         inbound_id=run.rec.id, at=run.now)
        reason = f"same Message-ID as inbound #{first_inbound}"
        run.step("duplicate", of=first_inbound, case=label)
        return Outcome(st.DUPLICATE, label, reason, key)

    def _flow(self, s: Any, run: _Run) -> Outcome:
        mail, cls = run.mail, run.cls
        if cls.kind == BOUNCE:
            return self._bounce(s, run)

        match = self._thread(s, run)
        run.step("threaded", method=match.method, reason=match.reason,
                 case=f"{self.cfg.cases.prefix}-{match.case_number}" if match.case_number else None)

        if match.case_number is not None:
            case = st.case_by_number(s, match.case_number)
            assert case is not None
            return self._comment(s, run, case, match)

        if not cls.opens_case:
            reason = "automated mail does not open a case: " + "; ".join(cls.reasons)
            run.step("dropped", reason=reason)
            return Outcome(st.DROPPED, None, reason, mail.message_id)

        decision = self._route(s, run)
        if decision.drop:
            reason = "dropped by rule " + ", ".join(t.get("rule", "?") for t in decision.trace if t.get("matched"))
            run.step("dropped", reason=reason)
            return Outcome(st.DROPPED, None, reason, mail.message_id)
        case = self._new_case(s, run, decision, match)
        return Outcome(st.PROCESSED, case.label, "new case", mail.message_id)

    # -- thread -------------------------------------------------------------------------

    def _thread(self, s: Any, run: _Run) -> Match:
        mail = run.mail
        prefixes = {self.cfg.cases.prefix}
        ev: dict[str, Any] = {}
        for rcpt in [*run.rec.envelope_to, *(a.address for a in mail.to), *(a.address for a in mail.cc)]:
            signed = parse_reply_address(rcpt, self.secret)
            if signed:
                ev["signed"] = signed
                ev["signed_case_exists"] = st.case_by_number(s, signed[1]) is not None
                break
        found = st.case_by_message_ids(s, [*mail.in_reply_to, *reversed(mail.references)])
        if found:
            ev["by_message_id"], ev["by_message_id_ref"] = found[0].number, found[1]
        thread_index = _thread_index_prefix(mail)
        if thread_index and "by_message_id" not in ev:
            case = st.case_by_thread_index(s, thread_index)
            if case:
                ev["by_thread_index"] = case.number
        tokens = tuple(n for _, n in case_tokens(mail.subject, prefixes))
        if tokens:
            sender = mail.from_.key if mail.from_ else ""
            token_cases: dict[int, bool] = {}
            for n in tokens:
                case = st.case_by_number(s, n)
                if case is None:
                    continue
                members = st.participant_addresses(s, case.id)
                same_org = bool(case.organization and mail.from_ and mail.from_.domain == case.organization.domain)
                token_cases[n] = sender in members or same_org or run.cls.sender == AGENT
            ev["tokens"], ev["token_cases"] = tokens, token_cases
        return decide(Evidence(**ev))

    # -- route --------------------------------------------------------------------------

    def _route(self, s: Any, run: _Run) -> Decision:
        """Evaluate the rules for a new case and count each matched rule's hit."""
        ctx = RuleContext(
            mail=run.mail, classification=run.cls, mailbox=run.mailbox.address,
            recipients=tuple(run.rec.envelope_to or ()), channel=run.rec.channel, now=run.now,
            organization=self._organization_domain(run.mail.from_.address if run.mail.from_ else ""),
            calendar=self.cfg.calendar,
        )
        decision = evaluate(run.ruleset, ctx)
        st.record_rule_hits(s, decision.matched, run.now)
        actions = {k: v for k, v in (("priority", decision.priority), ("category", decision.category),
                                     ("assign", decision.assign), ("language", decision.language),
                                     ("ack", decision.ack)) if v is not None}
        if decision.tags:
            actions["tags"] = list(decision.tags)
        if decision.drop:
            actions["drop"] = True
        run.step("routed", rules=list(decision.trace), queue=decision.queue or run.mailbox.queue,
                 default_queue=decision.queue is None, actions=actions)
        return decision

    def _assign(self, s: Any, run: _Run, case: st.Case, decision: Decision) -> None:
        """Apply ``assign`` (a rule's, else the queue's method) and record who and why."""
        ruleset = run.ruleset
        queue = ruleset.queues.get(case.queue or "")
        method = decision.assign or (queue.assign if queue else "none")
        rule = decision.set_by.get("assign") if decision.assign else None
        why = f"rule {rule}" if rule else f"queue {case.queue} assigns {method}"
        if method == "none":
            return
        agent: str | None
        if method in ("round_robin", "least_open"):
            order = list(queue.agents) if queue else []
            available = [a for a in order if not (ruleset.agents.get(a) and ruleset.agents[a].away)]
            if method == "round_robin":
                agent = pick_round_robin(order, available, st.rotation_last(s, case.queue or "") if available else None)
                if agent:
                    st.set_rotation_last(s, case.queue or "", agent, run.now)
            else:
                agent = pick_least_open(order, available, st.open_case_counts(s, available))
            if agent is None:
                reason = (f"queue {case.queue} is not defined in the rules" if queue is None else
                          f"no agent of queue {case.queue} is available (all away or none listed)")
                st.add_event(s, case, "note", {"text": f"not assigned: {reason}", "rule": rule}, at=run.now)
                run.step("assigned", assignee=None, method=method, rule=rule, reason=reason)
                return
        else:
            agent = method
            method = "rule"
        case.assignee = agent
        data: dict[str, Any] = {"from": None, "to": agent, "method": method, "rule": rule, "queue": case.queue,
                                "reason": why}
        if ruleset.agents.get(agent) and ruleset.agents[agent].away:
            data["away"] = True
        st.add_event(s, case, "assignee", data, inbound_id=run.rec.id, at=run.now)
        run.step("assigned", assignee=agent, method=method, rule=rule, reason=why)

    # -- store --------------------------------------------------------------------------

    def _organization_domain(self, address: str) -> str | None:
        return organization_domain(self.cfg, address)

    def _contact(self, s: Any, address: str, name: str) -> st.ContactRef:
        return st.get_or_create_contact(s, address, name, self._organization_domain(address))

    def _new_case(self, s: Any, run: _Run, decision: Decision, match: Match) -> st.Case:
        mail, rec = run.mail, run.rec
        requester = self._contact(s, mail.from_.address, mail.from_.name) if mail.from_ else None
        language, language_from = choose_language(
            rule=decision.language, contact=requester.language if requester else None,
            message_text=f"{mail.subject}\n{mail.text}", mailbox=run.mailbox.language or None,
            default=self.cfg.templates.default_language)
        case = st.create_case(
            s,
            prefix=self.cfg.cases.prefix,
            subject=clean_subject(mail.subject),
            requester_id=requester.id if requester else None,
            organization_id=requester.organization_id if requester else None,
            status="new",
            priority=decision.priority or "medium",
            queue=decision.queue or run.mailbox.queue,
            category=decision.category,
            channel=rec.channel,
            mailbox=run.mailbox.address,
            brand=run.mailbox.brand or None,
            language=language,
            tags=list(decision.tags),
            created_at=run.now,
            updated_at=run.now,
        )
        self._attach_to_case(s, run, case)
        st.add_event(s, case, "created", {"queue": case.queue, "priority": case.priority, "mailbox": case.mailbox,
                                          "channel": case.channel}, inbound_id=rec.id, at=run.now)
        if requester:
            st.add_participant(s, case, requester, "requester")
        self._add_cc_participants(s, run, case)
        row = self._store_message(s, run, case, visibility="public")
        st.add_event(s, case, "message", message_row=row, inbound_id=rec.id, at=run.now)
        for t in decision.trace:
            if t.get("matched"):
                st.add_event(s, case, "rule", dict(t), inbound_id=rec.id, at=run.now)
        self._assign(s, run, case, decision)
        for number in match.mentions:
            st.add_event(s, case, "note", {"text": f"subject names {self.cfg.cases.prefix}-{number}, "
                                                   "but the sender is not its participant"}, at=run.now)
        run.step("stored", case=case.label, created=True, language=language, language_from=language_from)
        # notify: same transaction as the new case (DESIGN 3)
        self._notified(run, self.notifier.new_case(s, case, self._trigger(run), decision.ack))
        return case

    def _attach_to_case(self, s: Any, run: _Run, case: st.Case) -> None:
        """The inbound record and its Message-ID now belong to ``case``."""
        run.rec.case_id = case.id
        st.set_message_key_case(s, run.mail.message_id, case.id)

    def _trigger(self, run: _Run) -> Trigger:
        mail, cls = run.mail, run.cls
        refs = [*mail.references, *(i for i in mail.in_reply_to if i not in mail.references)]
        return Trigger(at=run.now, inbound_id=run.rec.id, message_id=mail.message_id, references=tuple(refs),
                       sender=mail.from_.key if mail.from_ else None, sender_name=mail.from_.name if mail.from_ else "",
                       sender_class=cls.sender, kind=cls.kind, subject=mail.subject, text=mail.text)

    def _notified(self, run: _Run, done: Notified) -> None:
        if done.queued or done.skipped:
            run.step("notify", **done.as_log())

    def _add_cc_participants(self, s: Any, run: _Run, case: st.Case) -> None:
        own = self.cfg.own_addresses
        sender = run.mail.from_.key if run.mail.from_ else ""
        for a in [*run.mail.to, *run.mail.cc]:
            if base_address(a.key) in own or a.key == sender or self.cfg.mailbox_for(a.key) is not None:
                continue
            st.add_participant(s, case, self._contact(s, a.address, a.name), "cc")

    def _store_message(self, s: Any, run: _Run, case: st.Case, visibility: str) -> int:
        mail = run.mail
        return st.add_message(
            s, case, direction="in", visibility=visibility, message_id=mail.message_id,
            from_address=mail.from_.address if mail.from_ else None, from_name=mail.from_.name if mail.from_ else None,
            to=[a.address for a in mail.to], cc=[a.address for a in mail.cc], subject=mail.subject, text=mail.text,
            html=mail.html, sent_at=mail.date, inbound_id=run.rec.id, thread_index=_thread_index_prefix(mail),
            attachments=mail.attachments,
        )

    def _comment(self, s: Any, run: _Run, case: st.Case, match: Match) -> Outcome:
        """Add the message to an existing case, reopening it as DESIGN 5 says."""
        mail, cls = run.mail, run.cls
        if case.status == "closed" and cls.kind != AUTOMATED and cls.sender not in (AGENT, OWN):
            closed_at = case.closed_at or case.updated_at
            if run.now - closed_at > timedelta(days=self.cfg.cases.reopen_days):
                follow = self._follow_up(s, run, case)
                return Outcome(st.PROCESSED, follow.label, f"follow-up of closed {case.label}", mail.message_id)
        visibility = "internal" if match.internal else "public"
        row = self._store_message(s, run, case, visibility=visibility)
        st.add_event(s, case, "message", {"threading": match.method}, message_row=row, inbound_id=run.rec.id, at=run.now)
        status_change: tuple[str, str] | None = None
        if cls.sender == AGENT:
            if case.first_response_at is None and visibility == "public":
                case.first_response_at = run.now
        elif cls.kind != AUTOMATED and cls.sender != OWN:
            if mail.from_:
                st.add_participant(s, case, self._contact(s, mail.from_.address, mail.from_.name), "cc")
            self._add_cc_participants(s, run, case)
            if case.status in ("resolved", "closed", "pending"):
                status_change = (case.status, "open")
                self._set_status(s, case, "open", run, "customer replied")
        case.updated_at = run.now
        self._attach_to_case(s, run, case)
        run.step("stored", case=case.label, created=False, visibility=visibility)
        # notify: same transaction as the comment. An internal note (the `n` address) reaches
        # no customer; automated mail causes no mail at all.
        if cls.kind == MESSAGE:
            if cls.sender == AGENT and visibility == "public":
                self._notified(run, self.notifier.agent_reply(s, case, self._trigger(run)))
            elif cls.sender == CUSTOMER:
                self._notified(run, self.notifier.customer_comment(s, case, self._trigger(run), status_change))
        return Outcome(st.PROCESSED, case.label, f"comment ({match.method})", mail.message_id)

    def _follow_up(self, s: Any, run: _Run, old: st.Case) -> st.Case:
        decision = self._route(s, run)
        case = self._new_case(s, run, decision, Match(None, "follow-up", ""))
        case.linked_case_id = old.id
        st.add_event(s, case, "note", {"text": f"follow-up of {old.label}, closed more than "
                                               f"{self.cfg.cases.reopen_days} days ago", "linked": old.label}, at=run.now)
        st.add_event(s, old, "note", {"text": f"customer wrote again: follow-up {case.label}", "linked": case.label},
                     at=run.now)
        return case

    def _set_status(self, s: Any, case: st.Case, status: str, run: _Run, why: str) -> None:
        old = case.status
        case.status = status
        st.add_event(s, case, "status", {"from": old, "to": status, "reason": why}, at=run.now)
        run.step("status", case=case.label, **{"from": old, "to": status})

    # -- bounces ------------------------------------------------------------------------

    def _bounce(self, s: Any, run: _Run) -> Outcome:
        found = st.case_by_message_ids(s, list(run.cls.bounced_message_ids))
        if found is None:
            # No Message-ID we know: the signed envelope sender (Return-Path) of our mail names the case.
            for rcpt in [*run.rec.envelope_to, *(a.address for a in run.mail.to)]:
                signed = parse_reply_address(rcpt, self.secret)
                case_ = st.case_by_number(s, signed[1]) if signed else None
                if case_ is not None:
                    found = (case_, "")
                    break
        if found is None:
            reason = "bounce that names none of our messages"
            run.step("dropped", reason=reason)
            return Outcome(st.DROPPED, None, reason, run.mail.message_id)
        case, ref = found
        row = self._store_message(s, run, case, visibility="internal")
        permanent, failed = dsn_report(run.rec.raw or b"")
        failed = list(dict.fromkeys([*(a.lower() for a in run.cls.failed_recipients), *failed]))
        marked = self.notifier.bounce(s, case, self._trigger(run), [ref] if ref else [], failed, permanent)
        st.add_event(s, case, "bounce", {"bounced_message_id": ref or None, "recipients": failed,
                                         "permanent": permanent, "outbox": marked},
                     message_row=row, inbound_id=run.rec.id, at=run.now)
        self._attach_to_case(s, run, case)
        run.step("bounce", case=case.label, bounced=ref or None, permanent=permanent, outbox=marked)
        return Outcome(st.PROCESSED, case.label, f"bounce of <{ref or 'signed return path'}>", run.mail.message_id)


def organization_domain(cfg: Config, address: str) -> str | None:
    """The organization (mail domain) of an address; free-mail domains make none."""
    domain = address.rpartition("@")[2].lower()
    if not domain or domain in cfg.cases.free_mail_domains:
        return None
    return domain


def _thread_index_prefix(mail: ParsedMail) -> str | None:
    """The conversation part of Outlook's Thread-Index (first 22 bytes, base64)."""
    value = mail.header("Thread-Index")
    if not value:
        return None
    try:
        raw = base64.b64decode(value.strip() + "==", validate=False)
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(raw[:22]).decode() if len(raw) >= 22 else None
