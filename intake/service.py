"""``intake serve``: the one asyncio loop that runs the edges, the processor and the jobs.

The edges (SMTP listener, IMAP pollers) commit received messages and wake the processor,
which runs in worker processes of its own (``intake.workers``) and also looks at the
database every second, so that records left ``received`` by a crash are picked up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Collection
from contextlib import AbstractContextManager
from pathlib import Path

from intake.app import App
from intake.db import Store, StoreUnavailable, utcnow
from intake.db.ops import RULES_STATE_KEY, TEMPLATES_RENDER_KEY, TEMPLATES_STATE_KEY
from intake.rules import RuleSet, RulesError, compile_rules, rule_files
from intake.states import InboundState
from intake.workers import Processing

log = logging.getLogger("intake.service")

#: Seconds between deletions of imported messages from the SMTP listener's spool.
SPOOL_PURGE_INTERVAL = 5.0


class Service:
    """Runs until SIGTERM/SIGINT; a second signal exits at once."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.stopping = asyncio.Event()
        self.processing = Processing(app)
        self._tasks: list[asyncio.Task[None]] = []
        self._extra: list[Callable[["Service"], Awaitable[None]]] = []
        self.exit_code = 0

    def add(self, component: Callable[["Service"], Awaitable[None]]) -> None:
        """Register a coroutine function that runs beside the processor until stop."""
        self._extra.append(component)

    def fail(self, reason: str) -> None:
        """A component cannot run (e.g. its port is taken): stop everything, exit 1."""
        log.error("%s", reason)
        self.exit_code = 1
        self.stopping.set()

    @property
    def store(self) -> Store:
        return self.app.store

    def notify_received(self) -> None:
        """Called by an edge after it committed messages: process them now."""
        self.processing.wake()

    def edge_waiting(self) -> AbstractContextManager[None]:
        """Around an edge's commit: the processors start no transaction meanwhile."""
        return self.processing.edges.waiting()

    def rules_changed(self, ruleset: RuleSet) -> None:
        """Called when a new rule set was installed: the processor takes it too."""
        self.processing.rules_changed(ruleset)

    def templates_changed(self) -> None:
        """Called when template files changed: the processors look at theirs at once."""
        self.processing.templates_changed()

    async def _housekeeping(self) -> None:
        """Every second: the processor's backlog for ``intake status`` (on change, else every
        30 s); every few seconds: imported messages leave the SMTP listener's spool."""
        loop = asyncio.get_running_loop()
        last = (-1.0, -1)  # (when, backlog) of the last report
        purged_at = 0.0
        while not self.stopping.is_set():
            try:
                last = await loop.run_in_executor(None, self._report_backlog, last)
                if time.monotonic() - purged_at >= SPOOL_PURGE_INTERVAL:
                    purged_at = time.monotonic()
                    await loop.run_in_executor(None, self.app.store.purge_spool)
            except Exception as exc:  # noqa: BLE001 - the store may be down; keep serving
                log.warning("housekeeping failed: %s: %s", type(exc).__name__, exc)
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    def _report_backlog(self, last: tuple[float, int]) -> tuple[float, int]:
        with self.store.read() as tx:
            backlog = tx.inbound.count(InboundState.RECEIVED)
        backlog += self.store.spool_backlog()
        now = time.monotonic()
        if backlog == last[1] and now - last[0] < 30:
            return last
        self.app.store.report_status("processor", "running", backlog=backlog, success=True)
        return (now, backlog)

    def _report(self, name: str, state: str, error: str | None = None) -> None:
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
        from intake.scheduler import run_scheduler

        self.app.processing_in_serve = True  # the scheduler's fallback sweeps are not needed here
        self._tasks = [asyncio.create_task(self.processing.run(self.stopping)),
                       asyncio.create_task(self._housekeeping()),
                       asyncio.create_task(run_scheduler(self.app, self.stopping, utcnow))]
        self._tasks += [asyncio.create_task(c(self)) for c in self._extra]
        log.info("serving: database %s, %d mailboxes, processor in %s", self.app.cfg.database_url,
                 len(self.app.cfg.mailbox), f"{self.processing.count} worker process(es)"
                 if self.processing.count else "a thread")
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
        self._stamp = self._stat()
        self._seen = app.ruleset.fingerprint
        self._loaded_at = utcnow_iso()
        self.on_change: Callable[[RuleSet], None] | None = None  # told of every installed set

    @property
    def folder(self) -> Path:
        """Resolved at each look: a ./routing_rules made after the start replaces the shipped examples."""
        return self.app.cfg.rules_path

    def _stat(self) -> tuple[object, ...]:
        try:
            folder = self.folder
            files = sorted(folder.glob("*.yaml"))
            return (str(folder), *((f.name, st.st_mtime_ns, st.st_size) for f in files for st in [f.stat()]))
        except OSError:
            return ()

    def record(self, state: str, **extra: object) -> None:
        try:
            with self.app.store.transaction() as tx:
                tx.ops.set_json_setting(RULES_STATE_KEY, {
                    "state": state, "at": utcnow_iso(), "loaded_at": self._loaded_at,
                    "fingerprint": self.app.ruleset.fingerprint, "summary": self.app.ruleset.summary(),
                    "folder": str(self.folder), **extra})
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
        self.app.rules_error = None
        if self.on_change is not None:
            self.on_change(ruleset)
        self._seen = ruleset.fingerprint
        self._loaded_at = utcnow_iso()
        self.record("ok")
        log.info("rules reloaded: %s (fingerprint %s)", ruleset.summary(), ruleset.fingerprint)
        return True

    async def __call__(self, service: "Service") -> None:
        loop = asyncio.get_running_loop()
        self.on_change = service.rules_changed
        if self.app.rules_error:
            log.error("rules refused at start; mail is received and stored, and processed once they load: %s",
                      " | ".join(self.app.rules_error.splitlines()))
            await loop.run_in_executor(None, lambda: self.record("refused", error=self.app.rules_error))
        else:
            await loop.run_in_executor(None, self.record, "ok")
        await _every(self.interval, service, self.check, "rules watcher")


