"""What intake sees in a mail and what it did with it: the shapes admins read. Pure.

``parse_report`` is the public JSON of ``intake parse --json`` (extend it only by adding
keys) and ``parse_lines`` its readable form; ``log_lines`` turns an inbound record's
processing log into readable lines for ``intake messages show``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any

from intake.mail.classify import classify
from intake.mail.parse import ParsedMail, parse

if TYPE_CHECKING:
    from intake.mail.auth import Authentication


def parse_report(
    raw: bytes, *, own_addresses: Collection[str], agents: Collection[str], envelope_from: str | None = None,
    authenticate: Callable[[ParsedMail], Authentication] | None = None,
) -> dict[str, Any]:
    """Everything intake sees in one message, without storing anything.

    ``envelope_from`` is the SMTP envelope sender, when the mail came with one;
    ``authenticate`` checks mail from an agent's address (``Config.authenticator``).
    """
    mail = parse(raw, envelope_from=envelope_from)
    cls = classify(mail, own_addresses=own_addresses, agents=agents, authenticate=authenticate)
    return {
        "message_id": mail.message_id,
        "message_id_synthesised": mail.message_id_synthesised,
        "date": mail.date.isoformat() if mail.date else None,
        "from": mail.from_.as_dict() if mail.from_ else None,
        "from_display": mail.from_display,
        "sender_source": mail.sender_source,
        "to": [a.as_dict() for a in mail.to],
        "cc": [a.as_dict() for a in mail.cc],
        "reply_to": [a.as_dict() for a in mail.reply_to],
        "subject": mail.subject,
        "in_reply_to": mail.in_reply_to,
        "references": mail.references,
        "text": mail.text,
        "html": mail.html,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size, "sha256": a.sha256,
             "inline": a.inline, "content_id": a.content_id, "name_given": a.name_given}
            for a in mail.attachments
        ],
        "defects": list(mail.defects),
        "charsets": list(mail.charsets),
        "content_type": mail.content_type,
        "classification": {**cls.as_dict(),
                           **({"bounced_message_ids": list(cls.bounced_message_ids)} if cls.bounced_message_ids else {})},
        "language": mail.language,
        "size": len(raw),
    }


# How `intake parse` names where the sender was found (ParsedMail.sender_source).
_SENDER_SOURCES = {
    "from": "From", "sender": "Sender (no usable From)", "reply-to": "Reply-To (no usable From)",
    "return-path": "Return-Path (no usable From)", "mbox": "mbox 'From ' line (no usable From)",
    "envelope": "SMTP envelope (no usable From)", "": "-",
}  # fmt: skip


def parse_lines(report: dict[str, Any]) -> list[str]:
    """``parse_report`` as the lines `intake parse` prints: fields, defects, then the text."""

    def addrs(items: list[dict[str, str]]) -> str:
        return ", ".join(f"{a['name']} <{a['address']}>" if a["name"] else a["address"] for a in items) or "-"

    cls = report["classification"]
    lines = [
        f"Message-ID  <{report['message_id']}>" + (" (synthesised)" if report["message_id_synthesised"] else ""),
        f"Date        {report['date'] or '-'}",
        f"From        {addrs([report['from']] if report['from'] else [])}",
        f"Sender via  {_SENDER_SOURCES.get(report['sender_source'], report['sender_source'])}",
        f"To          {addrs(report['to'])}",
        f"Cc          {addrs(report['cc'])}",
        f"Reply-To    {addrs(report['reply_to'])}",
        f"Subject     {report['subject']}",
        f"Language    {report['language']}",
        f"Charsets    {', '.join(report['charsets']) or '-'}",
        f"Class       sender {cls['sender']}, kind {cls['kind']}"
        + (f" ({'; '.join(cls['reasons'])})" if cls["reasons"] else ""),
    ]
    lines += [f"Agent auth  {line}" for line in _auth_lines(cls.get("authentication"))]
    for a in report["attachments"]:
        inline = ", inline" if a["inline"] else ""
        made = "" if a["name_given"] else ", name made by intake"
        lines.append(f"Attachment  {a['filename']} ({a['content_type']}, {a['size']} bytes{inline}{made})")
    lines += [f"Defect      {d}" for d in report["defects"]]
    lines += ["", report["text"].rstrip()]
    return lines


def _auth_lines(auth: dict[str, Any] | None) -> list[str]:
    """The authentication check of an agent's mail: its verdict, then each header set aside."""
    if not auth:
        return []
    return [f"{'passed' if auth['passed'] else 'failed'}: {auth['reason']}",
            *(f"set aside: {line}" for line in auth.get("ignored") or [])]


