"""Which case a message belongs to (DESIGN.md 5). Pure decisions over gathered evidence.

:func:`gather` asks a :class:`CaseLookup` (the store's case repository) what it knows about a
message: the case of a signed recipient, of a Message-ID it refers to, of its Outlook
Thread-Index, and the cases its subject tokens name with their participants.
:func:`decide` applies the order of DESIGN 5 to that evidence, the rule "may this sender
use this case" included, and says why. The processor and ``intake rules explain`` call
both, so that the dry run shows exactly what processing would do.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from intake.mail.parse import ParsedMail


@functools.lru_cache(maxsize=16)
def _token_pattern(prefixes: frozenset[str]) -> re.Pattern[str]:
    alt = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(rf"\[\s*({alt})-(\d{{1,18}})\s*\]", re.I)  # 18 digits: a case number fits


def case_tokens(subject: str, prefixes: Collection[str]) -> list[tuple[str, int]]:
    """``[CASE-1042]`` tokens in a subject, for any configured prefix: [(prefix, number)]."""
    if not prefixes:
        return []
    return [(m.group(1).upper(), int(m.group(2))) for m in _token_pattern(frozenset(prefixes)).finditer(subject)]


def without_case_tokens(subject: str, prefixes: Collection[str]) -> str:
    """The subject without its ``[CASE-1042]`` tokens (a new case gets a token of its own)."""
    if not prefixes:
        return subject
    return re.sub(r"\s{2,}", " ", _token_pattern(frozenset(prefixes)).sub("", subject)).strip()


# --- signed reply addresses: support+c1042-k3x9q2@example.com --------------------------

_SIGNED = re.compile(r"^(?P<base>[^+@]+)\+(?P<kind>[cn])(?P<number>\d{1,18})-(?P<sig>[a-z0-9]+)@(?P<domain>.+)$", re.I)


@functools.lru_cache(maxsize=4096)  # a case's addresses are made for every mail it sends
def _signature(secret: str, kind: str, number: int) -> str:
    digest = hmac.new(secret.encode(), f"{kind}{number}".encode(), hashlib.sha256).digest()
    # base32, lower case, 10 characters: 50 bits, short enough for a mail client's field.
    return base64.b32encode(digest).decode().lower()[:10]


def reply_address(mailbox: str, number: int, secret: str, kind: str = "c") -> str:
    """The signed address of a case: ``c`` for public replies, ``n`` for internal notes."""
    local, _, domain = mailbox.partition("@")
    return f"{local}+{kind}{number}-{_signature(secret, kind, number)}@{domain}"


def parse_reply_address(address: str, secret: str) -> tuple[str, int] | None:
    """(kind, case number) when ``address`` is a correctly signed reply address."""
    m = _SIGNED.match(address.strip())
    if not m:
        return None
    kind, number = m.group("kind").lower(), int(m.group("number"))
    if not hmac.compare_digest(m.group("sig").lower(), _signature(secret, kind, number)):
        return None
    return kind, number


def thread_index_prefix(mail: ParsedMail) -> str | None:
    """The conversation part of Outlook's Thread-Index (first 22 bytes, base64)."""
    value = mail.header("Thread-Index")
    if not value:
        return None
    try:
        raw = base64.b64decode(value.strip() + "==", validate=False)
    except (binascii.Error, ValueError):
        return None
    return base64.b64encode(raw[:22]).decode() if len(raw) >= 22 else None


# --- the evidence and the decision ----------------------------------------------------------


@dataclass(frozen=True)
class TokenCase:
    """A case a subject token names: who belongs to it."""

    participants: frozenset[str]
    organization: str | None


@dataclass(frozen=True)
class Evidence:
    """What the store knows about one message."""

    sender: str = ""  # lower case
    sender_domain: str = ""
    sender_is_agent: bool = False
    signed: tuple[str, int] | None = None  # (kind, case number) from a signed recipient
    signed_case_exists: bool = False
    by_message_id: int | None = None  # case number of a stored/sent Message-ID it refers to
    by_message_id_ref: str | None = None
    by_thread_index: int | None = None
    tokens: tuple[int, ...] = ()
    token_cases: Mapping[int, TokenCase] = field(default_factory=dict)  # the tokens' cases that exist


