"""The SMTP listener's spool on SQLite: durable appends, import into inbound exactly once,
purge of imported messages, and a spool that belongs to another database left alone."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from conftest import count_inbound, inbound_detail, inbound_raw, list_cases, open_test_app, pending_inbound
from mailfactory import make_mail

from intake.db.spool import open_spool, spool_path
from intake.db import utcnow
from intake.db.ops import OpsRepo
from intake.states import InboundState

RECEIVED = InboundState.RECEIVED


def _meta(rcpt: str = "support@example.com") -> dict:
    return {"channel": "email", "mailbox": rcpt, "envelope_from": "alice@customer.example.org",
            "envelope_to": [rcpt], "source": {"protocol": "smtp", "peer": "127.0.0.1:4000"}}


def _spooled(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM spool").fetchone()[0]


@pytest.fixture
def app(config_path):
    a = open_test_app(config_path)
    yield a
    a.close()


def test_spooled_mail_is_imported_once_and_becomes_cases(app):
    writer = app.store.spool_writer()
    db_file = app.cfg.database_url.removeprefix("sqlite:///")
    assert writer is not None and writer.path == spool_path(db_file, app.store.database_id())
    raws = [make_mail(subject="請求書の再発行", charset="iso-2022-jp", cte="7bit", body="請求書をお願いします。\n"),
            make_mail(subject="Printer broken")]
    ids = writer.try_append([(r, _meta()) for r in raws], utcnow())
    writer.sync()
    writer.close()
    assert len(ids) == 2 and app.store.spool_backlog() == 2

    assert app.store.import_spool() == 2
    assert app.store.import_spool() == 0  # the mark moved in the same transaction
    assert app.store.spool_backlog() == 0
    assert count_inbound(app, RECEIVED) == 2
    detail = inbound_detail(app, str(pending_inbound(app)[0]))
    assert detail["source"]["protocol"] == "smtp" and detail["envelope_from"] == "alice@customer.example.org"
    assert detail["log"][0]["step"] == "received"

    assert app.processor.process_pending() == 2
    assert sorted(c.subject for c in list_cases(app)) == ["Printer broken", "請求書の再発行"]
    # Imported messages leave the spool; the inbound records keep the bytes.
    assert app.store.purge_spool() == 2
    assert _spooled(writer.path) == 0
    assert inbound_raw(app, 1) == raws[0]


def test_an_import_that_fails_imports_nothing_and_the_next_one_everything(app, monkeypatch):
    writer = app.store.spool_writer()
    writer.try_append([(make_mail(subject=f"m{i}"), _meta()) for i in range(3)], utcnow())
    writer.sync()
    writer.close()

    def crash(self, key, value, replace=True):
        raise RuntimeError("power cut between the insert and the mark")

    with monkeypatch.context() as m:
        m.setattr(OpsRepo, "set_setting", crash)
        with pytest.raises(RuntimeError):
            app.store.import_spool()
    assert count_inbound(app) == 0  # rolled back with the mark
    assert app.store.import_spool() == 3
    assert count_inbound(app) == 3


def test_a_spool_of_another_database_is_never_read(app, tmp_path):
    """intake.db deleted and made anew: the old spool's messages must not come back."""
    old = spool_path(tmp_path / "intake.db", "0123456789abcdef")
    open_spool(old)
    with sqlite3.connect(old) as conn:
        conn.execute("INSERT INTO spool (received_at, channel, mailbox, envelope_to, source, raw) "
                     "VALUES ('2026-11-01 10:00:00.000000', 'email', 'support@example.com', '[]', '{}', ?)",
                     (make_mail(subject="old mail of a deleted database"),))
    assert app.store.spool_path != old
    writer = app.store.spool_writer()
    writer.close()
    assert app.store.import_spool() == 0 and count_inbound(app) == 0
    assert _spooled(old) == 1  # left for an operator to look at


def test_a_spool_that_lost_commits_gives_new_mail_ids_above_what_was_imported(app, caplog):
    """A spool restored from an older backup (or one whose failed sync went unnoticed)
    would give ids again that the import has taken already: a message answered 250 would
    then be taken for imported and never become a case."""
    writer = app.store.spool_writer()
    writer.try_append([(make_mail(subject=f"before the restore {i}"), _meta()) for i in range(3)], utcnow())
    writer.sync()
    writer.close()
    assert app.store.import_spool() == 3
    app.store.purge_spool()
    with sqlite3.connect(writer.path) as conn:  # the backup knew of one message only
        conn.execute("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'spool'")

    writer = app.store.spool_writer()
    ids = writer.try_append([(make_mail(subject="after the restore"), _meta())], utcnow())
    writer.sync()
    writer.close()
    assert ids == [4]
    assert "ids up to 3 were imported already" in caplog.text
    assert app.store.import_spool() == 1
    assert "after the restore" in [c.subject for c in _cases(app)]


