"""Delivery of the outbox: ``maildir`` (one ``.eml`` file per mail) or ``smtp`` (a relay).

Rows are claimed (committed as ``sending`` with their holder) before anything is sent, and
each result is committed within 10 ms of the relay's answer, by a bookkeeping thread that also
renews the pass's claims (a heartbeat). A process that dies leaves its rows ``sending``;
once their claim has not been renewed for ``[outbound] claim_expiry``, the next pass of any
process puts them back to ``queued``, once per row; a row interrupted a second time is
failed for an operator, as it may be the mail that stops the sender (``docs/outbox.md``:
what this guarantees, and the one window where a mail can go out twice).

Temporary failures (4xx, a relay that is down or slow) are retried with exponential
backoff and jitter until ``give_up_after``; a 5xx is final: the row is ``failed`` with the
relay's reply on the case timeline, and a refused recipient gets no automated mail for
``[notify] suppress_after_failure``.

The MIME bytes are built here, not at enqueue time: UTF-8 with a 7-bit transfer encoding
(base64 / quoted-printable), or 8-bit when the relay announces 8BITMIME.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from intake.cases import OUTBOX, CaseEnv, CaseOps
from intake.config import Config, parse_duration
from intake.db import Store, utcnow
from intake.db.outbox import OutboxMail
from intake.states import OutboxState

log = logging.getLogger("intake.outbox")


@dataclass(frozen=True)
class OutboxOutcome:
    """The result of one delivery attempt, recorded by :func:`finish`.

    ``state`` is ``sent``, ``queued`` (temporary failure: retry at ``next_attempt_at``)
    or ``failed``; ``refused`` maps recipients the relay refused permanently to its reply.
    """

    id: int
    state: str
    at: datetime
    error: str | None = None
    next_attempt_at: datetime | None = None
    permanent: bool = False
    refused: dict[str, str] | None = None
    suppress_until: datetime | None = None


def claim(store: Store, now: datetime, limit: int, holder: str | None = None) -> list[OutboxMail]:
    """Claim up to ``limit`` due rows for ``holder`` (state ``sending``), oldest first.

    The claim is committed before anything is sent: a row is sent by one process only. If
    the holder dies, the claim expires and the row is queued again once (see
    :func:`requeue_interrupted`); while the holder lives, it renews its claims.
    """
    with store.transaction() as tx:
        return tx.outbox.claim(now, limit, holder)


def finish(cfg: Config, store: Store, outcomes: list[OutboxOutcome], holder: str | None = None) -> None:
    """Record delivery results in one transaction; failures go on the case timeline.

    With ``holder``, only rows that ``holder`` still claims are recorded (a result for a
    row whose claim expired and that another process took belongs to that process), except
    that a mail the relay took counts as sent while its row waits, put back, for a claim."""
    if not outcomes:
        return
    with store.transaction() as tx:
        if holder is not None:
            outcomes = [o for o in outcomes if _holds(tx.outbox.claim_of(o.id), holder, o.state)]
        rows = tx.outbox.by_ids([o.id for o in outcomes])
        ops = CaseOps(tx, CaseEnv(cfg), utcnow())
        for o in outcomes:
            row = rows.get(o.id)
            if row is None or (holder is None and row.state != OutboxState.SENDING):
                continue
            attempts = row.attempts + 1
            if o.state == OutboxState.SENT:
                tx.outbox.mark_sent(row.id, o.at, attempts, o.error)
                if row.message_row_id:
                    ops.mail_sent(row.message_row_id, o.at)
            elif o.state == OutboxState.QUEUED:
                tx.outbox.mark_retry(row.id, o.at, attempts, o.next_attempt_at or o.at, o.error or "")
            else:
                tx.outbox.mark_failed(row.id, o.at, o.error or "", attempts=attempts, permanent=o.permanent)
                if row.case_id is not None:
                    ops.record_mail_failure(row.case_id, message_id=row.message_id, to=row.recipient,
                                            template=row.template, reply=o.error, permanent=o.permanent)
                if o.permanent and o.suppress_until:
                    for addr in row.recipients or [row.recipient]:
                        tx.outbox.suppress(addr, o.suppress_until, f"outbox #{row.id}: {o.error}", o.at)
            for addr, reply in (o.refused or {}).items():
                if row.case_id is not None:
                    ops.record_mail_failure(row.case_id, message_id=row.message_id, to=addr, template=row.template,
                                            reply=reply, permanent=True)
                if o.suppress_until:
                    tx.outbox.suppress(addr, o.suppress_until, f"outbox #{row.id}: {reply}", o.at)


def _holds(claim: tuple[str, str | None] | None, holder: str, result: str) -> bool:
    """Whether ``holder`` may record ``result`` for a row whose (state, holder) is ``claim``."""
    if claim is None or claim[1] != holder:
        return False
    # Put back after the claim expired, not claimed since: the relay's 250 still counts.
    return claim[0] == OutboxState.SENDING or (claim[0] == OutboxState.QUEUED and result == OutboxState.SENT)


#: How many times an interrupted delivery is queued again by itself.
REQUEUE_AT_MOST = 1


def requeue_interrupted(cfg: Config, store: Store, claimed_before: datetime) -> tuple[list[int], list[int]]:
    """Rows whose claim was last renewed before ``claimed_before``: their sending process
    stopped (a live one renews its claims). Each goes back to ``queued`` once; a row
    interrupted again is failed, since it may be the mail that stops the sender.
    Returns (ids queued again, ids failed).

    Whether the relay took an interrupted mail is unknown, though a result is committed
    within 10 ms of the relay's answer: only a mail answered in that window can reach its
    recipient twice, with the same Message-ID.
    """
    with store.transaction() as tx:
        rows = tx.outbox.expired(claimed_before)
        now = utcnow()
        ops = CaseOps(tx, CaseEnv(cfg), now)
        again: list[int] = []
        failed: list[int] = []
        for row, holder in rows:
            who = holder or "a process of an older intake"
            if row.requeued < REQUEUE_AT_MOST:
                note = f"delivery interrupted ({who} stopped while sending it); queued again automatically"
                tx.outbox.requeue_interrupted(row.id, now, note)
                case = tx.cases.by_id(row.case_id) if row.case_id is not None else None
                if case is not None:
                    ops.remark(case, f"outbox #{row.id}: {note}", actor=OUTBOX, message_id=row.message_id)
                again.append(row.id)
                log.warning("outbox requeued #%d case=%s to=%s message_id=<%s>: claim of %s expired", row.id,
                            row.case or "-", row.recipient, row.message_id, who)
            else:
                error = (f"delivery interrupted again ({who} stopped while sending it, after it had been queued "
                         f"again once): not sent automatically any more, as this mail may be what stops the "
                         f"sender; see the log of that process, then `intake outbox retry {row.id}`")
                tx.outbox.mark_failed(row.id, now, error)
                if row.case_id is not None:
                    ops.record_mail_failure(row.case_id, message_id=row.message_id, to=row.recipient,
                                            template=row.template, reply=error, permanent=False)
                failed.append(row.id)
                log.error("outbox failed #%d case=%s to=%s message_id=<%s>: interrupted twice (last by %s)",
                          row.id, row.case or "-", row.recipient, row.message_id, who)
        return again, failed


def retry(cfg: Config, store: Store, outbox_id: int, now: datetime) -> str | None:
    """Queue a failed (or still queued) row for delivery now; why not, or None."""
    give_up_after = timedelta(seconds=parse_duration(cfg.outbound.give_up_after))
    with store.transaction() as tx:
        row = tx.outbox.get(outbox_id)
        if row is None:
            return "no such outbox row"
        if row.state in (OutboxState.SENT, OutboxState.BOUNCED):
            return f"already {row.state} at {row.sent_at.isoformat() if row.sent_at else '?'}; a mail is never sent twice"
        if row.state == OutboxState.SENDING:
            return ("being sent right now (if its process stopped, it is queued again by itself once its claim "
                    "expires: [outbound] claim_expiry)")
        tx.outbox.requeue(row.id, now, now + give_up_after)
        case = tx.cases.by_id(row.case_id) if row.case_id is not None else None
        if case is not None:
            CaseOps(tx, CaseEnv(cfg), now).remark(case, f"outbox #{row.id} queued again by an operator", actor="cli",
                                                  message_id=row.message_id)
        return None

class _HeaderClasses(HeaderRegistry):
    """The stdlib registry builds a new header class on every lookup; this keeps them (2x faster MIME)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._made.get(key)
        if cls is None:
            cls = self._made[key] = super().__getitem__(name)
        return cls


