"""Subjects: reply/forward prefixes, the case token, header values safe to send. Pure."""

from __future__ import annotations

import re

# Reply/forward prefixes in the languages our customers write, with counted forms
# (Re[2]:, Re^2:, RE(3):) and full-width colons.
_PREFIX = re.compile(
    r"^\s*(?:re|fwd?|aw|wg|sv|vs|antw|r|tr|rv|enc|res|odp|fs|回复|转发|返信|転送|答复)"
    r"\s*(?:\[\d+\]|\^\d+|\(\d+\))?\s*[:：]\s*",
    re.I,
)
_BRACKET_PREFIX = re.compile(r"^\s*\[(?:fwd?|re)\s*[:：]?\s*\]\s*", re.I)


def split_reply_prefixes(subject: str) -> tuple[str, str]:
    """(the leading reply/forward prefixes as written, the rest), any number of them."""
    s = subject.strip()
    rest = s
    while True:
        new = _PREFIX.sub("", rest, count=1)
        new = _BRACKET_PREFIX.sub("", new, count=1)
        if new == rest:
            break
        rest = new
    return s[: len(s) - len(rest)], rest


def clean_subject(subject: str) -> str:
    """The case name: the subject without any number of reply/forward prefixes."""
    return split_reply_prefixes(subject)[1]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_DOUBLE_SPACES = re.compile(r" {2,}")


def clean_header(value: str) -> str:
    """A header value without control characters (a newline would inject headers)."""
    return _DOUBLE_SPACES.sub(" ", _CONTROL.sub(" ", value)).strip()


# Any bracketed word: compared with the case label in code (one compiled pattern for all cases).
_BRACKETED = re.compile(r"\s*\[\s*([^\[\]\s]+)\s*\]\s*")
_SPACES = re.compile(r"\s+")


def subject_with_token(subject: str, label: str) -> str:
    """The subject with the case token ``[CASE-1042]`` exactly once (after any ``Re:``)."""
    subject = clean_header(subject)
    wanted = label.casefold()
    bare = _BRACKETED.sub(lambda m: " " if m.group(1).casefold() == wanted else m.group(0), subject)
    bare = _SPACES.sub(" ", bare).strip()
    prefix, rest = split_reply_prefixes(bare)
    return f"{prefix}[{label}] {rest.strip()}".strip()
