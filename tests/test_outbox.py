"""Outbox delivery: maildir files, a real aiosmtpd relay (down, 4xx, 5xx, TLS+AUTH), at most once."""

from __future__ import annotations

import json
import socket
import ssl
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from conftest import SIMPLE_TEAM
from conftest import write_config as _write_config


def write_config(folder, extra: str = "", **kw):
    """These tests are about who gets which mail: a team without automatic assignment."""
    return _write_config(folder, extra, team=SIMPLE_TEAM, **kw)


@pytest.fixture
def config_path(tmp_path):
    return write_config(tmp_path)
from mailfactory import make_mail

from intake.db import utcnow
from intake.db.outbox import OutboxMail
from intake.edges import outbox_sender
from conftest import case_detail, open_test_app
from conftest import outbox_items as rows
from intake.edges.outbox_sender import deliver_due, next_attempt


class Relay:
    """An upstream relay that we control: it can refuse, defer, and counts what it accepted."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.rcpt_reply: str | None = None
        self.data_replies: list[str] = []
        self.sessions: set[int] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.pop(0)
        self.sessions.add(id(session))
        self.received.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                              "data": envelope.original_content, "options": list(envelope.mail_options)})
        return "250 2.0.0 queued"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def relay_port() -> int:
    return free_port()


def start_relay(port: int, relay: Relay, **kw) -> Controller:
    c = Controller(relay, hostname="127.0.0.1", port=port, **kw)
    c.start()
    return c


def smtp_app(tmp_path: Path, port: int, extra: str = ""):
    cfg = write_config(tmp_path, f'mode = "smtp"\nhost = "127.0.0.1"\nport = {port}\ntimeout = 10\n'
                                 f'[notify]\nnotify_agents = false\n' + extra)
    return open_test_app(cfg)


def ingest(app, raw: bytes, mailbox: str = "support@example.com"):
    rid = app.store.receive(raw, channel="email", mailbox=mailbox, envelope_to=[mailbox])
    return app.processor.process(rid)


def row(app, outbox_id: int) -> OutboxMail:
    with app.store.read() as tx:
        return tx.outbox.get(outbox_id)


def test_relay_down_then_4xx_then_250_delivers_exactly_once(tmp_path, relay_port):
    app = smtp_app(tmp_path, relay_port)
    try:
        ingest(app, make_mail(subject="請求書", sender="taro@bigcorp.co.jp", body="届きません\n"))
        [item] = rows(app)
        t0 = item.created_at
        report = deliver_due(app.cfg, app.store, t0)  # nothing listens on the port
        assert (report.sent, report.retry) == (0, 1)
        item = row(app, item.id)
        assert item.state == "queued" and item.attempts == 1 and "unavailable" in item.last_error
        assert item.next_attempt_at > t0

        relay = Relay()
        relay.data_replies = ["451 4.3.0 Try again later"]
        controller = start_relay(relay_port, relay)
        try:
            assert deliver_due(app.cfg, app.store, t0).sent == 0  # backoff: not due yet
            assert relay.received == []
            report = deliver_due(app.cfg, app.store, t0 + timedelta(hours=2))
            assert (report.sent, report.retry) == (0, 1)
            assert "451 4.3.0 Try again later" in row(app, item.id).last_error
            report = deliver_due(app.cfg, app.store, t0 + timedelta(hours=4))
            assert report.sent == 1
            for hours in (8, 24, 40):
                assert deliver_due(app.cfg, app.store, t0 + timedelta(hours=hours)).sent == 0
        finally:
            controller.stop()
        assert len(relay.received) == 1
        got = relay.received[0]
        assert got["to"] == ["taro@bigcorp.co.jp"] and got["from"] == item.mail_from
        m = message_from_bytes(got["data"], policy=policy.default)
        assert m["Message-ID"] == f"<{item.message_id}>"
        done = row(app, item.id)
        assert done.state == "sent" and done.attempts == 3 and done.sent_at is not None
    finally:
        app.close()


def test_5xx_fails_the_mail_puts_the_reply_on_the_timeline_and_suppresses_the_address(tmp_path, relay_port):
    app = smtp_app(tmp_path, relay_port)
    relay = Relay()
    relay.rcpt_reply = "550 5.1.1 <nobody@bigcorp.co.jp>: Recipient address rejected"
    controller = start_relay(relay_port, relay)
    try:
        ingest(app, make_mail(subject="Hello", sender="nobody@bigcorp.co.jp"))
        [item] = rows(app)
        report = deliver_due(app.cfg, app.store, item.created_at)
        assert (report.sent, report.failed) == (0, 1)
        failed = row(app, item.id)
        assert failed.state == "failed" and "550 5.1.1" in failed.last_error
        assert deliver_due(app.cfg, app.store, item.created_at + timedelta(days=1)).failed == 0  # never retried
        events = case_detail(app, "CASE-1")["timeline"]
        entry = [e for e in events if e["type"] == "mail_failed"][0]
        assert "550 5.1.1" in entry["reply"] and entry["to"] == "nobody@bigcorp.co.jp" and entry["permanent"]
        # No further automated mail to that address.
        ingest(app, make_mail(subject="Again", sender="nobody@bigcorp.co.jp"))
        skipped = [e for e in case_detail(app, "CASE-2")["timeline"] if e["type"] == "mail_skipped"]
        assert skipped[0]["check"] == "suppressed"
        assert relay.received == []
    finally:
        controller.stop()
        app.close()


def test_temporary_failures_give_up_after_the_configured_time(tmp_path, relay_port):
    app = smtp_app(tmp_path, relay_port, "")
    try:
        ingest(app, make_mail(subject="Hello"))
        [item] = rows(app)
        assert deliver_due(app.cfg, app.store, item.created_at).retry == 1
        report = deliver_due(app.cfg, app.store, item.created_at + timedelta(days=2, hours=1))
        assert report.failed == 1
        assert "gave up" in row(app, item.id).last_error
        assert any(e["type"] == "mail_failed" for e in case_detail(app, "CASE-1")["timeline"])
    finally:
        app.close()


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    from datetime import datetime, timezone

    now = datetime(2026, 11, 20, tzinfo=timezone.utc)
    low = [(next_attempt(now, n, 60, 3600, lambda a, b: a) - now).total_seconds() for n in range(1, 9)]
    high = [(next_attempt(now, n, 60, 3600, lambda a, b: b) - now).total_seconds() for n in range(1, 9)]
    assert low == [30, 60, 120, 240, 480, 960, 1800, 1800]
    assert high == [60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_one_connection_is_reused_for_a_batch_and_several_connections_share_without_duplicates(tmp_path, relay_port):
    app = smtp_app(tmp_path, relay_port, "")
    relay = Relay()
    controller = start_relay(relay_port, relay)
    try:
        for i in range(12):
            ingest(app, make_mail(subject=f"Q{i}", sender=f"user{i}@client.example.net"))
        t = rows(app)[-1].created_at
        assert deliver_due(app.cfg, app.store, t).sent == 12
        assert len(relay.sessions) == 1
        for i in range(30):
            ingest(app, make_mail(subject=f"R{i}", sender=f"other{i}@client.example.net"))
        relay.sessions.clear()
        from dataclasses import replace

        cfg = replace(app.cfg, outbound=replace(app.cfg.outbound, batch_size=5))
        assert deliver_due(cfg, app.store, rows(app)[-1].created_at, connections=3).sent == 30
        ids = [message_from_bytes(r["data"], policy=policy.default)["Message-ID"] for r in relay.received]
        assert len(ids) == 42 and len(set(ids)) == 42
        assert 1 < len(relay.sessions) <= 3
    finally:
        controller.stop()
        app.close()


def test_8bit_only_when_the_relay_announces_8bitmime(tmp_path, relay_port):
    app = smtp_app(tmp_path, relay_port, "")
    ingest(app, make_mail(subject="印刷", sender="taro@bigcorp.co.jp", body="印刷できません\n"))
    ingest(app, make_mail(subject="印刷2", sender="jiro@bigcorp.co.jp", body="印刷できません\n"))
    first, second = rows(app)
    relay = Relay()
    try:
        controller = start_relay(relay_port, relay)  # aiosmtpd announces 8BITMIME by default
        deliver_due(app.cfg, app.store, first.created_at, limit=1)
        controller.stop()
        controller = start_relay(relay_port, relay, decode_data=True)  # no 8BITMIME
        deliver_due(app.cfg, app.store, second.created_at)
        controller.stop()
    finally:
        app.close()
    eight, seven = relay.received
    assert "BODY=8BITMIME" in eight["options"] and "受付番号：CASE-1".encode() in eight["data"]
    assert "BODY=8BITMIME" not in seven["options"] and max(seven["data"]) < 128
    for got in (eight, seven):
        body = message_from_bytes(got["data"], policy=policy.default).get_body(("plain",)).get_content()
        assert "受付番号：CASE-" in body


def test_starttls_and_auth_with_the_relay(tmp_path, relay_port, monkeypatch):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.login == b"intake" and auth_data.password == b"s3cret")

    monkeypatch.setenv("TEST_RELAY_PASSWORD", "s3cret")
    app = smtp_app(tmp_path, relay_port, "")
    relay = Relay()
    controller = start_relay(relay_port, relay, tls_context=server_ctx, require_starttls=True,
                             authenticator=authenticator, auth_required=True)
    try:
        from dataclasses import replace

        ingest(app, make_mail(subject="Secure"))
        [item] = rows(app)
        # Without STARTTLS the relay refuses our sender: a temporary failure (configuration), nothing sent.
        assert deliver_due(app.cfg, app.store, item.created_at).sent == 0
        waiting = row(app, item.id)
        assert waiting.state == "queued" and "STARTTLS" in waiting.last_error
        ob = replace(app.cfg.outbound, starttls=True, ca_file=str(ca_file), username="intake",
                     password_env="TEST_RELAY_PASSWORD")
        cfg = replace(app.cfg, outbound=ob)
        assert deliver_due(cfg, app.store, item.created_at + timedelta(hours=3)).sent == 1
        assert logins == [(b"intake", b"s3cret")] and len(relay.received) == 1
    finally:
        controller.stop()
        app.close()


def test_maildir_mode_writes_one_complete_file_per_mail(run_intake, tmp_path):
    f = tmp_path / "m.eml"
    f.write_bytes(make_mail(subject="プリンター", sender="山田 太郎 <taro@bigcorp.co.jp>", body="印刷できません\n"))
    assert run_intake("ingest", str(f)).returncode == 0
    listed = json.loads(run_intake("outbox", "list", "--json", check=True).stdout)
    assert {m["state"] for m in listed} == {"queued"} and len(listed) == 3
    res = run_intake("tick", check=True)
    assert "outbox-delivery: 3 sent, 0 to retry, 0 failed" in res.stdout
    folder = tmp_path / "outbox"
    files = sorted(folder.glob("*.eml"))
    assert len(files) == 3 and list((folder / ".tmp").iterdir()) == []
    ack = [p for p in files if p.name.endswith("-ack.eml")][0]
    m = message_from_bytes(ack.read_bytes(), policy=policy.default)
    assert m["To"].addresses[0].addr_spec == "taro@bigcorp.co.jp"
    assert m["Subject"] == "[CASE-1] お問い合わせを受け付けました：プリンター"
    assert "受付番号：CASE-1" in m.get_body(("plain",)).get_content()
    assert max(ack.read_bytes()) < 128
    # A second pass sends nothing again.
    assert "outbox-delivery: 0 sent" in run_intake("tick", check=True).stdout
    assert len(list(folder.glob("*.eml"))) == 3
    listed = json.loads(run_intake("outbox", "list", "--json", check=True).stdout)
    assert {m["state"] for m in listed} == {"sent"}
    res = run_intake("outbox", "retry", str(listed[0]["id"]))
    assert res.returncode == 1 and "never sent twice" in res.stdout


def test_an_interrupted_delivery_is_queued_again_once_and_failed_the_second_time(tmp_path, run_intake):
    """A process that dies holding claims: while its claims are fresh nobody takes them; once
    expired, each row goes back to queued by itself (no operator), and is then sent alone;
    a row interrupted a second time (it may be what crashes the sender) is failed with a
    reason an operator can act on. This used to fail all three after 15 minutes."""
    app = open_test_app(write_config(tmp_path))
    try:
        rid = app.store.receive(make_mail(subject="Crash"), channel="email", mailbox="support@example.com",
                                envelope_to=["support@example.com"])
        app.processor.process(rid)
        claimed = outbox_sender.claim(app.store, utcnow(), 100, "host-a pid 1 dead")  # …and the process dies here
        assert len(claimed) == 3
        # A pass now: the claims are younger than claim_expiry, so they may belong to a live process.
        report = deliver_due(app.cfg, app.store, utcnow())
        assert (report.sent, report.requeued) == (0, 0) and len(rows(app, state="sending")) == 3
        # Later (as if claim_expiry had passed): queued again, once, with a note on the timeline.
        later = utcnow() + timedelta(seconds=1)
        again, failed = outbox_sender.requeue_interrupted(app.cfg, app.store, later)
        assert (len(again), failed) == (3, [])
        queued = rows(app, state="queued")
        assert [m.requeued for m in queued] == [1, 1, 1] and "host-a pid 1 dead stopped" in queued[0].last_error
        notes = [e for e in case_detail(app, "CASE-1")["timeline"] if e["type"] == "note"]
        assert len(notes) == 3 and "queued again automatically" in notes[0]["text"]
        # A requeued row goes out alone: the next crash then names one mail, not a batch.
        [alone] = outbox_sender.claim(app.store, utcnow(), 100, "host-b pid 2 dead")  # …and it dies again
        again, failed = outbox_sender.requeue_interrupted(app.cfg, app.store, utcnow() + timedelta(seconds=1))
        assert (again, failed) == ([], [alone.id])
        report = deliver_due(app.cfg, app.store, utcnow())
        assert (report.sent, report.failed) == (2, 0)
        [poison] = rows(app, state="failed")
        assert poison.id == alone.id and "interrupted again" in poison.last_error
        assert f"intake outbox retry {alone.id}" in poison.last_error
        failures = [e for e in case_detail(app, "CASE-1")["timeline"] if e["type"] == "mail_failed"]
        assert len(failures) == 1 and failures[0]["to"] == alone.recipient
    finally:
        app.close()
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 2
    res = run_intake("outbox", "retry", str(poison.id))
    assert res.returncode == 0 and "queued for delivery" in res.stdout
    assert "outbox-delivery: 1 sent" in run_intake("tick", check=True).stdout
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 3


def test_a_late_result_counts_only_for_the_claim_it_belongs_to(tmp_path, relay_port):
    """A sender whose claim expired (it was frozen, or the database was away) and whose mail the
    relay then took: the row, put back but not yet claimed again, is recorded sent (no second
    copy). Once another process has claimed it, the result is that process's to record."""
    app = smtp_app(tmp_path, relay_port)
    try:
        for n in range(2):
            ingest(app, make_mail(subject=f"遅延 {n}", sender=f"late{n}@bigcorp.co.jp"))
        first, second = outbox_sender.claim(app.store, utcnow(), 100, "slow")
        outbox_sender.requeue_interrupted(app.cfg, app.store, utcnow() + timedelta(seconds=1))
        [taken] = outbox_sender.claim(app.store, utcnow(), 100, "other")  # the second one, claimed alone
        assert taken.id == first.id
        sent = [outbox_sender.OutboxOutcome(i, "sent", utcnow()) for i in (first.id, second.id)]
        outbox_sender.finish(app.cfg, app.store, sent, holder="slow")
        assert row(app, second.id).state == "sent"  # put back, unclaimed: the late 250 counts
        assert row(app, first.id).state == "sending"  # "other" holds it now
        outbox_sender.finish(app.cfg, app.store, sent[:1], holder="other")
        assert row(app, first.id).state == "sent"
    finally:
        app.close()
