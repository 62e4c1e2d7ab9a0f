"""IMAP pollers: mailboxes at any provider become inbound records, safely.

One ``ImapPoller`` per ``[[imap]]`` account. Its blocking IMAPClient calls run in a thread
of their own (``run``); ``intake serve`` starts one per account beside the processor
(``imap_component``) and ``intake tick`` drains each account once (``poll_accounts``).

The order of work per message is what makes it safe (DESIGN 4): fetch with
``BODY.PEEK[]`` (nothing is marked read), commit the raw bytes together with the folder
position (UIDVALIDITY, last stored UID), and only then move the message to
``processed_folder`` or set the keyword. A crash between commit and move leaves a message
whose UID is at or below the stored position: the next round moves it without storing it
again. A changed UIDVALIDITY re-scans the folder; the pipeline's Message-ID rule turns a
message seen before into a ``duplicate``, never a second case.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from intake.config import ImapConfig
from intake.config import Config
from intake.db import ImapMark, Store, StoreUnavailable

if TYPE_CHECKING:
    from intake.edges import Host

log = logging.getLogger("intake.imap")

#: Longest IDLE before it is renewed with a full check: servers may drop IDLE after 30
#: minutes (RFC 2177) and NAT boxes silently forget quiet connections.
IDLE_RENEW = 29 * 60
#: Bytes fetched in one round trip at most (a batch is also capped by ``batch_size``).
BATCH_BYTES = 32 * 1024 * 1024
#: UIDs whose sizes are asked for in one command when planning batches.
PLAN_CHUNK = 1000
#: Socket timeout of every IMAP command.
TIMEOUT = 60.0

Connect = Callable[[ImapConfig, str], IMAPClient]


class ImapAccountError(Exception):
    """An account that cannot work as configured (no password, no keywords allowed…)."""


class ConnectionLost(Exception):
    """The server said BYE or the connection went quiet for good."""


# The errors after which a new connection may help (server restart, network, timeouts).
NETWORK_ERRORS = (IMAPClientError, OSError, ConnectionLost, EOFError)


def password_for(acct: ImapConfig) -> str:
    """The account's password from the environment variable named by ``password_env``."""
    value = os.environ.get(acct.password_env, "")
    if not value:
        raise ImapAccountError(f"environment variable {acct.password_env} is not set (password of {acct.login})")
    return value


def tls_context(acct: ImapConfig) -> ssl.SSLContext:
    """Certificate and host name checked unless ``verify_tls = false``."""
    ctx = ssl.create_default_context(cafile=acct.ca_file or None)
    if not acct.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(acct: ImapConfig, password: str) -> IMAPClient:
    """Open a logged-in connection: implicit TLS, STARTTLS or plain, as configured.

    The one creation point of IMAP connections; pass another ``connect`` to
    ``ImapPoller`` to wrap or replace it.
    """
    ctx = tls_context(acct) if (acct.tls or acct.starttls) else None
    client = IMAPClient(acct.host, port=acct.port, ssl=acct.tls, ssl_context=ctx if acct.tls else None,
                        timeout=TIMEOUT)
    try:
        if acct.starttls:
            client.starttls(ctx)
        client.login(acct.login, password)
    except BaseException:
        _close(client)
        raise
    return client


