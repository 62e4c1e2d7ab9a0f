"""The values a case, a message, an inbound record and an outbox row can take (DESIGN 2, 4).

Plain string enums with no dependencies, so that every layer (the store, the case
operations, the command line validating ``--status``) names a value the same way and a
typo is an ``AttributeError``, not a silent new state.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Where a case stands: new → open → pending → resolved → closed (DESIGN 5 "Lifecycle")."""

    NEW = "new"
    OPEN = "open"
    PENDING = "pending"
    RESOLVED = "resolved"
    CLOSED = "closed"


#: Statuses of a case that still needs work (counted by ``least_open`` assignment).
OPEN_STATUSES = (Status.NEW, Status.OPEN, Status.PENDING)


class Priority(StrEnum):
    """How urgent a case is, lowest first."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    URGENT = "urgent"


class Visibility(StrEnum):
    """Who may see a message of a case: everyone on it, or agents only."""

    PUBLIC = "public"
    INTERNAL = "internal"


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


class InboundState(StrEnum):
    """An inbound record: received → processed | duplicate | dropped | quarantined (DESIGN 4)."""

    RECEIVED = "received"
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    DROPPED = "dropped"
    QUARANTINED = "quarantined"


class OutboxState(StrEnum):
    """An outgoing mail: queued → sending → sent | failed | bounced (a sent mail that came back)."""

    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    BOUNCED = "bounced"


class Audience(StrEnum):
    """Whom an outgoing mail is for."""

    CUSTOMER = "customer"
    AGENT = "agent"
