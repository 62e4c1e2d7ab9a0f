"""The processor and the outbox sender of ``intake serve``, in worker processes.

Parsing, rules, templates and MIME are pure Python. In the process of the listeners they
would share one interpreter lock (the GIL) with every SMTP session and IMAP poller, so
that a burst of mail slowed receiving and processing alike. ``serve`` therefore runs
them in ``[processing] workers`` child processes of its own (started with ``spawn``, each
with its own database connections): every worker runs the processing loop
(:func:`processing_loop`), the first one also the outbox sender, woken by its own
processing. ``workers = 0`` runs both in threads of the serve process instead.

The serve process wakes the workers through a pipe after every commit of an edge,
forwards rule reloads (the rule files' contents, compiled again by each worker) and asks
them to stop. A worker whose serve process is gone (SIGKILL) sees the pipe closed and
exits after the batch in flight; whatever it did not finish stays ``received`` (or
``queued``) for the next start.

SQLite has one writer, and its busy handler polls: a processor writing back to back
would keep an edge from the write lock for long. The SMTP listener has a spool of its
own (``intake.spool``); the IMAP pollers commit to the database, and while one waits for
the lock (a count in shared memory) a worker starts no transaction, for at most
``MAX_YIELD`` seconds, so that processing still advances.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from intake.store import StoreUnavailable

if TYPE_CHECKING:
    from intake.app import App
    from intake.config import Config
    from intake.rules import RuleSet

log = logging.getLogger("intake.workers")

#: Longest a worker holds back a transaction for an edge waiting for the write lock.
MAX_YIELD = 0.05
#: Records taken per look at the backlog.
PENDING_CHUNK = 500
#: Seconds between looks at the database when nobody wakes the processor.
IDLE_POLL = 1.0


class EdgesWaiting:
    """How many edges of the serve process wait for the database's write lock, in shared
    memory: written by the serve process (under its lock), read by the workers."""

    def __init__(self, ctx: Any) -> None:
        self.shared = ctx.RawValue("i", 0)
        self._lock = threading.Lock()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around an edge's commit: workers start no transaction meanwhile."""
        with self._lock:
            self.shared.value += 1
        try:
            yield
        finally:
            with self._lock:
                self.shared.value -= 1


def yield_to_edges(shared: Any) -> None:
    """Before a processing transaction: let an edge waiting for the write lock go first."""
    deadline = time.monotonic() + MAX_YIELD
    while shared.value > 0 and time.monotonic() < deadline:
        time.sleep(0.0002)


@dataclass
class LoopControl:
    """How a processing loop waits, learns it must stop and says that it processed
    something (mail may be queued in the outbox)."""

    wait: Callable[[float], bool]  # sleep until woken or the timeout; False: stop now
    stopping: Callable[[], bool]
    processed: Callable[[], None]


def processing_loop(app: "App", control: LoopControl) -> None:
    """Process ``received`` records until told to stop (the same in a worker and a thread)."""
    proc = app.processor
    batch = app.cfg.processing.batch_size
    unavailable = False
    while not control.stopping():
        try:
            imported = app.store.import_spool(limit=PENDING_CHUNK)
            ids = app.store.pending_inbound(limit=PENDING_CHUNK)
            for start in range(0, len(ids), batch):
                if control.stopping():
                    break
                proc.process_batch(ids[start:start + batch])
                control.processed()
            if unavailable:
                log.info("database usable again; processing resumed")
                unavailable = False
        except StoreUnavailable as exc:
            # Nothing was written; the records stay `received`. Logged once per change of state.
            if not unavailable:
                log.warning("processing paused, database unavailable: %s", exc)
                unavailable = True
            ids, imported = [], 0
        except Exception as exc:  # noqa: BLE001 - never let the processor die; retry
            log.exception("processing pass failed; retrying")
            _report(app, "error", f"{type(exc).__name__}: {exc}")
            ids, imported = [], 0
        if not ids and not imported and not control.wait(IDLE_POLL):
            return


def _report(app: "App", state: str, error: str | None = None) -> None:
    try:
        app.store.report_status("processor", state, error=error)
    except StoreUnavailable:
        log.debug("processor status not recorded (database busy)")


def _start_outbox(app: "App", stopping: Callable[[], bool]) -> tuple[threading.Thread, threading.Event]:
    """The outbox sender in a thread of this process; set the event to deliver at once."""
    from intake.outbox import delivery_loop

    wake = threading.Event()
    thread = threading.Thread(target=delivery_loop, args=(app, wake, stopping), name="intake-outbox", daemon=True)
    thread.start()
    return thread, wake


# ---------------------------------------------------------------------------------------
# The worker process


