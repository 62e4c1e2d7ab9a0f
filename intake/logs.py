"""Logging: one line per event on standard error, control characters escaped."""

from __future__ import annotations

import logging
import re
import sys


# What must not reach a log line or a terminal as it is (an envelope with a NUL, a subject
# with an escape sequence or a right-to-left override): C0 and C1 controls, DEL, the
# Unicode line and paragraph separators, the bidirectional controls, and undecodable bytes
# kept as lone surrogates.
_UNSAFE = "\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_IN_LINE = re.compile(f"[\x00-\x1f{_UNSAFE}]")
_UNSAFE_IN_TEXT = re.compile(f"[\x00-\x08\x0b-\x1f{_UNSAFE}]")  # tab and newline kept


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # an undecodable byte, shown as the byte
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escaped(value: object, *, multiline: bool = False) -> str:
    """``value`` as text safe for a log line or a terminal: every character above escaped
    (``\\x00``, ``\\u202e``); with ``multiline``, tabs and newlines stay as they are."""
    text = str(value)
    if text.isascii() and text.isprintable():
        return text
    return (_UNSAFE_IN_TEXT if multiline else _UNSAFE_IN_LINE).sub(_escape, text)


_UNSAFE_IN_JSON = re.compile(f"[{_UNSAFE}]")


def json_safe(text: str) -> str:
    """JSON text with the characters above written as ``\\u`` escapes (the same JSON)."""
    return text if text.isascii() else _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _EscapingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the stdlib's name
        record.message = escaped(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: object) -> str:  # noqa: N802 - the stdlib's name
        return escaped(super().formatException(ei), multiline=True)  # type: ignore[arg-type]


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (a command run in-process by a test
    gets its own)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    """One line per event on standard error."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("imapclient").setLevel(logging.WARNING)  # it logs every connect/close at INFO
