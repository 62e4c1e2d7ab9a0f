"""Who sent a message and what kind of message it is. Pure.

``sender`` is ``customer``, ``agent`` (an address in the rules' ``agents:`` whose mail
passed the authentication check, DESIGN 5 "Who is an agent") or ``own`` (one of our
mailboxes); mail from an agent's address that fails the check is a customer's, with
``claimed_agent`` and ``auth`` saying whose address and why; ``kind`` is ``message``, ``automated`` (auto-replies,
mailing lists, no-reply senders) or ``bounce`` (delivery-status reports). Each signal is
a small named check so that the reason can be shown to an admin.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from intake.mail.addresses import base_address, is_noreply
from intake.mail.dsn import DeliveryReport, read_report
from intake.mail.parse import ParsedMail

if TYPE_CHECKING:  # DKIM and DNS libraries are loaded only when an agent's mail is checked
    from intake.mail.auth import Authentication

CUSTOMER, AGENT, OWN = "customer", "agent", "own"
MESSAGE, AUTOMATED, BOUNCE = "message", "automated", "bounce"


@dataclass(frozen=True)
class Classification:
    sender: str
    kind: str
    reasons: tuple[str, ...] = ()
    # For a bounce: what it reports on (our Message-IDs, the recipients, permanent or not).
    report: DeliveryReport | None = field(default=None)
    # Mail from an agent's address: the agent, and the authentication check's verdict.
    claimed_agent: str = ""
    auth: Authentication | None = None

    @property
    def unauthenticated(self) -> bool:
        """From an agent's address, but not shown to be the agent's."""
        return bool(self.claimed_agent) and self.sender != AGENT

    @property
    def opens_case(self) -> bool:
        """Automated mail and bounces never open a case by themselves."""
        return self.kind == MESSAGE

    @property
    def bounced_message_ids(self) -> tuple[str, ...]:
        return self.report.message_ids if self.report else ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"sender": self.sender, "kind": self.kind, "reasons": list(self.reasons)}
        if self.auth is not None:
            out["authentication"] = self.auth.as_dict()
        return out


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
    return f"no-reply sender {m.from_.address}" if is_noreply(m.from_.address) else None


def _null_return_path(m: ParsedMail) -> str | None:
    v = m.header("Return-Path")
    return "Return-Path: <>" if v is not None and v.strip() in ("<>", "") else None


# The union of the signals the established helpdesks use, in the order they are reported.
AUTOMATED_SIGNALS: tuple[Callable[[ParsedMail], str | None], ...] = (
    _auto_submitted,
    _precedence,
    _auto_reply_headers,
    _mailing_list,
    _noreply_sender,
    _null_return_path,
)


def classify(m: ParsedMail, *, own_addresses: Collection[str], agents: Collection[str],
             authenticate: Callable[[ParsedMail], Authentication] | None = None) -> Classification:
    """Classify a parsed message; ``own_addresses`` and ``agents`` are lower-cased addresses.

    ``authenticate`` checks mail from an agent's address (``Config.authenticator``); without
    it the address alone makes an agent (for what reads mail without acting on it).
    """
    sender_addr = m.from_.key if m.from_ else ""
    base = base_address(sender_addr)
    reasons: list[str] = []
    claimed, auth = "", None
    if base in own_addresses:
        sender = OWN
        reasons.append(f"from our own address {sender_addr}")
    elif sender_addr in agents or base in agents:
        sender, claimed = AGENT, base if base in agents else sender_addr
        if authenticate is not None:
            auth = authenticate(m)
            if not auth.passed:
                sender = CUSTOMER
                reasons.append(f"from agent address {claimed}, not authenticated: {auth.reason}")
    else:
        sender = CUSTOMER

    report = read_report(m)
    if report is not None:
        reasons.append("delivery-status report" if m.content_type == "multipart/report" else "bounce from mail system")
        return Classification(sender, BOUNCE, tuple(reasons), report, claimed_agent=claimed, auth=auth)

    signals = [reason for signal in AUTOMATED_SIGNALS if (reason := signal(m))]
    reasons.extend(signals)
    # Our own mail coming back (a CC loop, a re-imported notification) is never a new case.
    if sender == OWN or signals:
        return Classification(sender, AUTOMATED, tuple(reasons), claimed_agent=claimed, auth=auth)
    return Classification(sender, MESSAGE, tuple(reasons), claimed_agent=claimed, auth=auth)
