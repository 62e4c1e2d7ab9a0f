"""Facts: the message as conditions see it, each value computed once and only when asked for."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from intake.business_hours import DEFAULT as DEFAULT_HOURS
from intake.mail.addresses import base_address
from intake.mail.parse import normalize_text
from intake.rules.model import BODY_LIMIT, RuleContext

def _keys(addresses: Iterable[str]) -> frozenset[str]:
    """Lower-cased addresses plus their forms without a ``+tag``."""
    return frozenset([*addresses, *(base_address(a) for a in addresses if "+" in a)])


class _lazy:  # noqa: N801 - used as a decorator
    """``cached_property`` without its lock (Python 3.11 takes an RLock on every first
    access, which doubles the cost of evaluating a small rule table)."""

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.name = func.__name__

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


class Facts:
    """The message as the rules see it. Each value is computed on first use and kept.

    Multi-valued fields are tuples; single-valued ones also come as one string (``*_s``,
    "" when absent), the form compiled conditions read, and as its UTF-8 bytes (``*_b``),
    the form regular expressions (RE2) read.
    """

    def __init__(self, ctx: RuleContext) -> None:
        self.ctx = ctx
        self._headers: dict[str, tuple[str, ...]] = {}

    @_lazy
    def from_s(self) -> str:
        f = self.ctx.mail.from_
        return f.address.lower() if f and f.address else ""

    @_lazy
    def from_(self) -> tuple[str, ...]:
        return (self.from_s,) if self.from_s else ()

    @_lazy
    def to(self) -> tuple[str, ...]:
        return tuple(a.address.lower() for a in self.ctx.mail.to if a.address)

    @_lazy
    def cc(self) -> tuple[str, ...]:
        return tuple(a.address.lower() for a in self.ctx.mail.cc if a.address)

    @_lazy
    def recipient(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*(r.lower() for r in self.ctx.recipients if r), *self.to, *self.cc]))

    @_lazy
    def from_keys(self) -> frozenset[str]:
        return _keys(self.from_)

    @_lazy
    def to_keys(self) -> frozenset[str]:
        return _keys(self.to)

    @_lazy
    def cc_keys(self) -> frozenset[str]:
        return _keys(self.cc)

    @_lazy
    def recipient_keys(self) -> frozenset[str]:
        return _keys(self.recipient)

    @_lazy
    def from_domain_s(self) -> str:
        return self.from_s.rpartition("@")[2] if "@" in self.from_s else ""

    @_lazy
    def from_domain(self) -> tuple[str, ...]:
        return (self.from_domain_s,) if self.from_domain_s else ()

    @_lazy
    def organization_s(self) -> str:
        return (self.ctx.organization or "").lower()

    @_lazy
    def organization(self) -> tuple[str, ...]:
        return (self.organization_s,) if self.organization_s else ()

    @_lazy
    def subject_s(self) -> str:
        return normalize_text(self.ctx.mail.subject or "").strip()

    @_lazy
    def subject(self) -> tuple[str, ...]:
        return (self.subject_s,) if self.subject_s else ()

    @_lazy
    def body_s(self) -> str:
        b = normalize_text((self.ctx.mail.text or "")[:BODY_LIMIT])
        return b if b.strip() else ""

    @_lazy
    def body(self) -> tuple[str, ...]:
        return (self.body_s,) if self.body_s else ()

    @_lazy
    def language_s(self) -> str:
        return self.ctx.mail.language

    @_lazy
    def language(self) -> tuple[str, ...]:
        return (self.language_s,)

    @_lazy
    def channel_s(self) -> str:
        return (self.ctx.channel or "").lower()

    @_lazy
    def channel(self) -> tuple[str, ...]:
        return (self.channel_s,)

    @_lazy
    def has_attachment(self) -> bool:
        # Inline parts (signature logos, pasted screenshots in HTML) are not what people
        # mean by "has an attachment".
        return any(not a.inline for a in self.ctx.mail.attachments)

    @_lazy
    def business_hours(self) -> bool:
        return (self.ctx.calendar or DEFAULT_HOURS).is_open(self.ctx.now)

    def header(self, name: str) -> tuple[str, ...]:
        """Decoded, normalised values of every occurrence of header ``name`` (lower-case), each
        cut at ``BODY_LIMIT`` characters as the body is (a bound on a pattern's cost)."""
        v = self._headers.get(name)
        if v is None:
            v = self._headers[name] = tuple(normalize_text(x[:BODY_LIMIT]).strip()
                                            for x in self.ctx.mail.header_all(name))
        return v


def _encoded(field: str) -> _lazy:
    """The UTF-8 bytes of a single-valued field's text (``subject_s`` → ``subject_b``)."""

    def value(self: Facts) -> bytes:
        return getattr(self, field + "_s").encode()

    value.__name__ = field + "_b"
    return _lazy(value)


for _field in ("from", "from_domain", "organization", "subject", "body", "language", "channel"):
    setattr(Facts, _field + "_b", _encoded(_field))