@dataclass(frozen=True)
class Match:
    """Threading outcome: ``case_number`` None means a new case."""

    case_number: int | None
    method: str
    reason: str
    internal: bool = False
    mentions: tuple[int, ...] = ()
    ref: str | None = None  # the Message-ID a "references" match found


def may_use(ev: Evidence, case: TokenCase) -> bool:
    """DESIGN 5 rule 3: a subject token counts only for a participant of the case (requester,
    CC, agent) or someone of the same organization."""
    same_org = bool(case.organization and ev.sender_domain == case.organization)
    return ev.sender in case.participants or same_org or ev.sender_is_agent


def decide(ev: Evidence) -> Match:
    """Apply DESIGN 5 in order; the first rule that applies wins."""
    if ev.signed and ev.signed_case_exists:
        kind, number = ev.signed
        return Match(number, "signed-address", f"sent to the signed reply address of case {number}",
                     internal=kind == "n")
    if ev.by_message_id is not None:
        return Match(ev.by_message_id, "references", f"In-Reply-To/References name <{ev.by_message_id_ref}>",
                     ref=ev.by_message_id_ref)
    if ev.by_thread_index is not None:
        return Match(ev.by_thread_index, "thread-index", "Outlook Thread-Index continues a stored message")
    for number in ev.tokens:
        case = ev.token_cases.get(number)
        if case is not None and may_use(ev, case):
            return Match(number, "subject-token", f"subject names case {number} and the sender is its participant")
    strangers = tuple(n for n in ev.tokens if n in ev.token_cases)
    if strangers:
        return Match(None, "new", "subject names a case the sender does not belong to: new case", mentions=strangers)
    return Match(None, "new", "no reference to a known case")


class CaseLookup(Protocol):
    """What :func:`gather` asks the store (``intake.db.cases.CaseRepo`` answers)."""

    def by_number(self, number: int) -> Any: ...

    def by_message_ids(self, ids: Iterable[str]) -> tuple[Any, str] | None: ...

    def by_thread_index(self, prefix: str) -> Any: ...

    def participant_addresses(self, case_id: int) -> set[str]: ...


def gather(lookup: CaseLookup, mail: ParsedMail, *, recipients: Iterable[str], secret: str,
           prefixes: Collection[str], sender_is_agent: bool) -> Evidence:
    """The evidence for one message: every case it may belong to, and why."""
    ev: dict[str, Any] = {"sender": mail.from_.key if mail.from_ else "",
                          "sender_domain": mail.from_.domain if mail.from_ else "",
                          "sender_is_agent": sender_is_agent}
    for rcpt in [*recipients, *(a.address for a in mail.to), *(a.address for a in mail.cc)]:
        signed = parse_reply_address(rcpt, secret)
        if signed:
            ev["signed"] = signed
            ev["signed_case_exists"] = lookup.by_number(signed[1]) is not None
            break
    found = lookup.by_message_ids([*mail.in_reply_to, *reversed(mail.references)])
    if found:
        ev["by_message_id"], ev["by_message_id_ref"] = found[0].number, found[1]
    prefix = thread_index_prefix(mail)
    if prefix and "by_message_id" not in ev:
        case = lookup.by_thread_index(prefix)
        if case:
            ev["by_thread_index"] = case.number
    tokens = tuple(n for _, n in case_tokens(mail.subject, prefixes))
    if tokens:
        token_cases: dict[int, TokenCase] = {}
        for n in tokens:
            case = lookup.by_number(n)
            if case is not None:
                token_cases[n] = TokenCase(frozenset(lookup.participant_addresses(case.id)), case.organization)
        ev["tokens"], ev["token_cases"] = tokens, token_cases
    return Evidence(**ev)
