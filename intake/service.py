"""``intake serve``: the one asyncio loop that runs the edges, the processor and the jobs.

The processor runs in a worker thread (SQLite and parsing are blocking work) and is woken
whenever an edge commits a message, and every second in any case, so that records left
``received`` by a crash are picked up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from intake.app import App

log = logging.getLogger("intake.service")


class Service:
    """Runs until SIGTERM/SIGINT; a second signal exits at once."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.outbox_wake = asyncio.Event()  # set after the processor ran: mail may be queued
        self._tasks: list[asyncio.Task[None]] = []
        self._extra: list[Callable[["Service"], Awaitable[None]]] = []

    def add(self, component: Callable[["Service"], Awaitable[None]]) -> None:
        """Register a coroutine function that runs beside the processor until stop."""
        self._extra.append(component)

    def notify_received(self) -> None:
        """Called by an edge after it committed a message: process it now."""
        self.wake.set()

    async def _processor(self) -> None:
        proc = self.app.processor
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                if await loop.run_in_executor(None, proc.process_pending):
                    self.outbox_wake.set()
            except Exception:  # noqa: BLE001 - the store may be down; keep serving, retry
                log.exception("processor pass failed; retrying")
            wake = asyncio.ensure_future(self.wake.wait())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({wake, stop}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            stop.cancel()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = 0

        def _on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping: finishing work in flight (signal again to exit at once)")
                self.stopping.set()
            else:
                log.warning("second signal: exiting now")
                raise SystemExit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal)
        from intake.outbox import run_outbox
        from intake.scheduler import run_scheduler
        from intake.store import utcnow

        self._tasks = [asyncio.create_task(self._processor()),
                       asyncio.create_task(run_scheduler(self.app, self.stopping, utcnow)),
                       asyncio.create_task(run_outbox(self))]
        self._tasks += [asyncio.create_task(c(self)) for c in self._extra]
        log.info("serving: database %s, %d mailboxes", self.app.cfg.database_url, len(self.app.cfg.mailbox))
        await self.stopping.wait()
        # Every component watches `stopping` and returns once its work in flight is done.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("stopped")
        return 0


def serve(app: App) -> int:
    """Run the service in a new event loop; returns the exit code."""
    return asyncio.run(Service(app).run())