def _describe(entry: dict[str, Any]) -> str:
    step = entry.get("step", "?")
    if step == "received":
        src = entry.get("source") or {}
        where = ", ".join(f"{k} {v}" for k, v in src.items()) if src else ""
        return f"received via {entry.get('channel')} for {entry.get('mailbox')}" + (f" ({where})" if where else "")
    if step == "parsed":
        sid = " (synthesised)" if entry.get("synthesised") else ""
        line = (f"parsed: Message-ID <{entry.get('message_id')}>{sid}, from {entry.get('from')}, "
                f"subject {entry.get('subject')!r}, {entry.get('attachments', 0)} attachment(s), "
                f"charsets {', '.join(entry.get('charsets') or []) or '-'}")
        for d in entry.get("defects") or []:
            line += f"\n      defect: {d}"
        return line
    if step == "classified":
        reasons = "; ".join(entry.get("reasons") or []) or "no automated-mail signal"
        return "\n      ".join([f"classified: sender {entry.get('sender')}, kind {entry.get('kind')} ({reasons})",
                                   *(f"agent authentication: {line}" for line in _auth_lines(entry.get("authentication")))])
    if step == "threaded":
        case = entry.get("case") or "new case"
        return f"threading: {entry.get('method')} → {case}: {entry.get('reason')}"
    if step == "routed":
        lines = [f"routing: queue {entry.get('queue')}" + (" (mailbox default)" if entry.get("default_queue") else "")]
        for r in entry.get("rules") or []:
            where = f" ({r['at']})" if r.get("at") else ""
            if r.get("matched"):
                sets = ", ".join(f"{k}={v}" for k, v in (r.get("set") or {}).items())
                kept = ", ".join(f"{k}" for k in (r.get("kept") or {}))
                lines.append(f"      rule {r.get('rule')!r}{where}: matched" + (f", set {sets}" if sets else "")
                             + (f", kept earlier {kept}" if kept else ""))
            else:
                lines.append(f"      rule {r.get('rule')!r}{where}: not matched, failed {r.get('failed')}")
        return "\n".join(lines)
    if step == "assigned":
        who = entry.get("assignee") or "nobody"
        rule = f" (rule {entry['rule']!r})" if entry.get("rule") else ""
        return f"assigned to {who} by {entry.get('method')}{rule}: {entry.get('reason')}"
    if step == "duplicate":
        return f"duplicate of inbound #{entry.get('of')}" + (f", recorded on {entry['case']}" if entry.get("case") else "")
    if step in ("dropped", "quarantined"):
        return f"{step}: {entry.get('reason') or entry.get('error')}"
    if step == "stored":
        what = "new case" if entry.get("created") else f"comment ({entry.get('visibility', 'public')})"
        return f"stored: {what} {entry.get('case')}"
    if step == "status":
        return f"status of {entry.get('case')}: {entry.get('from')} → {entry.get('to')}"
    if step == "bounce":
        return f"bounce of <{entry.get('bounced')}> recorded on {entry.get('case')}"
    if step == "notify":
        lines = ["notify:"]
        for q in entry.get("queued") or []:
            lines.append(f"      queued {q.get('template')} to {q.get('to')} (outbox #{q.get('outbox')})")
        for k in entry.get("skipped") or []:
            lines.append(f"      not sent: {k.get('template')} to {k.get('to')} ({k.get('check')}: {k.get('reason')})")
        return "\n".join(lines)
    if step == "done":
        return f"done: {entry.get('state')}" + (f" {entry['case']}" if entry.get("case") else "") + (
            f" — {entry['reason']}" if entry.get("reason") else "")
    rest = {k: v for k, v in entry.items() if k not in ("at", "step")}
    return f"{step}: {rest}" if rest else step


def log_lines(log: list[dict[str, Any]], tz: tzinfo | None = None) -> list[str]:
    """The processing log as ``time  what happened`` lines, times in ``tz``."""
    out = []
    for entry in log:
        try:
            at = datetime.fromisoformat(str(entry.get("at"))).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            at = str(entry.get("at", ""))
        out.append(f"  {at}  {_describe(entry)}")
    return out
