"""The SMTP listener's spool on SQLite: durable appends, import into inbound exactly once,
purge of imported messages, and a spool that belongs to another database left alone."""

from __future__ import annotations

import json
import sqlite3

import pytest
from mailfactory import make_mail

from intake import flowstore
from intake.app import open_app
from intake.spool import open_spool, spool_path
from intake.store import RECEIVED, utcnow


def _meta(rcpt: str = "support@example.com") -> dict:
    return {"channel": "email", "mailbox": rcpt, "envelope_from": "alice@customer.example.org",
            "envelope_to": [rcpt], "source": {"protocol": "smtp", "peer": "127.0.0.1:4000"}}


def _spooled(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM spool").fetchone()[0]


@pytest.fixture
def app(config_path):
    a = open_app(config_path)
    yield a
    a.close()


def test_spooled_mail_is_imported_once_and_becomes_cases(app):
    writer = app.store.spool_writer()
    assert writer is not None and writer.path == spool_path(app.cfg.database_url.removeprefix("sqlite:///"))
    raws = [make_mail(subject="請求書の再発行", charset="iso-2022-jp", cte="7bit", body="請求書をお願いします。\n"),
            make_mail(subject="Printer broken")]
    ids = writer.try_append([(r, _meta()) for r in raws], utcnow())
    writer.sync()
    writer.close()
    assert len(ids) == 2 and app.store.spool_backlog() == 2

    assert app.store.import_spool() == 2
    assert app.store.import_spool() == 0  # the mark moved in the same transaction
    assert app.store.spool_backlog() == 0
    assert app.store.count_inbound(RECEIVED) == 2
    detail = app.store.inbound_detail(str(app.store.pending_inbound()[0]))
    assert detail["source"]["protocol"] == "smtp" and detail["envelope_from"] == "alice@customer.example.org"
    assert detail["log"][0]["step"] == "received"

    assert app.processor.process_pending() == 2
    assert sorted(c.subject for c in app.store.list_cases()) == ["Printer broken", "請求書の再発行"]
    # Imported messages leave the spool; the inbound records keep the bytes.
    assert app.store.purge_spool() == 2
    assert _spooled(writer.path) == 0
    assert app.store.inbound_raw(1) == raws[0]


def test_an_import_that_fails_imports_nothing_and_the_next_one_everything(app, monkeypatch):
    writer = app.store.spool_writer()
    writer.try_append([(make_mail(subject=f"m{i}"), _meta()) for i in range(3)], utcnow())
    writer.sync()
    writer.close()

    def crash(self, key, value, replace=True):
        raise RuntimeError("power cut between the insert and the mark")

    with monkeypatch.context() as m:
        m.setattr(flowstore.FlowTx, "set_setting", crash)
        with pytest.raises(RuntimeError):
            app.store.import_spool()
    assert app.store.count_inbound() == 0  # rolled back with the mark
    assert app.store.import_spool() == 3
    assert app.store.count_inbound() == 3


def test_a_spool_of_another_database_is_moved_aside_not_imported(app, tmp_path):
    path = spool_path(tmp_path / "intake.db")
    open_spool(path, "some-other-database")
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO spool (received_at, channel, mailbox, envelope_to, source, raw) "
                     "VALUES ('2026-11-01 10:00:00.000000', 'email', 'support@example.com', '[]', '{}', ?)",
                     (make_mail(subject="old mail of a deleted database"),))
    assert app.store.import_spool() == 0  # not ours: never revived in this database
    writer = app.store.spool_writer()  # the listener starts: the old spool goes aside
    writer.close()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("intake.spool.db.orphaned-")]
    assert len(aside) == 1 and _spooled(aside[0]) == 1
    assert _spooled(path) == 0
    assert app.store.import_spool() == 0 and app.store.count_inbound() == 0


def test_tick_processes_what_a_stopped_serve_left_in_the_spool(app, run_intake):
    writer = app.store.spool_writer()
    writer.try_append([(make_mail(subject="left in the spool", sender="erin@client.example.net"), _meta())],
                      utcnow())
    writer.sync()
    writer.close()
    out = run_intake("tick", check=True)
    assert "1 received message(s) processed" in out.stdout
    cases = json.loads(run_intake("cases", "list", "--json", check=True).stdout)
    assert [(c["subject"], c["requester"]) for c in cases] == [("left in the spool", "erin@client.example.net")]
