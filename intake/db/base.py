"""What every part of the store shares: its errors, the clock, and values as they are stored."""

from __future__ import annotations

import re
from datetime import datetime, timezone

UTC = timezone.utc


class StoreUnavailable(Exception):
    """The database cannot commit right now (locked, full, unreachable): retry later."""


class StoreBusy(StoreUnavailable):
    """Another writer holds SQLite's write lock right now (only from non-waiting attempts)."""


class NoDatabase(Exception):
    """A command would read a database that does not exist, or is not at this code's revision."""


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def db_text(value: str | None) -> str | None:
    """Text every database can store.

    The SMTP edge keeps undecodable bytes of a command as lone surrogates (aiosmtpd's
    ``surrogateescape``: an 8-bit MAIL FROM or EHLO name), which neither SQLite's driver
    nor PostgreSQL's takes, and PostgreSQL refuses NUL in text: each becomes U+FFFD. The
    raw message keeps the original bytes.
    """
    if value is None or (value.isascii() and "\x00" not in value):
        return value
    return _UNSTORABLE.sub("\ufffd", value)


def sqlite_time(value: datetime) -> str:
    """A timestamp as SQLAlchemy writes it on SQLite (UTC, no zone), so both read alike."""
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def read_time(value: str | datetime | None) -> datetime | None:
    """A stored timestamp (text on SQLite), aware in UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
