"""The processor: the flow of DESIGN.md 3 over stored inbound records.

parse → classify → thread → route → case operations (→ notify). The steps are pure
(``intake.mail``, ``intake.threads``, ``intake.rules``, ``intake.assignment``'s pickers);
every change to a case is a case operation (``intake.cases``). A batch of records is
processed in two phases:

1. **prepare**, outside any write transaction: read the raw bytes, parse, classify and
   evaluate the routing rules (the costly pure work, which so never holds SQLite's one
   writer slot; the rules have a time budget per message, ``[rules] budget``);
2. **apply**, in one transaction for the batch (one durable commit), a savepoint per
   message: duplicate check, threading, routing, the case or comment, the mails it causes.

A message whose processing raises is rolled back to its savepoint and quarantined with
the error; the rest of the batch goes on. Outcomes that are not errors (duplicate,
dropped, automated) are return values.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from intake import assignment, threads
from intake.cases import CaseEnv, CaseOps, Incoming, Refused
from intake.config import Config, MailboxConfig
from intake.db import Store, utcnow
from intake.db.inbound import InboundWork
from intake.db.ops import TEMPLATES_RENDER_KEY
from intake.db.cases import CaseRec
from intake.mail.classify import AGENT, BOUNCE, MESSAGE, OWN, Classification, classify
from intake.mail.parse import ParsedMail, parse
from intake.commands import read_commands
from intake.mail.quotes import reply_text, signature_only
from intake.notify import INTERNAL_TEMPLATES, QUARANTINE_RUNAWAYS, Notifier, Trigger, choose_language
from intake.rules import Decision, RuleSet, RuleTimeout, evaluate, rule_context
from intake.states import InboundState, Priority

if TYPE_CHECKING:
    from intake.db import Tx

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
    env: CaseEnv
    mail: ParsedMail | None = None
    cls: Classification | None = None
    error: Exception | None = None  # raised by a pure step: quarantines the message
    error_traceback: str = ""
    # The rules' decision, made in the prepare phase; or why there is none (the rules ran
    # past their budget), which quarantines the message only if it needs routing.
    decision: Decision | None = None
    route_error: RuleTimeout | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step: str, **data: Any) -> None:
        self.log.append({"at": self.now.isoformat(), "step": step, **data})


class Processor:
    """Turns stored inbound records into cases and comments."""

    def __init__(self, cfg: Config, store: Store, rules: Callable[[], RuleSet], clock: Clock = utcnow) -> None:
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
            self._notifier = Notifier.for_config(self.cfg, lambda: self.rules().team, lambda: self.secret)
        return self._notifier

    @property
    def secret(self) -> str:
        if self._secret is None:
            self._secret = os.environ.get("INTAKE_SECRET") or self.store.secret()
        return self._secret

    def case_env(self, ruleset: RuleSet | None = None) -> CaseEnv:
        """What case operations need: the team of ``ruleset`` (else the current rules) and the notifier."""
        team = (lambda: ruleset.team) if ruleset is not None else (lambda: self.rules().team)
        return CaseEnv(self.cfg, team, self.notifier)

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
            with self.store.read() as tx:
                ids = tx.inbound.pending(limit=size, after_id=after)
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
        # Read without locking, outside the write transaction: parsing never holds SQLite's writer slot.
        with self.store.read() as tx:
            records = tx.inbound.load(inbound_ids)
        ruleset = self.rules()
        env = self.case_env(ruleset)
        runs = {i: self._prepare(rec, ruleset, env) for i, rec in records.items()
                if rec.state == InboundState.RECEIVED}
        try:
            outcomes = self._apply_batch(inbound_ids, records, runs)
        except Exception as exc:  # noqa: BLE001 - the batch failed outside any one message's savepoint
            if self.store.is_unavailable(exc):
                raise
            if len(inbound_ids) > 1:
                return [o for i in inbound_ids for o in self.process_batch([i])]
            error = f"{type(exc).__name__}: {exc}"
            self.store.quarantine(inbound_ids[0], error, traceback.format_exc())
            outcomes = {inbound_ids[0]: Outcome(InboundState.QUARANTINED, reason=error)}
        for i in inbound_ids:
            o = outcomes[i]
            if o.state == InboundState.QUARANTINED:
                log.warning("inbound quarantined id=%s error=%s", i, o.reason)
            else:
                log.info("inbound %s case=%s message_id=<%s> %s", o.state, o.case_number or "-", o.message_id,
                         o.reason)
        self.record_template_failures()
        return [outcomes[i] for i in inbound_ids]

    def record_template_failures(self) -> None:
        """Templates that failed at send time since the last call go to ``intake status``
        (after the batch's commit, so that a quarantined message's failure is kept too)."""
        if self._notifier is None:
            return
        failures = self._notifier.templates.take_failures()
        if not failures:
            return
        last = failures[-1]
        try:
            with self.store.transaction() as tx:
                tx.ops.set_json_setting(TEMPLATES_RENDER_KEY, {**last.as_dict(), "count": len(failures),
                                                               "pid": os.getpid()})
        except Exception as exc:  # noqa: BLE001 - informative only; the failures are in the log
            log.warning("template failures not recorded for intake status: %s: %s", type(exc).__name__, exc)

    def _apply_batch(self, inbound_ids: list[int], records: dict[int, InboundWork],
                     runs: dict[int, _Run]) -> dict[int, Outcome]:
        outcomes: dict[int, Outcome] = {}
        with self.store.transaction() as tx:
            # Locked (PostgreSQL) and read again: another process may have taken a record since.
            current = tx.inbound.lock_states(list(runs))
            done: list[InboundWork] = []
            for i in inbound_ids:
                run, now = runs.get(i), current.get(i)
                if run is None or now is None or now[0] != InboundState.RECEIVED:
                    state = now[0] if now else records[i].state if i in records else "missing"
                    outcomes[i] = Outcome(state, reason=NOT_WAITING)
                    continue
                run.rec.log, run.rec.attempts = now[1], now[2]
                outcomes[i] = self._apply(tx, run)
                if outcomes[i].state != InboundState.QUARANTINED:  # a quarantined one is written by quarantine()
                    done.append(run.rec)
            tx.inbound.save(done)
        return outcomes

    # -- prepare (pure, outside the write transaction) --------------------------------------

    def _prepare(self, rec: InboundWork, ruleset: RuleSet, env: CaseEnv) -> _Run:
        mailbox = self.cfg.mailbox_for(rec.mailbox) or self.cfg.mailbox[0]
        run = _Run(rec=rec, mailbox=mailbox, now=self.clock(), ruleset=ruleset, env=env)
        try:
            if rec.raw is None:
                raise ValueError("raw bytes are no longer stored (retention) and cannot be processed")
            run.mail = parse(rec.raw, envelope_from=rec.envelope_from)
            run.cls = classify(run.mail, own_addresses=self.cfg.own_addresses, agents=ruleset.team.addresses,
                               authenticate=self.cfg.authenticator(rec.raw))
            if _may_route(run.cls):
                try:
                    run.decision = self._evaluate(run)
                except RuleTimeout as exc:
                    # Logged when it matters: the message is quarantined if it needs routing.
                    log.debug("rules ran past their budget message_id=<%s>: %s", run.mail.message_id, exc)
                    run.route_error = exc
        except Exception as exc:  # noqa: BLE001 - quarantined in the apply phase, with its traceback
            run.error, run.error_traceback = exc, traceback.format_exc()
        return run

    def _evaluate(self, run: _Run) -> Decision:
        """The rules' decision for a message, within ``[rules] budget`` (``RuleTimeout`` past it)."""
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        return evaluate(run.ruleset, rule_context(self.cfg, mail, cls, run.mailbox, run.rec.envelope_to,
                                                  run.rec.channel, run.now), budget=self.cfg.rules_budget)

    # -- apply (in the batch's transaction) --------------------------------------------------

    def _apply(self, tx: "Tx", run: _Run) -> Outcome:
        """One message in a savepoint of its own: its outcome, or quarantine when it raises."""
        token = QUARANTINE_RUNAWAYS.set(True)  # a runaway template quarantines this message
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
            mail = run.mail
            seen = {"message_id": mail.message_id, "from_address": mail.from_.address if mail.from_ else None,
                    "subject": mail.subject} if mail is not None else None
            tx.inbound.quarantine(run.rec.id, error, tb, run.now, seen)
            return Outcome(InboundState.QUARANTINED, reason=error)
        finally:
            QUARANTINE_RUNAWAYS.reset(token)

    def _process(self, tx: "Tx", run: _Run) -> Outcome:
        mail, cls, rec = run.mail, run.cls, run.rec
        assert mail is not None and cls is not None
        rec.message_id = mail.message_id
        rec.from_address = mail.from_.address if mail.from_ else None
        rec.subject = mail.subject
        rec.attempts += 1
        run.step("parsed", message_id=mail.message_id, synthesised=mail.message_id_synthesised,
                 subject=mail.subject, **{"from": mail.from_.address if mail.from_ else None},
                 charsets=mail.charsets, defects=mail.defects, attachments=len(mail.attachments))
        run.step("classified", **cls.as_dict())
        ops = CaseOps(tx, run.env, run.now, on_step=run.step)
        outcome = self._duplicate(tx, ops, run) or self._flow(tx, ops, run)
        rec.state = outcome.state
        rec.processed_at = run.now
        rec.error = None
        rec.log = [*rec.log, *run.log, {"at": run.now.isoformat(), "step": "done", "state": outcome.state,
                                        "case": outcome.case_number, "reason": outcome.reason}]
        return outcome

    def _duplicate(self, tx: "Tx", ops: CaseOps, run: _Run) -> Outcome | None:
        """The same message again (another mailbox, an SMTP retry, an IMAP re-poll)."""
        assert run.mail is not None
        key = run.mail.message_id
        if tx.inbound.claim_key(key, run.rec.id):
            return None
        owner = tx.inbound.key_owner(key)
        assert owner is not None
        first_inbound, first_case = owner
        run.rec.duplicate_of = first_inbound
        case = tx.cases.by_id(first_case) if first_case else None
        run.rec.case_id = case.id if case else None
        if case is not None:
            ops.record_duplicate(case, message_id=key, mailbox=run.rec.mailbox, channel=run.rec.channel,
                                 inbound_id=run.rec.id)
        run.step("duplicate", of=first_inbound, case=case.label if case else None)
        return Outcome(InboundState.DUPLICATE, case.label if case else None, f"same Message-ID as inbound #{first_inbound}",
                       key)

    def _flow(self, tx: "Tx", ops: CaseOps, run: _Run) -> Outcome:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        if cls.kind == BOUNCE:
            return self._bounce(tx, ops, run)
        match = threads.decide(self.evidence(tx, run))
        run.step("threaded", method=match.method, reason=match.reason,
                 case=f"{self.cfg.cases.prefix}-{match.case_number}" if match.case_number else None)
        if match.case_number is not None:
            found = tx.cases.by_number(match.case_number)
            assert found is not None
            case = ops.surviving(found)  # mail to a merged case's threads lands on the case it went into
            if case.id != found.id:
                run.step("merged", case=found.label, into=case.label)
            return self._comment(tx, ops, run, case, match)
        if not cls.opens_case:
            reason = "automated mail does not open a case: " + "; ".join(cls.reasons)
            run.step("dropped", reason=reason)
            return Outcome(InboundState.DROPPED, None, reason, mail.message_id)
        decision = self._route(tx, run)
        if decision.drop:
            reason = "dropped by rule " + ", ".join(t.get("rule", "?") for t in decision.trace if t.get("matched"))
            run.step("dropped", reason=reason)
            return Outcome(InboundState.DROPPED, None, reason, mail.message_id)
        case = self._new_case(tx, ops, run, decision, match.mentions)
        return Outcome(InboundState.PROCESSED, case.label, "new case", mail.message_id)

    # -- thread -------------------------------------------------------------------------

    def evidence(self, tx: "Tx", run: _Run) -> threads.Evidence:
        """What the store knows about the message's case (``intake rules explain`` shows it too)."""
        assert run.mail is not None and run.cls is not None
        return threads.gather(tx.cases, run.mail, recipients=run.rec.envelope_to, secret=self.secret,
                              prefixes={self.cfg.cases.prefix}, sender_is_agent=run.cls.sender == AGENT)

    # -- route --------------------------------------------------------------------------

    def _route(self, tx: "Tx", run: _Run) -> Decision:
        """The rules' decision for a new case (made before the transaction); counts each
        matched rule's hit. Rules that ran past their budget quarantine the message here,
        naming the rule."""
        if run.route_error is not None:
            raise run.route_error
        decision = run.decision if run.decision is not None else self._evaluate(run)
        tx.ops.record_rule_hits(decision.matched, run.now)
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

    # -- cases --------------------------------------------------------------------------

    def _new_case(self, tx: "Tx", ops: CaseOps, run: _Run, decision: Decision, mentions: tuple[int, ...],
                  follow_up_of: CaseRec | None = None) -> CaseRec:
        mail, rec = run.mail, run.rec
        assert mail is not None
        requester = ops.contact(mail.from_.address, mail.from_.name) if mail.from_ else None
        language, language_from = choose_language(
            rule=decision.language, contact=requester.language if requester else None,
            message_text=f"{mail.subject}\n{mail.text}", mailbox=run.mailbox.language or None,
            default=self.cfg.templates.default_language)
        queue = decision.queue or run.mailbox.queue
        message = self._incoming(run)
        if follow_up_of is not None or mentions:
            # A reply in another case's thread: its new text, and a subject without that case's token.
            message = replace(message.with_text(reply_text(mail.text, mail.html)),
                              subject=threads.without_case_tokens(mail.subject, {self.cfg.cases.prefix}))
        opening: dict[str, Any] = dict(
            actor=_actor(mail), message=message, requester=requester, queue=queue,
            priority=decision.priority or Priority.MEDIUM, category=decision.category, channel=rec.channel,
            mailbox=run.mailbox, language=language, tags=decision.tags,
            rules=[t for t in decision.trace if t.get("matched")],
            assignment=assignment.choose(tx, run.ruleset.team, queue, decision, run.now), ack=decision.ack,
            mentions=mentions, trigger=replace(self._trigger(run), text=message.text), language_from=language_from)
        case = ops.follow_up(follow_up_of, **opening) if follow_up_of else ops.open(**opening)
        if run.cls is not None and run.cls.unauthenticated and run.cls.auth is not None:
            ops.agent_refused(case, run.cls.claimed_agent, run.cls.auth.reason, self._trigger(run))
        self._belongs(tx, run, case)
        return case

    def _comment(self, tx: "Tx", ops: CaseOps, run: _Run, case: CaseRec, match: threads.Match) -> Outcome:
        """Add the message to an existing case, reopening it as DESIGN 5 says."""
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        person = cls.kind == MESSAGE and cls.sender != OWN
        if person and cls.sender != AGENT and ops.needs_follow_up(case):
            follow = self._new_case(tx, ops, run, self._route(tx, run), (), follow_up_of=case)
            return Outcome(InboundState.PROCESSED, follow.label, f"follow-up of closed {case.label}", mail.message_id)
        message, actor = self._incoming(run), _actor(mail)
        if cls.sender == AGENT and cls.kind == MESSAGE:
            case = self._agent_mail(tx, ops, run, case, match, message)
        elif cls.sender == AGENT:
            ops.internal_message(case, message, actor=actor, threading=match.method, automated=True)
        elif person:
            # The timeline and the agents' notices show what is new, without the quoted history.
            new = message.with_text(reply_text(mail.text, mail.html))
            trigger = replace(self._trigger(run), text=new.text)
            if cls.unauthenticated:
                assert cls.auth is not None
                ops.unauthenticated(case, new, agent=cls.claimed_agent, reason=cls.auth.reason,
                                    threading=match.method, trigger=trigger)
            else:
                ops.customer_comment(case, new, actor=actor, person=True, threading=match.method, trigger=trigger,
                                     internal_route=_internal_route(tx, match))
        else:
            ops.customer_comment(case, message, actor=actor, person=False, threading=match.method,
                                 trigger=self._trigger(run))
        self._belongs(tx, run, case)
        return Outcome(InboundState.PROCESSED, case.label, f"comment ({match.method})", mail.message_id)

    def _agent_mail(self, tx: "Tx", ops: CaseOps, run: _Run, case: CaseRec, match: threads.Match,
                    message: Incoming) -> CaseRec:
        """An agent's mail on a case (DESIGN 5 "Agent mail"): its commands, then a public reply
        or an internal note; refused commands are answered to the agent. The case it ends on
        (another one after ``#merge``)."""
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        agent = cls.claimed_agent or _actor(mail)  # hanako+work@ acts as hanako@, the agent of the rules
        new_text = reply_text(mail.text, mail.html)
        commands = read_commands(new_text)
        refusals = [{"line": r.line, "reason": r.reason} for r in commands.refused]
        for command in commands.commands:
            try:
                case = ops.apply(case, command, actor=agent)
            except Refused as exc:
                refusals.append({"line": command.line, "reason": str(exc)})
        run.step("commands", applied=[c.line for c in commands.commands if c.line not in
                                      {r["line"] for r in refusals}], refused=refusals)
        # A reply to one of our internal notifications (a note, a notice) stays internal too.
        internal = commands.internal or _internal_route(tx, match)
        trigger = self._trigger(run)
        # Nothing for the customer: no text but the agent's signature, and no file.
        names = [ops.env.team().name_of(agent), mail.from_.name if mail.from_ else ""]
        empty = signature_only(commands.text, [n for n in names if n]) and \
            not any(not a.inline for a in mail.attachments)
        if empty or internal:
            if empty:  # commands only (a bare #note too): on the timeline, mailed to nobody
                ops.internal_message(case, message.with_text(new_text), actor=agent, threading=match.method,
                                     commands_only=True)
            else:
                ops.note(case, message, actor=agent, text=commands.text, threading=match.method, trigger=trigger)
            if commands.value("status") is None:
                ops.agent_acted(case, actor=agent)
        else:
            ops.reply(case, message, actor=agent, text=commands.text, threading=match.method, trigger=trigger,
                      keep_status=commands.value("status") is not None)
        ops.refused_commands(case, agent, refusals, trigger=trigger)
        return case

    def _bounce(self, tx: "Tx", ops: CaseOps, run: _Run) -> Outcome:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None and cls.report is not None
        found = tx.cases.by_message_ids(cls.report.message_ids)
        if found is None:
            # No Message-ID we know: the signed envelope sender (Return-Path) of our mail names the case.
            for rcpt in [*run.rec.envelope_to, *(a.address for a in mail.to)]:
                signed = threads.parse_reply_address(rcpt, self.secret)
                case_ = tx.cases.by_number(signed[1]) if signed else None
                if case_ is not None:
                    found = (case_, "")
                    break
        if found is None:
            reason = "bounce that names none of our messages"
            run.step("dropped", reason=reason)
            return Outcome(InboundState.DROPPED, None, reason, mail.message_id)
        case, ref = found
        marked = ops.record_bounce(case, self._incoming(run), cls.report, ref or None)
        self._belongs(tx, run, case)
        run.step("bounce", case=case.label, bounced=ref or None, permanent=cls.report.permanent, outbox=marked)
        return Outcome(InboundState.PROCESSED, case.label, f"bounce of <{ref or 'signed return path'}>",
                       mail.message_id)

    # -- helpers ------------------------------------------------------------------------

    def _belongs(self, tx: "Tx", run: _Run, case: CaseRec) -> None:
        """The inbound record and its Message-ID now belong to ``case``."""
        assert run.mail is not None
        run.rec.case_id = case.id
        tx.inbound.set_key_case(run.mail.message_id, case.id)

    @staticmethod
    def _incoming(run: _Run) -> Incoming:
        mail = run.mail
        assert mail is not None
        return Incoming(
            message_id=mail.message_id, from_address=mail.from_.address if mail.from_ else None,
            from_name=mail.from_.name if mail.from_ else "", to=[(a.address, a.name) for a in mail.to],
            cc=[(a.address, a.name) for a in mail.cc], subject=mail.subject, text=mail.text, html=mail.html,
            sent_at=mail.date, thread_index=threads.thread_index_prefix(mail), attachments=mail.attachments,
            inbound_id=run.rec.id)

    @staticmethod
    def _trigger(run: _Run) -> Trigger:
        mail, cls = run.mail, run.cls
        assert mail is not None and cls is not None
        refs = [*mail.references, *(i for i in mail.in_reply_to if i not in mail.references)]
        return Trigger(at=run.now, inbound_id=run.rec.id, message_id=mail.message_id, references=tuple(refs),
                       sender=(cls.claimed_agent if cls.sender == AGENT else mail.from_.key if mail.from_ else None),
                       sender_name=mail.from_.name if mail.from_ else "",
                       sender_class=cls.sender, kind=cls.kind, subject=mail.subject, text=mail.text)


def _internal_route(tx: "Tx", match: threads.Match) -> bool:
    """The mail came to a note address, or answers one of our internal notifications."""
    return match.internal or (match.ref is not None and tx.cases.template_of(match.ref) in INTERNAL_TEMPLATES)


def _may_route(cls: Classification) -> bool:
    """Whether the rules may be asked about a message: it may open a case, or be a person's
    reply that opens a follow-up of a closed case (``Processor._comment``)."""
    return cls.opens_case or (cls.kind == MESSAGE and cls.sender not in (OWN, AGENT))


def _actor(mail: ParsedMail) -> str:
    """Who acted by sending this mail: its sender's address."""
    return mail.from_.key if mail.from_ else "unknown"
