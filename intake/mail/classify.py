"""Who sent a message and what kind of message it is. Pure.

``sender`` is ``customer``, ``agent`` (an address in the rules' ``agents:``) or ``own``
(one of our mailboxes); ``kind`` is ``message``, ``automated`` (auto-replies,
mailing lists, no-reply senders) or ``bounce`` (delivery-status reports). Each signal is
a small named check so that the reason can be shown to an admin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import compat32

from intake.config import base_address
from intake.mail.parse import ParsedMail

CUSTOMER, AGENT, OWN = "customer", "agent", "own"
MESSAGE, AUTOMATED, BOUNCE = "message", "automated", "bounce"


@dataclass(frozen=True)
class Classification:
    sender: str
    kind: str
    reasons: tuple[str, ...] = ()
    # For a bounce: the Message-IDs of our mail that it reports on.
    bounced_message_ids: tuple[str, ...] = field(default=())
    failed_recipients: tuple[str, ...] = field(default=())

    @property
    def opens_case(self) -> bool:
        """Automated mail and bounces never open a case by themselves."""
        return self.kind == MESSAGE

    def as_dict(self) -> dict[str, object]:
        return {"sender": self.sender, "kind": self.kind, "reasons": list(self.reasons)}


_NOREPLY = re.compile(r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]daemon|postmaster|bounces?|auto[-_.]?reply)([+\-_.].*)?$", re.I)
_BOUNCE_LOCALS = re.compile(r"^(mailer[-_.]daemon|postmaster)$", re.I)


def _auto_submitted(m: ParsedMail) -> str | None:
    v = (m.header("Auto-Submitted") or "").strip().lower()
    return f"Auto-Submitted: {v}" if v and not v.startswith("no") else None


def _precedence(m: ParsedMail) -> str | None:
    v = (m.header("Precedence") or "").strip().lower()
    return f"Precedence: {v}" if v in ("bulk", "junk", "list", "auto_reply") else None


def _auto_reply_headers(m: ParsedMail) -> str | None:
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress", "X-Loop", "X-No-Loop",
                 "X-MS-Exchange-Inbox-Rules-Loop", "X-Intake-Loop"):
        if m.header(name) is not None:
            return f"{name} present"
    return None


def _mailing_list(m: ParsedMail) -> str | None:
    for name in ("List-Id", "List-Unsubscribe", "Mailing-List", "List-Post"):
        if m.header(name) is not None:
            return f"mailing list ({name})"
    return None


def _noreply_sender(m: ParsedMail) -> str | None:
    if m.from_ is None:
        return None
    local = m.from_.address.partition("@")[0]
    return f"no-reply sender {m.from_.address}" if _NOREPLY.match(local) else None


def _null_return_path(m: ParsedMail) -> str | None:
    v = m.header("Return-Path")
    return "Return-Path: <>" if v is not None and v.strip() in ("<>", "") else None


# The union of the peers' signals (shared/notes/PEERS.md), in the order they are reported.
AUTOMATED_SIGNALS: tuple[Callable[[ParsedMail], str | None], ...] = (
    _auto_submitted,
    _precedence,
    _auto_reply_headers,
    _mailing_list,
    _noreply_sender,
    _null_return_path,
)


def bounce_report(m: ParsedMail) -> tuple[list[str], list[str]] | None:
    """For a delivery-status report: (original Message-IDs, failed recipients); else None."""
    is_report = m.content_type == "multipart/report" and any(
        a.content_type == "message/delivery-status" for a in m.attachments
    )
    failed_hdr = m.header("X-Failed-Recipients")
    from_local = m.from_.address.partition("@")[0] if m.from_ else ""
    if not (is_report or failed_hdr or _BOUNCE_LOCALS.match(from_local)):
        return None
    ids: list[str] = []
    recipients: list[str] = [r.strip() for r in (failed_hdr or "").split(",") if r.strip()]
    for a in m.attachments:
        if a.content_type in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            inner = message_from_bytes(a.payload, policy=compat32)
            mid = str(inner.get("Message-ID", "")).strip().strip("<>")
            if mid:
                ids.append(mid)
        elif a.content_type == "message/delivery-status":
            for line in a.payload.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip().lower() in ("final-recipient", "original-recipient"):
                    addr = value.split(";", 1)[-1].strip()
                    if addr and addr not in recipients:
                        recipients.append(addr)
    if not is_report and not ids:
        # A mailer-daemon note that quotes our mail in the body still names the id.
        ids = re.findall(r"Message-ID:\s*<([^<>\s]+)>", m.text, flags=re.I)
    return ids, recipients


def classify(m: ParsedMail, *, own_addresses: Collection[str], agents: Collection[str]) -> Classification:
    """Classify a parsed message; ``own_addresses`` and ``agents`` are lower-cased addresses."""
    sender_addr = m.from_.key if m.from_ else ""
    base = base_address(sender_addr)
    if base in own_addresses:
        sender = OWN
    elif sender_addr in agents or base in agents:
        sender = AGENT
    else:
        sender = CUSTOMER
    reasons: list[str] = []
    if sender == OWN:
        reasons.append(f"from our own address {sender_addr}")

    bounce = bounce_report(m)
    if bounce is not None:
        ids, rcpts = bounce
        reasons.append("delivery-status report" if m.content_type == "multipart/report" else "bounce from mail system")
        return Classification(sender, BOUNCE, tuple(reasons), tuple(ids), tuple(rcpts))

    signals = [reason for signal in AUTOMATED_SIGNALS if (reason := signal(m))]
    reasons.extend(signals)
    # Our own mail coming back (a CC loop, a re-imported notification) is never a new case.
    if sender == OWN or signals:
        return Classification(sender, AUTOMATED, tuple(reasons))
    return Classification(sender, MESSAGE, tuple(reasons))