_REGISTRY = _HeaderClasses()
_POLICIES = {
    (eight, sep): policy.default.clone(cte_type="8bit" if eight else "7bit", linesep=sep, header_factory=_REGISTRY)
    for eight in (True, False) for sep in ("\n", "\r\n")
}


def build_mime(item: OutboxMail, *, eight_bit: bool = False, linesep: str = "\r\n",
               files: Mapping[str, bytes] | None = None) -> bytes:
    """The complete message: the stored headers, a UTF-8 text part, the optional HTML part and
    the files (``files``: their contents by SHA-256)."""
    pol = _POLICIES[(eight_bit, linesep)]
    msg = EmailMessage(policy=pol)
    for name, value in item.headers:
        msg[name] = value
    msg.set_content(item.text, subtype="plain", charset="utf-8", cte=_cte(item.text, eight_bit))
    if item.html:
        msg.add_alternative(item.html, subtype="html", charset="utf-8", cte=_cte(item.html, eight_bit))
        for part in msg.iter_parts():
            del part["MIME-Version"]  # EmailMessage.add_alternative adds it to the part too
    for f in item.files:
        maintype, _, subtype = f.content_type.partition("/")
        msg.add_attachment((files or {})[f.sha256], maintype=maintype or "application",
                           subtype=subtype or "octet-stream", filename=f.filename)
    if item.files:
        for part in msg.iter_parts():
            del part["MIME-Version"]
    return msg.as_bytes(policy=pol)


