"""The SMTP (or LMTP) listener of ``intake serve``: an aiosmtpd server in the service's loop.

Refuse early, accept late: RCPT refuses anything that is not one of our mailboxes or
their plus-addresses (``550 5.1.1``; intake is never a relay); DATA is answered ``250``
only after the raw bytes and envelope are committed, ``451 4.3.0`` when they cannot be.
Concurrent deliveries share one commit (:class:`GroupCommit`) whose waiting (an fsync,
or a PostgreSQL round trip) runs in a thread, so that the loop keeps talking to every
other client meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from intake.config import Config, parse_size

from intake.db import Store, StoreBusy, StoreUnavailable, utcnow

if TYPE_CHECKING:
    from intake.db.spool import SpoolWriter
    from intake.edges import Host

log = logging.getLogger("intake.smtp")

# Replies are values. Enhanced status codes (RFC 3463) tell the sending MTA whether to retry.
R_OK_RCPT = "250 2.1.5 OK"
R_UNKNOWN_RCPT = "550 5.1.1 <{}>: no such mailbox here"
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_QUEUED = "250 2.0.0 OK: {}"
R_TEMPFAIL = "451 4.3.0 Temporary failure, message not stored: please retry later"
R_SHUTDOWN = "421 4.3.2 {} Service shutting down, please retry later"
R_BUSY = "421 4.7.0 {} Too many connections, please retry later"
R_TOO_BIG = "552 5.3.4 Message too big for this system"

# aiosmtpd's own fixed replies for oversize mail, given their enhanced codes. The line
# length limit is the message size limit, so a line over it is a message over it.
_REWRITE = {
    "552 Error: message size exceeds fixed maximum message size": R_TOO_BIG,
    "552 Error: Too much mail data": R_TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": R_TOO_BIG,
}

# How long a stopping listener waits for transactions in flight before it closes them.
DRAIN_SECONDS = 60.0
# How long a delivery waits for the store's write lock before it is answered 451.
LOCK_WAIT_SECONDS = 30.0


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` or ``"[::1]:25"`` → (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"smtp.listen: expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side context for STARTTLS from PEM files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


# ---------------------------------------------------------------------------------------
# Group commit


@dataclass
class _Pending:
    items: list[tuple[bytes, dict[str, Any]]]
    future: asyncio.Future[list[int]]
    size: int
    queued: float  # perf_counter when the delivery was queued


class GroupCommit:
    """Commits received messages so that durability costs one fsync per batch of
    concurrent deliveries, not one per message.

    On SQLite the listener commits to its spool (``intake.spool-ID.db``) in the event loop
    itself (a few inserts that never wait for the lock), then one ``fdatasync`` in a
    thread makes the commit durable, and only then are its deliveries answered.
    Deliveries arriving while a sync runs are committed together as soon as it ends, and
    synced together. While the spool is locked (by its purge) the committer tries again
    a moment later, for up to ``lock_wait`` seconds. Callbacks, not tasks, carry this
    along: every hop through the event loop is latency a waiting sender sees.

    On PostgreSQL a commit is a network round trip: queued deliveries are committed
    together in a thread, and those arriving meanwhile go into the next commit.

    A failing commit or sync fails every delivery it holds (answered ``451``, retried by
    their senders). A failed sync also breaks the spool for good (after a failed fsync the
    kernel may have dropped the pages, and no later sync would tell): every delivery after
    it is answered ``451`` and ``on_broken`` is told, so that serve stops and is started
    again.
    """

    def __init__(self, store: "Store", spool: "SpoolWriter | None", on_commit: Callable[[], None], *,
                 on_broken: Callable[[str], None] = lambda reason: None, max_batch: int = 256,
                 max_bytes: int = 64 * 1024 * 1024, lock_wait: float = LOCK_WAIT_SECONDS) -> None:
        self._store = store
        self._spool = spool
        self._on_commit = on_commit
        self._on_broken = on_broken
        self._broken: Exception | None = None
        self._max_batch = max_batch
        self._max_bytes = max_bytes
        self._lock_wait = lock_wait
        self._queue: list[_Pending] = []  # waiting for a commit
        self._flushing = False  # a spool commit is scheduled, or committed and syncing
        self._locked_since: float | None = None
        self._pause = 0.0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="intake-smtp-commit")
        self.batches = 0
        self.messages = 0
        self.seconds = 0.0  # from DATA to durable, summed over deliveries
        self.last_error: str | None = None  # the last commit that failed (451), for intake status

    @property
    def broken(self) -> bool:
        """The spool failed a sync: every delivery is refused until serve starts again."""
        return self._broken is not None

    def refs(self, ids: list[int]) -> str:
        """How the reply names committed messages: ``queued as S12`` (a spool id, found by
        ``intake messages show S12``) or ``stored as #12`` (an inbound record)."""
        if self._spool is not None:
            return "queued as " + ",".join(f"S{i}" for i in ids)
        return "stored as " + ",".join(f"#{i}" for i in ids)

    async def commit(self, items: list[tuple[bytes, dict[str, Any]]]) -> list[int]:
        """Commit ``items`` (raw bytes, receive metadata) durably; their ids."""
        if self._broken is not None:
            raise self._broken
        loop = asyncio.get_running_loop()
        p = _Pending(items, loop.create_future(), sum(len(raw) for raw, _ in items), time.perf_counter())
        self._queue.append(p)
        self._idle.clear()
        if self._spool is None:
            self._wake.set()
        elif not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush, loop)
        return await p.future

    # -- SQLite: the spool ---------------------------------------------------------------

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit what is queued to the spool and start its sync (``_flushing`` is set)."""
        assert self._spool is not None
        if self._broken is not None:
            batch, self._queue = self._queue, []
            self._fail(batch, self._broken)
        if not self._queue:
            self._flushing = False
            self._check_idle()
            return
        batch = self._take([])
        try:
            ids = self._spool.try_append([item for p in batch for item in p.items], utcnow())
        except StoreBusy:
            self._queue[:0] = batch
            now = time.monotonic()
            if self._locked_since is None:
                self._locked_since, self._pause = now, 0.0001
            if now - self._locked_since < self._lock_wait:
                self._pause = min(self._pause * 2, 0.005)
                loop.call_later(self._pause, self._flush, loop)
                return
            error: Exception = StoreUnavailable(f"the spool stayed locked for {self._lock_wait:.0f}s")
            batch, self._queue = self._queue, []
            self._locked_since = None
            self._fail(batch, error)
            self._flush(loop)
            return
        except Exception as exc:  # noqa: BLE001 - any failure: the senders retry (451)
            self._fail(batch, exc)
            self._flush(loop)
            return
        self._locked_since = None
        committed = self._split(batch, ids)
        try:
            done = self._executor.submit(self._spool.sync)
        except RuntimeError as exc:  # the executor is shut down: serve is stopping
            self._synced(loop, committed, exc)
            return
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._synced, loop, committed, f.exception()))

    def _synced(self, loop: asyncio.AbstractEventLoop, committed: list[tuple[_Pending, list[int]]],
                error: BaseException | None) -> None:
        try:
            if error is None:
                self._done(committed)
                return
            self._fail([p for p, _ in committed], error)
            if self._broken is None:
                self._broken = StoreUnavailable(f"the spool cannot be trusted since a failed sync: {error}")
                log.error("SMTP spool broken (%s): every delivery is refused with 451 until serve starts again",
                          error)
                self._on_broken(f"the SMTP spool could not be synced: {error}")
        finally:
            self._flush(loop)  # what arrived during the sync: committed and synced together

    # -- PostgreSQL: a thread ------------------------------------------------------------

    async def run(self) -> None:
        """Runs until :meth:`close` and every delivery is done; on PostgreSQL, the committer."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._spool is not None or not self._queue:
                    if self._closed and self._idle.is_set():
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._take([])
                try:
                    ids = await loop.run_in_executor(self._executor, self._store.receive_many,
                                                     [item for p in batch for item in p.items])
                except Exception as exc:  # noqa: BLE001 - any failure: the senders retry (451)
                    self._fail(batch, exc)
                else:
                    self._done(self._split(batch, ids))
                self._check_idle()
        finally:
            self._executor.shutdown(wait=False)
            if self._spool is not None:
                self._spool.close()

    # -- both --------------------------------------------------------------------------

    @staticmethod
    def _split(batch: list[_Pending], ids: list[int]) -> list[tuple[_Pending, list[int]]]:
        out, at = [], 0
        for p in batch:
            out.append((p, ids[at:at + len(p.items)]))
            at += len(p.items)
        return out

    def _done(self, committed: list[tuple[_Pending, list[int]]]) -> None:
        self.batches += 1
        now = time.perf_counter()
        for p, ids in committed:
            self.messages += len(ids)
            self.seconds += now - p.queued
            if not p.future.done():  # the client may have gone; its message is stored anyway
                p.future.set_result(ids)
        self._on_commit()

    def _fail(self, batch: list[_Pending], exc: BaseException) -> None:
        if not batch:
            return
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("commit of %d message(s) failed: %s: %s", sum(len(p.items) for p in batch), type(exc).__name__, exc)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def _check_idle(self) -> None:
        if not self._queue and not self._flushing:
            self._idle.set()
            self._wake.set()  # run() may be waiting to finish

    def _take(self, batch: list[_Pending]) -> list[_Pending]:
        """``batch`` with queued deliveries added, within the batch limits."""
        count = sum(len(p.items) for p in batch)
        size = sum(p.size for p in batch)
        while self._queue:
            p = self._queue[0]
            if batch and (count + len(p.items) > self._max_batch or size + p.size > self._max_bytes):
                break
            batch.append(self._queue.pop(0))
            count += len(p.items)
            size += p.size
        return batch

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        self._wake.set()
        await self._idle.wait()
        self._wake.set()


