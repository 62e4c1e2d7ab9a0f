"""What the SMTP listener promises when things go wrong: an unusable database (451, then
delivery on retry), SIGTERM (finish what is in flight, exit 0), a second signal (exit at
once, nothing corrupted) and SIGKILL under load (every 250 is exactly one case)."""

from __future__ import annotations

import signal
import smtplib
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from mailfactory import make_mail
from smtp_fixtures import IntakeServer, RawClient, smtp_config

from intake.db import Store


def _spool(cfg: Path) -> Path:
    """Where the listener commits on SQLite (intake.db.spool): the processor imports from there."""
    store = Store(f"sqlite:///{cfg.parent / 'intake.db'}")
    try:
        path = store.spool_path
    finally:
        store.close()
    assert path is not None
    return path


def _start_transaction(port: int, subject: str) -> tuple[RawClient, bytes]:
    """A client inside DATA that has sent half of its message."""
    c = RawClient(port)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd("MAIL FROM:<alice@customer.example.org>")[0] == 250
    assert c.cmd("RCPT TO:<support@example.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    raw = make_mail(subject=subject)
    half = len(raw) // 2
    c.send(raw[:half])
    return c, raw[half:]


def test_database_locked_gives_451_and_the_retry_is_delivered(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path)).start()
    try:
        lock = sqlite3.connect(_spool(srv.config), isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the listener's store
        raw = make_mail(subject="while the database was locked", message_id="<locked-1@customer.example.org>")
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=120) as s:
            with pytest.raises(smtplib.SMTPDataError) as exc:
                s.sendmail("alice@customer.example.org", ["support@example.com"], raw)
            assert exc.value.smtp_code == 451
            assert exc.value.smtp_error.startswith(b"4.3.0")
            assert b"Error" not in exc.value.smtp_error and b"(" not in exc.value.smtp_error  # no Python internals
            lock.execute("ROLLBACK")
            lock.close()
            # The sender retries (same session): now it is stored and becomes a case.
            assert s.sendmail("alice@customer.example.org", ["support@example.com"], raw) == {}
        cases = srv.wait_for_cases(1)
        assert [c["subject"] for c in cases] == ["while the database was locked"]
    finally:
        srv.stop()


def test_sigterm_finishes_the_transaction_in_flight_and_exits_0(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path)).start()
    busy, rest = _start_transaction(srv.port, "in flight at SIGTERM")
    idle = RawClient(srv.port)
    assert idle.reply()[0] == 220
    srv.signal(signal.SIGTERM)
    code, text = idle.reply()  # idle sessions are told to come back later
    assert code == 421 and "4.3.2" in text
    idle.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no new connections are accepted
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
            time.sleep(0.1)
        except ConnectionRefusedError:
            break
    else:
        pytest.fail("still accepting connections after SIGTERM")
    busy.send(rest + b".\r\n")
    code, text = busy.reply()
    assert code == 250, text
    busy.close()
    assert srv.wait(timeout=60) == 0
    assert "stopped" in srv.log_text()
    srv.start()  # anything left `received` is processed on start
    try:
        assert [c["subject"] for c in srv.wait_for_cases(1)] == ["in flight at SIGTERM"]
    finally:
        srv.stop()


def test_second_signal_exits_at_once_without_damage(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path)).start()
    busy, _rest = _start_transaction(srv.port, "never finished")
    srv.signal(signal.SIGTERM)
    assert "stopping: finishing work in flight" in srv.wait_for_log("stopping: finishing work in flight")
    assert srv.proc.poll() is None  # waiting for the transaction in flight
    started = time.monotonic()
    srv.signal(signal.SIGINT)
    rc = srv.wait(timeout=30)
    assert rc != 0 and time.monotonic() - started < 10
    busy.close()
    for file in (srv.config.parent / "intake.db", _spool(srv.config)):
        db = sqlite3.connect(file)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", file
        db.close()
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=60) as s:
            assert s.sendmail("alice@customer.example.org", ["support@example.com"],
                              make_mail(subject="after the hard stop")) == {}
        # The half-sent message was never answered 250: it is not a case (its sender retries).
        assert [c["subject"] for c in srv.wait_for_cases(1)] == ["after the hard stop"]
    finally:
        srv.stop()


def test_sigkill_under_concurrent_load_loses_and_duplicates_nothing(tmp_path):
    """200 messages over 10 connections; SIGKILL mid-way; senders retry what was not answered
    250, as MTAs do. Every message ends up exactly one case, those answered 250 before the
    kill included."""
    srv = IntakeServer(smtp_config(tmp_path)).start()
    connections, per_connection = 10, 20
    acked: dict[str, float] = {}  # subject -> when its 250 arrived
    lock = threading.Lock()
    deadline = time.monotonic() + 240
    errors: list[str] = []

    def sender(n: int) -> None:
        todo = [(f"load {n:02d}-{i:02d}", make_mail(subject=f"load {n:02d}-{i:02d}",
                                                   message_id=f"<load-{n}-{i}@customer.example.org>"))
                for i in range(per_connection)]
        client: smtplib.SMTP | None = None
        while todo and time.monotonic() < deadline:
            subject, raw = todo[0]
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", srv.port, timeout=30)
                client.sendmail("alice@customer.example.org", ["support@example.com"], raw)
            except (OSError, smtplib.SMTPException) as exc:
                errors.append(f"{subject}: {type(exc).__name__}")
                try:
                    if client is not None:
                        client.close()
                finally:
                    client = None
                time.sleep(0.2)
                continue
            with lock:
                acked[subject] = time.monotonic()
            todo.pop(0)
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(connections)]
    for t in threads:
        t.start()
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.proc.kill()  # SIGKILL: no chance to finish anything
    killed_at = time.monotonic()
    srv.wait()
    with lock:
        before_kill = {s for s, at in acked.items() if at <= killed_at}
    assert len(before_kill) >= 60
    srv.start()
    try:
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads)
        assert len(acked) == connections * per_connection, f"not all delivered: {len(acked)}; {errors[:5]}"
        assert errors, "the kill interrupted no delivery: the test proved nothing"
        cases = srv.wait_for_cases(connections * per_connection, timeout=120)
        subjects = [c["subject"] for c in cases]
        assert len(subjects) == len(set(subjects)) == connections * per_connection
        assert before_kill <= set(subjects)
    finally:
        srv.stop()
