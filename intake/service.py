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
from intake.rules import RulesError, compile_rules, rule_files

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
    service = Service(app)
    service.add(RulesWatcher(app))
    return asyncio.run(service.run())