# ---------------------------------------------------------------------------------------
# The handler (aiosmtpd hooks; names must be spelled exactly as aiosmtpd looks them up)


@dataclass
class SmtpHandler:
    """Decides RCPT and stores DATA; every failure becomes a temporary ``451``."""

    cfg: Config
    committer: GroupCommit
    hostname: str
    protocol: str = "smtp"
    max_recipients: int = 100
    draining: bool = False

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.draining:
            _close_soon(server)
            return R_SHUTDOWN.format(self.hostname)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.cfg.mailbox_for(address) is None or address.count("@") != 1:
            log.info("refused recipient <%s> from %s", address, _peer(session))
            return R_UNKNOWN_RCPT.format(address)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return R_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return R_OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            items = self._records(session, envelope)
            ids = await self.committer.commit(items)
        except Exception as exc:  # noqa: BLE001 - never a 500 with a Python exception text
            log.error("not stored (451) from=<%s> to=%s: %s: %s", envelope.mail_from, envelope.rcpt_tos,
                      type(exc).__name__, exc)
            return self._per_recipient(envelope, R_TEMPFAIL)
        message_id = _message_id(envelope.original_content or b"")
        refs = self.committer.refs(ids)
        log.info("received %s from=<%s> to=%s size=%d message_id=%s", refs,
                 envelope.mail_from, ",".join(envelope.rcpt_tos), len(envelope.original_content or b""), message_id)
        return self._per_recipient(envelope, R_QUEUED.format(refs))

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s: %s", type(error).__name__, error)
        return R_TEMPFAIL

    def _per_recipient(self, envelope: Envelope, reply: str) -> str:
        # LMTP answers DATA once per accepted recipient (RFC 2033 4.2).
        if self.protocol == "lmtp":
            return "\r\n".join([reply] * len(envelope.rcpt_tos))
        return reply

    def _records(self, session: Session, envelope: Envelope) -> list[tuple[bytes, dict[str, Any]]]:
        """One inbound record per mailbox among the recipients (support@ and billing@ at once
        are two deliveries of the same message: the processor makes one case of them)."""
        body = envelope.original_content or b""
        groups: dict[str, list[str]] = {}
        for rcpt in envelope.rcpt_tos:
            mb = self.cfg.mailbox_for(rcpt)
            assert mb is not None  # RCPT accepted only our mailboxes
            groups.setdefault(mb.address, []).append(rcpt)
        peer = _peer(session)
        tls = session.ssl is not None
        items = []
        for mailbox, rcpts in groups.items():
            raw = self._trace(session, envelope, rcpts, tls) + body
            source = {"protocol": self.protocol, "peer": peer, "helo": session.host_name, "tls": tls}
            items.append((raw, dict(channel="email", mailbox=mailbox, envelope_from=envelope.mail_from,
                                    envelope_to=rcpts, source=source)))
        return items

    def _trace(self, session: Session, envelope: Envelope, rcpts: Sequence[str], tls: bool) -> bytes:
        """Return-Path and Received, as the final delivery SMTP server must add (RFC 5321 4.4)."""
        with_ = {"smtp": "ESMTP", "lmtp": "LMTP"}[self.protocol] + ("S" if tls and self.protocol == "smtp" else "")
        ip = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        rcpt = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        received = (f"Received: from {session.host_name or 'unknown'} ([{ip}])\r\n\tby {self.hostname} (intake) "
                    f"with {with_}{rcpt}; {formatdate(localtime=True)}\r\n")
        return (f"Return-Path: <{envelope.mail_from or ''}>\r\n" + received).encode("utf-8", "surrogateescape")


