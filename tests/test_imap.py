"""IMAP pollers against a real Dovecot started by the tests: one drain at a time (in process).

The long-running behaviour under ``intake serve`` (IDLE, reconnects, kill -9) is in
``test_imap_serve.py``.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
from dovecot import Dovecot, dovecot, imap_toml, password_env  # noqa: F401 - `dovecot` is a fixture
from imapclient import IMAPClient
from conftest import case_detail, count_inbound, list_cases, open_test_app, statuses
from mailfactory import make_mail

from conftest import write_config
from intake.app import App
from intake.config import ConfigError, ImapConfig, load_config
from intake.edges.imap import ImapPoller, connect
from intake.states import InboundState

DUPLICATE, PROCESSED = InboundState.DUPLICATE, InboundState.PROCESSED


@pytest.fixture
def imap_app(tmp_path: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    """An installation whose first [[imap]] account is Dovecot's user ``test``."""
    for k, v in password_env(dovecot).items():
        monkeypatch.setenv(k, v)
    made: list[App] = []

    def make(**keys: object) -> App:
        app = open_test_app(write_config(tmp_path, imap_toml(dovecot, **keys)))
        made.append(app)
        return app

    yield make
    for a in made:
        a.close()


def _poller(app: App, **kw: object) -> ImapPoller:
    return ImapPoller(app.store, app.cfg.imap[0], **kw)  # type: ignore[arg-type]


def _inbound(app: App) -> list:
    """Every inbound record (``InboundWork``: raw bytes, source, state), oldest first."""
    with app.store.read() as tx:
        records = tx.inbound.load(list(range(1, tx.inbound.count() + 1)))
    return [records[i] for i in sorted(records)]


def test_backlog_is_drained_in_batches_moved_after_commit_and_left_unread(imap_app, dovecot):
    app = imap_app(batch_size=10)
    raws = [make_mail(subject=f"Backlog {i}") for i in range(25)]
    dovecot.append(raws)

    poller = _poller(app)
    result = poller.poll_once()
    poller.close()

    assert (result.stored, result.finished, result.failed) == (25, 25, [])
    assert dovecot.count("INBOX") == 0
    assert dovecot.count("Processed") == 25
    # BODY.PEEK[]: the mail is not marked read for the people who look at the account.
    assert all(b"\\Seen" not in f for f in dovecot.flags("Processed").values())
    records = _inbound(app)
    assert [r.raw for r in records] == raws  # byte for byte what the server holds
    src = records[0].source
    assert src["imap"] == "test" and src["folder"] == "INBOX" and src["uid"] == 1 and src["uidvalidity"] > 0
    assert {r.channel for r in records} == {"email"} and {r.mailbox for r in records} == {"support@example.com"}

    assert app.processor.process_pending() == 25
    cases = list_cases(app)
    assert sorted(c.subject for c in cases) == sorted(f"Backlog {i}" for i in range(25))
    assert {c.mailbox for c in cases} == {"support@example.com"}

    # Nothing left: a second drain stores nothing.
    again = _poller(app)
    assert again.poll_once().stored == 0
    again.close()


def test_keyword_mode_leaves_mail_in_place_and_never_fetches_it_twice(imap_app, dovecot):
    app = imap_app(processed_folder="", keyword="$Intake")
    dovecot.append([make_mail(subject="Keep me 1"), make_mail(subject="Keep me 2")])
    poller = _poller(app)
    assert poller.poll_once().stored == 2
    assert dovecot.count("INBOX") == 2
    assert all(b"$Intake" in f for f in dovecot.flags("INBOX").values())

    dovecot.append(make_mail(subject="Keep me 3"))
    assert poller.poll_once().stored == 1
    assert poller.poll_once().stored == 0
    poller.close()
    app.processor.process_pending()
    assert sorted(c.subject for c in list_cases(app)) == ["Keep me 1", "Keep me 2", "Keep me 3"]
    assert len(_inbound(app)) == 3


