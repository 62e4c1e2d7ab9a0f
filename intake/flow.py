"""The one place that runs the flow of DESIGN.md 3 over stored inbound records.

parse → classify → thread → route → store → notify. The steps themselves are pure
(``parse``, ``classify``, ``matching``, ``rules``); this module gathers their evidence from
the store and writes their outcome. A batch of records is processed in two phases:

1. **prepare**, outside any write transaction: read the raw bytes, parse and classify
   (the costly pure work, which so never holds SQLite's one writer slot);
2. **apply**, in one transaction for the batch (one durable commit), a savepoint per
   message: duplicate check, threading, routing, the case or comment, the mails it causes.

A message whose processing raises is rolled back to its savepoint and quarantined with
the error; the rest of the batch goes on. Outcomes that are not errors (duplicate,
dropped, automated) are return values.
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
from intake.mail.classify import AGENT, AUTOMATED, BOUNCE, CUSTOMER, MESSAGE, OWN, Classification, classify
from intake.config import Config, MailboxConfig, base_address
from intake.flowstore import CaseRec, ContactRef, FlowTx, InboundWork
from intake.threads import Evidence, Match, case_tokens, clean_subject, decide, parse_reply_address
from intake.notify import Notified, Notifier, Trigger, choose_language, dsn_report
from intake.mail.parse import ParsedMail, parse
from intake.rules import Decision, RuleContext, RuleSet, evaluate, pick_least_open, pick_round_robin

log = logging.getLogger("intake.flow")

Clock = Callable[[], datetime]


NOT_WAITING = "not waiting for processing"


@dataclass(frozen=True)
class Outcome:
    """What processing decided for one inbound record."""

    state: str
    case_number: str | None = None
    reason: str = ""
    message_id: str | None = None

    @property
    def skipped(self) -> bool:
        """Not processed here: done already, or being processed by another process."""
        return self.reason == NOT_WAITING


@dataclass
class _Run:
    """One message through the flow; its ``log`` becomes the processing log."""

    rec: InboundWork
    mailbox: MailboxConfig
    now: datetime
    # One rule set for the whole message, even if a hot reload swaps it meanwhile.
    ruleset: RuleSet
    mail: ParsedMail | None = None
    cls: Classification | None = None
    error: Exception | None = None  # raised by a pure step: quarantines the message
    error_traceback: str = ""
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
        """Process every ``received`` record (oldest first); returns how many were handled.

        Messages waiting in the SMTP listener's spool are imported first.
        """
        while self.store.import_spool():
            pass
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
        """Run the flow for several records: prepared first, then applied in one transaction.

        A message that raises is rolled back to its savepoint and quarantined. Should the
        batch's transaction itself fail, the records are applied again one at a time, so
        that only the one at fault is quarantined. Raises ``StoreUnavailable`` when the
        database cannot be used (nothing of the transaction that met it is written).
        """
        _ = self.secret  # read (or made) outside the processing transaction
        records = self.store.load_inbound(inbound_ids)
        ruleset = self.rules()
        runs = {i: self._prepare(rec, ruleset) for i, rec in records.items() if rec.state == st.RECEIVED}
        try:
            outcomes = self._apply_batch(inbound_ids, records, runs)
        except Exception as exc:  # noqa: BLE001 - the batch failed outside any one message's savepoint
            if self.store.is_unavailable(exc):
                raise
            if len(inbound_ids) > 1:
                return [o for i in inbound_ids for o in self.process_batch([i])]
            error = f"{type(exc).__name__}: {exc}"
            self.store.quarantine(inbound_ids[0], error, traceback.format_exc())
            outcomes = {inbound_ids[0]: Outcome(st.QUARANTINED, reason=error)}
        for i in inbound_ids:
            o = outcomes[i]
            if o.state == st.QUARANTINED:
                log.warning("inbound quarantined id=%s error=%s", i, o.reason)
            else:
                log.info("inbound %s case=%s message_id=<%s> %s", o.state, o.case_number or "-", o.message_id,
                         o.reason)
        return [outcomes[i] for i in inbound_ids]

    def _apply_batch(self, inbound_ids: list[int], records: dict[int, InboundWork],
                     runs: dict[int, _Run]) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        with self.store.flow() as tx:
            # Locked (PostgreSQL) and read again: another process may have taken a record since.
            current = tx.inbound_states(list(runs))
            done: list[InboundWork] = []
            for i in inbound_ids:
                run, now = runs.get(i), current.get(i)
                if run is None or now is None or now[0] != st.RECEIVED:
                    state = now[0] if now else records[i].state if i in records else "missing"
                    outcomes[i] = Outcome(state, reason=NOT_WAITING)
                    continue
                run.rec.log, run.rec.attempts = now[1], now[2]
                outcomes[i] = self._apply(tx, run)
                if outcomes[i].state != st.QUARANTINED:  # a quarantined one is written by tx.quarantine
                    done.append(run.rec)
            tx.save_inbound(done)
        return outcomes

    # -- prepare (pure, outside the write transaction) --------------------------------------

    def _prepare(self, rec: InboundWork, ruleset: RuleSet) -> _Run:
        mailbox = self.cfg.mailbox_for(rec.mailbox) or self.cfg.mailbox[0]
        run = _Run(rec=rec, mailbox=mailbox, now=self.clock(), ruleset=ruleset)
        try:
            if rec.raw is None:
                raise ValueError("raw bytes are no longer stored (retention) and cannot be processed")
            run.mail = parse(rec.raw)
            run.cls = classify(run.mail, own_addresses=self.cfg.own_addresses, agents=ruleset.agent_addresses)
        except Exception as exc:  # noqa: BLE001 - quarantined in the apply phase, with its traceback
            run.error, run.error_traceback = exc, traceback.format_exc()
        return run

    # -- apply (in the batch's transaction) --------------------------------------------------

    def _apply(self, tx: FlowTx, run: _Run) -> Outcome:
        """One message in a savepoint of its own: its outcome, or quarantine when it raises."""
        try:
            with tx.savepoint():
                if run.error is not None:
                    raise run.error
                return self._process(tx, run)
        except Exception as exc:  # noqa: BLE001 - anything else quarantines, never loses
            if self.store.is_unavailable(exc):
                raise
            error = f"{type(exc).__name__}: {exc}"
            tb = run.error_traceback if exc is run.error else traceback.format_exc()
            tx.quarantine(run.rec.id, error, tb, run.now)
            return Outcome(st.QUARANTINED, reason=error)

    def _process(self, tx: FlowTx, run: _Run) -> Outcome:
        mail, cls, rec = run.mail, run.cls, run.rec
        assert mail is not None and cls is not None
        rec.message_id = mail.message_id
        rec.from_address = mail.from_.address if mail.from_ else None
        rec.subject = mail.subject
        rec.attempts += 1
        run.step("parsed", message_id=mail.message_id, synthesised=mail.message_id_synthesised,
                 subject=mail.subject, **{"from": mail.from_.address if mail.from_ else None},
                 charsets=mail.charsets, defects=mail.defects, attachments=len(mail.attachments))
        run.step("classified", sender=cls.sender, kind=cls.kind, reasons=list(cls.reasons))

        outcome = self._duplicate(tx, run) or self._flow(tx, run)
        rec.state = outcome.state
        rec.processed_at = run.now
        rec.error = None
        rec.log = [*rec.log, *run.log, {"at": run.now.isoformat(), "step": "done", "state": outcome.state,
                                        "case": outcome.case_number, "reason": outcome.reason}]
        return outcome

    def _duplicate(self, tx: FlowTx, run: _Run) -> Outcome | None:
        """The same message again (another mailbox, an SMTP retry, an IMAP re-poll)."""
        assert run.mail is not None
        key = run.mail.message_id
        if tx.claim_message_key(key, run.rec.id):
            return None
        owner = tx.message_key_owner(key)
        assert owner is not None
        first_inbound, first_case = owner
        run.rec.duplicate_of = first_inbound
        case = tx.case_by_id(first_case) if first_case else None
        run.rec.case_id = case.id if case else None
        label = case.label if case else None
        if case is not None:
            tx.add_event(case.id, "duplicate", {"message_id": key, "mailbox": run.rec.mailbox,
                                                "channel": run.rec.channel, "inbound_id": run.rec.id},
                         inbound_id=run.rec.id, at=run.now)
        reason = f"same Message-ID as inbound #{first_inbound}"
        run.step("duplicate", of=first_inbound, case=label)
        return Outcome(st.DUPLICATE, label, reason, key)

    def _flow(self, tx: FlowTx, run: _Run) -> Outcome:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        if cls.kind == BOUNCE:
            return self._bounce(tx, run)

        match = self._thread(tx, run)
        run.step("threaded", method=match.method, reason=match.reason,
                 case=f"{self.cfg.cases.prefix}-{match.case_number}" if match.case_number else None)

        if match.case_number is not None:
            case = tx.case_by_number(match.case_number)
            assert case is not None
            return self._comment(tx, run, case, match)

        if not cls.opens_case:
            reason = "automated mail does not open a case: " + "; ".join(cls.reasons)
            run.step("dropped", reason=reason)
            return Outcome(st.DROPPED, None, reason, mail.message_id)

        decision = self._route(tx, run)
        if decision.drop:
            reason = "dropped by rule " + ", ".join(t.get("rule", "?") for t in decision.trace if t.get("matched"))
            run.step("dropped", reason=reason)
            return Outcome(st.DROPPED, None, reason, mail.message_id)
        case = self._new_case(tx, run, decision, match)
        return Outcome(st.PROCESSED, case.label, "new case", mail.message_id)

    # -- thread -------------------------------------------------------------------------

    def _thread(self, tx: FlowTx, run: _Run) -> Match:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        prefixes = {self.cfg.cases.prefix}
        ev: dict[str, Any] = {}
        for rcpt in [*run.rec.envelope_to, *(a.address for a in mail.to), *(a.address for a in mail.cc)]:
            signed = parse_reply_address(rcpt, self.secret)
            if signed:
                ev["signed"] = signed
                ev["signed_case_exists"] = tx.case_by_number(signed[1]) is not None
                break
        found = tx.case_by_message_ids([*mail.in_reply_to, *reversed(mail.references)])
        if found:
            ev["by_message_id"], ev["by_message_id_ref"] = found[0].number, found[1]
        thread_index = _thread_index_prefix(mail)
        if thread_index and "by_message_id" not in ev:
            case = tx.case_by_thread_index(thread_index)
            if case:
                ev["by_thread_index"] = case.number
        tokens = tuple(n for _, n in case_tokens(mail.subject, prefixes))
        if tokens:
            sender = mail.from_.key if mail.from_ else ""
            token_cases: dict[int, bool] = {}
            for n in tokens:
                case = tx.case_by_number(n)
                if case is None:
                    continue
                members = tx.participant_addresses(case.id)
                same_org = bool(case.organization and mail.from_ and mail.from_.domain == case.organization)
                token_cases[n] = sender in members or same_org or cls.sender == AGENT
            ev["tokens"], ev["token_cases"] = tokens, token_cases
        return decide(Evidence(**ev))

    # -- route --------------------------------------------------------------------------

    def _route(self, tx: FlowTx, run: _Run) -> Decision:
        """Evaluate the rules for a new case and count each matched rule's hit."""
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        ctx = RuleContext(
            mail=mail, classification=cls, mailbox=run.mailbox.address,
            recipients=tuple(run.rec.envelope_to or ()), channel=run.rec.channel, now=run.now,
            organization=organization_domain(self.cfg, mail.from_.address if mail.from_ else ""),
            calendar=self.cfg.calendar,
        )
        decision = evaluate(run.ruleset, ctx)
        tx.record_rule_hits(decision.matched, run.now)
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

    def _assign(self, tx: FlowTx, run: _Run, case: CaseRec, decision: Decision) -> None:
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
                agent = pick_round_robin(order, available, tx.rotation_last(case.queue or "") if available else None)
                if agent:
                    tx.set_rotation_last(case.queue or "", agent, run.now)
            else:
                agent = pick_least_open(order, available, tx.open_case_counts(available))
            if agent is None:
                reason = (f"queue {case.queue} is not defined in the rules" if queue is None else
                          f"no agent of queue {case.queue} is available (all away or none listed)")
                tx.add_event(case.id, "note", {"text": f"not assigned: {reason}", "rule": rule}, at=run.now)
                run.step("assigned", assignee=None, method=method, rule=rule, reason=reason)
                return
        else:
            agent = method
            method = "rule"
        tx.update_case(case, assignee=agent)
        data: dict[str, Any] = {"from": None, "to": agent, "method": method, "rule": rule, "queue": case.queue,
                                "reason": why}
        if ruleset.agents.get(agent) and ruleset.agents[agent].away:
            data["away"] = True
        tx.add_event(case.id, "assignee", data, inbound_id=run.rec.id, at=run.now)
        run.step("assigned", assignee=agent, method=method, rule=rule, reason=why)

    # -- store --------------------------------------------------------------------------

    def _contact(self, tx: FlowTx, address: str, name: str) -> ContactRef:
        return tx.contact(address, name, organization_domain(self.cfg, address))

    def _new_case(self, tx: FlowTx, run: _Run, decision: Decision, match: Match) -> CaseRec:
        mail, rec = run.mail, run.rec
        assert mail is not None
        requester = self._contact(tx, mail.from_.address, mail.from_.name) if mail.from_ else None
        language, language_from = choose_language(
            rule=decision.language, contact=requester.language if requester else None,
            message_text=f"{mail.subject}\n{mail.text}", mailbox=run.mailbox.language or None,
            default=self.cfg.templates.default_language)
        case = tx.create_case(
            prefix=self.cfg.cases.prefix,
            subject=clean_subject(mail.subject),
            requester=requester,
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
        )
        self._attach_to_case(tx, run, case)
        tx.add_event(case.id, "created", {"queue": case.queue, "priority": case.priority, "mailbox": case.mailbox,
                                          "channel": case.channel}, inbound_id=rec.id, at=run.now)
        if requester:
            tx.add_participant(case.id, requester, "requester")
        self._add_cc_participants(tx, run, case)
        row = self._store_message(tx, run, case, visibility="public")
        tx.add_event(case.id, "message", message_row=row, inbound_id=rec.id, at=run.now)
        for t in decision.trace:
            if t.get("matched"):
                tx.add_event(case.id, "rule", dict(t), inbound_id=rec.id, at=run.now)
        self._assign(tx, run, case, decision)
        for number in match.mentions:
            tx.add_event(case.id, "note", {"text": f"subject names {self.cfg.cases.prefix}-{number}, "
                                                   "but the sender is not its participant"}, at=run.now)
        run.step("stored", case=case.label, created=True, language=language, language_from=language_from)
        # notify: same transaction as the new case (DESIGN 3)
        self._notified(run, self.notifier.new_case(tx, case, self._trigger(run), decision.ack))
        return case

    def _attach_to_case(self, tx: FlowTx, run: _Run, case: CaseRec) -> None:
        """The inbound record and its Message-ID now belong to ``case``."""
        assert run.mail is not None
        run.rec.case_id = case.id
        tx.set_message_key_case(run.mail.message_id, case.id)

    def _trigger(self, run: _Run) -> Trigger:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        refs = [*mail.references, *(i for i in mail.in_reply_to if i not in mail.references)]
        return Trigger(at=run.now, inbound_id=run.rec.id, message_id=mail.message_id, references=tuple(refs),
                       sender=mail.from_.key if mail.from_ else None, sender_name=mail.from_.name if mail.from_ else "",
                       sender_class=cls.sender, kind=cls.kind, subject=mail.subject, text=mail.text)

    def _notified(self, run: _Run, done: Notified) -> None:
        if done.queued or done.skipped:
            run.step("notify", **done.as_log())

    def _add_cc_participants(self, tx: FlowTx, run: _Run, case: CaseRec) -> None:
        assert run.mail is not None
        own = self.cfg.own_addresses
        sender = run.mail.from_.key if run.mail.from_ else ""
        for a in [*run.mail.to, *run.mail.cc]:
            if base_address(a.key) in own or a.key == sender or self.cfg.mailbox_for(a.key) is not None:
                continue
            tx.add_participant(case.id, self._contact(tx, a.address, a.name), "cc")

    def _store_message(self, tx: FlowTx, run: _Run, case: CaseRec, visibility: str) -> int:
        mail = run.mail
        assert mail is not None
        return tx.add_message(
            case.id, direction="in", visibility=visibility, message_id=mail.message_id,
            from_address=mail.from_.address if mail.from_ else None, from_name=mail.from_.name if mail.from_ else None,
            to=[a.address for a in mail.to], cc=[a.address for a in mail.cc], subject=mail.subject, text=mail.text,
            html=mail.html, sent_at=mail.date, inbound_id=run.rec.id, thread_index=_thread_index_prefix(mail),
            attachments=mail.attachments,
        )

    def _comment(self, tx: FlowTx, run: _Run, case: CaseRec, match: Match) -> Outcome:
        """Add the message to an existing case, reopening it as DESIGN 5 says."""
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        if case.status == "closed" and cls.kind != AUTOMATED and cls.sender not in (AGENT, OWN):
            closed_at = case.closed_at or case.updated_at
            if run.now - closed_at > timedelta(days=self.cfg.cases.reopen_days):
                follow = self._follow_up(tx, run, case)
                return Outcome(st.PROCESSED, follow.label, f"follow-up of closed {case.label}", mail.message_id)
        visibility = "internal" if match.internal else "public"
        row = self._store_message(tx, run, case, visibility=visibility)
        tx.add_event(case.id, "message", {"threading": match.method}, message_row=row, inbound_id=run.rec.id,
                     at=run.now)
        status_change: tuple[str, str] | None = None
        changes: dict[str, Any] = {"updated_at": run.now}
        if cls.sender == AGENT:
            if case.first_response_at is None and visibility == "public":
                changes["first_response_at"] = run.now
        elif cls.kind != AUTOMATED and cls.sender != OWN:
            if mail.from_:
                tx.add_participant(case.id, self._contact(tx, mail.from_.address, mail.from_.name), "cc")
            self._add_cc_participants(tx, run, case)
            if case.status in ("resolved", "closed", "pending"):
                status_change = (case.status, "open")
                self._set_status(tx, case, "open", run, "customer replied")
        tx.update_case(case, **changes)
        self._attach_to_case(tx, run, case)
        run.step("stored", case=case.label, created=False, visibility=visibility)
        # notify: same transaction as the comment. An internal note (the `n` address) reaches
        # no customer; automated mail causes no mail at all.
        if cls.kind == MESSAGE:
            if cls.sender == AGENT and visibility == "public":
                self._notified(run, self.notifier.agent_reply(tx, case, self._trigger(run)))
            elif cls.sender == CUSTOMER:
                self._notified(run, self.notifier.customer_comment(tx, case, self._trigger(run), status_change))
        return Outcome(st.PROCESSED, case.label, f"comment ({match.method})", mail.message_id)

    def _follow_up(self, tx: FlowTx, run: _Run, old: CaseRec) -> CaseRec:
        decision = self._route(tx, run)
        case = self._new_case(tx, run, decision, Match(None, "follow-up", ""))
        tx.update_case(case, linked_case_id=old.id)
        tx.add_event(case.id, "note", {"text": f"follow-up of {old.label}, closed more than "
                                               f"{self.cfg.cases.reopen_days} days ago", "linked": old.label},
                     at=run.now)
        tx.add_event(old.id, "note", {"text": f"customer wrote again: follow-up {case.label}", "linked": case.label},
                     at=run.now)
        return case

    def _set_status(self, tx: FlowTx, case: CaseRec, status: str, run: _Run, why: str) -> None:
        old = case.status
        tx.update_case(case, status=status)
        tx.add_event(case.id, "status", {"from": old, "to": status, "reason": why}, at=run.now)
        run.step("status", case=case.label, **{"from": old, "to": status})

    # -- bounces ------------------------------------------------------------------------

    def _bounce(self, tx: FlowTx, run: _Run) -> Outcome:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        found = tx.case_by_message_ids(list(cls.bounced_message_ids))
        if found is None:
            # No Message-ID we know: the signed envelope sender (Return-Path) of our mail names the case.
            for rcpt in [*run.rec.envelope_to, *(a.address for a in mail.to)]:
                signed = parse_reply_address(rcpt, self.secret)
                case_ = tx.case_by_number(signed[1]) if signed else None
                if case_ is not None:
                    found = (case_, "")
                    break
        if found is None:
            reason = "bounce that names none of our messages"
            run.step("dropped", reason=reason)
            return Outcome(st.DROPPED, None, reason, mail.message_id)
        case, ref = found
        row = self._store_message(tx, run, case, visibility="internal")
        permanent, failed = dsn_report(run.rec.raw or b"")
        failed = list(dict.fromkeys([*(a.lower() for a in cls.failed_recipients), *failed]))
        marked = self.notifier.bounce(tx, case, self._trigger(run), [ref] if ref else [], failed, permanent)
        tx.add_event(case.id, "bounce", {"bounced_message_id": ref or None, "recipients": failed,
                                         "permanent": permanent, "outbox": marked},
                     message_row=row, inbound_id=run.rec.id, at=run.now)
        self._attach_to_case(tx, run, case)
        run.step("bounce", case=case.label, bounced=ref or None, permanent=permanent, outbox=marked)
        return Outcome(st.PROCESSED, case.label, f"bounce of <{ref or 'signed return path'}>", mail.message_id)


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
