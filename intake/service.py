"""``intake serve``: the one asyncio loop that runs the edges, the processor and the jobs.

The processor runs in a worker thread (SQLite and parsing are blocking work) and is woken
whenever an edge commits a message, and every second in any case, so that records left
``received`` by a crash are picked up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from intake.app import App

log = logging.getLogger("intake.service")


class Service:
    """Runs until SIGTERM/SIGINT; a second signal exits at once."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
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
        reported = (-1.0, -1)  # (when, backlog) of the last status report
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                await loop.run_in_executor(None, proc.process_pending)
                reported = await loop.run_in_executor(None, self._report_processor, reported)
            except Exception as exc:  # noqa: BLE001 - the store may be down; keep serving, retry
                log.exception("processor pass failed; retrying")
                await loop.run_in_executor(None, self._report, "processor", "error", f"{type(exc).__name__}: {exc}")
            wake = asyncio.ensure_future(self.wake.wait())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait({wake, stop}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            stop.cancel()

    def _report_processor(self, last: tuple[float, int]) -> tuple[float, int]:
        """The processor's `received` backlog for `intake status`: on change, else every 30 s."""
        from intake.store import RECEIVED

        backlog = self.app.store.count_inbound(RECEIVED)
        now = time.monotonic()
        if backlog == last[1] and now - last[0] < 30:
            return last
        self.app.store.report_status("processor", "running", backlog=backlog, success=True)
        return (now, backlog)

    def _report(self, name: str, state: str, error: str | None = None) -> None:
        from intake.store import StoreUnavailable

        try:
            self.app.store.report_status(name, state, error=error)
        except StoreUnavailable:
            log.debug("status of %s not recorded (database busy)", name)

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
        from intake.scheduler import run_scheduler
        from intake.store import utcnow

        self._tasks = [asyncio.create_task(self._processor()),
                       asyncio.create_task(run_scheduler(self.app, self.stopping, utcnow))]
        self._tasks += [asyncio.create_task(c(self)) for c in self._extra]
        log.info("serving: database %s, %d mailboxes", self.app.cfg.database_url, len(self.app.cfg.mailbox))
        await self.stopping.wait()
        # Every component watches `stopping` and returns once its work in flight is done.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await loop.run_in_executor(None, self._report, "processor", "stopped")
        log.info("stopped")
        return 0


def serve(app: App) -> int:
    """Run the service in a new event loop; returns the exit code."""
    from intake.imap_edge import imap_component

    service = Service(app)
    for acct in app.cfg.imap:  # one poller per [[imap]] account
        service.add(imap_component(acct))
    return asyncio.run(service.run())
