"""What an address says about its owner. Pure."""

from __future__ import annotations

import re
from collections.abc import Collection

# Local parts of addresses that never read their mail (bounces, robots, list software).
_NOREPLY = re.compile(r"^(no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]daemon|postmaster|bounces?|"
                      r"auto[-_.]?reply)([+\-_.].*)?$", re.I)
_MAIL_SYSTEM = re.compile(r"^(mailer[-_.]daemon|postmaster)$", re.I)


def base_address(address: str) -> str:
    """``Support+c12-x@Example.com`` → ``support@example.com`` (lower case, no plus part)."""
    local, at, domain = address.lower().partition("@")
    return local.split("+", 1)[0] + at + domain


def domain_of(address: str) -> str:
    """The mail domain of an address, lower case ("" without one)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


def is_noreply(address: str) -> bool:
    """An address nobody reads: no-reply senders, mailer daemons, bounce handlers, auto-repliers."""
    return bool(_NOREPLY.match(address.partition("@")[0]))


def is_mail_system(address: str) -> bool:
    """``MAILER-DAEMON@…`` or ``postmaster@…``: the sender of a bounce."""
    return bool(_MAIL_SYSTEM.match(address.partition("@")[0]))


def organization_domain(address: str, free_mail_domains: Collection[str]) -> str | None:
    """The organization (mail domain) of an address; free-mail domains make none."""
    domain = domain_of(address)
    if not domain or domain in free_mail_domains:
        return None
    return domain


def delivered_to(raw: bytes) -> list[str]:
    """The addresses a raw mail names as where it went: Delivered-To, X-Original-To, To, Cc."""
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    from email.utils import getaddresses

    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    return [addr for name in ("Delivered-To", "X-Original-To", "To", "Cc")
            for _, addr in getaddresses([str(v) for v in headers.get_all(name, [])]) if addr]