class _StatusReporter:
    """``intake status`` for the listener: its state, when it last stored a message, its
    last failed commit; written on change, else every 30 s, off the loop."""

    def __init__(self, service: "Host", name: str, committer: GroupCommit) -> None:
        self._service, self._name, self._committer = service, name, committer
        self._lock = threading.Lock()  # a write still in its thread must not follow "stopped"
        self._stopped = False

    async def run(self) -> None:
        """Report until cancelled."""
        loop = asyncio.get_running_loop()
        c = self._committer
        reported: tuple[str, int, str | None] | None = None
        reported_at = 0.0
        while True:
            now = ("refusing (451)" if c.broken else "listening", c.messages, c.last_error)
            if now != reported or time.monotonic() - reported_at >= 30:
                state, messages, error = now
                before_messages, before_error = (reported[1], reported[2]) if reported else (0, None)
                await loop.run_in_executor(None, self._write, state, error if error != before_error else None,
                                           messages > before_messages)
                reported, reported_at = now, time.monotonic()
            await asyncio.sleep(1.0)

    async def stopped(self, task: "asyncio.Task[None] | None") -> None:
        """Stop reporting and say so (the listener is closed)."""
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self._write, "stopped", None, False, True)

    def _write(self, state: str, error: str | None, success: bool, final: bool = False) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = final
            try:
                self._service.store.report_status(self._name, state, error=error, success=success)
            except StoreUnavailable:
                log.debug("status of the %s listener not recorded (database busy)", self._name)