def test_changed_uidvalidity_rescans_without_duplicate_cases(imap_app, dovecot):
    app = imap_app(folder="Support", processed_folder="")
    old = [make_mail(subject=f"Before rebuild {i}") for i in range(3)]
    dovecot.append(old, folder="Support")
    poller = _poller(app)
    assert poller.poll_once().stored == 3
    poller.close()
    app.processor.process_pending()

    # The provider rebuilds the folder: same mail, new UIDVALIDITY, keywords lost.
    c = dovecot.client()
    before = c.folder_status("Support", [b"UIDVALIDITY"])[b"UIDVALIDITY"]
    c.delete_folder("Support")
    time.sleep(1.1)  # Dovecot derives UIDVALIDITY from the clock
    c.create_folder("Support")
    after = c.folder_status("Support", [b"UIDVALIDITY"])[b"UIDVALIDITY"]
    c.logout()
    assert before != after
    dovecot.append([*old, make_mail(subject="After rebuild")], folder="Support")

    poller = _poller(app)
    result = poller.poll_once()
    poller.close()
    assert result.uidvalidity_changed and result.stored == 4
    app.processor.process_pending()
    assert sorted(c.subject for c in list_cases(app)) == [
        "After rebuild", "Before rebuild 0", "Before rebuild 1", "Before rebuild 2"]
    states = [r.state for r in _inbound(app)]
    assert states.count(DUPLICATE) == 3 and states.count(PROCESSED) == 4


class _DropsBeforeMove(IMAPClient):
    """A connection that breaks right after the commit, before MOVE reaches the server."""

    def move(self, messages, folder):  # type: ignore[no-untyped-def]
        raise ConnectionResetError("connection reset before MOVE")


def _connect_dropping(acct: ImapConfig, password: str) -> IMAPClient:
    c = _DropsBeforeMove(acct.host, port=acct.port, ssl=False, timeout=30)
    c.login(acct.login, password)
    return c


def test_connection_lost_between_commit_and_move_stores_nothing_twice(imap_app, dovecot):
    app = imap_app()
    dovecot.append([make_mail(subject=f"Crash window {i}") for i in range(4)])
    broken = _poller(app, connect=_connect_dropping)
    with pytest.raises(ConnectionResetError):
        broken.poll_once()
    broken.close()
    assert dovecot.count("INBOX") == 4  # committed, but still on the server

    poller = _poller(app)
    result = poller.poll_once()
    poller.close()
    assert (result.stored, result.finished) == (0, 4)  # moved, not stored again
    assert dovecot.count("Processed") == 4
    assert len(_inbound(app)) == 4


class _NoMove(IMAPClient):
    """The real server, seen as one without the MOVE extension."""

    def capabilities(self):  # type: ignore[no-untyped-def]
        return tuple(c for c in super().capabilities() if c != b"MOVE")


def test_without_move_copies_flags_deleted_and_expunges_by_uid(imap_app, dovecot):
    app = imap_app()

    def connect_no_move(acct: ImapConfig, password: str) -> IMAPClient:
        c = _NoMove(acct.host, port=acct.port, ssl=False, timeout=30)
        c.login(acct.login, password)
        return c

    dovecot.append([make_mail(subject="No MOVE 1"), make_mail(subject="No MOVE 2")])
    poller = _poller(app, connect=connect_no_move)
    assert poller.poll_once().stored == 2
    poller.close()
    assert dovecot.count("INBOX") == 0
    assert dovecot.count("Processed") == 2


def test_message_that_cannot_be_fetched_does_not_block_the_folder(imap_app, dovecot):
    app = imap_app(batch_size=10)
    dovecot.maildir_deliver([make_mail(subject=f"Readable {i}") for i in range(5)])
    maildir = dovecot.dir / "home" / "test" / "Maildir"
    bad_name = sorted(p.name for p in (maildir / "new").iterdir())[2]
    os.chmod(maildir / "new" / bad_name, 0)  # the server cannot read it (Dovecot drops the connection)
    try:
        poller = _poller(app)
        result = poller.poll_once()
        poller.close()
        assert result.stored == 4 and len(result.failed) == 1
        assert dovecot.count("INBOX") == 1 and dovecot.count("Processed") == 4
        status = {s.name: s for s in statuses(app)}["imap:test"]
        assert f"uid {result.failed[0]} cannot be fetched" in (status.last_error or "")
    finally:
        for p in maildir.glob(f"*/{bad_name}*"):  # Dovecot renamed it into cur/
            os.chmod(p, 0o600)
    poller = _poller(app)
    assert poller.poll_once().stored == 1  # retried once readable
    poller.close()
    app.processor.process_pending()
    assert len(list_cases(app)) == 5