def read_files(store: Store, item: OutboxMail) -> dict[str, bytes]:
    """The contents of an outgoing mail's files, read when it is built (one mail at a time)."""
    if not item.files:
        return {}
    with store.read() as tx:
        return {f.sha256: tx.outbox.file_data(f.sha256) for f in item.files}


def _cte(text: str, eight_bit: bool) -> str | None:
    """8bit when allowed and every line fits SMTP's 998 bytes; else the stdlib picks base64/QP."""
    if eight_bit and all(len(line.encode()) <= 990 for line in text.splitlines()):
        return "8bit"
    return None


# ---------------------------------------------------------------------------------------
# Retry policy


def next_attempt(now: datetime, attempts: int, initial: float, maximum: float,
                 rand: Callable[[float, float], float] = random.uniform) -> datetime:
    """When to try again after the ``attempts``-th temporary failure.

    Exponential (``initial * 2**(attempts-1)``, capped at ``maximum``) with "equal
    jitter": half the delay fixed, half random, so that mail from one outage does not come
    back all at once. The retry state is in the database (rows wait for days across
    restarts), so an in-process retry library does not fit here.
    """
    delay = min(maximum, initial * (2 ** max(0, attempts - 1)))
    return now + timedelta(seconds=delay / 2 + rand(0, delay / 2))


# ---------------------------------------------------------------------------------------
# Senders


#: Told each result as soon as it is final (the delivery pass commits it at once).
Done = Callable[[OutboxOutcome], None]


def _nothing(outcome: OutboxOutcome) -> None:
    pass


class Sender(Protocol):
    #: The contents of a mail's files (set by the delivery pass: the store is not the sender's).
    files: Callable[[OutboxMail], Mapping[str, bytes]]

    def deliver(self, items: list[OutboxMail], now: datetime, done: Done = _nothing) -> list[OutboxOutcome]: ...

    def close(self) -> None: ...


def _no_files(item: OutboxMail) -> Mapping[str, bytes]:
    return {}