def worker_main(cfg: "Config", rule_sources: tuple[tuple[str, bytes], ...], wake: Connection, control: Connection,
                edges: Any, outbox: bool, log_level: str) -> None:
    """Entry point of a worker process (``spawn``: everything it needs comes as arguments)."""
    from intake.app import App, setup_logging
    from intake.rules import compile_rules
    from intake.store import Store

    setup_logging(log_level)
    if cfg.processing.nice:
        # Below the listeners: the senders waiting for a 250 go first, processing catches up.
        os.nice(cfg.processing.nice)
    stop = threading.Event()
    # Ctrl-C reaches the whole process group: the serve process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app = App(cfg=cfg, store=Store(cfg.database_url), ruleset=compile_rules(rule_sources))
    app.store.before_write = lambda: yield_to_edges(edges)
    name = multiprocessing.current_process().name
    log.info("%s started (pid %d)%s", name, os.getpid(), ", with the outbox sender" if outbox else "")

    def handle_control() -> None:
        while control.poll():
            try:
                kind, payload = control.recv()
            except EOFError:
                stop.set()
                return
            if kind == "rules":
                app.ruleset = compile_rules(payload)
                log.info("%s routes with rule set %s from now on", name, app.ruleset.fingerprint)
            elif kind == "stop":
                stop.set()

    def wait(timeout: float) -> bool:
        handle_control()
        if stop.is_set():
            return False
        try:
            ready, _, _ = select.select([wake.fileno(), control.fileno()], [], [], timeout)
        except InterruptedError:
            ready = []
        if wake.fileno() in ready and not os.read(wake.fileno(), 65536):
            log.warning("%s: the serve process is gone; exiting", name)
            stop.set()
            return False
        handle_control()
        return not stop.is_set()

    def stopping() -> bool:
        handle_control()
        return stop.is_set()

    sender, outbox_wake = _start_outbox(app, stop.is_set) if outbox else (None, None)
    try:
        processing_loop(app, LoopControl(wait=wait, stopping=stopping,
                                         processed=outbox_wake.set if outbox_wake else lambda: None))
    finally:
        stop.set()
        if sender is not None and outbox_wake is not None:
            outbox_wake.set()
            sender.join()
        app.close()
        log.info("%s stopped", name)


# ---------------------------------------------------------------------------------------
# The serve side


@dataclass
class _Worker:
    process: Any
    wake: Connection  # write end: one byte wakes the worker
    control: Connection  # rule reloads and stop


class Processing:
    """The processor (and outbox sender) of ``serve``: starts, wakes, updates and stops it."""

    def __init__(self, app: "App") -> None:
        self.app = app
        self.count = app.cfg.processing.workers
        self._ctx = multiprocessing.get_context("spawn")
        self.edges = EdgesWaiting(self._ctx)
        self._workers: list[_Worker] = []
        self._thread_wake = threading.Event()
        self._stopping = threading.Event()
        self._log_level = logging.getLevelName(logging.getLogger().level)

    # -- what edges and the rules watcher call ---------------------------------------------

    def wake(self) -> None:
        """An edge committed messages: process them now."""
        if self.count == 0:
            self._thread_wake.set()
            return
        for w in self._workers:
            try:
                os.write(w.wake.fileno(), b"w")
            except OSError:
                pass  # a full pipe already holds a wake-up; a dead worker is restarted

    def rules_changed(self, ruleset: "RuleSet") -> None:
        """A new rule set was installed in serve: the workers compile the same files."""
        for w in list(self._workers):
            try:
                w.control.send(("rules", ruleset.sources))
            except OSError:
                pass  # a dead worker starts again with the current set

    # -- running ---------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Run the workers (restarting any that dies) until ``stopping``; then stop them."""
        loop = asyncio.get_running_loop()
        if self.count == 0:
            threads = loop.run_in_executor(None, self._run_in_threads)
            await stopping.wait()
            self._stopping.set()
            self._thread_wake.set()
            await threads
            return
        self._workers = [await loop.run_in_executor(None, self._start_worker, i) for i in range(self.count)]
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            for i, w in enumerate(self._workers):
                if not stopping.is_set() and not w.process.is_alive():
                    # At most one restart a second: a worker that cannot start does not spin.
                    log.error("%s exited with %s; starting it again", w.process.name, w.process.exitcode)
                    self._close(w)
                    self._workers[i] = await loop.run_in_executor(None, self._start_worker, i)
        for w in self._workers:
            try:
                w.control.send(("stop", None))
            except OSError:
                pass
        await loop.run_in_executor(None, self._join_all)

    def _start_worker(self, index: int) -> _Worker:
        wake_r, wake_w = self._ctx.Pipe(duplex=False)
        control_r, control_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=worker_main, name=f"processor-{index + 1}", daemon=False,
            args=(self.app.cfg, self.app.ruleset.sources, wake_r, control_r, self.edges.shared, index == 0,
                  self._log_level))
        process.start()
        wake_r.close()  # the worker's ends: once ours are closed, the worker sees our end of life
        control_r.close()
        os.set_blocking(wake_w.fileno(), False)
        return _Worker(process, wake_w, control_w)

    def _run_in_threads(self) -> None:
        """``workers = 0``: the processing loop in this thread, the outbox sender in another."""
        sender, outbox_wake = _start_outbox(self.app, self._stopping.is_set)

        def wait(timeout: float) -> bool:
            self._thread_wake.wait(timeout)
            self._thread_wake.clear()
            return not self._stopping.is_set()

        try:
            processing_loop(self.app, LoopControl(wait=wait, stopping=self._stopping.is_set, processed=outbox_wake.set))
        finally:
            self._stopping.set()
            outbox_wake.set()
            sender.join()

    def _join_all(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for w in self._workers:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("%s did not stop within %.0fs; terminating it", w.process.name, timeout)
                w.process.kill()
                w.process.join()
            self._close(w)

    @staticmethod
    def _close(w: _Worker) -> None:
        for conn in (w.wake, w.control):
            try:
                conn.close()
            except OSError:
                pass