def _peer(session: Session) -> str:
    peer = session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)


def _message_id(raw: bytes) -> str:
    """The Message-ID header value for the log line (cheap scan of the header block)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode("utf-8", "replace")
    return "-"


def _close_soon(server: SMTP) -> None:
    """Close a session after the reply now being sent (421 means the server closes)."""
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: server.transport.close() if server.transport else None)


# ---------------------------------------------------------------------------------------
# The protocol: aiosmtpd's SMTP/LMTP with our limits


class _Limits:
    """Shared by every session of one listener: open sessions and the connection limit."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.sessions: set[SMTP] = set()


def _protocol_class(base: type[SMTP]) -> type[SMTP]:
    class IntakeProtocol(base):  # type: ignore[misc, valid-type]
        """aiosmtpd's protocol with long lines, enhanced size codes and a connection limit."""

        def __init__(self, handler: SmtpHandler, limits: _Limits, *, line_length_limit: int, **kw: Any) -> None:
            # Real mail has lines far over RFC 5321's 1000 octets; refusing them would be a
            # permanent failure. aiosmtpd reads the limit in __init__, so set it first.
            self.line_length_limit = line_length_limit
            self._limits = limits
            self._refused = False
            super().__init__(handler, **kw)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if self not in self._limits.sessions:  # not the STARTTLS re-entry
                self._refused = len(self._limits.sessions) >= self._limits.max_connections
                self._limits.sessions.add(self)
            super().connection_made(transport)

        def connection_lost(self, error: Exception | None) -> None:
            self._limits.sessions.discard(self)
            super().connection_lost(error)

        async def _handle_client(self) -> None:
            if self._refused:
                log.warning("refused connection from %s: %d sessions open", _peer(self.session),
                            self._limits.max_connections)
                await self.push(R_BUSY.format(self.hostname))
                self.transport.close()
                return
            await super()._handle_client()

        def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
            # aiosmtpd parses MAIL FROM/RCPT TO addresses with the email package's header
            # parser and defines a class on every call; the same few addresses come again
            # and again (our mailboxes, a sender's next message), so the parse is kept.
            return _parsed_address(super()._getaddr, arg, self.local_part_limit)

        async def push(self, status: str | bytes) -> None:
            if isinstance(status, str):
                status = _REWRITE.get(status, status)
            await super().push(status)

        @property
        def in_transaction(self) -> bool:
            """Between MAIL and the reply to DATA (or RSET)."""
            return self.envelope is not None and self.envelope.mail_from is not None

        def close_with(self, reply: str) -> None:
            if self.transport is not None:
                self.transport.write(reply.encode("ascii") + b"\r\n")
                self.transport.close()

    return IntakeProtocol


_ADDRESSES: dict[tuple[str, int], tuple[str | None, str | None]] = {}


def _parsed_address(parse: Callable[[str], tuple[str | None, str | None]], arg: str,
                    local_part_limit: int) -> tuple[str | None, str | None]:
    """aiosmtpd's address parse (a pure function of the argument), remembered for 4,096 arguments."""
    key = (arg, local_part_limit)
    hit = _ADDRESSES.get(key)
    if hit is None:
        hit = parse(arg)
        if len(_ADDRESSES) >= 4096:
            _ADDRESSES.clear()
        _ADDRESSES[key] = hit
    return hit


