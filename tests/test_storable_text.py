"""Text PostgreSQL cannot store is made storable where it is written (issue 15, item 7).

A body holding U+0000, a Message-ID over 998 characters and a From over 320 were
quarantined on PostgreSQL although SQLite processed them. Each now becomes a case on both,
the raw bytes stay exact (``intake messages raw``), and the same mail again is still
recognised as a duplicate (the stored form of a long Message-ID is the same every time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SIMPLE_TEAM, intake_env, write_config
from mailfactory import make_mail
from test_postgres import pg_url  # noqa: F401 - the fixture: a throwaway database

LONG_ID = "<" + ("長い識別子-long-id-" * 90)[:1177] + "@customer.example.org>"  # 1,200 characters
LONG_FROM = "taro.yamada." + "x" * 374 + "@bigcorp.co.jp"  # 400 characters
assert len(LONG_ID) == 1200 and len(LONG_FROM) == 400


def mails() -> dict[str, bytes]:
    """The three mails of the issue, in Japanese and English."""
    return {
        "nul": make_mail(subject="請求書が届きません (NUL)", sender="花子 <hanako@customer.example.org>",
                         body="請求書が届きません。\x00 The invoice has not arrived.\n\x00\n",
                         message_id="<nul-body@customer.example.org>"),
        "long-id": make_mail(subject="Printer does not print / 印刷できません", message_id=LONG_ID,
                             sender="Ken <ken@customer.example.org>"),
        "long-from": make_mail(subject="返品について / About a return", sender=f"山田 太郎 <{LONG_FROM}>",
                               message_id="<long-from@bigcorp.co.jp>"),
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'intake.db'}"
    return request.getfixturevalue("pg_url")


def intake(cfg: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real command line, its output as bytes (``messages raw`` writes the mail's bytes)."""
    return subprocess.run([sys.executable, "-m", "intake", "--config", str(cfg), *args], input=stdin,
                          capture_output=True, env=intake_env(), cwd=str(cfg.parent), timeout=120)


def intake_json(cfg: Path, *args: str) -> object:
    res = intake(cfg, *args, "--json")
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout)


def test_nul_long_message_id_and_long_from_each_become_a_case_with_the_raw_bytes_exact(tmp_path, database):
    cfg = write_config(tmp_path, database=database, team=SIMPLE_TEAM)
    assert intake(cfg, "db", "upgrade").returncode == 0
    given = mails()
    for name, raw in given.items():
        res = intake(cfg, "ingest", "-", stdin=raw)
        assert res.returncode == 0, f"{name}: {res.stderr.decode()}"

    assert intake_json(cfg, "quarantine", "list") == []
    cases = {c["subject"]: c for c in intake_json(cfg, "cases", "list")}
    assert sorted(cases) == sorted(["請求書が届きません (NUL)", "Printer does not print / 印刷できません",
                                    "返品について / About a return"])

    records = intake_json(cfg, "messages", "list")
    assert len(records) == 3 and {r["state"] for r in records} == {"processed"}
    for record, (name, raw) in zip(records, given.items()):
        got = intake(cfg, "messages", "raw", str(record["id"]))
        assert got.returncode == 0 and got.stdout == raw, f"{name}: the raw bytes changed"

    # What a person sees: the text around the NUL, the long Message-ID's case, the long sender.
    nul = intake_json(cfg, "cases", "show", cases["請求書が届きません (NUL)"]["number"])
    [message] = [e for e in nul["timeline"] if e["type"] == "message" and e["direction"] == "in"]
    assert "請求書が届きません。" in message["text"] and "The invoice has not arrived." in message["text"]
    assert "\x00" not in message["text"]
    long_from = cases["返品について / About a return"]
    assert long_from["requester"].startswith("taro.yamada.xxx") and long_from["requester_name"] == "山田 太郎"

    # The same mails again are duplicates (a long Message-ID is stored the same way each time),
    # and a reply naming the long Message-ID joins its case.
    for raw in given.values():
        assert intake(cfg, "ingest", "-", stdin=raw).returncode == 0
    reply = make_mail(subject="Re: Printer does not print / 印刷できません", sender="Ken <ken@customer.example.org>",
                      headers={"In-Reply-To": LONG_ID, "References": LONG_ID}, body="まだ印刷できません。\n")
    assert intake(cfg, "ingest", "-", stdin=reply).returncode == 0
    assert len(intake_json(cfg, "cases", "list")) == 3
    long_case = intake_json(cfg, "cases", "show", cases["Printer does not print / 印刷できません"]["number"])
    texts = [e["text"] for e in long_case["timeline"] if e["type"] == "message" and e["direction"] == "in"]
    assert any("まだ印刷できません" in t for t in texts)
    assert [e["type"] for e in long_case["timeline"]].count("duplicate") == 1


def test_a_long_japanese_message_id_is_stored_and_the_next_mail_goes_on(tmp_path, database):
    # 1,200 varied CJK characters are ~3,600 UTF-8 bytes: over PostgreSQL's index limit
    # (2,704 bytes) had it been cut by characters. It is cut by bytes, and a mail after it
    # is not held up.
    chars = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(1200))
    long_id = f"<{chars}@customer.example.org>"
    cfg = write_config(tmp_path, database=database, team=SIMPLE_TEAM)
    assert intake(cfg, "db", "upgrade").returncode == 0
    first = make_mail(subject="長い Message-ID", message_id=long_id, sender="Ken <ken@customer.example.org>")
    second = make_mail(subject="次のメール / the next mail", message_id="<next@customer.example.org>")
    for raw in (first, second, first):
        res = intake(cfg, "ingest", "-", stdin=raw)
        assert res.returncode == 0, res.stderr.decode()
        assert b"deferred" not in res.stdout, res.stdout.decode()
    states = [r["state"] for r in intake_json(cfg, "messages", "list")]
    assert states == ["processed", "processed", "duplicate"]  # the same long id is found again
    assert sorted(c["subject"] for c in intake_json(cfg, "cases", "list")) == ["次のメール / the next mail",
                                                                              "長い Message-ID"]


def test_a_value_postgresql_cannot_index_is_the_messages_fault_not_an_outage(pg_url):  # noqa: F811
    import psycopg.errors
    from sqlalchemy.exc import OperationalError

    from intake.db import Store, StoreUnavailable

    store = Store(pg_url)
    try:
        too_big = OperationalError("INSERT …", {}, psycopg.errors.ProgramLimitExceeded("index row size exceeds"))
        assert not store.is_unavailable(too_big)  # quarantined, and the next message goes on
        shutdown = OperationalError("INSERT …", {}, psycopg.errors.AdminShutdown("terminating connection"))
        assert store.is_unavailable(shutdown)  # retried once the database is back
        assert store.is_unavailable(StoreUnavailable("database is locked"))
    finally:
        store.close()
