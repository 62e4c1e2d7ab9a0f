"""`intake serve` processes mail and sends what it causes from worker processes of its own
(or from threads with ``[processing] workers = 0``); the workers never outlive serve."""

from __future__ import annotations

import email
import os
import signal
import smtplib
import time
from email import policy
from pathlib import Path

import pytest
from mailfactory import make_mail
from smtp_fixtures import IntakeServer, smtp_config


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _workers(srv: IntakeServer) -> list[int]:
    assert srv.proc is not None
    found = []
    for p in _children(srv.proc.pid):
        try:
            if b"spawn_main" in (Path("/proc") / str(p) / "cmdline").read_bytes():
                found.append(p)
        except OSError:  # gone between the listing and the read
            pass
    return found


def _acks(folder: Path, count: int, timeout: float = 30) -> list[email.message.EmailMessage]:
    """The acknowledgements written to the maildir outbox, once there are ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(folder.glob("*-ack.eml")) if folder.exists() else []
        if len(files) >= count or time.monotonic() > deadline:
            return [email.message_from_bytes(f.read_bytes(), policy=policy.default) for f in files]
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 0])
def test_serve_processes_and_acknowledges_japanese_and_english_mail(tmp_path, workers):
    cfg = smtp_config(tmp_path, extra=f"[processing]\nworkers = {workers}\n")
    srv = IntakeServer(cfg).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.sendmail("taro@bigcorp.co.jp", ["support@example.com"],
                       make_mail(subject="請求書の再発行のお願い", sender="山田 太郎 <taro@bigcorp.co.jp>",
                                 charset="iso-2022-jp", cte="7bit", body="お世話になっております。\n"))
            s.sendmail("alice@customer.example.org", ["billing@example.com"],
                       make_mail(subject="Invoice missing", to="billing@example.com"))
        cases = srv.wait_for_cases(2)
        assert sorted(c["subject"] for c in cases) == ["Invoice missing", "請求書の再発行のお願い"]
        acks = _acks(tmp_path / "outbox", 2)
        by_to = {str(a["To"]): a for a in acks}
        assert "[CASE-" in by_to["山田 太郎 <taro@bigcorp.co.jp>"]["Subject"]
        assert "受け付けました" in by_to["山田 太郎 <taro@bigcorp.co.jp>"]["Subject"]
        assert "[CASE-" in by_to["Alice Example <alice@customer.example.org>"]["Subject"]
        # Processing ran in worker processes (processors and the outbox sender), or in threads.
        assert len(_workers(srv)) == (2 if workers else 0)
    finally:
        srv.stop()
    assert srv.proc is not None and srv.proc.returncode == 0


def test_workers_exit_when_serve_is_killed(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path, extra="[processing]\nworkers = 2\n")).start()
    workers = _workers(srv)
    assert len(workers) == 3  # two processors and the outbox sender
    srv.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    srv.wait()
    deadline = time.monotonic() + 15
    while any(_running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in workers if _running(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "worker processes outlived the serve process"
    # A new serve starts its own workers and works.
    srv.start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.sendmail("alice@customer.example.org", ["support@example.com"], make_mail(subject="after the kill"))
        assert [c["subject"] for c in srv.wait_for_cases(1)] == ["after the kill"]
    finally:
        srv.stop()


def test_a_dead_worker_is_started_again(tmp_path):
    srv = IntakeServer(smtp_config(tmp_path)).start()
    try:
        first = _workers(srv)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:  # one look per check: a dying worker may show in one look and not the next
            now = _workers(srv)
            if (len(now) == 2 and not set(now) & set(first)) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(now) == 2 and not set(now) & set(first), (first, now)
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as s:
            s.sendmail("alice@customer.example.org", ["support@example.com"], make_mail(subject="still processed"))
        assert [c["subject"] for c in srv.wait_for_cases(1)] == ["still processed"]
        assert len(_acks(tmp_path / "outbox", 1)) == 1
        assert "exited with -9; starting it again" in srv.log_text()
    finally:
        srv.stop()