IntakeSMTP = _protocol_class(SMTP)
IntakeLMTP = _protocol_class(LMTP)


# ---------------------------------------------------------------------------------------
# The service component


@dataclass
class Listener:
    """What a running listener exposes (tests, the benchmark, ``intake status``)."""

    host: str
    port: int
    handler: SmtpHandler
    committer: GroupCommit
    limits: _Limits


def smtp_component(cfg: Config, *, on_listening: Callable[[Listener], None] | None = None) -> Callable[["Host"], Any]:
    """The ``Service.add`` component that runs the listener configured in ``[smtp]``."""

    async def component(service: "Host") -> None:
        await run_listener(service, cfg, on_listening=on_listening)

    return component


async def run_listener(service: "Host", cfg: Config, *,
                       on_listening: Callable[[Listener], None] | None = None) -> None:
    """Serve SMTP/LMTP until ``service.stopping``; then stop accepting, let the transactions
    in flight finish (bounded), close idle sessions with ``421`` and commit what is queued."""
    sc = cfg.smtp
    host, port = parse_listen(sc.listen)
    max_size = parse_size(sc.max_message_size)
    hostname = sc.hostname or socket.getfqdn()
    tls = None
    if sc.tls_cert and sc.tls_key:
        try:
            tls = tls_context(str(cfg.path(sc.tls_cert)), str(cfg.path(sc.tls_key)))
        except (OSError, ssl.SSLError) as exc:
            service.fail(f"SMTP listener: cannot load smtp.tls_cert/tls_key ({cfg.path(sc.tls_cert)}): {exc}")
            return
    # aiosmtpd logs every command line at INFO; we log one line per message instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    try:  # blocking: the spool file may be created, the database's identity read or made
        spool = await loop.run_in_executor(None, service.store.spool_writer)
    except Exception as exc:  # noqa: BLE001 - a listener that cannot store must not listen
        service.fail(f"SMTP listener: cannot open its store: {type(exc).__name__}: {exc}")
        return
    committer = GroupCommit(service.store, spool, service.notify_received, on_broken=service.fail)
    handler = SmtpHandler(cfg=cfg, committer=committer, hostname=hostname, protocol=sc.protocol,
                          max_recipients=sc.max_recipients)
    limits = _Limits(sc.max_connections)
    proto_cls = IntakeLMTP if sc.protocol == "lmtp" else IntakeSMTP
    ident = "LMTP intake" if sc.protocol == "lmtp" else "ESMTP intake"

    def factory() -> SMTP:
        return proto_cls(handler, limits, line_length_limit=max_size, data_size_limit=max_size,
                         enable_SMTPUTF8=True, hostname=hostname, ident=ident, tls_context=tls)

    commit_task = asyncio.create_task(committer.run())
    status = _StatusReporter(service, sc.protocol, committer)
    try:
        server = await loop.create_server(factory, host, port)
    except OSError as exc:
        await committer.close()
        await commit_task
        await status.stopped(None)
        service.fail(f"SMTP listener cannot listen on {sc.listen}: {exc.strerror or exc}")
        return
    reporter = asyncio.create_task(status.run())
    bound = server.sockets[0].getsockname()
    listener = Listener(host=bound[0], port=bound[1], handler=handler, committer=committer, limits=limits)
    log.info("%s listening on %s:%d as %s%s", sc.protocol.upper(), bound[0], bound[1], hostname,
             " (STARTTLS)" if tls else "")
    if on_listening is not None:
        on_listening(listener)
    await service.stopping.wait()

    # Stop accepting; idle sessions go now, sessions in a transaction after it.
    server.close()
    handler.draining = True
    deadline = loop.time() + DRAIN_SECONDS
    while True:
        busy = 0
        for proto in list(limits.sessions):
            if proto.in_transaction and loop.time() < deadline:
                busy += 1
            else:
                proto.close_with(R_SHUTDOWN.format(hostname))
                limits.sessions.discard(proto)
        if not busy:
            break
        await asyncio.sleep(0.05)
    await committer.close()
    await commit_task
    await status.stopped(reporter)
    await server.wait_closed()
    log.info("%s listener stopped (%d message(s) in %d commit(s), %.1f ms from DATA to durable on average)",
             sc.protocol.upper(), committer.messages, committer.batches,
             committer.seconds / max(1, committer.messages) * 1000)
