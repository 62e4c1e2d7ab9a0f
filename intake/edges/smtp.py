"""The SMTP (or LMTP) listener of ``intake serve``: an aiosmtpd server in the service's loop.

Refuse early, accept late: RCPT refuses anything that is not one of our mailboxes or
their plus-addresses (``550 5.1.1``; intake is never a relay); DATA is answered ``250``
only after the raw bytes and envelope are committed, ``451 4.3.0`` when they cannot be.
Concurrent deliveries share one commit (:class:`GroupCommit`) whose waiting (an fsync,
or a PostgreSQL round trip) runs in a thread, so that the loop keeps talking to every
other client meanwhile.

What one client can hold is limited (``[smtp]``, docs/smtp.md "Limits"): the memory of a
command line, its connections (in all and per address), the time of a session and the
pauses within it. Every refusal is counted by reason for ``intake status``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ipaddress
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from intake.config import Config, SmtpConfig, parse_duration, parse_size
from intake.db import Store, StoreBusy, StoreUnavailable, utcnow
from intake.db.base import db_text
from intake.logs import escaped as printable

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
R_BUSY_IP = "421 4.7.0 {} Too many connections from your address, please retry later"
R_NOT_LMTP_CLIENT = "554 5.7.1 {} LMTP is for this site's own mail servers only"
R_TOO_BIG = "552 5.3.4 Message too big for this system"
R_LINE_TOO_LONG = "500 5.5.2 line too long"
R_TIMEOUT = "421 4.4.2 {} Timeout exceeded, closing connection"
R_SESSION_TIME = "421 4.4.2 {} Session time limit exceeded, closing connection"
# A path over RFC 5321's 256 octets (4.5.3.1.3) is a syntax error of the command's
# argument, which 4.5.3.1.9 answers "501 Path too long": 501, not 553 (a mailbox name
# refused by policy), since no retry or policy can make it acceptable. The enhanced code
# says whose address it is (RFC 3463): X.1.7 the sender's, X.1.3 the recipient's.
R_SENDER_TOO_LONG = "501 5.1.7 Path too long (RFC 5321 allows 256 octets)"
R_RCPT_TOO_LONG = "501 5.1.3 Path too long (RFC 5321 allows 256 octets)"
# A control character (NUL, CR, TAB …) never becomes valid on a retry: permanent, at once.
R_SENDER_CONTROL = "501 5.1.7 Bad sender address syntax: control character"
R_RCPT_CONTROL = "501 5.1.3 Bad recipient address syntax: control character"
R_HELO_CONTROL = "501 5.5.2 Syntax error: control character in the host name"

# aiosmtpd's own fixed replies: what we answer instead (with enhanced codes), and the
# reason counted for ``intake status``. In DATA the line limit is the message size
# limit, so a line over it is a message over it.
_AIOSMTPD: dict[str, tuple[str, str]] = {
    "500 Command line too long": (R_LINE_TOO_LONG, "line too long"),
    "552 Error: message size exceeds fixed maximum message size": (R_TOO_BIG, "too big"),
    "552 Error: Too much mail data": (R_TOO_BIG, "too big"),
    "500 Line too long (see RFC5321 4.5.3.1.6)": (R_TOO_BIG, "too big"),
    "553 5.1.3 Error: malformed address": ("553 5.1.3 Error: malformed address", "malformed address"),
    "500 Error: bad syntax": ("500 5.5.2 Error: bad syntax", "bad syntax"),
    "502 5.5.1 Too many unrecognized commands, goodbye.":
        ("502 5.5.1 Too many unrecognized commands, goodbye.", "unrecognized commands"),
}
_UNRECOGNIZED = '500 Error: command "'  # aiosmtpd's reply to an unknown command starts so …
R_UNRECOGNIZED = "500 5.5.1 Command unrecognized"  # … and echoes the client's bytes: not ours

MAX_PATH = 256  # octets, with the angle brackets (RFC 5321 4.5.3.1.3)
# Control characters (C0, DEL, C1): never valid in a host name or an address.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What is escaped in log lines: control characters, line separators, and the lone
# surrogates that stand for undecodable bytes of a command (aiosmtpd's surrogateescape).
def _octets(address: str) -> int:
    return len(address.encode("utf-8", "surrogateescape"))


class _EscapeControl(logging.Filter):
    """aiosmtpd logs command words as the client sent them (``unrecognised: …``): escaped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        escaped = printable(text)
        if escaped is not text:
            record.msg, record.args = escaped, None
        return True


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
    their senders), except that on PostgreSQL a commit that failed on what a message
    holds (not on an unusable database) is tried again message by message, so that one
    bad delivery fails alone. (The spool takes any text SQLite takes; the listener
    cleans what it writes, so no message can fail a spool commit by its content.)
    A failed sync also breaks the spool for good (after a failed fsync the
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
                    if len(batch) > 1 and not self._store.is_unavailable(exc):
                        await self._one_by_one(loop, batch, exc)
                    else:
                        self._fail(batch, exc)
                else:
                    self._done(self._split(batch, ids))
                self._check_idle()
        finally:
            self._executor.shutdown(wait=False)
            if self._spool is not None:
                self._spool.close()

    async def _one_by_one(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], exc: Exception) -> None:
        """A batch failed on what one of its messages holds (not an unusable database):
        each delivery is committed on its own, so that only the bad one fails."""
        log.warning("commit of %d deliveries failed (%s): committing them one by one", len(batch),
                    printable(f"{type(exc).__name__}: {exc}"))
        for p in batch:
            try:
                ids = await loop.run_in_executor(self._executor, self._store.receive_many, p.items)
            except Exception as one:  # noqa: BLE001 - this delivery alone is answered 451
                self._fail([p], one)
            else:
                self._done([(p, ids)])

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
        self.last_error = printable(f"{type(exc).__name__}: {exc}")
        log.error("commit of %d message(s) failed: %s", sum(len(p.items) for p in batch), self.last_error)
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