def backoff(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Seconds to wait before reconnect ``attempt`` (0, 1, …): exponential, full jitter."""
    return random.uniform(base / 2, min(cap, base * 2 ** attempt))


def _close(client: IMAPClient | None) -> None:
    if client is None:
        return
    try:
        client.shutdown()
    except Exception:  # noqa: BLE001 - the connection may already be gone; closing is best effort
        pass


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, LoginError):
        return f"login failed: {text}"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return f"TLS failed: {text}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, StoreUnavailable):
        return f"database unavailable: {text}"
    if isinstance(exc, ImapAccountError):
        return text
    return f"connection lost: {text}" if isinstance(exc, NETWORK_ERRORS) else f"{type(exc).__name__}: {text}"


@dataclass
class PollResult:
    """What one drain of the folder did."""

    stored: int = 0
    finished: int = 0  # moved or flagged (stored this round or before a crash)
    failed: list[int] = field(default_factory=list)
    backlog: int = 0
    uidvalidity_changed: bool = False

    def summary(self) -> str:
        text = f"{self.stored} stored, {self.finished} moved/flagged"
        if self.failed:
            text += f", {len(self.failed)} could not be fetched (uid {', '.join(map(str, self.failed[:10]))})"
        if self.uidvalidity_changed:
            text += ", UIDVALIDITY changed: folder re-scanned"
        return text


class ImapPoller:
    """Drains one account's folder into the store; ``run`` keeps doing so until stopped."""

    def __init__(self, store: Store, acct: ImapConfig, *, connect: Connect = connect,
                 notify: Callable[[], None] = lambda: None,
                 waiting: Callable[[], ContextManager[None]] = nullcontext, backoff_cap: float = 300.0) -> None:
        self.store = store
        self._waiting = waiting  # held around a commit (serve's processor steps aside)
        self.acct = acct
        self.name = acct.account
        self.status_name = f"imap:{acct.account}"
        self._connect = connect
        self._notify = notify
        self._backoff_cap = backoff_cap
        self._client: IMAPClient | None = None
        self._uidvalidity = 0
        self._failed: dict[tuple[int, int], str] = {}  # (uidvalidity, uid) → reason, reported once
        self._said: tuple[str, str | None] | None = None  # last state logged
        self._reported_at = 0.0
        self._uidnext = 0  # UIDNEXT when the last round began (for the check before IDLE)

    # -- connection -----------------------------------------------------------------------

    def open(self) -> IMAPClient:
        """Connect, log in, check what the account needs and select the folder."""
        if self._client is not None:
            return self._client
        client = self._connect(self.acct, password_for(self.acct))
        try:
            if self.acct.processed_folder and not client.folder_exists(self.acct.processed_folder):
                client.create_folder(self.acct.processed_folder)
            info = client.select_folder(self.acct.folder)
            if not self.acct.processed_folder and b"\\*" not in tuple(info.get(b"PERMANENTFLAGS", ())):
                raise ImapAccountError(f"folder {self.acct.folder} does not keep keywords such as "
                                       f"{self.acct.keyword}: set processed_folder instead")
        except BaseException:
            _close(client)
            raise
        self._uidvalidity = int(info[b"UIDVALIDITY"])
        self._client = client
        return client

    def close(self) -> None:
        """Log out (best effort) and forget the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except Exception:  # noqa: BLE001 - already broken: just drop it
            _close(client)

    def _reconnect(self) -> IMAPClient:
        _close(self._client)
        self._client = None
        return self.open()

    # -- one drain --------------------------------------------------------------------------

    def poll_once(self, *, retry_failed: bool = True, stop: threading.Event | None = None) -> PollResult:
        """Store every waiting message of the folder, in batches; then move or flag it.

        ``retry_failed=False`` skips messages that could not be fetched before (quick
        rounds after an IDLE push); a full round tries them again.
        """
        client = self.open()
        result = PollResult()
        info = client.select_folder(self.acct.folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        self._uidnext = int(info.get(b"UIDNEXT", 0))
        mark = self.store.imap_state(self.name, self.acct.folder)
        if mark is None or mark.uidvalidity != uidvalidity:
            if mark is not None:
                result.uidvalidity_changed = True
                log.warning("imap %s: UIDVALIDITY of %s changed from %s to %s: re-scanning the folder (messages "
                            "stored before become duplicates, not new cases)", self.name, self.acct.folder,
                            mark.uidvalidity, uidvalidity)
            mark = ImapMark(self.name, self.acct.folder, uidvalidity, 0)
            self.store.set_imap_state(mark)

        criteria: list[Any] = ["UNKEYWORD", self.acct.keyword] if not self.acct.processed_folder else ["ALL"]
        uids = sorted(client.search(criteria))
        present = set(uids)  # failures of messages gone meanwhile are no longer waiting
        self._failed = {k: v for k, v in self._failed.items() if k[0] == uidvalidity and k[1] in present}
        # Stored before a crash (or before a failed move): finish them, never store again.
        stored_before = [u for u in uids if u <= mark.last_uid]
        for chunk in _chunks(stored_before, 500):
            self._finish(chunk)
            result.finished += len(chunk)
        todo = [u for u in uids if u > mark.last_uid
                and (retry_failed or (uidvalidity, u) not in self._failed)]
        self._uidvalidity = uidvalidity
        result.backlog = len(todo)
        self._report("draining" if todo else "connected", backlog=len(todo))

        first_failed: int | None = None
        for batch in self._plan(todo):
            if stop is not None and stop.is_set():
                break
            fetched, failed = self._fetch(batch)
            for uid, reason in failed:
                result.failed.append(uid)
                first_failed = uid if first_failed is None else min(first_failed, uid)
                if (uidvalidity, uid) not in self._failed:
                    log.warning("imap %s: message uid %s in %s cannot be fetched, will retry: %s", self.name, uid,
                                self.acct.folder, reason)
                    self._failed[(uidvalidity, uid)] = reason
                    self._report("draining", error=f"uid {uid} cannot be fetched: {reason}")
            if fetched:
                top = max(uid for uid, _ in fetched)
                if first_failed is not None:
                    top = min(top, first_failed - 1)  # the failed one must be fetched again
                mark = ImapMark(self.name, self.acct.folder, uidvalidity, max(mark.last_uid, top))
                with self._waiting():
                    self.store.receive_many([(raw, self._meta(uid, uidvalidity)) for uid, raw in fetched],
                                            imap_mark=mark)
                for uid, _ in fetched:
                    self._failed.pop((uidvalidity, uid), None)
                result.stored += len(fetched)
                self._notify()
                self._finish([uid for uid, _ in fetched])
                result.finished += len(fetched)
                log.info("imap %s: stored %d message(s) from %s (uid %d-%d)", self.name, len(fetched),
                         self.acct.folder, fetched[0][0], fetched[-1][0])
            result.backlog -= len(batch)
            if time.monotonic() - self._reported_at >= 1.0:  # a status write per second is enough
                self._report("draining" if result.backlog else "connected",
                             backlog=result.backlog + len(result.failed))
        result.backlog += len(result.failed)
        return result

    def _meta(self, uid: int, uidvalidity: int) -> dict[str, Any]:
        return {"channel": "email", "mailbox": self.acct.mailbox, "envelope_to": [self.acct.mailbox],
                "source": {"imap": self.name, "folder": self.acct.folder, "uid": uid, "uidvalidity": uidvalidity}}

    def _plan(self, uids: Sequence[int]) -> Iterator[list[int]]:
        """Batches of at most ``batch_size`` messages and ``BATCH_BYTES``.

        A large message, or one whose size the server cannot tell, goes alone.
        """
        for chunk in _chunks(uids, PLAN_CHUNK):
            data, _ = self._isolating(chunk, lambda c, u: c.fetch(u, ["RFC822.SIZE"]))
            batch: list[int] = []
            total = 0
            for uid in chunk:
                size = int(data[uid].get(b"RFC822.SIZE", 0)) if uid in data else BATCH_BYTES
                if batch and (len(batch) >= self.acct.batch_size or total + size > BATCH_BYTES):
                    yield batch
                    batch, total = [], 0
                batch.append(uid)
                total += size
            if batch:
                yield batch

    def _fetch(self, uids: list[int]) -> tuple[list[tuple[int, bytes]], list[tuple[int, str]]]:
        """Fetch raw messages (unread: ``BODY.PEEK[]``); ones that fail are returned apart."""
        data, failed = self._isolating(uids, lambda c, u: c.fetch(u, ["BODY.PEEK[]"]))
        fetched = []
        for uid in uids:
            raw = data.get(uid, {}).get(b"BODY[]")
            if raw is not None:
                fetched.append((uid, bytes(raw)))
            # No data and no error: expunged meanwhile by someone else; nothing to store.
        return fetched, failed

    def _isolating(self, uids: list[int], op: Callable[[IMAPClient, list[int]], dict[int, Any]]
                   ) -> tuple[dict[int, Any], list[tuple[int, str]]]:
        """Run a FETCH; when it fails, halve the set over a new connection until the bad
        message stands alone. Some servers (Dovecot among them) drop the connection when
        one message cannot be read; the rest of the folder must not wait for it."""
        client = self._client or self.open()
        try:
            return op(client, uids), []
        except NETWORK_ERRORS as exc:
            round_uidvalidity = self._uidvalidity
            self._reconnect()  # a server that is really gone raises here and ends the round
            if self._uidvalidity != round_uidvalidity:
                raise ConnectionLost("UIDVALIDITY changed during the round") from exc
            if len(uids) == 1:
                return {}, [(uids[0], _error_text(exc).removeprefix("connection lost: "))]
            half = len(uids) // 2
            a, a_failed = self._isolating(uids[:half], op)
            b, b_failed = self._isolating(uids[half:], op)
            return {**a, **b}, a_failed + b_failed

    def _finish(self, uids: list[int]) -> None:
        """After the commit: move to ``processed_folder`` or set the keyword."""
        if not uids:
            return
        client = self._client or self.open()
        if not self.acct.processed_folder:
            client.add_flags(uids, [self.acct.keyword], silent=True)
        elif client.has_capability("MOVE"):
            client.move(uids, self.acct.processed_folder)
        else:
            # COPY + \Deleted + UID EXPUNGE. A message already \Deleted was copied before a
            # crash: do not copy it twice.
            flags = client.get_flags(uids)
            fresh = [u for u in uids if b"\\Deleted" not in flags.get(u, ())]
            if fresh:
                client.copy(fresh, self.acct.processed_folder)
                client.add_flags(fresh, [b"\\Deleted"], silent=True)
            if client.has_capability("UIDPLUS"):
                client.uid_expunge(uids)
            else:
                client.expunge()

    # -- waiting for mail -------------------------------------------------------------------

    def _arrived(self) -> bool:
        """True when mail arrived since the last round began (a fresh SELECT's UIDNEXT).

        Asked right before IDLE: IDLE reports only what happens after it starts, and the
        EXISTS that servers send along with MOVE, STORE or SEARCH never reach us.
        """
        client = self._client or self.open()
        info = client.select_folder(self.acct.folder)
        uidnext = info.get(b"UIDNEXT")
        log.debug("imap %s: before IDLE, UIDNEXT %s (round began at %s)", self.name, uidnext, self._uidnext)
        return uidnext is not None and (int(uidnext), int(info[b"UIDVALIDITY"])) != (self._uidnext, self._uidvalidity)

    def _wait_idle(self, stop: threading.Event, until: float) -> bool:
        """IDLE until new mail (True), ``until`` or stop (False)."""
        client = self._client or self.open()
        client.idle()
        try:
            # Mail that arrived just before IDLE is announced together with "+ idling";
            # imaplib has then already read it into its buffer, where idle_check(), which
            # waits on the socket, never looks.
            if _buffered(client):
                return True
            self._report("idle", success=True, backlog=len(self._failed))
            while not stop.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    return False
                wait = min(1.0, left)
                started = time.monotonic()
                responses = client.idle_check(timeout=wait)
                if _new_mail(responses):
                    return True
                if not responses and time.monotonic() - started < wait / 2:
                    # imapclient returns early and empty when the server closed the socket.
                    raise ConnectionLost("server closed the connection")
            return False
        finally:
            if self._client is not None:
                client.idle_done()

    def run(self, stop: threading.Event) -> None:
        """Poll (IDLE where offered) until ``stop`` is set; reconnect with backoff on failure."""
        attempt = 0
        while not stop.is_set():
            try:
                self.open()
                if attempt:
                    log.info("imap %s: connected again", self.name)
                attempt = 0
                self._serve(stop)
            except ImapAccountError as exc:
                self._fail(exc, attempt)
            except (*NETWORK_ERRORS, StoreUnavailable) as exc:
                self._fail(exc, attempt)
            except Exception as exc:  # noqa: BLE001 - a bug must not end the poller for good
                log.exception("imap %s: unexpected error", self.name)
                self._fail(exc, attempt)
            finally:
                _close(self._client)
                self._client = None
            if stop.is_set():
                break
            stop.wait(backoff(attempt, cap=self._backoff_cap))
            attempt += 1
        self._report("stopped")

    def _serve(self, stop: threading.Event) -> None:
        client = self._client or self.open()
        use_idle = self.acct.idle and client.has_capability("IDLE")
        every = min(float(self.acct.poll_interval), IDLE_RENEW) if use_idle else float(self.acct.poll_interval)
        next_full = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_full:
                result = self.poll_once(retry_failed=True, stop=stop)
                next_full = time.monotonic() + every
            else:
                result = self.poll_once(retry_failed=False, stop=stop)
            if result.backlog > len(result.failed):
                continue  # stopped mid-drain, or mail arrived meanwhile: next round at once
            self._said_ok()
            if use_idle:
                # IDLE reports only what arrives after it starts: ask once more before it.
                if self._arrived() or not self._wait_idle(stop, next_full):
                    continue
            else:
                self._report("waiting", success=True, backlog=len(result.failed))
                stop.wait(max(0.0, next_full - time.monotonic()))

    # -- status and logs --------------------------------------------------------------------

    def _said_ok(self) -> None:
        if self._said != ("ok", None):
            log.info("imap %s: %s %s on %s:%s is up to date", self.name, self.acct.login, self.acct.folder,
                     self.acct.host, self.acct.port)
            self._said = ("ok", None)

    def _fail(self, exc: BaseException, attempt: int) -> None:
        text = _error_text(exc)
        if self._said != ("error", text):  # once per state change, not once per retry
            log.error("imap %s: %s (retrying with backoff)", self.name, text)
            self._said = ("error", text)
        self._report("error", error=text)

    def _report(self, state: str, *, backlog: int | None = None, error: str | None = None,
                success: bool = False) -> None:
        self._reported_at = time.monotonic()
        try:
            self.store.report_status(self.status_name, state, backlog=backlog, error=error, success=success)
        except StoreUnavailable:
            log.debug("imap %s: status not recorded (database busy)", self.name)


def _buffered(client: IMAPClient) -> bool:
    """True when server data already sits in imaplib's read buffer (see ``_wait_idle``)."""
    peek = getattr(getattr(getattr(client, "_imap", None), "file", None), "peek", None)
    if peek is None:
        return False
    sock = client.socket()
    timeout = sock.gettimeout()
    sock.setblocking(False)  # peek must not wait for the network
    try:
        return bool(peek(1))
    except OSError:  # nothing buffered and nothing on the socket (SSL says so by raising)
        return False
    finally:
        sock.settimeout(timeout)


def _new_mail(responses: list[Any]) -> bool:
    """New messages announced (EXISTS/RECENT); BYE means the server is going away."""
    for resp in responses:
        if len(resp) > 1 and resp[1] in (b"EXISTS", b"RECENT"):
            return True
        if resp and resp[0] == b"BYE":
            raise ConnectionLost(f"server said BYE: {resp[1] if len(resp) > 1 else ''!r}")
    return False


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield list(items[i:i + size])


# ---------------------------------------------------------------------------------------
# Wiring: `serve` components and the `tick` job

_serving: set[str] = set()  # accounts a running poller of this process looks after
_serving_lock = threading.Lock()


def imap_component(acct: ImapConfig, *, connect: Connect = connect) -> Callable[["Host"], Awaitable[None]]:
    """A ``Service`` component running one account's poller in its own thread."""

    async def component(service: "Host") -> None:
        loop = asyncio.get_running_loop()
        poller = ImapPoller(service.store, acct, connect=connect,
                            notify=lambda: loop.call_soon_threadsafe(service.notify_received),
                            waiting=service.edge_waiting)
        stop = threading.Event()
        with _serving_lock:
            _serving.add(acct.account)
        thread = threading.Thread(target=poller.run, args=(stop,), name=f"imap-{acct.account}", daemon=True)
        thread.start()
        try:
            await service.stopping.wait()
        finally:
            stop.set()
            while thread.is_alive():  # it ends after the batch in flight
                await asyncio.sleep(0.05)
            with _serving_lock:
                _serving.discard(acct.account)

    return component


def poll_accounts(cfg: Config, store: Store, now: Any = None) -> str:
    """The scheduler's ``imap-poll`` job: drain every account no poller of ours serves."""
    with _serving_lock:
        todo = [a for a in cfg.imap if a.account not in _serving]
    if not todo:
        return "no IMAP account to poll" if not cfg.imap else "every account is served by a running poller"
    parts, errors = [], []
    for acct in todo:
        poller = ImapPoller(store, acct)
        try:
            result = poller.poll_once()
            poller._report("polled", success=True, backlog=result.backlog)
            parts.append(f"{acct.account}: {result.summary()}")
        except (ImapAccountError, StoreUnavailable, *NETWORK_ERRORS) as exc:
            text = _error_text(exc)
            poller._report("error", error=text)
            errors.append(f"{acct.account}: {text}")
        finally:
            poller.close()
    if errors:
        raise RuntimeError("; ".join(errors + parts))
    return "; ".join(parts)
