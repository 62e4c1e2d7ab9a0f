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
from intake.rules import RulesError, compile_rules, rule_files

log = logging.getLogger("intake.service")


# Records processed per transaction under `serve`: large enough to share the fsync,
# small enough that an edge waiting for the writer slot is not kept long.
PROCESS_BATCH = 20


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

    def edge_busy(self) -> bool:
        """An edge has messages waiting for a commit, or committed a moment ago."""
        with self._cond:
            return self._edge_queued > 0 or time.monotonic() - self._edge_last < self.quiet

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
        self.outbox_wake = asyncio.Event()  # set after the processor ran: mail may be queued
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
        """Process up to ``limit`` received records (oldest first), taking turns with the edges.

        While no edge is busy a turn processes a batch in one transaction (one durable
        commit for many messages); while one is, a turn is one message, so that an SMTP
        commit never waits behind a whole batch.
        """
        proc = self.app.processor
        ids = self.app.store.pending_inbound(limit=limit)
        done = 0
        while done < len(ids) and not self.stopping.is_set():
            size = 1 if self.turns.edge_busy() else PROCESS_BATCH
            chunk = ids[done : done + size]
            with self.turns.processor():
                proc.process_batch(chunk)
            done += len(chunk)
        return done

    async def _processor(self) -> None:
        loop = asyncio.get_running_loop()
        reported = (-1.0, -1)  # (when, backlog) of the last status report
        while not self.stopping.is_set():
            self.wake.clear()
            try:
                # In chunks, so that a stop request is honoured between them.
                done = await loop.run_in_executor(None, self._process_some, 100)
                if done:
                    self.outbox_wake.set()
                if done >= 100:
                    self.wake.set()
                reported = await loop.run_in_executor(None, self._report_processor, reported)
            except Exception as exc:  # noqa: BLE001 - the store may be down; keep serving, retry
                log.exception("processor pass failed; retrying")
                await loop.run_in_executor(None, self._report, "processor", "error", f"{type(exc).__name__}: {exc}")
            if self.wake.is_set():
                continue
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
                # At once: no thread is waited for. Nothing is lost: every 250 followed a
                # commit, and SQLite/PostgreSQL roll back a transaction cut off here.
                log.warning("second signal: exiting now")
                os._exit(1)

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
        await loop.run_in_executor(None, self._report, "processor", "stopped")
        log.info("stopped")
        return self.exit_code


class RulesWatcher:
    """Hot reload of the rules folder: a valid set replaces the running one atomically.

    A stat-based poll (names, sizes, modification times of ``*.yaml``) notices a change,
    whatever editor or deployment tool made it; the content fingerprint decides whether
    to load. An invalid set is refused: the error goes to the log and to the store
    (``Store.rules_state()``, shown by ``intake status`` and ``intake rules stats``), and
    the last good set keeps routing.
    """

    def __init__(self, app: App, interval: float = 1.0) -> None:
        self.app = app
        self.interval = interval
        self.folder = app.cfg.path(app.cfg.rules.path)
        self._stamp = self._stat()
        self._seen = app.ruleset.fingerprint
        self._loaded_at = utcnow_iso()

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        try:
            files = sorted(self.folder.glob("*.yaml"))
            return tuple((f.name, st.st_mtime_ns, st.st_size) for f in files for st in [f.stat()])
        except OSError:
            return ()

    def record(self, state: str, **extra: object) -> None:
        try:
            self.app.store.set_rules_state({"state": state, "at": utcnow_iso(), "loaded_at": self._loaded_at,
                                            "fingerprint": self.app.ruleset.fingerprint,
                                            "summary": self.app.ruleset.summary(), **extra})
        except Exception:  # noqa: BLE001 - the state is informative; routing goes on
            log.exception("could not record the rules state")

    def check(self) -> bool:
        """Reload when the folder changed; returns True when a new set was installed."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            contents = [(f, f.read_bytes()) for f in rule_files(self.folder)]
            ruleset = compile_rules(contents)
        except RulesError as exc:
            fingerprint = _fingerprint(stamp)
            if fingerprint != self._seen:
                self._seen = fingerprint
                self.record("refused", error=str(exc))
                log.error("rules refused, keeping the set loaded at %s: %s", self._loaded_at,
                          " | ".join(exc.errors))
            return False
        except OSError as exc:  # a file vanished between listing and reading: next poll
            log.warning("rules folder changing (%s); retrying", exc)
            self._stamp = ()
            return False
        if ruleset.fingerprint == self.app.ruleset.fingerprint:
            if self._seen != ruleset.fingerprint:
                self._seen = ruleset.fingerprint
                self.record("ok")
            return False
        self.app.ruleset = ruleset  # one reference swap: a message sees the old or the new set
        self._seen = ruleset.fingerprint
        self._loaded_at = utcnow_iso()
        self.record("ok")
        log.info("rules reloaded: %s (fingerprint %s)", ruleset.summary(), ruleset.fingerprint)
        return True

    async def __call__(self, service: "Service") -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.record, "ok")
        while not service.stopping.is_set():
            try:
                await loop.run_in_executor(None, self.check)
            except Exception:  # noqa: BLE001 - never let the watcher die
                log.exception("rules watcher failed; retrying")
            try:
                await asyncio.wait_for(service.stopping.wait(), timeout=self.interval)
            except asyncio.TimeoutError:
                pass


def _fingerprint(stamp: tuple[tuple[str, int, int], ...]) -> str:
    return "stat:" + repr(stamp)


def utcnow_iso() -> str:
    from intake.store import utcnow

    return utcnow().isoformat()


def serve(app: App) -> int:
    """Run the service in a new event loop; returns the exit code."""
    from intake.imap_edge import imap_component

    service = Service(app)
    service.add(RulesWatcher(app))
    if app.cfg.smtp.listen:
        from intake.smtp_edge import smtp_component

        service.add(smtp_component(app.cfg))
    for acct in app.cfg.imap:  # one poller per [[imap]] account
        service.add(imap_component(acct))
    return asyncio.run(service.run())