@dataclass
class _Policy:
    initial: float
    maximum: float
    suppress_for: timedelta

    @classmethod
    def of(cls, cfg: Config) -> "_Policy":
        return cls(parse_duration(cfg.outbound.retry_initial), parse_duration(cfg.outbound.retry_max),
                   timedelta(seconds=parse_duration(cfg.notify.suppress_after_failure)))

    def temporary(self, item: OutboxMail, now: datetime, error: str) -> OutboxOutcome:
        when = next_attempt(now, item.attempts + 1, self.initial, self.maximum)
        if when > item.give_up_at:
            return OutboxOutcome(item.id, OutboxState.FAILED, now, f"gave up after temporary failures: {error}")
        return OutboxOutcome(item.id, OutboxState.QUEUED, now, error, next_attempt_at=when)


class MaildirSender:
    """``mode = "maildir"``: each mail as one complete ``.eml`` file in ``[outbound] path``.

    Written to ``path/.tmp/`` and renamed into place, so a reader never sees half a file.
    The name is fixed per row: writing a row again replaces its file, never adds a copy.
    """

    def __init__(self, folder: Path, policy_: _Policy) -> None:
        self.folder = folder
        self.policy = policy_
        self.files: Callable[[OutboxMail], Mapping[str, bytes]] = _no_files

    def deliver(self, items: list[OutboxMail], now: datetime, done: Done = _nothing) -> list[OutboxOutcome]:
        """Write the batch; ``done`` hears every result after the one directory sync (a file
        written again replaces itself, so an interrupted batch never makes a second copy)."""
        out = self._deliver(items, now)
        for o in out:
            done(o)
        return out

    def _deliver(self, items: list[OutboxMail], now: datetime) -> list[OutboxOutcome]:
        tmp_dir = self.folder / ".tmp"
        out: list[OutboxOutcome] = []
        written: list[int] = []  # indexes in ``out`` of files renamed into place
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [self.policy.temporary(i, now, f"cannot write {self.folder}: {exc.strerror or exc}") for i in items]
        for item in items:
            try:
                self._write(tmp_dir, item)
                written.append(len(out))
                out.append(OutboxOutcome(item.id, OutboxState.SENT, now))
            except OSError as exc:
                out.append(self.policy.temporary(item, now, f"cannot write {self.folder}: {exc.strerror or exc}"))
        if written:
            # One directory sync makes every rename of the batch durable before any is reported sent.
            try:
                dir_fd = os.open(self.folder, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                for i in written:
                    out[i] = self.policy.temporary(items[i], now, f"cannot sync {self.folder}: {exc.strerror or exc}")
        return out

    def _write(self, tmp_dir: Path, item: OutboxMail) -> None:
        name = f"{item.created_at:%Y%m%dT%H%M%S}-{item.id:08d}-{(item.case or 'none').lower()}-{item.template}.eml"
        tmp = tmp_dir / name
        with open(tmp, "wb") as f:
            f.write(build_mime(item, eight_bit=False, linesep="\n", files=self.files(item)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)

    def close(self) -> None:
        pass


def connect_relay(cfg: Config) -> smtplib.SMTP:
    """Open an authenticated connection to the configured relay (the one replaceable point)."""
    ob = cfg.outbound
    context = ssl.create_default_context(cafile=str(cfg.path(ob.ca_file)) if ob.ca_file else None)
    if not ob.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    helo = cfg.smtp.hostname or None
    if ob.ssl:
        conn: smtplib.SMTP = smtplib.SMTP_SSL(ob.host, ob.port, local_hostname=helo, timeout=ob.timeout,
                                              context=context)
    else:
        conn = smtplib.SMTP(ob.host, ob.port, local_hostname=helo, timeout=ob.timeout)
    try:
        conn.ehlo()
        if ob.starttls:
            conn.starttls(context=context)
            conn.ehlo()
        if ob.username:
            password = os.environ.get(ob.password_env, "") if ob.password_env else ""
            if not password:
                raise smtplib.SMTPException(f"no relay password: set the environment variable "
                                            f"{ob.password_env or '(outbound.password_env is empty)'}")
            conn.login(ob.username, password)
    except BaseException:
        conn.close()
        raise
    return conn


def _reply(code: int, msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return f"{code} {text}".strip()


class SmtpSender:
    """``mode = "smtp"``: one connection to the relay, reused for every mail of a pass."""

    def __init__(self, cfg: Config, policy_: _Policy,
                 connect: Callable[[Config], smtplib.SMTP] = connect_relay) -> None:
        self.cfg = cfg
        self.policy = policy_
        self.connect = connect
        self.conn: smtplib.SMTP | None = None
        self.files: Callable[[OutboxMail], Mapping[str, bytes]] = _no_files

    def deliver(self, items: list[OutboxMail], now: datetime, done: Done = _nothing) -> list[OutboxOutcome]:
        """Send the batch over one connection; ``done`` hears each result as the relay gives it."""
        out: list[OutboxOutcome] = []
        for i, item in enumerate(items):
            if self.conn is None:
                try:
                    self.conn = self.connect(self.cfg)
                except (OSError, smtplib.SMTPException) as exc:
                    error = f"relay {self.cfg.outbound.host}:{self.cfg.outbound.port} unavailable: {exc}"
                    log.warning("outbox relay unavailable: %s", exc)
                    if isinstance(exc, smtplib.SMTPResponseException) and 500 <= exc.smtp_code < 600 \
                            and not isinstance(exc, smtplib.SMTPAuthenticationError):
                        error = f"relay refused the connection: {_reply(exc.smtp_code, exc.smtp_error)}"
                    for it in items[i:]:
                        out.append(self.policy.temporary(it, now, error))
                        done(out[-1])
                    return out
            out.append(self._send_one(item, now))
            done(out[-1])
        return out

    def _send_one(self, item: OutboxMail, now: datetime) -> OutboxOutcome:
        conn = self.conn
        assert conn is not None
        eight_bit = conn.has_extn("8bitmime")
        data = build_mime(item, eight_bit=eight_bit, files=self.files(item))
        options = ["BODY=8BITMIME"] if eight_bit else []
        suppress = now + self.policy.suppress_for
        try:
            refused = conn.sendmail(item.mail_from, item.recipients, data, mail_options=options)
        except smtplib.SMTPRecipientsRefused as exc:
            replies = {a: (code, _reply(code, msg)) for a, (code, msg) in exc.recipients.items()}
            if all(500 <= code < 600 for code, _ in replies.values()):
                text = "; ".join(f"{a}: {r}" for a, (_, r) in replies.items())
                return OutboxOutcome(item.id, OutboxState.FAILED, now, text, permanent=True, suppress_until=suppress)
            return self.policy.temporary(item, now, "; ".join(r for _, r in replies.values()))
        except smtplib.SMTPSenderRefused as exc:
            # Refusing our own sender (530 STARTTLS/AUTH required, relay denied) is about our
            # configuration, not this mail: retried until give_up_after while the operator fixes it.
            text = _reply(exc.smtp_code, exc.smtp_error)
            log.error("outbox relay refused our sender %s: %s", item.mail_from, text)
            return self.policy.temporary(item, now, f"relay refused the sender: {text}")
        except smtplib.SMTPDataError as exc:
            text = _reply(exc.smtp_code, exc.smtp_error)
            if 500 <= exc.smtp_code < 600:
                return OutboxOutcome(item.id, OutboxState.FAILED, now, text, permanent=True)
            return self.policy.temporary(item, now, text)
        except (OSError, smtplib.SMTPException) as exc:
            # Disconnected or timed out before the relay's final 250: it did not take the mail.
            self._drop()
            return self.policy.temporary(item, now, f"relay connection failed: {exc or type(exc).__name__}")
        if refused:
            perm = {a: _reply(c, m) for a, (c, m) in refused.items() if 500 <= c < 600}
            log.warning("outbox #%d: some recipients refused: %s", item.id, refused)
            return OutboxOutcome(item.id, OutboxState.SENT, now, "; ".join(f"{a}: {r}" for a, r in perm.items()) or None,
                                    refused=perm, suppress_until=suppress)
        return OutboxOutcome(item.id, OutboxState.SENT, now)

    def _drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.quit()
            except (OSError, smtplib.SMTPException):
                pass
            self._drop()


def make_sender(cfg: Config) -> Sender:
    pol = _Policy.of(cfg)
    if cfg.outbound.mode == "smtp":
        return SmtpSender(cfg, pol)
    return MaildirSender(cfg.path(cfg.outbound.path), pol)


# ---------------------------------------------------------------------------------------
# Delivery passes


@dataclass
class PassReport:
    """What one delivery pass did, for the log line and ``intake tick``."""

    sent: int = 0
    retry: int = 0
    failed: int = 0
    requeued: int = 0  # interrupted earlier (their process stopped), queued again
    interrupted_twice: int = 0  # interrupted again after that: failed

    def add(self, outcomes: list[OutboxOutcome]) -> None:
        for o in outcomes:
            if o.state == OutboxState.SENT:
                self.sent += 1
            elif o.state == OutboxState.QUEUED:
                self.retry += 1
            else:
                self.failed += 1

    def __str__(self) -> str:
        text = f"{self.sent} sent, {self.retry} to retry, {self.failed} failed"
        if self.requeued:
            text += f", {self.requeued} interrupted earlier (queued again)"
        if self.interrupted_twice:
            text += f", {self.interrupted_twice} interrupted twice (failed: intake outbox list --state failed)"
        return text


def holder_name() -> str:
    """Who holds a pass's claims: the host and process (for people), and a random part (so
    that two passes, or a restarted process with the same pid, never share a claim)."""
    return f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"


#: Seconds between two commits of delivery results, at least (the window above).
COMMIT_GAP = 0.01


class _Bookkeeper:
    """The writes of one delivery pass, in a thread beside the sending.

    Results are committed as they come, those of at most ``COMMIT_GAP`` (10 ms) together:
    the window in which a mail the relay took is not yet recorded (and would be sent again
    after a crash) is those 10 ms and one commit, not a batch. Every ``renew_every`` seconds the
    pass's claims are renewed: a live process never has its claims expired, however long a
    relay keeps it waiting.
    """

    def __init__(self, cfg: Config, store: Store, holder: str, renew_every: float, give_up_after: float) -> None:
        self.cfg, self.store, self.holder = cfg, store, holder
        self.renew_every = renew_every
        self.give_up_after = give_up_after  # a store down this long: its claims have expired anyway
        self._pending: list[OutboxOutcome] = []
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="outbox-bookkeeper", daemon=True)

    def start(self) -> "_Bookkeeper":
        self._thread.start()
        return self

    def record(self, outcome: OutboxOutcome) -> None:
        """A final result of the pass, to commit now (called by the sending threads)."""
        with self._cond:
            self._pending.append(outcome)
            self._cond.notify()

    def close(self) -> None:
        """Commit what is pending, then stop renewing (the pass has no claims left)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        next_renewal = time.monotonic() + self.renew_every
        failing_since: float | None = None
        last_commit = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closing,
                                    timeout=max(0.0, next_renewal - time.monotonic()))
                # At most one commit per COMMIT_GAP: a commit per mail would cost the sending
                # thread more time (the interpreter lock) than a few results waiting 10 ms.
                gap = last_commit + COMMIT_GAP - time.monotonic()
                if gap > 0 and not self._closing:
                    self._cond.wait_for(lambda: self._closing, timeout=gap)
                batch, self._pending = self._pending, []
                closing = self._closing
            try:
                if batch:
                    finish(self.cfg, self.store, batch, self.holder)
                    batch = []
                    last_commit = time.monotonic()
                if time.monotonic() >= next_renewal:
                    with self.store.transaction() as tx:
                        tx.outbox.renew(self.holder, utcnow())
                    next_renewal = time.monotonic() + self.renew_every
                failing_since = None
            except Exception as exc:  # noqa: BLE001 - the store may be down: keep the results, try again
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.give_up_after:
                    log.error("outbox results of %d mail(s) not recorded (%s): their claims expire and they are "
                              "queued again; the relay may have taken some of them (ids %s)", len(batch), exc,
                              ",".join(str(o.id) for o in batch))
                    batch, failing_since = [], None
                else:
                    log.warning("outbox results not recorded yet (%s: %s); retrying", type(exc).__name__, exc)
                with self._cond:
                    self._pending[:0] = batch
                    self._cond.wait(timeout=1.0)
                continue
            if closing:
                with self._cond:
                    if not self._pending:
                        return


def _worker(cfg: Config, store: Store, sender: Sender, now: datetime, batch: int, report: PassReport,
            lock: threading.Lock, should_stop: Callable[[], bool], limit: int | None, book: _Bookkeeper) -> None:
    try:
        while not should_stop():
            with lock:
                if limit is not None and report.sent + report.retry + report.failed >= limit:
                    return
            items = claim(store, now, batch, book.holder)
            if not items:
                return
            outcomes = sender.deliver(items, now, book.record)
            for item, o in zip(items, outcomes):
                log.info("outbox %s #%d case=%s to=%s message_id=<%s>%s", o.state, item.id, item.case or "-",
                         item.recipient, item.message_id, f" error={o.error}" if o.error else "")
            with lock:
                report.add(outcomes)
            if any(o.state == OutboxState.QUEUED for o in outcomes) and all(o.state != OutboxState.SENT for o in outcomes):
                return  # the relay is failing: wait for the next pass rather than spin
    finally:
        sender.close()


def claim_expiry(cfg: Config) -> timedelta:
    """How long a claim lives without renewal (``[outbound] claim_expiry``)."""
    return timedelta(seconds=parse_duration(cfg.outbound.claim_expiry))


def deliver_due(cfg: Config, store: Store, now: datetime, *, connections: int | None = None,
                should_stop: Callable[[], bool] = lambda: False, limit: int | None = None,
                sender_factory: Callable[[Config], Sender] = make_sender) -> PassReport:
    """Deliver every due row (one pass); ``connections`` workers each reuse one relay connection.

    First, rows whose claim expired (their process stopped) are queued again, or failed if
    that happened before. Expiry is measured on the wall clock, never on ``now`` (which
    ``intake tick --at`` may set in the future)."""
    report = PassReport()
    expiry = claim_expiry(cfg)
    again, failed = requeue_interrupted(cfg, store, utcnow() - expiry)
    report.requeued, report.interrupted_twice = len(again), len(failed)
    n = max(1, connections or cfg.outbound.connections)
    if cfg.outbound.mode != "smtp":
        n = 1
    lock = threading.Lock()
    batch = cfg.outbound.batch_size
    seconds = expiry.total_seconds()
    book = _Bookkeeper(cfg, store, holder_name(), renew_every=seconds / 4, give_up_after=seconds).start()

    def sender() -> Sender:
        made = sender_factory(cfg)
        made.files = lambda item: read_files(store, item)
        return made

    try:
        if n == 1:
            _worker(cfg, store, sender(), now, batch, report, lock, should_stop, limit, book)
            return report
        threads = [threading.Thread(target=_worker, args=(cfg, store, sender(), now, batch, report, lock,
                                                          should_stop, limit, book), name=f"outbox-{i}", daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return report
    finally:
        book.close()


def delivery_loop(cfg: Config, store: Store, wait: Callable[[float], bool], stopping: Callable[[], bool]) -> None:
    """The outbox sender of ``serve``: a delivery pass whenever the processor queued mail
    (``wait`` returns early), else every ``[outbound] interval`` seconds for retries;
    ``wait`` returning False means stop."""
    while not stopping():
        try:
            report = deliver_due(cfg, store, utcnow(), should_stop=stopping)
            if report.sent or report.retry or report.failed:
                log.info("outbox pass: %s", report)
        except Exception:  # noqa: BLE001 - the store or the disk may be down; keep serving
            log.exception("outbox pass failed; retrying")
        if not wait(cfg.outbound.interval):
            return
