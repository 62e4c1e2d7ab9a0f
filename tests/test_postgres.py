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