class Refusals:
    """What one listener refused since it started, by reason (``intake status``); one log
    line per refusal."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.total = 0

    def add(self, reason: str, peer: str, detail: str = "") -> None:
        """Count and log one refusal; ``detail`` (an address, a command) is escaped."""
        self.counts[reason] += 1
        self.total += 1
        log.info("refused (%s) from %s%s", reason, peer, f": {printable(detail)}" if detail else "")


@dataclass
class SmtpHandler:
    """Decides HELO, MAIL and RCPT and stores DATA; every failure becomes a temporary ``451``."""

    cfg: Config
    committer: GroupCommit
    hostname: str
    protocol: str = "smtp"
    max_recipients: int = 100
    draining: bool = False
    refusals: Refusals = field(default_factory=Refusals)

    def __post_init__(self) -> None:
        # RFC 5321 4.5.1: "postmaster" without a domain is accepted; it is the first mailbox's domain's.
        self._postmaster = "postmaster@" + self.cfg.mailbox[0].address.rpartition("@")[2].lower()

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        if _CONTROL.search(hostname):
            self.refusals.add("control character", _peer(session), f"HELO {hostname}")
            return R_HELO_CONTROL
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        # Also LMTP's LHLO. A CR in the name would end a line of our Received: header.
        if _CONTROL.search(hostname):
            self.refusals.add("control character", _peer(session), f"EHLO {hostname}")
            return [R_HELO_CONTROL]
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.draining:
            _close_soon(server)
            return R_SHUTDOWN.format(self.hostname)
        if _CONTROL.search(address):
            self.refusals.add("control character", _peer(session), f"MAIL FROM:<{address}>")
            return R_SENDER_CONTROL
        if _octets(address) + 2 > MAX_PATH:
            self.refusals.add("path too long", _peer(session), f"MAIL FROM: {_octets(address)} octets")
            return R_SENDER_TOO_LONG
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if _CONTROL.search(address):
            self.refusals.add("control character", _peer(session), f"RCPT TO:<{address}>")
            return R_RCPT_CONTROL
        if _octets(address) + 2 > MAX_PATH:
            self.refusals.add("path too long", _peer(session), f"RCPT TO: {_octets(address)} octets")
            return R_RCPT_TOO_LONG
        if address.lower() == "postmaster":
            address = self._postmaster
        if self.cfg.mailbox_for(address) is None or address.count("@") != 1:
            self.refusals.add("unknown recipient", _peer(session), f"<{address}>")
            return R_UNKNOWN_RCPT.format(address)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            self.refusals.add("too many recipients", _peer(session))
            return R_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return R_OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # The message is in: the time from here to the reply is ours, not the client's.
        server.committing = True  # type: ignore[attr-defined]
        try:
            items = self._records(session, envelope)
            ids = await self.committer.commit(items)
        except Exception as exc:  # noqa: BLE001 - never a 500 with a Python exception text
            self.refusals.add("not stored (451)", _peer(session))
            log.error("not stored (451) from=<%s> to=%s: %s", printable(envelope.mail_from),
                      printable(",".join(envelope.rcpt_tos)), printable(f"{type(exc).__name__}: {exc}"))
            return self._per_recipient(envelope, R_TEMPFAIL)
        finally:
            server.committing = False  # type: ignore[attr-defined]
        message_id = _message_id(envelope.original_content or b"")
        refs = self.committer.refs(ids)
        log.info("received %s from=<%s> to=%s size=%d message_id=%s", refs, printable(envelope.mail_from),
                 printable(",".join(envelope.rcpt_tos)), len(envelope.original_content or b""), printable(message_id))
        return self._per_recipient(envelope, R_QUEUED.format(refs))

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %s", printable(f"{type(error).__name__}: {error}"))
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
            # An 8-bit HELO name or address (kept as lone surrogates) or a NUL is not storable text.
            source = {"protocol": self.protocol, "peer": peer, "helo": db_text(session.host_name), "tls": tls}
            items.append((raw, dict(channel="email", mailbox=mailbox, envelope_from=db_text(envelope.mail_from),
                                    envelope_to=[db_text(r) for r in rcpts], source=source)))
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
    last failed commit and its refusals by reason (``details["refused"]``, since serve
    started); written on change (at most once a second), else every 30 s, off the loop."""

    def __init__(self, service: "Host", name: str, committer: GroupCommit, refusals: Refusals) -> None:
        self._service, self._name, self._committer, self._refusals = service, name, committer, refusals
        self._lock = threading.Lock()  # a write still in its thread must not follow "stopped"
        self._stopped = False

    async def run(self) -> None:
        """Report until cancelled."""
        loop = asyncio.get_running_loop()
        c = self._committer
        reported: tuple[str, int, str | None, int] | None = None
        reported_at = 0.0
        while True:
            now = ("refusing (451)" if c.broken else "listening", c.messages, c.last_error, self._refusals.total)
            if now != reported or time.monotonic() - reported_at >= 30:
                state, messages, error, _ = now
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
            details = {"refused": dict(self._refusals.counts)}
            try:
                self._service.store.report_status(self._name, state, error=error, success=success,
                                                  details=details)
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
    """Shared by every session of one listener: what a client may hold (``[smtp]``), the
    sessions open (in all and per client address) and the refusals."""

    def __init__(self, sc: SmtpConfig, refusals: Refusals) -> None:
        self.max_connections = sc.max_connections
        self.max_per_ip = sc.max_connections_per_ip
        self.command_line = parse_size(sc.max_command_line)
        self.message_size = parse_size(sc.max_message_size)
        self.session_time = parse_duration(sc.max_session_time)
        self.command_timeout = parse_duration(sc.command_timeout)
        self.data_timeout = parse_duration(sc.data_timeout)
        self.refusals = refusals
        self.sessions: dict[SMTP, str] = {}  # each open session → its client's address
        self._per_ip: collections.Counter[str] = collections.Counter()
        self.lmtp_clients = [ipaddress.ip_network(n, strict=False) for n in sc.lmtp_clients] \
            if sc.protocol == "lmtp" else None

    def admit(self, proto: SMTP, ip: str) -> str | None:
        """Count a new session; why it must be refused, if it must (it counts until it is closed)."""
        reason = None
        if self.lmtp_clients is not None and not _in_networks(ip, self.lmtp_clients):
            reason = "not an LMTP client"
        elif self._per_ip[ip] >= self.max_per_ip:
            reason = "per-IP limit"
        elif len(self.sessions) >= self.max_connections:
            reason = "connection limit"
        self.sessions[proto] = ip
        self._per_ip[ip] += 1
        return reason

    def release(self, proto: SMTP) -> None:
        """A session is gone (once per session; later calls do nothing)."""
        ip = self.sessions.pop(proto, None)
        if ip is not None:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]