def test_a_delivery_the_spool_refuses_leaves_it_usable(app):
    """A value the driver refuses must not leave the spool's transaction open: every later
    delivery would be refused with it."""
    writer = app.store.spool_writer()
    with pytest.raises(UnicodeEncodeError):
        writer.try_append([(make_mail(subject="bad"), {**_meta(), "mailbox": "support\udcff@example.com"})],
                          utcnow())
    ids = writer.try_append([(make_mail(subject="next one"), _meta())], utcnow())
    writer.sync()
    writer.close()
    assert len(ids) == 1 and app.store.import_spool() == 1


def test_undecodable_envelope_bytes_are_stored_not_refused(app):
    """aiosmtpd keeps 8-bit bytes of MAIL FROM and EHLO as lone surrogates, which no
    database driver takes: they are stored as U+FFFD, UTF-8 text around them kept."""
    writer = app.store.spool_writer()
    meta = {**_meta(), "envelope_from": "t\udcffro@例え.jp", "source": {"helo": "h\udcffst"}}
    writer.try_append([(make_mail(subject="8-bit envelope"), meta)], utcnow())
    writer.sync()
    writer.close()
    assert app.store.import_spool() == 1
    detail = inbound_detail(app, str(pending_inbound(app)[0]))
    assert detail["envelope_from"] == "t\ufffdro@例え.jp" and detail["source"]["helo"] == "h\ufffdst"
    assert [c.subject for c in _cases(app)] == ["8-bit envelope"]


def test_what_the_import_records_was_synced_first(app, monkeypatch):
    """The importer can read a commit the listener has not synced yet. If it recorded that
    id as imported and the power failed before the listener's sync, the spool would give
    the id to the next message, which the import would then skip: so the importer syncs
    the spool's log itself before it records anything."""
    writer = app.store.spool_writer()
    writer.try_append([(make_mail(subject="committed, not yet synced"), _meta())], utcnow())
    events: list[str] = []
    real_sync = os.fdatasync

    def fdatasync(fd: int) -> None:
        events.append("sync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_sync(fd)

    real_set = OpsRepo.set_setting

    def set_setting(self, key, value, replace=True):
        events.append(f"record {key}={value}")
        real_set(self, key, value, replace=replace)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(OpsRepo, "set_setting", set_setting)
    assert app.store.import_spool() == 1
    writer.close()
    syncs = [i for i, e in enumerate(events) if e == f"sync {writer.path}-wal"]
    records = [i for i, e in enumerate(events) if e.startswith("record spool.")]
    assert syncs and records and syncs[0] < records[0], events


def _cases(app):
    app.processor.process_pending()
    return list_cases(app)


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


class _DiskFailsOnSync:
    """The spool writer of a disk whose fsync fails (EIO): what we cannot make happen for real."""

    def __init__(self, writer):
        self.writer = writer

    def try_append(self, items, now):
        return self.writer.try_append(items, now)

    def sync(self):
        from intake.db.spool import SpoolBroken

        raise SpoolBroken("cannot sync the spool: Input/output error")

    def close(self):
        self.writer.close()


async def test_a_failed_sync_refuses_that_delivery_and_every_later_one(app):
    """After a failed fsync the kernel may have dropped the pages: no later 250 could be
    trusted. The deliveries get 451 (their senders retry) and serve is told to stop."""
    import asyncio

    from intake.edges.smtp import GroupCommit
    from intake.db import StoreUnavailable

    broken: list[str] = []
    committer = GroupCommit(app.store, _DiskFailsOnSync(app.store.spool_writer()), lambda: None,
                            on_broken=broken.append)
    runner = asyncio.create_task(committer.run())
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        await committer.commit([(make_mail(subject="during the failure"), _meta())])
    with pytest.raises(StoreUnavailable, match="cannot be trusted"):
        await committer.commit([(make_mail(subject="after it"), _meta())])
    assert len(broken) == 1 and "could not be synced" in broken[0]
    await committer.close()
    await runner
