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
template changes (each processor looks at its template files again), and asks the
workers to stop. A worker whose serve process is gone (SIGKILL) sees its pipe
closed and exits after the batch in flight; whatever it did not finish stays ``received``
(or ``queued``) for the next start.

SQLite has one writer, and its busy handler polls: a processor writing back to back
would keep an edge from the write lock for long. The SMTP listener has a spool of its
own (``intake.spool-ID.db``); the IMAP pollers commit to the database, and while one waits for
the lock (a count in shared memory) a worker starts no transaction, for at most
``MAX_YIELD`` seconds, so that processing still advances.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from intake.db import StoreUnavailable

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
    something (mail may be queued in the outbox); ``shard`` (index, count) is its share of
    the records when several processors run."""

    wait: Callable[[float], bool]  # sleep until woken or the timeout; False: stop now
    stopping: Callable[[], bool]
    processed: Callable[[], None]
    shard: tuple[int, int] = (0, 1)


def processing_loop(app: "App", control: LoopControl) -> None:
    """Process ``received`` records until told to stop (the same in a worker and a thread)."""
    proc = app.processor
    batch = app.cfg.processing.batch_size
    unavailable = import_failing = False
    try:
        # Every template loaded (and tried) now: a version broken later finds a good one to fall back on.
        proc.notifier.templates.refresh()
    except Exception:  # noqa: BLE001 - rendering loads what it needs by itself
        log.exception("templates could not be loaded ahead; they load as mail needs them")
    while not control.stopping():
        if app.rules_error is not None:
            # No rule set has loaded yet: received mail waits (stored) until one does.
            if not control.wait(IDLE_POLL):
                return
            continue
        # The first processor imports the SMTP spool; each processes its share. A failing
        # import must not keep the records already in the database from being processed.
        imported = 0
        if control.shard[0] == 0:
            imported, import_failing = _import_spool(app, import_failing)
        try:
            with app.store.read() as tx:
                ids = tx.inbound.pending(limit=PENDING_CHUNK, shard=control.shard)
            progress = 0
            for start in range(0, len(ids), batch):
                if control.stopping():
                    break
                outcomes = proc.process_batch(ids[start:start + batch])
                progress += sum(not o.skipped for o in outcomes)
                control.processed()
            if ids and not progress:
                # Every one was taken by another process meanwhile (PostgreSQL): look again later.
                ids = []
            if unavailable:
                log.info("database usable again; processing resumed")
                unavailable = False
        except StoreUnavailable as exc:
            # Nothing was written; the records stay `received`. Logged once per change of state.
            if not unavailable:
                log.warning("processing paused, database unavailable: %s", exc)
                unavailable = True
            ids = []
        except Exception as exc:  # noqa: BLE001 - never let the processor die; retry
            log.exception("processing pass failed; retrying")
            _report(app, "error", f"{type(exc).__name__}: {exc}")
            ids = []
        if not ids and not imported and not control.wait(IDLE_POLL):
            return


def _import_spool(app: "App", failing: bool) -> tuple[int, bool]:
    """Move spooled SMTP messages into the database: (how many, whether it failed). A failed
    import leaves them in the spool for the next pass; it is logged once until it works."""
    try:
        imported = app.store.import_spool(limit=PENDING_CHUNK)
    except StoreUnavailable:
        return 0, failing  # the pass that follows finds the database unavailable too, and says so
    except Exception as exc:  # noqa: BLE001 - reported; processing goes on
        if not failing:
            log.exception("import of spooled SMTP messages failed; trying again every pass")
            _report(app, "error", f"spool import: {type(exc).__name__}: {exc}")
        return 0, True
    if failing:
        log.info("spooled SMTP messages imported again")
    return imported, False


def _report(app: "App", state: str, error: str | None = None) -> None:
    try:
        app.store.report_status("processor", state, error=error)
    except StoreUnavailable:
        log.debug("processor status not recorded (database busy)")


# ---------------------------------------------------------------------------------------
# The worker processes

PROCESSOR, OUTBOX = "processor", "outbox"


def worker_main(role: str, cfg: "Config", rule_sources: tuple[tuple[str, bytes], ...] | None, alive: Connection,
                control: Connection, outbox_wake: Connection, edges: Any, log_level: str,
                shard: tuple[int, int] = (0, 1)) -> None:
    """Entry point of a worker process (``spawn``: everything it needs comes as arguments).

    ``alive``: serve writes a byte to wake a processor; its end of file means serve is
    gone. ``control``: rule reloads (the name of a file holding the rule files). Serve
    stops a worker with SIGTERM. ``outbox_wake``: a processor writes a byte after every
    batch, the outbox sender reads them.
    """
    from intake.app import App
    from intake.logs import setup_logging
    from intake.db import Store
    from intake.edges.outbox_sender import delivery_loop
    from intake.rules import compile_rules

    setup_logging(log_level)
    if cfg.processing.nice:
        # Below the listeners: the senders waiting for a 250 go first, the workers catch up.
        os.nice(cfg.processing.nice)
    stop = threading.Event()
    # Ctrl-C reaches the whole process group: the serve process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app = App(cfg=cfg, store=Store(cfg.database_url))
    if rule_sources is None:
        app.rules_error = "the routing rules are refused"  # processing waits for a set from serve
    else:
        app.ruleset = compile_rules(rule_sources)
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
                try:
                    with open(payload, "rb") as f:
                        app.ruleset = compile_rules(pickle.load(f))
                    app.rules_error = None
                except OSError:
                    continue  # serve is stopping (its files are gone)
                log.info("%s routes with rule set %s from now on", name, app.ruleset.fingerprint)
            elif kind == "templates":
                # Serve saw template files change: the next mail uses what they are now.
                app.processor.notifier.templates.refresh()

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
            delivery_loop(app.cfg, app.store, wait, stopping)
        else:
            os.set_blocking(outbox_wake.fileno(), False)
            processing_loop(app, LoopControl(wait=wait, stopping=stopping, processed=processed, shard=shard))
    finally:
        app.close()
        log.info("%s stopped", name)


@dataclass
class _Worker:
    role: str
    name: str
    shard: tuple[int, int]
    process: Any
    alive: Connection  # our end: a byte wakes a processor; closing it tells the worker we are gone
    control: Connection  # rule reloads


class Processing:
    """The processor and the outbox sender of ``serve``: starts, wakes, updates and stops them."""

    def __init__(self, app: "App") -> None:
        self.app = app
        self.count = app.cfg.processing.workers
        self._ctx = multiprocessing.get_context("spawn")
        self.edges = EdgesWaiting(self._ctx)
        # Processors write to it after every batch; the outbox sender reads it.
        self._outbox_r, self._outbox_w = self._ctx.Pipe(duplex=False)
        self._workers: dict[str, _Worker] = {}  # by name; changed under _register
        # Starting a worker (it gets the current rules) and sending a new rule set to the
        # running ones take turns: no worker can start with a set that is no longer current.
        self._register = threading.Lock()
        self._dir: str | None = None  # rule sets handed to the workers, as files
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
        for w in list(self._workers.values()):
            if w.role == PROCESSOR:
                try:
                    os.write(w.alive.fileno(), b"w")
                except OSError:
                    pass  # a full pipe already holds a wake-up; a dead worker is restarted

    def rules_changed(self, ruleset: "RuleSet") -> None:
        """A new rule set was installed in serve: the processors compile the same files.

        The set goes into a file and its name down each control pipe: a message that
        small is written whole or not at all, so a stuck worker never blocks the caller
        (a worker started again gets the current set anyway).
        """
        with self._register:
            if self._dir is None:
                return
            path = os.path.join(self._dir, f"rules-{ruleset.fingerprint}.pickle")
            with open(path + ".tmp", "wb") as f:
                pickle.dump(ruleset.sources, f)
            os.replace(path + ".tmp", path)
            for w in self._workers.values():
                if w.role == PROCESSOR:
                    try:
                        w.control.send(("rules", path))
                    except OSError:
                        log.warning("%s did not take the new rules (busy); it keeps the set it has", w.name)
            # Older sets: a worker that has not read its file yet reads the newer one next.
            for name in os.listdir(self._dir):
                if name.startswith("rules-") and os.path.join(self._dir, name) != path:
                    os.unlink(os.path.join(self._dir, name))

    def templates_changed(self) -> None:
        """Serve's templates watcher saw files change: the processors look at theirs now,
        before their next batch, rather than when each file's lookup expires."""
        if self.count == 0:
            self.app.processor.notifier.templates.refresh()
            return
        with self._register:
            for w in self._workers.values():
                if w.role == PROCESSOR:
                    try:
                        w.control.send(("templates", None))
                    except OSError:
                        pass  # a busy worker notices the change by itself within LOOKUP_TTL

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
        self._dir = tempfile.mkdtemp(prefix="intake-serve-")
        roles = [(PROCESSOR, f"processor-{i + 1}", (i, self.count)) for i in range(self.count)]
        roles.append((OUTBOX, "outbox", (0, 1)))
        for role in roles:
            await loop.run_in_executor(None, self._start_worker, *role)
        try:
            await self._supervise(stopping)
        finally:
            for w in self._workers.values():
                w.process.terminate()  # SIGTERM: stop after the batch in flight
            await loop.run_in_executor(None, self._join_all)
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _supervise(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            for w in list(self._workers.values()):
                if not stopping.is_set() and not w.process.is_alive():
                    # At most one restart a second: a worker that cannot start does not spin.
                    log.error("%s exited with %s; starting it again", w.name, w.process.exitcode)
                    self._close(w)
                    await loop.run_in_executor(None, self._start_worker, w.role, w.name, w.shard)

    def _start_worker(self, role: str, name: str, shard: tuple[int, int]) -> None:
        with self._register:
            self._workers[name] = self._spawn(role, name, shard)

    def _spawn(self, role: str, name: str, shard: tuple[int, int]) -> _Worker:
        alive_r, alive_w = self._ctx.Pipe(duplex=False)
        control_r, control_w = self._ctx.Pipe(duplex=False)
        outbox_end = self._outbox_r if role == OUTBOX else self._outbox_w
        process = self._ctx.Process(
            target=worker_main, name=name, daemon=False,
            args=(role, self.app.cfg, None if self.app.rules_error else self.app.ruleset.sources, alive_r, control_r,
                  outbox_end, self.edges.shared,
                  self._log_level, shard))
        process.start()
        alive_r.close()  # the worker's ends: once ours are closed, the worker sees our end of life
        control_r.close()
        os.set_blocking(alive_w.fileno(), False)
        os.set_blocking(control_w.fileno(), False)
        return _Worker(role, name, shard, process, alive_w, control_w)

    def _run_in_threads(self) -> None:
        """``workers = 0``: the processing loop in this thread, the outbox sender in another."""
        from intake.edges.outbox_sender import delivery_loop

        def waiter(event: threading.Event) -> Callable[[float], bool]:
            def wait(timeout: float) -> bool:
                event.wait(timeout)
                event.clear()
                return not self._stopping.is_set()
            return wait

        sender = threading.Thread(target=delivery_loop, args=(self.app.cfg, self.app.store, waiter(self._outbox_event),
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
        for w in self._workers.values():
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
