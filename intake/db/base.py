"""What every part of the store shares: its errors, the clock, and values as they are stored."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Any

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


def db_text(value: str | None, limit: int | None = None) -> str | None:
    """Text every database can store, the same way on SQLite and PostgreSQL.

    The SMTP edge keeps undecodable bytes of a command as lone surrogates (aiosmtpd's
    ``surrogateescape``: an 8-bit MAIL FROM or EHLO name), which neither SQLite's driver
    nor PostgreSQL's takes, and PostgreSQL refuses NUL in text: each becomes U+FFFD. With
    ``limit`` (a column's length, in UTF-8 bytes for non-ASCII text), a longer value is
    shortened to its start, ``…`` and 16 hex digits of its SHA-256: the same value always gives the same text, so a long
    Message-ID still finds its duplicate and its thread. The raw message keeps the original
    bytes.
    """
    if value is None:
        return None
    if not (value.isascii() and "\x00" not in value):
        value = _UNSTORABLE.sub("\ufffd", value)
    if limit is None:
        return value
    if len(value) > limit and value.isascii():
        digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]
        value = f"{value[:limit - 17]}…{digest}"
    elif not value.isascii() and len(encoded := value.encode("utf-8")) > limit:
        # Counted in UTF-8 bytes, as RFC 5322 counts a line and as PostgreSQL's index limit
        # (2,704 bytes) does: 998 Japanese characters are about 3,000 bytes.
        digest = hashlib.sha256(encoded).hexdigest()[:16]
        value = f"{encoded[:limit - 19].decode('utf-8', 'ignore')}…{digest}"
    return value


def db_json(value: Any) -> Any:
    """A JSON value with every string (and key) made storable by :func:`db_text`."""
    if isinstance(value, str):
        return db_text(value)
    if isinstance(value, dict):
        return {db_text(str(k)): db_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [db_json(v) for v in value]
    return value


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
