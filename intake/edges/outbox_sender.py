"""Delivery of the outbox: ``maildir`` (one ``.eml`` file per mail) or ``smtp`` (a relay).

Rows are claimed (committed as ``sending``) before anything is sent and their results
are committed after each batch, so a row is sent at most once: a process that dies in
between leaves it ``sending``, and such rows are later marked failed for an operator to
retry, never resent by themselves. Temporary failures (4xx, a relay that is down or
slow) are retried with exponential backoff and jitter until ``give_up_after``; a 5xx is
final: the row is ``failed`` with the relay's reply on the case timeline, and a refused
recipient gets no automated mail for ``[notify] suppress_after_failure``.

The MIME bytes are built here, not at enqueue time: UTF-8 with a 7-bit transfer encoding
(base64 / quoted-printable), or 8-bit when the relay announces 8BITMIME.
"""

from __future__ import annotations

import logging
import os
import random
import smtplib
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from intake.cases import CaseEnv, CaseOps
from intake.config import Config, parse_duration
from intake.db import Store, utcnow
from intake.db.outbox import OutboxMail
from intake.states import OutboxState

log = logging.getLogger("intake.outbox")

#: A row left ``sending`` longer than this belongs to a process that stopped.
STALE_AFTER = timedelta(minutes=15)


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


def claim(store: Store, now: datetime, limit: int) -> list[OutboxMail]:
    """Claim up to ``limit`` due rows for delivery (state ``sending``), oldest first.

    The claim is committed before anything is sent: a row is sent by one process only,
    and a crash after sending leaves it ``sending``, never ``queued`` (no second copy).
    """
    with store.transaction() as tx:
        return tx.outbox.claim(now, limit)


def finish(cfg: Config, store: Store, outcomes: list[OutboxOutcome]) -> None:
    """Record delivery results in one transaction; failures go on the case timeline."""
    if not outcomes:
        return
    with store.transaction() as tx:
        rows = tx.outbox.by_ids([o.id for o in outcomes])
        ops = CaseOps(tx, CaseEnv(cfg), utcnow())
        for o in outcomes:
            row = rows.get(o.id)
            if row is None or row.state != OutboxState.SENDING:
                continue
            attempts = row.attempts + 1
            if o.state == OutboxState.SENT:
                tx.outbox.mark_sent(row.id, o.at, attempts, o.error)
                if row.message_row_id:
                    tx.cases.set_message_sent(row.message_row_id, o.at)
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


def fail_interrupted(cfg: Config, store: Store, claimed_before: datetime) -> list[int]:
    """Rows left ``sending`` by a process that stopped: marked failed, never resent by themselves.

    Whether the relay took such a mail is unknown; sending it again could deliver it
    twice, so an operator decides (``intake outbox retry ID``).
    """
    with store.transaction() as tx:
        rows = tx.outbox.interrupted(claimed_before)
        now = utcnow()
        ops = CaseOps(tx, CaseEnv(cfg), now)
        for row in rows:
            error = ("delivery was interrupted (the sending process stopped); not resent automatically "
                     "so that nobody gets it twice: `intake outbox retry %d` sends it" % row.id)
            tx.outbox.mark_failed(row.id, now, error)
            if row.case_id is not None:
                ops.record_mail_failure(row.case_id, message_id=row.message_id, to=row.recipient,
                                        template=row.template, reply=error, permanent=False)
        return [r.id for r in rows]


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
            return "being sent right now"
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


class Sender(Protocol):
    #: The contents of a mail's files (set by the delivery pass: the store is not the sender's).
    files: Callable[[OutboxMail], Mapping[str, bytes]]

    def deliver(self, items: list[OutboxMail], now: datetime) -> list[OutboxOutcome]: ...

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

    def deliver(self, items: list[OutboxMail], now: datetime) -> list[OutboxOutcome]:
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

    def deliver(self, items: list[OutboxMail], now: datetime) -> list[OutboxOutcome]:
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
                    out += [self.policy.temporary(it, now, error) for it in items[i:]]
                    return out
            out.append(self._send_one(item, now))
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
class DeliveryReport:
    sent: int = 0
    retry: int = 0
    failed: int = 0
    interrupted: int = 0

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
        return text + (f", {self.interrupted} interrupted earlier (marked failed)" if self.interrupted else "")


def _worker(cfg: Config, store: Store, sender: Sender, now: datetime, batch: int, report: DeliveryReport,
            lock: threading.Lock, should_stop: Callable[[], bool], limit: int | None) -> None:
    try:
        while not should_stop():
            with lock:
                if limit is not None and report.sent + report.retry + report.failed >= limit:
                    return
            items = claim(store, now, batch)
            if not items:
                return
            outcomes = sender.deliver(items, now)
            finish(cfg, store, outcomes)
            for item, o in zip(items, outcomes):
                log.info("outbox %s #%d case=%s to=%s message_id=<%s>%s", o.state, item.id, item.case or "-",
                         item.recipient, item.message_id, f" error={o.error}" if o.error else "")
            with lock:
                report.add(outcomes)
            if any(o.state == OutboxState.QUEUED for o in outcomes) and all(o.state != OutboxState.SENT for o in outcomes):
                return  # the relay is failing: wait for the next pass rather than spin
    finally:
        sender.close()


def deliver_due(cfg: Config, store: Store, now: datetime, *, connections: int | None = None,
                should_stop: Callable[[], bool] = lambda: False, limit: int | None = None,
                sender_factory: Callable[[Config], Sender] = make_sender) -> DeliveryReport:
    """Deliver every due row (one pass); ``connections`` workers each reuse one relay connection."""
    report = DeliveryReport()
    report.interrupted = len(fail_interrupted(cfg, store, utcnow() - STALE_AFTER))
    n = max(1, connections or cfg.outbound.connections)
    if cfg.outbound.mode != "smtp":
        n = 1
    lock = threading.Lock()
    batch = cfg.outbound.batch_size
    def sender() -> Sender:
        made = sender_factory(cfg)
        made.files = lambda item: read_files(store, item)
        return made

    if n == 1:
        _worker(cfg, store, sender(), now, batch, report, lock, should_stop, limit)
        return report
    threads = [threading.Thread(target=_worker, args=(cfg, store, sender(), now, batch, report, lock,
                                                      should_stop, limit), name=f"outbox-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report


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
