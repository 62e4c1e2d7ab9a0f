"""Evaluation: walk the rule table for one message and say why each row matched or not. Pure."""

from __future__ import annotations

from datetime import datetime
from time import monotonic
from typing import Any

from intake.business_hours import DEFAULT as DEFAULT_HOURS
from intake.config import Config, MailboxConfig
from intake.mail.addresses import organization_domain
from intake.mail.classify import Classification
from intake.mail.parse import ParsedMail
from intake.rules.facts import Facts
from intake.rules.model import Decision, RuleContext, RuleSet, RuleTimeout


def rule_context(cfg: Config, mail: ParsedMail, cls: Classification, mailbox: MailboxConfig,
                 recipients: list[str], channel: str, now: datetime) -> RuleContext:
    """What the rules see of one message."""
    return RuleContext(mail=mail, classification=cls, mailbox=mailbox.address, recipients=tuple(recipients or ()),
                       channel=channel, now=now,
                       organization=organization_domain(mail.from_.address if mail.from_ else "",
                                                        cfg.cases.free_mail_domains),
                       calendar=cfg.calendar)


def evaluate(ruleset: RuleSet, ctx: RuleContext, *, budget: float | None = None) -> Decision:
    """Walk the rule table for one new case; the mailbox's default queue applies later.

    The first matching rule stops evaluation unless it says ``continue: true``; a later
    matching rule then adds tags and sets only what no earlier rule set. ``drop: true``
    always stops.

    ``budget``: seconds the walk may take; after each rule holding a regular expression
    (the only tests whose cost grows with the rule) the clock is read, and ``RuleTimeout``
    names the rule that ran past it. RE2 matching is linear and patterns are bounded at
    load, so one rule overshoots the budget by a bounded amount.
    """
    deadline = monotonic() + budget if budget is not None else None
    facts = Facts(ctx)
    trace: list[dict[str, Any]] = []
    append = trace.append
    decided: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    tags: list[str] = []
    for test, failed, rule in ruleset.table:
        hit = test(facts)
        if deadline is not None and rule.timed and monotonic() > deadline:
            assert budget is not None
            raise RuleTimeout(rule, budget + monotonic() - deadline, budget)
        if not hit:
            # A fresh dict per entry: callers may keep or change their trace.
            if failed is not None:
                append(failed.copy())
            else:
                append(next(entry for t, _, entry in rule.checks if not t(facts)).copy())
        else:
            applied: dict[str, Any] = {}
            kept: list[str] = []
            for key, value in rule.actions.items():
                if key == "tags":
                    new = [t for t in value if t not in tags]
                    tags.extend(new)
                    applied["tags"] = list(value)
                elif key in decided:
                    kept.append(key)
                else:
                    decided[key] = value
                    set_by[key] = rule.name
                    applied[key] = value
            stop = rule.stop or bool(decided.get("drop"))
            entry = {"rule": rule.name, "matched": True, "at": rule.at, "set": applied, "continue": not stop}
            if kept:
                entry["kept"] = kept
            trace.append(entry)
            if stop:
                break
    if tags:
        set_by.setdefault("tags", next(t["rule"] for t in trace if t.get("matched") and "tags" in t["set"]))
    return Decision(
        queue=decided.get("queue"), priority=decided.get("priority"), category=decided.get("category"),
        assign=decided.get("assign"), tags=tuple(tags), language=decided.get("language"), ack=decided.get("ack"),
        drop=bool(decided.get("drop")), trace=tuple(trace), set_by=set_by,
    )


def facts_of(ctx: RuleContext) -> dict[str, Any]:
    """The values conditions see for a message (for ``intake rules explain``)."""
    f = Facts(ctx)
    calendar = ctx.calendar or DEFAULT_HOURS
    body = f.body[0] if f.body else ""
    return {
        "from": list(f.from_), "from_domain": f.from_domain[0] if f.from_domain else None,
        "organization": f.organization[0] if f.organization else None,
        "to": list(f.to), "cc": list(f.cc), "recipient": list(f.recipient),
        "subject": ctx.mail.subject, "subject_normalised": f.subject[0] if f.subject else "",
        "body_normalised": body[:200] + ("…" if len(body) > 200 else ""),
        "language": f.language[0], "channel": f.channel[0], "mailbox": ctx.mailbox,
        "has_attachment": f.has_attachment, "business_hours": f.business_hours,
        "business_hours_detail": calendar.describe(ctx.now),
        "headers": sorted({k for k, _ in ctx.mail.headers}, key=str.lower),
    }
