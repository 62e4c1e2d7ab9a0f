"""``intake rules explain``: a dry run of the flow up to routing for one message. Writes nothing.

Shows what the rules see (the normalised fields), the sender class, the threading
decision (read from the database when there is one), every rule with matched / not
matched / not evaluated and the first condition that failed, and the resulting actions.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from intake import threads
from intake.config import Config, MailboxConfig
from intake.mail.classify import AGENT, MESSAGE, OWN, Classification, classify
from intake.mail.parse import ParsedMail, parse
from intake.rules.evaluate import evaluate, facts_of, rule_context
from intake.rules.facts import Facts
from intake.rules.loader import load_rules
from intake.rules.model import Decision, RuleContext, RuleSet
from intake.states import Priority


def explain(cfg: Config, raw: bytes, *, mailbox: str, channel: str, now: datetime) -> dict[str, Any]:
    """The explanation as plain data (``intake rules explain --json`` prints it as is)."""
    ruleset = load_rules(cfg.rules_path)
    mail = parse(raw)
    cls = classify(mail, own_addresses=cfg.own_addresses, agents=ruleset.team.addresses,
                   authenticate=cfg.authenticator(raw))
    mb = cfg.mailbox_for(mailbox) or cfg.mailbox[0]
    ctx = rule_context(cfg, mail, cls, mb, [mb.address], channel, now)
    decision = evaluate(ruleset, ctx)
    return {
        "message_id": mail.message_id,
        "from": mail.from_.as_dict() if mail.from_ else None,
        "at": now.astimezone(cfg.tz).isoformat(),
        "facts": facts_of(ctx),
        "classification": {**cls.as_dict(), "opens_case": cls.opens_case},
        "threading": _threading(cfg, mail, cls, mb, ruleset, now),
        "rules": rule_results(ruleset, decision, ctx),
        "decision": _decision(ruleset, decision, mb.queue),
        "files": list(ruleset.files),
    }


def rule_results(ruleset: RuleSet, decision: Decision, ctx: RuleContext) -> list[dict[str, Any]]:
    """Every rule of the table with its outcome for this message, in order; for a failed
    all/not combinator, narrowed to the part that failed."""
    facts = Facts(ctx)
    by_name = {t["rule"]: t for t in decision.trace}
    stopped_by = next((t["rule"] for t in reversed(decision.trace) if t.get("matched") and not t.get("continue")), None)
    out = []
    for r in ruleset.rules:
        entry: dict[str, Any] = {"rule": r.name, "at": r.at}
        t = by_name.get(r.name)
        if not r.enabled:
            entry["result"] = "disabled"
        elif t is None:
            entry["result"] = "not evaluated"
            entry["stopped_by"] = stopped_by
        elif t["matched"]:
            entry.update(result="matched", set=t["set"], kept=t.get("kept", []), stop=not t["continue"])
        else:
            cond = next((c for c in r.conditions if c.at == t["at"] and c.text == t["failed"]), None)
            failed = cond.why_not(facts) if cond is not None and cond.children else t["failed"]
            entry.update(result="not matched", failed=failed, failed_at=t["at"])
        out.append(entry)
    return out


def _decision(ruleset: RuleSet, d: Decision, default_queue: str) -> dict[str, Any]:
    queue = d.queue or default_queue
    team = ruleset.team
    q = team.queue(queue)
    assign = d.assign or (q.assign if q else "none")
    candidates = [{"agent": a, "away": team.is_away(a)} for a in (q.agents if q else ())]
    return {
        "queue": queue, "queue_from": f"rule {d.set_by['queue']}" if d.queue else "mailbox default",
        "priority": d.priority or Priority.MEDIUM.value, "category": d.category, "assign": assign,
        "assign_from": f"rule {d.set_by['assign']}" if d.assign else f"queue {queue}",
        "candidates": candidates if assign in ("round_robin", "least_open") else [],
        "tags": list(d.tags), "language": d.language, "ack": d.ack, "drop": d.drop,
        "set_by": dict(d.set_by),
    }


def _threading(cfg: Config, mail: ParsedMail, cls: Classification, mb: MailboxConfig, ruleset: RuleSet,
               now: datetime) -> dict[str, Any]:
    """The threading decision against the database, read-only, as processing would take
    it (a merged case's mail lands on the case it went into; a late reply to a closed case
    opens a follow-up); skipped when there is no database."""
    from intake.cases import CaseEnv, CaseOps
    from intake.db import NoDatabase, Store
    from intake.db.ops import SECRET_KEY

    store = Store(cfg.database_url)
    try:
        store.check()
        # A secret only ever exists once intake has issued reply addresses; never make one here.
        secret = os.environ.get("INTAKE_SECRET") or store.setting(SECRET_KEY) or os.urandom(16).hex()
        with store.read() as tx:
            ev = threads.gather(tx.cases, mail, recipients=[mb.address], secret=secret,
                                prefixes={cfg.cases.prefix}, sender_is_agent=cls.sender == AGENT)
            match = threads.decide(ev)
            out: dict[str, Any] = {"method": match.method, "reason": match.reason, "case": None}
            found = tx.cases.by_number(match.case_number) if match.case_number is not None else None
            if found is not None:
                ops = CaseOps(tx, CaseEnv(cfg, team=lambda: ruleset.team), now)
                case = ops.surviving(found)
                out["case"] = case.label
                if case.id != found.id:
                    out["reason"] += f"; {found.label} was merged into {case.label}"
                if cls.kind == MESSAGE and cls.sender not in (AGENT, OWN) and ops.needs_follow_up(case):
                    out.update(case=None, follow_up_of=case.label,
                               reason=out["reason"] + f"; {case.label} is closed: a new follow-up case")
        return out
    except NoDatabase as exc:
        return {"method": None, "reason": f"not checked: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a dry run reports what it could not check
        return {"method": None, "reason": f"not checked: {type(exc).__name__}: {exc}"}
    finally:
        store.close()


def render(report: dict[str, Any]) -> str:
    """The explanation as text for a terminal."""
    f = report["facts"]
    out: list[str] = []
    sender = report["from"]
    out.append(f"message    <{report['message_id']}>")
    out.append(f"from       {(sender['name'] + ' ') if sender['name'] else ''}<{sender['address']}>" if sender
               else "from       - (no From header)")
    out.append(f"evaluated  as of {report['at']}")
    out.append("")
    out.append("What the rules see (text conditions match the normalised form):")

    def field(name: str, value: Any) -> None:
        if isinstance(value, list):
            value = ", ".join(value) if value else "-"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif value in (None, ""):
            value = "-"
        out.append(f"  {name:<15} {value}")

    for key in ("from", "from_domain", "organization", "to", "cc", "recipient"):
        field(key, f[key])
    field("subject", f["subject"])
    if f["subject_normalised"] != f["subject"]:
        field("", f"→ {f['subject_normalised']}")
    field("body", f["body_normalised"].replace("\n", " ⏎ "))
    for key in ("language", "channel", "mailbox", "has_attachment"):
        field(key, f[key])
    field("business_hours", f"{'true' if f['business_hours'] else 'false'}: {f['business_hours_detail']}")
    c = report["classification"]
    out.append("")
    reasons = f" ({'; '.join(c['reasons'])})" if c["reasons"] else ""
    out.append(f"sender     {c['sender']}, kind {c['kind']}{reasons}")
    t = report["threading"]
    if t.get("case"):
        out.append(f"threading  {t['method']}: comment on {t['case']} ({t['reason']}); rules route new cases only")
    elif t.get("follow_up_of"):
        out.append(f"threading  {t['method']}: new follow-up case of {t['follow_up_of']} ({t['reason']})")
    elif t.get("method"):
        out.append(f"threading  new case ({t['reason']})")
    else:
        out.append(f"threading  {t['reason']}")
    if not c["opens_case"]:
        out.append("           automated mail opens no case: the rules below would not run")
    out.append("")
    out.append(f"Rules ({len(report['rules'])}, from {', '.join(report['files']) or 'no files'}):")
    for i, r in enumerate(report["rules"], 1):
        mark = {"matched": "✓", "not matched": "✗", "disabled": "-"}.get(r["result"], "·")
        out.append(f"  {mark} {i:>2}. {r['rule']}  ({r['at']})")
        if r["result"] == "matched":
            sets = ", ".join(f"{k}={_val(v)}" for k, v in r["set"].items()) or "nothing"
            kept = f"; kept from earlier rules: {', '.join(r['kept'])}" if r["kept"] else ""
            out.append(f"         matched: set {sets}{kept}; {'stop' if r['stop'] else 'continue'}")
        elif r["result"] == "not matched":
            out.append(f"         not matched: {r['failed']}  (at {r['failed_at']})")
        elif r["result"] == "disabled":
            out.append("         disabled")
        else:
            out.append(f"         not evaluated (stopped by '{r['stopped_by']}')")
    d = report["decision"]
    out.append("")
    out.append("Result:")
    if d["drop"]:
        out.append(f"  drop      yes: no case is made (rule {d['set_by'].get('drop')})")
    out.append(f"  queue     {d['queue']}  ({d['queue_from']})")
    out.append(f"  priority  {d['priority']}" + (f"  (rule {d['set_by']['priority']})" if "priority" in d["set_by"] else
                                                  "  (default)"))
    out.append(f"  category  {d['category'] or '-'}")
    agents = ", ".join(a["agent"] + (" (away)" if a["away"] else "") for a in d["candidates"])
    out.append(f"  assign    {d['assign']}  ({d['assign_from']}){': ' + agents if agents else ''}")
    out.append(f"  tags      {', '.join(d['tags']) or '-'}")
    out.append(f"  language  {d['language'] or '-'}")
    ack = d["ack"]
    out.append(f"  ack       {'none' if ack is False else (ack or 'default')}")
    out.append("")
    out.append("Nothing was written.")
    return "\n".join(out)


def _val(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
