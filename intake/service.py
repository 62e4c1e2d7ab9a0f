"""``intake serve``: the one asyncio loop that runs the edges, the processor and the jobs.

The processor runs in a worker thread (SQLite and parsing are blocking work) and is woken
whenever an edge commits a message, and every second in any case, so that records left
``received`` by a crash are picked up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from intake.app import App

log = logging.getLogger("intake.service")


class WriteTurns:
    """Turns at the database's one writer slot, inside this process: edges first.

    SQLite has one writer at a time, and its busy handler (sleep and poll) lets a thread
    that writes back to back (the processor) starve the others. Here a waiting writer is
    woken at once, and the processor steps aside while an edge is busy (messages waiting
    for a commit, or one committed less than ``quiet`` seconds ago: senders answered 250
    send the next message at once), at most ``max_yield`` seconds per message so that
    processing still advances under sustained load.
    """

    def __init__(self, max_yield: float = 0.1, quiet: float = 0.02) -> None:
        self.max_yield = max_yield
        self.quiet = quiet
        self._cond = threading.Condition()
        self._held = False
        self._edge_queued = 0
        self._edge_last = 0.0

    def queue_edge(self, n: int) -> None:
        """An edge has ``n`` more (or, negative, fewer) messages waiting for a commit."""
        with self._cond:
            self._edge_queued += n
            self._edge_last = time.monotonic()
            self._cond.notify_all()

    @contextmanager
    def edge(self) -> Iterator[None]:
        """Hold the writer slot for an edge's commit."""
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    @contextmanager
    def processor(self) -> Iterator[None]:
        """Hold the writer slot for processing one message, after the edges' commits."""
        deadline = time.monotonic() + self.max_yield
        with self._cond:
            while True:
                now = time.monotonic()
                edge_busy = self._edge_queued > 0 or now - self._edge_last < self.quiet
                if not self._held and (not edge_busy or now >= deadline):
                    break
                wait = deadline - now if self._edge_queued > 0 or now >= deadline else self._edge_last + self.quiet - now
                self._cond.wait(timeout=max(0.001, wait))
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


class Service:
    """Runs until SIGTERM/SIGINT; a second signal exits at once."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._extra: list[Callable[["Service"], Awaitable[None]]] = []
        self.exit_code = 0
        self.turns = WriteTurns()

    def add(self, component: Callable[["Service"], Awaitable[None]]) -> None:
        """Register a coroutine function that runs beside the processor until stop."""
        self._extra.append(component)

    def fail(self, reason: str) -> None:
        """A component cannot run (e.g. its port is taken): stop everything, exit 1."""
        log.error("%s", reason)
        self.exit_code = 1
        self.stopping.set()

    def notify_received(self) -> None:
        """Called by an edge after it committed a message: process it now."""
        self.wake.set()

    def _process_some(self, limit: int) -> int:
        """Process up to ``limit`` received records (oldest first), taking turns with the edges."""
        proc = self.app.processor
        done = 0
        for inbound_id in self.app.store.pending_inbound(limit=limit):
            if self.stopping.is_set():
                break
            with self.turns.processor():
                proc.process(inbound_id)
            done += 1
        return done

    async def _processor(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                # In chunks, so that a stop request is honoured between them.
                if await loop.run_in_executor(None, self._process_some, 100) >= 100:
                    self.wake.set()
            except Exception:  # noqa: BLE001 - the store may be down; keep serving, retry
                log.exception("processor pass failed; retrying")
            if self.wake.is_set():
                continue
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
                # At once: no thread is waited for. Nothing is lost: every 250 followed a
                # commit, and SQLite/PostgreSQL roll back a transaction cut off here.
                log.warning("second signal: exiting now")
                os._exit(1)

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
        log.info("stopped")
        return self.exit_code


def serve(app: App) -> int:
    """Run the service in a new event loop; returns the exit code."""
    service = Service(app)
    if app.cfg.smtp.listen:
        from intake.smtp_edge import smtp_component

        service.add(smtp_component(app.cfg))
    return asyncio.run(service.run())
