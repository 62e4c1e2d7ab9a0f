"""The processor and the outbox sender of ``intake serve``, in worker processes.

Parsing, rules, templates and MIME are pure Python. In the process of the listeners they
would share one interpreter lock (the GIL) with every SMTP session and IMAP poller, so
that a burst of mail slowed receiving and processing alike. ``serve`` therefore runs
them in child processes of its own (started with ``spawn``, each with its own database
connections, below serve's CPU priority): ``[processing] workers`` processors running
:func:`processing_loop` and one outbox sender, woken by the processors after every
batch. ``workers = 0`` runs both in threads of the serve process instead.

The serve process wakes the processors through a pipe after every commit of an edge,
forwards rule reloads (the rule files' contents, compiled again by each processor) and
asks the workers to stop. A worker whose serve process is gone (SIGKILL) sees its pipe
closed and exits after the batch in flight; whatever it did not finish stays ``received``
(or ``queued``) for the next start.

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


# ---------------------------------------------------------------------------------------
# The worker processes

PROCESSOR, OUTBOX = "processor", "outbox"


def worker_main(role: str, cfg: "Config", rule_sources: tuple[tuple[str, bytes], ...], alive: Connection,
                control: Connection, outbox_wake: Connection, edges: Any, log_level: str) -> None:
    """Entry point of a worker process (``spawn``: everything it needs comes as arguments).

    ``alive``: serve writes a byte to wake a processor; its end of file means serve is
    gone. ``control``: rule reloads and stop. ``outbox_wake``: a processor writes a byte
    after every batch, the outbox sender reads them.
    """
    from intake.app import App, setup_logging
    from intake.outbox import delivery_loop
    from intake.rules import compile_rules
    from intake.store import Store

    setup_logging(log_level)
    if cfg.processing.nice:
        # Below the listeners: the senders waiting for a 250 go first, the workers catch up.
        os.nice(cfg.processing.nice)
    stop = threading.Event()
    # Ctrl-C reaches the whole process group: the serve process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app = App(cfg=cfg, store=Store(cfg.database_url), ruleset=compile_rules(rule_sources))
    app.store.before_write = lambda: yield_to_edges(edges)
    name = multiprocessing.current_process().name
    log.info("%s started (pid %d)", name, os.getpid())

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

    woken_by = [alive.fileno(), outbox_wake.fileno()] if role == OUTBOX else [alive.fileno()]

    def wait(timeout: float) -> bool:
        handle_control()
        if stop.is_set():
            return False
        try:
            ready, _, _ = select.select([*woken_by, control.fileno()], [], [], timeout)
        except InterruptedError:
            ready = []
        for fd in ready:
            if fd != control.fileno() and not os.read(fd, 65536) and fd == alive.fileno():
                log.warning("%s: the serve process is gone; exiting", name)
                stop.set()
        handle_control()
        return not stop.is_set()

    def stopping() -> bool:
        handle_control()
        return stop.is_set()

    def processed() -> None:
        try:
            os.write(outbox_wake.fileno(), b"o")
        except OSError:
            pass  # a full pipe already holds a wake-up

    try:
        if role == OUTBOX:
            delivery_loop(app, wait, stopping)
        else:
            os.set_blocking(outbox_wake.fileno(), False)
            processing_loop(app, LoopControl(wait=wait, stopping=stopping, processed=processed))
    finally:
        app.close()
        log.info("%s stopped", name)


@dataclass
class _Worker:
    role: str
    name: str
    process: Any
    alive: Connection  # our end: a byte wakes a processor; closing it tells the worker we are gone
    control: Connection  # rule reloads and stop


class Processing:
    """The processor and the outbox sender of ``serve``: starts, wakes, updates and stops them."""

    def __init__(self, app: "App") -> None:
        self.app = app
        self.count = app.cfg.processing.workers
        self._ctx = multiprocessing.get_context("spawn")
        self.edges = EdgesWaiting(self._ctx)
        # Processors write to it after every batch; the outbox sender reads it.
        self._outbox_r, self._outbox_w = self._ctx.Pipe(duplex=False)
        self._workers: list[_Worker] = []
        self._send_lock = threading.Lock()
        self._thread_wake = threading.Event()
        self._outbox_event = threading.Event()
        self._stopping = threading.Event()
        self._log_level = logging.getLevelName(logging.getLogger().level)

    # -- what edges and the rules watcher call ---------------------------------------------

    def wake(self) -> None:
        """An edge committed messages: process them now."""
        if self.count == 0:
            self._thread_wake.set()
            return
        for w in self._workers:
            if w.role == PROCESSOR:
                try:
                    os.write(w.alive.fileno(), b"w")
                except OSError:
                    pass  # a full pipe already holds a wake-up; a dead worker is restarted

    def rules_changed(self, ruleset: "RuleSet") -> None:
        """A new rule set was installed in serve: the processors compile the same files."""
        for w in list(self._workers):
            if w.role == PROCESSOR:
                self._send(w, ("rules", ruleset.sources))  # a dead worker starts again with the current set

    def _send(self, w: _Worker, message: tuple[str, Any]) -> None:
        # The rules watcher's thread and the loop both send: one message at a time on a pipe.
        with self._send_lock:
            try:
                w.control.send(message)
            except OSError:
                pass

    # -- running ---------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Run the workers (restarting any that dies) until ``stopping``; then stop them."""
        loop = asyncio.get_running_loop()
        if self.count == 0:
            threads = loop.run_in_executor(None, self._run_in_threads)
            await stopping.wait()
            self._stopping.set()
            self._thread_wake.set()
            self._outbox_event.set()
            await threads
            return
        roles = [(PROCESSOR, f"processor-{i + 1}") for i in range(self.count)] + [(OUTBOX, "outbox")]
        self._workers = [await loop.run_in_executor(None, self._start_worker, role, name) for role, name in roles]
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            for i, w in enumerate(self._workers):
                if not stopping.is_set() and not w.process.is_alive():
                    # At most one restart a second: a worker that cannot start does not spin.
                    log.error("%s exited with %s; starting it again", w.name, w.process.exitcode)
                    self._close(w)
                    self._workers[i] = await loop.run_in_executor(None, self._start_worker, w.role, w.name)
        for w in self._workers:  # from a thread: a pipe full of a rules message must not block the loop
            await loop.run_in_executor(None, self._send, w, ("stop", None))
        await loop.run_in_executor(None, self._join_all)

    def _start_worker(self, role: str, name: str) -> _Worker:
        alive_r, alive_w = self._ctx.Pipe(duplex=False)
        control_r, control_w = self._ctx.Pipe(duplex=False)
        outbox_end = self._outbox_r if role == OUTBOX else self._outbox_w
        process = self._ctx.Process(
            target=worker_main, name=name, daemon=False,
            args=(role, self.app.cfg, self.app.ruleset.sources, alive_r, control_r, outbox_end, self.edges.shared,
                  self._log_level))
        process.start()
        alive_r.close()  # the worker's ends: once ours are closed, the worker sees our end of life
        control_r.close()
        os.set_blocking(alive_w.fileno(), False)
        return _Worker(role, name, process, alive_w, control_w)

    def _run_in_threads(self) -> None:
        """``workers = 0``: the processing loop in this thread, the outbox sender in another."""
        from intake.outbox import delivery_loop

        def waiter(event: threading.Event) -> Callable[[float], bool]:
            def wait(timeout: float) -> bool:
                event.wait(timeout)
                event.clear()
                return not self._stopping.is_set()
            return wait

        sender = threading.Thread(target=delivery_loop, args=(self.app, waiter(self._outbox_event),
                                                              self._stopping.is_set), name="intake-outbox")
        sender.start()
        try:
            processing_loop(self.app, LoopControl(wait=waiter(self._thread_wake), stopping=self._stopping.is_set,
                                                  processed=self._outbox_event.set))
        finally:
            self._stopping.set()
            self._outbox_event.set()
            sender.join()

    def _join_all(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for w in self._workers:
            w.process.join(max(0.1, deadline - time.monotonic()))
            if w.process.is_alive():
                log.error("%s did not stop within %.0fs; terminating it", w.name, timeout)
                w.process.kill()
                w.process.join()
            self._close(w)

    @staticmethod
    def _close(w: _Worker) -> None:
        for conn in (w.alive, w.control):
            try:
                conn.close()
            except OSError:
                pass