def _in_networks(ip: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # an IPv6 zone index is not part of it
    except ValueError:
        return False  # a Unix socket or an unreadable peer: not a listed client
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def _protocol_class(base: type[SMTP]) -> type[SMTP]:
    class IntakeProtocol(base):  # type: ignore[misc, valid-type]
        """aiosmtpd's protocol held to our limits (command line, connections, session time,
        idle time), with enhanced codes for aiosmtpd's own replies, counted by reason."""

        def __init__(self, handler: SmtpHandler, limits: _Limits, **kw: Any) -> None:
            # aiosmtpd sizes its line reader from line_length_limit in __init__. Commands are
            # read with the command line limit, so a line that never ends holds at most about
            # twice that in memory (aiosmtpd drops the rest of it, then answers 500); DATA
            # raises the limit to the message size (smtp_DATA below).
            self.line_length_limit = limits.command_line - 1  # the reader's limit excludes the LF
            self._limits = limits
            self._refused: str | None = None
            self._in_data = False
            self._last_data = 0.0  # when the last bytes of a message arrived
            self._data_done = 0.0  # when the last message was answered
            self._session_timer: asyncio.TimerHandle | None = None
            self.committing = False  # set by the handler while it commits this session's message
            super().__init__(handler, timeout=limits.command_timeout, **kw)
            # aiosmtpd keeps its per-command size limits in a dict of its class that every
            # session shares and each EHLO adds to: each session gets its own, at our limit.
            # Counted like RFC 5321's 512: the whole line with its CRLF.
            self.command_size_limit = limits.command_line - 2
            self.command_size_limits = collections.defaultdict(lambda: limits.command_line - 2)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if self not in self._limits.sessions:  # not the STARTTLS re-entry
                peer = transport.get_extra_info("peername")
                self._refused = self._limits.admit(self, peer[0] if isinstance(peer, tuple) else str(peer))
                if self._refused is None:
                    self._session_timer = self.loop.call_later(self._limits.session_time, self._session_expired)
            super().connection_made(transport)

        def connection_lost(self, error: Exception | None) -> None:
            self._limits.release(self)
            if self._session_timer is not None:
                self._session_timer.cancel()
            super().connection_lost(error)

        def data_received(self, data: bytes) -> None:
            if self._in_data:  # the DATA timer looks at this when it fires (no timer per chunk)
                self._last_data = self.loop.time()
            super().data_received(data)

        async def _handle_client(self) -> None:
            if self._refused:
                self._limits.refusals.add(self._refused, _peer(self.session))
                reply = {"per-IP limit": R_BUSY_IP, "not an LMTP client": R_NOT_LMTP_CLIENT}.get(self._refused, R_BUSY)
                await self.push(reply.format(self.hostname))
                self.transport.close()
                return
            await super()._handle_client()

        async def smtp_DATA(self, arg: str) -> None:
            # A message's lines may be as long as the message may be large (real mail has
            # lines far over RFC 5321's 1000 octets); the idle timer counts from the last
            # bytes received, not from the DATA command as aiosmtpd's does. The times are
            # only noted here; _timeout_cb looks at them when aiosmtpd's one timer fires
            # (re-arming a timer twice a message cost ~3 % of the listener's CPU).
            self._line_limit(self._limits.message_size)
            self._in_data, self._last_data = True, self.loop.time()
            if self._limits.data_timeout < self._limits.command_timeout:
                self._reset_timeout(self._limits.data_timeout)
            try:
                await super().smtp_DATA(arg)
            finally:
                self._in_data = False
                self._line_limit(self._limits.command_line - 1)
                self._data_done = self.loop.time()

        def _line_limit(self, limit: int) -> None:
            # asyncio's StreamReader has no public way to change its limit; aiosmtpd reads
            # line_length_limit for its own check of DATA lines.
            self.line_length_limit = self._reader._limit = limit

        def _timeout_cb(self) -> None:
            # aiosmtpd's timer, re-armed at every command: it has run out since the last one.
            # aiosmtpd would close without a word: we say why (421 4.4.2).
            if self.transport is None:
                return
            if self.committing:  # waiting for our own commit is not the client's pause
                self._reset_timeout()
                return
            if self._in_data:  # counted from the last bytes of the message
                limit, since, reason = self._limits.data_timeout, self._last_data, "data timeout"
            else:  # counted from the last command, or the reply to the last message
                limit, since, reason = self._limits.command_timeout, self._data_done, "idle timeout"
            idle = self.loop.time() - since
            if idle < limit:
                self._reset_timeout(limit - idle)
                return
            self._limits.refusals.add(reason, _peer(self.session))
            self.close_with(R_TIMEOUT.format(self.hostname))

        def _session_expired(self) -> None:
            if self.transport is None:
                return
            if self.committing:  # the message in hand is answered first
                self._session_timer = self.loop.call_later(1.0, self._session_expired)
                return
            self._limits.refusals.add("session time", _peer(self.session))
            self.close_with(R_SESSION_TIME.format(self.hostname))

        def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
            # aiosmtpd parses MAIL FROM/RCPT TO addresses with the email package's header
            # parser and defines a class on every call; the same few addresses come again
            # and again (our mailboxes, a sender's next message), so the parse is kept.
            return _parsed_address(super()._getaddr, arg, self.local_part_limit)

        async def push(self, status: str | bytes) -> None:
            if isinstance(status, str) and status[:1] in ("4", "5"):
                hit = _AIOSMTPD.get(status)
                if hit is not None:
                    status, reason = hit
                    self._limits.refusals.add(reason, _peer(self.session))
                elif status.startswith(_UNRECOGNIZED):
                    self._limits.refusals.add("unrecognized command", _peer(self.session),
                                              status[len(_UNRECOGNIZED):].rpartition('"')[0])
                    status = R_UNRECOGNIZED
            await super().push(status)

        @property
        def in_transaction(self) -> bool:
            """Between MAIL and the reply to DATA (or RSET)."""
            return self.envelope is not None and self.envelope.mail_from is not None

        def close_with(self, reply: str) -> None:
            """Send ``reply`` and close the connection (from outside the session's own task)."""
            if self.transport is not None:
                self.transport.write(reply.encode("ascii") + b"\r\n")
                self.transport.close()

    return IntakeProtocol


_ADDRESSES: dict[tuple[str, int], tuple[str | None, str | None]] = {}


def _parsed_address(parse: Callable[[str], tuple[str | None, str | None]], arg: str,
                    local_part_limit: int) -> tuple[str | None, str | None]:
    """aiosmtpd's address parse (a pure function of the argument), remembered for 4,096
    arguments of up to 512 characters (longer ones are rare and would make it large)."""
    if len(arg) > 512:
        return parse(arg)
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


def _return_big_buffers() -> None:
    """Have glibc give the memory of a freed message back to the system at once.

    glibc serves allocations over a threshold (128 KiB) with their own mapping, returned on
    free, but raises that threshold to the size of each such block freed (up to 32 MiB):
    after a few large messages their buffers come from the heap, whose freed parts stay
    with the process. Measured: six rounds of ten concurrent 4 MB messages left serve
    75–93 MB larger and still growing; with the threshold fixed, 28–43 MB, level after the
    third round. It is fixed at 1 MiB, above asyncio's 256 KiB read buffer (one per read:
    at 128 KiB each read was a mapping of its own, +10 % CPU per message), with the trim
    threshold where glibc's own adjustment would put it. Elsewhere (not glibc), nothing is
    changed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD; setting it ends the dynamic adjustment
        libc.mallopt(-1, 2 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


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
    hostname = cfg.smtp_hostname
    tls = None
    if sc.tls_cert and sc.tls_key:
        try:
            tls = tls_context(str(cfg.path(sc.tls_cert)), str(cfg.path(sc.tls_key)))
        except (OSError, ssl.SSLError) as exc:
            service.fail(f"SMTP listener: cannot load smtp.tls_cert/tls_key ({cfg.path(sc.tls_cert)}): {exc}")
            return
    # aiosmtpd logs every command line at INFO and each refusal at WARNING; we log one line
    # per message and per refusal instead. What it still logs is escaped.
    _return_big_buffers()
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.ERROR)
    if not any(isinstance(f, _EscapeControl) for f in mail_log.filters):
        mail_log.addFilter(_EscapeControl())
    loop = asyncio.get_running_loop()
    try:  # blocking: the spool file may be created, the database's identity read or made
        spool = await loop.run_in_executor(None, service.store.spool_writer)
    except Exception as exc:  # noqa: BLE001 - a listener that cannot store must not listen
        service.fail(f"SMTP listener: cannot open its store: {type(exc).__name__}: {exc}")
        return
    committer = GroupCommit(service.store, spool, service.notify_received, on_broken=service.fail)
    refusals = Refusals()
    handler = SmtpHandler(cfg=cfg, committer=committer, hostname=hostname, protocol=sc.protocol,
                          max_recipients=sc.max_recipients, refusals=refusals)
    limits = _Limits(sc, refusals)
    proto_cls = IntakeLMTP if sc.protocol == "lmtp" else IntakeSMTP
    ident = "LMTP intake" if sc.protocol == "lmtp" else "ESMTP intake"

    def factory() -> SMTP:
        return proto_cls(handler, limits, data_size_limit=limits.message_size, enable_SMTPUTF8=True,
                         hostname=hostname, ident=ident, tls_context=tls)

    commit_task = asyncio.create_task(committer.run())
    status = _StatusReporter(service, sc.protocol, committer, refusals)
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
                limits.release(proto)
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
