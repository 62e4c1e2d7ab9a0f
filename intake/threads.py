"""Which case a message belongs to (DESIGN.md 5), and the subject clean-up. Pure.

The store gathers the evidence (cases known by Message-ID, the case named by a subject
token and its participants); ``decide`` applies the order of DESIGN 5 to it and says why.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

# Reply/forward prefixes in the languages our customers write, with counted forms
# (Re[2]:, Re^2:, RE(3):) and full-width colons.
_PREFIX = re.compile(
    r"^\s*(?:re|fwd?|aw|wg|sv|vs|antw|r|tr|rv|enc|res|odp|fs|回复|转发|返信|転送|答复)"
    r"\s*(?:\[\d+\]|\^\d+|\(\d+\))?\s*[:：]\s*",
    re.I,
)
_BRACKET_PREFIX = re.compile(r"^\s*\[(?:fwd?|re)\s*[:：]?\s*\]\s*", re.I)


def clean_subject(subject: str) -> str:
    """The case name: the subject without any number of reply/forward prefixes."""
    s = subject.strip()
    while True:
        new = _PREFIX.sub("", s, count=1)
        new = _BRACKET_PREFIX.sub("", new, count=1)
        if new == s:
            return s
        s = new


@functools.lru_cache(maxsize=16)
def _token_pattern(prefixes: frozenset[str]) -> re.Pattern[str]:
    alt = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))
    return re.compile(rf"\[\s*({alt})-(\d+)\s*\]", re.I)


def case_tokens(subject: str, prefixes: Collection[str]) -> list[tuple[str, int]]:
    """``[CASE-1042]`` tokens in a subject, for any configured prefix: [(prefix, number)]."""
    if not prefixes:
        return []
    return [(m.group(1).upper(), int(m.group(2))) for m in _token_pattern(frozenset(prefixes)).finditer(subject)]


def strip_case_token(subject: str, prefixes: Collection[str]) -> str:
    if not prefixes:
        return subject
    alt = "|".join(re.escape(p) for p in prefixes)
    return re.sub(rf"\s*\[\s*(?:{alt})-\d+\s*\]\s*", " ", subject, flags=re.I).strip()


# --- signed reply addresses: support+c1042-k3x9q2@example.com --------------------------

_SIGNED = re.compile(r"^(?P<base>[^+@]+)\+(?P<kind>[cn])(?P<number>\d+)-(?P<sig>[a-z0-9]+)@(?P<domain>.+)$", re.I)


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


# --- the decision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What the store found for one message."""

    signed: tuple[str, int] | None = None  # (kind, case number) from a signed recipient
    signed_case_exists: bool = False
    by_message_id: int | None = None  # case number of a stored/sent Message-ID it refers to
    by_message_id_ref: str | None = None
    by_thread_index: int | None = None
    token_cases: Mapping[int, bool] = None  # type: ignore[assignment]  # number → sender is participant/org
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Match:
    """Threading outcome: ``case_number`` None means a new case."""

    case_number: int | None
    method: str
    reason: str
    internal: bool = False
    mentions: tuple[int, ...] = ()


def decide(ev: Evidence) -> Match:
    """Apply DESIGN 5 in order; the first rule that applies wins."""
    if ev.signed and ev.signed_case_exists:
        kind, number = ev.signed
        return Match(number, "signed-address", f"sent to the signed reply address of case {number}", internal=kind == "n")
    if ev.by_message_id is not None:
        return Match(ev.by_message_id, "references", f"In-Reply-To/References name <{ev.by_message_id_ref}>")
    if ev.by_thread_index is not None:
        return Match(ev.by_thread_index, "thread-index", "Outlook Thread-Index continues a stored message")
    token_cases = ev.token_cases or {}
    for number in ev.tokens:
        if token_cases.get(number):
            return Match(number, "subject-token", f"subject names case {number} and the sender is its participant")
    strangers = tuple(n for n in ev.tokens if n in token_cases)
    if strangers:
        return Match(None, "new", "subject names a case the sender does not belong to: new case", mentions=strangers)
    return Match(None, "new", "no reference to a known case")
