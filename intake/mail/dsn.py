"""Bounces: what a delivery-status report (RFC 3464) or a mailer daemon's note says. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_bytes
from email.parser import HeaderParser
from email.policy import compat32

from intake.mail.addresses import is_mail_system
from intake.mail.parse import ParsedMail

_QUOTED_ID = re.compile(r"Message-ID:\s*<([^<>\s]+)>", re.I)
_BLANK_LINE = re.compile(r"\r?\n[ \t]*\r?\n")


@dataclass(frozen=True)
class DeliveryReport:
    """What a bounce reports on.

    ``message_ids``: Message-IDs of the mail that bounced (from the returned message or
    its headers, or quoted in a mailer daemon's text); ``recipients``: every recipient it
    names (``X-Failed-Recipients``, ``Final-Recipient``/``Original-Recipient``), lower case;
    ``permanent``: False when every ``Action:`` is something other than ``failed``
    (delayed, relayed…); a bounce without a machine-readable report counts as permanent.
    """

    message_ids: tuple[str, ...]
    recipients: tuple[str, ...]
    permanent: bool
    machine_readable: bool


def read_report(mail: ParsedMail) -> DeliveryReport | None:
    """The report of a bounce; None when the mail is not one."""
    statuses = [a for a in mail.attachments if a.content_type == "message/delivery-status"]
    is_report = mail.content_type == "multipart/report" and bool(statuses)
    failed_header = mail.header("X-Failed-Recipients")
    if not (is_report or failed_header or (mail.from_ and is_mail_system(mail.from_.address))):
        return None
    recipients = [r.strip().lower() for r in (failed_header or "").split(",") if r.strip()]
    actions: list[str] = []
    for status in statuses:
        for block in _BLANK_LINE.split(status.payload.decode("utf-8", "replace")):
            fields = HeaderParser(policy=compat32).parsestr(block.strip() + "\n")
            action = str(fields.get("Action", "")).strip().lower()
            if action:
                actions.append(action)
            for name in ("Final-Recipient", "Original-Recipient"):
                addr = str(fields.get(name, "")).split(";", 1)[-1].strip().strip("<>").lower()
                if addr:
                    recipients.append(addr)
    ids: list[str] = []
    for a in mail.attachments:
        if a.content_type in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            inner = message_from_bytes(a.payload, policy=compat32)
            mid = str(inner.get("Message-ID", "")).strip().strip("<>")
            if mid:
                ids.append(mid)
    if not is_report and not ids:
        # A mailer daemon's note that quotes our mail in its text still names the id.
        ids = _QUOTED_ID.findall(mail.text)
    return DeliveryReport(tuple(dict.fromkeys(ids)), tuple(dict.fromkeys(recipients)),
                          permanent=not actions or "failed" in actions, machine_readable=bool(actions))