def test_japanese_iso_2022_jp_mail_becomes_a_japanese_case(imap_app, dovecot):
    app = imap_app()
    raw = make_mail(subject="請求書の再発行について", sender="山田 太郎 <taro@bigcorp.co.jp>",
                    body="お世話になっております。\n先月分の請求書を再発行してください。\n", charset="iso-2022-jp", cte="7bit")
    dovecot.append(raw)
    poller = _poller(app)
    poller.poll_once()
    poller.close()
    app.processor.process_pending()
    (case,) = list_cases(app)
    assert case.subject == "請求書の再発行について"
    assert case.requester is not None and case.requester.name == "山田 太郎"
    detail = case_detail(app, case.label)
    assert detail is not None
    (msg,) = [e for e in detail["timeline"] if e["type"] == "message" and e["direction"] == "in"]
    assert "請求書を再発行してください" in msg["text"]


def test_20_mb_message_is_stored_whole(imap_app, dovecot):
    app = imap_app()
    m = EmailMessage(policy=SMTP)
    m["From"] = "Big Sender <big@customer.example.org>"
    m["To"] = "support@example.com"
    m["Subject"] = "Log files attached"
    m["Message-ID"] = "<big-1@customer.example.org>"
    m.set_content("The logs you asked for.\n")
    payload = os.urandom(15 * 1024 * 1024)
    m.add_attachment(payload, maintype="application", subtype="octet-stream", filename="logs.bin")
    raw = m.as_bytes()
    assert len(raw) > 20 * 1000 * 1000
    dovecot.append(raw)

    poller = _poller(app)
    assert poller.poll_once().stored == 1
    poller.close()
    (rec,) = _inbound(app)
    assert rec.raw == raw
    app.processor.process_pending()
    (case,) = list_cases(app)
    detail = case_detail(app, case.label)
    assert detail is not None
    (msg,) = [e for e in detail["timeline"] if e["type"] == "message" and e["direction"] == "in"]
    assert [(a["filename"], a["size"]) for a in msg["attachments"]] == [("logs.bin", len(payload))]


def test_wrong_password_is_a_login_error_and_missing_password_is_named(imap_app, dovecot, monkeypatch):
    from imapclient.exceptions import LoginError

    from intake.edges.imap import ImapAccountError

    app = imap_app()
    monkeypatch.setenv("INTAKE_TEST_IMAP_PASSWORD", "not-the-password")
    poller = _poller(app)
    with pytest.raises(LoginError):
        poller.poll_once()
    monkeypatch.delenv("INTAKE_TEST_IMAP_PASSWORD")
    with pytest.raises(ImapAccountError, match="INTAKE_TEST_IMAP_PASSWORD is not set"):
        poller.poll_once()


def test_tick_polls_every_account_once_and_status_shows_it(tmp_path, dovecot, run_intake, monkeypatch):
    for k, v in password_env(dovecot).items():
        monkeypatch.setenv(k, v)
    cfg = write_config(tmp_path, imap_toml(dovecot) + imap_toml(dovecot, user="billing", mailbox="billing@example.com"))
    dovecot.append(make_mail(subject="Ticked in", to="support@example.com"))
    dovecot.append(make_mail(subject="Invoice wrong", to="billing@example.com"), user="billing")

    # A cron-driven installation makes its database once; tick never makes one.
    assert "no database at ./intake.db" in run_intake("tick", config=cfg).stderr
    run_intake("db", "upgrade", config=cfg, check=True)
    res = run_intake("tick", config=cfg)
    assert res.returncode == 0, res.stderr
    assert "imap-poll: test: 1 stored" in res.stdout and "billing: 1 stored" in res.stdout
    cases = json.loads(run_intake("cases", "list", "--json", config=cfg, check=True).stdout)
    assert {(c["subject"], c["mailbox"], c["queue"]) for c in cases} == {
        ("Ticked in", "support@example.com", "support"), ("Invoice wrong", "billing@example.com", "billing")}

    status = run_intake("status", config=cfg, check=True).stdout
    lines = {line.split()[0]: line for line in status.splitlines()[2:]}
    assert "polled" in lines["imap:test"] and "polled" in lines["imap:billing"]

    monkeypatch.setenv("INTAKE_TEST_IMAP_BILLING_PASSWORD", "wrong")
    res = run_intake("tick", config=cfg)
    assert res.returncode == 1
    assert "billing: login failed" in res.stdout
    status = json.loads(run_intake("status", "--json", config=cfg, check=True).stdout)
    billing = next(s for s in status if s["name"] == "imap:billing")
    assert billing["state"] == "error" and "AUTHENTICATIONFAILED" in billing["last_error"]


