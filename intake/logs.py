"""Logging: one line per event on standard error, control characters escaped."""

from __future__ import annotations

import logging
import re
import sys


# C0 controls and DEL in what a log line says (an envelope with a NUL, a subject with an
# escape sequence): shown escaped, so that a line stays one line and a terminal stays sane.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _EscapingFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the stdlib's name
        record.message = _CONTROL.sub(lambda m: repr(m.group())[1:-1], record.message)
        return super().formatMessage(record)


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
