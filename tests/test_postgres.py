"""The store on PostgreSQL (DESIGN 8): the same flow, numbering and duplicate rule."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import pytest

from conftest import write_config
from mailfactory import make_mail

PG = os.environ.get("INTAKE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url():
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    name = f"intake_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_ingest_on_postgresql(run_intake, tmp_path, pg_url):
    folder = tmp_path / "pg"
    folder.mkdir()
    cfg = write_config(folder, database=pg_url)
    assert "database at revision" in run_intake("db", "upgrade", config=cfg, check=True).stdout
    mails = tmp_path / "mails"
    mails.mkdir()
    (mails / "1.eml").write_bytes(make_mail(subject="請求書について", message_id="<pg1@customer.example.org>"))
    (mails / "2.eml").write_bytes(make_mail(subject="Re: 請求書について", headers={"In-Reply-To": "<pg1@customer.example.org>"}))
    (mails / "3.eml").write_bytes(make_mail(subject="second", sender="bob@other.example.net"))
    (mails / "4.eml").write_bytes(make_mail(subject="請求書について", message_id="<pg1@customer.example.org>"))
    res = run_intake("ingest", str(mails), config=cfg)
    assert res.returncode == 0, res.stderr
    cases = json.loads(run_intake("cases", "list", "--json", config=cfg, check=True).stdout)
    assert [(c["number"], c["subject"]) for c in cases] == [("CASE-1", "請求書について"), ("CASE-2", "second")]
    detail = json.loads(run_intake("cases", "show", "CASE-1", "--json", config=cfg, check=True).stdout)
    assert [e.get("direction") for e in detail["timeline"] if e["type"] == "message"].count("in") == 2
    assert [e["type"] for e in detail["timeline"]].count("duplicate") == 1


def test_two_serve_processes_share_one_postgresql_database(tmp_path, pg_url, run_intake):
    """DESIGN 8: several serve processes on one PostgreSQL database; each listener commits
    there directly, their processors claim records row by row. Mail to both makes each
    case once, with numbers from the one sequence, and the same message delivered to
    both processes is one case."""
    import smtplib
    import threading

    from smtp_fixtures import IntakeServer, smtp_config

    configs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        configs.append(smtp_config(folder, database=pg_url))
    run_intake("db", "upgrade", config=configs[0], check=True)
    servers = [IntakeServer(c).start() for c in configs]
    try:
        def send(srv: IntakeServer, prefix: str) -> None:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=60) as s:
                for i in range(15):
                    s.sendmail("alice@customer.example.org", ["support@example.com"],
                               make_mail(subject=f"{prefix} {i}", message_id=f"<{prefix}-{i}@customer.example.org>"))
                s.sendmail("taro@bigcorp.co.jp", ["billing@example.com"],
                           make_mail(subject="両方に届いた請求書", sender="taro@bigcorp.co.jp",
                                     message_id="<both@bigcorp.co.jp>", to="billing@example.com"))

        threads = [threading.Thread(target=send, args=(srv, prefix)) for srv, prefix in zip(servers, ("西", "east"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        cases = servers[0].wait_for_cases(31, timeout=120)
        subjects = sorted(c["subject"] for c in cases)
        assert len(subjects) == 31 and subjects.count("両方に届いた請求書") == 1
        # One sequence for both processes: every number once (a sequence may leave gaps,
        # e.g. after a rolled-back transaction, so only uniqueness is promised).
        numbers = [int(c["number"].split("-")[1]) for c in cases]
        assert len(set(numbers)) == 31 and min(numbers) >= 1
        both = next(c for c in cases if c["subject"] == "両方に届いた請求書")
        detail = json.loads(run_intake("cases", "show", both["number"], "--json", config=configs[1], check=True).stdout)
        assert [e["type"] for e in detail["timeline"]].count("duplicate") == 1
    finally:
        for srv in servers:
            srv.stop()
    assert all(srv.proc is not None and srv.proc.returncode == 0 for srv in servers)
