"""SIGKILL in the middle of ingesting a stream of mails loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import case_detail, count_inbound, open_test_app
from conftest import intake_env
from mailfactory import make_mail

COUNT = 1000


def _mails(folder: Path) -> list[str]:
    folder.mkdir()
    ids = []
    for n in range(COUNT):
        mid = f"<crash-{n}@customer.example.org>"
        ids.append(mid.strip("<>"))
        subject = f"問い合わせ {n}" if n % 2 else f"request {n}"
        # One sender each: the acknowledgement rate limit is per sender.
        sender = f"user{n}@customer{n % 7}.example.org"
        (folder / f"{n:04d}.eml").write_bytes(make_mail(subject=subject, message_id=mid, sender=sender))
    return ids


def _stored(db: Path) -> int:
    """Inbound records committed so far (0 before the schema exists)."""
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT count(*) FROM inbound").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_sigkill_during_ingest_then_restart_processes_every_message_exactly_once(run_intake, config_path, tmp_path):
    expected = _mails(tmp_path / "mails")
    db = config_path.parent / "intake.db"
    cmd = [sys.executable, "-m", "intake", "--config", str(config_path), "ingest", str(tmp_path / "mails")]
    # Kill the ingest three times, at three moments of its stream: once its first, second
    # and fourth batch of 100 is committed (it is then processing that batch, and the
    # rest is neither stored nor processed). Each restart is the MTA retrying everything
    # it has not seen acknowledged (here: the whole folder again).
    for batches in (1, 2, 4):
        before = _stored(db)
        proc = subprocess.Popen(cmd, env=intake_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _stored(db) < before + 100 * batches and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the ingest ended before the moment it was to be killed at"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    # The scheduler's sweep processes what was stored but not yet processed...
    tick = run_intake("tick", check=True)
    assert "process-received" in tick.stdout
    # ...and the final full run finds everything already there.
    final = run_intake("ingest", str(tmp_path / "mails"), timeout=300)
    assert final.returncode == 0, final.stderr

    cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
    assert len(cases) == COUNT
    subjects = sorted(c["subject"] for c in cases)
    assert subjects == sorted((f"問い合わせ {n}" if n % 2 else f"request {n}") for n in range(COUNT))
    assert json.loads(run_intake("quarantine", "list", "--json", check=True).stdout) == []

    # Every stored record ended processed (first arrival) or duplicate (a retry), none waiting.
    from intake.states import InboundState

    DUPLICATE, PROCESSED, RECEIVED = InboundState.DUPLICATE, InboundState.PROCESSED, InboundState.RECEIVED
    app = open_test_app(config_path)
    try:
        assert count_inbound(app, RECEIVED) == 0
        assert count_inbound(app, PROCESSED) == COUNT
        assert count_inbound(app) == COUNT + count_inbound(app, DUPLICATE)
        for number in (1, COUNT // 2, COUNT):
            detail = case_detail(app, f"CASE-{number}")
            inbound = [e for e in detail["timeline"] if e["type"] == "message" and e["direction"] == "in"]
            assert len(inbound) == 1 and inbound[0]["message_id"] in expected
            # Notifications are written in the processing transaction: exactly one ack too.
            acks = [e for e in detail["timeline"] if e["type"] == "message" and e.get("template") == "ack"]
            assert len(acks) == 1
    finally:
        app.close()