class TemplatesWatcher:
    """Serve's look at the template files every second, for the log and ``intake status``.

    The processors pick up template changes by themselves (each file is looked at again
    after ``intake.templates.LOOKUP_TTL``) and keep the last good version of a template
    whose new version fails. This watcher loads the same files the same way, so that a
    change is logged once (one line per event) and recorded for ``intake status`` at once,
    whether or not a mail needs the template.
    """

    def __init__(self, app: App, interval: float = 1.0) -> None:
        from intake.notify import templates_for

        self.app = app
        self.interval = interval
        self.templates = templates_for(app.cfg)
        self._changed_at = utcnow_iso()
        self.on_change: Callable[[], None] | None = None  # told before the change is recorded
        self._looked = False

    def check(self, first: bool = False) -> bool:
        """Look at the files; log and record what changed. True when something did."""
        events = self.templates.refresh()
        if not events:
            return False
        self._changed_at = utcnow_iso()
        if not first and self.on_change is not None:
            # The processors first: once intake status shows a change, the next mail sees it.
            self.on_change()
        if first:
            overrides = self.templates.overrides()
            log.info("templates: %d in use, %d override(s) from %s%s", len(events), len(overrides),
                     self.templates.path, f" ({', '.join(overrides)})" if overrides else "")
        for event in events:
            if event.kind == "refused":
                log.error("%s", event)
            elif not first:
                log.info("%s", event)
        self.record({e.name for e in events if e.kind != "refused"})
        return True

    def record(self, changed: Collection[str] = ()) -> None:
        """The state for ``intake status``; a send-time failure of a template that changed since is cleared."""
        problems = [p.as_dict() for p in self.templates.problems()]
        state = {"state": "refused" if problems else "ok", "at": self._changed_at,
                 "folder": str(self.templates.path), "templates": len(self.templates.files()),
                 "overrides": self.templates.overrides(), "refused": problems}
        try:
            with self.app.store.transaction() as tx:
                tx.ops.set_json_setting(TEMPLATES_STATE_KEY, state)
                failed = tx.ops.json_setting(TEMPLATES_RENDER_KEY)
                if failed and failed.get("name") in changed:
                    tx.ops.set_json_setting(TEMPLATES_RENDER_KEY, None)
        except Exception:  # noqa: BLE001 - the state is informative; mail goes on
            log.exception("could not record the templates state")

    async def __call__(self, service: "Service") -> None:
        self.on_change = service.templates_changed
        await _every(self.interval, service, self._look, "templates watcher")

    def _look(self) -> None:
        self.check(first=not self._looked)
        self._looked = True  # only once a first look went through


async def _every(interval: float, service: "Service", check: Callable[[], object], name: str) -> None:
    """Run ``check`` in a thread every ``interval`` seconds until serve stops; a failure is
    logged and the next round comes anyway (a watcher never dies)."""
    loop = asyncio.get_running_loop()
    while not service.stopping.is_set():
        try:
            await loop.run_in_executor(None, check)
        except Exception:  # noqa: BLE001 - never let the watcher die
            log.exception("%s failed; retrying", name)
        try:
            await asyncio.wait_for(service.stopping.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass


def _fingerprint(stamp: tuple[object, ...]) -> str:
    return "stat:" + repr(stamp)


def utcnow_iso() -> str:
    return utcnow().isoformat()


def serve(app: App) -> int:
    """Run the service in a new event loop; returns the exit code."""
    from intake.edges.imap import imap_component

    service = Service(app)
    service.add(RulesWatcher(app))
    service.add(TemplatesWatcher(app))
    if app.cfg.smtp.listen:
        from intake.edges.smtp import smtp_component

        service.add(smtp_component(app.cfg))
    for acct in app.cfg.imap:  # one poller per [[imap]] account
        service.add(imap_component(acct))
    return asyncio.run(service.run())