def test_config_refuses_unusable_imap_accounts(tmp_path, dovecot):
    with pytest.raises(ConfigError, match="password_env is required"):
        load_config(write_config(tmp_path, imap_toml(dovecot, password_env="")))
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(write_config(tmp_path, imap_toml(dovecot, tls=True, starttls=True)))
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(write_config(tmp_path, imap_toml(dovecot) + imap_toml(dovecot)))
    with pytest.raises(ConfigError, match="not a \\[\\[mailbox\\]\\]"):
        load_config(write_config(tmp_path, imap_toml(dovecot, mailbox="nobody@example.com")))


@pytest.fixture
def tls_dovecot():
    server = Dovecot({"test": "secret"}, tls=True)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def _tls_acct(server: Dovecot, **keys: object) -> ImapConfig:
    values: dict = dict(host="127.0.0.1", port=server.tls_port, tls=True, mailbox="support@example.com",
                        username="test", password_env="INTAKE_TEST_IMAP_PASSWORD")
    values.update(keys)
    return ImapConfig(**values)


def test_implicit_tls_and_starttls_verify_the_server_certificate(tls_dovecot, tmp_path, monkeypatch):
    from intake.edges.imap import _error_text

    monkeypatch.setenv("INTAKE_TEST_IMAP_PASSWORD", "secret")
    tls_dovecot.append(make_mail(subject="Over TLS"))
    app = open_test_app(write_config(tmp_path))
    try:
        # Certificate verification is on by default: a private CA is not trusted…
        untrusted = ImapPoller(app.store, _tls_acct(tls_dovecot))
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            untrusted.poll_once()
        assert "TLS failed" in _error_text(err.value) and "certificate verify failed" in _error_text(err.value)
        # …unless named with ca_file (implicit TLS) …
        poller = ImapPoller(app.store, _tls_acct(tls_dovecot, ca_file=tls_dovecot.ca_file))
        assert poller.poll_once().stored == 1
        poller.close()
        # … and the same over STARTTLS on the plain port.
        tls_dovecot.append(make_mail(subject="Over STARTTLS"))
        starttls = _tls_acct(tls_dovecot, port=tls_dovecot.port, tls=False, starttls=True, ca_file=tls_dovecot.ca_file)
        poller = ImapPoller(app.store, starttls)
        assert poller.poll_once().stored == 1
        assert poller._client is not None and isinstance(poller._client.socket(), ssl.SSLSocket)
        poller.close()
        # verify_tls = false accepts any certificate (for a test box, never the default).
        client = connect(_tls_acct(tls_dovecot, verify_tls=False), "secret")
        client.logout()
    finally:
        app.close()


def test_mail_arriving_as_a_round_ends_is_not_left_for_the_next_full_check(imap_app, dovecot):
    """Each message is appended the moment the previous one is stored, i.e. while the poller
    moves it and re-enters IDLE. poll_interval is an hour: only IDLE can bring them in."""
    import threading

    app = imap_app(poll_interval=3600)
    poller = _poller(app)
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    client = dovecot.client()
    try:
        for i in range(30):
            client.append("INBOX", make_mail(subject=f"Quick {i}"))
            deadline = time.monotonic() + 15
            while count_inbound(app) <= i and time.monotonic() < deadline:
                time.sleep(0.002)
            assert count_inbound(app) == i + 1, f"message {i} was not picked up by IDLE"
    finally:
        stop.set()
        thread.join(30)
        client.logout()
    assert dovecot.count("Processed") == 30
