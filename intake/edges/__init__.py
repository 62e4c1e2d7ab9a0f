"""The edges: protocol servers and clients that bring messages in and take mail out."""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from intake.db import Store


class Host(Protocol):
    """What an edge needs of the service that runs it (``intake.service.Service``): the store,
    the stop signal, a way to wake the processor and a way to stop everything."""

    stopping: asyncio.Event

    @property
    def store(self) -> "Store": ...

    def notify_received(self) -> None:
        """Messages were committed: process them now."""

    def fail(self, reason: str) -> None:
        """This edge cannot run (e.g. its port is taken): stop everything, exit 1."""

    def edge_waiting(self) -> AbstractContextManager[None]:
        """Around an edge's commit: the processors start no transaction meanwhile."""
